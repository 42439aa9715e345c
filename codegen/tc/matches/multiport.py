"""`-m multiport` (xt_multiport revision 1): the transport guard, then the listed ports."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.extensions.multiport import PORTS, Multiport

from ..layout import Facts
from .base import Context, Emitter, load, transport_guard

_FIELDS = {"src": [Facts.SPORT], "dst": [Facts.DPORT], "any": [Facts.DPORT, Facts.SPORT]}


def multiport(match: Multiport, ctx: Context) -> list[Item]:
    """The first listed port or range that contains the packet's port decides (match, or miss
    if negated); none does: miss (or match if negated)."""
    hit = ctx.new_label("multiport_hit")
    done = ctx.new_label("multiport_done")
    code = transport_guard(PORTS, ctx)
    for field in _FIELDS[match.direction]:
        code.append(load(field))
        for first, last in match.ports:
            if first == last:
                code.append(I.jmp32(JmpOp.JEQ, R1, first, hit))
            else:
                skip = ctx.new_label("multiport_next")
                code += [
                    I.jmp32(JmpOp.JLT, R1, first, skip),
                    I.jmp32(JmpOp.JLE, R1, last, hit),
                    Label(skip),
                ]
    if match.negated:
        return [*code, I.ja(done), Label(hit), I.ja(ctx.miss), Label(done)]
    return [*code, I.ja(ctx.miss), Label(hit)]


EMITTER = Emitter(Multiport, multiport)
