"""`-m iprange --src-range A-B --dst-range C-D` (libxt_iprange.c, xt_iprange.c revision 1)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError, NfInetAddr, ipv4_of, set_ipv4
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import (
    Line,
    MatchParser,
    OptionContext,
    Token,
    format_ip,
    numeric_to_ipaddr,
)

IPRANGE_SRC = 0x01
IPRANGE_DST = 0x02
IPRANGE_SRC_INV = 0x10
IPRANGE_DST_INV = 0x20
_SIDES = (("src", IPRANGE_SRC, IPRANGE_SRC_INV), ("dst", IPRANGE_DST, IPRANGE_DST_INV))


@dataclass(frozen=True, slots=True)
class AddressRange:
    """One side of `-m iprange`: inclusive, and empty when first > last (iptables allows it)."""

    first: int
    last: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.first, 32, "address")
        check_uint(self.last, 32, "address")

    def matches(self, ip: int) -> bool:
        return (self.first <= ip <= self.last) != self.negated


@dataclass(frozen=True, slots=True)
class IpRange(ExtensionMatch):
    """`-m iprange --src-range A-B --dst-range C-D` (at least one of them)."""

    src: AddressRange | None = None
    dst: AddressRange | None = None


class XtIprangeMtinfo(ctypes.Structure):
    _fields_ = [
        ("src_min", NfInetAddr),
        ("src_max", NfInetAddr),
        ("dst_min", NfInetAddr),
        ("dst_max", NfInetAddr),
        ("flags", ctypes.c_uint8),
    ]


class IpRangeParser(MatchParser):
    name = "iprange"
    options = {"src-range": ("src", True), "dst-range": ("dst", True)}
    invertible = frozenset({"src", "dst"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.ranges: dict[str, AddressRange] = {}

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, f"--{key}-range")
        assert ctx.value is not None
        first_text, dash, last_text = ctx.value.text.partition("-")
        first = numeric_to_ipaddr(first_text)
        last = numeric_to_ipaddr(last_text) if dash else first
        if first is None or last is None:
            bad = first_text if first is None else last_text
            raise ctx.error(f"iprange: bad IP address '{bad}'", at_value=True)
        self.ranges[key] = AddressRange(first, last, ctx.negated)

    def finish(self, line: Line) -> IpRange:
        if not self.ranges:
            raise self.missing(line, "--src-range or --dst-range")
        return IpRange(self.ranges.get("src"), self.ranges.get("dst"))


def _describe_side(side: AddressRange) -> str:
    return f"{' !' if side.negated else ''} {format_ip(side.first)}-{format_ip(side.last)}"


class IpRangeExtension(MatchExtension):
    name = "iprange"
    revision = 1
    model = IpRange
    data = XtIprangeMtinfo
    parser = IpRangeParser
    examples = (
        "-m iprange --src-range 198.18.0.1-198.18.0.9",
        "-m iprange ! --dst-range 198.18.1.0-198.18.1.255",
        "-m iprange --src-range 198.18.0.9-198.18.0.1 ! --dst-range 198.19.0.0-198.19.0.0",
    )

    def save(self, match: IpRange) -> list[str]:
        words = ["-m", "iprange"]
        for option, side in (("--src-range", match.src), ("--dst-range", match.dst)):
            if side is not None:
                words += ["!"] if side.negated else []
                words += [option, f"{format_ip(side.first)}-{format_ip(side.last)}"]
        return words

    def describe(self, match: IpRange) -> str:
        text = ""
        if match.src is not None:
            text += " source IP range" + _describe_side(match.src)
        if match.dst is not None:
            text += " destination IP range" + _describe_side(match.dst)
        return text

    def check(self, match: IpRange, rule: Rule, chain: str) -> None:
        if match.src is None and match.dst is None:
            raise RuleError("iprange needs --src-range or --dst-range")

    def encode(self, match: IpRange) -> XtIprangeMtinfo:
        data = XtIprangeMtinfo()
        for side, present, inverted in _SIDES:
            bounds: AddressRange | None = getattr(match, side)
            if bounds is None:
                continue
            data.flags |= present | (inverted if bounds.negated else 0)
            set_ipv4(getattr(data, f"{side}_min"), bounds.first)
            set_ipv4(getattr(data, f"{side}_max"), bounds.last)
        return data

    def decode(self, data: XtIprangeMtinfo) -> IpRange:
        sides: dict[str, AddressRange | None] = {"src": None, "dst": None}
        for side, present, inverted in _SIDES:
            if data.flags & present:
                first = ipv4_of(getattr(data, f"{side}_min"))
                last = ipv4_of(getattr(data, f"{side}_max"))
                sides[side] = AddressRange(first, last, bool(data.flags & inverted))
        if sides["src"] is None and sides["dst"] is None:
            raise BlobError("iprange match has neither a source nor a destination range")
        return IpRange(sides["src"], sides["dst"])

    def matches(self, match: IpRange, packet: Packet) -> bool:
        return (match.src is None or match.src.matches(packet.saddr)) and (
            match.dst is None or match.dst.matches(packet.daddr)
        )


EXTENSION = IpRangeExtension()
