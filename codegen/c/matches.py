"""One C writer per match family: each turns a match into statements that fall through when the
packet matches, `goto` the rule's miss label when it does not, and `goto` its hotdrop label when
netfilter would drop the packet on the spot (xt_tcpudp, icmp and multiport with a transport
header too short for them, and a TCP fragment at offset 1).

Written from the kernel's matches (and the reference evaluator), not from codegen.tc.matches:
this backend is meant to be an independent second opinion. Conditions are plain C over the
packet facts (`f->...`, host order); clang does the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.iprange import AddressRange, IpRange
from codegen.rules.extensions.length import Length
from codegen.rules.extensions.mark import Mark
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.pkttype import PktType
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.ttl import Ttl
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import IP_PART, Address, Fragment, Interface, Match, Protocol
from codegen.rules.names import PKT_TYPES

UINT32_MAX, UINT16_MAX, UINT8_MAX = 0xFFFF_FFFF, 0xFFFF, 0xFF
# Transport bytes each match reads first (the struct its kernel match copies with
# skb_header_pointer): struct tcphdr, struct udphdr, struct icmphdr, and multiport's two ports.
TCP_HEADER, UDP_HEADER, ICMP_HEADER, PORTS = 20, 8, 8, 4
# Matches that can drop a packet on their own (xt_tcpudp, xt_icmp, xt_multiport).
CAN_HOTDROP = (TcpMatch, UdpMatch, IcmpMatch, Multiport)


class UnsupportedMatch(ValueError):
    """A match this backend has no writer for."""


@dataclass(frozen=True)
class Labels:
    """Where a rule's code goes: `miss` (next rule), `hotdrop`; and the devices known."""

    miss: str
    hotdrop: str
    interfaces: Mapping[str, int]


def _hex(value: int) -> str:
    return f"0x{value:x}u"


_INVERSE = {"==": "!=", "!=": "==", "<": ">=", ">": "<=", "<=": ">", ">=": "<"}
_COMPARISON = re.compile(r"(.+?) (==|!=|<=|>=|<|>) (\S+)")


def _negation(condition: str) -> str:
    """`!condition`, written as the opposite comparison when it is a single one."""
    found = _COMPARISON.fullmatch(condition)
    if found and "&&" not in condition and "||" not in condition:
        return f"{found[1]} {_INVERSE[found[2]]} {found[3]}"
    return f"!({condition})"


def _require(hit: str, negated: bool, labels: Labels) -> list[str]:
    """Miss unless `hit` holds (or, negated, unless it does not)."""
    return [f"if ({hit if negated else _negation(hit)}) goto {labels.miss};"]


def _unless(condition: str, labels: Labels) -> list[str]:
    return _require(condition, False, labels)


def _always_miss(labels: Labels) -> list[str]:
    return [f"goto {labels.miss};"]


def _in_range(value: str, first: int, last: int, top: int) -> str:
    """`first <= value <= last` for an unsigned field of maximum `top`, without comparisons
    that are always true (clang would warn). An empty range (first > last) is `0`."""
    if first > last:
        return "0"
    if first == last:
        return f"{value} == {_number(first, top)}"
    parts = []
    if first > 0:
        parts.append(f"{value} >= {_number(first, top)}")
    if last < top:
        parts.append(f"{value} <= {_number(last, top)}")
    return " && ".join(parts) or "1"


def _number(value: int, top: int) -> str:
    return _hex(value) if top == UINT32_MAX else str(value)


def _range_match(value: str, first: int, last: int, negated: bool, top: int, labels) -> list[str]:
    inside = _in_range(value, first, last, top)
    if inside == "1":
        return _always_miss(labels) if negated else []
    if inside == "0":
        return [] if negated else _always_miss(labels)
    return _require(inside, negated, labels)


def address(match: Address, labels: Labels) -> list[str]:
    """ip_packet_match: `(addr & mask) == address`, inverted by `!`."""
    field = "f->saddr" if match.direction == "src" else "f->daddr"
    if match.mask == 0:
        return _always_miss(labels) if match.negated else []
    masked = field if match.mask == UINT32_MAX else f"({field} & {_hex(match.mask)})"
    return _require(f"{masked} == {_hex(match.address)}", match.negated, labels)


def interface(match: Interface, labels: Labels) -> list[str]:
    """Device names become the ifindexes known when the program is built (`eth+`: every known
    device whose name starts with `eth`); a name nobody has matches no packet."""
    if match.wildcard:
        prefix = match.name[:-1]
        indexes = sorted(i for name, i in labels.interfaces.items() if name.startswith(prefix))
    else:
        indexes = [labels.interfaces[match.name]] if match.name in labels.interfaces else []
    field = "f->in_ifindex" if match.direction == "in" else "f->out_ifindex"
    if not indexes:
        return [] if match.negated else _always_miss(labels)
    known = " || ".join(f"{field} == {index}" for index in indexes)
    return _require(known, match.negated, labels)


def protocol(match: Protocol, labels: Labels) -> list[str]:
    if match.number == 0:  # -p all
        return _always_miss(labels) if match.negated else []
    return _require(f"f->protocol == {match.number}", match.negated, labels)


def fragment(match: Fragment, labels: Labels) -> list[str]:
    # -f: second and later fragments; ! -f: first fragments and whole datagrams.
    return _unless("f->fragment == 0" if match.negated else "f->fragment != 0", labels)


def _transport_header(needed: int, labels: Labels, *, tcp: bool = False) -> list[str]:
    """Never a later fragment (TCP: a fragment at offset 1, which could overwrite the flags of
    the first, is dropped); a header shorter than `needed` bytes is dropped."""
    if tcp:
        code = [
            "if (f->fragment != 0) {",
            f"    if (f->fragment == 1) goto {labels.hotdrop};",
            f"    goto {labels.miss};",
            "}",
        ]
    else:
        code = [f"if (f->fragment != 0) goto {labels.miss};"]
    return [*code, f"if (f->l4_len < {needed}) goto {labels.hotdrop};"]


def _ports(sport: PortRange, dport: PortRange, labels: Labels) -> list[str]:
    code: list[str] = []
    for field, ports in (("f->sport", sport), ("f->dport", dport)):
        if not ports.is_default:
            code += _range_match(field, ports.first, ports.last, ports.negated, UINT16_MAX, labels)
    return code


def _flags(flags: TcpFlags, labels: Labels) -> list[str]:
    if flags.is_default:
        return []
    if flags.compare & ~flags.mask:  # a flag compared but masked out: no packet matches
        return [] if flags.negated else _always_miss(labels)
    hit = f"(f->tcp_flags & {_hex(flags.mask)}) == {_hex(flags.compare)}"
    return _require(hit, flags.negated, labels)


def tcp(match: TcpMatch, labels: Labels) -> list[str]:
    return [
        *_transport_header(TCP_HEADER, labels, tcp=True),
        *_ports(match.sport, match.dport, labels),
        *_flags(match.flags, labels),
    ]


def udp(match: UdpMatch, labels: Labels) -> list[str]:
    return [*_transport_header(UDP_HEADER, labels), *_ports(match.sport, match.dport, labels)]


def icmp(match: IcmpMatch, labels: Labels) -> list[str]:
    code = _transport_header(ICMP_HEADER, labels)
    if match.type == 0xFF:  # any type: the codes do not matter
        return code + (_always_miss(labels) if match.negated else [])
    codes = _in_range("f->icmp_code", match.code_min, match.code_max, UINT8_MAX)
    hit = f"f->icmp_type == {match.type}" + ("" if codes == "1" else f" && ({codes})")
    return code + _require(hit, match.negated, labels)


def multiport(match: Multiport, labels: Labels) -> list[str]:
    """xt_multiport revision 1: a hit when any listed port or range holds the packet's port
    (source, destination, or either); `!` inverts."""
    fields = {"src": ("f->sport",), "dst": ("f->dport",), "any": ("f->sport", "f->dport")}
    hits = [
        f"({_in_range(field, first, last, UINT16_MAX)})"
        for first, last in match.ports
        for field in fields[match.direction]
    ]
    hit = " || ".join(hits)
    return [
        *_transport_header(PORTS, labels),
        *_require(hit, match.negated, labels),
    ]


def _address_range(field: str, side: AddressRange, labels: Labels) -> list[str]:
    return _range_match(field, side.first, side.last, side.negated, UINT32_MAX, labels)


def iprange(match: IpRange, labels: Labels) -> list[str]:
    code: list[str] = []
    if match.src is not None:
        code += _address_range("f->saddr", match.src, labels)
    if match.dst is not None:
        code += _address_range("f->daddr", match.dst, labels)
    return code


def length(match: Length, labels: Labels) -> list[str]:
    return _range_match("f->tot_len", match.min, match.max, match.negated, UINT16_MAX, labels)


def ttl(match: Ttl, labels: Labels) -> list[str]:
    if match.op == "eq":
        return _require(f"f->ttl == {match.value}", match.negated, labels)
    if (match.op, match.value) in (("lt", 0), ("gt", UINT8_MAX)):
        return _always_miss(labels)  # no TTL is below 0 or above 255
    operator = "<" if match.op == "lt" else ">"
    return _unless(f"f->ttl {operator} {match.value}", labels)


def pkttype(match: PktType, labels: Labels) -> list[str]:
    return _require(f"f->pkt_type == {PKT_TYPES[match.type]}", match.negated, labels)


def mark(match: Mark, labels: Labels) -> list[str]:
    """xt_mark: `(mark & mask) == value`; the value is not masked (0x10/0x1 never matches)."""
    masked = "f->mark" if match.mask == UINT32_MAX else f"(f->mark & {_hex(match.mask)})"
    return _require(f"{masked} == {_hex(match.value)}", match.negated, labels)


def comment(match: Comment, labels: Labels) -> list[str]:
    return []


WRITERS: dict[type, Callable[[Match, Labels], list[str]]] = {
    Address: address,
    Interface: interface,
    Protocol: protocol,
    Fragment: fragment,
    TcpMatch: tcp,
    UdpMatch: udp,
    IcmpMatch: icmp,
    Multiport: multiport,
    IpRange: iprange,
    Length: length,
    Ttl: ttl,
    PktType: pkttype,
    Mark: mark,
    Comment: comment,
}


def write_matches(matches: Sequence[Match], labels: Labels) -> list[str]:
    """A rule's matches in the order ipt_do_table checks them: the IP header part
    (ip_packet_match) first, then the extensions as listed. The order decides hotdrops."""
    ordered = [m for m in matches if isinstance(m, IP_PART)]
    ordered += [m for m in matches if not isinstance(m, IP_PART)]
    code: list[str] = []
    for match in ordered:
        writer = WRITERS.get(type(match))
        if writer is None:
            raise UnsupportedMatch(f"the C backend has no code for {type(match).__name__}")
        code += writer(match, labels)
    return code
