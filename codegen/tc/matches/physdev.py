"""`-m physdev` (xt_physdev.c): the programs never see the bridge ports a packet crossed, so a
match is constant (codegen.rules.extensions.physdev): always true when every option given is
negated, else never. A constant match pins nothing and keeps its rule in an exact run."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.rules.extensions.physdev import Physdev, no_bridge_answer

from .base import Context, Emitter, Pins


def physdev(match: Physdev, ctx: Context) -> list[Item]:
    return [] if no_bridge_answer(match) else [I.ja(ctx.miss)]


def pins(match: Physdev) -> Pins | None:
    return Pins() if no_bridge_answer(match) else None


EMITTER = Emitter(Physdev, physdev, pins)
