"""`-m limit` (xt_limit revision 0): one token bucket per limit match, in one map every program of
a rule set shares, updated with xt_limit's arithmetic exactly.

The map (`limit_buckets`) is an array of one element whose value is 8-byte words: word 0 a fixed
clock (0: the real one, `bpf_jiffies64()`; a test run sets it, see harness.runner), word 1 + N
the bucket of limit match N, numbered in rule-set order (`slots`) when the programs are built,
so that the ingress and egress programs of one rule set count a user chain's rule in one
bucket, as netfilter does. The programs address the words directly (BPF_PSEUDO_MAP_VALUE): no
lookup, no key.

A bucket word packs xt_limit_priv: the u32 credit in the high half, and in the low half bit 31
set once the bucket is in use and the low 31 bits of `prev` (jiffies). `(now - prev) * CPJ`
mod 2^32 is the same from 31 bits of each as from the kernel's 64 (CPJ is a power of two, at
least 2 at any HZ up to 24,855), so the arithmetic stays the kernel's: add, wrapping in 32
bits; cap at credit_cap; match if credit >= cost and take cost. A word of 0 is a bucket no
packet has used since the map was made: full, its clock starting now. Several CPUs update a
bucket with BPF_CMPXCHG on the whole word, tried again when another CPU changed it first (up to
TRIES times; a packet that loses every race is over the limit: no credit is taken for it);
a packet that changes nothing (no credit, the same jiffy) writes nothing, as limit_mt's fast
path.

Costs and caps are constants of the program, at the running kernel's HZ (codegen.jiffies) when
it is built. Each apply makes a new map, every bucket full: netfilter refills every bucket at
each table load too (limit_mt_check), so nothing is carried over. The one difference from the
kernel: a bucket's clock starts at its first packet rather than at the load, which gives the
same credit unless that packet comes 2^32 / CPJ jiffies or more (1.55 days at HZ 250) after
the load, where xt_limit's u32 credit wraps (codegen.rules.reference.MatchMemory's default does
as the programs do; its `loaded_at` as the kernel).
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R5, AluOp, AtomicOp, JmpOp, MapType, Size
from codegen.bpf.maps import Map
from codegen.jiffies import HzUnknown, kernel_hz
from codegen.rules.extensions.hashlimit_table import Hashlimit
from codegen.rules.extensions.limit import Limit, cost, credit_cap, credits_per_jiffy
from codegen.rules.model import Ruleset

from ..program import CompileError
from .base import Context, Emitter

LIMIT_MAP = "limit_buckets"
WORD = 8
CLOCK_OFFSET = 0  # word 0: the fixed clock, 0 for the real one
STAMPED = 1 << 31
PREV_MASK = STAMPED - 1
TRIES = 16  # compare-and-exchange attempts per packet

Place = tuple[str, int, int]  # chain, 1-based rule index, the match's place among the rule's


def slots(ruleset: Ruleset) -> dict[Place, int]:
    """Every limit match's bucket number, in rule-set order."""
    found: dict[Place, int] = {}
    for chain, index, _, number, _ in ruleset.matches_of(Limit):
        found[chain, index, number] = len(found)
    return found


def uses_limit(ruleset: Ruleset) -> bool:
    """Whether `ruleset`'s programs need the bucket map: for limit matches' buckets, or for
    the clock in word 0, which -m hashlimit reads too (codegen.tc.matches.hashlimit)."""
    return ruleset.first_with((Limit, Hashlimit)) is not None


def value_size(ruleset: Ruleset) -> int:
    """The map's one value: the clock word and a word per bucket."""
    return WORD * (1 + len(slots(ruleset)))


def bucket_offset(slot: int) -> int:
    return WORD * (1 + slot)


def clock_word(jiffies: int | None) -> bytes:
    """Word 0 for a fixed clock at `jiffies` (never 0), or the real clock (None)."""
    if jiffies is not None and jiffies <= 0:
        raise ValueError(f"a fixed clock must be past jiffy 0, not {jiffies}")
    return (jiffies or 0).to_bytes(WORD, "little")


def _hz() -> int:
    try:
        return kernel_hz()
    except HzUnknown as error:
        raise CompileError(f"-m limit counts in the kernel's jiffies, but {error}") from error


def limit(match: Limit, ctx: Context) -> list[Item]:
    hz = _hz()
    per_jiffy = credits_per_jiffy(hz)
    shift = per_jiffy.bit_length() - 1
    assert per_jiffy == 1 << shift and shift >= 1, f"credits per jiffy {per_jiffy} at HZ {hz}"
    price, cap = cost(match, hz), credit_cap(match, hz)
    offset = bucket_offset(ctx.slots[ctx.place])
    names = ("now", "retry", "fresh", "capped", "under", "over", "lost", "taken")
    have_now, retry, fresh, capped, under, over, lost, taken = (
        ctx.new_label(f"limit_{name}") for name in names
    )
    return [
        # r4: now (the fixed clock if set), as the low half of a bucket word: stamped | prev.
        I.ld_map_value(R1, LIMIT_MAP, CLOCK_OFFSET),
        I.ldx(Size.DW, R0, R1, 0),
        I.jmp(JmpOp.JNE, R0, 0, have_now),
        I.call("jiffies64"),
        Label(have_now),
        I.mov32(R4, R0),
        I.alu32(AluOp.AND, R4, PREV_MASK),
        I.alu32(AluOp.OR, R4, STAMPED),
        I.ld_map_value(R3, LIMIT_MAP, offset),  # r3: the bucket
        I.mov64(R5, TRIES),
        Label(retry),
        I.ldx(Size.DW, R0, R3, 0),  # r0: the word as read
        I.jmp(JmpOp.JEQ, R0, 0, fresh),
        # credit += ((now - prev) mod 2^31) * CPJ, in 32 bits
        I.mov64(R1, R0),
        I.alu64(AluOp.RSH, R1, 32),
        I.mov32(R2, R4),
        I.alu32(AluOp.SUB, R2, R0),
        I.alu32(AluOp.AND, R2, PREV_MASK),
        I.alu32(AluOp.LSH, R2, shift),
        I.alu32(AluOp.ADD, R1, R2),
        I.ja(capped),
        Label(fresh),
        I.mov32(R1, cap),
        Label(capped),
        I.jmp32(JmpOp.JLE, R1, cap, under),
        I.mov32(R1, cap),
        Label(under),
        I.jmp32(JmpOp.JLT, R1, price, over),
        # Credit enough: take the cost and write the word, if nobody wrote it meanwhile.
        I.alu32(AluOp.SUB, R1, price),
        I.alu64(AluOp.LSH, R1, 32),
        I.alu64(AluOp.OR, R1, R4),
        I.mov64(R2, R0),
        I.atomic(Size.DW, AtomicOp.CMPXCHG, R3, 0, R1),
        I.jmp(JmpOp.JEQ, R0, R2, taken),
        I.ja(lost),
        Label(over),
        # Over the limit: keep the refilled credit and the new clock, unless nothing changed.
        I.alu64(AluOp.LSH, R1, 32),
        I.alu64(AluOp.OR, R1, R4),
        I.jmp(JmpOp.JEQ, R1, R0, ctx.miss),
        I.mov64(R2, R0),
        I.atomic(Size.DW, AtomicOp.CMPXCHG, R3, 0, R1),
        I.jmp(JmpOp.JEQ, R0, R2, ctx.miss),
        Label(lost),  # another CPU wrote the word first: read it again
        I.alu64(AluOp.SUB, R5, 1),
        I.jmp(JmpOp.JNE, R5, 0, retry),
        I.ja(ctx.miss),
        Label(taken),
    ]


EMITTER = Emitter(Limit, limit)


def create_map(ruleset: Ruleset) -> Map:
    """A new bucket map for `ruleset`'s limit matches: the real clock, every bucket full."""
    return Map(MapType.ARRAY, 4, value_size(ruleset), 1, name=LIMIT_MAP)


def set_clock(table: Map, jiffies: int | None) -> None:
    """Fix the programs' clock at `jiffies` (None: the real one), keeping the buckets."""
    value = table.lookup(0)
    assert value is not None
    table.update(0, clock_word(jiffies) + value[WORD:])
