"""`-m iprange` (xt_iprange, IPv4): each side given is an address range compare."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.iprange import IpRange

from ..layout import Facts
from .base import UINT32_MAX, Context, Emitter, in_range, load


def iprange(match: IpRange, ctx: Context) -> list[Item]:
    code: list[Item] = []
    for field, side in ((Facts.SADDR, match.src), (Facts.DADDR, match.dst)):
        if side is not None:
            code += [load(field), *in_range(side.first, side.last, side.negated, UINT32_MAX, ctx)]
    return code


EMITTER = Emitter(IpRange, iprange)
