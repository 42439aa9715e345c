"""`-m mark` (xt_mark): the skb mark under a mask."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.mark import Mark

from ..layout import Facts
from .base import Context, Emitter, masked_equal


def mark(match: Mark, ctx: Context) -> list[Item]:
    return masked_equal(Facts.MARK, match.mask, match.value, match.negated, ctx)


EMITTER = Emitter(Mark, mark)
