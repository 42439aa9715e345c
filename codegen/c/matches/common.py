"""What every match writer shares: where a rule's code jumps (Labels), conditions written as C
comparisons, and the transport-header guard of the matches that read past the IP header.

A writer turns one match into statements that fall through when the packet matches, `goto`
the rule's miss label when it does not, and `goto` its hotdrop label where netfilter drops the
packet on the spot. The helpers here keep the C free of comparisons that are always true or
always false (clang warns about those) and write `!` as the opposite comparison.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from codegen.rules.model import Match
from codegen.tc.matches.base import interface_indexes

UINT32_MAX, UINT16_MAX, UINT8_MAX = 0xFFFF_FFFF, 0xFFFF, 0xFF


@dataclass(frozen=True)
class Labels:
    """Where a rule's code goes: `miss` (next rule), `hotdrop`; and the devices known. `rule`
    is the rule's chain and 1-based index, `place` the match's (its rule's and its number
    among the rule's matches, which write_matches sets), `slots` the bucket of each limit
    match by place."""

    miss: str
    hotdrop: str
    interfaces: Mapping[str, int]
    rule: tuple[str, int] = ("", 0)
    place: tuple[str, int, int] = ("", 0, 0)
    slots: Mapping[tuple[str, int, int], int] = field(default_factory=dict)
    bridge_ports: bool = True  # whether the facts' physin and physout may hold bridge ports


class UnsupportedMatch(ValueError):
    """A match this backend has no writer for, or a form of one it refuses."""


# A family's writer: the statements of one match of its model.
Writer = Callable[[Match, Labels], list[str]]


def hex_literal(value: int) -> str:
    return f"0x{value:x}u"


_INVERSE = {"==": "!=", "!=": "==", "<": ">=", ">": "<=", "<=": ">", ">=": "<"}
_COMPARISON = re.compile(r"(.+?) (==|!=|<=|>=|<|>) (\S+)")


def negation(condition: str) -> str:
    """`!condition`, written as the opposite comparison when it is a single one."""
    found = _COMPARISON.fullmatch(condition)
    if found and "&&" not in condition and "||" not in condition:
        return f"{found[1]} {_INVERSE[found[2]]} {found[3]}"
    return f"!({condition})"


def require(hit: str, negated: bool, labels: Labels) -> list[str]:
    """Miss unless `hit` holds (or, negated, unless it does not)."""
    return [f"if ({hit if negated else negation(hit)}) goto {labels.miss};"]


def unless(condition: str, labels: Labels) -> list[str]:
    """Miss unless `condition` holds (a condition no `!` can invert)."""
    return require(condition, False, labels)


def always_miss(labels: Labels) -> list[str]:
    return [f"goto {labels.miss};"]


def device_test(field: str, name: str, negated: bool, labels: Labels) -> list[str]:
    """Miss unless the ifindex in `field` is one `name` stands for among the devices known when
    the program is built (a trailing `+`: a prefix), or, `negated`, unless it is none of them;
    a name nobody has matches no packet: -i/-o, and -m physdev's ports."""
    indexes = interface_indexes(name, labels.interfaces)
    if not indexes:
        return [] if negated else always_miss(labels)
    return require(" || ".join(f"{field} == {index}" for index in indexes), negated, labels)


def in_range(value: str, first: int, last: int, top: int) -> str:
    """`first <= value <= last` for an unsigned field of maximum `top`, without comparisons
    that are always true (clang would warn). An empty range (first > last) is `0`."""
    if first > last:
        return "0"
    if first == last:
        return f"{value} == {_number(first, top)}"
    parts = []
    if first > 0:
        parts.append(f"{value} >= {_number(first, top)}")
    if last < top:
        parts.append(f"{value} <= {_number(last, top)}")
    return " && ".join(parts) or "1"


def _number(value: int, top: int) -> str:
    return hex_literal(value) if top == UINT32_MAX else str(value)


def range_match(
    value: str, first: int, last: int, negated: bool, top: int, labels: Labels
) -> list[str]:
    """Miss unless `value` is in `first..last` (negated: unless it is outside); a range that
    holds every value or none becomes an unconditional miss or nothing."""
    inside = in_range(value, first, last, top)
    if inside == "1":
        return always_miss(labels) if negated else []
    if inside == "0":
        return [] if negated else always_miss(labels)
    return require(inside, negated, labels)


def later_fragment_misses(labels: Labels) -> list[str]:
    """A later fragment holds no transport header: the matches that read one miss it."""
    return [f"if (f->fragment != 0) goto {labels.miss};"]


def short_header_hotdrops(needed: int, labels: Labels) -> list[str]:
    """A transport header shorter than the `needed` bytes its match copies (with
    skb_header_pointer) is dropped on the spot."""
    return [f"if (f->l4_len < {needed}) goto {labels.hotdrop};"]


def transport_header(needed: int, labels: Labels) -> list[str]:
    """Never a later fragment; a header shorter than `needed` bytes is dropped."""
    return [*later_fragment_misses(labels), *short_header_hotdrops(needed, labels)]
