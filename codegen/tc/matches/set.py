"""`-m set` (xt_set revision 4, ip_set_test): one BPF map per set the rules use, a copy of the
set made when the rule set is applied (harness.deploy.sets), named `set:NAME` among the maps
a program is linked with:

- hash:ip: a hash, key the address (network order);
- hash:ip,port: a hash, key {address, protocol, 0, port (network order)};
- hash:net: an LPM trie, key {prefix length, address}, value MEMBER or NOMATCH, so that the
  longest prefix decides as ip_set's hash:net does, a `nomatch` entry being an exception;
- hash:net,port: an LPM trie, key {32 + prefix length, protocol, 0, port, address}: the
  protocol and port are always whole, the address a prefix;
- hash:net,iface: an LPM trie, key {32 + prefix length, word, address}, two kinds of entry:
  with word 0, each member's network, its value the prefix length (the lookup finds the
  longest prefix any member holds the address under, whatever its device); with word
  ifindex * 64 + prefix length + 1, the member under the ifindex of its device (a `wildcard`
  member under every device whose name starts with its own), MEMBER or NOMATCH. The second
  lookup, for the prefix the first found and the packet's device, decides. Devices as the
  namespace has them when the map is filled (one added later is not seen until the next
  apply, as `-i`'s are not); ifindexes from 2**26 on are refused (the word would wrap);
- bitmap:port: an array of 65,536 bytes by port, 1 for a member;
- list:set: no map of its own: its member sets' maps are looked up in turn, the first that
  holds the packet answers.

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
from collections.abc import Iterable, Mapping

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
    HASH_NET_IFACE,
    HASH_NET_PORT,
    LIST_SET,
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
IFINDEX_LIMIT = 1 << 26  # hash:net,iface's word: ifindex * 64 + prefix length + 1 in 32 bits
# key size, value size per type
SHAPES = {
    HASH_IP: (MapType.HASH, 4),
    HASH_IP_PORT: (MapType.HASH, 8),
    HASH_NET: (MapType.LPM_TRIE, 8),
    HASH_NET_PORT: (MapType.LPM_TRIE, 12),
    HASH_NET_IFACE: (MapType.LPM_TRIE, 12),
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


def devices_of(member: Member, interfaces: Mapping[str, int]) -> list[int]:
    """The ifindexes a hash:net,iface member stands for among `interfaces` (name -> ifindex)."""
    if member.wildcard:
        found = sorted(i for name, i in interfaces.items() if name.startswith(member.iface))
    else:
        found = [interfaces[member.iface]] if member.iface in interfaces else []
    if any(index >= IFINDEX_LIMIT for index in found):
        raise CompileError(
            f"device {member.iface!r} has an ifindex of {IFINDEX_LIMIT:,} or more, which a"
            " hash:net,iface map cannot key"
        )
    return found


def iface_word(index: int, prefix: int) -> int:
    return index * 64 + prefix + 1


def entries(
    table: IpSet,
    members: Iterable[Member] | None = None,
    interfaces: Mapping[str, int] | None = None,
) -> dict[bytes, bytes]:
    """The keys and values of `table`'s map (of only `members` of it, when given; the devices
    of hash:net,iface members found in `interfaces`, name -> ifindex)."""
    found: dict[bytes, bytes] = {}
    member = bytes([MEMBER])
    listed = table.members if members is None else members
    if table.kind == HASH_NET_IFACE:  # exact device names last: they win over a wildcard's
        listed = sorted(listed, key=lambda m: not m.wildcard)
    for m in listed:
        address = m.network.to_bytes(4, "big")
        if table.kind == HASH_NET_IFACE:
            found[struct.pack("<II", 32 + m.prefix, 0) + address] = bytes([m.prefix])
            value = bytes([NOMATCH if m.nomatch else MEMBER])
            for index in devices_of(m, interfaces or {}):
                key = struct.pack("<II", 32 + m.prefix, iface_word(index, m.prefix)) + address
                found[key] = value
        elif table.kind == HASH_IP:
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
    table: IpSet,
    went_in: Iterable[Member],
    went_out: Iterable[Member],
    interfaces: Mapping[str, int] | None = None,
) -> tuple[dict[bytes, bytes], list[bytes]]:
    """What changes in `table`'s map when `went_in` are added and `went_out` deleted (a
    member replaced by one with another nomatch flag is in both): (keys to write with their
    values, keys to delete). bitmap:port's array cannot lose a key: a 0 is written.
    hash:net,iface: a key two members share (a device's, and a wildcard's that covers it)
    is rewritten from the members that remain."""
    went_out = list(went_out)
    if table.kind == HASH_NET_IFACE:
        after = [m for m in table.members if m not in went_out] + list(went_in)
        now, before = entries(table, after, interfaces), entries(table, None, interfaces)
        written = {key: value for key, value in now.items() if before.get(key) != value}
        return written, [key for key in before if key not in now]
    written = entries(table, went_in)
    gone = [key for key in entries(table, went_out) if key not in written]
    if table.kind == BITMAP_PORT:
        written.update((key, bytes(1)) for key in gone)
        gone = []
    return written, gone


def map_shape(
    table: IpSet, interfaces: Mapping[str, int] | None = None
) -> tuple[MapType, int, int, int, int]:
    """(type, key size, value size, entries, flags) of `table`'s map: room for as many
    members as the set may hold (its maxelem; hash:net,iface twice that, or the keys its
    members fill if more: a wildcard's one per device), a hash allocating them as they come
    (an LPM trie always does)."""
    kind, key_size = SHAPES[table.kind]
    room = table.capacity
    if table.kind == HASH_NET_IFACE:  # a network's entry and its device's, per member at least
        room = max(2 * table.capacity, len(entries(table, None, interfaces)))
    size = PORTS if table.kind == BITMAP_PORT else max(1, room, len(table.members))
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


def _test(table: IpSet, match: SetMatch, no: str, ctx: Context) -> list[Item]:
    """ip_set_test of one set (not a list:set): falls through when it holds the packet, jumps
    to `no` when it does not."""
    if len(match.directions) < table.dimension:  # ip_set_test answers no
        return [I.ja(no)]
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
    elif table.kind == HASH_NET_IFACE:
        return _test_iface(table, match, no, ctx)
    else:
        code += _port(match.directions[1] == "src", no, ctx)
        code += _port_key(key + 4)
        code += [I.st(Size.W, R10, key, 64), *_address_key(first, key + 8)]
    code += [*map_and_key(map_name(table.name), key), I.call("map_lookup_elem")]
    code.append(I.jmp(JmpOp.JEQ, R0, 0, no))
    if table.kind in WITH_NOMATCH:
        wanted = NOMATCH if match.return_nomatch else MEMBER
        code += [I.ldx(Size.B, R1, R0, 0), I.jmp32(JmpOp.JNE, R1, wanted, no)]
    elif table.kind == BITMAP_PORT:
        code += [I.ldx(Size.B, R1, R0, 0), I.jmp32(JmpOp.JEQ, R1, 0, no)]
    return code


def _test_iface(table: IpSet, match: SetMatch, no: str, ctx: Context) -> list[Item]:
    """hash:net,iface: the longest prefix any member holds the address under, then the
    member of that prefix and the packet's device (none there: no)."""
    device = Facts.IN_IFINDEX if match.directions[1] == "src" else Facts.OUT_IFINDEX
    key = ctx.key_offset
    lookup = [*map_and_key(map_name(table.name), key), I.call("map_lookup_elem")]
    wanted = NOMATCH if match.return_nomatch else MEMBER
    return [
        load(device),
        I.jmp32(JmpOp.JEQ, R1, 0, no),
        I.jmp32(JmpOp.JGE, R1, IFINDEX_LIMIT, no),
        I.st(Size.W, R10, key, 64),
        I.st(Size.W, R10, key + 4, 0),
        *_address_key(match.directions[0] == "src", key + 8),
        *lookup,
        I.jmp(JmpOp.JEQ, R0, 0, no),
        I.ldx(Size.B, R2, R0, 0),  # the prefix length
        I.alu32(AluOp.ADD, R2, 1),
        load(device),
        I.alu32(AluOp.LSH, R1, 6),
        I.alu32(AluOp.ADD, R1, R2),
        I.stx(Size.W, R10, key + 4, R1),
        *lookup,
        I.jmp(JmpOp.JEQ, R0, 0, no),
        I.ldx(Size.B, R1, R0, 0),
        I.jmp32(JmpOp.JNE, R1, wanted, no),
    ]


def set_match(match: SetMatch, ctx: Context) -> list[Item]:
    table = bound_set(match)
    if len(match.directions) < table.dimension:  # ip_set_test answers no
        return [] if match.negated else [I.ja(ctx.miss)]
    out = ctx.new_label("set_no")
    no = out if match.negated else ctx.miss
    if table.kind == LIST_SET:  # each member set in turn, the first that holds it answers
        held = ctx.new_label("set_held")
        code: list[Item] = []
        for member in table.listed:
            other = ctx.new_label("set_next")
            code += [*_test(member, match, other, ctx), I.ja(held), Label(other)]
        code += [I.ja(no), Label(held)]
    else:
        code = _test(table, match, no, ctx)
    if match.negated:
        code += [I.ja(ctx.miss), Label(out)]
    return code


EMITTER = Emitter(SetMatch, set_match)
