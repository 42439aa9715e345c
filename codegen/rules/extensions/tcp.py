"""`-m tcp` (libxt_tcp.c, xt_tcpudp.c): ports, flags and `--syn`; loaded by `-p tcp`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions import ports
from codegen.rules.extensions.base import MatchExtension, require_protocol
from codegen.rules.extensions.ports import PortRange
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.names import IPPROTO_TCP
from codegen.rules.packet import HotDrop, Packet
from codegen.rules.syntax import Line, OptionContext, Token

# Printing order of libxt_tcp's print_tcpf: lowest bit first.
TCP_FLAG_BITS: tuple[tuple[str, int], ...] = (
    ("FIN", 0x01),
    ("SYN", 0x02),
    ("RST", 0x04),
    ("PSH", 0x08),
    ("ACK", 0x10),
    ("URG", 0x20),
)
TCP_FLAG_NAMES: dict[str, int] = {name: bit for name, bit in TCP_FLAG_BITS} | {
    "ALL": 0x3F,
    "NONE": 0x00,
}
TCP_HEADER = 20  # sizeof(struct tcphdr), what xt_tcpudp copies first

XT_TCP_INV_SRCPT = 0x01
XT_TCP_INV_DSTPT = 0x02
XT_TCP_INV_FLAGS = 0x04
XT_TCP_INV_OPTION = 0x08
XT_TCP_INV_MASK = 0x0F


@dataclass(frozen=True, slots=True)
class TcpFlags:
    """`--tcp-flags MASK COMP`: matches when `flags & mask == comp`. Mask and comp 0 (the
    default) with no negation matches every packet; mask 0 with a comp matches none."""

    mask: int = 0
    compare: int = 0
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.mask, 8, "tcp flags mask")
        check_uint(self.compare, 8, "tcp flags")

    @classmethod
    def syn(cls, negated: bool = False) -> TcpFlags:
        """`--syn`, which iptables stores as `--tcp-flags FIN,SYN,RST,ACK SYN`."""
        return cls(0x17, 0x02, negated)

    @property
    def is_default(self) -> bool:
        # `--tcp-flags NONE FIN` (mask 0, compare set) never matches: not the default.
        return self.mask == 0 and self.compare == 0 and not self.negated


@dataclass(frozen=True, slots=True)
class TcpMatch(ExtensionMatch):
    """`-m tcp` (also loaded implicitly by `-p tcp --dport ...`)."""

    sport: PortRange = PortRange()
    dport: PortRange = PortRange()
    flags: TcpFlags = TcpFlags()


class XtTcp(ctypes.Structure):
    _fields_ = [
        ("spts", ctypes.c_uint16 * 2),
        ("dpts", ctypes.c_uint16 * 2),
        ("option", ctypes.c_uint8),
        ("flg_mask", ctypes.c_uint8),
        ("flg_cmp", ctypes.c_uint8),
        ("invflags", ctypes.c_uint8),
    ]


class TcpParser(ports.PortsParser):
    name = "tcp"
    options = {
        **ports.PortsParser.options,
        "syn": ("syn", False),
        "tcp-flags": ("flags", True),
        "tcp-option": ("option", True),
    }
    invertible = ports.PortsParser.invertible | {"syn", "flags"}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.flags = TcpFlags()

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in ("sport", "dport"):
            super().parse(key, ctx)
            return
        if "syn" in self.given or "flags" in self.given:
            raise ctx.error("tcp: only one of --syn or --tcp-flags allowed")
        if key == "syn":
            self.flags = TcpFlags.syn(ctx.negated)
            return
        if key == "option":
            raise ctx.error(
                "tcp: --tcp-option is not supported (supported: --sport, --dport, --syn,"
                " --tcp-flags)"
            )
        assert ctx.value is not None
        compare = ctx.next_word()
        if compare is None:
            raise ctx.error("--tcp-flags needs two arguments: MASK COMP, e.g. SYN,ACK SYN")
        mask = _parse_flags(ctx.value, ctx)
        self.flags = TcpFlags(mask, _parse_flags(compare, ctx), ctx.negated)

    def finish(self, line: Line) -> TcpMatch:
        return TcpMatch(self.sport, self.dport, self.flags)


def _parse_flags(token: Token, ctx: OptionContext) -> int:
    value = 0
    for name in token.text.split(","):
        if not name:
            continue  # strtok skips empty fields: `SYN,` is SYN
        bit = TCP_FLAG_NAMES.get(name.upper())
        if bit is None:
            raise ctx.line.error(
                f"unknown TCP flag '{name}' (flags: FIN SYN RST PSH ACK URG ALL NONE)",
                token.column,
            )
        value |= bit
    return value


def _flag_names(value: int) -> str:
    names = [name for name, bit in TCP_FLAG_BITS if value & bit]
    return ",".join(names) if names else "NONE"


class Tcp(MatchExtension):
    name = "tcp"
    revision = 0
    model = TcpMatch
    data = XtTcp
    parser = TcpParser
    implicit = True
    can_hotdrop = True
    examples = (
        "-p tcp -m tcp --sport 1024:65535 --dport 22",
        "-p tcp -m tcp ! --sport 0:1023 ! --dport 80 ! --tcp-flags FIN,SYN,RST,ACK SYN",
        "-p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG NONE",
        "-p tcp -m tcp --tcp-flags NONE FIN",
        "-p tcp -m tcp",
    )

    def save(self, match: TcpMatch) -> list[str]:
        words = [
            "-m",
            "tcp",
            *ports.save_ports("--sport", match.sport),
            *ports.save_ports("--dport", match.dport),
        ]
        flags = match.flags
        if not flags.is_default:
            words += ["!"] if flags.negated else []
            words += ["--tcp-flags", _flag_names(flags.mask), _flag_names(flags.compare)]
        return words

    def describe(self, match: TcpMatch) -> str:
        text = f" tcp{ports.describe_ports('spt', match.sport)}"
        text += ports.describe_ports("dpt", match.dport)
        flags = match.flags
        if flags.mask == 0 and not flags.negated:
            return text
        inverse = "!" if flags.negated else ""
        return text + f" flags:{inverse}0x{flags.mask:02X}/0x{flags.compare:02X}"

    def as_saved(self, match: TcpMatch) -> TcpMatch:
        flags = match.flags
        if flags.mask == 0 and not flags.negated:
            flags = TcpFlags()  # `--tcp-flags NONE X` is not printed
        return TcpMatch(ports.as_saved(match.sport), ports.as_saved(match.dport), flags)

    def check(self, match: TcpMatch, rule: Rule, chain: str) -> None:
        require_protocol(rule, frozenset({IPPROTO_TCP}), "tcp match needs '-p tcp' (not negated)")
        ports.check_ports(match.sport, "--sport")
        ports.check_ports(match.dport, "--dport")
        if match.flags.mask > 0x3F or match.flags.compare > 0x3F:
            raise RuleError("--tcp-flags: only FIN,SYN,RST,PSH,ACK,URG can be matched")

    def encode(self, match: TcpMatch) -> XtTcp:
        inverted = (
            (XT_TCP_INV_SRCPT if match.sport.negated else 0)
            | (XT_TCP_INV_DSTPT if match.dport.negated else 0)
            | (XT_TCP_INV_FLAGS if match.flags.negated else 0)
        )
        flags = match.flags
        return XtTcp(
            ports.pair(match.sport), ports.pair(match.dport), 0, flags.mask, flags.compare, inverted
        )

    def decode(self, data: XtTcp) -> TcpMatch:
        if data.option or data.invflags & XT_TCP_INV_OPTION:
            raise BlobError("tcp match: --tcp-option is not supported")
        if data.invflags & ~XT_TCP_INV_MASK:
            raise BlobError(f"tcp match: unknown invflags 0x{data.invflags:02x}")
        return TcpMatch(
            ports.from_pair(data.spts, bool(data.invflags & XT_TCP_INV_SRCPT)),
            ports.from_pair(data.dpts, bool(data.invflags & XT_TCP_INV_DSTPT)),
            TcpFlags(data.flg_mask, data.flg_cmp, bool(data.invflags & XT_TCP_INV_FLAGS)),
        )

    def matches(self, match: TcpMatch, packet: Packet) -> bool:
        if packet.fragment_offset != 0:
            # xt_tcpudp: an offset-1 fragment could rewrite the flags of the first one.
            if packet.fragment_offset == 1:
                raise HotDrop
            return False
        header = packet.transport_header(TCP_HEADER)
        sport, dport = ports.ports_of(header)
        flags = match.flags
        return (
            match.sport.matches(sport)
            and match.dport.matches(dport)
            and ((header[13] & flags.mask) == flags.compare) != flags.negated
        )


EXTENSION = Tcp()
