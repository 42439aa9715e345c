"""A large rule set of a real shape, attached, against netfilter on real traffic: the benchmark's
port-range list (harness/bench/shapes.py: `-p tcp --dport A:B -j DROP`, policy ACCEPT) of
SHAPE_RULES rules applied with `lifecycle.apply` in one router lab (each backend: the
bytecode's classifier, the C's rule table) and loaded into iptables-legacy in its twin, then
TCP segments from the client to the router (INPUT) at the ends of sampled rules' ranges and
one port past each. Fate and moved counters must be the same in both labs.

The other shapes' rules name sources outside the lab's addresses (the benchmark keeps
198.18.0.0/15 for its own packets), which a real packet from a lab node cannot carry past the
router's martian checks in netfilter while TC ingress would see it: they are judged under
test-run instead (tests/kernel/test_shape_differential.py).
"""

from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from codegen.rules import parse
from codegen.rules.extensions.tcp import TcpMatch
from harness.bench import shapes
from harness.deploy import lifecycle
from harness.lab.twin import ROUTER_CLIENT, ROUTER_CLIENT_SIDE
from tests.net.test_attached_vs_netfilter import (
    _fate,
    _netfilter_counters,
    _our_counters,
    labs,  # noqa: F401 (the fixture)
)

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

SHAPE_RULES = 3000
SAMPLED_RULES = 30  # besides the first and the last
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]


def _ports(text: str) -> list[int]:
    """Each end of sampled rules' ranges and one past it, in a fixed order."""
    rules = parse(text, "ranges.rules").chains["INPUT"].rules
    draw = random.Random(f"shape-vs-netfilter:{len(rules)}")
    sampled = [0, len(rules) - 1, *draw.sample(range(len(rules)), SAMPLED_RULES)]
    ports: list[int] = []
    for index in sampled:
        (match,) = [m for m in rules[index].matches if isinstance(m, TcpMatch)]
        first, last = match.dport.first, match.dport.last
        ports += [max(first - 1, 1), first, last, min(last + 1, 0xFFFF)]
    return ports


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_port_range_list_does_what_netfilter_does(labs, backend: str) -> None:  # noqa: F811
    ours, twin = labs
    text = shapes.rules("ranges", SHAPE_RULES)
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, "ranges.rules", namespace, backend=backend)  # type: ignore[arg-type]
    twin.load_filter_table(text)
    _netfilter_counters(twin)
    _, reading = _our_counters(namespace, {})
    decided = set()
    try:
        for port in _ports(text):
            header = IP(src=str(ROUTER_CLIENT), dst=str(ROUTER_CLIENT_SIDE))
            packet = header / TCP(sport=40000, dport=port, flags="S")
            frame = ours.frame("client", "router", Ether() / packet, fresh_id=False)
            ours_arrived = _fate(ours, "client", "router", frame)
            twin_arrived = _fate(twin, "client", "router", frame)
            moved, reading = _our_counters(namespace, reading)
            kernel = _netfilter_counters(twin)
            where = f"port {port} ({backend})"
            assert ours_arrived == twin_arrived, f"netfilter and ours disagree: {where}"
            assert moved == kernel, f"counters: ours {moved}, netfilter {kernel}: {where}"
            decided |= set(kernel)
    finally:
        lifecycle.flush(namespace)
    # Range ends decide by many rules, and the ports past them often by the policy.
    assert len(decided) > SAMPLED_RULES // 2 and ("INPUT", "policy") in decided
