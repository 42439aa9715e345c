"""The generated chain programs against the reference evaluator, case by case: every match and
target, run with BPF_PROG_TEST_RUN; verdict, deciding rule and counters must agree."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from codegen.rules import evaluate, parse
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged
# Every test runs the programs of both code generators; the C one needs bcc.
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

A, B, C, D = "198.18.0.1", "198.18.0.2", "198.19.7.7", "198.18.5.0"

EVERY_MATCH = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:tcpchk - [0:0]
:mid - [0:0]
:deep - [0:0]
-A INPUT -s 198.18.0.0/255.255.0.255 -d 198.18.0.2/32 -p tcp -j tcpchk
-A INPUT ! -s 198.18.0.0/16 -j DROP
-A INPUT -p udp -m udp --sport 1000:2000 ! --dport 53 -j ACCEPT
-A INPUT -p udp -m multiport --dports 53,5353:5360 -m comment --comment "dns and mdns" -j mid
-A INPUT -p icmp -m icmp --icmp-type 3/3 -j ACCEPT
-A INPUT -p icmp -m icmp ! --icmp-type 8 -j DROP
-A INPUT -p icmp -m length --length 100:65535 -j DROP
-A INPUT -p icmp -m ttl --ttl-lt 10 -j DROP
-A INPUT -p icmp -m ttl ! --ttl-eq 64 -j RETURN
-A INPUT -m pkttype --pkt-type broadcast -j DROP
-A INPUT -m mark --mark 0x10/0xf0 -j ACCEPT
-A INPUT -p icmp -m iprange --src-range 198.18.0.1-198.18.0.9 \
! --dst-range 198.18.0.100-198.18.0.200
-A INPUT -f -j ACCEPT
-A INPUT -i eth+ -p icmp -j ACCEPT
-A FORWARD -i eth0 -o eth1 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT
-A FORWARD ! -i eth0 -p tcp -m multiport --ports 80,443 -j ACCEPT
-A FORWARD -p 47 -j ACCEPT
-A FORWARD -p tcp -m tcp ! --syn -g mid
-A tcpchk -p tcp -m tcp --dport 22 -j ACCEPT
-A tcpchk -p tcp -m tcp --sport 0:1023 -j DROP
-A tcpchk -p tcp -m tcp --dport 8000:8080 -j RETURN
-A tcpchk -p tcp -m tcp --tcp-flags SYN,ACK SYN,ACK -j mid
-A mid -m length --length 0:60
-A mid -m ttl --ttl-gt 100 -j DROP
-A mid -j deep
-A mid -p udp -j ACCEPT
-A deep -m ttl --ttl-eq 7 -j ACCEPT
-A deep -m ttl --ttl-eq 8 -j RETURN
-A deep -p tcp -m tcp --dport 9999 -j DROP
COMMIT
"""

PACKETS = [
    ("INPUT", None, None, IP(src=A, dst=B) / TCP(dport=22)),
    ("INPUT", None, None, IP(src=D, dst=B) / TCP(dport=22)),
    ("INPUT", None, None, IP(src=D, dst=B) / TCP(sport=99, dport=23)),
    ("INPUT", None, None, IP(src=D, dst=B) / TCP(sport=5000, dport=8000)),
    ("INPUT", None, None, IP(src=D, dst=B, ttl=7) / TCP(sport=5000, dport=1, flags="SA")),
    ("INPUT", None, None, IP(src=D, dst=B, ttl=8) / TCP(sport=5000, dport=9999, flags="SA")),
    ("INPUT", None, None, IP(src=D, dst=B, ttl=200) / TCP(sport=5000, dport=1, flags="SA")),
    ("INPUT", None, None, IP(src=A, dst=B) / TCP(sport=80, dport=23)),
    ("INPUT", None, None, IP(src=A, dst=B) / TCP(sport=5000, dport=8080)),
    ("INPUT", None, None, IP(src=A, dst=B) / TCP(sport=5000, dport=9000, flags="SA")),
    ("INPUT", None, None, IP(src=A, dst=B, ttl=7) / TCP(sport=5000, dport=9000, flags="SA")),
    ("INPUT", None, None, IP(src=A, dst=B, ttl=8) / TCP(sport=5000, dport=9999, flags="SA")),
    ("INPUT", None, None, IP(src=A, dst=B, ttl=200) / TCP(sport=5000, dport=1, flags="SA")),
    ("INPUT", None, None, IP(src="198.18.3.1", dst=B) / TCP(dport=22)),
    ("INPUT", None, None, IP(src=C, dst=B) / UDP(dport=53)),
    ("INPUT", None, None, IP(src=A, dst=B) / UDP(sport=1500, dport=54)),
    ("INPUT", None, None, IP(src=A, dst=B) / UDP(sport=1500, dport=53)),
    ("INPUT", None, None, IP(src=A, dst=B) / UDP(sport=3000, dport=5355) / Raw(b"x" * 40)),
    ("INPUT", None, None, IP(src=A, dst=B) / ICMP(type=3, code=3)),
    ("INPUT", None, None, IP(src=A, dst=B) / ICMP(type=3, code=1)),
    ("INPUT", "eth0", None, IP(src=A, dst=B) / ICMP(type=8)),
    ("INPUT", "eth0", None, IP(src=A, dst=B) / ICMP(type=8) / Raw(b"x" * 100)),
    ("INPUT", "eth0", None, IP(src=A, dst=B, ttl=5) / ICMP(type=8)),
    ("INPUT", "eth0", None, IP(src=A, dst=B, ttl=63) / ICMP(type=8)),
    ("INPUT", "lo", None, IP(src=A, dst=B) / ICMP(type=8)),
    ("INPUT", "lo", None, IP(src="198.18.0.50", dst=B) / ICMP(type=8)),
    ("INPUT", None, None, IP(src=A, dst=B, proto=99) / Raw(b"abcd")),
    ("INPUT", None, None, IP(src=A, dst=B, flags="MF", frag=0) / UDP(dport=1) / Raw(b"x" * 16)),
    ("INPUT", None, None, IP(src=A, dst=B, frag=3, proto=17) / Raw(b"x" * 16)),
    ("INPUT", None, None, IP(src=A, dst=B, frag=1, proto=6) / Raw(b"x" * 16)),
    ("INPUT", None, None, IP(src=A, dst=B, proto=6) / Raw(b"x" * 10)),
    ("INPUT", None, None, IP(src=A, dst=B, proto=17) / Raw(b"x" * 6)),
    ("INPUT", None, None, IP(src=A, dst=B, proto=1) / Raw(b"x" * 4)),
    ("FORWARD", "eth0", "eth1", IP(src=A, dst=C) / TCP(flags="S")),
    ("FORWARD", "eth0", "eth1", IP(src=A, dst=C) / TCP(flags="SA")),
    ("FORWARD", "eth1", "eth0", IP(src=A, dst=C) / TCP(dport=443, flags="A")),
    ("FORWARD", "eth0", "eth2", IP(src=A, dst=C) / TCP(dport=443, flags="A")),
    ("FORWARD", "eth0", "eth2", IP(src=A, dst=C, ttl=7) / TCP(dport=1, flags="A")),
    ("FORWARD", "eth0", "eth2", IP(src=A, dst=C, ttl=8) / TCP(dport=1, flags="A")),
    ("FORWARD", "eth0", "eth2", IP(src=A, dst=C, proto=47) / Raw(b"gre!")),
    ("OUTPUT", None, "eth0", IP(src=B, dst=A) / UDP(dport=9)),
]

PKT_TYPES = [("INPUT", "broadcast"), ("INPUT", "multicast"), ("INPUT", "otherhost")]
MARKS = [0x10, 0x1F, 0x20, 0x110]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def every_match(backend):
    ruleset = parse(EVERY_MATCH, "every-match.rules")
    with ChainRunner(ruleset, devices=["eth0", "eth1", "eth2", "lo"], backend=backend) as runner:
        yield ruleset, runner


def _check(ruleset, runner, chain, in_iface, out_iface, packet, *, pkt_type="host", mark=0):
    data = bytes(packet)
    expected = evaluate(ruleset, data, chain, in_iface, out_iface, mark=mark, pkt_type=pkt_type)
    got = runner.run(frame_for(data), chain, in_iface, out_iface, mark=mark, pkt_type=pkt_type)
    assert (got.verdict, got.deciding) == (expected.verdict, expected.deciding), packet.summary()
    assert got.counters == expected.counters, packet.summary()


@pytest.mark.parametrize(
    ("chain", "in_iface", "out_iface", "packet"), PACKETS, ids=[p[3].summary() for p in PACKETS]
)
def test_every_match_and_target(every_match, chain, in_iface, out_iface, packet):
    _check(*every_match, chain, in_iface, out_iface, packet)


@pytest.mark.parametrize(("chain", "pkt_type"), PKT_TYPES)
def test_packet_types(every_match, chain, pkt_type):
    _check(*every_match, chain, "eth0", None, IP(src=A, dst=B) / UDP(dport=7), pkt_type=pkt_type)


@pytest.mark.parametrize("mark", MARKS)
def test_marks(every_match, mark):
    _check(*every_match, "INPUT", "eth0", None, IP(src=A, dst=B) / UDP(dport=7), mark=mark)


GOTO_RETURN = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT DROP [0:0]
:a - [0:0]
:b - [0:0]
:c - [0:0]
-A OUTPUT -p udp -j a
-A OUTPUT -p udp -m udp --dport 1 -j ACCEPT
-A OUTPUT -p udp -g c
-A a -m udp -p udp --dport 1:2 -g b
-A a -j RETURN
-A b -m udp -p udp --dport 2 -j DROP
-A b -j RETURN
-A c -p udp -m udp --dport 3 -j ACCEPT
COMMIT
"""


@pytest.mark.parametrize("port", [1, 2, 3, 4])
def test_goto_and_return_resume_where_iptables_does(backend, port):
    ruleset = parse(GOTO_RETURN, "goto.rules")
    with ChainRunner(ruleset, backend=backend) as runner:
        _check(ruleset, runner, "OUTPUT", None, "eth0", IP(src=B, dst=A) / UDP(dport=port))


def test_counters_accumulate_over_packets(every_match):
    ruleset, runner = every_match
    packet = bytes(IP(src=D, dst=B) / TCP(dport=22))  # jumps to tcpchk
    before = runner.counters.read()[("tcpchk", 1)]
    for _ in range(5):
        runner.run(frame_for(packet), "INPUT")
    after = runner.counters.read()[("tcpchk", 1)]
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5 * len(packet))
