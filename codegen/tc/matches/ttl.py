"""`-m ttl` (ipt_ttl): equal, less than or greater than a value."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.extensions.ttl import Ttl

from ..layout import Facts
from .base import Context, Emitter, jump_unless, load


def ttl(match: Ttl, ctx: Context) -> list[Item]:
    code: list[Item] = [load(Facts.TTL)]
    if match.op == "eq":
        return [*code, jump_unless(not match.negated, match.value, ctx.miss)]
    if match.op == "lt":
        return [*code, I.jmp32(JmpOp.JGE, R1, match.value, ctx.miss)]
    return [*code, I.jmp32(JmpOp.JLE, R1, match.value, ctx.miss)]


EMITTER = Emitter(Ttl, ttl)
