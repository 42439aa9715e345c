"""`-m ttl --ttl-eq|--ttl-lt|--ttl-gt N` (libipt_ttl.c, ipt_ttl.c)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, strtoui

Operator = Literal["eq", "lt", "gt"]
# (operator, negated) -> the kernel's mode: IPT_TTL_EQ, IPT_TTL_NE, IPT_TTL_LT, IPT_TTL_GT.
_MODES: dict[tuple[Operator, bool], int] = {
    ("eq", False): 0,
    ("eq", True): 1,
    ("lt", False): 2,
    ("gt", False): 3,
}
_OPERATORS = {mode: operator for operator, mode in _MODES.items()}


@dataclass(frozen=True, slots=True)
class Ttl(ExtensionMatch):
    """`-m ttl --ttl-eq|--ttl-lt|--ttl-gt N`; only `--ttl-eq` can be negated."""

    op: Literal["eq", "lt", "gt"]
    value: int
    negated: bool = False

    def __post_init__(self) -> None:
        if self.op not in ("eq", "lt", "gt"):
            raise ValueError(f"ttl op must be eq, lt or gt, got {self.op!r}")
        check_uint(self.value, 8, "ttl")

    def matches(self, ttl: int) -> bool:
        if self.op == "eq":
            return (ttl == self.value) != self.negated
        if self.op == "lt":
            return ttl < self.value
        return ttl > self.value


class IptTtlInfo(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_uint8), ("ttl", ctypes.c_uint8)]


class TtlParser(SingleMatchParser):
    name = "ttl"
    options = {"ttl-eq": ("eq", True), "ttl-lt": ("lt", True), "ttl-gt": ("gt", True)}
    invertible = frozenset({"eq"})
    required = "one of --ttl-eq, --ttl-lt or --ttl-gt"

    def parse(self, key: str, ctx: OptionContext) -> None:
        if self.given:
            (other,) = self.given
            if other == key:
                raise ctx.error(f"ttl: --ttl-{key} can only be used once")
            raise ctx.error(f"ttl: --ttl-{key} cannot be used together with --ttl-{other}")
        assert ctx.value is not None
        value = strtoui(ctx.value.text, 255)
        if value is None:
            raise ctx.error(f"ttl: bad value '{ctx.value.text}' (0-255)", at_value=True)
        self.match = Ttl(key, value, ctx.negated)  # type: ignore[arg-type]


class TtlExtension(MatchExtension):
    name = "ttl"
    revision = 0
    model = Ttl
    data = IptTtlInfo
    parser = TtlParser
    examples = (
        "-m ttl --ttl-eq 64",
        "-m ttl ! --ttl-eq 1",
        "-m ttl --ttl-lt 2",
        "-m ttl --ttl-gt 254",
    )

    def save(self, match: Ttl) -> list[str]:
        negated = ["!"] if match.negated else []
        return ["-m", "ttl", *negated, f"--ttl-{match.op}", str(match.value)]

    def describe(self, match: Ttl) -> str:
        operator = {"eq": "!=" if match.negated else "==", "lt": "<", "gt": ">"}[match.op]
        return f" TTL match TTL {operator} {match.value}"

    def check(self, match: Ttl, rule: Rule, chain: str) -> None:
        if match.negated and match.op != "eq":
            raise RuleError(f"--ttl-{match.op} cannot be negated")

    def encode(self, match: Ttl) -> IptTtlInfo:
        mode = _MODES.get((match.op, match.negated))
        if mode is None:
            raise BlobError(f"ttl: --ttl-{match.op} cannot be negated")
        return IptTtlInfo(mode, match.value)

    def decode(self, data: IptTtlInfo) -> Ttl:
        found = _OPERATORS.get(data.mode)
        if found is None:
            raise BlobError(f"ttl match: unknown mode {data.mode}")
        return Ttl(found[0], data.ttl, found[1])

    def matches(self, match: Ttl, packet: Packet) -> bool:
        return match.matches(packet.ttl)


EXTENSION = TtlExtension()
