"""`-m icmp --icmp-type TYPE[/CODE]` (libipt_icmp.c, ip_tables.c's icmp_match); loaded by
`-p icmp`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.extensions.base import MatchExtension, require_protocol
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint, set_field
from codegen.rules.names import IPPROTO_ICMP
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, strtoui

ICMP_HEADER = 8  # sizeof(struct icmphdr)
IPT_ICMP_INV = 0x01

# (name, type, code_min, code_max) exactly as libxt_icmp.h lists them: the order decides which
# name is printed and which prefixes are ambiguous.
ICMP_TYPES: tuple[tuple[str, int, int, int], ...] = (
    ("any", 0xFF, 0, 0xFF),
    ("echo-reply", 0, 0, 0xFF),
    ("pong", 0, 0, 0xFF),
    ("destination-unreachable", 3, 0, 0xFF),
    ("network-unreachable", 3, 0, 0),
    ("host-unreachable", 3, 1, 1),
    ("protocol-unreachable", 3, 2, 2),
    ("port-unreachable", 3, 3, 3),
    ("fragmentation-needed", 3, 4, 4),
    ("source-route-failed", 3, 5, 5),
    ("network-unknown", 3, 6, 6),
    ("host-unknown", 3, 7, 7),
    ("network-prohibited", 3, 9, 9),
    ("host-prohibited", 3, 10, 10),
    ("TOS-network-unreachable", 3, 11, 11),
    ("TOS-host-unreachable", 3, 12, 12),
    ("communication-prohibited", 3, 13, 13),
    ("host-precedence-violation", 3, 14, 14),
    ("precedence-cutoff", 3, 15, 15),
    ("source-quench", 4, 0, 0xFF),
    ("redirect", 5, 0, 0xFF),
    ("network-redirect", 5, 0, 0),
    ("host-redirect", 5, 1, 1),
    ("TOS-network-redirect", 5, 2, 2),
    ("TOS-host-redirect", 5, 3, 3),
    ("echo-request", 8, 0, 0xFF),
    ("ping", 8, 0, 0xFF),
    ("router-advertisement", 9, 0, 0xFF),
    ("router-solicitation", 10, 0, 0xFF),
    ("time-exceeded", 11, 0, 0xFF),
    ("ttl-exceeded", 11, 0, 0xFF),
    ("ttl-zero-during-transit", 11, 0, 0),
    ("ttl-zero-during-reassembly", 11, 1, 1),
    ("parameter-problem", 12, 0, 0xFF),
    ("ip-header-bad", 12, 0, 0),
    ("required-option-missing", 12, 1, 1),
    ("timestamp-request", 13, 0, 0xFF),
    ("timestamp-reply", 14, 0, 0xFF),
    ("address-mask-request", 17, 0, 0xFF),
    ("address-mask-reply", 18, 0, 0xFF),
)


@dataclass(frozen=True, slots=True)
class IcmpMatch(ExtensionMatch):
    """`-m icmp --icmp-type TYPE[/CODE]`; type 255 is `any`. Codes are a single code or the
    whole 0..255 range, the only two things iptables can express."""

    type: int = 0xFF
    code_min: int = 0
    code_max: int = 0xFF
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.type, 8, "icmp type")
        check_uint(self.code_min, 8, "icmp code")
        check_uint(self.code_max, 8, "icmp code")
        if self.type == 0xFF:
            # The kernel ignores the codes for `any`; keep one spelling of it.
            set_field(self, "code_min", 0)
            set_field(self, "code_max", 0xFF)


class IptIcmp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("code", ctypes.c_uint8 * 2),
        ("invflags", ctypes.c_uint8),
    ]


def _parse_type(text: str, ctx: OptionContext) -> IcmpMatch:
    found: tuple[str, int, int, int] | None = None
    for entry in ICMP_TYPES:
        # libxt_icmp accepts any unambiguous, case-insensitive prefix of a name.
        if entry[0].lower().startswith(text.lower()):
            if found is not None:
                raise ctx.error(
                    f"ambiguous ICMP type '{text}': '{found[0]}' or '{entry[0]}'?", at_value=True
                )
            found = entry
    if found is not None:
        _, icmp_type, code_min, code_max = found
        return IcmpMatch(icmp_type, code_min, code_max, ctx.negated)
    type_text, slash, code_text = text.partition("/")
    icmp_type = strtoui(type_text, 255)
    if icmp_type is None:
        raise ctx.error(f"unknown ICMP type '{text}'", at_value=True)
    if not slash:
        return IcmpMatch(icmp_type, 0, 0xFF, ctx.negated)
    code = strtoui(code_text, 255)
    if code is None:
        raise ctx.error(f"unknown ICMP code '{text}'", at_value=True)
    return IcmpMatch(icmp_type, code, code, ctx.negated)


class IcmpParser(SingleMatchParser):
    name = "icmp"
    options = {"icmp-type": ("type", True)}
    invertible = frozenset({"type"})
    required = "--icmp-type"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--icmp-type")
        assert ctx.value is not None
        self.match = _parse_type(ctx.value.text, ctx)


class Icmp(MatchExtension):
    name = "icmp"
    revision = 0
    model = IcmpMatch
    data = IptIcmp
    parser = IcmpParser
    implicit = True
    can_hotdrop = True
    examples = (
        "-p icmp -m icmp --icmp-type 8",
        "-p icmp -m icmp ! --icmp-type 3/4",
        "-p icmp -m icmp --icmp-type any",
        "-p icmp -m icmp ! --icmp-type any",
    )

    def save(self, match: IcmpMatch) -> list[str]:
        if match.type == 0xFF:
            value = "any"
        elif (match.code_min, match.code_max) == (0, 0xFF):
            value = str(match.type)
        else:
            value = f"{match.type}/{match.code_min}"
        return ["-m", "icmp", *(["!"] if match.negated else []), "--icmp-type", value]

    def describe(self, match: IcmpMatch) -> str:
        text = " icmp !type" if match.negated else " icmptype"
        text += f" {match.type}"
        if match.code_min == match.code_max:
            text += f" code {match.code_min}"
        elif (match.code_min, match.code_max) != (0, 0xFF):
            text += f" codes {match.code_min}-{match.code_max}"
        return text

    def check(self, match: IcmpMatch, rule: Rule, chain: str) -> None:
        require_protocol(
            rule, frozenset({IPPROTO_ICMP}), "icmp match needs '-p icmp' (not negated)"
        )
        full = (match.code_min, match.code_max) == (0, 0xFF)
        if not full and match.code_min != match.code_max:
            raise RuleError("--icmp-type: a code range other than 0-255 cannot be written")

    def encode(self, match: IcmpMatch) -> IptIcmp:
        codes = (ctypes.c_uint8 * 2)(match.code_min, match.code_max)
        return IptIcmp(match.type, codes, IPT_ICMP_INV if match.negated else 0)

    def decode(self, data: IptIcmp) -> IcmpMatch:
        return IcmpMatch(data.type, data.code[0], data.code[1], bool(data.invflags & IPT_ICMP_INV))

    def matches(self, match: IcmpMatch, packet: Packet) -> bool:
        if packet.fragment_offset != 0:
            return False
        header = packet.transport_header(ICMP_HEADER)
        hit = match.type == 0xFF or (
            header[0] == match.type and match.code_min <= header[1] <= match.code_max
        )
        return hit != match.negated


EXTENSION = Icmp()
