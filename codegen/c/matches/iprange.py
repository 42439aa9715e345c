"""`-m iprange` (xt_iprange.c): source and destination address ranges, each with its `!`."""

from __future__ import annotations

from codegen.rules.extensions.iprange import AddressRange, IpRange

from .common import UINT32_MAX, Labels, range_match

MODEL = IpRange


def _address_range(field: str, side: AddressRange, labels: Labels) -> list[str]:
    return range_match(field, side.first, side.last, side.negated, UINT32_MAX, labels)


def write(match: IpRange, labels: Labels) -> list[str]:
    code: list[str] = []
    if match.src is not None:
        code += _address_range("f->saddr", match.src, labels)
    if match.dst is not None:
        code += _address_range("f->daddr", match.dst, labels)
    return code
