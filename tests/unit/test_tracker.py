"""The reference connection tracker (codegen.rules.tracking), packet by packet: the ctstate,
direction, TCP state, status and expiry nf_conntrack gives each packet of a flow, with every
packet accepted unless a row says otherwise. tests/net/test_tracker_vs_netfilter.py holds the
same kinds of flows to the kernel itself."""

from __future__ import annotations

import math

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Packet, Raw

from codegen.rules import (
    ConnectionTable,
    FlowStep,
    TrackingError,
    evaluate_flow,
    parse,
)
from codegen.rules.packet import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY
from codegen.rules.tracking import Timeouts

CLIENT, HOST = "198.18.0.1", "198.18.0.2"


def to_host(layer: Packet) -> bytes:
    """From the client to the host."""
    return bytes(IP(src=CLIENT, dst=HOST) / layer)


def to_client(layer: Packet) -> bytes:
    """From the host to the client."""
    return bytes(IP(src=HOST, dst=CLIENT) / layer)


def tcp(sport: int, dport: int, flags: str, seq: int = 0, ack: int = 0, data: bytes = b""):
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192)
    return segment / Raw(data) if data else segment


def quote(packet: bytes) -> bytes:
    """What an ICMP error quotes of `packet`: its IP header and 8 bytes."""
    return packet[: (packet[0] & 0x0F) * 4 + 8]


QUERY = to_host(UDP(sport=40000, dport=53) / Raw(b"q"))
HOST_QUERY = to_client(UDP(sport=5000, dport=40001) / Raw(b"q"))
HOST_ECHO = to_client(ICMP(type=8, id=5))

# (flow, [(packet, time, expected)]): expected is "STATE DIRECTION [TCP state]", or INVALID.
# Directions: O original, R reply.
FLOWS = [
    (
        "tcp handshake, data, FIN close",
        [
            (to_host(tcp(1000, 80, "S", 100)), 0, "NEW O SYN_SENT"),
            (to_client(tcp(80, 1000, "SA", 500, 101)), 0, "ESTABLISHED R SYN_RECV"),
            (to_host(tcp(1000, 80, "A", 101, 501)), 0, "ESTABLISHED O ESTABLISHED"),
            (to_host(tcp(1000, 80, "PA", 101, 501, b"data")), 1, "ESTABLISHED O ESTABLISHED"),
            (to_client(tcp(80, 1000, "A", 501, 105)), 1, "ESTABLISHED R ESTABLISHED"),
            (to_host(tcp(1000, 80, "FA", 105, 501)), 2, "ESTABLISHED O FIN_WAIT"),
            (to_client(tcp(80, 1000, "A", 501, 106)), 2, "ESTABLISHED R CLOSE_WAIT"),
            (to_client(tcp(80, 1000, "FA", 501, 106)), 2, "ESTABLISHED R LAST_ACK"),
            (to_host(tcp(1000, 80, "A", 106, 502)), 2, "ESTABLISHED O TIME_WAIT"),
            (to_host(tcp(1000, 80, "S", 900)), 3, "NEW O SYN_SENT"),  # reopened after a FIN
        ],
    ),
    (
        "tcp RST close",
        [
            (to_host(tcp(1001, 80, "S", 100)), 0, "NEW O SYN_SENT"),
            (to_client(tcp(80, 1001, "SA", 500, 101)), 0, "ESTABLISHED R SYN_RECV"),
            (to_host(tcp(1001, 80, "A", 101, 501)), 0, "ESTABLISHED O ESTABLISHED"),
            (to_host(tcp(1001, 80, "R", 50)), 0, "INVALID"),  # behind what the host acknowledged
            (to_host(tcp(1001, 80, "R", 101)), 0, "ESTABLISHED O CLOSE"),
            (to_host(tcp(1001, 80, "S", 900)), 1, "NEW O SYN_SENT"),  # after its own RST: anew
        ],
    ),
    (
        "tcp SYN retransmit, RST answering it",
        [
            (to_host(tcp(1002, 80, "S", 100)), 0, "NEW O SYN_SENT"),
            (to_host(tcp(1002, 80, "S", 100)), 1, "NEW O SYN_SENT"),
            (to_client(tcp(80, 1002, "RA", 0, 101)), 1, "ESTABLISHED R CLOSE"),  # kills the entry
            (to_host(tcp(1002, 80, "A", 101, 1)), 1, "NEW O ESTABLISHED"),  # picked up anew
        ],
    ),
    (
        "tcp mid-stream ACK picked up",
        [
            (to_host(tcp(1003, 80, "A", 100, 500)), 0, "NEW O ESTABLISHED"),
            (to_client(tcp(80, 1003, "A", 500, 100)), 0, "ESTABLISHED R ESTABLISHED"),
            (to_host(tcp(1003, 80, "A", 100, 500)), 0, "ESTABLISHED O ESTABLISHED"),
        ],
    ),
    (
        "tcp flags that are never valid, or need an entry",
        [
            (to_host(tcp(1004, 80, "SF", 100)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "", 100)), 0, "INVALID"),  # NULL
            (to_host(tcp(1004, 80, "FPU", 100)), 0, "INVALID"),  # XMAS
            (to_host(tcp(1004, 80, "SR", 100)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "SA", 100, 1)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "FA", 100, 1)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "F", 100)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "R", 100)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "RA", 100, 1)), 0, "INVALID"),
            (to_host(tcp(1004, 80, "SEC", 100)), 0, "NEW O SYN_SENT"),  # ECE and CWR are fine
        ],
    ),
    (
        "tcp and udp opened by the host: the answers come in ESTABLISHED",
        [
            (to_client(tcp(2000, 22, "S", 300)), 0, "NEW O SYN_SENT"),
            (to_host(tcp(22, 2000, "SA", 800, 301)), 0, "ESTABLISHED R SYN_RECV"),
            (to_client(tcp(2000, 22, "A", 301, 801)), 0, "ESTABLISHED O ESTABLISHED"),
            (HOST_QUERY, 0, "NEW O"),
            (to_host(UDP(sport=40001, dport=5000) / Raw(b"a")), 0, "ESTABLISHED R"),
            (to_host(ICMP(type=3, code=3) / Raw(quote(HOST_QUERY))), 0, "RELATED R"),
        ],
    ),
    (
        "udp query, answer, and ICMP errors",
        [
            (QUERY, 0, "NEW O"),
            (QUERY, 1, "NEW O"),
            (to_client(ICMP(type=3, code=3) / Raw(quote(QUERY))), 1, "RELATED R"),
            # The client cannot refuse its own query: the quoted packet went to the host.
            (to_host(ICMP(type=3, code=3) / Raw(quote(QUERY))), 1, "INVALID"),
            (to_client(UDP(sport=53, dport=40000) / Raw(b"a")), 1, "ESTABLISHED R"),
            (QUERY, 2, "ESTABLISHED O"),
            (
                to_host(ICMP(type=3, code=3) / Raw(quote(to_host(UDP(sport=1, dport=2))))),
                2,
                "INVALID",
            ),
        ],
    ),
    (
        "icmp echo, replies, and errors about it",
        [
            (to_host(ICMP(type=8, id=1, seq=1)), 0, "NEW O"),
            (to_client(ICMP(type=0, id=1, seq=1)), 0, "ESTABLISHED R"),
            (to_host(ICMP(type=8, id=1, seq=2)), 0, "ESTABLISHED O"),
            (to_host(ICMP(type=8, id=2, seq=1)), 0, "NEW O"),  # another id, another entry
            (to_host(ICMP(type=0, id=3)), 0, "INVALID"),  # a reply to nothing
            (to_host(ICMP(type=13, id=4)), 0, "NEW O"),  # timestamp request
            (to_host(ICMP(type=9)), 0, "INVALID"),  # router advertisement
            (to_host(ICMP(type=30)), 0, "INVALID"),  # beyond NR_ICMP_TYPES
            (HOST_ECHO, 0, "NEW O"),
            (to_host(ICMP(type=11) / Raw(quote(HOST_ECHO))), 0, "RELATED R"),
            (to_host(ICMP(type=12) / Raw(quote(HOST_ECHO))), 0, "RELATED R"),
            (
                to_host(ICMP(type=3, code=1) / Raw(quote(to_client(ICMP(type=8, id=6))))),
                0,
                "INVALID",
            ),
            (to_host(ICMP(type=3) / Raw(b"short")), 0, "INVALID"),  # quotes no whole header
        ],
    ),
    (
        "another protocol (generic)",
        [
            (bytes(IP(src=CLIENT, dst=HOST, proto=253) / Raw(b"x")), 0, "NEW O"),
            (bytes(IP(src=HOST, dst=CLIENT, proto=253) / Raw(b"y")), 0, "ESTABLISHED R"),
            (bytes(IP(src=CLIENT, dst=HOST, proto=253) / Raw(b"x")), 0, "ESTABLISHED O"),
        ],
    ),
    (
        "timeouts: udp after 30 s, a SYN after 120 s, an echo after 30 s",
        [
            (to_host(UDP(sport=40002, dport=53)), 0, "NEW O"),
            (to_host(UDP(sport=40002, dport=53)), 29.5, "NEW O"),  # refreshed: 30 s more
            (to_client(UDP(sport=53, dport=40002)), 59.4, "ESTABLISHED R"),
            (to_client(UDP(sport=53, dport=40002)), 89.5, "NEW O"),  # expired: the host's own now
            (to_host(tcp(1005, 80, "S", 100)), 100, "NEW O SYN_SENT"),
            (to_host(tcp(1005, 80, "S", 100)), 219, "NEW O SYN_SENT"),  # does not renew
            (to_client(tcp(80, 1005, "SA", 500, 101)), 220, "INVALID"),  # too late: no entry
            (to_host(ICMP(type=8, id=7)), 300, "NEW O"),
            (to_client(ICMP(type=0, id=7)), 330, "INVALID"),
        ],
    ),
]


def _describe(table: ConnectionTable, packet: bytes, time: float) -> str:
    classification = table.classify(packet, time)
    table.confirm(classification)
    connection = classification.connection
    if connection is None:
        return "INVALID"
    assert classification.entry is not None
    words = [connection.state, connection.direction[0]]
    if classification.entry.tcp_state is not None:
        words.append(classification.entry.tcp_state)
    return " ".join(words)


@pytest.mark.parametrize(("name", "steps"), FLOWS, ids=[name for name, _ in FLOWS])
def test_each_packet_gets_the_state_nf_conntrack_gives_it(name: str, steps: list) -> None:
    table = ConnectionTable()
    got = [_describe(table, packet, time) for packet, time, _ in steps]
    assert got == [expected for _, _, expected in steps]


# (packet, time, status bits, seconds to expiry) as xt_conntrack reads them in the chains.
STATUS_AND_EXPIRY = [
    (to_host(tcp(3000, 80, "S", 100)), 0, 0, 0),  # not confirmed yet, a kernel long up: 0 s
    (to_client(tcp(80, 3000, "SA", 500, 101)), 0.5, IPS_CONFIRMED | IPS_SEEN_REPLY, 60),
    (
        to_host(tcp(3000, 80, "A", 101, 501)),
        1,
        IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
        432000,
    ),
    (
        to_host(tcp(3000, 80, "PA", 101, 501, b"x")),
        2,
        IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
        300,
    ),
    (
        to_client(tcp(80, 3000, "A", 501, 102)),
        2,
        IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED,
        432000,
    ),
    (to_host(tcp(3000, 80, "R", 102)), 3, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, 10),
    (to_host(UDP(sport=3001, dport=53)), 10, 0, 0),
    (to_client(UDP(sport=53, dport=3001)), 11, IPS_CONFIRMED | IPS_SEEN_REPLY, 30),
    (to_host(UDP(sport=3001, dport=53)), 11.5, IPS_CONFIRMED | IPS_SEEN_REPLY, 30),
    (to_host(UDP(sport=3001, dport=53)), 13, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, 120),
    (to_host(tcp(3002, 80, "A", 1, 1)), 20, 0, 0),
    (to_client(tcp(80, 3002, "A", 1, 1)), 20.25, IPS_CONFIRMED | IPS_SEEN_REPLY, 300),  # picked up
]


def test_status_and_expiry_are_what_xt_conntrack_reads() -> None:
    table = ConnectionTable(jiffies_origin=1 << 30, hz=250)  # 49 days up at HZ 250
    got = []
    for packet, time, _, _ in STATUS_AND_EXPIRY:
        classification = table.classify(packet, time)
        table.confirm(classification)
        assert classification.connection is not None
        got.append((classification.connection.status, classification.connection.expires))
    assert got == [(status, expires) for _, _, status, expires in STATUS_AND_EXPIRY]


@pytest.mark.parametrize(
    ("origin", "syn", "udp"),
    [
        (0, 120, 20),  # 300 s up: jiffies 0; the SYN at 0 s reads its 120 s, UDP's 30 at 10 s
        (30 * 250, 90, 0),  # 330 s up: both less by 30 s, UDP's past
        (1 << 30, 0, 0),  # 49 days up: jiffies past every timeout
        ((1 << 31) + 250_000, 8_589_054, 8_589_054 - 100),  # the later half of the wrap
    ],
)
def test_a_new_entry_reads_its_relative_timeout_against_the_jiffies(
    origin: int, syn: int, udp: int
) -> None:
    # nf_ct_expires of an unconfirmed entry, max(0, (s32)(timeout - jiffies)) / HZ, at HZ 250:
    # at (1 << 31) + 250_000 jiffies the s32 of 30,000 - jiffies wraps to 2**31 - 220,000.
    table = ConnectionTable(jiffies_origin=origin, hz=250)
    first = table.classify(to_host(tcp(3000, 80, "S", 100)), 0)
    later = table.classify(to_host(UDP(sport=3001, dport=53)), 10)
    assert first.connection is not None and later.connection is not None
    assert (first.connection.expires, later.connection.expires) == (syn, udp)
    table.confirm(first)  # confirmed: its deadline, whatever the jiffies
    assert first.entry is not None
    again = table.classify(to_host(tcp(3000, 80, "S", 100)), 1).connection
    assert again is not None and again.expires == math.floor(first.entry.deadline - 1)


RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp --dport 9 -j DROP
-A INPUT -p udp --sport 7 -j DROP
COMMIT
"""


def test_a_dropped_first_packet_leaves_no_entry_and_a_dropped_reply_still_counts() -> None:
    ruleset = parse(RULES, "drops.rules")
    table = ConnectionTable()
    steps = [
        FlowStep(to_host(UDP(sport=4000, dport=9)), "INPUT", "eth0", time=0),
        FlowStep(to_host(UDP(sport=4000, dport=9)), "INPUT", "eth0", time=1),
        FlowStep(to_client(UDP(sport=5000, dport=7)), "OUTPUT", None, "eth0", time=2),
        FlowStep(to_host(UDP(sport=7, dport=5000)), "INPUT", "eth0", time=3),
        FlowStep(to_client(UDP(sport=5000, dport=7)), "OUTPUT", None, "eth0", time=4),
    ]
    results = evaluate_flow(ruleset, steps, table)
    assert [(r.evaluation.verdict, r.connection and r.connection.state) for r in results] == [
        ("DROP", "NEW"),
        ("DROP", "NEW"),
        ("ACCEPT", "NEW"),
        ("DROP", "ESTABLISHED"),
        ("ACCEPT", "ESTABLISHED"),  # SEEN_REPLY was set before the reply was dropped
    ]
    assert len(table.entries(4)) == 1
    assert table.entries(40) == []


def test_a_dropped_tcp_segment_has_moved_the_state_already() -> None:
    ruleset = parse(RULES.replace("-p udp --dport 9", "-p tcp --tcp-flags FIN FIN"), "fin.rules")
    table = ConnectionTable()
    steps = [
        FlowStep(to_host(tcp(1000, 80, "S", 100)), "INPUT", "eth0"),
        FlowStep(to_client(tcp(80, 1000, "SA", 500, 101)), "OUTPUT", None, "eth0"),
        FlowStep(to_host(tcp(1000, 80, "A", 101, 501)), "INPUT", "eth0"),
        FlowStep(to_host(tcp(1000, 80, "FA", 101, 501)), "INPUT", "eth0"),
    ]
    results = evaluate_flow(ruleset, steps, table)
    assert results[-1].evaluation.verdict == "DROP"
    (entry,) = table.entries(0)
    assert entry.tcp_state == "FIN_WAIT"


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (bytes(IP(src=CLIENT, dst=HOST, flags="MF") / UDP()), "fragment"),
        (bytes(IP(src=CLIENT, dst=HOST, frag=3) / Raw(b"12345678")), "fragment"),
        (bytes(IP(src=CLIENT, dst=HOST, proto=132) / Raw(b"sctp")), "SCTP"),
        (b"\x60" + bytes(39), "IPv4"),
    ],
)
def test_what_the_tracker_does_not_follow_is_refused(packet: bytes, error: str) -> None:
    with pytest.raises(TrackingError, match=error):
        ConnectionTable().classify(packet, 0)


def test_flow_time_never_goes_back() -> None:
    steps = [FlowStep(QUERY, "INPUT", "eth0", time=5), FlowStep(QUERY, "INPUT", "eth0", time=4)]
    with pytest.raises(ValueError, match="went back"):
        evaluate_flow(parse(RULES, "drops.rules"), steps)


def test_loose_zero_picks_nothing_up() -> None:
    table = ConnectionTable(loose=False)
    assert table.classify(to_host(tcp(1000, 80, "A", 1, 1)), 0).connection is None
    assert table.classify(to_host(tcp(1000, 80, "S", 1)), 0).connection is not None


OUT_OF_WINDOW = [
    (to_host(tcp(4000, 80, "S", 1000)), "NEW O SYN_SENT"),
    (to_client(tcp(80, 4000, "SA", 5000, 1001)), "ESTABLISHED R SYN_RECV"),
    (to_host(tcp(4000, 80, "A", 1001, 5001)), "ESTABLISHED O ESTABLISHED"),
    (to_host(tcp(4000, 80, "PA", 101001, 5001, b"far")), "INVALID"),  # SEQ over the upper bound
    (to_host(tcp(4000, 80, "A", 1001, 55001)), "INVALID"),  # ACK of data never sent
    (to_host(tcp(4000, 80, "FA", 0xFFFFB1E9, 5001)), "ESTABLISHED O ESTABLISHED"),  # too old
    (to_host(tcp(4000, 80, "PA", 1001, 5001, b"in")), "ESTABLISHED O ESTABLISHED"),
]


@pytest.mark.parametrize("liberal", [0, 1])
def test_a_segment_out_of_window_is_what_be_liberal_makes_it(liberal: int) -> None:
    """nf_conntrack_tcp_be_liberal=0 (the kernel's default): over the window's upper bounds a
    segment is INVALID; under its lower bounds it passes with the entry unmoved (the old FIN
    closes nothing). With 1 every one is accepted, and the far segment and the old FIN move
    the state as any other would."""
    table = ConnectionTable(timeouts=Timeouts(tcp_be_liberal=liberal))
    got = [_describe(table, packet, 0) for packet, _ in OUT_OF_WINDOW]
    if not liberal:
        assert got == [expected for _, expected in OUT_OF_WINDOW]
    else:
        assert "INVALID" not in got
        assert got[5] == "ESTABLISHED O FIN_WAIT"
