"""The differential on large rule sets of the shapes people bring (harness/bench/shapes.py: deny
lists of CIDRs, mixed ACLs, port ranges, an ipset deny list): the reference evaluator, the
bytecode programs (the classifier's trees and exact runs) and the C backend's (its rule table,
scanned) under BPF_PROG_TEST_RUN, on packets aimed at rule boundaries: each sampled rule's
prefix edges (network and broadcast address, and one step outside each), its port range's ends
and one past them, its device and another. Verdict, deciding rule and every moved counter must
be equal.

SHAPE_RULES rules per shape in CI; `--hypothesis-profile=deep` runs DEEP_SHAPE_RULES, the
largest rule set the issue asks for.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import settings
from scapy.layers.inet import IP, TCP, UDP

from codegen.rules import evaluate, parse
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import Address, Interface, Protocol, Rule
from codegen.rules.sets import parse_sets
from harness.bench import shapes
from harness.runner import ChainRunner, frame_for
from tests.kernel.test_three_way import report

pytestmark = [pytest.mark.privileged, pytest.mark.bcc]

SHAPE_RULES = 3000
DEEP_SHAPE_RULES = 100_000
SAMPLED_RULES = 40  # besides the first and the last
DEVICES = shapes.INTERFACES
SEED = 20261204


def _rule_count() -> int:
    return DEEP_SHAPE_RULES if settings.default.max_examples >= 1000 else SHAPE_RULES


def _edges(match: Address | None, fallback: int) -> list[int]:
    """A prefix's first and last address and one step outside each (any mask: the lowest and
    highest address it matches); `fallback` when the rule does not compare the field."""
    if match is None:
        return [fallback] * 4
    low, high = match.address & match.mask, (match.address | ~match.mask) & 0xFFFFFFFF
    return [low, high, (low - 1) & 0xFFFFFFFF, (high + 1) & 0xFFFFFFFF]


def _ends(match: TcpMatch | UdpMatch | None, fallback: int) -> list[int]:
    if match is None or match.dport.is_default:
        return [fallback] * 4
    ports = match.dport
    return [ports.first, ports.last, max(ports.first - 1, 0), min(ports.last + 1, 0xFFFF)]


def _of(rule: Rule, kind: type, direction: str | None = None):
    for match in rule.matches:
        if isinstance(match, kind) and getattr(match, "direction", direction) == direction:
            return match
    return None


def aimed_packets(rule: Rule, draw: random.Random) -> Iterator[tuple[bytes, str]]:
    """Packets at the edges of `rule`'s fields (an edge of one field at a time, the others
    inside), each with the device it arrives on."""
    transport = _of(rule, TcpMatch) or _of(rule, UdpMatch)
    protocol = _of(rule, Protocol)
    number = protocol.number if protocol is not None and not protocol.negated else 6
    sources = _edges(_of(rule, Address, "src"), int(shapes.NONE_SOURCE))
    destinations = _edges(_of(rule, Address, "dst"), int(shapes.DESTINATION))
    ports = _ends(transport, shapes.NONE_PORT)
    device = _of(rule, Interface, "in")
    devices = [device.name if device is not None else draw.choice(DEVICES), draw.choice(DEVICES)]
    inside = (sources[0], destinations[0], ports[0])
    for field in range(3):
        for edge in range(4):
            values = list(inside)
            values[field] = (sources, destinations, ports)[field][edge]
            source, destination, port = values
            header = IP(src=str(IPv4Address(source)), dst=str(IPv4Address(destination)))
            if number == 17:
                layer = UDP(sport=40000, dport=port)
            else:
                layer = TCP(sport=40000, dport=port, flags="S")
            yield bytes(header / layer), devices[edge % 2]


def _runners(shape: str, count: int):
    text = shapes.rules(shape, count)
    listed = shapes.sets(shape, count)
    sets = parse_sets(listed, "bench.sets") if listed is not None else None
    ruleset = parse(text, f"{shape}.rules")
    return (
        ChainRunner(ruleset, DEVICES, sets=sets),
        ChainRunner(ruleset, DEVICES, backend="c", sets=sets),
    )


@pytest.mark.parametrize("shape", list(shapes.SHAPES))
def test_large_shapes_agree_three_ways(shape):
    count = _rule_count()
    draw = random.Random(f"{SEED}:{shape}:{count}")
    bytecode, c = _runners(shape, count)
    with bytecode, c:
        ruleset = bytecode.ruleset  # with its sets bound
        rules = ruleset.chains["INPUT"].rules
        drawn = draw.sample(range(len(rules)), min(SAMPLED_RULES, len(rules)))
        sampled = [0, len(rules) - 1, *drawn]
        cases = [case for index in sampled for case in aimed_packets(rules[index], draw)]
        if shape in shapes.SET_SHAPES:  # one rule: aim at the set's members instead
            cases += _member_cases(shape, count, draw)
        decided = set()
        for packet, device in cases:
            frame = frame_for(packet)
            voices = {
                "evaluator": evaluate(ruleset, packet, "INPUT", device, None),
                "bytecode": bytecode.run(frame, "INPUT", device),
                "c": c.run(frame, "INPUT", device),
            }
            problem = report(ruleset, f"chain INPUT in={device}\npacket {packet.hex()}", voices)
            if problem is not None:
                pytest.fail(problem, pytrace=False)
            decided.add(voices["evaluator"].deciding)
        # The edges are not all misses: many rules (and the policy) decided.
        wanted = 2 if shape in shapes.SET_SHAPES else 10
        assert len(decided) >= wanted, f"only {sorted(decided, key=str)} decided"


def _member_cases(shape: str, count: int, draw: random.Random) -> list[tuple[bytes, str]]:
    members = shapes._members(shape, count, shapes.SEED)
    cases = []
    for network in draw.sample(members, min(SAMPLED_RULES * 2, len(members))):
        parsed = IPv4Network(network)
        fake = Address("src", int(parsed.network_address), int(parsed.netmask))
        rule = Rule(matches=(fake,))
        cases += list(aimed_packets(rule, draw))[:4]
    return cases
