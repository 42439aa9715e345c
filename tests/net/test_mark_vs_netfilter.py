"""`-j MARK` on real traffic: the same datagrams sent to a host that filters with
iptables-legacy and to its twin that runs our attached programs, in each backend. The marks
decide (later `-m mark` rules accept or drop by what earlier MARK rules, in a user chain or in
INPUT itself, set or cleared), so the same datagrams must arrive at each port, every rule's
counter must agree (netfilter's read back from its table, ours from the counters map), and the
receiving socket must see the same mark on each datagram (SO_RCVMARK: skb->mark as the
socket got it, which the MARK rules left there in both)."""

from __future__ import annotations

import socket
import struct
import tempfile
from pathlib import Path

import pytest

from codegen.rules import parse
from codegen.rules.ipt_blob import read_table
from harness.deploy import lifecycle
from netns import HostTopology
from tests.net.test_tc_attached import PAYLOAD, rules

pytestmark = [pytest.mark.netns, pytest.mark.privileged]
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]
SO_RCVMARK = getattr(socket, "SO_RCVMARK", 75)  # Linux 5.19: skb->mark in a cmsg of SO_MARK
PORTS = (5001, 5002, 5003, 5004, 5005)
SENT = 4

# Tailscale's mark-and-accept and k3s's set-test-clear, with every operation, on one host.
RULES = rules(
    ":mark-it - [0:0]",
    ":policy - [0:0]",
    "-A INPUT -p udp -j mark-it",
    "-A INPUT -p udp -m mark --mark 0x40000/0xff0000 -j ACCEPT",
    "-A INPUT -p udp -m mark ! --mark 0x10000/0x10000 -j DROP",
    "-A INPUT -p udp -j MARK --set-xmark 0x0/0x10000",
    "-A INPUT -p udp -m mark --mark 0x20000/0x20000 -j ACCEPT",
    "-A INPUT -p udp -j DROP",
    "-A mark-it -p udp --dport 5001 -j MARK --set-mark 0x40000",
    "-A mark-it -p udp --dport 5002:5004 -j policy",
    "-A mark-it -p udp --dport 5005 -j MARK --or-mark 0x10000",
    "-A policy -p udp --dport 5002 -j MARK --set-xmark 0x30000/0x30000",
    "-A policy -p udp --dport 5003 -j MARK --xor-mark 0x10007",
    "-A policy -m mark --mark 0x7/0xff -j RETURN",
    "-A policy -p udp --dport 5004 -j MARK --set-xmark 0x10000/0x10000",
    "-A policy -j MARK --or-mark 0x20000",
)


def _exchange(sender, receiver) -> dict[int, list[int]]:  # type: ignore[no-untyped-def]
    """Send SENT datagrams to each port; the mark each one that arrived came with."""
    receivers = {}
    for port in PORTS:
        sock = receiver.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
        sock.bind((str(receiver.ipv4.ip), port))
        sock.settimeout(0.3)
        receivers[port] = sock
    out = sender.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrived: dict[int, list[int]] = {port: [] for port in PORTS}
    try:
        for port in PORTS:
            for _ in range(SENT):
                out.sendto(PAYLOAD, (str(receiver.ipv4.ip), port))
        for port, sock in receivers.items():
            for _ in range(SENT):
                try:
                    _, ancillary, _, _ = sock.recvmsg(2048, socket.CMSG_SPACE(4))
                except TimeoutError:
                    break
                marks = [
                    struct.unpack("=I", data[:4])[0]
                    for level, kind, data in ancillary
                    if (level, kind) == (socket.SOL_SOCKET, socket.SO_MARK)
                ]
                arrived[port].append(marks[0] if marks else 0)
    finally:
        out.close()
        for sock in receivers.values():
            sock.close()
    return arrived


def _counters(table) -> dict:  # type: ignore[no-untyped-def]
    found = {}
    for chain in table.chains.values():
        if chain.builtin:
            found[chain.name, "policy"] = (chain.packets, chain.bytes)
        for index, rule in enumerate(chain.rules, 1):
            found[chain.name, index] = (rule.packets, rule.bytes)
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_marks_decide_the_same_and_reach_the_socket(backend: str) -> None:
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "mark.rules"
            path.write_text(RULES)
            theirs.host.namespace.run(["iptables-legacy-restore", str(path)])
        lifecycle.apply(RULES, "mark.rules", ours.host.namespace.name, backend=backend)
        try:
            by_netfilter = _exchange(theirs.client, theirs.host)
            by_us = _exchange(ours.client, ours.host)
            with theirs.host.namespace.enter():
                kernel = _counters(read_table())
            _, counted = lifecycle.current(ours.host.namespace.name)
        finally:
            lifecycle.flush(ours.host.namespace.name)
    # The marks decide: some ports get everything, others nothing, and what arrives carries
    # a mark the rules gave it.
    assert {len(marks) for marks in by_netfilter.values()} == {0, SENT}, by_netfilter
    assert any(mark for marks in by_netfilter.values() for mark in marks), by_netfilter
    assert by_us == by_netfilter
    model = parse(RULES, "mark.rules")
    for chain in model.chains.values():
        for index in range(1, len(chain.rules) + 1):
            assert counted[(chain.name, index)] == kernel[(chain.name, index)], (
                f"{chain.name} rule {index}"
            )
    assert counted[("INPUT", "policy")] == kernel[("INPUT", "policy")]
