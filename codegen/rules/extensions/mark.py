"""`-m mark --mark VALUE[/MASK]` (libxt_mark.c, xt_mark.c revision 1)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import UINT32_MAX, ExtensionMatch, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, strtoui


@dataclass(frozen=True, slots=True)
class Mark(ExtensionMatch):
    """`-m mark --mark VALUE[/MASK]`: matches when `skb->mark & mask == value` (the value is
    not masked, as in the kernel: 0x10/0x1 never matches)."""

    value: int
    mask: int = UINT32_MAX
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.value, 32, "mark")
        check_uint(self.mask, 32, "mark mask")

    def matches(self, mark: int) -> bool:
        return ((mark & self.mask) == self.value) != self.negated


class XtMarkMtinfo1(ctypes.Structure):
    _fields_ = [("mark", ctypes.c_uint32), ("mask", ctypes.c_uint32), ("invert", ctypes.c_uint8)]


class MarkParser(SingleMatchParser):
    """`--mark VALUE[/MASK]`, into `model` (connmark's parser is this one for its own model)."""

    name = "mark"
    model: type = Mark
    options = {"mark": ("mark", True)}
    invertible = frozenset({"mark"})
    required = "--mark"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--mark")
        assert ctx.value is not None
        value_text, slash, mask_text = ctx.value.text.partition("/")
        value = strtoui(value_text, 0xFFFFFFFF)
        mask = strtoui(mask_text, 0xFFFFFFFF) if slash else 0xFFFFFFFF
        if value is None or mask is None:
            raise ctx.error(
                f"{self.name}: bad value '{ctx.value.text}' (VALUE[/MASK], 32-bit)", at_value=True
            )
        self.match = self.model(value, mask, ctx.negated)


def mark_text(match: Any) -> str:
    """`0xVALUE`, with `/0xMASK` unless the mask is 0xffffffff (print_mark of libxt_mark and
    libxt_connmark)."""
    return f"0x{match.value:x}" + (f"/0x{match.mask:x}" if match.mask != UINT32_MAX else "")


class MarkExtension(MatchExtension):
    name = "mark"
    revision = 1
    model = Mark
    data = XtMarkMtinfo1
    parser = MarkParser
    examples = ("-m mark --mark 0x1", "-m mark ! --mark 0x10/0xf0", "-m mark --mark 0x10/0x1")

    def save(self, match: Mark) -> list[str]:
        return ["-m", "mark", *(["!"] if match.negated else []), "--mark", mark_text(match)]

    def describe(self, match: Mark) -> str:
        return f" mark match{' !' if match.negated else ''} {mark_text(match)}"

    def encode(self, match: Mark) -> XtMarkMtinfo1:
        return XtMarkMtinfo1(match.value, match.mask, match.negated)

    def decode(self, data: XtMarkMtinfo1) -> Mark:
        return Mark(data.mark, data.mask, bool(data.invert))

    def matches(self, match: Mark, packet: Packet) -> bool:
        return match.matches(packet.mark)


EXTENSION = MarkExtension()
