"""`-m multiport --sports|--dports|--ports LIST` (libxt_multiport.c, xt_multiport.c revision 1):
up to 15 ports, a range taking two slots."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension, require_protocol
from codegen.rules.extensions.ports import ports_of
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint, set_field
from codegen.rules.names import (
    IPPROTO_DCCP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    PROTOCOL_NAMES,
)
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, parse_port

XT_MULTI_PORTS = 15  # slots, a range takes two
PORTS = 4  # the two ports xt_multiport copies
# Protocols xt_multiport accepts: all carry 16-bit source and destination ports first.
MULTIPORT_PROTOCOLS = frozenset(
    {IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP, IPPROTO_DCCP}
)
NEEDS_PROTOCOL = "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' or '-p dccp'"
Direction = Literal["src", "dst", "any"]
_FLAGS: dict[Direction, int] = {"src": 0, "dst": 1, "any": 2}  # XT_MULTIPORT_SOURCE, ...
_DIRECTIONS = {flag: direction for direction, flag in _FLAGS.items()}
_OPTIONS: dict[Direction, str] = {"src": "--sports", "dst": "--dports", "any": "--ports"}


@dataclass(frozen=True, slots=True)
class Multiport(ExtensionMatch):
    """`-m multiport --sports|--dports|--ports LIST`: up to 15 slots, a range takes two.
    Each entry is `(first, last)`; a single port has first == last."""

    direction: Direction
    ports: tuple[tuple[int, int], ...]
    negated: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("src", "dst", "any"):
            raise ValueError(f"multiport direction must be src, dst or any: {self.direction!r}")
        set_field(self, "ports", tuple((int(a), int(b)) for a, b in self.ports))
        for first, last in self.ports:
            check_uint(first, 16, "port")
            check_uint(last, 16, "port")

    @property
    def slots(self) -> int:
        return sum(1 if first == last else 2 for first, last in self.ports)

    def matches(self, sport: int, dport: int) -> bool:
        for first, last in self.ports:
            if self.direction in ("src", "any") and first <= sport <= last:
                return not self.negated
            if self.direction in ("dst", "any") and first <= dport <= last:
                return not self.negated
        return self.negated


class XtMultiportV1(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("count", ctypes.c_uint8),
        ("ports", ctypes.c_uint16 * XT_MULTI_PORTS),
        ("pflags", ctypes.c_uint8 * XT_MULTI_PORTS),
        ("invert", ctypes.c_uint8),
    ]


class MultiportParser(SingleMatchParser):
    name = "multiport"
    options = {
        "source-ports": ("src", True),
        "sports": ("src", True),
        "destination-ports": ("dst", True),
        "dports": ("dst", True),
        "ports": ("any", True),
    }
    invertible = frozenset({"src", "dst", "any"})
    required = "one of --sports, --dports or --ports"

    def parse(self, key: str, ctx: OptionContext) -> None:
        if self.given:
            (other,) = self.given
            if other == key:
                raise ctx.error(f"multiport: {_OPTIONS[key]} can only be used once")  # type: ignore[index]
            raise ctx.error(
                f"multiport: {_OPTIONS[key]} cannot be used together with {_OPTIONS[other]}"  # type: ignore[index]
            )
        if ctx.protocol not in MULTIPORT_PROTOCOLS:
            raise ctx.error(f"{NEEDS_PROTOCOL} before it")
        assert ctx.value is not None
        protocol = PROTOCOL_NAMES[ctx.protocol]
        ports: list[tuple[int, int]] = []
        slots = 0
        for item in ctx.value.text.split(","):
            low_text, colon, high_text = item.partition(":")
            low = parse_port(low_text, protocol)
            high = parse_port(high_text, protocol) if colon else low
            if low is None or high is None:
                bad = low_text if low is None else high_text
                raise ctx.error(f"invalid port/service '{bad}' (ports are 0-65535)", True)
            if colon and low >= high:
                raise ctx.error(f"invalid port range '{item}' (min >= max)", True)
            slots += 2 if colon else 1
            if slots > XT_MULTI_PORTS:
                raise ctx.error(
                    f"too many ports: {XT_MULTI_PORTS} max, a range counts as two", True
                )
            ports.append((low, high))
        self.match = Multiport(key, tuple(ports), ctx.negated)  # type: ignore[arg-type]


class MultiportExtension(MatchExtension):
    name = "multiport"
    revision = 1
    model = Multiport
    data = XtMultiportV1
    parser = MultiportParser
    can_hotdrop = True
    examples = (
        "-p tcp -m multiport --dports 22,80,443",
        "-p udp -m multiport ! --sports 53,1000:2000",
        "-p tcp -m multiport --ports 1:2,3:4,5:6,7:8,9:10,11:12,13:14,15",
    )

    def save(self, match: Multiport) -> list[str]:
        ports = ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in match.ports)
        negated = ["!"] if match.negated else []
        return ["-m", "multiport", *negated, _OPTIONS[match.direction], ports]

    def describe(self, match: Multiport) -> str:
        kind = _OPTIONS[match.direction][2:]
        ports = ",".join(str(a) if a == b else f"{a}:{b}" for a, b in match.ports)
        return f" multiport {kind} {' !' if match.negated else ''}{ports}"

    def check(self, match: Multiport, rule: Rule, chain: str) -> None:
        require_protocol(rule, MULTIPORT_PROTOCOLS, f"{NEEDS_PROTOCOL} (not negated)")
        if not match.ports:
            raise RuleError("multiport needs at least one port")
        if match.slots > XT_MULTI_PORTS:
            raise RuleError(
                f"multiport: too many ports ({match.slots} slots, a range counts as two;"
                f" {XT_MULTI_PORTS} max)"
            )
        for first, last in match.ports:
            if first > last:
                raise RuleError(f"multiport: invalid port range {first}:{last}")

    def encode(self, match: Multiport) -> XtMultiportV1:
        # libxt_multiport parse_multi_ports_v1: a range takes two slots, its first flagged.
        data = XtMultiportV1(flags=_FLAGS[match.direction], invert=match.negated)
        slot = 0
        for first, last in match.ports:
            if slot + (1 if first == last else 2) > XT_MULTI_PORTS:
                raise BlobError(f"multiport: more than {XT_MULTI_PORTS} port slots")
            data.ports[slot] = first
            if first != last:
                data.pflags[slot] = 1
                slot += 1
                data.ports[slot] = last
            slot += 1
        data.count = slot
        return data

    def decode(self, data: XtMultiportV1) -> Multiport:
        direction = _DIRECTIONS.get(data.flags)
        if direction is None:
            raise BlobError(f"multiport match: unknown flags {data.flags}")
        if data.count > XT_MULTI_PORTS:
            raise BlobError(f"multiport match: {data.count} ports, {XT_MULTI_PORTS} max")
        ports: list[tuple[int, int]] = []
        slot = 0
        while slot < data.count:
            # The kernel reads a range from a flagged slot and the next one.
            if data.pflags[slot] and slot + 1 < data.count:
                ports.append((data.ports[slot], data.ports[slot + 1]))
                slot += 2
            else:
                ports.append((data.ports[slot], data.ports[slot]))
                slot += 1
        return Multiport(direction, tuple(ports), bool(data.invert))

    def matches(self, match: Multiport, packet: Packet) -> bool:
        if packet.fragment_offset != 0:
            return False
        sport, dport = ports_of(packet.transport_header(PORTS))
        return match.matches(sport, dport)


EXTENSION = MultiportExtension()
