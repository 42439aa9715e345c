"""`-j CONNMARK` and `-m connmark` in the generated programs (both backends) under
BPF_PROG_TEST_RUN, against the reference, flow by flow: each packet's verdict, deciding rule,
counters and the skb mark it leaves with, and after each flow the mark of every connection in
the programs' table against the reference table's.

The rule sets are the way firewalls use connection marks (restore the packet's mark from the
connection, classify a new connection in a user chain, save its mark; a connection whose first
packet is dropped keeps no mark) and every operation with shifts and masks. The flows carry the
cases that tell a tracker's mark apart: a NEW packet's entry (its mark kept only if accepted),
a known connection's (changed even when the packet is then dropped), a RELATED ICMP error (it
marks its master), and an INVALID packet (no connection: CONNMARK does nothing, and
`-m connmark`, negated or not, does not match)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from codegen.rules import ConnectionTable, FlowStep, evaluate_flow, parse, write
from harness.backends import BACKENDS
from harness.runner import ChainRunner, frame_for
from tests.net.test_tracker_vs_netfilter import _flatten

pytestmark = pytest.mark.privileged

HOST, PEER = "198.18.0.2", "198.18.0.1"

# Restore the mark, accept what is marked; a new connection is classified in a user chain and
# its mark saved before a DROP for port 80 (that entry is never confirmed: its mark dies with
# it). OUTPUT reads the connection's mark and marks it again, shifted.
CLASSIFY = """*filter
:classify - [0:0]
-A INPUT -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff
-A INPUT -m mark ! --mark 0x0/0xff -j ACCEPT
-A INPUT -m conntrack --ctstate NEW -j classify
-A INPUT -m connmark --mark 0x2/0xff -j DROP
-A INPUT -m connmark ! --mark 0x0 -j ACCEPT
-A classify -p tcp --dport 22 -j MARK --set-xmark 0x1/0xff
-A classify -p tcp --dport 80 -j MARK --set-xmark 0x2/0xff
-A classify -p udp -j MARK --set-xmark 0x3/0xff
-A classify -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff
-A classify -p tcp --dport 80 -j DROP
-A OUTPUT -m connmark --mark 0x1/0xff -j ACCEPT
-A OUTPUT -j CONNMARK --set-xmark 0x5/0xf --left-shift-mark 4
-A OUTPUT -m connmark --mark 0x50/0xf0 -j ACCEPT
-A OUTPUT -m connmark ! --mark 0x50/0xf0 -j DROP
COMMIT
"""

# Every operation: the packet's own mark (the run sets it) saved with masks and shifts, the
# connection's changed by xor/and/or/set, restored with shifts, each read back by counters.
OPERATIONS = """*filter
-A INPUT -j CONNMARK --save-mark --nfmask 0xf0f --ctmask 0xffff --left-shift-mark 4
-A INPUT -m connmark --mark 0x10/0xf0 -j CONNMARK --xor-mark 0x80000001
-A INPUT -m connmark --mark 0x80000000/0x80000000
-A INPUT -j CONNMARK --and-mark 0xff00ffff
-A INPUT -j CONNMARK --or-mark 0x300
-A INPUT -p tcp -j CONNMARK --set-mark 0x40/0xf0 --right-shift-mark 1
-A INPUT -m connmark --mark 0x20/0x70
-A INPUT -j CONNMARK --restore-mark --ctmask 0xff0 --nfmask 0xff --right-shift-mark 4
-A INPUT -m mark --mark 0x2/0xf
-A INPUT -m connmark ! --mark 0x0/0x1 -j DROP
-A OUTPUT -j CONNMARK --restore-mark --mask 0xffffffff
-A OUTPUT -m mark --mark 0x0 -j DROP
-A OUTPUT -j CONNMARK --set-xmark 0x0/0x0
-A OUTPUT -m connmark --mark 0x0/0xffffff00 -j CONNMARK --save-mark --right-shift-mark 31
COMMIT
"""

RULESETS = {"classify": CLASSIFY, "operations": OPERATIONS}


def _tcp(inbound: bool, port: int, flags: str, seq: int, ack: int = 0) -> bytes:
    src, dst = (PEER, HOST) if inbound else (HOST, PEER)
    sport, dport = (40000, port) if inbound else (port, 40000)
    return _flatten(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                               ack=ack, window=8192))  # fmt: skip


def _error_about(port: int) -> bytes:
    """An ICMP port unreachable from the peer about our packet of the connection to `port`."""
    quoted = bytes(IP(src=HOST, dst=PEER) / TCP(sport=port, dport=40000, flags="SA"))[:28]
    return _flatten(IP(src=PEER, dst=HOST) / ICMP(type=3, code=3) / quoted)


def _handshake(port: int) -> list[tuple[str, bytes]]:
    return [
        ("INPUT", _tcp(True, port, "S", 1000)),
        ("OUTPUT", _tcp(False, port, "SA", 5000, 1001)),
        ("INPUT", _tcp(True, port, "A", 1001, 5001)),
        ("INPUT", _tcp(True, port, "PA", 1001, 5001)),
    ]


UDP_OUT = _flatten(IP(src=HOST, dst=PEER) / UDP(sport=53, dport=4000) / b"a")
FLOWS = {
    "ssh": _handshake(22),
    "web": _handshake(80),  # dropped while NEW: no entry, no mark
    "other": _handshake(443),
    "udp": [
        ("INPUT", _flatten(IP(src=PEER, dst=HOST) / UDP(sport=4000, dport=53) / b"q")),
        ("OUTPUT", UDP_OUT),
        ("OUTPUT", UDP_OUT),
    ],
    "related": [*_handshake(22)[:2], ("INPUT", _error_about(22)), *_handshake(22)[2:]],
    "invalid": [("INPUT", _tcp(True, 22, "A", 1, 1)), ("OUTPUT", _tcp(False, 22, "A", 1, 1))],
}
MARKS = (0, 0x1, 0x121, 0xFFFFFFFF)  # the skb mark each packet arrives with


def _table_marks(entries, original) -> dict:
    return {original(entry): entry.mark for entry in entries}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(RULESETS))
def test_connection_marks_as_the_reference(name: str, backend: str) -> None:
    ruleset = parse(RULESETS[name], name)
    marked = 0
    with ChainRunner(ruleset, backend=backend) as runner:
        assert runner.tracker is not None
        for flow_name, packets in FLOWS.items():
            for mark in MARKS:
                steps = [
                    FlowStep(packet, chain, *(("eth0", None) if chain == "INPUT" else
                                              (None, "eth0")), time=i * 0.001, mark=mark)
                    for i, (chain, packet) in enumerate(packets)
                ]  # fmt: skip
                table = ConnectionTable()
                expected = evaluate_flow(ruleset, steps, table)
                runner.tracker.flush()
                for number, (step, want) in enumerate(zip(steps, expected, strict=True), 1):
                    got = runner.run(frame_for(step.packet), step.chain, step.in_iface,
                                     step.out_iface, mark=mark, time=step.time)  # fmt: skip
                    evaluation = want.evaluation
                    where = f"{write(ruleset)}{flow_name}, mark {mark:#x}, packet {number}"
                    said = (got.verdict, got.deciding, got.counters, got.mark)
                    wanted = (evaluation.verdict, evaluation.deciding, evaluation.counters,
                              evaluation.mark)  # fmt: skip
                    assert said == wanted, where
                ours = {(e.orig.src, e.orig.sport, e.orig.dport): e.mark
                        for e in runner.tracker.entries()}  # fmt: skip
                theirs = {(e.original.src, e.original.sport, e.original.dport): e.mark
                          for e in table.entries(steps[-1].time)}  # fmt: skip
                assert ours == theirs, f"{flow_name}, mark {mark:#x}: connection marks"
                marked += sum(1 for value in theirs.values() if value)
    assert marked >= len(MARKS), "the flows left too few connections marked to tell"
