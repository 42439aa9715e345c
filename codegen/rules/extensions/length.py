"""`-m length --length MIN[:MAX]` (libxt_length.c, xt_length.c): the IP total length."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, strtoui


@dataclass(frozen=True, slots=True)
class Length(ExtensionMatch):
    """`-m length --length MIN[:MAX]` on the IP total length."""

    min: int
    max: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.min, 16, "length")
        check_uint(self.max, 16, "length")

    def matches(self, total_length: int) -> bool:
        return (self.min <= total_length <= self.max) != self.negated


class XtLengthInfo(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint16), ("max", ctypes.c_uint16), ("invert", ctypes.c_uint8)]


class LengthParser(SingleMatchParser):
    name = "length"
    options = {"length": ("length", True)}
    invertible = frozenset({"length"})
    required = "--length"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--length")
        assert ctx.value is not None
        text = ctx.value.text
        low_text, colon, high_text = text.partition(":")
        low = strtoui(low_text, 0xFFFF) if low_text else 0
        high = (strtoui(high_text, 0xFFFF) if high_text else 0xFFFF) if colon else low
        if low is None or high is None or (colon and ":" in high_text):
            raise ctx.error(f"length: bad value '{text}' (0-65535 or MIN:MAX)", at_value=True)
        self.match = Length(low, high, ctx.negated)


class LengthExtension(MatchExtension):
    name = "length"
    revision = 0
    model = Length
    data = XtLengthInfo
    parser = LengthParser
    examples = ("-m length --length 64", "-m length ! --length 0:1500", "-m length --length 9:3")

    def save(self, match: Length) -> list[str]:
        value = str(match.min) if match.min == match.max else f"{match.min}:{match.max}"
        return ["-m", "length", *(["!"] if match.negated else []), "--length", value]

    def describe(self, match: Length) -> str:
        span = str(match.min) if match.min == match.max else f"{match.min}:{match.max}"
        return f" length {'!' if match.negated else ''}{span}"

    def encode(self, match: Length) -> XtLengthInfo:
        return XtLengthInfo(match.min, match.max, match.negated)

    def decode(self, data: XtLengthInfo) -> Length:
        return Length(data.min, data.max, bool(data.invert))

    def matches(self, match: Length, packet: Packet) -> bool:
        return match.matches(packet.total_length)


EXTENSION = LengthExtension()
