"""`-m addrtype --src-type TYPES --dst-type TYPES [--limit-iface-in|--limit-iface-out]`
(libxt_addrtype.c, xt_addrtype.c revision 1): what the namespace's routing says the packet's
addresses are (codegen.rules.routes: LOCAL, BROADCAST, MULTICAST, UNICAST, ...).

Each side holds when the type of its address is one of the listed types (not one, negated);
both given, both must hold. With --limit-iface-in (INPUT, FORWARD) or --limit-iface-out
(FORWARD, OUTPUT) a route through another device than the packet's answers UNICAST. Type
names are read as libxt_addrtype's parse_type does: case-insensitive and by prefix, the first
type in number order the word begins (`loc` is LOCAL, `u` is UNSPEC).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError
from codegen.rules.packet import Packet
from codegen.rules.routes import ROUTE_TYPES, STANDIN_ROUTES
from codegen.rules.syntax import Line, MatchParser, OptionContext, Token

INVERT_SOURCE, INVERT_DEST, LIMIT_IFACE_IN, LIMIT_IFACE_OUT = 1, 2, 4, 8
ALL_TYPES = (1 << len(ROUTE_TYPES)) - 1
Limit = Literal["in", "out"] | None


@dataclass(frozen=True, slots=True)
class AddressTypes:
    """One side of `-m addrtype`: a bit mask of RTN types (bit N: type N), maybe negated."""

    mask: int
    negated: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.mask <= ALL_TYPES:
            raise ValueError(f"address type mask must be 1-{ALL_TYPES:#x}, not {self.mask:#x}")

    @property
    def names(self) -> list[str]:
        return [name for bit, name in enumerate(ROUTE_TYPES) if self.mask >> bit & 1]

    def matches(self, address_type: int) -> bool:
        return bool(self.mask >> address_type & 1) != self.negated


@dataclass(frozen=True, slots=True)
class AddrType(ExtensionMatch):
    """`-m addrtype`: the source's and the destination's address types (at least one), and
    which device the routes must go through (`limit`: the packet's in or out device)."""

    src: AddressTypes | None = None
    dst: AddressTypes | None = None
    limit: Limit = None

    def __post_init__(self) -> None:
        if self.limit not in (None, "in", "out"):
            raise ValueError(f"limit must be None, 'in' or 'out', not {self.limit!r}")


class XtAddrtypeInfoV1(ctypes.Structure):
    _fields_ = [("source", ctypes.c_uint16), ("dest", ctypes.c_uint16), ("flags", ctypes.c_uint32)]


def parse_types(text: str) -> int | None:
    """The mask of a comma list of type names as parse_types reads it; None if a name is
    empty or begins no type."""
    mask = 0
    for word in text.split(","):
        if not word or not word.isascii():
            return None
        for bit, name in enumerate(ROUTE_TYPES):
            if name.startswith(word.upper()):
                mask |= 1 << bit
                break
        else:
            return None
    return mask


class AddrTypeParser(MatchParser):
    name = "addrtype"
    options = {
        "src-type": ("src", True),
        "dst-type": ("dst", True),
        "limit-iface-in": ("in", False),
        "limit-iface-out": ("out", False),
    }
    invertible = frozenset({"src", "dst"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.sides: dict[str, AddressTypes] = {}
        self.limit: Limit = None

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            option = {"src": "--src-type", "dst": "--dst-type"}.get(key, f"--limit-iface-{key}")
            raise ctx.error(f'addrtype: option "{option}" can only be used once')
        if key in ("in", "out"):
            other = "out" if key == "in" else "in"
            if other in self.given:
                raise ctx.error(
                    f'addrtype: option "--limit-iface-{key}" cannot be used together with'
                    f' "--limit-iface-{other}"'
                )
            self.limit = key  # type: ignore[assignment]
            return
        assert ctx.value is not None
        mask = parse_types(ctx.value.text)
        if mask is None:
            raise ctx.error(
                f"addrtype: bad type '{ctx.value.text}' (a comma list of {', '.join(ROUTE_TYPES)})",
                at_value=True,
            )
        self.sides[key] = AddressTypes(mask, ctx.negated)

    def finish(self, line: Line) -> AddrType:
        if not self.sides:
            raise self.missing(line, "--src-type or --dst-type")
        return AddrType(self.sides.get("src"), self.sides.get("dst"), self.limit)


def _words(side: AddressTypes) -> str:
    return ",".join(side.names)


class AddrTypeExtension(MatchExtension):
    name = "addrtype"
    revision = 1
    model = AddrType
    data = XtAddrtypeInfoV1
    parser = AddrTypeParser
    examples = (
        "-m addrtype --dst-type LOCAL",
        "-m addrtype ! --src-type BROADCAST,MULTICAST",
        "-m addrtype --src-type UNICAST ! --dst-type LOCAL,ANYCAST",
        "-m addrtype --dst-type LOCAL --limit-iface-in",
        "-m addrtype --src-type UNSPEC,BLACKHOLE,UNREACHABLE,PROHIBIT,THROW,NAT,XRESOLVE",
    )

    def save(self, match: AddrType) -> list[str]:
        words = ["-m", "addrtype"]
        for option, side in (("--src-type", match.src), ("--dst-type", match.dst)):
            if side is not None:
                words += [*(["!"] if side.negated else []), option, _words(side)]
        if match.limit is not None:
            words.append(f"--limit-iface-{match.limit}")
        return words

    def describe(self, match: AddrType) -> str:
        text = " ADDRTYPE match"
        for label, side in (("src-type", match.src), ("dst-type", match.dst)):
            if side is not None:
                text += f" {label} {'!' if side.negated else ''}{_words(side)}"
        if match.limit is not None:
            text += f" limit-{match.limit}"
        return text

    def check(self, match: AddrType, rule: Rule, chain: str) -> None:
        if match.src is None and match.dst is None:
            raise RuleError("addrtype: you must specify --src-type or --dst-type")

    def hooks(self, match: AddrType) -> frozenset[str]:
        return {
            None: frozenset({"INPUT", "FORWARD", "OUTPUT"}),
            "in": frozenset({"INPUT", "FORWARD"}),
            "out": frozenset({"FORWARD", "OUTPUT"}),
        }[match.limit]

    def hook_refusal(self, match: AddrType, hook: str) -> str:
        return f"addrtype: --limit-iface-{match.limit} is not valid in {hook}"

    def encode(self, match: AddrType) -> XtAddrtypeInfoV1:
        data = XtAddrtypeInfoV1()
        if match.src is not None:
            data.source = match.src.mask
            data.flags |= INVERT_SOURCE if match.src.negated else 0
        if match.dst is not None:
            data.dest = match.dst.mask
            data.flags |= INVERT_DEST if match.dst.negated else 0
        data.flags |= {None: 0, "in": LIMIT_IFACE_IN, "out": LIMIT_IFACE_OUT}[match.limit]
        return data

    def decode(self, data: XtAddrtypeInfoV1) -> AddrType:
        known = INVERT_SOURCE | INVERT_DEST | LIMIT_IFACE_IN | LIMIT_IFACE_OUT
        if data.flags & ~known:
            raise BlobError(f"addrtype match: unknown flags {data.flags & ~known:#x}")
        if data.flags & LIMIT_IFACE_IN and data.flags & LIMIT_IFACE_OUT:
            raise BlobError("addrtype match limits to both the in and the out device")
        if data.source & ~ALL_TYPES or data.dest & ~ALL_TYPES:
            raise BlobError("addrtype match: a type mask has bits past XRESOLVE")
        if not data.source and not data.dest:
            raise BlobError("addrtype match has neither a source nor a destination type")
        # A side with no types is not looked at, whatever its invert flag says.
        src = AddressTypes(data.source, bool(data.flags & INVERT_SOURCE)) if data.source else None
        dst = AddressTypes(data.dest, bool(data.flags & INVERT_DEST)) if data.dest else None
        limit: Limit = (
            "in" if data.flags & LIMIT_IFACE_IN else "out" if data.flags & LIMIT_IFACE_OUT else None
        )
        return AddrType(src, dst, limit)

    def matches(self, match: AddrType, packet: Packet) -> bool:
        routes = STANDIN_ROUTES if packet.routes is None else packet.routes
        # No device to limit to (never so in the hooks that allow the option): no limit.
        device = {None: None, "in": packet.in_device, "out": packet.out_device}[match.limit] or None
        for side, address in ((match.src, packet.saddr), (match.dst, packet.daddr)):
            if side is not None and not side.matches(routes.address_type(address, device)):
                return False
        return True


EXTENSION = AddrTypeExtension()
