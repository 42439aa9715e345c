"""The LOG line (codegen.rules.extensions.log_line) part by part, as nf_log_syslog.c writes it:
IP header fields and flags, fragments, IP and TCP options with their flags, TCP, UDP, ICMP
(echo, errors quoting a packet one level deep, redirects, parameter problems, MTU), AH/ESP,
other protocols, MAC= and --log-macdecode, MARK=, and the INCOMPLETE/TRUNCATED cases of short
packets. The lines the kernel itself prints for such packets are compared in
tests/net/test_log_vs_netfilter.py; the reference evaluator's LOG rules are listed in order."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from codegen.rules import evaluate, parse
from codegen.rules.extensions.log import Log
from codegen.rules.extensions.log_line import LoggedPacket, log_line

SRC, DST = "198.18.0.1", "198.18.0.2"
MAC = bytes.fromhex("0200000000020200000000010800")
SEQ, TCPOPT, IPOPT, MACDECODE = 0x01, 0x02, 0x04, 0x20
HEAD = f"SRC={SRC} DST={DST} "


def ip(**fields: object) -> IP:
    return IP(src=SRC, dst=DST, id=7, ttl=9, **fields)


SYN = TCP(sport=1111, dport=22, seq=1000, ack=5, flags="S", window=1234)
OPTIONS = [("MSS", 1460), ("NOP", None), ("WScale", 7)]
QUOTED = bytes(IP(src=DST, dst=SRC, id=3, ttl=1) / UDP(sport=53, dport=4000))

# (name, packet bytes, flags, packet fields, the line after the prefix "p: ")
CASES = [
    (
        "tcp at input with MAC",
        bytes(ip() / SYN),
        0,
        {"in_device": "eth0", "mac": MAC},
        "IN=eth0 OUT= MAC=02:00:00:00:00:02:02:00:00:00:00:01:08:00 "
        + HEAD
        + "LEN=40 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP SPT=1111 DPT=22 WINDOW=1234 "
        "RES=0x00 SYN URGP=0 ",
    ),
    (
        "tos and precedence, DF",
        bytes(ip(tos=0xB8, flags="DF") / SYN),
        0,
        {"out_device": "eth1"},
        "IN= OUT=eth1 " + HEAD + "LEN=40 TOS=0x18 PREC=0xA0 TTL=9 ID=7 DF PROTO=TCP SPT=1111 "
        "DPT=22 WINDOW=1234 RES=0x00 SYN URGP=0 ",
    ),
    (
        "every tcp flag, sequence and options",
        bytes(
            ip()
            / TCP(
                sport=1,
                dport=2,
                seq=4294967295,
                ack=17,
                flags="FSRPAUEC",
                window=0,
                urgptr=9,
                options=OPTIONS,
            )
        ),
        SEQ | TCPOPT,
        {},
        "IN= OUT= " + HEAD + "LEN=48 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP SPT=1 DPT=2 "
        "SEQ=4294967295 ACK=17 WINDOW=0 RES=0x00 CWR ECE URG ACK PSH RST SYN FIN URGP=9 "
        "OPT (020405B401030307) ",
    ),
    (
        "tcp options without the flag",
        bytes(ip() / TCP(sport=1, dport=2, flags="A", window=5, options=OPTIONS)),
        SEQ,
        {},
        "IN= OUT= " + HEAD + "LEN=48 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP SPT=1 DPT=2 "
        "SEQ=0 ACK=0 WINDOW=5 RES=0x00 ACK URGP=0 ",
    ),
    (
        "tcp reserved bits and AE",
        bytes(ip() / TCP(sport=1, dport=2, flags="AN", window=5, reserved=3)),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=40 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP SPT=1 DPT=2 "
        "WINDOW=5 RES=0x18 AE ACK URGP=0 ",
    ),
    (
        "ip options with the flag",
        bytes(ip(options=b"\x07\x03\x04\x00") / UDP(sport=5, dport=6) / b"x"),
        IPOPT,
        {},
        "IN= OUT= " + HEAD + "LEN=33 TOS=0x00 PREC=0x00 TTL=9 ID=7 OPT (07030400) "
        "PROTO=UDP SPT=5 DPT=6 LEN=9 ",
    ),
    (
        "ip options without the flag",
        bytes(ip(options=b"\x07\x03\x04\x00") / UDP(sport=5, dport=6) / b"x"),
        TCPOPT,
        {},
        "IN= OUT= " + HEAD + "LEN=33 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=UDP SPT=5 DPT=6 LEN=9 ",
    ),
    (
        "udp and a mark",
        bytes(ip() / UDP(sport=2222, dport=9999) / b"hello"),
        0,
        {"mark": 0xBEEF},
        "IN= OUT= " + HEAD + "LEN=33 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=UDP SPT=2222 "
        "DPT=9999 LEN=13 MARK=0xbeef ",
    ),
    (
        "first fragment: ports",
        bytes(ip(flags="MF") / UDP(sport=1, dport=2, len=1000) / (b"x" * 16)),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=44 TOS=0x00 PREC=0x00 TTL=9 ID=7 MF PROTO=UDP SPT=1 DPT=2 "
        "LEN=1000 ",
    ),
    (
        "later fragment: no ports",
        bytes(ip(flags="MF", frag=185, proto=6) / (b"\x00" * 24)),
        SEQ,
        {"mark": 1},
        "IN= OUT= " + HEAD + "LEN=44 TOS=0x00 PREC=0x00 TTL=9 ID=7 MF FRAG:185 PROTO=TCP MARK=0x1 ",
    ),
    (
        "later icmp fragment, CE bit",
        bytes(ip(flags=4, frag=3, proto=1) / (b"\x00" * 8)),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=28 TOS=0x00 PREC=0x00 TTL=9 ID=7 CE FRAG:3 PROTO=ICMP ",
    ),
    (
        "icmp echo",
        bytes(ip() / ICMP(type=8, id=7, seq=1) / b"ping"),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=32 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=8 CODE=0 "
        "ID=7 SEQ=1 ",
    ),
    (
        "icmp port unreachable quoting udp",
        bytes(ip() / ICMP(type=3, code=3) / QUOTED),
        0,
        {"mark": 2},
        "IN= OUT= " + HEAD + "LEN=56 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=3 CODE=3 "
        f"[SRC={DST} DST={SRC} LEN=28 TOS=0x00 PREC=0x00 TTL=1 ID=3 PROTO=UDP SPT=53 DPT=4000 "
        "LEN=8 ] MARK=0x2 ",
    ),
    (
        "fragmentation needed: MTU, a quoted tcp header cut short",
        bytes(
            ip()
            / ICMP(type=3, code=4, nexthopmtu=1400)
            / bytes(IP(src=DST, dst=SRC, id=3, ttl=1) / SYN)[:28]
        ),
        SEQ,
        {},
        "IN= OUT= " + HEAD + "LEN=56 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=3 CODE=4 "
        f"[SRC={DST} DST={SRC} LEN=40 TOS=0x00 PREC=0x00 TTL=1 ID=3 PROTO=TCP "
        "INCOMPLETE [8 bytes] ] MTU=1400 ",
    ),
    (
        "time exceeded quoting a truncated header",
        bytes(ip() / ICMP(type=11, code=0) / QUOTED[:20]),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=48 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=11 CODE=0 "
        f"[SRC={DST} DST={SRC} LEN=28 TOS=0x00 PREC=0x00 TTL=1 ID=3 PROTO=UDP "
        "INCOMPLETE [0 bytes] ] ",
    ),
    (
        "icmp error too short for its quote",
        bytes(ip() / ICMP(type=3, code=1) / b"\x45\x00\x00"),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=31 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=3 CODE=1 "
        "INCOMPLETE [11 bytes] ",
    ),
    (
        "redirect: gateway and the quote",
        bytes(ip() / ICMP(type=5, code=1, gw="198.18.0.254") / QUOTED),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=56 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=5 CODE=1 "
        f"GATEWAY=198.18.0.254 [SRC={DST} DST={SRC} LEN=28 TOS=0x00 PREC=0x00 TTL=1 ID=3 "
        "PROTO=UDP SPT=53 DPT=4000 LEN=8 ] ",
    ),
    (
        "parameter problem",
        bytes(ip() / ICMP(type=12, code=0, ptr=20) / QUOTED),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=56 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=12 CODE=0 "
        "PARAMETER=20 ",
    ),
    (
        "icmp header cut short",
        bytes(ip(proto=1) / b"\x08\x00\x00"),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=23 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP "
        "INCOMPLETE [3 bytes] ",
    ),
    (
        "timestamp request too short",
        bytes(ip(proto=1) / bytes([13]) / (b"\x00" * 11)),
        0,
        {"mark": 3},
        "IN= OUT= " + HEAD + "LEN=32 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ICMP TYPE=13 CODE=0 "
        "INCOMPLETE [12 bytes] MARK=0x3 ",
    ),
    (
        "tcp header cut short: no mark",
        bytes(ip(proto=6) / b"\x00\x01\x00\x02"),
        0,
        {"mark": 4},
        "IN= OUT= " + HEAD + "LEN=24 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP INCOMPLETE [4 bytes] ",
    ),
    (
        "tcp options cut short",
        bytes(ip() / TCP(sport=1, dport=2, flags="S", window=1, options=OPTIONS))[:44],
        TCPOPT,
        {"mark": 4},
        "IN= OUT= " + HEAD + "LEN=48 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=TCP SPT=1 DPT=2 "
        "WINDOW=1 RES=0x00 SYN URGP=0 OPT (TRUNCATED)",
    ),
    (
        "udp header cut short",
        bytes(ip(proto=17) / b"\x00\x01\x00\x02\x00"),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=25 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=UDP INCOMPLETE [5 bytes] ",
    ),
    (
        "ip options cut short",
        bytes(ip(options=b"\x07\x07\x04" + b"\x00" * 5) / UDP())[:24],
        IPOPT,
        {},
        "IN= OUT= " + HEAD + "LEN=36 TOS=0x00 PREC=0x00 TTL=9 ID=7 TRUNCATED",
    ),
    ("no ip header", bytes(ip())[:19], 0, {"in_device": "eth0"}, "IN=eth0 OUT= MAC= TRUNCATED"),
    (
        "esp",
        bytes(ip(proto=50) / bytes.fromhex("0000abcd00000001")),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=28 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=ESP SPI=0xabcd ",
    ),
    (
        "ah",
        bytes(ip(proto=51) / bytes.fromhex("0601000000001234000000010000000000000000")),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=40 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=AH SPI=0x1234 ",
    ),
    (
        "later esp fragment",
        bytes(ip(proto=50, frag=1) / (b"\x00" * 8)),
        0,
        {},
        "IN= OUT= " + HEAD + "LEN=28 TOS=0x00 PREC=0x00 TTL=9 ID=7 FRAG:1 PROTO=ESP ",
    ),
    (
        "other protocol",
        bytes(ip(proto=47) / (b"\x00" * 4)),
        0,
        {"mark": 0xFFFFFFFF},
        "IN= OUT= " + HEAD + "LEN=24 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 MARK=0xffffffff ",
    ),
    (
        "macdecode on ethernet",
        bytes(ip(proto=47)),
        MACDECODE,
        {"in_device": "eth0", "out_device": "eth1", "mac": MAC},
        "IN=eth0 OUT=eth1 MACSRC=02:00:00:00:00:01 MACDST=02:00:00:00:00:02 MACPROTO=0800 "
        + HEAD
        + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
    (
        "macdecode on another device type",
        bytes(ip(proto=47)),
        MACDECODE,
        {"in_device": "lo", "mac": bytes(12) + b"\x08\x00", "ethernet": False},
        "IN=lo OUT= MAC=00:00:00:00:00:00:00:00:00:00:00:00:08:00 "
        + HEAD
        + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
    (
        "no MAC= without an in-device",
        bytes(ip(proto=47)),
        MACDECODE,
        {"out_device": "eth1", "mac": MAC},
        "IN= OUT=eth1 " + HEAD + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
    (
        "bridged: both ports after the bridge",
        bytes(ip(proto=47)),
        0,
        {"in_device": "br0", "out_device": "br0", "phys_in": "p1", "phys_out": "p2", "mac": MAC},
        "IN=br0 OUT=br0 PHYSIN=p1 PHYSOUT=p2 MAC=" + MAC.hex(":") + " " + HEAD
        + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
    (
        "to the bridge: the in-port alone",
        bytes(ip(proto=47)),
        MACDECODE,
        {"in_device": "br0", "phys_in": "p1", "mac": MAC},
        "IN=br0 OUT= PHYSIN=p1 MACSRC=" + MAC[6:12].hex(":") + " MACDST=" + MAC[:6].hex(":")
        + " MACPROTO=" + MAC[12:14].hex() + " " + HEAD
        + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
    (
        "a port that is the device itself is not repeated",
        bytes(ip(proto=47)),
        0,
        {"in_device": "p1", "phys_in": "p1", "mac": MAC},
        "IN=p1 OUT= MAC=" + MAC.hex(":") + " " + HEAD
        + "LEN=20 TOS=0x00 PREC=0x00 TTL=9 ID=7 PROTO=47 ",
    ),
]


@pytest.mark.parametrize(
    ("packet", "flags", "fields", "line"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_the_line_is_the_kernels(packet: bytes, flags: int, fields: dict, line: str) -> None:
    assert log_line(Log(prefix="p: ", flags=flags), LoggedPacket(packet, **fields)) == "p: " + line


def test_without_a_prefix_the_line_starts_with_in() -> None:
    line = log_line(Log(), LoggedPacket(bytes(ip(proto=47))))
    assert line.startswith("IN= OUT= SRC=") and line.endswith("PROTO=47 ")


RULES = """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:audit - [0:0]
-A INPUT -p udp -j LOG --log-prefix "one: "
-A INPUT -j audit
-A INPUT -p tcp -j LOG --log-prefix "tcp: "
-A INPUT -j LOG --log-prefix "last: " --log-level 6
-A audit -p udp -j LOG --log-prefix "audit: "
-A audit -p udp -j RETURN
-A audit -j LOG --log-prefix "not udp: "
COMMIT
"""


@pytest.mark.parametrize(
    ("packet", "fired"),
    [
        (ip() / UDP(), [("INPUT", 1), ("audit", 1), ("INPUT", 4)]),
        (ip() / SYN, [("audit", 3), ("INPUT", 3), ("INPUT", 4)]),
        (ip(proto=47), [("audit", 3), ("INPUT", 4)]),
    ],
)
def test_the_evaluator_lists_the_log_rules_that_fired_in_order(packet: IP, fired: list) -> None:
    ruleset = parse(RULES, "log")
    evaluation = evaluate(ruleset, bytes(packet), "INPUT", "eth0", None)
    assert evaluation.verdict == "DROP" and evaluation.deciding == ("INPUT", "policy")
    assert list(evaluation.logged) == fired
    for chain, index in evaluation.logged:
        assert isinstance(ruleset.chains[chain].rules[index - 1].target, Log)
