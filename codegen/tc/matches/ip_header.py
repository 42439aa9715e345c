"""The IP header part of a rule (ip_packet_match: `-s`, `-d`, `-i`, `-o`, `-p`, `-f`), which
every rule has and netfilter checks before any extension. Core, not a family: the registry
takes these emitters as they are."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.model import Address, Fragment, Interface, Protocol

from ..layout import Facts
from .base import Context, Emitter, device_is, jump_unless, load, masked_equal


def address(match: Address, ctx: Context) -> list[Item]:
    field = Facts.SADDR if match.direction == "src" else Facts.DADDR
    if match.mask == 0:  # 0.0.0.0/0 matches every packet
        return [I.ja(ctx.miss)] if match.negated else []
    return masked_equal(field, match.mask, match.address, match.negated, ctx)


def interface(match: Interface, ctx: Context) -> list[Item]:
    """Names are resolved to the ifindexes present when the program is built; `eth+` becomes
    every such device whose name starts with `eth`."""
    field = Facts.IN_IFINDEX if match.direction == "in" else Facts.OUT_IFINDEX
    return device_is(field, match.name, match.negated, ctx)


def protocol(match: Protocol, ctx: Context) -> list[Item]:
    if match.number == 0:
        return [I.ja(ctx.miss)] if match.negated else []
    return [load(Facts.PROTOCOL), jump_unless(not match.negated, match.number, ctx.miss)]


def fragment(match: Fragment, ctx: Context) -> list[Item]:
    # -f: a second or later fragment; ! -f: a first fragment or a whole packet.
    return [
        load(Facts.FRAGMENT),
        I.jmp32(JmpOp.JNE if match.negated else JmpOp.JEQ, R1, 0, ctx.miss),
    ]


# What these pin for exact runs is codegen.tc.exact's own business: the run's key is made of
# them (addresses, protocol) and the ports.
EMITTERS: tuple[Emitter, ...] = (
    Emitter(Address, address),
    Emitter(Interface, interface),
    Emitter(Protocol, protocol),
    Emitter(Fragment, fragment),
)
