"""Our encoder and disassembler against an outside oracle: LLVM's BPF assembler (llvm-mc).

Each row: an instruction built with our builders, the text llvm-mc reads and prints for it, and the
text the kernel's verifier log prints for it. The whole table is assembled by llvm-mc in one go;
its bytes must equal ours, its printed text must equal our LLVM-syntax disassembly, and our kernel
syntax is checked here by table and in tests/kernel/test_disasm_kernel.py against the kernel itself.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import Label, Subprogram, assemble
from codegen.bpf.disasm import disassemble
from codegen.bpf.insn import decode
from codegen.bpf.isa import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R9,
    R10,
    AluOp,
    AtomicOp,
    JmpOp,
    Size,
)
from harness.environment import llvm_mc

pytestmark = pytest.mark.clang

A64, A32 = I.alu64, I.alu32
ROWS = [
    # ALU64, immediate and register forms of every operation
    (I.mov64(R0, 0), "r0 = 0", "r0 = 0"),
    (I.mov64(R1, -1), "r1 = -1", "r1 = -1"),
    (I.mov64(R1, R2), "r1 = r2", "r1 = r2"),
    (A64(AluOp.ADD, R1, 5), "r1 += 5", "r1 += 5"),
    (A64(AluOp.ADD, R1, R2), "r1 += r2", "r1 += r2"),
    (A64(AluOp.SUB, R3, 7), "r3 -= 7", "r3 -= 7"),
    (A64(AluOp.SUB, R3, R4), "r3 -= r4", "r3 -= r4"),
    (A64(AluOp.MUL, R1, 3), "r1 *= 3", "r1 *= 3"),
    (A64(AluOp.MUL, R1, R9), "r1 *= r9", "r1 *= r9"),
    (A64(AluOp.DIV, R1, 3), "r1 /= 3", "r1 /= 3"),
    (A64(AluOp.DIV, R1, R2), "r1 /= r2", "r1 /= r2"),
    (A64(AluOp.DIV, R1, R2, signed=True), "r1 s/= r2", "r1 s/= r2"),
    (A64(AluOp.DIV, R1, 3, signed=True), "r1 s/= 3", "r1 s/= 3"),
    (A64(AluOp.MOD, R1, 10), "r1 %= 10", "r1 %= 10"),
    (A64(AluOp.MOD, R1, R2, signed=True), "r1 s%= r2", "r1 s%= r2"),
    (A64(AluOp.OR, R1, 0x10), "r1 |= 16", "r1 |= 16"),
    (A64(AluOp.AND, R1, R2), "r1 &= r2", "r1 &= r2"),
    (A64(AluOp.AND, R1, 255), "r1 &= 255", "r1 &= 255"),
    (A64(AluOp.LSH, R1, 4), "r1 <<= 4", "r1 <<= 4"),
    (A64(AluOp.RSH, R1, R3), "r1 >>= r3", "r1 >>= r3"),
    (A64(AluOp.XOR, R5, R5), "r5 ^= r5", "r5 ^= r5"),
    (A64(AluOp.ARSH, R1, 3), "r1 s>>= 3", "r1 s>>= 3"),
    (I.neg64(R1), "r1 = -r1", "r1 = -r1"),
    (I.movsx64(R1, R2, 8), "r1 = (s8)r2", "r1 = (s8)r2"),
    (I.movsx64(R1, R2, 16), "r1 = (s16)r2", "r1 = (s16)r2"),
    (I.movsx64(R1, R2, 32), "r1 = (s32)r2", "r1 = (s32)r2"),
    # ALU (32-bit)
    (I.mov32(R1, 5), "w1 = 5", "w1 = 5"),
    (I.mov32(R1, R2), "w1 = w2", "w1 = w2"),
    (A32(AluOp.ADD, R1, R2), "w1 += w2", "w1 += w2"),
    (A32(AluOp.SUB, R1, 1), "w1 -= 1", "w1 -= 1"),
    (A32(AluOp.MUL, R1, R2), "w1 *= w2", "w1 *= w2"),
    (A32(AluOp.DIV, R1, R2, signed=True), "w1 s/= w2", "w1 s/= w2"),
    (A32(AluOp.MOD, R1, 3, signed=True), "w1 s%= 3", "w1 s%= 3"),
    (A32(AluOp.LSH, R1, 8), "w1 <<= 8", "w1 <<= 8"),
    (A32(AluOp.ARSH, R1, R2), "w1 s>>= w2", "w1 s>>= w2"),
    (I.neg32(R1), "w1 = -w1", "w1 = -w1"),
    (I.movsx32(R1, R2, 8), "w1 = (s8)w2", "w1 = (s8)w2"),
    (I.movsx32(R1, R2, 16), "w1 = (s16)w2", "w1 = (s16)w2"),
    # byte order
    (I.to_be(R1, 16), "r1 = be16 r1", "r1 = be16 r1"),
    (I.to_be(R1, 32), "r1 = be32 r1", "r1 = be32 r1"),
    (I.to_be(R1, 64), "r1 = be64 r1", "r1 = be64 r1"),
    (I.to_le(R2, 16), "r2 = le16 r2", "r2 = le16 r2"),
    (I.to_le(R2, 64), "r2 = le64 r2", "r2 = le64 r2"),
    (I.bswap(R3, 16), "r3 = bswap16 r3", "r3 = bswap16 r3"),
    (I.bswap(R3, 32), "r3 = bswap32 r3", "r3 = bswap32 r3"),
    (I.bswap(R3, 64), "r3 = bswap64 r3", "r3 = bswap64 r3"),
    # 64-bit immediates
    (I.ld_imm64(R1, 0x123456789), "r1 = 4886718345 ll", "r1 = 0x123456789"),
    (I.ld_imm64(R2, 1), "r2 = 1 ll", "r2 = 0x1"),
    # loads and stores of every size
    (I.ldx(Size.B, R2, R6, 23), "r2 = *(u8 *)(r6 + 23)", "r2 = *(u8 *)(r6 +23)"),
    (I.ldx(Size.H, R2, R6, 12), "r2 = *(u16 *)(r6 + 12)", "r2 = *(u16 *)(r6 +12)"),
    (I.ldx(Size.W, R2, R1, 76), "r2 = *(u32 *)(r1 + 76)", "r2 = *(u32 *)(r1 +76)"),
    (I.ldx(Size.DW, R3, R10, -8), "r3 = *(u64 *)(r10 - 8)", "r3 = *(u64 *)(r10 -8)"),
    (I.ldxsx(Size.B, R2, R6, -4), "r2 = *(s8 *)(r6 - 4)", "r2 = *(s8 *)(r6 -4)"),
    (I.ldxsx(Size.H, R2, R6, 2), "r2 = *(s16 *)(r6 + 2)", "r2 = *(s16 *)(r6 +2)"),
    (I.ldxsx(Size.W, R2, R6, 0), "r2 = *(s32 *)(r6 + 0)", "r2 = *(s32 *)(r6 +0)"),
    (I.st(Size.B, R10, -1, 7), "*(u8 *)(r10 - 1) = 7", "*(u8 *)(r10 -1) = 7"),
    (I.st(Size.H, R10, -2, 300), "*(u16 *)(r10 - 2) = 300", "*(u16 *)(r10 -2) = 300"),
    (I.st(Size.W, R10, -8, -5), "*(u32 *)(r10 - 8) = -5", "*(u32 *)(r10 -8) = -5"),
    (I.st(Size.DW, R10, -16, 1), "*(u64 *)(r10 - 16) = 1", "*(u64 *)(r10 -16) = 1"),
    (I.stx(Size.B, R10, -1, R1), "*(u8 *)(r10 - 1) = r1", "*(u8 *)(r10 -1) = r1"),
    (I.stx(Size.H, R10, -2, R1), "*(u16 *)(r10 - 2) = r1", "*(u16 *)(r10 -2) = r1"),
    (I.stx(Size.W, R1, 8, R2), "*(u32 *)(r1 + 8) = r2", "*(u32 *)(r1 +8) = r2"),
    (I.stx(Size.DW, R10, -8, R1), "*(u64 *)(r10 - 8) = r1", "*(u64 *)(r10 -8) = r1"),
    # atomics
    (
        I.atomic(Size.W, AtomicOp.ADD, R1, 8, R2),
        "lock *(u32 *)(r1 + 8) += w2",
        "lock *(u32 *)(r1 +8) += r2",
    ),
    (
        I.atomic(Size.DW, AtomicOp.ADD, R1, 0, R2),
        "lock *(u64 *)(r1 + 0) += r2",
        "lock *(u64 *)(r1 +0) += r2",
    ),
    (
        I.atomic(Size.DW, AtomicOp.OR, R1, 8, R2),
        "lock *(u64 *)(r1 + 8) |= r2",
        "lock *(u64 *)(r1 +8) |= r2",
    ),
    (
        I.atomic(Size.DW, AtomicOp.AND, R1, 8, R2),
        "lock *(u64 *)(r1 + 8) &= r2",
        "lock *(u64 *)(r1 +8) &= r2",
    ),
    (
        I.atomic(Size.DW, AtomicOp.XOR, R1, 8, R2),
        "lock *(u64 *)(r1 + 8) ^= r2",
        "lock *(u64 *)(r1 +8) ^= r2",
    ),
    (
        I.atomic(Size.DW, AtomicOp.ADD | AtomicOp.FETCH, R1, 8, R2),
        "r2 = atomic_fetch_add((u64 *)(r1 + 8), r2)",
        "r2 = atomic64_fetch_add((u64 *)(r1 +8), r2)",
    ),
    (
        I.atomic(Size.W, AtomicOp.XOR | AtomicOp.FETCH, R1, 8, R2),
        "w2 = atomic_fetch_xor((u32 *)(r1 + 8), w2)",
        "r2 = atomic_fetch_xor((u32 *)(r1 +8), r2)",
    ),
    (
        I.atomic(Size.DW, AtomicOp.XCHG, R1, 8, R2),
        "r2 = xchg_64(r1 + 8, r2)",
        "r2 = atomic64_xchg((u64 *)(r1 +8), r2)",
    ),
    (
        I.atomic(Size.W, AtomicOp.XCHG, R1, 8, R2),
        "w2 = xchg32_32(r1 + 8, w2)",
        "r2 = atomic_xchg((u32 *)(r1 +8), r2)",
    ),
    (
        I.atomic(Size.DW, AtomicOp.CMPXCHG, R1, 8, R2),
        "r0 = cmpxchg_64(r1 + 8, r0, r2)",
        "r0 = atomic64_cmpxchg((u64 *)(r1 +8), r0, r2)",
    ),
    # legacy packet access
    (I.ld_abs(Size.H, 12), "r0 = *(u16 *)skb[12]", "r0 = *(u16 *)skb[12]"),
    (I.ld_abs(Size.B, 23), "r0 = *(u8 *)skb[23]", "r0 = *(u8 *)skb[23]"),
    (I.ld_ind(Size.W, R1, 0), "r0 = *(u32 *)skb[r1]", "r0 = *(u32 *)skb[r1 + 0]"),
    # jumps: every condition, 64 and 32 bits, immediate and register
    (I.ja(2), "goto +2", "goto pc+2"),
    (I.ja(-1), "goto -1", "goto pc-1"),
    (I.jmp(JmpOp.JEQ, R1, 0, 1), "if r1 == 0 goto +1", "if r1 == 0x0 goto pc+1"),
    (I.jmp(JmpOp.JNE, R1, R2, 1), "if r1 != r2 goto +1", "if r1 != r2 goto pc+1"),
    (I.jmp(JmpOp.JGT, R1, 5, 3), "if r1 > 5 goto +3", "if r1 > 0x5 goto pc+3"),
    (I.jmp(JmpOp.JGE, R1, R2, 3), "if r1 >= r2 goto +3", "if r1 >= r2 goto pc+3"),
    (I.jmp(JmpOp.JLT, R1, 5, 0), "if r1 < 5 goto +0", "if r1 < 0x5 goto pc+0"),
    (I.jmp(JmpOp.JLE, R1, R2, 0), "if r1 <= r2 goto +0", "if r1 <= r2 goto pc+0"),
    (I.jmp(JmpOp.JSET, R1, 16, 2), "if r1 & 16 goto +2", "if r1 & 0x10 goto pc+2"),
    (I.jmp(JmpOp.JSGT, R1, -1, 2), "if r1 s> -1 goto +2", "if r1 s> 0xffffffff goto pc+2"),
    (I.jmp(JmpOp.JSGE, R1, R2, 2), "if r1 s>= r2 goto +2", "if r1 s>= r2 goto pc+2"),
    (I.jmp(JmpOp.JSLT, R1, 0, 2), "if r1 s< 0 goto +2", "if r1 s< 0x0 goto pc+2"),
    (I.jmp(JmpOp.JSLE, R1, R3, -2), "if r1 s<= r3 goto -2", "if r1 s<= r3 goto pc-2"),
    (I.jmp32(JmpOp.JEQ, R1, 8, 1), "if w1 == 8 goto +1", "if w1 == 0x8 goto pc+1"),
    (I.jmp32(JmpOp.JNE, R1, R2, 1), "if w1 != w2 goto +1", "if w1 != w2 goto pc+1"),
    (I.jmp32(JmpOp.JGT, R1, 5, 1), "if w1 > 5 goto +1", "if w1 > 0x5 goto pc+1"),
    (I.jmp32(JmpOp.JSLT, R1, R2, -1), "if w1 s< w2 goto -1", "if w1 s< w2 goto pc-1"),
    (I.jmp32(JmpOp.JSET, R1, 1, 1), "if w1 & 1 goto +1", "if w1 & 0x1 goto pc+1"),
    (I.jmp32(JmpOp.JLE, R1, 7, 1), "if w1 <= 7 goto +1", "if w1 <= 0x7 goto pc+1"),
    # helper calls and exit
    (I.call("fib_lookup"), "call 69", "call bpf_fib_lookup#69"),
    (I.call("bpf_redirect"), "call 23", "call bpf_redirect#23"),
    (I.call("map_lookup_elem"), "call 1", "call bpf_map_lookup_elem#1"),
    (I.call("ringbuf_output"), "call 130", "call bpf_ringbuf_output#130"),
    (I.exit_(), "exit", "exit"),
]

# Label-relative forms, resolved by both assemblers.
LABELLED = [
    I.gotol("after"),
    I.mov64(R0, 1),
    Label("after"),
    I.call_local("sub"),
    I.exit_(),
    Subprogram("sub"),
    I.mov64(R0, 0),
    I.exit_(),
]
LABELLED_LLVM = "gotol after\nr0 = 1\nafter:\ncall sub\nexit\nsub:\nr0 = 0\nexit\n"
LABELLED_KERNEL = ["gotol pc+1", "r0 = 1", "call pc+1", "exit", "r0 = 0", "exit"]


def _llvm(source: str, tmp_path: Path) -> tuple[bytes, list[str]]:
    """llvm-mc's bytes for `source` and the text it prints back for each instruction."""
    mc = llvm_mc()
    assert mc is not None
    listing = subprocess.run(
        [mc, "-triple", "bpfel", "-mcpu=v4", "-show-encoding"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    texts = [
        m.group(1).strip() for m in re.finditer(r"^\t(.+?)\s+# encoding:", listing, re.MULTILINE)
    ]
    obj = tmp_path / "oracle.o"
    subprocess.run(
        [mc, "-triple", "bpfel", "-mcpu=v4", "-filetype=obj", "-o", str(obj)],
        input=source,
        text=True,
        check=True,
        timeout=60,
    )
    objcopy = Path(mc).with_name(Path(mc).name.replace("llvm-mc", "llvm-objcopy"))
    text = tmp_path / "oracle.bin"
    subprocess.run(
        [str(objcopy), "-O", "binary", "--only-section=.text", str(obj), str(text)],
        check=True,
        timeout=60,
    )
    return text.read_bytes(), texts


def test_table_is_broad():
    classes = {insn.cls for insn, _, _ in ROWS}
    assert len(ROWS) >= 60
    assert len(classes) == 8  # every instruction class


def test_encoding_matches_llvm(tmp_path):
    source = "".join(llvm + "\n" for _, llvm, _ in ROWS)
    oracle, texts = _llvm(source, tmp_path)
    ours = b"".join(insn.encode() for insn, _, _ in ROWS)
    offset = 0
    for (insn, llvm, _), text in zip(ROWS, texts, strict=True):
        size = insn.slots * 8
        assert ours[offset : offset + size].hex() == oracle[offset : offset + size].hex(), llvm
        assert text == llvm, "llvm-mc prints this instruction differently than the table says"
        offset += size
    assert ours == oracle


@pytest.mark.parametrize(("insn", "llvm", "kernel"), ROWS, ids=[row[1] for row in ROWS])
def test_disassembly_of_bytes(insn, llvm, kernel):
    (decoded,) = decode(insn.encode())
    assert decoded == insn
    assert disassemble(decoded, "llvm") == llvm
    assert disassemble(decoded, "kernel") == kernel


def test_labels_match_llvm(tmp_path):
    oracle, texts = _llvm(LABELLED_LLVM, tmp_path)
    assembly = assemble(LABELLED)
    assert assembly.encode() == oracle
    assert [disassemble(i) for i in assembly.insns] == LABELLED_KERNEL
    symbolic = [item for item in LABELLED if not isinstance(item, Label)]
    assert [disassemble(i, "llvm") for i in symbolic] == texts
