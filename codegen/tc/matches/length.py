"""`-m length` (xt_length, IPv4): the IP total length in a range."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.length import Length

from ..layout import Facts
from .base import Context, Emitter, in_range, load


def length(match: Length, ctx: Context) -> list[Item]:
    return [load(Facts.TOT_LEN), *in_range(match.min, match.max, match.negated, 0xFFFF, ctx)]


EMITTER = Emitter(Length, length)
