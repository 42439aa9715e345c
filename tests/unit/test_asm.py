"""The assembler: labels resolved in slot units, and a precise error for every misuse."""

from __future__ import annotations

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import AssemblyError, Label, Subprogram, assemble
from codegen.bpf.insn import InsnError, decode
from codegen.bpf.isa import R0, R1, R2, AluOp, JmpOp, Size


def test_jump_offsets_count_ld_imm64_as_two_slots():
    assembly = assemble(
        [
            I.jmp(JmpOp.JEQ, R1, 0, "end"),
            I.ld_imm64(R2, 1 << 40),
            I.mov64(R0, 1),
            Label("end"),
            I.exit_(),
        ]
    )
    assert assembly.insns[0].off == 3
    assert assembly.slots == (0, 1, 3, 4)
    assert assembly.slot_count == 5


def test_backward_jump_and_call():
    assembly = assemble(
        [
            I.mov64(R0, 0),
            Label("loop"),
            I.alu64(AluOp.ADD, R0, 1),
            I.jmp(JmpOp.JLT, R0, 10, "loop"),
            I.call_local("f"),
            I.exit_(),
            Subprogram("f"),
            I.mov64(R0, 0),
            I.exit_(),
        ]
    )
    assert assembly.insns[2].off == -2
    assert assembly.insns[3].imm == 1
    assert [f.name for f in assembly.functions] == ["main", "f"]
    assert (assembly.functions[1].start, assembly.functions[1].end) == (5, 7)


def test_round_trip_through_bytes():
    items = [I.ld_imm64(R1, -1), I.ldx(Size.W, R0, R1, -4), I.exit_()]
    assembly = assemble(items)
    assert decode(assembly.encode()) == list(assembly.insns)


ERRORS = [
    (
        "undefined label",
        [I.ja("nowhere"), I.exit_()],
        "instruction 0 (goto nowhere): undefined label 'nowhere'",
    ),
    (
        "duplicate label",
        [Label("a"), I.exit_(), Label("a"), I.exit_()],
        "label 'a' is defined twice",
    ),
    (
        "jump across subprograms",
        [I.call_local("f"), I.ja("inside"), I.exit_(), Subprogram("f"), Label("inside"), I.exit_()],
        "jump to 'inside' leaves subprogram 'main'",
    ),
    (
        "call to a plain label",
        [I.call_local("here"), Label("here"), I.exit_()],
        "call target 'here' is not a subprogram",
    ),
    (
        "offset out of range",
        [I.jmp(JmpOp.JEQ, R0, 0, "far"), *[I.mov64(R0, 0)] * 40000, Label("far"), I.exit_()],
        "does not fit in 16 bits (use gotol)",
    ),
    ("empty program", [], "the program has no instructions"),
    ("empty subprogram", [I.exit_(), Subprogram("f")], "subprogram 'f' has no instructions"),
    ("not an item", [I.exit_(), "r0 = 0"], "neither an instruction nor a label"),
]


@pytest.mark.parametrize(("name", "items", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_assembly_errors(name, items, message):
    with pytest.raises(AssemblyError) as caught:
        assemble(items)
    assert message in str(caught.value)


def test_far_unconditional_jump_becomes_gotol():
    assembly = assemble([I.ja("far"), *[I.mov64(R0, 0)] * 40000, Label("far"), I.exit_()])
    assert assembly.insns[0] == I.gotol(40000)
    near = assemble([I.ja("near"), I.mov64(R0, 0), Label("near"), I.exit_()])
    assert near.insns[0] == I.ja(1)


def test_gotol_reaches_past_16_bits():
    assembly = assemble([I.gotol("far"), *[I.mov64(R0, 0)] * 40000, Label("far"), I.exit_()])
    assert assembly.insns[0].imm == 40000


def test_error_names_the_annotation():
    with pytest.raises(AssemblyError) as caught:
        assemble([I.ja("x").annotate("-A INPUT -j ACCEPT"), I.exit_()])
    assert "from -A INPUT -j ACCEPT" in str(caught.value)


def test_unlinked_map_reference():
    assembly = assemble([I.ld_map_fd(R1, "counters"), I.exit_()])
    with pytest.raises(AssemblyError, match="no map named 'counters'"):
        assembly.encode()
    assert assembly.encode(maps={"counters": 7})[4:8] == (7).to_bytes(4, "little")


BUILDER_ERRORS = [
    (lambda: I.mov64(R0, 1 << 40), "does not fit in 32 bits"),
    (lambda: I.ldx(Size.W, R0, R1, 1 << 16), "does not fit in 16 signed bits"),
    (lambda: I.mov64(3, 1), "destination must be a register"),
    (lambda: I.movsx64(R0, R1, 12), "extends 8, 16 or 32 bits"),
    (lambda: I.bswap(R0, 8), "16, 32 or 64 bits"),
    (lambda: I.atomic(Size.B, 0, R1, 0, R2), "4 or 8 bytes"),
    (lambda: I.call("no_such_helper"), "unknown BPF helper 'no_such_helper'"),
    (lambda: I.alu64(AluOp.ADD, R0, 1, signed=True), "only DIV and MOD"),
    (lambda: I.jmp(JmpOp.CALL, R0, 1, "x"), "not a conditional jump"),
    (lambda: I.ldxsx(Size.DW, R0, R1, 0), "1, 2 and 4 bytes"),
    (lambda: decode(b"\x18" + bytes(7)), "missing its second half"),
    (lambda: decode(bytes(9)), "not a whole number"),
    (lambda: I.ld_map_fd(R1, "m").encode(), "unresolved symbol 'm'"),
]


@pytest.mark.parametrize(("build", "message"), BUILDER_ERRORS)
def test_builder_errors(build, message):
    with pytest.raises(InsnError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()
