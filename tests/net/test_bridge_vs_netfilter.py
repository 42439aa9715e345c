"""Bridged traffic against netfilter with br_netfilter: the bridge lab (netns.bridge) in two
copies, one running our programs, its twin the same filter table in iptables-legacy with
`bridge-nf-call-iptables` on. Datagrams from real UDP sockets cross it every way: bridged
from port to port (FORWARD with the bridge as both devices and the two ports as physdev's), to
the bridge host from a port (INPUT with the in-port), routed from a port to the server and
back (FORWARD, the in-port known one way only), from the host itself (OUTPUT by the bridge),
and a subnet broadcast that the bridge floods to the other port and delivers to the host.
Each must arrive in both labs or in neither, move the same counters by the same packets and
bytes, and the reference evaluator, told the ports, must agree with netfilter on both."""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from scapy.layers.inet import IP, UDP

from codegen.rules import evaluate, parse
from harness.deploy import lifecycle
from harness.lab.observation import moved_counters
from harness.lab.traffic import restore
from harness.lab.twin import quiet_host
from netns.bridge import BRIDGE, CLIENTS, SERVER, UPLINK, BridgeTopology
from tests.bridge_strategies import bridge_rulesets

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

if not Path("/proc/sys/net/bridge").exists():
    pytest.skip("this kernel has no br_netfilter", allow_module_level=True)

WAIT = 0.3  # seconds a datagram may take; what has not come by then was dropped
PAYLOAD = b"bridged?"
PORTS = itertools.count(20000)


@dataclass(frozen=True)
class Judged:
    """One pass through a chain that a datagram's fate depends on, as netfilter makes it."""

    chain: str
    in_iface: str | None
    out_iface: str | None
    bridge_ports: tuple[str, str | None] | None
    pkt_type: str = "host"


@dataclass(frozen=True)
class Flow:
    """A datagram from node `source` to `destination` (an address), received by `receivers`;
    `judged`: the chains it goes through on the bridge host, one per receiver."""

    name: str
    source: str
    destination: IPv4Address
    receivers: tuple[str, ...]
    judged: tuple[Judged, ...]


BROADCAST = IPv4Address("198.18.4.255")
FLOWS = (
    Flow(
        "client1->client2",
        "client1",
        CLIENTS[1].ip,
        ("client2",),
        (Judged("FORWARD", "br0", "br0", ("port1", "port2")),),
    ),
    Flow(
        "client2->client1",
        "client2",
        CLIENTS[0].ip,
        ("client1",),
        (Judged("FORWARD", "br0", "br0", ("port2", "port1")),),
    ),
    Flow(
        "client1->host",
        "client1",
        BRIDGE.ip,
        ("host",),
        (Judged("INPUT", "br0", None, ("port1", None)),),
    ),
    Flow(
        "client2->host",
        "client2",
        BRIDGE.ip,
        ("host",),
        (Judged("INPUT", "br0", None, ("port2", None)),),
    ),
    Flow(
        "client1->server",
        "client1",
        SERVER.ip,
        ("server",),
        (Judged("FORWARD", "br0", "eth1", ("port1", None)),),
    ),
    Flow(
        "server->client2",
        "server",
        CLIENTS[1].ip,
        ("client2",),
        (Judged("FORWARD", "eth1", "br0", None),),
    ),
    Flow("server->host", "server", UPLINK.ip, ("host",), (Judged("INPUT", "eth1", None, None),)),
    Flow(
        "host->client1", "host", CLIENTS[0].ip, ("client1",), (Judged("OUTPUT", None, "br0", None),)
    ),
    Flow(
        "client1->broadcast",
        "client1",
        BROADCAST,
        ("client2", "host"),
        (
            Judged("FORWARD", "br0", "br0", ("port1", "port2"), "broadcast"),
            Judged("INPUT", "br0", None, ("port1", None), "broadcast"),
        ),
    ),
)


def _namespace(lab: BridgeTopology, node: str):
    return {
        "client1": lab.clients[0].namespace,
        "client2": lab.clients[1].namespace,
        "host": lab.host,
        "server": lab.server.namespace,
    }[node]


def _source_address(node: str) -> IPv4Address:
    return {"client1": CLIENTS[0].ip, "client2": CLIENTS[1].ip, "server": SERVER.ip}.get(
        node, BRIDGE.ip
    )


def _send(lab: BridgeTopology, flows: list[tuple[Flow, int]]) -> set[tuple[str, str]]:
    """Send each flow's datagram (to its own port) and return the (flow, receiver) pairs that
    arrived within WAIT."""
    with ExitStack() as stack:
        receivers = {}
        for flow, port in flows:
            for node in flow.receivers:
                sock = stack.enter_context(closing(_namespace(lab, node).socket(2, 2)))
                sock.bind(("0.0.0.0", port))
                sock.setblocking(False)
                receivers[(flow.name, node)] = sock
        for flow, port in flows:
            with closing(_namespace(lab, flow.source).socket(2, 2)) as sender:
                sender.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sender.bind(("0.0.0.0", port))
                try:
                    sender.sendto(PAYLOAD, (str(flow.destination), port))
                except PermissionError:
                    pass  # netfilter's OUTPUT dropped it (the twin): not sent
        arrived: set[tuple[str, str]] = set()
        deadline = time.monotonic() + WAIT
        while len(arrived) < len(receivers) and time.monotonic() < deadline:
            for key, sock in receivers.items():
                try:
                    if sock.recv(64) == PAYLOAD:
                        arrived.add(key)
                except BlockingIOError:
                    pass
            time.sleep(0.01)
        return arrived


def _reference(text: str, flows: list[tuple[Flow, int]]):
    """The evaluator's arrivals and counters for the flows."""
    ruleset = parse(text, "<drawn>")
    arrived: set[tuple[str, str]] = set()
    counters: dict = {}
    for flow, port in flows:
        packet = bytes(
            IP(src=str(_source_address(flow.source)), dst=str(flow.destination), ttl=64)
            / UDP(sport=port, dport=port)
            / PAYLOAD
        )
        for judged, receiver in zip(flow.judged, flow.receivers, strict=True):
            result = evaluate(
                ruleset,
                packet,
                judged.chain,
                judged.in_iface,
                judged.out_iface,
                pkt_type=judged.pkt_type,
                bridge_ports=judged.bridge_ports,
            )
            if result.verdict == "ACCEPT":
                arrived.add((flow.name, receiver))
            for position, (packets, octets) in result.counters.items():
                old = counters.get(position, (0, 0))
                counters[position] = (old[0] + packets, old[1] + octets)
    return arrived, counters


def _twin_counters(twin: BridgeTopology) -> dict:
    saved = twin.host.run(["iptables-legacy-save", "-c", "-t", "filter"]).stdout
    return moved_counters(parse(saved, "<iptables-legacy-save>"))


def _our_counters(namespace: str) -> dict:
    _, now = lifecycle.current(namespace)
    return {position: value for position, value in now.items() if position[0] and value[0]}


@pytest.fixture(scope="module")
def labs() -> Iterator[tuple[BridgeTopology, BridgeTopology]]:
    with BridgeTopology() as ours, BridgeTopology() as twin:
        quiet(ours, twin)
        yield ours, twin


def quiet(*labs: BridgeTopology) -> None:
    """No node sends what the kernel makes itself (IGMP reports): only our sockets' datagrams."""
    for lab in labs:
        for node in ("client1", "client2", "host", "server"):
            restore(_namespace(lab, node), quiet_host(os.geteuid()))


def _case(labs, backend: str, text: str, *, reference: bool = True) -> None:
    """Apply `text` in both labs, send every flow once and compare; with `reference`, the
    evaluator (told the ports br_netfilter records) too."""
    ours, twin = labs
    flows = [(flow, next(PORTS)) for flow in FLOWS]
    lifecycle.apply(text, "<drawn>", ours.host.name, backend=backend)
    restore(twin.host, text)
    try:
        got = _send(ours, flows)
        kernel = _send(twin, flows)
        where = f"({backend}) rule set:\n{text}"
        assert got == kernel, f"arrived: ours {sorted(got)}, netfilter {sorted(kernel)} {where}"
        counters = _our_counters(ours.host.name)
        kernel_counters = _twin_counters(twin)
        assert counters == kernel_counters, (
            f"counters: ours {counters}, netfilter {kernel_counters} {where}"
        )
        if not reference:
            return
        expected, reference_counters = _reference(text, flows)
        assert expected == kernel, f"the evaluator: {sorted(expected)} {where}"
        assert reference_counters == kernel_counters, (
            f"the evaluator's counters: {reference_counters} {where}"
        )
    finally:
        lifecycle.flush(ours.host.name)


FIXED = [
    # Every physdev option on every kind of packet, counted, nothing dropped.
    """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m physdev --physdev-in port1
-A INPUT -m physdev --physdev-is-in
-A INPUT -m physdev ! --physdev-is-in
-A INPUT -m physdev --physdev-is-bridged
-A INPUT -m physdev ! --physdev-in port+
-A FORWARD -m physdev --physdev-is-bridged
-A FORWARD -m physdev ! --physdev-is-bridged
-A FORWARD -m physdev --physdev-in port1 --physdev-out port2
-A FORWARD -m physdev --physdev-out port1
-A FORWARD -m physdev --physdev-is-out
-A FORWARD -m physdev ! --physdev-is-out --physdev-is-in
-A FORWARD -m physdev ! --physdev-out port2
-A FORWARD -i br0 -o br0
-A FORWARD -i br0 -o eth1 -m physdev --physdev-in port1
-A OUTPUT -m physdev ! --physdev-is-in
-A OUTPUT -o port1
-A OUTPUT -o br0
COMMIT
""",
    # k3s and Docker's shapes: bridged packets accepted by a rule of their own, the rest by
    # the devices they are routed through.
    """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i eth1 -j ACCEPT
-A INPUT -m physdev --physdev-in port2 -j ACCEPT
-A FORWARD -m physdev --physdev-is-bridged --physdev-in port1 -j ACCEPT
-A FORWARD -i br0 ! -o br0 -j ACCEPT
-A FORWARD -o br0 -m physdev ! --physdev-is-in -j ACCEPT
COMMIT
""",
]


@pytest.mark.parametrize("text", FIXED, ids=["every-option", "k3s-docker"])
def test_fixed_rule_sets_on_a_bridge(labs, text) -> None:
    _case(labs, "bytecode", text)


@pytest.mark.bcc
@pytest.mark.parametrize("text", FIXED, ids=["every-option", "k3s-docker"])
def test_fixed_rule_sets_on_a_bridge_in_c(labs, text) -> None:
    _case(labs, "c", text)


STATEFUL = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -o br0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -i br0 ! -o br0 -j ACCEPT
-A FORWARD -i br0 -o br0 -m physdev --physdev-in port1 -j ACCEPT
COMMIT
"""


@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_connections_across_a_bridge(labs, backend) -> None:
    """Docker's FORWARD: a bridged or routed connection's replies come back as ESTABLISHED;
    a new flow the other way is dropped. One datagram at a time, in order."""
    ours, twin = labs
    by_name = {flow.name: flow for flow in FLOWS}
    bridged, routed = next(PORTS), next(PORTS)
    steps = [
        ("client1->client2", bridged),  # NEW from port1: accepted
        ("client2->client1", bridged),  # its reply: ESTABLISHED
        ("client2->client1", next(PORTS)),  # NEW from port2: dropped
        ("client1->server", routed),  # routed out: accepted
        ("server->client2", next(PORTS)),  # NEW towards the bridge: dropped
    ]
    lifecycle.apply(STATEFUL, "<stateful>", ours.host.name, backend=backend)
    restore(twin.host, STATEFUL)
    try:
        fates = []
        for name, port in steps:
            flow = by_name[name]
            got = _send(ours, [(flow, port)])
            kernel = _send(twin, [(flow, port)])
            assert got == kernel, f"{name} port {port} ({backend}): ours {got}, netfilter {kernel}"
            fates.append(bool(kernel))
        assert fates == [True, True, False, True, False]
        assert _our_counters(ours.host.name) == _twin_counters(twin)
    finally:
        lifecycle.flush(ours.host.name)
        for lab in labs:
            lab.host.run(["conntrack", "-F"], check=False)


TWIN_SETTINGS = {
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "deadline": None,
}


@settings(max_examples=max(20, settings().max_examples // 5), **TWIN_SETTINGS)
@given(text=bridge_rulesets())
def test_drawn_rule_sets_on_a_bridge(labs, text) -> None:
    _case(labs, "bytecode", text)


@pytest.mark.bcc
@settings(max_examples=max(3, settings().max_examples // 30), **TWIN_SETTINGS)
@given(text=bridge_rulesets())
def test_drawn_rule_sets_on_a_bridge_in_c(labs, text) -> None:
    _case(labs, "c", text)
