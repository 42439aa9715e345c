"""`-m addrtype` (xt_addrtype revision 1, IPv4): inet_dev_addr_type of the source and the
destination, each compared with its mask of types.

0.0.0.0/8 and 255.255.255.255 (BROADCAST) and 224.0.0.0/4 (MULTICAST) are decided inline, as
the kernel does before any lookup. Every other address is looked up in the LPM trie
`address_types` ({prefix length, address in network order} -> {type, ifindex}), which holds
the namespace's LOCAL and MAIN routes as codegen.rules.routes models them: a route of a type
the kernel's lookup fails on is held as UNICAST, so that it still hides shorter prefixes; no
entry is UNICAST too. With --limit-iface-in/-out an entry through another device than the
packet's answers UNICAST.

Each address is looked up once per packet, at the first rule that asks: the answer, with the
devices of the packet it holds on, is kept in the facts (Facts.SRC_ADDRESS_TYPE and
DST_ADDRESS_TYPE), and later rules read it there. Measured under BPF_PROG_TEST_RUN: 100
addrtype rules that miss cost about 60 ns more than none; a lookup per rule cost 2 us.

The trie is filled when the rule set is applied (harness.deploy.routes), as `local_addresses`
is: routes changed afterwards are not seen until the next apply.
"""

from __future__ import annotations

import struct

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R10, AluOp, JmpOp, Size
from codegen.rules.extensions.addrtype import AddressTypes, AddrType
from codegen.rules.model import Ruleset
from codegen.rules.routes import BROADCAST, MULTICAST, UNICAST, RouteTable

from ..layout import FACTS, Facts, Field, map_and_key
from .base import Context, Emitter, load

ADDRESS_TYPES = "address_types"
ADDRESS_TYPES_ENTRIES = 16384
KEY = struct.Struct("<I4s")  # prefix length, address (network order)
VALUE = struct.Struct("<II")  # type, ifindex of the route's first next hop (0: none)


def uses_addrtype(ruleset: Ruleset) -> bool:
    """Whether a rule of `ruleset` has an addrtype match (its programs need the trie)."""
    return ruleset.first_with(AddrType) is not None


def entries(routes: RouteTable, interfaces: dict[str, int]) -> dict[bytes, bytes]:
    """The trie's keys and values for `routes`, devices named in `interfaces`; a route
    through a device it does not name holds ifindex 0, which no packet's device is."""
    found = {}
    for (length, network), (answer, device) in routes.entries().items():
        key = KEY.pack(length, network.to_bytes(4, "big"))
        found[key] = VALUE.pack(answer, interfaces.get(device, 0))
    return found


# The answer as the facts keep it (Facts.SRC_ADDRESS_TYPE, DST_ADDRESS_TYPE).
TYPE_BITS, ON_IN_DEVICE, ON_OUT_DEVICE = 0x3F, 0x80, 0x40
_ANY_DEVICE = ON_IN_DEVICE | ON_OUT_DEVICE


def _look_up(address: Field, ctx: Context) -> list[Item]:
    """r1 = the address's answer as the facts keep it (see Facts.SRC_ADDRESS_TYPE): a type
    decided without a route, or no route, holds on any device; a route's type on the in and
    the out device if it goes through them (or the packet has no such device)."""
    special, store = ctx.new_label("special"), ctx.new_label("store")
    key = ctx.key_offset
    code: list[Item] = [
        load(address),
        I.mov32(R3, BROADCAST + 1 | _ANY_DEVICE),
        I.mov32(R2, R1),
        I.alu32(AluOp.RSH, R2, 24),
        I.jmp32(JmpOp.JEQ, R2, 0, special),
        I.jmp32(JmpOp.JEQ, R1, 0xFFFFFFFF, special),
        I.mov32(R3, MULTICAST + 1 | _ANY_DEVICE),
        I.mov32(R2, R1),
        I.alu32(AluOp.RSH, R2, 28),
        I.jmp32(JmpOp.JEQ, R2, 0xE, special),
        I.to_be(R1, 32),
        I.stx(Size.W, R10, key + 4, R1),
        I.st(Size.W, R10, key, 32),
        *map_and_key(ADDRESS_TYPES, key),
        I.call("map_lookup_elem"),
        I.mov32(R1, UNICAST + 1 | _ANY_DEVICE),
        I.jmp(JmpOp.JEQ, R0, 0, store),
        I.ldx(Size.W, R1, R0, 0),
        I.alu32(AluOp.ADD, R1, 1),
        I.ldx(Size.W, R2, R0, 4),
    ]
    for device, bit in ((Facts.IN_IFINDEX, ON_IN_DEVICE), (Facts.OUT_IFINDEX, ON_OUT_DEVICE)):
        on, off = ctx.new_label("on_device"), ctx.new_label("off_device")
        code += [
            I.ldx(device.size, R3, FACTS, device.offset),
            I.jmp32(JmpOp.JEQ, R3, 0, on),  # no such device: nothing to limit to
            I.jmp32(JmpOp.JNE, R3, R2, off),
            Label(on),
            I.alu32(AluOp.OR, R1, bit),
            Label(off),
        ]
    return [*code, I.ja(store), Label(special), I.mov32(R1, R3), Label(store)]


def _side(side: AddressTypes, address: Field, kept: Field, limit: int, ctx: Context) -> list[Item]:
    """Miss unless the address's type is in the mask (is not, negated); `limit` is the
    device bit the route must have (0: none)."""
    known, typed = ctx.new_label("known"), ctx.new_label("typed")
    code: list[Item] = [
        load(kept),
        I.jmp32(JmpOp.JNE, R1, 0, known),
        *_look_up(address, ctx),
        I.stx(kept.size, FACTS, kept.offset, R1),
        Label(known),
    ]
    if limit:
        on_device = ctx.new_label("on_device")
        code += [
            I.mov32(R2, R1),
            I.alu32(AluOp.AND, R2, limit),
            I.jmp32(JmpOp.JNE, R2, 0, on_device),
            I.mov32(R1, UNICAST),
            I.ja(typed),
            Label(on_device),
        ]
    code += [
        I.alu32(AluOp.AND, R1, TYPE_BITS),
        I.alu32(AluOp.SUB, R1, 1),
        Label(typed),
        I.mov32(R2, 1),
        I.alu32(AluOp.LSH, R2, R1),
        I.alu32(AluOp.AND, R2, side.mask),
        I.jmp32(JmpOp.JNE if side.negated else JmpOp.JEQ, R2, 0, ctx.miss),
    ]
    return code


def addrtype(match: AddrType, ctx: Context) -> list[Item]:
    limit = {None: 0, "in": ON_IN_DEVICE, "out": ON_OUT_DEVICE}[match.limit]
    code: list[Item] = []
    if match.src is not None:
        code += _side(match.src, Facts.SADDR, Facts.SRC_ADDRESS_TYPE, limit, ctx)
    if match.dst is not None:
        code += _side(match.dst, Facts.DADDR, Facts.DST_ADDRESS_TYPE, limit, ctx)
    return code


EMITTER = Emitter(AddrType, addrtype)
