"""Runs of exact-match rules answered by one hash lookup instead of a scan.

Allow lists are written as long runs of rules that differ only in constants:
`-s ADDR -p tcp --dport PORT -j ACCEPT`, one per host and service. Scanning them costs a
compare per rule per packet. A run of consecutive rules with the same *shape* (which of source,
destination, protocol, source port, destination port they pin to one value; nothing else but
comments; ACCEPT or DROP) is put in a hash map instead: the packet's values are the key, the
value the first rule of the run with that key (its counter slot and verdict). Earlier rules win,
as in a scan, because the map is filled in rule order and a key is never overwritten.

The lookup answers for packets whose transport header the rules could read. Everything else
(later fragments, truncated transport headers: cases where netfilter's tcp and udp matches
refuse or hotdrop) takes the run's ordinary code, which stays right behind the lookup.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import Accept, Address, Drop, Protocol, Rule
from codegen.rules.names import IPPROTO_TCP, IPPROTO_UDP

MIN_RUN = 128  # measured: a lookup costs about what scanning 50 to 150 rules does
KEY = struct.Struct("<IIIHHB3x")  # run, saddr, daddr, sport, dport, protocol (host order)
VALUE = struct.Struct("<II")  # counter slot, verdict (ACCEPT 1, DROP 2)
ACCEPT, DROP = 1, 2


@dataclass(frozen=True)
class Shape:
    """Which packet fields a rule pins; rules of one run share it."""

    source: bool
    destination: bool
    protocol: bool
    transport: bool  # has a tcp or udp match, so its guard (first fragment, header) applies
    source_port: bool
    destination_port: bool


@dataclass(frozen=True)
class Pinned:
    shape: Shape
    values: tuple[int, int, int, int, int]  # saddr, daddr, sport, dport, protocol


def _single(ports: PortRange) -> int | None:
    """The one port a range pins, None for the full range, -1 for anything else."""
    if ports.is_default:
        return None
    if ports.first == ports.last and not ports.negated:
        return ports.first
    return -1


def pinned(rule: Rule) -> Pinned | None:
    """The rule's shape and values if it can join a run, else None."""
    if not isinstance(rule.target, Accept | Drop):
        return None
    values = {"saddr": 0, "daddr": 0, "sport": 0, "dport": 0, "protocol": 0}
    seen: set[str] = set()
    transport = False
    for match in rule.matches:
        if isinstance(match, Comment):
            continue
        if isinstance(match, Address):
            key = "saddr" if match.direction == "src" else "daddr"
            if match.negated or match.mask != 0xFFFFFFFF or key in seen:
                return None
            values[key] = match.address
            seen.add(key)
        elif isinstance(match, Protocol):
            if match.negated or match.number == 0:
                return None
            values["protocol"] = match.number
            seen.add("protocol")
        elif isinstance(match, TcpMatch | UdpMatch):
            flags = match.flags if isinstance(match, TcpMatch) else TcpFlags()
            if transport or not flags.is_default:
                return None
            transport = True
            for key, ports in (("sport", match.sport), ("dport", match.dport)):
                port = _single(ports)
                if port == -1:
                    return None
                if port is not None:
                    values[key] = port
                    seen.add(key)
        else:
            return None
    if transport and values["protocol"] not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    shape = Shape(
        "saddr" in seen,
        "daddr" in seen,
        "protocol" in seen,
        transport,
        "sport" in seen,
        "dport" in seen,
    )
    return Pinned(
        shape,
        (values["saddr"], values["daddr"], values["sport"], values["dport"], values["protocol"]),
    )


def runs(rules: list[Rule]) -> list[tuple[int, int, Shape]]:
    """Maximal runs (first and last index, 0-based, inclusive) of at least MIN_RUN consecutive
    rules of one shape."""
    found = []
    start = 0
    while start < len(rules):
        first = pinned(rules[start])
        end = start + 1
        if first is not None:
            while end < len(rules):
                other = pinned(rules[end])
                if other is None or other.shape != first.shape:
                    break
                end += 1
            if end - start >= MIN_RUN:
                found.append((start, end - 1, first.shape))
        start = end
    return found


def entries(run_id: int, rules: list[Rule], slots: list[int]) -> dict[bytes, bytes]:
    """The map entries of one run: the first rule wins for each key."""
    table: dict[bytes, bytes] = {}
    for rule, slot in zip(rules, slots, strict=True):
        found = pinned(rule)
        assert found is not None
        saddr, daddr, sport, dport, protocol = found.values
        key = KEY.pack(run_id, saddr, daddr, sport, dport, protocol)
        verdict = ACCEPT if isinstance(rule.target, Accept) else DROP
        table.setdefault(key, VALUE.pack(slot, verdict))
    return table
