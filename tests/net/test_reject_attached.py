"""REJECT attached in a namespace: the answers our programs put on the wire against the ones
the kernel's REJECT sends for the same frames (a twin host filtering with iptables-legacy),
field by field; and a local socket told at once when OUTPUT rejects what it sends."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from harness.deploy.lifecycle import apply, current, flush
from netns import HostTopology
from tests.net.test_ipt_blob import restore
from tests.net.test_reject_vs_netfilter import (
    ANSWER_WAIT,
    CASES,
    ETH_P_ALL,
    RULES,
    _layer,
    destination_of,
)
from tests.net.test_tc_attached import rules

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

CLIENT, HOST = "198.18.0.1", "198.18.0.2"


def answers_on(sock: socket.socket, wanted: Callable[[Ether], bool]) -> list[Ether]:
    """The IP frames that come to the packet socket `sock` within ANSWER_WAIT (not the ones it
    sent) and that `wanted` keeps."""
    answers, deadline = [], time.monotonic() + ANSWER_WAIT
    while time.monotonic() < deadline:
        try:
            data, address = sock.recvfrom(65535)
        except TimeoutError:
            continue
        frame = Ether(data)
        if address[2] != socket.PACKET_OUTGOING and IP in frame and wanted(frame):
            answers.append(frame)
    return answers


class Host:
    """A client and a host; `send` puts a frame on the wire and returns what came back."""

    def __init__(self, lab: HostTopology, stack: ExitStack):
        self.lab = lab
        self.sock = stack.enter_context(
            lab.client.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        )
        self.sock.bind((lab.client.ifname, 0))
        self.sock.settimeout(0.05)

    def send(self, packet: bytes, broadcast: bool) -> list[Ether]:
        destination = "ff:ff:ff:ff:ff:ff" if broadcast else self.lab.host.mac
        while True:  # drain what earlier cases left
            try:
                self.sock.recv(65535)
            except TimeoutError:
                break
        self.sock.send(bytes(Ether(src=self.lab.client.mac, dst=destination) / IP(packet)))
        return self.answers()

    def answers(self) -> list[Ether]:
        """The frames from the host that come within ANSWER_WAIT."""
        return answers_on(self.sock, lambda frame: frame[IP].src != CLIENT)

    def burst(self, packet: bytes, count: int) -> int:
        """Send `count` copies of `packet` at once; how many ICMP errors came back."""
        frame = bytes(Ether(src=self.lab.client.mac, dst=self.lab.host.mac) / IP(packet))
        for _ in range(count):
            self.sock.send(frame)
        return sum(ICMP in answer for answer in self.answers())


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    with ExitStack() as stack:
        lab = stack.enter_context(HostTopology(ipv6=False))
        restore(lab.host.namespace, RULES, Path(tmp_path_factory.mktemp("twin")))
        lab.host.namespace.sysctl("net.ipv4.icmp_ratelimit", 0)
        yield Host(lab, stack)


def _fields(frame: Ether) -> dict:
    """What must be equal in two answers (the ICMP error's IP id is random in both)."""
    ip = frame[IP]
    fields = {
        "ip": (ip.ihl, ip.tos, ip.len, int(ip.flags), ip.frag, ip.ttl, ip.proto, ip.src, ip.dst),
    }
    if TCP in frame:
        tcp = frame[TCP]
        fields["ip id"] = ip.id
        fields["tcp"] = (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.dataofs, int(tcp.flags))
        fields["tcp rest"] = (tcp.window, tcp.urgptr, bytes(tcp.payload))
    if ICMP in frame:
        fields["icmp"] = (frame[ICMP].type, frame[ICMP].code, bytes(frame[ICMP].payload))
    return fields


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_answers_on_the_wire_are_the_kernels(twin: Host, backend: str) -> None:
    with HostTopology(ipv6=False) as lab, ExitStack() as stack:
        ours = Host(lab, stack)
        apply(RULES, "reject.rules", lab.host.namespace.name, backend=backend)
        try:
            failures = []
            for name, kind, protocol, broadcast in CASES:
                to = destination_of(name)
                header = IP(src=CLIENT, dst=to, **({"proto": protocol} if protocol else {}))
                packet = bytes(header / _layer(kind))
                kernel = twin.send(packet, broadcast)
                mine = ours.send(packet, broadcast)
                if len(kernel) != len(mine):
                    failures.append(f"{name}: kernel sent {len(kernel)}, ours {len(mine)}")
                    continue
                for theirs, answer in zip(kernel, mine, strict=True):
                    # The MACs are each lab's own: from the host to the client in both.
                    if (answer.src, answer.dst) != (lab.host.mac, lab.client.mac):
                        failures.append(f"{name}: our answer went {answer.src} > {answer.dst}")
                    if _fields(theirs) != _fields(answer):
                        failures.append(
                            f"{name}: kernel {_fields(theirs)}\n  ours {_fields(answer)}"
                        )
            assert not failures, "\n".join(failures)
        finally:
            flush(lab.host.namespace.name)


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_output_rejects_reach_the_local_socket_at_once(backend: str) -> None:
    """OUTPUT's RST reaches the connecting socket: ECONNREFUSED at once, as with netfilter.
    An ICMP error reaches a connected UDP socket as ECONNREFUSED on its next receive (with
    netfilter, sendto itself fails with EPERM: TC cannot fail a send). The answers come in
    unjudged, as netfilter's come over lo: a dropping INPUT policy lets them by, and counts
    nothing."""
    text = rules(
        "-A OUTPUT -p tcp --dport 7 -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -p udp --dport 7 -j REJECT",
        policies="DROP ACCEPT ACCEPT",
    )
    with HostTopology(ipv6=False) as lab:
        apply(text, "output.rules", lab.host.namespace.name, backend=backend)
        try:
            with closing(lab.host.namespace.socket(socket.AF_INET, socket.SOCK_STREAM)) as tcp:
                tcp.settimeout(2)
                started = time.monotonic()
                with pytest.raises(ConnectionRefusedError):
                    tcp.connect((str(lab.client.ipv4.ip), 7))
                assert time.monotonic() - started < 1
            with closing(lab.host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)) as udp:
                udp.settimeout(2)
                udp.connect((str(lab.client.ipv4.ip), 7))
                udp.send(b"x")
                with pytest.raises(OSError) as refused:
                    udp.recv(16)
                assert refused.value.errno == errno.ECONNREFUSED
            counters = current(lab.host.namespace.name)[1]
            assert counters[("INPUT", "policy")] == (0, 0)
            assert counters[("OUTPUT", 1)][0] == 1 and counters[("OUTPUT", 2)][0] == 1
        finally:
            flush(lab.host.namespace.name)


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_icmp_errors_are_rate_limited_as_the_kernels(backend: str, tmp_path: Path) -> None:
    """Bursts of rejected datagrams from one peer, to the kernel's REJECT and to ours, both
    namespaces at their default sysctls: 6 errors for the first burst (a new peer's bucket),
    none for one right after, one a second later; and all of a burst once icmp_ratelimit is 0
    (ours reads it at the next apply)."""
    datagram = bytes(IP(src=CLIENT, dst=HOST) / UDP(sport=5000, dport=1) / b"x")
    with (
        HostTopology(ipv6=False) as kernel_lab,
        HostTopology(ipv6=False) as lab,
        ExitStack() as stack,
    ):
        restore(kernel_lab.host.namespace, RULES, tmp_path)
        apply(RULES, "reject.rules", lab.host.namespace.name, backend=backend)
        try:
            hosts = {"kernel": Host(kernel_lab, stack), "ours": Host(lab, stack)}
            counts: dict[str, list[int]] = {name: [] for name in hosts}
            for name, host in hosts.items():  # one after the other: each on its own clock
                counts[name].append(host.burst(datagram, 20))
                counts[name].append(host.burst(datagram, 10))
                time.sleep(1.2 - ANSWER_WAIT)
                counts[name].append(host.burst(datagram, 10))
            for lab_of in (kernel_lab, lab):
                lab_of.host.namespace.sysctl("net.ipv4.icmp_ratelimit", 0)
            apply(RULES, "reject.rules", lab.host.namespace.name, backend=backend)
            for name, host in hosts.items():
                counts[name].append(host.burst(datagram, 20))
            assert counts["kernel"] == [6, 0, 1, 20], "the kernel's limits are not as measured"
            assert counts["ours"] == counts["kernel"]
        finally:
            flush(lab.host.namespace.name)
