"""`-m pkttype --pkt-type unicast|broadcast|multicast|otherhost` (libxt_pkttype.c,
xt_pkttype.c)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch
from codegen.rules.names import PKT_TYPE_ALIASES, PKT_TYPES
from codegen.rules.packet import PACKET_TYPES, Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser

_NAMES = {number: name for name, number in PKT_TYPES.items()}


@dataclass(frozen=True, slots=True)
class PktType(ExtensionMatch):
    """`-m pkttype --pkt-type unicast|broadcast|multicast|otherhost`."""

    type: Literal["unicast", "broadcast", "multicast", "otherhost"]
    negated: bool = False

    def __post_init__(self) -> None:
        if self.type not in PKT_TYPES:
            raise ValueError(f"packet type must be one of {', '.join(PKT_TYPES)}: {self.type!r}")


class XtPkttypeInfo(ctypes.Structure):
    _fields_ = [("pkttype", ctypes.c_int), ("invert", ctypes.c_int)]


class PktTypeParser(SingleMatchParser):
    name = "pkttype"
    options = {"pkt-type": ("type", True)}
    invertible = frozenset({"type"})
    required = "--pkt-type"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--pkt-type")
        assert ctx.value is not None
        name = ctx.value.text.lower()
        name = PKT_TYPE_ALIASES.get(name, name)
        if name not in PKT_TYPES:
            raise ctx.error(
                f"bad packet type '{ctx.value.text}' (unicast, broadcast, multicast, otherhost)",
                at_value=True,
            )
        self.match = PktType(name, ctx.negated)  # type: ignore[arg-type]


class PktTypeExtension(MatchExtension):
    name = "pkttype"
    revision = 0
    model = PktType
    data = XtPkttypeInfo
    parser = PktTypeParser
    examples = (
        "-m pkttype --pkt-type broadcast",
        "-m pkttype ! --pkt-type unicast",
        "-m pkttype --pkt-type multicast",
        "-m pkttype --pkt-type otherhost",
    )

    def save(self, match: PktType) -> list[str]:
        return ["-m", "pkttype", *(["!"] if match.negated else []), "--pkt-type", match.type]

    def describe(self, match: PktType) -> str:
        return f" PKTTYPE {'!' if match.negated else ''}= {match.type}"

    def encode(self, match: PktType) -> XtPkttypeInfo:
        return XtPkttypeInfo(PKT_TYPES[match.type], int(match.negated))

    def decode(self, data: XtPkttypeInfo) -> PktType:
        name = _NAMES.get(data.pkttype)
        if name is None:
            raise BlobError(
                f"pkttype match: packet type {data.pkttype} is not one of"
                " unicast, broadcast, multicast, otherhost"
            )
        return PktType(name, bool(data.invert))  # type: ignore[arg-type]

    def matches(self, match: PktType, packet: Packet) -> bool:
        kind = packet.pkt_type
        if kind == PACKET_TYPES["loopback"]:
            # xt_pkttype reclassifies looped-back packets by destination address.
            multicast = packet.daddr >> 28 == 0xE
            kind = PACKET_TYPES["multicast"] if multicast else PACKET_TYPES["broadcast"]
        return (kind == PKT_TYPES[match.type]) != match.negated


EXTENSION = PktTypeExtension()
