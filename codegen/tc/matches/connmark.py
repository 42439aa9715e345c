"""`-m connmark` (xt_connmark): the connection's mark (the facts' Result.mark, which ct_classify
fills and ct_set_mark keeps) under a mask; a packet without a connection never matches."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.extensions.connmark import Connmark
from codegen.rules.extensions.ctinfo import STATE_INVALID

from ..layout import Facts
from .base import Context, Emitter, load, masked_equal


def connmark(match: Connmark, ctx: Context) -> list[Item]:
    untracked = [load(Facts.connection("state")), I.jmp32(JmpOp.JEQ, R1, STATE_INVALID, ctx.miss)]
    return [*untracked, *masked_equal(Facts.connection("mark"), match.mask, match.value,
                                      match.negated, ctx)]  # fmt: skip


EMITTER = Emitter(Connmark, connmark)
