"""Our kernel-syntax disassembly against the kernel's own: the verifier log at level 2 prints every
instruction it walks with kernel/bpf/disasm.c, so for a program that walks through every kind of
instruction, each printed line must equal ours."""

from __future__ import annotations

import re

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import Label, Subprogram
from codegen.bpf.disasm import disassemble
from codegen.bpf.isa import R0, R1, R2, R3, R6, R10, AluOp, AtomicOp, JmpOp, Size
from codegen.bpf.loader import load

pytestmark = pytest.mark.privileged

LOG_LEVEL_2 = 2 | 4
_LINE = re.compile(r"^(\d+): \(([0-9a-f]{2})\) (.*?)(?:\s+;.*)?$", re.MULTILINE)

PROGRAM = [
    I.mov64(R6, R1),
    I.ld_abs(Size.H, 12),
    I.ld_imm64(R1, 0x1_0000_0005),
    I.mov64(R2, -3),
    I.alu64(AluOp.ADD, R1, R2),
    I.alu64(AluOp.SUB, R1, 1),
    I.alu64(AluOp.MUL, R1, R2),
    I.alu64(AluOp.DIV, R1, 3, signed=True),
    I.alu64(AluOp.MOD, R1, R2, signed=True),
    I.alu64(AluOp.DIV, R1, 7),
    I.alu64(AluOp.OR, R1, 0x10),
    I.alu64(AluOp.AND, R1, R2),
    I.alu64(AluOp.LSH, R1, 4),
    I.alu64(AluOp.RSH, R1, 1),
    I.alu64(AluOp.ARSH, R1, 2),
    I.alu64(AluOp.XOR, R1, R2),
    I.neg64(R1),
    I.movsx64(R3, R1, 8),
    I.movsx64(R3, R1, 32),
    I.mov32(R3, R1),
    I.alu32(AluOp.ADD, R3, 9),
    I.alu32(AluOp.DIV, R3, 2, signed=True),
    I.movsx32(R3, R1, 16),
    I.neg32(R3),
    I.to_be(R3, 16),
    I.to_le(R3, 32),
    I.bswap(R3, 64),
    I.stx(Size.DW, R10, -8, R3),
    I.st(Size.W, R10, -16, 7),
    I.st(Size.DW, R10, -24, 0),
    I.ldx(Size.W, R2, R10, -16),
    I.ldxsx(Size.H, R2, R10, -16),
    I.mov64(R1, R10),
    I.alu64(AluOp.ADD, R1, -24),
    I.mov64(R2, 1),
    I.atomic(Size.DW, AtomicOp.ADD, R1, 0, R2),
    I.atomic(Size.DW, AtomicOp.OR | AtomicOp.FETCH, R1, 0, R2),
    I.atomic(Size.DW, AtomicOp.XCHG, R1, 0, R2),
    I.mov64(R0, 0),
    I.atomic(Size.DW, AtomicOp.CMPXCHG, R1, 0, R2),
    I.call("ktime_get_ns"),
    I.jmp(JmpOp.JGT, R0, 5, "next"),
    I.mov64(R0, 1),
    Label("next"),
    I.jmp32(JmpOp.JSET, R0, R0, "far"),
    I.mov64(R0, 2),
    Label("far"),
    I.gotol("end"),
    Label("end"),
    I.call_local("sub"),
    I.exit_(),
    Subprogram("sub"),
    I.mov64(R0, 0),
    I.exit_(),
]


def test_disassembly_matches_verifier_log():
    with load(PROGRAM, name="disasm", log_level=LOG_LEVEL_2) as program:
        kernel = {
            int(slot): (int(code, 16), text) for slot, code, text in _LINE.findall(program.log)
        }
    insns = program.assembly.insns
    checked = 0
    for insn, slot in zip(insns, program.assembly.slots, strict=True):
        assert slot in kernel, f"the verifier never printed slot {slot}"
        code, text = kernel[slot]
        assert code == insn.code
        assert disassemble(insn) == text
        checked += 1
    assert checked == len(insns)
