"""`-m mark` (xt_mark.c): `(mark & mask) == value`; the value is not masked, so 0x10/0x1
never matches."""

from __future__ import annotations

from codegen.rules.extensions.mark import Mark

from .common import UINT32_MAX, Labels, hex_literal, require

MODEL = Mark


def write(match: Mark, labels: Labels) -> list[str]:
    masked = "f->mark" if match.mask == UINT32_MAX else f"(f->mark & {hex_literal(match.mask)})"
    return require(f"{masked} == {hex_literal(match.value)}", match.negated, labels)
