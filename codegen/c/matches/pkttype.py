"""`-m pkttype` (xt_pkttype.c): the packet's link-layer class (skb->pkt_type's numbers)."""

from __future__ import annotations

from codegen.rules.extensions.pkttype import PktType
from codegen.rules.names import PKT_TYPES

from .common import Labels, require

MODEL = PktType


def write(match: PktType, labels: Labels) -> list[str]:
    return require(f"f->pkt_type == {PKT_TYPES[match.type]}", match.negated, labels)
