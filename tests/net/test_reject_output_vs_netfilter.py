"""REJECT's answers pass OUTPUT, against the kernel's: the answer to a packet INPUT or FORWARD
rejects leaves by ip_local_out, so OUTPUT judges it, with the rejected packet's connection
attached (nf_ct_attach): RELATED, in the other direction, its status and tuple that
connection's. Twin labs (one filtering with iptables-legacy, one with our programs) get the
same packets and the same socket traffic; after each case every counter that moved, and the
kinds of what came back to the sender's wire, must be the kernel's. OUTPUT's rules ask what
an answer shows: its connection (state, status, direction, protocol, original tuple), its
socket (an ICMP error's is the namespace's ICMP socket, which no file holds; a RST has none),
its mark (none) and its device; one rule drops one kind of answer, which then never arrives."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from codegen.rules import parse
from harness.deploy.lifecycle import apply, current, flush
from harness.lab.observation import moved_counters
from harness.lab.traffic import restore
from harness.lab.twin import quiet_host
from netns import HostTopology, RouterTopology
from netns.namespace import Namespace
from tests.net.test_reject_attached import ANSWER_WAIT, answers_on
from tests.net.test_reject_vs_netfilter import ETH_P_ALL

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

# What OUTPUT asks of every packet it sees; each rule only counts, but the first, which drops
# the ICMP errors of one code, and the last, which accepts what is RELATED.
OUTPUT = """\
-A OUTPUT -p icmp -m icmp --icmp-type 3/9 -j DROP
-A OUTPUT -m conntrack --ctstate RELATED
-A OUTPUT -m conntrack --ctstate INVALID
-A OUTPUT -m conntrack --ctstate ESTABLISHED
-A OUTPUT -m conntrack --ctstate NEW
-A OUTPUT -m conntrack --ctstatus CONFIRMED
-A OUTPUT -m conntrack --ctstatus SEEN_REPLY
-A OUTPUT -m conntrack --ctstatus ASSURED
-A OUTPUT -m conntrack --ctdir ORIGINAL
-A OUTPUT -m conntrack --ctdir REPLY
-A OUTPUT -m conntrack --ctproto 1
-A OUTPUT -m conntrack --ctproto 6
-A OUTPUT -m conntrack --ctproto 17
-A OUTPUT -m conntrack --ctorigsrc {client}
-A OUTPUT -m conntrack --ctorigdstport 9000
-A OUTPUT -m owner --socket-exists
-A OUTPUT -m owner ! --uid-owner 0
-A OUTPUT -m mark --mark 0x5
-A OUTPUT -o eth0
-A OUTPUT -p icmp
-A OUTPUT -p tcp
-A OUTPUT -m conntrack --ctstate RELATED -j ACCEPT
"""
# The rejecting chain's rules, for INPUT (a host) or FORWARD (a router).
REJECTS = """\
-A {chain} -p udp -m udp --dport 1 -j MARK --set-xmark 0x5/0xffffffff
-A {chain} -p tcp -m tcp --dport 2 -j REJECT --reject-with tcp-reset
-A {chain} -p udp -m udp --dport 1 -j REJECT
-A {chain} -p tcp -m tcp --dport 3 -j REJECT
-A {chain} -p icmp -m icmp --icmp-type 8 -j REJECT --reject-with icmp-net-unreachable
-A {chain} -p udp -m udp --dport 6 -m conntrack --ctstatus CONFIRMED \
-j REJECT --reject-with icmp-host-prohibited
-A {chain} -p udp -m udp --sport 9000 -j REJECT --reject-with icmp-admin-prohibited
-A {chain} -p udp -m udp --dport 8 -j REJECT --reject-with icmp-net-prohibited
-A {chain} -p tcp -m tcp --dport 5 -m length --length 80:1500 -j REJECT --reject-with tcp-reset
"""


def rules(chain: str, client: str) -> str:
    return (
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        + REJECTS.format(chain=chain)
        + OUTPUT.format(client=client)
        + "COMMIT\n"
    )


class Side:
    """One lab of the twin: the sender's wire (a packet socket on the client's link), the
    namespace that filters, and who the packets go to."""

    def __init__(self, lab: HostTopology | RouterTopology, stack: ExitStack):
        self.client = lab.client
        if isinstance(lab, HostTopology):
            self.filtering, self.next_hop, self.target = lab.host.namespace, lab.host, lab.host
        else:
            router = lab.router
            self.filtering, self.next_hop, self.target = (
                router.namespace,
                router.client_side,
                lab.server,
            )
            restore(lab.server.namespace, quiet_host(os.geteuid()))
        restore(lab.client.namespace, quiet_host(os.geteuid()))
        self.filtering.sysctl("net.ipv4.icmp_ratelimit", 0)
        self.sock = stack.enter_context(
            lab.client.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        )
        self.sock.bind((lab.client.ifname, 0))
        self.sock.settimeout(0.05)

    def frame(self, layer: object) -> None:
        packet = IP(src=str(self.client.ipv4.ip), dst=str(self.target.ipv4.ip)) / layer
        self.sock.send(bytes(Ether(src=self.client.mac, dst=self.next_hop.mac) / packet))

    def answers(self) -> list[str]:
        """What came back to the client's wire, by kind, in order."""
        frames = answers_on(self.sock, lambda frame: frame[IP].src != str(self.client.ipv4.ip))
        return [_kind(frame) for frame in frames]


def _kind(frame: Ether) -> str:
    if ICMP in frame:
        return f"icmp {frame[ICMP].type}/{frame[ICMP].code}"
    if TCP in frame:
        return f"tcp {frame[TCP].flags}"
    return frame[IP].sprintf("proto %IP.proto%")


def _udp_from_target(side: Side) -> None:
    """The target sends a datagram from port 7000 to the client's 9000 (a connection the
    client's answer then replies in)."""
    with closing(side.target.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
        udp.bind((str(side.target.ipv4.ip), 7000))
        udp.sendto(b"q", (str(side.client.ipv4.ip), 9000))
    time.sleep(0.1)


def _reset_connection(side: Side) -> None:
    """A real connection to the target's port 5 whose first data segment is rejected with a
    RST: the client's socket is reset."""
    target = side.target.namespace
    with closing(target.socket(socket.AF_INET, socket.SOCK_STREAM)) as listener:
        listener.bind((str(side.target.ipv4.ip), 5))
        listener.listen(1)
        with closing(side.client.namespace.socket(socket.AF_INET, socket.SOCK_STREAM)) as tcp:
            tcp.settimeout(2)
            tcp.connect((str(side.target.ipv4.ip), 5))
            tcp.sendall(b"d" * 60)
            time.sleep(ANSWER_WAIT)
            with pytest.raises(ConnectionResetError):
                tcp.recv(16)


Step = Callable[[Side], None]


def _send(layer: object) -> Step:
    return lambda side: side.frame(layer)


# (name, the steps, what must come back to the client's wire)
CASES: list[tuple[str, list[Step], list[str]]] = [
    ("syn reset", [_send(TCP(sport=40000, dport=2, flags="S", seq=5))], ["tcp RA"]),
    ("udp, marked first", [_send(UDP(sport=5000, dport=1) / b"x")], ["icmp 3/3"]),
    ("syn unreachable", [_send(TCP(sport=40001, dport=3, flags="S"))], ["icmp 3/3"]),
    ("ping", [_send(ICMP(id=7, seq=1) / b"ping")], ["icmp 3/0"]),
    # The first datagram is accepted (the host's own port unreachable answers it, which OUTPUT
    # sees as RELATED too); the second, of the connection it made, is rejected.
    (
        "udp of a confirmed connection",
        [_send(UDP(sport=5100, dport=6) / b"a"), _send(UDP(sport=5100, dport=6) / b"b")],
        ["icmp 3/3", "icmp 3/10"],
    ),
    (
        "udp reply rejected",
        [_udp_from_target, _send(UDP(sport=9000, dport=7000) / b"r")],
        ["proto udp", "icmp 3/13"],
    ),
    ("answer dropped by OUTPUT", [_send(UDP(sport=5200, dport=8) / b"n")], []),
    # A packet conntrack finds INVALID (SYN and FIN together) has no connection to attach to
    # the answer: OUTPUT's conntrack sees the RST as a packet of no connection, INVALID, and
    # finds none for the tuple the ICMP error quotes, INVALID too.
    ("invalid syn+fin reset", [_send(TCP(sport=40002, dport=2, flags="SF"))], ["tcp RA"]),
    ("invalid syn+fin unreachable", [_send(TCP(sport=40003, dport=3, flags="SF"))], ["icmp 3/3"]),
    # The host's RST at the end is the listener's close resetting the connection it holds.
    ("rst in a connection", [_reset_connection], ["tcp SA", "tcp R", "tcp RA"]),
]
# Where the router rejects, the server's own answers are not sent (its stack is quiet).
ROUTED = {
    "udp of a confirmed connection": ["icmp 3/10"],
    "rst in a connection": ["tcp SA", "tcp R"],
}


def _kernel_moved(namespace: Namespace) -> dict:
    saved = namespace.run(["iptables-legacy-save", "-c", "-t", "filter"]).stdout
    return moved_counters(parse(saved, "<iptables-legacy-save>"))


def _run(lab: HostTopology | RouterTopology, kernel: bool, rules_text: str) -> dict:
    """Each case's answers and moved counters in `lab`, filtering with the kernel's netfilter
    (`kernel`) or with our programs (applied by the caller)."""
    results = {}
    with ExitStack() as stack:
        side = Side(lab, stack)
        if kernel:
            restore(side.filtering, rules_text)
        for name, steps, _ in CASES:
            side.answers()  # drain what earlier cases left
            if kernel:
                side.filtering.run(["iptables-legacy", "-Z"])
            else:
                before = current(side.filtering.name)[1]
            for step in steps:
                step(side)
            answers = side.answers()
            if kernel:
                moved = _kernel_moved(side.filtering)
            else:
                after = current(side.filtering.name)[1]
                moved = {
                    where: (value[0] - was[0], value[1] - was[1])
                    for where, value in after.items()
                    if where[0] and value != (was := before.get(where, (0, 0)))
                }
            results[name] = (answers, moved)
    return results


@pytest.fixture(scope="module", params=["host", "router"])
def kernel(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict]]:
    routed = request.param == "router"
    text = rules("FORWARD" if routed else "INPUT", "198.18.1.1" if routed else "198.18.0.1")
    with (RouterTopology if routed else HostTopology)(ipv6=False) as lab:
        yield request.param, _run(lab, True, text)


@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_answers_pass_output_as_the_kernels(kernel: tuple[str, dict], backend: str) -> None:
    shape, theirs = kernel
    routed = shape == "router"
    text = rules("FORWARD" if routed else "INPUT", "198.18.1.1" if routed else "198.18.0.1")
    with (RouterTopology if routed else HostTopology)(ipv6=False) as lab:
        namespace = lab.router.namespace if routed else lab.host.namespace
        apply(text, "answers.rules", namespace.name, backend=backend)
        try:
            ours = _run(lab, False, text)
        finally:
            flush(namespace.name)
    failures = []
    for name, _, expected in CASES:
        expected = ROUTED.get(name, expected) if routed else expected
        (kernel_answers, kernel_moved), (answers, moved) = theirs[name], ours[name]
        if kernel_answers != expected:
            failures.append(f"{name}: the kernel sent {kernel_answers}, not {expected}")
        if answers != kernel_answers:
            failures.append(f"{name}: the kernel sent {kernel_answers}, ours {answers}")
        if moved != kernel_moved:
            rows = sorted(set(moved) | set(kernel_moved), key=str)
            table = "\n".join(
                f"    {row}: kernel {kernel_moved.get(row)}, ours {moved.get(row)}"
                for row in rows
                if kernel_moved.get(row) != moved.get(row)
            )
            failures.append(f"{name}: counters differ\n{table}")
    assert not failures, "\n".join(failures)
    # The answers were judged: OUTPUT's RELATED rule counted one of each kind of answer.
    assert all(theirs[name][1].get(("OUTPUT", 2)) for name in ("syn reset", "ping"))
