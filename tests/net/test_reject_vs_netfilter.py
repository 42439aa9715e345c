"""`Evaluation.reply` against the kernel: frames sent to a host whose INPUT rejects them with
iptables-legacy, and what comes back on the wire (an ICMP destination unreachable of some
code, a TCP RST, or nothing) is what the reference evaluator says for the same packet."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from codegen.rules import evaluate, parse
from codegen.rules.extensions.reject import REJECT_TYPES
from netns import HostTopology
from tests.net.test_ipt_blob import restore

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """\
*filter
-A INPUT -p tcp -m tcp --dport 2 -j REJECT --reject-with tcp-reset
-A INPUT -p tcp -m tcp --dport 3 -j REJECT
-A INPUT -p udp -m udp --dport 1 -j REJECT --reject-with icmp-host-prohibited
-A INPUT -p icmp -j REJECT --reject-with icmp-net-unreachable
-A INPUT -p gre -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""
ETH_P_ALL = 0x0003
ANSWER_WAIT = 0.3  # seconds; the kernel answers within a millisecond on veth
_CODES = {code: name for name, _, _, code in REJECT_TYPES if code is not None}


def _bad_checksum(layer):  # type: ignore[no-untyped-def]
    built = layer.__class__(bytes(layer))
    built.chksum = (built.chksum + 1) & 0xFFFF
    return built


# (name, transport layer, IP protocol when the layer is raw bytes, broadcast frame)
CASES = [
    ("tcp-syn-reset", TCP(sport=40000, dport=2, flags="S", seq=5), None, False),
    ("tcp-ack-reset", TCP(sport=40001, dport=2, flags="A", seq=5, ack=77), None, False),
    ("tcp-rst-no-reset", TCP(sport=40002, dport=2, flags="R", seq=5), None, False),
    ("tcp-syn-broadcast-frame-reset", TCP(sport=40003, dport=2, flags="S"), None, True),
    ("tcp-bad-checksum", "bad-tcp", None, False),
    ("tcp-rst-unreachable", TCP(sport=40004, dport=3, flags="R"), None, False),
    ("tcp-syn-unreachable", TCP(sport=40005, dport=3, flags="S"), None, False),
    ("tcp-syn-broadcast-frame-unreachable", TCP(sport=40006, dport=3, flags="S"), None, True),
    ("udp", UDP(sport=5000, dport=1) / b"x", None, False),
    ("udp-without-checksum", UDP(sport=5001, dport=1, chksum=0) / b"x", None, False),
    ("udp-bad-checksum", "bad-udp", None, False),
    ("icmp-echo", ICMP(type=8, id=1, seq=1) / b"ping", None, False),
    ("icmp-timestamp", ICMP(type=13), None, False),
    (
        "icmp-error",
        ICMP(type=3, code=1) / bytes(IP(src="198.18.0.2", dst="198.18.0.1") / UDP()),
        None,
        False,
    ),
    ("icmp-type-40", ICMP(type=40), None, False),
    ("gre", b"\x00\x00\x08\x00" + b"\x00" * 8, 47, False),
    ("udp-to-subnet-broadcast", UDP(sport=5003, dport=1) / b"x", None, False),
    ("tcp-syn-to-subnet-broadcast-reset", TCP(sport=40008, dport=2, flags="S"), None, False),
]
# The destination of a case other than the host's own address: its subnet's broadcast, to the
# host's MAC (a broadcast route, which neither an ICMP error nor a RST is sent to).
DESTINATIONS = {
    "udp-to-subnet-broadcast": "198.18.0.255",
    "tcp-syn-to-subnet-broadcast-reset": "198.18.0.255",
}


def destination_of(name: str) -> str:
    return DESTINATIONS.get(name, "198.18.0.2")


def _layer(kind):  # type: ignore[no-untyped-def]
    if kind == "bad-tcp":
        return _bad_checksum(TCP(sport=40007, dport=2, flags="S"))
    if kind == "bad-udp":
        return _bad_checksum(UDP(sport=5002, dport=1) / b"x")
    return kind


def _answer(frame: bytes) -> str | None:
    packet = Ether(frame)
    if IP not in packet or packet[IP].src != "198.18.0.2":
        return None
    if ICMP in packet and packet[ICMP].type == 3:
        return _CODES.get(packet[ICMP].code, f"icmp code {packet[ICMP].code}")
    if TCP in packet and packet[TCP].flags & 0x04:
        return "tcp-reset"
    return None


def test_replies_are_what_the_kernel_sends(tmp_path: Path) -> None:
    ruleset = parse(RULES, "reject")
    with HostTopology(ipv6=False) as lab:
        host, client = lab.host, lab.client
        restore(host.namespace, RULES, tmp_path)
        # One error a second per peer otherwise: the cases come faster than that.
        host.namespace.sysctl("net.ipv4.icmp_ratelimit", 0)
        sock = client.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with sock:
            sock.bind((client.ifname, 0))
            sock.settimeout(0.05)
            failures, answers = [], set()
            for name, kind, protocol, broadcast in CASES:
                layer = _layer(kind)
                header = IP(
                    src="198.18.0.1",
                    dst=destination_of(name),
                    **({"proto": protocol} if protocol else {}),
                )
                packet = bytes(header / layer)
                destination = "ff:ff:ff:ff:ff:ff" if broadcast else host.mac
                while True:  # drain what earlier cases left
                    try:
                        sock.recv(65535)
                    except TimeoutError:
                        break
                sock.send(bytes(Ether(src=client.mac, dst=destination) / IP(packet)))
                seen: set[str] = set()
                deadline = time.monotonic() + ANSWER_WAIT
                while time.monotonic() < deadline:
                    try:
                        answer = _answer(sock.recv(65535))
                    except TimeoutError:
                        continue
                    if answer is not None:
                        seen.add(answer)
                kernel = seen.pop() if len(seen) == 1 else (None if not seen else str(sorted(seen)))
                ours = evaluate(
                    ruleset,
                    packet,
                    "INPUT",
                    "eth0",
                    None,
                    pkt_type="broadcast" if broadcast else "host",
                )
                answers.add(kernel)
                if ours.verdict != "DROP" or ours.reply != kernel:
                    failures.append(
                        f"{name}: kernel {kernel}, evaluator {ours.verdict} {ours.reply}"
                    )
    assert not failures, "\n".join(failures)
    # The capture saw every kind of answer the rules ask for, and silence.
    assert answers == {
        None,
        "tcp-reset",
        "icmp-port-unreachable",
        "icmp-host-prohibited",
        "icmp-net-unreachable",
        "icmp-admin-prohibited",
    }
