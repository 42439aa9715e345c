"""`-m pkttype` (xt_pkttype): the skb's packet type (host, broadcast, multicast)."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.pkttype import PktType
from codegen.rules.names import PKT_TYPES

from ..layout import Facts
from .base import Context, Emitter, jump_unless, load


def pkttype(match: PktType, ctx: Context) -> list[Item]:
    return [load(Facts.PKT_TYPE), jump_unless(not match.negated, PKT_TYPES[match.type], ctx.miss)]


EMITTER = Emitter(PktType, pkttype)
