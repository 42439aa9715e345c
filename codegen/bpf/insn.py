"""One logical eBPF instruction, its encoding, and the functions that build each kind.

An `Insn` is one logical instruction: LD_IMM64 is one object that takes two 8-byte slots. An
instruction may refer to things that are only known when the program is linked: a label (jumps and
BPF-to-BPF calls), a map (LD_IMM64 with a map fd) or a kernel function (kfunc calls). Those stay
symbolic here; `codegen.bpf.asm` resolves them. Every instruction can carry an annotation, any
object that says where it came from (later: the rule that produced it).

Builders take registers as `Reg` and immediates as plain ints: `alu64(AluOp.ADD, R1, R2)` adds a
register, `alu64(AluOp.ADD, R1, 2)` adds the constant 2.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field

from .isa import (
    AluOp,
    AtomicOp,
    Class,
    JmpOp,
    Mode,
    PseudoSrc,
    Reg,
    Size,
    Source,
    helper_id,
)

SLOT = 8
LD_IMM64 = Class.LD | Mode.IMM | Size.DW


class InsnError(ValueError):
    """An instruction that cannot be built or encoded as asked."""


@dataclass(frozen=True, slots=True)
class Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    # For LD_IMM64 the whole 64-bit value: low half in the first slot, high half in the second.
    imm: int = 0
    target: str | None = None  # label of a jump, or subprogram of a BPF-to-BPF call
    map: str | None = None  # map name of an LD_IMM64 with a pseudo map source
    kfunc: str | None = None  # kernel function name of a kfunc call
    annotation: object = field(default=None, compare=False)

    @property
    def cls(self) -> Class:
        return Class(self.code & 0x07)

    @property
    def op(self) -> int:
        return self.code & 0xF0

    @property
    def is_wide(self) -> bool:
        return self.code == LD_IMM64

    @property
    def slots(self) -> int:
        return 2 if self.is_wide else 1

    @property
    def is_jump(self) -> bool:
        """True for instructions whose `off` (or `imm` for gotol) is a jump offset."""
        if self.cls not in (Class.JMP, Class.JMP32):
            return False
        return self.op not in (JmpOp.CALL, JmpOp.EXIT)

    @property
    def is_pseudo_call(self) -> bool:
        return self.code == Class.JMP | JmpOp.CALL and self.src == PseudoSrc.CALL

    @property
    def is_pseudo_func(self) -> bool:
        """LD_IMM64 of a subprogram's address (a callback for bpf_loop and the like)."""
        return self.code == LD_IMM64 and self.src == PseudoSrc.FUNC

    @property
    def is_unresolved(self) -> bool:
        return self.target is not None or self.map is not None or self.kfunc is not None

    def annotate(self, annotation: object) -> Insn:
        # Called for every generated instruction: built directly, dataclasses.replace is slow.
        return Insn(
            self.code,
            self.dst,
            self.src,
            self.off,
            self.imm,
            self.target,
            self.map,
            self.kfunc,
            annotation,
        )

    def resolved(self, **changes: int) -> Insn:
        """A copy with symbolic references dropped and the given fields set."""
        return dataclasses.replace(self, target=None, map=None, kfunc=None, **changes)

    def encode(self) -> bytes:
        if self.is_unresolved:
            what = self.target or self.map or self.kfunc
            raise InsnError(f"instruction refers to unresolved symbol {what!r}; link it first")
        regs = (self.src & 0x0F) << 4 | (self.dst & 0x0F)
        if self.is_wide:
            value = self.imm & 0xFFFF_FFFF_FFFF_FFFF
            low, high = _s32(value & 0xFFFF_FFFF), _s32(value >> 32)
            return struct.pack("<BBhi", self.code, regs, self.off, low) + struct.pack(
                "<BBhi", 0, 0, 0, high
            )
        return struct.pack("<BBhi", self.code, regs, self.off, self.imm)


def _s32(value: int) -> int:
    value &= 0xFFFF_FFFF
    return value - (1 << 32) if value & 0x8000_0000 else value


def decode(data: bytes) -> list[Insn]:
    """Bytes (a whole number of 8-byte slots) back into logical instructions."""
    if len(data) % SLOT:
        raise InsnError(f"{len(data)} bytes is not a whole number of {SLOT}-byte instructions")
    result: list[Insn] = []
    slot = 0
    count = len(data) // SLOT
    while slot < count:
        code, regs, off, imm = struct.unpack_from("<BBhi", data, slot * SLOT)
        if code == LD_IMM64:
            if slot + 1 >= count:
                raise InsnError(f"slot {slot}: LD_IMM64 is missing its second half")
            high = struct.unpack_from("<BBhi", data, (slot + 1) * SLOT)[3]
            imm = (high & 0xFFFF_FFFF) << 32 | (imm & 0xFFFF_FFFF)
            slot += 1
        result.append(Insn(code, regs & 0x0F, regs >> 4, off, imm))
        slot += 1
    return result


def encode(insns: list[Insn]) -> bytes:
    return b"".join(insn.encode() for insn in insns)


# Builders. Names follow the kernel's BPF_* macros where they exist (filter.h).


def _check_reg(reg: int, what: str = "register") -> int:
    if not isinstance(reg, Reg):
        raise InsnError(f"{what} must be a register r0..r10, not {reg!r}")
    return int(reg)


def _check_imm32(value: int) -> int:
    if isinstance(value, Reg) or not isinstance(value, int):
        raise InsnError(f"immediate must be an int, not {value!r}")
    if not -(1 << 31) <= value < (1 << 32):
        raise InsnError(f"immediate {value} does not fit in 32 bits")
    return _s32(value)


def _check_off(value: int) -> int:
    if not -(1 << 15) <= value < (1 << 15):
        raise InsnError(f"offset {value} does not fit in 16 signed bits")
    return value


def _alu(cls: Class, op: AluOp, dst: Reg, operand: Reg | int, off: int = 0) -> Insn:
    dst_n = _check_reg(dst, "destination")
    if isinstance(operand, Reg):
        return Insn(cls | op | Source.X, dst_n, int(operand), off)
    return Insn(cls | op | Source.K, dst_n, 0, off, _check_imm32(operand))


def alu64(op: AluOp, dst: Reg, operand: Reg | int, *, signed: bool = False) -> Insn:
    """64-bit `dst op= operand`; `signed` selects sdiv/smod (cpu v4)."""
    if op in (AluOp.NEG, AluOp.END):
        raise InsnError(f"use neg64()/bswap() for {op.name}")
    if signed and op not in (AluOp.DIV, AluOp.MOD):
        raise InsnError("only DIV and MOD have signed forms")
    return _alu(Class.ALU64, op, dst, operand, 1 if signed else 0)


def alu32(op: AluOp, dst: Reg, operand: Reg | int, *, signed: bool = False) -> Insn:
    """32-bit `wdst op= operand` (the upper half of dst is zeroed)."""
    if op in (AluOp.NEG, AluOp.END):
        raise InsnError(f"use neg32()/to_be()/to_le() for {op.name}")
    if signed and op not in (AluOp.DIV, AluOp.MOD):
        raise InsnError("only DIV and MOD have signed forms")
    return _alu(Class.ALU, op, dst, operand, 1 if signed else 0)


def mov64(dst: Reg, operand: Reg | int) -> Insn:
    return alu64(AluOp.MOV, dst, operand)


def mov32(dst: Reg, operand: Reg | int) -> Insn:
    return alu32(AluOp.MOV, dst, operand)


def movsx64(dst: Reg, src: Reg, bits: int) -> Insn:
    """dst = (s<bits>)src, sign-extended to 64 bits (cpu v4)."""
    if bits not in (8, 16, 32):
        raise InsnError(f"movsx64 extends 8, 16 or 32 bits, not {bits}")
    return _alu(Class.ALU64, AluOp.MOV, dst, _reg_operand(src), bits)


def movsx32(dst: Reg, src: Reg, bits: int) -> Insn:
    if bits not in (8, 16):
        raise InsnError(f"movsx32 extends 8 or 16 bits, not {bits}")
    return _alu(Class.ALU, AluOp.MOV, dst, _reg_operand(src), bits)


def _reg_operand(src: Reg) -> Reg:
    _check_reg(src, "source")
    return src


def neg64(dst: Reg) -> Insn:
    return Insn(Class.ALU64 | AluOp.NEG, _check_reg(dst))


def neg32(dst: Reg) -> Insn:
    return Insn(Class.ALU | AluOp.NEG, _check_reg(dst))


def _check_width(bits: int) -> int:
    if bits not in (16, 32, 64):
        raise InsnError(f"byte swaps work on 16, 32 or 64 bits, not {bits}")
    return bits


def to_be(dst: Reg, bits: int) -> Insn:
    """Convert host (little-endian) order to big-endian: a swap on x86."""
    return Insn(Class.ALU | AluOp.END | Source.X, _check_reg(dst), 0, 0, _check_width(bits))


def to_le(dst: Reg, bits: int) -> Insn:
    return Insn(Class.ALU | AluOp.END | Source.K, _check_reg(dst), 0, 0, _check_width(bits))


def bswap(dst: Reg, bits: int) -> Insn:
    """Unconditional byte swap (cpu v4)."""
    return Insn(Class.ALU64 | AluOp.END, _check_reg(dst), 0, 0, _check_width(bits))


def _jump(cls: Class, op: JmpOp, dst: Reg, operand: Reg | int, target: str | int) -> Insn:
    if op in (JmpOp.JA, JmpOp.CALL, JmpOp.EXIT):
        raise InsnError(f"{op.name} is not a conditional jump")
    dst_n = _check_reg(dst, "compared register")
    label, off = _target(target)
    if isinstance(operand, Reg):
        return Insn(cls | op | Source.X, dst_n, int(operand), off, 0, label)
    return Insn(cls | op | Source.K, dst_n, 0, off, _check_imm32(operand), label)


def _target(target: str | int) -> tuple[str | None, int]:
    if isinstance(target, str):
        return target, 0
    return None, _check_off(target)


def jmp(op: JmpOp, dst: Reg, operand: Reg | int, target: str | int) -> Insn:
    """`if dst op operand goto target`, comparing 64 bits; target a label or a raw offset."""
    return _jump(Class.JMP, op, dst, operand, target)


def jmp32(op: JmpOp, dst: Reg, operand: Reg | int, target: str | int) -> Insn:
    """The same, comparing the low 32 bits."""
    return _jump(Class.JMP32, op, dst, operand, target)


def ja(target: str | int) -> Insn:
    label, off = _target(target)
    return Insn(Class.JMP | JmpOp.JA, 0, 0, off, 0, label)


def gotol(target: str | int) -> Insn:
    """Unconditional jump with a 32-bit offset in imm (cpu v4)."""
    if isinstance(target, str):
        return Insn(Class.JMP32 | JmpOp.JA, target=target)
    return Insn(Class.JMP32 | JmpOp.JA, imm=_check_imm32(target))


def ld_imm64(dst: Reg, value: int) -> Insn:
    if not -(1 << 63) <= value < (1 << 64):
        raise InsnError(f"immediate {value} does not fit in 64 bits")
    return Insn(LD_IMM64, _check_reg(dst), imm=value & 0xFFFF_FFFF_FFFF_FFFF)


def ld_map_fd(dst: Reg, map_name: str) -> Insn:
    """dst = pointer to map `map_name`, resolved to the map's fd when the program is linked."""
    return Insn(LD_IMM64, _check_reg(dst), PseudoSrc.MAP_FD, map=map_name)


def ld_func(dst: Reg, subprogram: str) -> Insn:
    """dst = address of a subprogram (by its label), for helpers taking a callback."""
    return Insn(LD_IMM64, _check_reg(dst), PseudoSrc.FUNC, target=subprogram)


def ld_map_value(dst: Reg, map_name: str, offset: int = 0) -> Insn:
    """dst = address of byte `offset` in the value of an array map's only element."""
    if not 0 <= offset < (1 << 32):
        raise InsnError(f"map value offset {offset} out of range")
    return Insn(LD_IMM64, _check_reg(dst), PseudoSrc.MAP_VALUE, imm=offset << 32, map=map_name)


def ldx(size: Size, dst: Reg, src: Reg, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn(
        Class.LDX | Mode.MEM | size, _check_reg(dst), _check_reg(src, "base"), _check_off(off)
    )


def ldxsx(size: Size, dst: Reg, src: Reg, off: int) -> Insn:
    """dst = *(s<size> *)(src + off), sign-extended (cpu v4)."""
    if size == Size.DW:
        raise InsnError("sign-extending loads exist for 1, 2 and 4 bytes only")
    return Insn(
        Class.LDX | Mode.MEMSX | size, _check_reg(dst), _check_reg(src, "base"), _check_off(off)
    )


def st(size: Size, dst: Reg, off: int, value: int) -> Insn:
    """*(size *)(dst + off) = value"""
    return Insn(
        Class.ST | Mode.MEM | size, _check_reg(dst, "base"), 0, _check_off(off), _check_imm32(value)
    )


def stx(size: Size, dst: Reg, off: int, src: Reg) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn(
        Class.STX | Mode.MEM | size, _check_reg(dst, "base"), _check_reg(src), _check_off(off)
    )


def atomic(size: Size, op: AtomicOp | int, dst: Reg, off: int, src: Reg) -> Insn:
    """Atomic read-modify-write of *(size *)(dst + off) with src.

    `op` is ADD, OR, AND or XOR, optionally | FETCH (src receives the old value), or XCHG or
    CMPXCHG (compares with r0, which receives the old value).
    """
    if size not in (Size.W, Size.DW):
        raise InsnError("atomic operations work on 4 or 8 bytes")
    valid = {AtomicOp.ADD, AtomicOp.OR, AtomicOp.AND, AtomicOp.XOR}
    valid |= {v | AtomicOp.FETCH for v in list(valid)} | {AtomicOp.XCHG, AtomicOp.CMPXCHG}
    if op not in valid:
        raise InsnError(f"unknown atomic operation {op:#x}")
    return Insn(
        Class.STX | Mode.ATOMIC | size,
        _check_reg(dst, "base"),
        _check_reg(src),
        _check_off(off),
        int(op),
    )


def ld_abs(size: Size, offset: int) -> Insn:
    """Legacy packet load r0 = *(size *)skb[offset] (socket filters and TC only)."""
    if size == Size.DW:
        raise InsnError("legacy packet loads read 1, 2 or 4 bytes")
    return Insn(Class.LD | Mode.ABS | size, imm=_check_imm32(offset))


def ld_ind(size: Size, src: Reg, offset: int) -> Insn:
    if size == Size.DW:
        raise InsnError("legacy packet loads read 1, 2 or 4 bytes")
    return Insn(Class.LD | Mode.IND | size, 0, _check_reg(src), 0, _check_imm32(offset))


def call(helper: str | int) -> Insn:
    """Call a helper by name (`"fib_lookup"` or `"bpf_fib_lookup"`) or number."""
    if isinstance(helper, str):
        try:
            number = helper_id(helper)
        except KeyError as error:
            raise InsnError(str(error.args[0])) from None
    else:
        number = helper
    return Insn(Class.JMP | JmpOp.CALL, imm=number)


def call_local(subprogram: str) -> Insn:
    """BPF-to-BPF call of a subprogram by its label."""
    return Insn(Class.JMP | JmpOp.CALL, src=PseudoSrc.CALL, target=subprogram)


def call_kfunc(name: str) -> Insn:
    """Call a kernel function; its BTF id is looked up in vmlinux BTF when the program is linked."""
    return Insn(Class.JMP | JmpOp.CALL, src=PseudoSrc.KFUNC_CALL, kfunc=name)


def exit_() -> Insn:
    return Insn(Class.JMP | JmpOp.EXIT)
