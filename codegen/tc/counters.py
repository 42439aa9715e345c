"""Counting: the counter subprograms every program ends with, `count` (a packet and its bytes)
and, in the ingress and egress programs, `add_bytes` (bytes alone, for the later fragments of a
datagram counted once), which take the slot in r1 and the bytes in r2; and `count_decided`, the
verdict tails' own inline count of the rule or policy that gave the verdict. All update
COUNTERS_MAP, the per-CPU array of codegen.tc.layout.CounterLayout's slots.

A rule that gives a verdict is counted at the verdict's tail rather than where it matched: one
inline count a packet instead of a subprogram call per verdict rule. The call cost about 10 ns
a packet under test-run (`bpflab bench`'s fixed cost, first-rule traffic); the tail costs no
instruction per rule."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram
from codegen.bpf.isa import R0, R1, R2, R6, R10, AluOp, JmpOp, Size

from .layout import FACTS, SCRATCH_OFFSET, Facts, map_and_key

COUNTERS_MAP = "counters"
COUNT, ADD_BYTES = "count", "add_bytes"  # the subprograms' names, for call_local


def count_decided(done: str) -> list[Item]:
    """Add the packet and its bytes to the slot the facts' DECIDED names, then go on at `done`
    (which must follow). A slot with UNCOUNTED set is beyond the counters: nothing is counted.
    For the entry function's tails: the key goes to its scratch slot."""
    return [
        I.ldx(Size.W, R1, FACTS, Facts.DECIDED.offset),
        I.stx(Size.W, R10, SCRATCH_OFFSET, R1),
        *map_and_key(COUNTERS_MAP, SCRATCH_OFFSET),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        I.ldx(Size.DW, R1, R0, 0),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R0, 0, R1),
        I.ldx(Size.H, R2, FACTS, Facts.TOT_LEN.offset),
        I.ldx(Size.DW, R1, R0, 8),
        I.alu64(AluOp.ADD, R1, R2),
        I.stx(Size.DW, R0, 8, R1),
    ]


def count_subprogram() -> list[Item]:
    """count(r1 = slot, r2 = bytes): add one packet and its bytes to a per-CPU slot. No
    atomics: the slot is this CPU's and TC programs do not nest on one CPU."""
    return _counter_subprogram(COUNT, packets=True)


def add_bytes_subprogram() -> list[Item]:
    """add_bytes(r1 = slot, r2 = bytes): add bytes, and no packet, to a per-CPU slot."""
    return _counter_subprogram(ADD_BYTES, packets=False)


def _counter_subprogram(name: str, *, packets: bool) -> list[Item]:
    """A subprogram (r1 = slot, r2 = bytes) adding the bytes, and one packet if `packets`, to
    a slot of COUNTERS_MAP."""
    done = f"{name}_done"
    one_more = [
        I.ldx(Size.DW, R1, R0, 0),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R0, 0, R1),
    ]
    return [
        Subprogram(name),
        I.stx(Size.W, R10, -4, R1),
        I.mov64(R6, R2),
        *map_and_key(COUNTERS_MAP, -4),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        *(one_more if packets else []),
        I.ldx(Size.DW, R1, R0, 8),
        I.alu64(AluOp.ADD, R1, R6),
        I.stx(Size.DW, R0, 8, R1),
        Label(done),
        I.mov64(R0, 0),
        I.exit_(),
    ]
