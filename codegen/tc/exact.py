"""Runs of exact-match rules answered by one hash lookup instead of a scan.

Allow lists are written as long runs of rules that differ only in constants:
`-s ADDR -p tcp --dport PORT -j ACCEPT`, one per host and service. Scanning them costs a
compare per rule per packet. A run of consecutive rules with the same *shape* (which of source,
destination, protocol, source port, destination port they pin to one value; nothing else but
matches that always match; ACCEPT or DROP) is put in a hash map instead: the packet's values are
the key, the value the first rule of the run with that key (its counter slot and verdict).
Earlier rules win, as in a scan, because the map is filled in rule order and a key is never
overwritten. A run's first SCANNED_FIRST rules stay a scan in front of the lookup: traffic they
decide (a chain's first rules decide most of it) costs a few ns instead of the lookup's 30.

What an extension match pins is its emitter's to say (`Emitter.pins`, codegen.tc.matches); the
IP header part (addresses, protocol) is decided here. The lookup answers for packets whose
transport header the rules could read. Everything else (later fragments, truncated transport
headers: cases where netfilter's tcp and udp matches refuse or hotdrop) takes the run's ordinary
code, which stays right behind the lookup.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R10, JmpOp, Size
from codegen.rules.model import Accept, Address, Drop, Protocol, Rule

from .layout import FACTS, Facts, map_and_key
from .matches import TRANSPORT_HEADERS, emitter_of

MIN_RUN = 128  # measured: a lookup costs about what scanning 50 to 150 rules does
# The first rules of a run are scanned before its lookup, which costs about 30 ns: a chain's
# first rules are where most of its traffic is decided (the order is the writer's), and a
# match among them then costs a few ns; a packet that goes on to the lookup pays the scan.
SCANNED_FIRST = 8
EXACT_MAP = "exact_rules"
KEY = struct.Struct("<IIIHHB3x")  # run, saddr, daddr, sport, dport, protocol (host order)
VALUE = struct.Struct("<II")  # counter slot, verdict (ACCEPT 1, DROP 2)
ACCEPT, DROP = 1, 2
TRANSPORT_PROTOCOLS = frozenset(header.protocol for header in TRANSPORT_HEADERS)


@dataclass(frozen=True)
class Shape:
    """Which packet fields a rule pins; rules of one run share it."""

    source: bool
    destination: bool
    protocol: bool
    transport: bool  # has a match whose pins read a transport header (its guard applies)
    source_port: bool
    destination_port: bool


@dataclass(frozen=True)
class Pinned:
    shape: Shape
    values: tuple[int, int, int, int, int]  # saddr, daddr, sport, dport, protocol


def pinned(rule: Rule) -> Pinned | None:
    """The rule's shape and values if it can join a run, else None."""
    if not isinstance(rule.target, Accept | Drop):
        return None
    values = {"saddr": 0, "daddr": 0, "sport": 0, "dport": 0, "protocol": 0}
    seen: set[str] = set()
    transport = False
    for match in rule.matches:
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
        else:
            emitter = emitter_of(match)
            pins = None if emitter is None else emitter.pins(match)
            if emitter is None or pins is None:
                return None
            if emitter.transport is not None:
                if transport:
                    return None
                transport = True
            for key, port in (("sport", pins.source_port), ("dport", pins.destination_port)):
                if port is not None:
                    values[key] = port
                    seen.add(key)
    if transport and values["protocol"] not in TRANSPORT_PROTOCOLS:
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
    """Maximal runs of at least MIN_RUN consecutive rules of one shape, each but its first
    SCANNED_FIRST rules (first and last index, 0-based, inclusive): those are scanned before
    the lookup."""
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
                found.append((start + SCANNED_FIRST, end - 1, first.shape))
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


def lookup(
    shape: Shape,
    run_id: int,
    key: int,
    *,
    scan: str,
    after: str,
    new_label: Callable[[str], str],
) -> list[Item]:
    """The run's lookup, its key built on the stack at `key` (KEY.size bytes, and 8 below for
    the verdict): a packet it cannot answer for goes to `scan`; no entry, to `after` (no rule
    of the run matches); an entry is recorded as the deciding slot (the verdict's tail counts
    it), and leaves the verdict (ACCEPT or DROP) in r1."""
    start = new_label("lookup")
    code: list[Item] = []
    if shape.transport:
        code += _transport_guard(start, scan=scan, after=after, new_label=new_label)
    code += [Label(start), I.st(Size.W, R10, key, run_id)]
    fields = (
        (shape.source, Facts.SADDR, 4),
        (shape.destination, Facts.DADDR, 8),
        (shape.source_port, Facts.SPORT, 12),
        (shape.destination_port, Facts.DPORT, 14),
        (shape.protocol, Facts.PROTOCOL, 16),
    )
    for present, fact, offset in fields:
        if present:
            code += [
                I.ldx(fact.size, R1, FACTS, fact.offset),
                I.stx(fact.size, R10, key + offset, R1),
            ]
        else:
            code.append(I.st(fact.size, R10, key + offset, 0))
    return [
        *code,
        I.st(Size.B, R10, key + 17, 0),
        I.st(Size.H, R10, key + 18, 0),
        *map_and_key(EXACT_MAP, key),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, after),
        I.ldx(Size.W, R1, R0, 0),
        I.stx(Size.W, FACTS, Facts.DECIDED.offset, R1),
        I.ldx(Size.W, R1, R0, 4),
    ]


def _transport_guard(
    lookup: str, *, scan: str, after: str, new_label: Callable[[str], str]
) -> list[Item]:
    """Later fragments and short headers go to the scan, where the matches' own rules apply;
    a protocol none of the transport headers belongs to cannot match any rule of the run."""
    *others, last = TRANSPORT_HEADERS
    labels = [new_label(f"{header.name}_header") for header in others]

    def long_enough(size: int) -> list[Item]:
        return [
            I.ldx(Size.H, R1, FACTS, Facts.L4_LEN.offset),
            I.jmp32(JmpOp.JLT, R1, size, scan),
        ]

    code: list[Item] = [
        I.ldx(Size.H, R1, FACTS, Facts.FRAGMENT.offset),
        I.jmp32(JmpOp.JNE, R1, 0, scan),
        I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
        *(I.jmp32(JmpOp.JEQ, R1, h.protocol, to) for h, to in zip(others, labels, strict=True)),
        I.jmp32(JmpOp.JNE, R1, last.protocol, after),
        *long_enough(last.size),
    ]
    for header, label in zip(others, labels, strict=True):
        code += [I.ja(lookup), Label(label), *long_enough(header.size)]
    return code
