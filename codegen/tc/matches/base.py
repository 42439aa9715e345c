"""What an emitter is, and the instruction patterns the families share.

An emitter turns one match into instructions that fall through when the packet matches and jump
to `miss` when it does not (or to `hotdrop` when netfilter would drop the packet on the spot, as
xt_tcpudp does for a transport header it cannot read). Each family module of this package
declares one `Emitter` for its model class; the registry (this package's `__init__`) maps model
types to them, so no code outside a family's module names the family.

Every emitter reads packet facts through FACTS and uses only r1-r3, so a rule's matches can be
emitted one after another with no register allocation. Comparisons are 32-bit (JMP32): facts are
at most 32 bits wide, and a 32-bit immediate would be sign-extended by a 64-bit compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, AluOp, JmpOp
from codegen.rules.extensions.ports import PortRange

from ..layout import FACTS, Facts, Field

UINT32_MAX = 0xFFFF_FFFF
M = TypeVar("M")


@dataclass
class Context:
    """What emitters need beyond the match: labels, and interface names resolved to ifindexes.
    `key_offset` is 8 bytes of the frame (from r10) the rule's code runs in that an emitter
    may build a map key in for the length of its match."""

    miss: str
    hotdrop: str
    new_label: Callable[[str], str]
    interfaces: Mapping[str, int]
    key_offset: int = -24
    # The rule's chain and 1-based index; the match's place (its rule's, and its number among
    # the rule's matches), which `emit` sets; the bucket of each stateful match by place.
    rule: tuple[str, int] = ("", 0)
    place: tuple[str, int, int] = ("", 0, 0)
    slots: Mapping[tuple[str, int, int], int] = field(default_factory=dict)
    # The rule set the rule is in, for a family whose code depends on other rules (-m recent's
    # tables take their mask and size from all the rules naming them).
    ruleset: Any = None
    # The bit of the facts' POLICY word each distinct -m policy match answers in.
    policy_bits: Mapping[Any, int] = field(default_factory=dict)
    # The bit of the facts' OWNER_GROUPS word each distinct --suppl-groups range answers in.
    owner_bits: Mapping[tuple[int, int], int] = field(default_factory=dict)
    # Whether the facts hold -m physdev's bridge ports (PHYS_IN, PHYS_OUT); not where OUTPUT
    # runs, which never has bridge information.
    bridge_ports: bool = True

    def with_miss(self, miss: str) -> Context:
        return replace(self, miss=miss)


@dataclass(frozen=True)
class Pins:
    """What a match fixes for an exact-match run (codegen.tc.exact): the ports it pins to one
    value each, None for a port it leaves free. `Pins()` pins nothing: the match always
    matches (a comment)."""

    source_port: int | None = None
    destination_port: int | None = None


@dataclass(frozen=True)
class TransportHeader:
    """A transport header an exact run's lookup reads: the protocol that carries it and the
    bytes its match needs first. The lookup answers only for first fragments with that much
    header; the rest take the run's scan, where the match refuses or hotdrops them."""

    name: str
    protocol: int
    size: int


def cannot_pin(match: Any) -> Pins | None:
    """The default: a match of this family keeps its rule out of exact runs."""
    return None


# What a match stands for in a classified run (codegen.tc.classifier): its source and
# destination port ranges, read from the transport header its emitter names (no header: the
# match always matches, a comment).
PortRanges = tuple[PortRange, PortRange]
ALWAYS: PortRanges = (PortRange(), PortRange())


def cannot_classify(match: Any) -> PortRanges | None:
    """The default: a match of this family keeps its rule out of classified runs."""
    return None


@dataclass(frozen=True)
class Emitter(Generic[M]):
    """The code of one match model. `pins` says what the match fixes for an exact run (None: it
    cannot join one); `transport` is set by a family whose pinned values come from the transport
    header, which the lookup must then check is there (see TransportHeader)."""

    model: type[M]
    emit: Callable[[M, Context], list[Item]]
    pins: Callable[[M], Pins | None] = cannot_pin
    transport: TransportHeader | None = None
    # The match's port ranges for a classified run, None when it cannot join one.
    ranges: Callable[[M], PortRanges | None] = cannot_classify
    # Why this backend refuses one match of the family it cannot generate exactly (an option
    # it has no code for), else None.
    refusal: Callable[[M], str | None] = lambda match: None


def interface_indexes(name: str, interfaces: Mapping[str, int]) -> list[int]:
    """The ifindexes a device name stands for among those known when the program is built: the
    device's own, or with a trailing `+` every device whose name starts with what precedes it;
    none for a name nobody has."""
    if name.endswith("+"):
        return sorted(index for known, index in interfaces.items() if known.startswith(name[:-1]))
    return [interfaces[name]] if name in interfaces else []


def device_is(field: Field, name: str, negated: bool, ctx: Context) -> list[Item]:
    """To the miss unless the ifindex in `field` is one `name` stands for (interface_indexes),
    or, `negated`, unless it is none of them: -i/-o, and -m physdev's ports."""
    indexes = interface_indexes(name, ctx.interfaces)
    if not indexes:
        return [] if negated else [I.ja(ctx.miss)]
    code: list[Item] = [load(field)]
    if negated:
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


def load(field: Field) -> Item:
    return I.ldx(field.size, R1, FACTS, field.offset)


def jump_unless(equal: bool, value: int, target: str) -> Item:
    """Jump to target unless r1 == value (equal=True) or unless r1 != value (equal=False)."""
    return I.jmp32(JmpOp.JNE if equal else JmpOp.JEQ, R1, value, target)


def masked_equal(field: Field, mask: int, value: int, negated: bool, ctx: Context) -> list[Item]:
    """`field & mask == value` (or not, if negated), else miss; a full mask is no AND."""
    code = [load(field)]
    if mask != UINT32_MAX:
        code.append(I.alu32(AluOp.AND, R1, mask))
    return [*code, jump_unless(not negated, value, ctx.miss)]


def in_range(first: int, last: int, negated: bool, top: int, ctx: Context) -> list[Item]:
    """r1 in [first, last] (or not, if negated), else miss. `top` is the field's maximum."""
    if first > last:  # an empty range matches nothing; negated, everything
        return [] if negated else [I.ja(ctx.miss)]
    if first == last:
        return [jump_unless(not negated, first, ctx.miss)]
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


def transport_guard(needed: int, ctx: Context, *, evil_offset_one: bool = False) -> list[Item]:
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
