"""One emitter per match family: each turns a match into instructions that fall through when the
packet matches and jump to `miss` when it does not (or to `hotdrop` when netfilter would drop the
packet on the spot, as xt_tcpudp does for a transport header it cannot read).

Every emitter reads packet facts through FACTS and uses only r1-r3, so a rule's matches can be
emitted one after another with no register allocation. Comparisons are 32-bit (JMP32): facts are
at most 32 bits wide, and a 32-bit immediate would be sign-extended by a 64-bit compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, AluOp, JmpOp
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

from .layout import FACTS, Facts, Field

UINT32_MAX = 0xFFFF_FFFF
# Bytes of transport header each match needs before it looks at anything (sizeof the header
# struct the kernel's match copies with skb_header_pointer).
TCP_HEADER, UDP_HEADER, ICMP_HEADER, PORTS = 20, 8, 8, 4


class UnsupportedMatch(ValueError):
    pass


@dataclass
class Context:
    """What emitters need beyond the match: labels, and interface names resolved to ifindexes."""

    miss: str
    hotdrop: str
    new_label: Callable[[str], str]
    interfaces: Mapping[str, int]


def load(field: Field) -> Item:
    return I.ldx(field.size, R1, FACTS, field.offset)


def _jump_unless(equal: bool, value: int, target: str) -> Item:
    """Jump to target unless r1 == value (equal=True) or unless r1 != value (equal=False)."""
    return I.jmp32(JmpOp.JNE if equal else JmpOp.JEQ, R1, value, target)


def _in_range(first: int, last: int, negated: bool, top: int, ctx: Context) -> list[Item]:
    """r1 in [first, last] (or not, if negated), else miss. `top` is the field's maximum."""
    if first > last:  # an empty range matches nothing; negated, everything
        return [] if negated else [I.ja(ctx.miss)]
    if first == last:
        return [_jump_unless(not negated, first, ctx.miss)]
    if not negated:
        code: list[Item] = []
        if first > 0:
            code.append(I.jmp32(JmpOp.JLT, R1, first, ctx.miss))
        if last < top:
            code.append(I.jmp32(JmpOp.JGT, R1, last, ctx.miss))
        return code
    if first == 0 and last >= top:
        return [I.ja(ctx.miss)]
    outside = ctx.new_label("outside")
    code = []
    if first > 0:
        code.append(I.jmp32(JmpOp.JLT, R1, first, outside))
    if last < top:
        code.append(I.jmp32(JmpOp.JGT, R1, last, outside))
    return [*code, I.ja(ctx.miss), Label(outside)]


def address(match: Address, ctx: Context) -> list[Item]:
    field = Facts.SADDR if match.direction == "src" else Facts.DADDR
    if match.mask == 0:  # 0.0.0.0/0 matches every packet
        return [I.ja(ctx.miss)] if match.negated else []
    code = [load(field)]
    if match.mask != UINT32_MAX:
        code.append(I.alu32(AluOp.AND, R1, match.mask))
    return [*code, _jump_unless(not match.negated, match.address, ctx.miss)]


def interface(match: Interface, ctx: Context) -> list[Item]:
    """Names are resolved to the ifindexes present when the program is built; `eth+` becomes
    every such device whose name starts with `eth`."""
    if match.wildcard:
        prefix = match.name[:-1]
        indexes = sorted(i for name, i in ctx.interfaces.items() if name.startswith(prefix))
    else:
        indexes = [ctx.interfaces[match.name]] if match.name in ctx.interfaces else []
    field = Facts.IN_IFINDEX if match.direction == "in" else Facts.OUT_IFINDEX
    if not indexes:
        return [] if match.negated else [I.ja(ctx.miss)]
    code: list[Item] = [load(field)]
    if match.negated:
        return [*code, *(I.jmp32(JmpOp.JEQ, R1, index, ctx.miss) for index in indexes)]
    if len(indexes) == 1:
        return [*code, I.jmp32(JmpOp.JNE, R1, indexes[0], ctx.miss)]
    hit = ctx.new_label("iface")
    return [
        *code,
        *(I.jmp32(JmpOp.JEQ, R1, index, hit) for index in indexes),
        I.ja(ctx.miss),
        Label(hit),
    ]


def protocol(match: Protocol, ctx: Context) -> list[Item]:
    if match.number == 0:
        return [I.ja(ctx.miss)] if match.negated else []
    return [load(Facts.PROTOCOL), _jump_unless(not match.negated, match.number, ctx.miss)]


def fragment(match: Fragment, ctx: Context) -> list[Item]:
    # -f: a second or later fragment; ! -f: a first fragment or a whole packet.
    return [
        load(Facts.FRAGMENT),
        I.jmp32(JmpOp.JNE if match.negated else JmpOp.JEQ, R1, 0, ctx.miss),
    ]


def _transport_guard(needed: int, ctx: Context, *, evil_offset_one: bool = False) -> list[Item]:
    """What xt_tcpudp, icmp and multiport do first: never match a later fragment (and, for TCP,
    drop a fragment at offset 1, which could rewrite the flags); drop a packet whose transport
    header is shorter than the match needs."""
    code: list[Item] = [load(Facts.FRAGMENT)]
    if evil_offset_one:
        first = ctx.new_label("first_fragment")
        code += [
            I.jmp32(JmpOp.JEQ, R1, 0, first),
            I.jmp32(JmpOp.JEQ, R1, 1, ctx.hotdrop),
            I.ja(ctx.miss),
            Label(first),
        ]
    else:
        code.append(I.jmp32(JmpOp.JNE, R1, 0, ctx.miss))
    return [*code, load(Facts.L4_LEN), I.jmp32(JmpOp.JLT, R1, needed, ctx.hotdrop)]


def _ports(sport: PortRange, dport: PortRange, ctx: Context) -> list[Item]:
    code: list[Item] = []
    for field, ports in ((Facts.SPORT, sport), (Facts.DPORT, dport)):
        if not ports.is_default:
            code += [load(field), *_in_range(ports.first, ports.last, ports.negated, 0xFFFF, ctx)]
    return code


def _flags(flags: TcpFlags, ctx: Context) -> list[Item]:
    if flags.is_default:
        return []
    return [
        load(Facts.TCP_FLAGS),
        I.alu32(AluOp.AND, R1, flags.mask),
        _jump_unless(not flags.negated, flags.compare, ctx.miss),
    ]


def tcp(match: TcpMatch, ctx: Context) -> list[Item]:
    return [
        *_transport_guard(TCP_HEADER, ctx, evil_offset_one=True),
        *_ports(match.sport, match.dport, ctx),
        *_flags(match.flags, ctx),
    ]


def udp(match: UdpMatch, ctx: Context) -> list[Item]:
    return [*_transport_guard(UDP_HEADER, ctx), *_ports(match.sport, match.dport, ctx)]


def icmp(match: IcmpMatch, ctx: Context) -> list[Item]:
    code = _transport_guard(ICMP_HEADER, ctx)
    if match.type == 0xFF:  # any type
        return code + ([I.ja(ctx.miss)] if match.negated else [])
    if not match.negated:
        return [
            *code,
            load(Facts.ICMP_TYPE),
            I.jmp32(JmpOp.JNE, R1, match.type, ctx.miss),
            load(Facts.ICMP_CODE),
            *_in_range(match.code_min, match.code_max, False, 0xFF, ctx),
        ]
    # ! --icmp-type: miss only when type and code both match.
    differs = ctx.new_label("icmp_differs")
    return [
        *code,
        load(Facts.ICMP_TYPE),
        I.jmp32(JmpOp.JNE, R1, match.type, differs),
        load(Facts.ICMP_CODE),
        *_in_range(match.code_min, match.code_max, False, 0xFF, _with_miss(ctx, differs)),
        I.ja(ctx.miss),
        Label(differs),
    ]


def _with_miss(ctx: Context, miss: str) -> Context:
    return Context(miss, ctx.hotdrop, ctx.new_label, ctx.interfaces)


def multiport(match: Multiport, ctx: Context) -> list[Item]:
    """xt_multiport revision 1: the first listed port or range that contains the packet's port
    decides (match, or miss if negated); none does: miss (or match if negated)."""
    hit = ctx.new_label("multiport_hit")
    done = ctx.new_label("multiport_done")
    code = _transport_guard(PORTS, ctx)
    fields = {"src": [Facts.SPORT], "dst": [Facts.DPORT], "any": [Facts.DPORT, Facts.SPORT]}
    for field in fields[match.direction]:
        code.append(load(field))
        for first, last in match.ports:
            if first == last:
                code.append(I.jmp32(JmpOp.JEQ, R1, first, hit))
            else:
                skip = ctx.new_label("multiport_next")
                code += [
                    I.jmp32(JmpOp.JLT, R1, first, skip),
                    I.jmp32(JmpOp.JLE, R1, last, hit),
                    Label(skip),
                ]
    if match.negated:
        return [*code, I.ja(done), Label(hit), I.ja(ctx.miss), Label(done)]
    return [*code, I.ja(ctx.miss), Label(hit)]


def iprange(match: IpRange, ctx: Context) -> list[Item]:
    code: list[Item] = []
    for field, side in ((Facts.SADDR, match.src), (Facts.DADDR, match.dst)):
        if side is not None:
            code += [load(field), *_address_range(side, ctx)]
    return code


def _address_range(side: AddressRange, ctx: Context) -> list[Item]:
    return _in_range(side.first, side.last, side.negated, UINT32_MAX, ctx)


def length(match: Length, ctx: Context) -> list[Item]:
    return [load(Facts.TOT_LEN), *_in_range(match.min, match.max, match.negated, 0xFFFF, ctx)]


def ttl(match: Ttl, ctx: Context) -> list[Item]:
    code: list[Item] = [load(Facts.TTL)]
    if match.op == "eq":
        return [*code, _jump_unless(not match.negated, match.value, ctx.miss)]
    if match.op == "lt":
        return [*code, I.jmp32(JmpOp.JGE, R1, match.value, ctx.miss)]
    return [*code, I.jmp32(JmpOp.JLE, R1, match.value, ctx.miss)]


def pkttype(match: PktType, ctx: Context) -> list[Item]:
    return [load(Facts.PKT_TYPE), _jump_unless(not match.negated, PKT_TYPES[match.type], ctx.miss)]


def mark(match: Mark, ctx: Context) -> list[Item]:
    code: list[Item] = [load(Facts.MARK)]
    if match.mask != UINT32_MAX:
        code.append(I.alu32(AluOp.AND, R1, match.mask))
    return [*code, _jump_unless(not match.negated, match.value, ctx.miss)]


def comment(match: Comment, ctx: Context) -> list[Item]:
    return []


EMITTERS: dict[type, Callable[[Match, Context], list[Item]]] = {
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


def emit(matches: Sequence[Match], ctx: Context) -> list[Item]:
    """All matches of a rule in netfilter's order: the IP header part (ip_packet_match), then
    the extensions in the order given. The order matters where an extension can hotdrop."""
    ordered = [m for m in matches if isinstance(m, IP_PART)]
    ordered += [m for m in matches if not isinstance(m, IP_PART)]
    code: list[Item] = []
    for match in ordered:
        emitter = EMITTERS.get(type(match))
        if emitter is None:
            raise UnsupportedMatch(f"no code generator for {type(match).__name__}")
        code += emitter(match, ctx)
    return code
