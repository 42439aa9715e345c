"""The ingress program's local addresses, compared inline (codegen.tc.local): for sets of every
size the search has (none, a short run, several levels of it, as many as a busy namespace has),
each backend's ingress program sends exactly the set's destinations through INPUT, the joined
groups among multicast destinations, and treats a packet from one of the namespace's own
addresses as a martian. The neighbours of every address (one above, one below) are probed too:
they are what an off-by-one in the search's bounds would take in."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, UDP

from codegen.bpf.testrun import SkBuff, prog_test_run
from codegen.rules import parse
from codegen.tc.layout import NOT_HANDLED, CounterLayout, Local
from codegen.tc.local import LINEAR
from harness.backends import BACKENDS, load_program
from harness.counters import CounterMap
from harness.runner import frame_for, standin_interfaces
from netns import Namespace

pytestmark = pytest.mark.privileged

RULES = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
"""
STRANGER = int(IPv4Address("198.19.255.254"))  # never in a drawn set: the probes' source
SIZES = (0, 1, LINEAR, LINEAR + 1, 37, 600)


def _local(size: int, seed: int) -> dict[int, int]:
    """`size` addresses of every kind: unicast ones from 198.18.0.0/16, adjacent runs among
    them, groups from 224.0.0.0/4, the limited broadcast sometimes."""
    rng = random.Random(seed)
    found: dict[int, int] = {}
    base = int(IPv4Address("198.18.0.0"))
    while len(found) < size:
        pick = rng.random()
        if pick < 0.2:
            found[int(IPv4Address("224.0.0.0")) + rng.randrange(1 << 28)] = Local.GROUP
        elif pick < 0.25:
            found[0xFFFFFFFF] = Local.BROADCAST
        else:
            address = base + rng.randrange(1 << 16)
            for step in range(rng.choice((1, 1, 3))):  # runs of neighbours
                kind = rng.choice((Local.ADDRESS, Local.ADDRESS, Local.BROADCAST))
                found[(address + step) & 0xFFFFFFFF] = kind
    return dict(list(found.items())[:size])


def _expected(local: dict[int, int], source: int, destination: int) -> str:
    if local.get(source) == Local.ADDRESS:  # a martian: one of our addresses as the source
        return "not handled"
    if destination >> 28 == 0xE:
        return "input" if local.get(destination) == Local.GROUP else "not handled"
    return "input" if destination in local else "not handled"


def _probes(local: dict[int, int]) -> list[tuple[int, int]]:
    """(source, destination) pairs: each address and its neighbours as destinations, each
    address as a source to a local destination."""
    destinations = {STRANGER - 1}
    for address in local:
        destinations |= {address, (address + 1) & 0xFFFFFFFF, (address - 1) & 0xFFFFFFFF}
    destinations.discard(0)
    pairs = [(STRANGER, destination) for destination in sorted(destinations)]
    target = next(iter(sorted(local)), STRANGER - 1)
    pairs += [(address, target) for address in sorted(local) if address >> 28 != 0xE]
    # Sources the martian checks refuse anyway are not what this test is about.
    return [(s, d) for s, d in pairs if s != 0xFFFFFFFF and s >> 24 not in (0, 127)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SIZES)
def test_ingress_sends_exactly_the_local_destinations_through_input(backend, size):
    if backend == "c":
        pytest.importorskip("bcc", reason="the C backend needs bcc (scripts/bootstrap)")
    local = _local(size, seed=size)
    ruleset = parse(RULES, "local.rules")
    layout = CounterLayout.of(ruleset)
    probes = _probes(local)
    with Namespace() as namespace, CounterMap(layout) as counters:
        program = load_program(
            ruleset,
            "ingress",
            interfaces=standin_interfaces(ruleset),
            maps={"counters": counters},
            backend=backend,
            local=local,
        )
        try:
            with namespace.enter():  # bpf_fib_lookup in a namespace with no routes
                wrong = []
                for source, destination in probes:
                    packet = IP(src=str(IPv4Address(source)), dst=str(IPv4Address(destination)))
                    before = counters.read()
                    prog_test_run(
                        program.fd, frame_for(bytes(packet / UDP(dport=9))), context=SkBuff()
                    )
                    after = counters.read()
                    moved = {p for p, v in after.items() if v != before.get(p)}
                    got = (
                        "input" if ("INPUT", 1) in moved
                        else "not handled" if NOT_HANDLED in moved
                        else f"moved {sorted(map(str, moved))}"
                    )  # fmt: skip
                    if got != _expected(local, source, destination):
                        wrong.append(f"{IPv4Address(source)} -> {IPv4Address(destination)}: {got}")
        finally:
            program.close()
    assert not wrong, f"{len(wrong)} of {len(probes)} probes wrong ({backend}): {wrong[:5]}"
