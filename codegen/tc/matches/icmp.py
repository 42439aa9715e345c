"""`-m icmp` (ipt_icmp's icmp_match): the transport guard, then type and code range."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.extensions.icmp import ICMP_HEADER, IcmpMatch

from ..layout import Facts
from .base import Context, Emitter, in_range, load, transport_guard


def icmp(match: IcmpMatch, ctx: Context) -> list[Item]:
    code = transport_guard(ICMP_HEADER, ctx)
    if match.type == 0xFF:  # any type
        return code + ([I.ja(ctx.miss)] if match.negated else [])
    if not match.negated:
        return [
            *code,
            load(Facts.ICMP_TYPE),
            I.jmp32(JmpOp.JNE, R1, match.type, ctx.miss),
            load(Facts.ICMP_CODE),
            *in_range(match.code_min, match.code_max, False, 0xFF, ctx),
        ]
    # ! --icmp-type: miss only when type and code both match.
    differs = ctx.new_label("icmp_differs")
    return [
        *code,
        load(Facts.ICMP_TYPE),
        I.jmp32(JmpOp.JNE, R1, match.type, differs),
        load(Facts.ICMP_CODE),
        *in_range(match.code_min, match.code_max, False, 0xFF, ctx.with_miss(differs)),
        I.ja(ctx.miss),
        Label(differs),
    ]


EMITTER = Emitter(IcmpMatch, icmp)
