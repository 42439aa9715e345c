"""`-m connmark` (xt_connmark): `(ct mark & mask) == value` over f->ct; a packet without a
connection never matches, negated or not."""

from __future__ import annotations

from codegen.rules.extensions.connmark import Connmark
from codegen.rules.extensions.ctinfo import STATE_INVALID

from .common import UINT32_MAX, Labels, hex_literal, require

MODEL = Connmark


def write(match: Connmark, labels: Labels) -> list[str]:
    mark = "f->ct.mark" if match.mask == UINT32_MAX else f"(f->ct.mark & {hex_literal(match.mask)})"
    untracked = f"if (f->ct.state == {STATE_INVALID}) goto {labels.miss};"
    return [untracked, *require(f"{mark} == {hex_literal(match.value)}", match.negated, labels)]
