"""`-m physdev` (xt_physdev.c): constant here, as no program sees the bridge ports a packet
crossed (codegen.rules.extensions.physdev): it falls through when every option given is
negated, else the rule is missed."""

from __future__ import annotations

from codegen.rules.extensions.physdev import Physdev, no_bridge_answer

from .common import Labels

MODEL = Physdev


def write(match: Physdev, labels: Labels) -> list[str]:
    return [] if no_bridge_answer(match) else [f"goto {labels.miss};  // no bridge port here"]
