"""`-m set` (xt_set revision 4, ip_set_test): one BPF map per set the rules use, a copy of the
set made when the rule set is applied (harness.deploy.sets), named `set:NAME` among the maps
a program is linked with:

- hash:ip: a hash, key the address (network order);
- hash:ip,port: a hash, key {address, protocol, 0, port (network order)};
- hash:net: an LPM trie, key {prefix length, address}, value MEMBER or NOMATCH, so that the
  longest prefix decides as ip_set's hash:net does, a `nomatch` entry being an exception;
- hash:net,port: an LPM trie, key {32 + prefix length, protocol, 0, port, address}: the
  protocol and port are always whole, the address a prefix;
- bitmap:port: an array of 65,536 bytes by port, 1 for a member.

The packet's port is ip_set_get_ip4_port's: protocol 0 and later fragments of TCP, UDP,
UDPLITE, SCTP and ICMP fail (no match), other protocols have port 0, ICMP's is type << 8 |
code, and TCP (20 bytes), SCTP (12), UDP, UDPLITE and ICMP (8) need their header whole.
bitmap:port takes TCP and UDP only. A set changed after the apply is not seen until the next;
`bpflab set add|del` changes the map itself (harness.deploy.sets), seen by the next packet.
The set a match reads is the one bound to it (codegen.rules.extensions.set.bind_sets), or the
stand-in of its name.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R10, AluOp, JmpOp, MapType, Size
from codegen.bpf.maps import BPF_F_NO_PREALLOC
from codegen.rules.extensions.set import SetMatch
from codegen.rules.sets import (
    BITMAP_PORT,
    HASH_IP,
    HASH_IP_PORT,
    HASH_NET,
    HASH_NET_PORT,
    PORT_HEADERS,
    STANDIN_SETS,
    WITH_NOMATCH,
    IpSet,
    Member,
)

from ..layout import Facts, map_and_key
from ..program import CompileError
from .base import Context, Emitter, load

MEMBER, NOMATCH = 1, 2  # values of the tries (hash and array values are MEMBER)
PORTS = 65536
# key size, value size per type
SHAPES = {
    HASH_IP: (MapType.HASH, 4),
    HASH_IP_PORT: (MapType.HASH, 8),
    HASH_NET: (MapType.LPM_TRIE, 8),
    HASH_NET_PORT: (MapType.LPM_TRIE, 12),
    BITMAP_PORT: (MapType.ARRAY, 4),
}


def map_name(set_name: str) -> str:
    """The name the programs reference set `set_name`'s map by."""
    return f"set:{set_name}"


def bound_set(match: SetMatch) -> IpSet:
    table = match.bound or STANDIN_SETS.sets.get(match.name)
    if table is None:
        raise CompileError(f"set '{match.name}' is not bound to a set (bind_sets first)")
    return table


def _port_word(protocol: int, port: int) -> bytes:
    return bytes([protocol, 0]) + port.to_bytes(2, "big")


def entries(table: IpSet, members: Iterable[Member] | None = None) -> dict[bytes, bytes]:
    """The keys and values of `table`'s map (of only `members` of it, when given)."""
    found: dict[bytes, bytes] = {}
    member = bytes([MEMBER])
    for m in table.members if members is None else members:
        address = m.network.to_bytes(4, "big")
        if table.kind == HASH_IP:
            found[address] = member
        elif table.kind == HASH_IP_PORT:
            found[address + _port_word(m.protocol, m.port)] = member
        elif table.kind == HASH_NET:
            value = bytes([NOMATCH if m.nomatch else MEMBER])
            found[struct.pack("<I", m.prefix) + address] = value
        elif table.kind == HASH_NET_PORT:
            value = bytes([NOMATCH if m.nomatch else MEMBER])
            key = struct.pack("<I", 32 + m.prefix) + _port_word(m.protocol, m.port) + address
            found[key] = value
        else:
            found[struct.pack("<I", m.port)] = member
    return found


def changes(
    table: IpSet, went_in: Iterable[Member], went_out: Iterable[Member]
) -> tuple[dict[bytes, bytes], list[bytes]]:
    """What changes in `table`'s map when `went_in` are added and `went_out` deleted (a
    member replaced by one with another nomatch flag is in both): (keys to write with their
    values, keys to delete). bitmap:port's array cannot lose a key: a 0 is written."""
    written = entries(table, went_in)
    gone = [key for key in entries(table, went_out) if key not in written]
    if table.kind == BITMAP_PORT:
        written.update((key, bytes(1)) for key in gone)
        gone = []
    return written, gone


def map_shape(table: IpSet) -> tuple[MapType, int, int, int, int]:
    """(type, key size, value size, entries, flags) of `table`'s map: room for as many
    members as the set may hold (its maxelem), a hash allocating them as they come."""
    kind, key_size = SHAPES[table.kind]
    size = PORTS if table.kind == BITMAP_PORT else max(1, table.capacity, len(table.members))
    return kind, key_size, 1, size, BPF_F_NO_PREALLOC if kind == MapType.HASH else 0


def _port(source: bool, no: str, ctx: Context, *, tcp_udp_only: bool = False) -> list[Item]:
    """r2 = the protocol, r3 = the port (host order) as ip_set_get_ip4_port gives them, or a
    jump to `no` where it fails."""
    fragment, done = ctx.new_label("later_fragment"), ctx.new_label("port_done")
    code: list[Item] = [
        load(Facts.PROTOCOL),
        I.mov32(R2, R1),
        I.mov32(R3, 0),
        I.jmp32(JmpOp.JEQ, R2, 0, no),
        load(Facts.FRAGMENT),
        I.jmp32(JmpOp.JNE, R1, 0, fragment),
        load(Facts.L4_LEN),
    ]
    for protocol, needed in PORT_HEADERS.items():
        other = ctx.new_label("other_protocol")
        code += [I.jmp32(JmpOp.JNE, R2, protocol, other), I.jmp32(JmpOp.JLT, R1, needed, no)]
        if protocol == 1:
            code += [
                load(Facts.ICMP_TYPE),
                I.mov32(R3, R1),
                I.alu32(AluOp.LSH, R3, 8),
                load(Facts.ICMP_CODE),
                I.alu32(AluOp.OR, R3, R1),
            ]
        else:
            code += [load(Facts.SPORT if source else Facts.DPORT), I.mov32(R3, R1)]
        code += [I.ja(done), Label(other)]
    code += [I.ja(done), Label(fragment)]
    for protocol in PORT_HEADERS:
        code.append(I.jmp32(JmpOp.JEQ, R2, protocol, no))
    code.append(Label(done))
    if tcp_udp_only:
        accepted = ctx.new_label("tcp_or_udp")
        code += [
            I.jmp32(JmpOp.JEQ, R2, 6, accepted),
            I.jmp32(JmpOp.JNE, R2, 17, no),
            Label(accepted),
        ]
    return code


def _port_key(offset: int) -> list[Item]:
    """Store {protocol, 0, port in network order} (r2, r3) as the word at `offset`."""
    return [
        I.to_be(R3, 16),
        I.alu32(AluOp.LSH, R3, 16),
        I.alu32(AluOp.OR, R3, R2),
        I.stx(Size.W, R10, offset, R3),
    ]


def _address_key(source: bool, offset: int) -> list[Item]:
    return [
        load(Facts.SADDR if source else Facts.DADDR),
        I.to_be(R1, 32),
        I.stx(Size.W, R10, offset, R1),
    ]


def set_match(match: SetMatch, ctx: Context) -> list[Item]:
    table = bound_set(match)
    if len(match.directions) < table.dimension:  # ip_set_test answers no
        return [] if match.negated else [I.ja(ctx.miss)]
    out = ctx.new_label("set_no")
    no = out if match.negated else ctx.miss
    first = match.directions[0] == "src"
    key = ctx.key_offset
    code: list[Item] = []
    if table.kind == BITMAP_PORT:
        code += _port(first, no, ctx, tcp_udp_only=True)
        code += [I.stx(Size.W, R10, key, R3)]
    elif table.kind == HASH_IP:
        code += [load(Facts.SADDR if first else Facts.DADDR), I.jmp32(JmpOp.JEQ, R1, 0, no)]
        code += _address_key(first, key)
    elif table.kind == HASH_IP_PORT:
        code += _port(match.directions[1] == "src", no, ctx)
        code += _port_key(key + 4)
        code += _address_key(first, key)
    elif table.kind == HASH_NET:
        code += [I.st(Size.W, R10, key, 32), *_address_key(first, key + 4)]
    else:
        code += _port(match.directions[1] == "src", no, ctx)
        code += _port_key(key + 4)
        code += [I.st(Size.W, R10, key, 64), *_address_key(first, key + 8)]
    code += [*map_and_key(map_name(match.name), key), I.call("map_lookup_elem")]
    code.append(I.jmp(JmpOp.JEQ, R0, 0, no))
    if table.kind in WITH_NOMATCH:
        wanted = NOMATCH if match.return_nomatch else MEMBER
        code += [I.ldx(Size.B, R1, R0, 0), I.jmp32(JmpOp.JNE, R1, wanted, no)]
    elif table.kind == BITMAP_PORT:
        code += [I.ldx(Size.B, R1, R0, 0), I.jmp32(JmpOp.JEQ, R1, 0, no)]
    if match.negated:
        code += [I.ja(ctx.miss), Label(out)]
    return code


EMITTER = Emitter(SetMatch, set_match)
