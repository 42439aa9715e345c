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

from codegen.bpf.info import program_info
from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import close
from codegen.rules import parse
from codegen.rules.extensions.tcp import TcpMatch
from codegen.tc import classifier
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


def _free_port(rules, draw: random.Random) -> int:
    """A port no rule of `rules` matches, with two more after it."""
    taken = sorted(
        (m.dport.first, m.dport.last) for r in rules for m in r.matches if isinstance(m, TcpMatch)
    )
    free, low = [], 1
    for first, last in taken:
        if first - low >= 3:
            free.append((low, first - 3))
        low = max(low, last + 1)
    free.append((low, 65533))
    start, end = draw.choice([part for part in free if part[0] <= part[1]])
    return draw.randint(start, end)


def _program_id(namespace: str) -> int:
    fd = get_pinned(str(lifecycle.PIN_ROOT / namespace / "prog_ingress"))
    try:
        return program_info(fd).id
    finally:
        close(fd)


def _compare(ours, twin, namespace: str, ports: list[int], label: str) -> set:
    """Send a SYN to each port through both labs; the rules (and policies) that decided."""
    _netfilter_counters(twin)
    _, reading = _our_counters(namespace, {})
    decided = set()
    for port in ports:
        header = IP(src=str(ROUTER_CLIENT), dst=str(ROUTER_CLIENT_SIDE))
        packet = header / TCP(sport=40000, dport=port, flags="S")
        frame = ours.frame("client", "router", Ether() / packet, fresh_id=False)
        ours_arrived = _fate(ours, "client", "router", frame)
        twin_arrived = _fate(twin, "client", "router", frame)
        moved, reading = _our_counters(namespace, reading)
        kernel = _netfilter_counters(twin)
        where = f"port {port} ({label})"
        assert ours_arrived == twin_arrived, f"netfilter and ours disagree: {where}"
        assert moved == kernel, f"counters: ours {moved}, netfilter {kernel}: {where}"
        decided |= set(kernel)
    return decided


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_port_range_list_does_what_netfilter_does(labs, backend: str) -> None:  # noqa: F811
    ours, twin = labs
    text = shapes.rules("ranges", SHAPE_RULES)
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, "ranges.rules", namespace, backend=backend)  # type: ignore[arg-type]
    twin.load_filter_table(text)
    try:
        decided = _compare(ours, twin, namespace, _ports(text), backend)
    finally:
        lifecycle.flush(namespace)
    # Range ends decide by many rules, and the ports past them often by the policy.
    assert len(decided) > SAMPLED_RULES // 2 and ("INPUT", "policy") in decided


def test_rules_replaced_in_the_maps_do_what_netfilter_does(labs) -> None:  # noqa: F811
    # A re-apply that changes a few rules of the port-range list patches the trees in place
    # (harness.deploy.patch): the programs stay, the changed rules decide as netfilter's new
    # table does, their counters start at zero and every other rule keeps its own.
    ours, twin = labs
    text = shapes.rules("ranges", SHAPE_RULES)
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, "ranges.rules", namespace)
    twin.load_filter_table(text)
    lines = text.splitlines()
    at = [number for number, line in enumerate(lines) if line.startswith("-A INPUT")]
    draw = random.Random("patched-ranges")
    changed = sorted(draw.sample(at[classifier.SCANNED_FIRST :], 6))
    try:
        _compare(ours, twin, namespace, _ports(text)[:40], "before")  # counts on many rules
        before, _ = lifecycle.current(namespace)
        program = _program_id(namespace)
        for number in changed:  # each new rule the first to match a port no rule before it has
            first = _free_port(before.chains["INPUT"].rules[: at.index(number)], draw)
            lines[number] = f"-A INPUT -p tcp -m tcp --dport {first}:{first + 2} -j DROP"
        changed_text = "\n".join(lines) + "\n"
        applied = lifecycle.apply(changed_text, "ranges.rules", namespace)
        assert applied.patched == len(changed), applied.patched
        assert _program_id(namespace) == program
        after, _ = lifecycle.current(namespace)
        rules = after.chains["INPUT"].rules
        old_rules = before.chains["INPUT"].rules
        indexes = {at.index(number) for number in changed}
        for index, rule in enumerate(rules):
            old = old_rules[index]
            expected = (0, 0) if index in indexes else (old.packets, old.bytes)
            assert (rule.packets, rule.bytes) == expected, f"rule {index + 1}"
        twin.load_filter_table(changed_text)
        ports = _ports(changed_text)
        for index in sorted(indexes):
            (match,) = [m for m in rules[index].matches if isinstance(m, TcpMatch)]
            first, last = match.dport.first, match.dport.last
            ports += [first - 1, first, last, last + 1]
        decided = _compare(ours, twin, namespace, ports, "patched")
    finally:
        lifecycle.flush(namespace)
    assert {("INPUT", index + 1) for index in indexes} <= decided
