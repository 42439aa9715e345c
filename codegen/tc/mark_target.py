"""`-j MARK` and `-j CONNMARK` in the bytecode programs.

MARK: `mark = (mark & ~mask) ^ value`, written twice.

Into the facts (Facts.MARK), which is what every later `-m mark` of the traversal reads, in
this function or any chain function after it (they share the facts through the pointer they
are given); and into `skb->mark` through the context every function keeps in r6 (the entry
function's, a chain function's second argument), so that the packet carries the mark on, as
netfilter's does: to the kernel's later hooks, and to BPF_PROG_TEST_RUN's returned context.
A MARK rule counts, then goes on with the next rule (XT_CONTINUE).

CONNMARK (xt_connmark's three modes, codegen.rules.extensions.connmark_target): a new
connection mark goes through the tracker's ct_set_mark (codegen.conntrack), which writes it
into the facts' Result, and into the table's entry or the pending one; --restore-mark writes the
packet's mark as MARK does, only for a packet with a connection. It goes on with the next rule.
"""

from __future__ import annotations

from collections.abc import Callable

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, R2, R3, R6, AluOp, JmpOp, Reg, Size
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.ctinfo import STATE_INVALID
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.model import UINT32_MAX

from .layout import FACTS, Facts


def _masked(register: Reg, offset: int, mask: int, value: int = 0) -> list[Item]:
    """`register = ((u32 at FACTS + offset) & mask) ^ value`, without the load, the AND or
    the XOR where the mask or the value makes them moot."""
    if mask == 0:
        return [I.mov32(register, value)]
    code = [I.ldx(Size.W, register, FACTS, offset)]
    if mask != UINT32_MAX:
        code.append(I.alu32(AluOp.AND, register, mask))
    return [*code, I.alu32(AluOp.XOR, register, value)] if value else code


def _store_mark(register: Reg) -> list[Item]:
    """The packet's new mark from `register`, into the facts and the skb."""
    return [
        I.stx(Size.W, FACTS, Facts.MARK.offset, register),
        I.stx(Size.W, R6, SKB_OFFSETS["mark"], register),
    ]


def set_mark(target: MarkTarget) -> list[Item]:
    """A MARK rule's code after its counter: the new mark in the facts and the skb."""
    code = _masked(R1, Facts.MARK.offset, ~target.mask & UINT32_MAX, target.value)
    return [*code, *_store_mark(R1)]


def _shift(register: Reg, target: ConnmarkTarget) -> list[Item]:
    if not target.shift_bits:
        return []
    return [I.alu32(AluOp.RSH if target.shift_right else AluOp.LSH, register, target.shift_bits)]


def connmark(target: ConnmarkTarget, new_label: Callable[[str], str]) -> list[Item]:
    """A CONNMARK rule's code after its counter."""
    ctmark = Facts.connection("mark").offset
    if target.mode == "restore":
        skip = new_label("no_connection")
        state = Facts.connection("state")
        code: list[Item] = [
            I.ldx(state.size, R1, FACTS, state.offset),
            I.jmp32(JmpOp.JEQ, R1, STATE_INVALID, skip),
            *_masked(R2, ctmark, target.ctmask),
            *_shift(R2, target),
            *_masked(R1, Facts.MARK.offset, ~target.nfmask & UINT32_MAX),
            I.alu32(AluOp.XOR, R1, R2),
        ]
        return [*code, *_store_mark(R1), Label(skip)]
    if target.mode == "set":
        code = [*_masked(R2, ctmark, ~target.ctmask & UINT32_MAX, target.ctmark)]
        code += _shift(R2, target)
    else:  # save
        code = [*_masked(R2, Facts.MARK.offset, target.nfmask), *_shift(R2, target)]
        code += [*_masked(R3, ctmark, ~target.ctmask & UINT32_MAX), I.alu32(AluOp.XOR, R2, R3)]
    # ct_set_mark(&facts->connection, r2): it leaves a packet without a connection alone.
    return [
        *code,
        I.mov64(R1, FACTS),
        I.alu64(AluOp.ADD, R1, Facts.CONNECTION),
        I.call_local("ct_set_mark"),
    ]
