"""The reference connection tracker (codegen.rules.tracking) against the kernel's nf_conntrack,
packet by packet.

A client and a host on one veth pair (netns.HostTopology). The host's filter table counts, in
INPUT and in OUTPUT, each packet's ctstate (one rule per state, last, so that a packet has been
through every other rule once its state rule counted it), its direction, three status bits and
its seconds to expiry (in buckets), and drops two kinds of UDP (a dropped first packet, a
dropped reply). The client sends crafted
frames through an AF_PACKET socket (they reach the host's PREROUTING and INPUT); the host sends
crafted packets through an IPPROTO_RAW socket (LOCAL_OUT and OUTPUT). After each packet the
counters that moved are read and compared with what `evaluate_flow` predicts for the same
packets, timed as they were sent.

Noise stays out: the host's raw OUTPUT drops what its kernel sends on its own (RSTs, ICMP
errors, echo replies) before conntrack sees it (the raw table hooks first), and the client drops
everything in its raw PREROUTING, so it never answers. The host runs with the kernel's
default nf_conntrack_tcp_be_liberal=0, as the tracker does: a segment out of window is INVALID
or passes ignored.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet, Raw

from codegen.jiffies import jiffies_now
from codegen.rules import ConnectionTable, FlowStep, Ruleset, evaluate_flow, parse
from codegen.rules.ipt_blob import read_table, write_table
from harness.lab.frames import ETH_P_IP, ethernet, mac, sender
from harness.lab.twin import QUIET_RECEIVER, quiet_host
from netns import HostTopology, Namespace

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

CLIENT, HOST = "198.18.0.1", "198.18.0.2"
EXPIRY_BUCKETS = (
    (0, 0),
    (1, 20),
    (21, 45),
    (46, 90),
    (91, 200),
    (201, 400),
    (401, 1000),
    (400000, 432000),
)
STATES = ("INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED")
COUNTING = [
    "-m conntrack --ctdir REPLY",
    "-m conntrack --ctstatus SEEN_REPLY",
    "-m conntrack --ctstatus ASSURED",
    "-m conntrack --ctstatus CONFIRMED",
    # Seconds to expiry, in buckets around the timeouts (10, 30, 60, 120, 300 and 432,000 s)
    # so that a jiffy more or less never moves a packet to another bucket.
    *(f"-m conntrack --ctexpire {low}:{high}" for low, high in EXPIRY_BUCKETS),
    *(f"-m conntrack --ctstate {state}" for state in STATES),
]
DROPPED_PORT, DROPPED_REPLY_PORT = 9, 7  # UDP to the first, and from the second, is dropped
FIN_DROPPED_PORT = 81  # a FIN to it is dropped
RULES = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    + "".join(f"-A {chain} {rule}\n" for chain in ("INPUT", "OUTPUT") for rule in COUNTING)
    + f"-A INPUT -p udp --dport {DROPPED_PORT} -j DROP\n"
    + f"-A INPUT -p udp --sport {DROPPED_REPLY_PORT} -j DROP\n"
    + f"-A INPUT -p tcp --dport {FIN_DROPPED_PORT} --tcp-flags FIN FIN -j DROP\n"
    + "COMMIT\n"
)
ARRIVAL_TIMEOUT = 10.0  # seconds for a packet sent to show in the host's counters (a bound)
UDP_STREAM_WAIT = 2.2  # seconds: replied UDP after 2 s is a stream (ASSURED)


def to_host(packet: Packet) -> tuple[str, Packet]:
    """A packet the client sends to the host (INPUT)."""
    return "INPUT", IP(src=CLIENT, dst=HOST) / packet


def to_client(packet: Packet) -> tuple[str, Packet]:
    """A packet the host sends to the client (OUTPUT)."""
    return "OUTPUT", IP(src=HOST, dst=CLIENT) / packet


def tcp(sport: int, dport: int, flags: str, seq: int = 0, ack: int = 0, data: bytes = b""):
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192)
    return segment / Raw(data) if data else segment


def quoting(icmp_type: int, code: int, chain: str, inner: Packet) -> tuple[str, Packet]:
    """An ICMP error from `chain`'s sender quoting `inner` (its IP header and 8 bytes)."""
    quoted = bytes(inner)[: (bytes(inner)[0] & 0x0F) * 4 + 8]
    error = ICMP(type=icmp_type, code=code) / Raw(quoted)
    return (to_host if chain == "INPUT" else to_client)(error)


WAIT = "wait"  # a step that only lets time pass (UDP_STREAM_WAIT seconds)

# Each flow: (name, steps); a step is (chain, packet) or WAIT. Client ports are distinct per
# flow so that flows never share an entry.
FLOWS = [
    (
        "tcp out of window: INVALID over the upper bounds, ignored under the lower ones",
        [
            to_host(tcp(40020, 80, "S", 1000)),
            to_client(tcp(80, 40020, "SA", 5000, 1001)),
            to_host(tcp(40020, 80, "A", 1001, 5001)),
            to_host(tcp(40020, 80, "PA", 101001, 5001, b"far")),  # SEQ over the upper bound
            to_host(tcp(40020, 80, "A", 1001, 55001)),  # ACK of data never sent
            to_host(tcp(40020, 80, "PA", 0xFFFFB1E9, 5001, b"old")),  # SEQ under the lower bound
            to_client(tcp(80, 40020, "A", 5001, 0xFFFE7961)),  # ACK under the lower bound
            to_host(tcp(40020, 80, "PA", 1001, 5001, b"in")),
            to_client(tcp(80, 40020, "A", 5001, 1003)),
        ],
    ),
    (
        "tcp handshake, data, FIN close, reopen",
        [
            to_host(tcp(40001, 80, "S", 1000)),
            to_client(tcp(80, 40001, "SA", 5000, 1001)),
            to_host(tcp(40001, 80, "A", 1001, 5001)),
            to_host(tcp(40001, 80, "PA", 1001, 5001, b"hello")),
            to_client(tcp(80, 40001, "A", 5001, 1006)),
            to_host(tcp(40001, 80, "FA", 1006, 5001)),
            to_client(tcp(80, 40001, "FA", 5001, 1007)),
            to_host(tcp(40001, 80, "A", 1007, 5002)),
            to_host(tcp(40001, 80, "S", 9000)),  # TIME_WAIT after a FIN: a new connection
        ],
    ),
    (
        "tcp SYN retransmit, RST close",
        [
            to_host(tcp(40002, 80, "S", 1000)),
            to_host(tcp(40002, 80, "S", 1000)),
            to_client(tcp(80, 40002, "SA", 5000, 1001)),
            to_host(tcp(40002, 80, "A", 1001, 5001)),
            to_host(tcp(40002, 80, "R", 1001)),
            to_host(tcp(40002, 80, "A", 1001, 5001)),  # after the RST: CLOSE, still the entry
        ],
    ),
    (
        "tcp RST in sequence closes; the same side's SYN then opens anew",
        [
            to_host(tcp(40006, 80, "S", 1000)),
            to_client(tcp(80, 40006, "SA", 5000, 1001)),
            to_host(tcp(40006, 80, "A", 1001, 5001)),
            to_host(tcp(40006, 80, "R", 1001)),
            to_host(tcp(40006, 80, "S", 9000)),
        ],
    ),
    (
        "tcp RST from the other side closes; a SYN is then ignored",
        [
            to_host(tcp(40007, 80, "S", 1000)),
            to_client(tcp(80, 40007, "SA", 5000, 1001)),
            to_host(tcp(40007, 80, "A", 1001, 5001)),
            to_client(tcp(80, 40007, "R", 5001)),
            to_host(tcp(40007, 80, "S", 9000)),
        ],
    ),
    (
        "tcp RST out of sequence keeps the connection; one behind it is invalid",
        [
            to_host(tcp(40008, 80, "S", 1000)),
            to_client(tcp(80, 40008, "SA", 5000, 1001)),
            to_host(tcp(40008, 80, "A", 1001, 5001)),
            to_host(tcp(40008, 80, "R", 500)),  # before what the host acknowledged: invalid
            to_host(tcp(40008, 80, "R", 1500)),  # ahead of it: wait for a challenge ACK
            to_host(tcp(40008, 80, "S", 9000)),  # still ESTABLISHED: ignored
        ],
    ),
    (
        "tcp FIN dropped in INPUT: the state moved before the chain",
        [
            to_host(tcp(40009, FIN_DROPPED_PORT, "S", 1000)),
            to_client(tcp(FIN_DROPPED_PORT, 40009, "SA", 5000, 1001)),
            to_host(tcp(40009, FIN_DROPPED_PORT, "A", 1001, 5001)),
            to_host(tcp(40009, FIN_DROPPED_PORT, "FA", 1001, 5001)),  # dropped: FIN_WAIT
            to_client(tcp(FIN_DROPPED_PORT, 40009, "A", 5001, 1002)),  # CLOSE_WAIT: 60 s
        ],
    ),
    (
        "tcp RST answering a SYN",
        [
            to_host(tcp(40003, 80, "S", 1000)),
            to_client(tcp(80, 40003, "RA", 0, 1001)),  # the only reply is a RST: the entry dies
            to_host(tcp(40003, 80, "S", 1000)),
        ],
    ),
    (
        "tcp mid-stream pickup",
        [
            to_host(tcp(40004, 80, "A", 2000, 7000)),
            to_client(tcp(80, 40004, "A", 7000, 2000)),
            to_host(tcp(40004, 80, "PA", 2000, 7000, b"more")),
            to_client(tcp(80, 40004, "A", 7000, 2004)),
        ],
    ),
    (
        "tcp impossible flags, and flags that need an entry",
        [
            to_host(tcp(40005, 80, "SF", 1000)),
            to_host(tcp(40005, 80, "", 1000)),
            to_host(tcp(40005, 80, "FPU", 1000)),  # XMAS
            to_host(tcp(40005, 80, "SR", 1000)),
            to_host(tcp(40005, 80, "F", 1000)),
            to_host(tcp(40005, 80, "SA", 1000, 1)),
            to_host(tcp(40005, 80, "FA", 1000, 1)),
            to_host(tcp(40005, 80, "R", 1000)),
            to_host(tcp(40005, 80, "RA", 1000, 1)),
            to_host(tcp(40005, 80, "SEC", 1000)),  # SYN with ECE and CWR is a SYN
        ],
    ),
    (
        "tcp opened by the host",
        [
            to_client(tcp(40010, 22, "S", 3000)),
            to_host(tcp(22, 40010, "SA", 8000, 3001)),
            to_client(tcp(40010, 22, "A", 3001, 8001)),
            to_host(tcp(22, 40010, "PA", 8001, 3001, b"banner")),
            to_client(tcp(40010, 22, "A", 3001, 8007)),
        ],
    ),
    (
        "udp query and answer, and an error quoting the client's own query",
        [
            to_host(UDP(sport=40020, dport=53) / Raw(b"q")),
            quoting(3, 3, "INPUT", IP(src=CLIENT, dst=HOST) / UDP(sport=40020, dport=53)),
            to_client(UDP(sport=53, dport=40020) / Raw(b"a")),
            to_host(UDP(sport=40020, dport=53) / Raw(b"q2")),
        ],
    ),
    (
        "udp opened by the host, answered, then refused",
        [
            to_client(UDP(sport=5000, dport=40021) / Raw(b"q")),
            to_host(UDP(sport=40021, dport=5000) / Raw(b"a")),
            quoting(3, 3, "INPUT", IP(src=HOST, dst=CLIENT) / UDP(sport=5000, dport=40021)),
        ],
    ),
    (
        "udp stream (ASSURED after 2 s)",
        [
            to_host(UDP(sport=40022, dport=123) / Raw(b"q")),
            to_client(UDP(sport=123, dport=40022) / Raw(b"a")),
            WAIT,
            to_host(UDP(sport=40022, dport=123) / Raw(b"q2")),
            to_client(UDP(sport=123, dport=40022) / Raw(b"a2")),
        ],
    ),
    (
        "udp: a dropped first packet leaves no entry; a dropped reply is still seen",
        [
            to_host(UDP(sport=40023, dport=DROPPED_PORT) / Raw(b"x")),
            to_host(UDP(sport=40023, dport=DROPPED_PORT) / Raw(b"x")),
            to_client(UDP(sport=5001, dport=DROPPED_REPLY_PORT) / Raw(b"q")),
            to_host(UDP(sport=DROPPED_REPLY_PORT, dport=5001) / Raw(b"a")),
            to_client(UDP(sport=5001, dport=DROPPED_REPLY_PORT) / Raw(b"q2")),
        ],
    ),
    (
        "icmp echo, replies, requests and errors",
        [
            to_host(ICMP(type=8, id=1, seq=1)),
            to_client(ICMP(type=0, id=1, seq=1)),
            to_host(ICMP(type=8, id=1, seq=2)),
            to_host(ICMP(type=0, id=99, seq=1)),  # a reply to nothing
            to_host(ICMP(type=13, id=2)),  # timestamp request
            to_host(ICMP(type=9)),  # router advertisement: no connection
            to_host(ICMP(type=30)),  # beyond NR_ICMP_TYPES
            to_client(ICMP(type=8, id=5, seq=1)),
            quoting(11, 0, "INPUT", IP(src=HOST, dst=CLIENT) / ICMP(type=8, id=5, seq=1)),
            quoting(3, 1, "INPUT", IP(src=HOST, dst=CLIENT) / UDP(sport=6000, dport=6001)),
        ],
    ),
    (
        "another protocol (generic)",
        [
            to_host(IP(proto=253) / Raw(b"generic")),
            to_client(IP(proto=253) / Raw(b"generic")),
            to_host(IP(proto=253) / Raw(b"generic")),
        ],
    ),
]


def _restore(namespace: Namespace, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="bpflab-", suffix=".rules") as rules:
        rules.write(text)
        rules.flush()
        namespace.run(["iptables-legacy-restore", rules.name])


def _flatten(packet: Packet) -> bytes:
    # `to_host(IP(proto=253) / ...)` stacks two IP headers: keep the outer one's addresses only.
    if isinstance(packet.payload, IP):
        inner = packet.payload
        packet = IP(src=packet.src, dst=packet.dst, proto=inner.proto) / inner.payload
    return bytes(packet)


class Host:
    """The host of the lab, its counters, and the two ways of sending."""

    def __init__(self, lab: HostTopology, stack: ExitStack) -> None:
        self.lab = lab
        self.namespace = lab.host.namespace
        self.frame = ethernet(mac(lab.host.mac), mac(lab.client.mac), ETH_P_IP)
        self.client_sender = stack.enter_context(sender(lab.client))
        self.raw = stack.enter_context(
            self.namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        )

    def counters(self) -> dict[str, list[int]]:
        with self.namespace.enter():
            table = read_table()
        # The counting rules only: INPUT's DROP rules follow them.
        return {
            chain: [rule.packets for rule in table[chain].rules[: len(COUNTING)]]
            for chain in ("INPUT", "OUTPUT")
        }

    def send(self, chain: str, packet: bytes) -> dict[str, list[int]]:
        """Send `packet` through `chain` and return the counters once its state rule moved."""
        before = self.counters()
        states = slice(len(COUNTING) - len(STATES), len(COUNTING))
        if chain == "INPUT":
            self.client_sender.send(self.frame + packet)
        else:
            self.raw.sendto(packet, (CLIENT, 0))
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while True:
            after = self.counters()
            if sum(after[chain][states]) > sum(before[chain][states]):
                return {
                    name: [new - old for new, old in zip(after[name], before[name], strict=True)]
                    for name in after
                }
            if time.monotonic() > deadline:
                raise AssertionError(f"{chain} never counted {IP(packet).summary()}")
            time.sleep(0.001)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with ExitStack() as stack:
        lab = stack.enter_context(HostTopology(ipv6=False))
        _restore(lab.client.namespace, QUIET_RECEIVER)
        _restore(lab.host.namespace, quiet_host(os.geteuid()))
        with lab.host.namespace.enter():
            write_table(parse(RULES, "tracker.rules"))
        yield Host(lab, stack)


def _expected(ruleset: Ruleset, step: FlowStep, table: ConnectionTable) -> dict[str, list[int]]:
    (result,) = evaluate_flow(ruleset, [step], table)
    moved = {"INPUT": [0] * len(COUNTING), "OUTPUT": [0] * len(COUNTING)}
    for (chain, index), (packets, _) in result.evaluation.counters.items():
        if index != "policy" and int(index) <= len(COUNTING):
            moved[chain][int(index) - 1] += packets
    return moved


def _named(moved: dict[str, list[int]]) -> dict[str, int]:
    return {
        f"{chain} {rule}": count
        for chain, counts in moved.items()
        for rule, count in zip(COUNTING, counts, strict=True)
        if count
    }


@pytest.mark.parametrize(("name", "steps"), FLOWS, ids=[name for name, _ in FLOWS])
def test_tracker_gives_each_packet_the_kernels_state(host: Host, name: str, steps: list) -> None:
    ruleset = parse(RULES, "tracker.rules")
    # The model's clock starts at the kernel's jiffies now: --ctexpire of a new entry reads its
    # timeout against them (codegen.rules.tracking.table), not 0 within minutes of boot.
    table = ConnectionTable(jiffies_origin=jiffies_now())
    start = time.monotonic()
    for number, step in enumerate(steps, 1):
        if step == WAIT:
            time.sleep(UDP_STREAM_WAIT)
            continue
        chain, packet = step
        data = _flatten(packet)
        interfaces = ("eth0", None) if chain == "INPUT" else (None, "eth0")
        # The model's clock is the real one: the kernel's timeouts run on it.
        sent_at = time.monotonic() - start
        kernel = host.send(chain, data)
        flow_step = FlowStep(data, chain, *interfaces, time=sent_at)
        expected = _expected(ruleset, flow_step, table)
        assert _named(kernel) == _named(expected), f"{name}, packet {number}: {packet.summary()}"
