"""`-m ttl` (ipt_ttl.c): the TTL equal to, below or above a value (only `--ttl-eq` takes
`!`)."""

from __future__ import annotations

from codegen.rules.extensions.ttl import Ttl

from .common import UINT8_MAX, Labels, always_miss, require, unless

MODEL = Ttl


def write(match: Ttl, labels: Labels) -> list[str]:
    if match.op == "eq":
        return require(f"f->ttl == {match.value}", match.negated, labels)
    if (match.op, match.value) in (("lt", 0), ("gt", UINT8_MAX)):
        return always_miss(labels)  # no TTL is below 0 or above 255
    operator = "<" if match.op == "lt" else ">"
    return unless(f"f->ttl {operator} {match.value}", labels)
