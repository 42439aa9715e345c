"""Instructions back to text.

Two syntaxes: `kernel`, the one the verifier log and `bpftool prog dump xlated` print
(kernel/bpf/disasm.c: `if r1 > 0x5 goto pc+3`, `r2 = *(u16 *)(r6 +12)`, `call bpf_fib_lookup#69`),
and `llvm`, the one llvm-mc assembles and prints (`if r1 > 5 goto +3`, `r2 = *(u16 *)(r6 + 12)`,
`call 69`), used to check our encoder against LLVM's.
"""

from __future__ import annotations

from typing import Literal

from .insn import Insn
from .isa import AluOp, AtomicOp, Class, JmpOp, Mode, PseudoSrc, Size, Source, helper_name

Syntax = Literal["kernel", "llvm"]

_ALU = {
    AluOp.ADD: "+=",
    AluOp.SUB: "-=",
    AluOp.MUL: "*=",
    AluOp.DIV: "/=",
    AluOp.OR: "|=",
    AluOp.AND: "&=",
    AluOp.LSH: "<<=",
    AluOp.RSH: ">>=",
    AluOp.MOD: "%=",
    AluOp.XOR: "^=",
    AluOp.MOV: "=",
    AluOp.ARSH: "s>>=",
}
_JMP = {
    JmpOp.JEQ: "==",
    JmpOp.JGT: ">",
    JmpOp.JGE: ">=",
    JmpOp.JSET: "&",
    JmpOp.JNE: "!=",
    JmpOp.JSGT: "s>",
    JmpOp.JSGE: "s>=",
    JmpOp.JLT: "<",
    JmpOp.JLE: "<=",
    JmpOp.JSLT: "s<",
    JmpOp.JSLE: "s<=",
}
_ATOMIC_NAMES = {AtomicOp.ADD: "add", AtomicOp.OR: "or", AtomicOp.AND: "and", AtomicOp.XOR: "xor"}
_SIZE = {Size.B: "u8", Size.H: "u16", Size.W: "u32", Size.DW: "u64"}
_SIZE_SIGNED = {Size.B: "s8", Size.H: "s16", Size.W: "s32"}


class DisassemblyError(ValueError):
    pass


def disassemble(insn: Insn, syntax: Syntax = "kernel") -> str:
    """One instruction as text, without its index or opcode prefix."""
    text = _FORMATTERS[insn.cls](insn, syntax == "kernel")
    if text is None:
        raise DisassemblyError(f"unknown instruction code {insn.code:#04x}")
    return text


def listing(insns: list[Insn], *, annotations: bool = True) -> str:
    """The verifier log's layout: `slot: (code) text`, with each new annotation as a comment."""
    lines: list[str] = []
    slot = 0
    last: object = None
    for insn in insns:
        if annotations and insn.annotation is not None and insn.annotation is not last:
            lines.append(f"; {insn.annotation}")
            last = insn.annotation
        lines.append(f"{slot}: ({insn.code:02x}) {disassemble(insn)}")
        slot += insn.slots
    return "\n".join(lines)


def _reg(number: int, wide: bool) -> str:
    return f"{'r' if wide else 'w'}{number}"


def _mem(base: int, off: int, kernel: bool) -> str:
    if kernel:
        return f"r{base} {off:+d}"
    return f"r{base} {'-' if off < 0 else '+'} {abs(off)}"


def _alu(insn: Insn, kernel: bool) -> str | None:
    wide = insn.cls == Class.ALU64
    op = AluOp(insn.op) if insn.op in AluOp._value2member_map_ else None
    dst = _reg(insn.dst, wide)
    if op is None:
        return None
    if op == AluOp.END:
        if wide:
            return f"r{insn.dst} = bswap{insn.imm} r{insn.dst}"
        kind = "be" if insn.code & Source.X else "le"
        return f"r{insn.dst} = {kind}{insn.imm} r{insn.dst}"
    if op == AluOp.NEG:
        return f"{dst} = -{dst}"
    sign = "s" if insn.off == 1 and op in (AluOp.DIV, AluOp.MOD) else ""
    if insn.code & Source.X:
        src = _reg(insn.src, wide)
        if op == AluOp.MOV and insn.off in (8, 16, 32):
            return f"{dst} = (s{insn.off}){src}"
        return f"{dst} {sign}{_ALU[op]} {src}"
    return f"{dst} {sign}{_ALU[op]} {insn.imm}"


def _jmp(insn: Insn, kernel: bool) -> str | None:
    op = insn.op
    wide = insn.cls == Class.JMP
    pc = "pc" if kernel else ""
    if op == JmpOp.EXIT:
        return "exit"
    if op == JmpOp.CALL:
        if insn.src == PseudoSrc.CALL:
            where = insn.target if insn.target else f"{pc}{insn.imm:+d}"
            return f"call {where}"
        if insn.src == PseudoSrc.KFUNC_CALL:
            name = insn.kfunc or "kernel-function"
            return f"call {name}#{insn.imm}" if kernel else f"call {name}"
        name = helper_name(insn.imm)
        if kernel and name is not None:
            return f"call bpf_{name}#{insn.imm}"
        return f"call {insn.imm}"
    target = insn.target if insn.target else f"{pc}{insn.off:+d}"
    if op == JmpOp.JA:
        if not wide:
            target = insn.target if insn.target else f"{pc}{insn.imm:+d}"
            return f"gotol {target}"
        return f"goto {target}"
    if op not in _JMP:
        return None
    dst = _reg(insn.dst, wide)
    if insn.code & Source.X:
        operand = _reg(insn.src, wide)
    elif kernel:
        operand = f"{insn.imm & 0xFFFF_FFFF:#x}" if insn.imm < 0 else f"{insn.imm:#x}"
    else:
        operand = str(insn.imm)
    return f"if {dst} {_JMP[JmpOp(op)]} {operand} goto {target}"


def _ld(insn: Insn, kernel: bool) -> str | None:
    mode = insn.code & 0xE0
    size = Size(insn.code & 0x18)
    if insn.is_wide:
        if insn.src in (PseudoSrc.MAP_FD, PseudoSrc.MAP_VALUE):
            ref = insn.map if insn.map is not None else f"fd:{insn.imm & 0xFFFF_FFFF}"
            if insn.src == PseudoSrc.MAP_VALUE:
                return f"r{insn.dst} = map[{ref}][0]+{insn.imm >> 32}"
            return f"r{insn.dst} = map[{ref}]"
        if insn.src == PseudoSrc.FUNC:
            offset = (insn.imm & 0xFFFF_FFFF) - ((insn.imm & 0x8000_0000) << 1)
            ref = insn.target if insn.target is not None else f"pc{offset:+d}"
            return f"r{insn.dst} = func[{ref}]"
        value = insn.imm & 0xFFFF_FFFF_FFFF_FFFF
        return f"r{insn.dst} = {value:#x}" if kernel else f"r{insn.dst} = {value} ll"
    if mode == Mode.ABS:
        return f"r0 = *({_SIZE[size]} *)skb[{insn.imm}]"
    if mode == Mode.IND:
        if kernel:
            return f"r0 = *({_SIZE[size]} *)skb[r{insn.src} + {insn.imm}]"
        extra = f" + {insn.imm}" if insn.imm else ""
        return f"r0 = *({_SIZE[size]} *)skb[r{insn.src}{extra}]"
    return None


def _ldx(insn: Insn, kernel: bool) -> str | None:
    mode = insn.code & 0xE0
    size = Size(insn.code & 0x18)
    if mode == Mode.MEM:
        kind = _SIZE[size]
    elif mode == Mode.MEMSX and size in _SIZE_SIGNED:
        kind = _SIZE_SIGNED[size]
    else:
        return None
    return f"r{insn.dst} = *({kind} *)({_mem(insn.src, insn.off, kernel)})"


def _st(insn: Insn, kernel: bool) -> str | None:
    if insn.code & 0xE0 != Mode.MEM:
        return None
    size = Size(insn.code & 0x18)
    return f"*({_SIZE[size]} *)({_mem(insn.dst, insn.off, kernel)}) = {insn.imm}"


def _stx(insn: Insn, kernel: bool) -> str | None:
    mode = insn.code & 0xE0
    size = Size(insn.code & 0x18)
    mem = _mem(insn.dst, insn.off, kernel)
    if mode == Mode.MEM:
        return f"*({_SIZE[size]} *)({mem}) = r{insn.src}"
    if mode != Mode.ATOMIC or size not in (Size.W, Size.DW):
        return None
    wide = size == Size.DW
    # The kernel names registers rN whatever the width; LLVM writes wN for 32-bit atomics.
    src = f"r{insn.src}" if kernel else _reg(insn.src, wide)
    width = "64" if wide else ""
    op = insn.imm
    base = op & ~AtomicOp.FETCH
    if op in _ATOMIC_NAMES:
        return f"lock *({_SIZE[size]} *)({mem}) {_ALU[AluOp(op)]} {src}"
    if op & AtomicOp.FETCH and base in _ATOMIC_NAMES:
        name = _ATOMIC_NAMES[AtomicOp(base)]
        if kernel:
            return f"{src} = atomic{width}_fetch_{name}(({_SIZE[size]} *)({mem}), {src})"
        return f"{src} = atomic_fetch_{name}(({_SIZE[size]} *)({mem}), {src})"
    if op == AtomicOp.XCHG:
        if kernel:
            return f"{src} = atomic{width}_xchg(({_SIZE[size]} *)({mem}), {src})"
        return f"{src} = xchg{'' if wide else '32'}_{'64' if wide else '32'}({mem}, {src})"
    if op == AtomicOp.CMPXCHG:
        if kernel:
            return f"r0 = atomic{width}_cmpxchg(({_SIZE[size]} *)({mem}), r0, {src})"
        r0 = _reg(0, wide)
        name = "cmpxchg_64" if wide else "cmpxchg32_32"
        return f"{r0} = {name}({mem}, {r0}, {src})"
    return None


_FORMATTERS = {
    Class.ALU: _alu,
    Class.ALU64: _alu,
    Class.JMP: _jmp,
    Class.JMP32: _jmp,
    Class.LD: _ld,
    Class.LDX: _ldx,
    Class.ST: _st,
    Class.STX: _stx,
}
