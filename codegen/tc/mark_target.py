"""`-j MARK` in the bytecode programs: `mark = (mark & ~mask) ^ value`, written twice.

Into the facts (Facts.MARK), which is what every later `-m mark` of the traversal reads, in
this function or any chain function after it (they share the facts through the pointer they
are given); and into `skb->mark` through the context every function keeps in r6 (the entry
function's, a chain function's second argument), so that the packet carries the mark on, as
netfilter's does: to the kernel's later hooks, and to BPF_PROG_TEST_RUN's returned context.
A MARK rule counts, then goes on with the next rule (XT_CONTINUE).
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.bpf.isa import R1, R6, AluOp, Size
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.model import UINT32_MAX

from .layout import FACTS, Facts


def set_mark(target: MarkTarget) -> list[Item]:
    """A MARK rule's code after its counter: the new mark in the facts and the skb."""
    keep = ~target.mask & UINT32_MAX
    if keep == 0:
        code: list[Item] = [I.mov32(R1, target.value)]  # nothing of the old mark is kept
    else:
        code = [I.ldx(Size.W, R1, FACTS, Facts.MARK.offset)]
        if keep != UINT32_MAX:
            code.append(I.alu32(AluOp.AND, R1, keep))
        if target.value:
            code.append(I.alu32(AluOp.XOR, R1, target.value))
    return [
        *code,
        I.stx(Size.W, FACTS, Facts.MARK.offset, R1),
        I.stx(Size.W, R6, SKB_OFFSETS["mark"], R1),
    ]
