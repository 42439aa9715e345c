"""`-m length` (xt_length.c): the IP total length within a range."""

from __future__ import annotations

from codegen.rules.extensions.length import Length

from .common import UINT16_MAX, Labels, range_match

MODEL = Length


def write(match: Length, labels: Labels) -> list[str]:
    return range_match("f->tot_len", match.min, match.max, match.negated, UINT16_MAX, labels)
