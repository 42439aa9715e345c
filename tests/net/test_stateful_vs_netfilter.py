"""Stateful rule sets on real traffic: our programs against netfilter's conntrack, flow by flow.

One router lab runs our programs, its twin the same filter table in iptables-legacy with the
kernel's conntrack (nf_conntrack_tcp_be_liberal=1 there, the setting our tracker follows). Each
example draws a rule set of conntrack and state matches (states, directions, statuses, the
connection's protocol, mixed with ports and protocols) and a short flow: several packets of one
connection, both ways, between two nodes of the lab (client and server through FORWARD, or either
of them and the router through INPUT and OUTPUT), TCP with flags and sequence numbers near the
connection's own (and now and then far from them), UDP, or ICMP echoes and errors quoting the
flow. Every packet must meet the same fate in both labs and move the same counters. Some rules
carry `-m limit` too (1/hour or 1/min, bursts of 1 to 3: no timing within a flow refills them),
whose buckets both labs keep along the flow and refill at each load, and `-m hashlimit` (one
table per rule set, 1/hour or 1/min, bursts of 1 to 3, keyed by nothing, the source, or the
source and the ports; upto or above by rule), a bucket per key of the flow's two directions.

Both tables start empty: our rule set is flushed after each example (its table goes with its
pins), the twin's filter table is emptied before each load (netfilter would keep a hashlimit
table of a name the next table has too) and its conntrack is flushed with `conntrack -F`. The
twin's counters are read without zeroing them (`iptables-legacy -Z` replaces the whole table,
which refills every limit bucket, as any table load does) and compared as what moved since the
last reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from codegen.rules import parse, write
from codegen.rules.extensions.conntrack import Conntrack
from codegen.rules.extensions.ctinfo import STATUS_NAMES, AnyOf
from codegen.rules.extensions.hashlimit import parse_rate as hashlimit_rate
from codegen.rules.extensions.hashlimit_table import HASH_DPT, HASH_SIP, HASH_SPT, Hashlimit
from codegen.rules.extensions.limit import Limit, parse_rate
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.state import State
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import Accept, Chain, Drop, Protocol, Rule, Ruleset
from codegen.rules.names import BUILTIN_CHAINS
from harness.deploy import lifecycle
from harness.lab.observation import moved_counters
from harness.lab.traffic import Lab
from tests.net.test_attached_vs_netfilter import (
    BACKENDS,
    _fate,
    _our_counters,
)

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

# (initiator, responder): the chains their packets take in the router.
PAIRS = (("client", "server"), ("server", "client"), ("client", "router"), ("router", "server"))
STATE_BITS = {"INVALID": 1, "ESTABLISHED": 2, "RELATED": 4, "NEW": 8}
TCP_FLAGS = ("S", "S", "SA", "A", "A", "PA", "FA", "R", "RA", "F", "SF", "", "SAF")
PORTS = {"initiator": 40000, "responder": 80}


@dataclass(frozen=True)
class Step:
    forward: bool  # from the initiator (the connection's original direction) or back
    packet: Packet  # above IP


@st.composite
def conntrack_matches(draw: st.DrawFn, protocol: int) -> Conntrack | State:
    states = draw(st.integers(1, 15))
    negated = draw(st.booleans()) and draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        return State(states, negated)
    options: dict = {"state": AnyOf(states, negated)}
    if draw(st.booleans()):
        options["direction"] = draw(st.sampled_from(("ORIGINAL", "REPLY")))
    if draw(st.integers(0, 3)) == 0:
        bits = draw(st.sampled_from([bit for _, bit in STATUS_NAMES if bit]))
        options["status"] = AnyOf(bits, draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        options["protocol"] = Protocol(protocol, negated=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0 and protocol != 1:
        port = PORTS[draw(st.sampled_from(("initiator", "responder")))]
        options["origdst_port"] = PortRange(port, port, draw(st.booleans()))
    if len(options) > 1 and draw(st.integers(0, 5)) == 0:
        options["state"] = None  # no --ctstate: an entry-less packet never matches
    return Conntrack(**options)


@st.composite
def hashlimits(draw: st.DrawFn) -> Hashlimit:
    """The rule set's one hashlimit table: rates no timing within a flow refills."""
    rate = hashlimit_rate(draw(st.sampled_from(("1/hour", "1/min"))))
    assert isinstance(rate, tuple)
    avg, unit = rate
    mode = draw(st.sampled_from((0, HASH_SIP, HASH_SIP | HASH_SPT | HASH_DPT, HASH_DPT)))
    burst = draw(st.integers(1, 3))
    return Hashlimit("drawn", avg, burst, mode=mode, expire=unit * 1000)


@st.composite
def stateful_rulesets(draw: st.DrawFn, protocol: int) -> Ruleset:
    table = draw(hashlimits())
    chains = {}
    for name in BUILTIN_CHAINS:
        rules = []
        for _ in range(draw(st.integers(0, 4))):
            matches: list = []
            if draw(st.integers(0, 3)) > 0:
                matches.append(draw(conntrack_matches(protocol)))
            if draw(st.integers(0, 3)) == 0 and protocol in (6, 17):
                matches.insert(0, Protocol(protocol))
                port = PortRange(PORTS["responder"], PORTS["responder"], draw(st.booleans()))
                matches.append(TcpMatch(dport=port) if protocol == 6 else UdpMatch(dport=port))
            if draw(st.integers(0, 3)) == 0:
                rate = parse_rate(draw(st.sampled_from(("1/hour", "1/min"))))
                assert isinstance(rate, int)
                limit = Limit(rate, draw(st.integers(1, 3)))
                matches.insert(draw(st.integers(0, len(matches))), limit)
            if draw(st.integers(0, 3)) == 0:
                hashlimit = replace(table, above=draw(st.booleans()))
                matches.insert(draw(st.integers(0, len(matches))), hashlimit)
            target = Accept() if draw(st.booleans()) else Drop()
            rules.append(Rule(matches=tuple(matches), target=target))
        policy = "ACCEPT" if draw(st.integers(0, 2)) else "DROP"
        chains[name] = Chain(name, policy=policy, rules=rules)
    return Ruleset(chains=chains)


@st.composite
def flows(draw: st.DrawFn, protocol: int) -> list[Step]:
    """A connection's packets, near what its two ends would send."""
    steps = []
    seq = {True: draw(st.sampled_from((1000, 0xFFFFFF00))), False: 5000}
    for _ in range(draw(st.integers(2, 6))):
        forward = draw(st.integers(0, 2)) > 0 if not steps else draw(st.booleans())
        ports = (PORTS["initiator"], PORTS["responder"])
        sport, dport = ports if forward else ports[::-1]
        if protocol == 6:
            flags = draw(st.sampled_from(TCP_FLAGS))
            data = draw(st.sampled_from((b"", b"", b"data")))
            own = seq[forward] if draw(st.integers(0, 5)) else draw(st.integers(0, 0xFFFFFFFF))
            ack = seq[not forward]
            packet = TCP(sport=sport, dport=dport, flags=flags, seq=own, ack=ack, window=8192)
            if data:
                packet = packet / Raw(data)
            seq[forward] = (own + len(data) + ("S" in flags) + ("F" in flags)) & 0xFFFFFFFF
        elif protocol == 17:
            packet = UDP(sport=sport, dport=dport) / Raw(b"q")
        else:
            kind = draw(st.sampled_from(("echo", "echo", "reply", "error")))
            if kind == "error":
                # An error about the flow's own echo, as the other end's stack would send.
                quoted = bytes(IP(proto=1) / ICMP(type=8, id=7))[:28]
                packet = ICMP(type=3, code=draw(st.sampled_from((1, 3, 13)))) / Raw(quoted)
            else:
                packet = ICMP(type=8 if kind == "echo" else 0, id=7, seq=len(steps))
        steps.append(Step(forward, packet))
    return steps


@st.composite
def cases(draw: st.DrawFn):
    protocol = draw(st.sampled_from((6, 6, 6, 17, 17, 1)))
    pair = draw(st.sampled_from(PAIRS))
    return draw(stateful_rulesets(protocol)), pair, draw(flows(protocol))


@pytest.fixture(scope="module")
def labs() -> Iterator[tuple[Lab, Lab]]:
    with Lab("router") as ours, Lab("router") as twin:
        twin.holder_namespace.sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", 1)
        yield ours, twin


def _quoting(lab: Lab, step: Step, source: str, destination: str) -> Packet:
    """An ICMP error's quoted echo carries the addresses of the echo it answers."""
    if not isinstance(step.packet, ICMP) or step.packet.type != 3:
        return step.packet
    inner = lab.node(destination, source), lab.node(source, destination)
    quoted = IP(src=inner[0].ipv4, dst=inner[1].ipv4, proto=1) / ICMP(type=8, id=7)
    return ICMP(type=3, code=step.packet.code) / Raw(bytes(quoted)[:28])


def _netfilter_moved(twin: Lab, before: dict) -> tuple[dict, dict]:
    """The twin's filter counters that moved since `before`, and the new reading, read with
    iptables-legacy-save alone: zeroing them would load the table anew."""
    saved = twin.holder_namespace.run(["iptables-legacy-save", "-c", "-t", "filter"]).stdout
    now = moved_counters(parse(saved, "<iptables-legacy-save>"))
    moved = {}
    for position, (count, octets) in now.items():
        old = before.get(position, (0, 0))
        if (count, octets) != old:
            moved[position] = (count - old[0], octets - old[1])
    return moved, now


# Every dropped packet costs the lab's timeout in each lab: a sixth of the profile (16 in CI).
EXAMPLES = max(16, settings().max_examples // 6)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=EXAMPLES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    deadline=None,
)
@given(case=cases())
def test_stateful_programs_do_what_netfilter_does(labs, backend, case) -> None:
    ours, twin = labs
    ruleset, (initiator, responder), steps = case
    text = write(ruleset)
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, "<drawn>", namespace, backend=backend)
    twin.load_filter_table("*filter\nCOMMIT\n")  # no hashlimit table lives on into this one
    twin.load_filter_table(text)
    twin.holder_namespace.run(["conntrack", "-F"], check=False)
    _, kernel_reading = _netfilter_moved(twin, {})
    _, reading = _our_counters(namespace, {})
    try:
        for number, step in enumerate(steps, 1):
            source, destination = (initiator, responder) if step.forward else (responder, initiator)
            packet = _quoting(ours, step, source, destination)
            frame = ours.frame(source, destination, Ether() / IP() / packet)
            ours_arrived = _fate(ours, source, destination, frame)
            twin_arrived = _fate(twin, source, destination, frame)
            moved, reading = _our_counters(namespace, reading)
            kernel, kernel_reading = _netfilter_moved(twin, kernel_reading)
            flow = "\n".join(
                f"  {'>' if s.forward else '<'} {s.packet.summary()}" for s in steps[:number]
            )
            where = f"packet {number} {source}->{destination} ({backend})\n{text}flow:\n{flow}"
            assert ours_arrived == twin_arrived, (
                f"netfilter {'passed' if twin_arrived else 'dropped'} it, ours "
                f"{'passed' if ours_arrived else 'dropped'} it: {where}"
            )
            assert moved == kernel, f"counters: ours {moved}, netfilter {kernel}: {where}"
    finally:
        lifecycle.flush(namespace)
