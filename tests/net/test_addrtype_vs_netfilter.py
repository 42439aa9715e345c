"""`-m addrtype` against the kernel: a host whose routes hold a second device, a range
delivered locally, and blackhole, unreachable, prohibit and throw prefixes. The same frames go
to it filtered by iptables-legacy, and by our attached programs (lifecycle apply, each
backend), and each time every rule's counters are what the reference evaluator says, given the
routes read from the host's namespace (harness.deploy.routes).

Kernel facts this pins down: an address under a blackhole, unreachable, prohibit or throw
route is UNICAST (the kernel's lookup fails, and inet_dev_addr_type then answers UNICAST);
MAIN's routes answer (no policy rules: LOCAL shares MAIN's trie); a local address of another
device, or the subnet broadcast of another device, is UNICAST with --limit-iface-in.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from codegen.rules import evaluate, parse
from codegen.rules.routes import RTN
from harness.deploy.lifecycle import apply, current, flush
from harness.deploy.routes import namespace_routes
from harness.lab.waiting import until
from netns import HostTopology
from tests.net.test_ipt_blob import counters, restore, save

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --sport 40000 -m addrtype --dst-type LOCAL
-A INPUT -p udp -m udp --sport 40000 -m addrtype --dst-type LOCAL --limit-iface-in
-A INPUT -p udp -m udp --sport 40000 -m addrtype --dst-type BROADCAST
-A INPUT -p udp -m udp --sport 40000 -m addrtype --dst-type BROADCAST --limit-iface-in
-A INPUT -p udp -m udp --sport 40000 -m addrtype --dst-type MULTICAST
-A INPUT -p udp -m udp --sport 40000 -m addrtype --src-type UNICAST
-A INPUT -p udp -m udp --sport 40000 -m addrtype --src-type BLACKHOLE,UNREACHABLE,PROHIBIT,THROW
-A INPUT -p udp -m udp --sport 40000 -m addrtype ! --src-type UNICAST
-A INPUT -p udp -m udp --sport 40000 -m addrtype --src-type BROADCAST --dst-type BROADCAST
-A INPUT -p udp -m udp --sport 40000 -m addrtype ! --dst-type LOCAL --limit-iface-in
-A INPUT -p udp -m udp --sport 40000 -m addrtype --src-type UNICAST --dst-type LOCAL \
--limit-iface-in -j ACCEPT
-A FORWARD -p udp -m addrtype --dst-type UNICAST
-A FORWARD -p udp -m addrtype --dst-type UNICAST --limit-iface-out
-A FORWARD -p udp -m addrtype --src-type UNICAST --limit-iface-in
-A FORWARD -p udp -m addrtype --dst-type LOCAL,BROADCAST,MULTICAST -j DROP
-A FORWARD -p udp -m addrtype ! --src-type LOCAL -j DROP
-A OUTPUT -p udp -m addrtype --src-type LOCAL
-A OUTPUT -p udp -m addrtype --src-type LOCAL --limit-iface-out
-A OUTPUT -p udp -m addrtype --dst-type BROADCAST,MULTICAST
-A OUTPUT -p udp -m addrtype --dst-type UNICAST --limit-iface-out
-A OUTPUT -p udp -m addrtype ! --src-type LOCAL
-A OUTPUT -p udp -m addrtype --src-type LOCAL --dst-type BROADCAST --limit-iface-out -j ACCEPT
COMMIT
"""
# The host's routes beyond the topology's: a second device (dum0, the end of a veth pair
# inside the host) with its own subnet, prefixes of each failing type, a range delivered
# locally (as Kubernetes adds them), a blackhole inside it, and a unicast route via dum0.
SETUP = (
    "ip link add dum0 type veth peer name dum1",
    "ip link set dum1 up",
    "ip addr add 198.19.20.1/24 dev dum0",
    "ip link set dum0 up",
    "ip route add blackhole 198.19.10.0/24",
    "ip route add unreachable 198.19.11.0/24",
    "ip route add prohibit 198.19.12.0/24",
    "ip route add throw 198.19.13.0/24",
    "ip route add local 198.19.17.0/24 dev lo",
    "ip route add blackhole 198.19.17.128/25",
    "ip route add 198.19.16.0/24 dev dum0",
    "ip neigh add 198.19.16.5 lladdr 02:00:c6:13:10:05 dev dum0 nud permanent",
)
BROADCAST_MAC, ALL_HOSTS_MAC = "ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01"


@dataclass(frozen=True)
class Case:
    """A frame from the client (INPUT, FORWARD) or a packet the host sends (OUTPUT)."""

    chain: str
    source: str
    destination: str
    mac: str | None = None  # the client's frame's destination MAC (None: the host's)
    out: str | None = None  # the device it leaves by (FORWARD, OUTPUT)


CASES = (
    Case("INPUT", "198.18.0.1", "198.18.0.2"),
    Case("INPUT", "198.18.0.1", "198.18.0.255", BROADCAST_MAC),
    Case("INPUT", "198.18.0.1", "255.255.255.255", BROADCAST_MAC),
    Case("INPUT", "198.18.0.1", "224.0.0.1", ALL_HOSTS_MAC),
    Case("INPUT", "198.18.0.1", "198.19.20.1"),  # dum0's address: LOCAL, not eth0's
    Case("INPUT", "198.18.0.1", "198.19.20.255", BROADCAST_MAC),  # dum0's broadcast
    Case("INPUT", "198.19.10.5", "198.18.0.2"),  # blackhole source
    Case("INPUT", "198.19.11.5", "198.18.0.2"),  # unreachable
    Case("INPUT", "198.19.12.5", "198.18.0.2"),  # prohibit
    Case("INPUT", "198.19.13.5", "198.18.0.2"),  # throw
    Case("INPUT", "198.19.17.200", "198.18.0.2"),  # blackhole inside the local range
    Case("INPUT", "10.0.0.1", "198.18.0.2"),  # no route at all
    Case("INPUT", "0.0.0.0", "255.255.255.255", BROADCAST_MAC),
    Case("FORWARD", "198.18.0.1", "198.19.16.5", out="dum0"),
    Case("FORWARD", "198.19.10.5", "198.19.16.5", out="dum0"),
    Case("FORWARD", "198.19.16.9", "198.19.16.5", out="dum0"),  # its route is dum0's
    Case("OUTPUT", "198.18.0.2", "198.18.0.1", out="eth0"),
    Case("OUTPUT", "198.19.20.1", "198.18.0.1", out="eth0"),  # dum0's address, out eth0
    Case("OUTPUT", "198.18.0.2", "198.18.0.255", out="eth0"),
    Case("OUTPUT", "198.18.0.2", "224.0.0.1", out="eth0"),
    Case("OUTPUT", "198.18.0.2", "198.19.16.5", out="dum0"),
    Case("OUTPUT", "198.19.10.5", "198.18.0.1", out="eth0"),
)
# The kernel delivers an address of a local route wider than /32 (198.19.17.0/24 via lo)
# to INPUT; our ingress program knows only /32 local routes (harness.deploy.addresses), so
# it reaches only the twin.
TWIN_ONLY = (Case("INPUT", "198.18.0.1", "198.19.17.5"),)
GAP = 0.02  # seconds between frames: each is handled long before the next


def _datagram(case: Case, port: int) -> bytes:
    # The host's own datagrams come from another port: the kernel loops a broadcast it sends
    # back to its INPUT, where the rules (--sport 40000) do not count it.
    source_port = 40001 if case.chain == "OUTPUT" else 40000
    datagram = IP(src=case.source, dst=case.destination, ttl=64, id=port)
    return bytes(datagram / UDP(sport=source_port, dport=port) / b"addrtype")


class Lab:
    def __init__(self, lab: HostTopology):
        self.lab = lab
        host = lab.host.namespace
        host.sysctl("net.ipv4.ip_forward", 1)
        for command in SETUP:
            host.run(command.split())
        self.client_socket = lab.client.namespace.socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)
        )
        self.client_socket.bind((lab.client.ifname, 0))
        self.host_socket = host.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.host_socket.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        self.host_socket.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("198.18.0.2")
        )
        self.host_socket.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)

    def close(self) -> None:
        self.client_socket.close()
        self.host_socket.close()

    def send(self, cases: tuple[Case, ...]) -> None:
        for port, case in enumerate(cases, 1000):
            packet = _datagram(case, port)
            if case.chain == "OUTPUT":
                self.host_socket.sendto(packet, (case.destination, 0))
            else:
                mac = case.mac or self.lab.host.mac
                frame = Ether(src=self.lab.client.mac, dst=mac, type=0x0800) / packet
                self.client_socket.send(bytes(frame))
            time.sleep(GAP)
        time.sleep(0.2)

    def expected(self, cases: tuple[Case, ...]) -> dict:
        """Every rule's counters, as the reference evaluator adds them up over the host's
        own routes. Policies are left out: the kernel's answers (ICMP port unreachable) and
        looped broadcasts reach them too."""
        ruleset = parse(RULES, "addrtype")
        routes = namespace_routes(self.lab.host.namespace)
        total = {key: (0, 0) for key in counters(ruleset) if key[1] != "policy"}
        for port, case in enumerate(cases, 1000):
            packet = _datagram(case, port)
            if case.chain == "FORWARD":  # decremented before the FORWARD hook
                packet = bytes(IP(packet[:8] + bytes([63]) + packet[9:]))
            inside = None if case.chain == "OUTPUT" else "eth0"
            kind = {BROADCAST_MAC: "broadcast", ALL_HOSTS_MAC: "multicast"}.get(case.mac or "")
            result = evaluate(
                ruleset,
                packet,
                case.chain,
                inside,
                case.out,
                pkt_type=kind or "host",
                routes=routes,
            )
            for key, (packets, size) in result.counters.items():
                if key in total:
                    total[key] = (total[key][0] + packets, total[key][1] + size)
        return total


@pytest.fixture
def lab():  # type: ignore[no-untyped-def]
    with HostTopology(ipv6=False) as topology:
        built = Lab(topology)
        try:
            yield built
        finally:
            built.close()


def test_the_routes_are_read_as_the_kernel_has_them(lab: Lab) -> None:
    routes = namespace_routes(lab.lab.host.namespace)
    kinds = {(route.network, route.length): route.type for route in routes.routes}
    assert kinds[(0xC6130A00, 24)] == RTN["BLACKHOLE"]
    assert kinds[(0xC6131100, 24)] == RTN["LOCAL"]
    assert kinds[(0xC6120002, 32)] == RTN["LOCAL"]  # the LOCAL table
    assert routes.address_type(0xC6120002, "eth0") == RTN["LOCAL"]
    assert routes.address_type(0xC6120002, "dum0") == RTN["UNICAST"]
    assert routes.address_type(0xC6130A05) == RTN["UNICAST"]  # under the blackhole
    assert routes.address_type(0xC6131105) == RTN["LOCAL"]


def test_iptables_counts_what_the_reference_says(lab: Lab, tmp_path: Path) -> None:
    host = lab.lab.host.namespace
    restore(host, RULES, tmp_path)
    cases = CASES + TWIN_ONLY
    lab.send(cases)
    expected = lab.expected(cases)
    kernel = until(
        lambda: counters(parse("\n".join(save(host, counters=True)) + "\n", "kernel")),
        lambda kernel: {key: kernel[key] for key in expected} == expected,
    )
    assert {key: kernel[key] for key in expected} == expected
    # The cases reached every chain and told the types apart.
    assert all(kernel[chain, 1][0] > 0 for chain in ("INPUT", "FORWARD", "OUTPUT"))
    assert kernel["INPUT", 1] != kernel["INPUT", 2] and kernel["INPUT", 3] != kernel["INPUT", 4]
    assert kernel["INPUT", 7] == (0, 0)  # a failing route's type is never seen


@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_our_programs_count_what_iptables_counts(lab: Lab, backend: str) -> None:
    host = lab.lab.host.namespace
    apply(RULES, "addrtype", host.name, backend=backend)  # type: ignore[arg-type]
    try:
        lab.send(CASES)
        expected = lab.expected(CASES)
        ours = until(
            lambda: current(host.name)[1],
            lambda ours: {key: ours[key] for key in expected} == expected,
        )
    finally:
        flush(host.name)
    assert {key: ours[key] for key in expected} == expected
    assert ours["INPUT", 2][0] > 0 and ours["OUTPUT", 2][0] > 0


def test_a_policy_rule_leaves_main_out_for_good(lab: Lab, tmp_path: Path) -> None:
    """The first policy routing rule unmerges LOCAL from MAIN, and deleting it does not merge
    them again: a local route of MAIN is LOCAL before, UNICAST after, as the model says."""
    host = lab.lab.host.namespace
    host.run("ip route add local 198.19.31.0/24 dev lo table main".split())
    rules = "*filter\n-A INPUT -p udp -m addrtype --dst-type LOCAL\nCOMMIT\n"
    restore(host, rules, tmp_path)
    ruleset = parse(rules, "policy")
    case = Case("INPUT", "198.18.0.1", "198.19.31.5")
    seen = []
    for step in ("merged", "rule added", "rule deleted"):
        if step == "rule added":
            host.run("ip rule add from 198.19.99.0/24 table 100".split())
        elif step == "rule deleted":
            host.run("ip rule del from 198.19.99.0/24 table 100".split())
        host.run(["iptables-legacy", "-Z"])
        lab.send((case,))
        kernel = counters(parse("\n".join(save(host, counters=True)) + "\n", "kernel"))
        routes = namespace_routes(host)
        packet = _datagram(case, 1000)
        ours = evaluate(ruleset, packet, "INPUT", "eth0", None, routes=routes)
        assert kernel["INPUT", 1] == ours.counters.get(("INPUT", 1), (0, 0)), step
        seen.append(kernel["INPUT", 1][0])
    assert seen == [1, 0, 0]
