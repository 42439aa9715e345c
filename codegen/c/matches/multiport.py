"""`-m multiport` (xt_multiport.c revision 1): a hit when any listed port or range holds the
packet's port (source, destination, or either), after the header check that can drop it."""

from __future__ import annotations

from codegen.rules.extensions.multiport import PORTS, Multiport

from .common import UINT16_MAX, Labels, in_range, require, transport_header

MODEL = Multiport
_FIELDS = {"src": ("f->sport",), "dst": ("f->dport",), "any": ("f->sport", "f->dport")}


def write(match: Multiport, labels: Labels) -> list[str]:
    hits = [
        f"({in_range(field, first, last, UINT16_MAX)})"
        for first, last in match.ports
        for field in _FIELDS[match.direction]
    ]
    hit = " || ".join(hits)
    return [
        *transport_header(PORTS, labels),
        *require(hit, match.negated, labels),
    ]
