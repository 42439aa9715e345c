"""`-m limit` (xt_limit.c): take the rule's cost from its bucket (codegen/c/limit.py), else miss.
Cost and cap at the kernel's HZ, as limit_mt_check computes them."""

from __future__ import annotations

from codegen.rules.extensions.limit import Limit, cost, credit_cap

from ..limit import hz
from .common import Labels

MODEL = Limit


def write(match: Limit, labels: Labels) -> list[str]:
    ticks = hz()
    slot = labels.slots[labels.place]
    price, cap = cost(match, ticks), credit_cap(match, ticks)
    return [f"if (!limit_take({slot}, {price}u, {cap}u)) goto {labels.miss};"]
