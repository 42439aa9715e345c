"""The reference evaluator against hand-worked ipt_do_table outcomes: verdict, deciding rule and
every counter that moved."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from codegen.rules import evaluate, parse
from codegen.rules.packet import PacketError

HEAD = "*filter\n:INPUT {i} [0:0]\n:FORWARD {f} [0:0]\n:OUTPUT ACCEPT [0:0]\n"
A, B = "198.18.0.1", "198.18.0.2"


def tcp(dport: int = 22, flags: str = "S", **ip: object) -> bytes:
    return bytes(IP(src=A, dst=B, **ip) / TCP(sport=40000, dport=dport, flags=flags))


def udp(dport: int = 53, sport: int = 5353, **ip: object) -> bytes:
    return bytes(IP(src=A, dst=B, **ip) / UDP(sport=sport, dport=dport))


def icmp(type: int = 8, code: int = 0, **ip: object) -> bytes:
    return bytes(IP(src=A, dst=B, **ip) / ICMP(type=type, code=code))


def truncated(proto: int, size: int, **ip: object) -> bytes:
    """A valid IP packet whose transport header is only `size` bytes long."""
    return bytes(IP(src=A, dst=B, proto=proto, **ip) / Raw(b"\x00" * size))


def fragment(proto: int, offset: int, payload: bytes = b"\x00" * 24) -> bytes:
    return bytes(IP(src=A, dst=B, proto=proto, frag=offset) / Raw(payload))


def rules(body: str, input_policy: str = "ACCEPT", forward_policy: str = "ACCEPT") -> str:
    return HEAD.format(i=input_policy, f=forward_policy) + body + "COMMIT\n"


JUMPS = rules(
    ":a - [0:0]\n:b - [0:0]\n:c - [0:0]\n"
    "-A INPUT -p tcp --dport 22 -j a\n"
    "-A INPUT -p tcp -j ACCEPT\n"
    "-A a -s 198.18.0.9 -j DROP\n"
    "-A a -p tcp --dport 22 -g b\n"
    "-A a -j DROP\n"
    "-A b -p tcp --syn -j RETURN\n"
    "-A b -j c\n"
    "-A b -j DROP\n"
    "-A c -m mark --mark 7 -j ACCEPT\n",
    input_policy="DROP",
)
BUILTIN_RETURN = rules(
    ":u - [0:0]\n-A INPUT -p udp -j RETURN\n-A INPUT -j u\n-A INPUT -j ACCEPT\n"
    "-A u -p icmp -j RETURN\n-A u -j DROP\n",
    input_policy="DROP",
)
GOTO_FROM_BUILTIN = rules(
    ":u - [0:0]\n-A INPUT -g u\n-A INPUT -j ACCEPT\n-A u -p tcp -j RETURN\n", input_policy="DROP"
)
COUNTING = rules(
    ":u - [0:0]\n-A INPUT -s 198.18.0.0/24\n-A INPUT -j u\n-A INPUT -p tcp\n-A u -d 198.18.0.2\n"
)
FRAGMENTS = rules(
    "-A FORWARD -p tcp --dport 22 -j DROP\n"
    "-A FORWARD -f -j ACCEPT\n"
    "-A FORWARD -j DROP\n"
    "-A INPUT -p udp --dport 53 -j DROP\n"
    "-A INPUT -p udp -m multiport --dports 53 -j DROP\n"
    "-A INPUT -p icmp --icmp-type any -j DROP\n"
    "-A INPUT ! -f -j DROP\n"
)
FLAGS = rules(
    "-A INPUT -p tcp --tcp-flags ALL NONE -j DROP\n"
    "-A INPUT -p tcp --tcp-flags SYN,FIN SYN,FIN -j DROP\n"
    "-A INPUT -p tcp ! --syn --dport 80 -j ACCEPT\n"
    "-A INPUT -p tcp --syn --dport 80 -j DROP\n",
    input_policy="DROP",
)
ICMPS = rules(
    "-A INPUT -p icmp --icmp-type port-unreachable -j ACCEPT\n"
    "-A INPUT -p icmp --icmp-type destination-unreachable -j DROP\n"
    "-A INPUT -p icmp ! --icmp-type echo-request -j DROP\n"
    "-A INPUT -p icmp --icmp-type 8/0 -j ACCEPT\n",
    input_policy="DROP",
)
PORTS = rules(
    "-A INPUT -p tcp -m multiport --dports 80,443,8000:8080 -j ACCEPT\n"
    "-A INPUT -p udp -m multiport --ports 67:68 -j ACCEPT\n"
    "-A INPUT -p udp -m multiport ! --sports 1:1023 -j DROP\n"
    "-A INPUT -p tcp --sport 40000:40010 ! --dport 1:1000 -j DROP\n",
)
MISC = rules(
    "-A INPUT -m iprange --src-range 198.18.0.10-198.18.0.20 -j DROP\n"
    "-A INPUT -m iprange ! --dst-range 198.18.0.0-198.18.0.255 -j DROP\n"
    "-A INPUT -m length --length 40 -j ACCEPT\n"
    "-A INPUT -m length ! --length 0:1000 -j DROP\n"
    "-A INPUT -m ttl --ttl-lt 2 -j DROP\n"
    "-A INPUT -m ttl ! --ttl-eq 64 -j ACCEPT\n"
    "-A INPUT -m pkttype --pkt-type broadcast -j DROP\n"
    "-A INPUT -m pkttype ! --pkt-type unicast -j ACCEPT\n"
    "-A INPUT -m mark --mark 0x10/0xf0 -j DROP\n"
    "-A INPUT -m mark ! --mark 0 -j ACCEPT\n"
    "-A INPUT -m comment --comment last -j RETURN\n",
    input_policy="DROP",
)
INTERFACES = rules(
    "-A FORWARD -i veth+ -o eth0 -j ACCEPT\n"
    "-A FORWARD ! -i veth1 -o eth+ -j DROP\n"
    "-A FORWARD -i veth1 -j RETURN\n"
    "-A FORWARD -i eth0+x -j ACCEPT\n"
    "-A OUTPUT -o lo -j DROP\n"
    "-A OUTPUT ! -o eth0 -j ACCEPT\n",
    forward_policy="DROP",
)
ADDRESSES = rules(
    "-A INPUT -s 198.18.0.0/255.255.0.255 -j DROP\n"
    "-A INPUT ! -d 198.18.0.0/16 -j DROP\n"
    "-A INPUT ! -p tcp -j ACCEPT\n"
    "-A INPUT -p 6 -j RETURN\n",
    input_policy="DROP",
)

S, P = 40, 28  # sizes of the scapy TCP/UDP packets above: 20 + 20, 20 + 8
# (name, rules, packet, chain, in, out, options, verdict, deciding, counters)
CASES = [
    # jump pushes, goto does not: RETURN in b comes back after INPUT 1, not into a.
    (
        "goto then return resumes after the jump",
        JUMPS, tcp(22, "S"), "INPUT", "veth0", None, {},
        "ACCEPT", ("INPUT", 2),
        {("INPUT", 1): (1, S), ("a", 2): (1, S), ("b", 1): (1, S), ("INPUT", 2): (1, S)},
    ),
    (
        "falling off a user chain returns to its caller",
        JUMPS, tcp(22, "A"), "INPUT", "veth0", None, {},
        "DROP", ("b", 3),
        {("INPUT", 1): (1, S), ("a", 2): (1, S), ("b", 2): (1, S), ("b", 3): (1, S)},
    ),
    (
        "nested jump decides",
        JUMPS, tcp(22, "A"), "INPUT", "veth0", None, {"mark": 7},
        "ACCEPT", ("c", 1),
        {("INPUT", 1): (1, S), ("a", 2): (1, S), ("b", 2): (1, S), ("c", 1): (1, S)},
    ),
    (
        "policy when nothing matches",
        JUMPS, udp(), "INPUT", "veth0", None, {}, "DROP", ("INPUT", "policy"),
        {("INPUT", "policy"): (1, P)},
    ),
    (
        "RETURN in a built-in chain applies its policy",
        BUILTIN_RETURN, udp(), "INPUT", None, None, {}, "DROP", ("INPUT", "policy"),
        {("INPUT", 1): (1, P), ("INPUT", "policy"): (1, P)},
    ),
    (
        "RETURN from a user chain goes back to the built-in chain",
        BUILTIN_RETURN, icmp(), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 3),
        {("INPUT", 2): (1, P), ("u", 1): (1, P), ("INPUT", 3): (1, P)},
    ),
    (
        "RETURN after a goto from a built-in chain is the policy",
        GOTO_FROM_BUILTIN, tcp(), "INPUT", None, None, {}, "DROP", ("INPUT", "policy"),
        {("INPUT", 1): (1, S), ("u", 1): (1, S), ("INPUT", "policy"): (1, S)},
    ),
    (
        "end of a chain reached by goto from a built-in chain is the policy",
        GOTO_FROM_BUILTIN, udp(), "INPUT", None, None, {}, "DROP", ("INPUT", "policy"),
        {("INPUT", 1): (1, P), ("INPUT", "policy"): (1, P)},
    ),
    (
        "rules without a target count and fall through",
        COUNTING, tcp(), "INPUT", None, None, {}, "ACCEPT", ("INPUT", "policy"),
        {("INPUT", 1): (1, S), ("INPUT", 2): (1, S), ("u", 1): (1, S), ("INPUT", 3): (1, S),
         ("INPUT", "policy"): (1, S)},
    ),
    (
        "bytes are the IP total length",
        COUNTING, bytes(IP(src=A, dst=B) / UDP() / Raw(b"x" * 100)) + b"pad", "INPUT", None,
        None, {}, "ACCEPT", ("INPUT", "policy"),
        {("INPUT", 1): (1, 128), ("INPUT", 2): (1, 128), ("u", 1): (1, 128),
         ("INPUT", "policy"): (1, 128)},
    ),
    # Fragments: port matches fail on non-first fragments, -f matches them.
    (
        "non-first tcp fragment skips the port rule and matches -f",
        FRAGMENTS, fragment(6, 100), "FORWARD", "a", "b", {}, "ACCEPT", ("FORWARD", 2),
        {("FORWARD", 2): (1, 44)},
    ),
    (
        "tcp fragment at offset 1 is hotdropped by the tcp match",
        FRAGMENTS, fragment(6, 1), "FORWARD", "a", "b", {}, "DROP", ("FORWARD", 1), {},
    ),
    (
        "first fragment of tcp is matched normally",
        FRAGMENTS, bytes(IP(src=A, dst=B, flags="MF") / TCP(dport=22)), "FORWARD", "a", "b", {},
        "DROP", ("FORWARD", 1), {("FORWARD", 1): (1, S)},
    ),
    (
        "non-first udp/icmp fragments match no port or type rule",
        FRAGMENTS, fragment(17, 3), "INPUT", None, None, {}, "ACCEPT", ("INPUT", "policy"),
        {("INPUT", "policy"): (1, 44)},
    ),
    (
        "icmp non-first fragment: even --icmp-type any fails",
        FRAGMENTS, fragment(1, 3), "INPUT", None, None, {}, "ACCEPT", ("INPUT", "policy"),
        {("INPUT", "policy"): (1, 44)},
    ),
    (
        "! -f matches an unfragmented packet",
        FRAGMENTS, bytes(IP(src=A, dst=B, proto=47)), "INPUT", None, None, {}, "DROP",
        ("INPUT", 4), {("INPUT", 4): (1, 20)},
    ),
    # Truncated transport headers: the match drops the packet, no counter moves.
    (
        "tcp header of 19 bytes is hotdropped",
        FRAGMENTS, truncated(6, 19), "FORWARD", None, None, {}, "DROP", ("FORWARD", 1), {},
    ),
    (
        "udp header of 7 bytes is hotdropped",
        FRAGMENTS, truncated(17, 7), "INPUT", None, None, {}, "DROP", ("INPUT", 1), {},
    ),
    (
        "multiport needs only 4 bytes",
        rules("-A INPUT -p udp -m multiport --dports 53 -j ACCEPT\n", "DROP"),
        truncated(17, 4) [:20] + b"\x00\x01\x00\x35", "INPUT", None, None, {}, "ACCEPT",
        ("INPUT", 1), {("INPUT", 1): (1, 24)},
    ),
    (
        "multiport with 3 bytes is hotdropped",
        rules("-A INPUT -p udp -m multiport --dports 53 -j ACCEPT\n"),
        truncated(17, 3), "INPUT", None, None, {}, "DROP", ("INPUT", 1), {},
    ),
    (
        "icmp needs a full 8-byte header",
        FRAGMENTS, truncated(1, 4), "INPUT", None, None, {}, "DROP", ("INPUT", 3), {},
    ),
    (
        "a truncated header is fine when the rule does not look at it",
        rules("-A INPUT -p tcp -j ACCEPT\n", "DROP"), truncated(6, 3), "INPUT", None, None, {},
        "ACCEPT", ("INPUT", 1), {("INPUT", 1): (1, 23)},
    ),
    # TCP flags
    ("null scan", FLAGS, tcp(80, ""), "INPUT", None, None, {}, "DROP", ("INPUT", 1),
     {("INPUT", 1): (1, S)}),
    ("syn+fin", FLAGS, tcp(80, "SF"), "INPUT", None, None, {}, "DROP", ("INPUT", 2),
     {("INPUT", 2): (1, S)}),
    ("not syn", FLAGS, tcp(80, "SA"), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 3),
     {("INPUT", 3): (1, S)}),
    ("syn with ECE/CWR is still --syn", FLAGS, tcp(80, "SEC"), "INPUT", None, None, {}, "DROP",
     ("INPUT", 4), {("INPUT", 4): (1, S)}),
    ("syn,psh is --syn", FLAGS, tcp(80, "SP"), "INPUT", None, None, {}, "DROP", ("INPUT", 4),
     {("INPUT", 4): (1, S)}),
    # ICMP types and codes
    ("port unreachable", ICMPS, icmp(3, 3), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 1),
     {("INPUT", 1): (1, P)}),
    ("other unreachable", ICMPS, icmp(3, 1), "INPUT", None, None, {}, "DROP", ("INPUT", 2),
     {("INPUT", 2): (1, P)}),
    ("not echo request", ICMPS, icmp(0, 0), "INPUT", None, None, {}, "DROP", ("INPUT", 3),
     {("INPUT", 3): (1, P)}),
    ("echo request code 0", ICMPS, icmp(8, 0), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 4),
     {("INPUT", 4): (1, P)}),
    ("echo request code 1", ICMPS, icmp(8, 1), "INPUT", None, None, {}, "DROP",
     ("INPUT", "policy"), {("INPUT", "policy"): (1, P)}),
    # Ports
    ("multiport range", PORTS, tcp(8080), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 1),
     {("INPUT", 1): (1, S)}),
    ("multiport list", PORTS, tcp(443), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 1),
     {("INPUT", 1): (1, S)}),
    ("multiport --ports matches the source", PORTS, udp(9999, 68), "INPUT", None, None, {},
     "ACCEPT", ("INPUT", 2), {("INPUT", 2): (1, P)}),
    ("negated multiport", PORTS, udp(9999, 5353), "INPUT", None, None, {}, "DROP", ("INPUT", 3),
     {("INPUT", 3): (1, P)}),
    ("negated multiport, port inside", PORTS, udp(9999, 53), "INPUT", None, None, {}, "ACCEPT",
     ("INPUT", "policy"), {("INPUT", "policy"): (1, P)}),
    ("tcp ranges", PORTS, tcp(2000), "INPUT", None, None, {}, "DROP", ("INPUT", 4),
     {("INPUT", 4): (1, S)}),
    ("tcp negated dport inside", PORTS, tcp(1000), "INPUT", None, None, {}, "ACCEPT",
     ("INPUT", "policy"), {("INPUT", "policy"): (1, S)}),
    # iprange, length, ttl, pkttype, mark
    ("iprange source", MISC, bytes(IP(src="198.18.0.15", dst=B) / UDP()), "INPUT", None, None,
     {}, "DROP", ("INPUT", 1), {("INPUT", 1): (1, P)}),
    ("negated iprange", MISC, bytes(IP(src=A, dst="198.19.0.1") / UDP()), "INPUT", None, None,
     {}, "DROP", ("INPUT", 2), {("INPUT", 2): (1, P)}),
    ("length inside", MISC, tcp(), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 3),
     {("INPUT", 3): (1, S)}),
    ("negated length", MISC, bytes(IP(src=A, dst=B) / UDP() / Raw(b"x" * 1000)), "INPUT", None,
     None, {}, "DROP", ("INPUT", 4), {("INPUT", 4): (1, 1028)}),
    ("ttl lt", MISC, udp(ttl=1) + b"", "INPUT", None, None, {}, "DROP", ("INPUT", 5),
     {("INPUT", 5): (1, P)}),
    ("ttl not eq", MISC, udp(ttl=63), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 6),
     {("INPUT", 6): (1, P)}),
    ("pkttype broadcast", MISC, udp(), "INPUT", None, None, {"pkt_type": "broadcast"}, "DROP",
     ("INPUT", 7), {("INPUT", 7): (1, P)}),
    ("pkttype multicast", MISC, udp(), "INPUT", None, None, {"pkt_type": "multicast"}, "ACCEPT",
     ("INPUT", 8), {("INPUT", 8): (1, P)}),
    ("pkttype loopback to unicast address counts as broadcast", MISC, udp(), "INPUT", None,
     None, {"pkt_type": "loopback"}, "DROP", ("INPUT", 7), {("INPUT", 7): (1, P)}),
    ("mark under mask", MISC, udp(), "INPUT", None, None, {"mark": 0x1217}, "DROP", ("INPUT", 9),
     {("INPUT", 9): (1, P)}),
    ("mark not zero", MISC, udp(), "INPUT", None, None, {"mark": 0x1207}, "ACCEPT",
     ("INPUT", 10), {("INPUT", 10): (1, P)}),
    ("comment rule RETURNs to policy", MISC, udp(), "INPUT", None, None, {}, "DROP",
     ("INPUT", "policy"), {("INPUT", 11): (1, P), ("INPUT", "policy"): (1, P)}),
    # Interfaces and wildcards
    ("wildcard in, exact out", INTERFACES, udp(), "FORWARD", "veth7", "eth0", {}, "ACCEPT",
     ("FORWARD", 1), {("FORWARD", 1): (1, P)}),
    ("negated in, wildcard out", INTERFACES, udp(), "FORWARD", "lo", "eth1", {}, "DROP",
     ("FORWARD", 2), {("FORWARD", 2): (1, P)}),
    ("exact name is not a prefix", INTERFACES, udp(), "FORWARD", "veth1", "eth0x", {}, "DROP",
     ("FORWARD", "policy"), {("FORWARD", 3): (1, P), ("FORWARD", "policy"): (1, P)}),
    ("+ inside a name is literal", INTERFACES, udp(), "FORWARD", "eth0+x", None, {}, "ACCEPT",
     ("FORWARD", 4), {("FORWARD", 4): (1, P)}),
    ("+ at the end of a longer name is not a wildcard here", INTERFACES, udp(), "FORWARD",
     "eth0+y", None, {}, "DROP", ("FORWARD", "policy"), {("FORWARD", "policy"): (1, P)}),
    ("no output device", INTERFACES, udp(), "OUTPUT", None, None, {}, "ACCEPT", ("OUTPUT", 2),
     {("OUTPUT", 2): (1, P)}),
    ("output lo", INTERFACES, udp(), "OUTPUT", None, "lo", {}, "DROP", ("OUTPUT", 1),
     {("OUTPUT", 1): (1, P)}),
    # Addresses with non-contiguous masks and protocols
    ("dotted mask", ADDRESSES, bytes(IP(src="198.18.77.0", dst=B) / TCP()), "INPUT", None, None,
     {}, "DROP", ("INPUT", 1), {("INPUT", 1): (1, S)}),
    ("negated destination", ADDRESSES, bytes(IP(src=A, dst="10.0.0.1") / TCP()), "INPUT", None,
     None, {}, "DROP", ("INPUT", 2), {("INPUT", 2): (1, S)}),
    ("negated protocol", ADDRESSES, udp(), "INPUT", None, None, {}, "ACCEPT", ("INPUT", 3),
     {("INPUT", 3): (1, P)}),
    ("numeric protocol", ADDRESSES, tcp(), "INPUT", None, None, {}, "DROP", ("INPUT", "policy"),
     {("INPUT", 4): (1, S), ("INPUT", "policy"): (1, S)}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "text", "packet", "chain", "in_iface", "out_iface", "options", "verdict",
     "deciding", "counters"),
    CASES,
    ids=[case[0] for case in CASES],
)  # fmt: skip
def test_evaluate(
    name: str,
    text: str,
    packet: bytes,
    chain: str,
    in_iface: str | None,
    out_iface: str | None,
    options: dict,
    verdict: str,
    deciding: tuple,
    counters: dict,
) -> None:
    ruleset = parse(text, name)
    result = evaluate(ruleset, packet, chain, in_iface, out_iface, **options)
    assert (result.verdict, result.deciding) == (verdict, deciding)
    assert result.counters == counters
    assert result.hotdrop == (verdict == "DROP" and not counters and deciding[1] != "policy")


def test_rule_set_is_not_changed() -> None:
    ruleset = parse(JUMPS)
    before = parse(JUMPS)
    evaluate(ruleset, tcp(), "INPUT", "veth0", None)
    assert ruleset == before


BAD_PACKETS = [
    (b"\x45\x00", "shorter than an IPv4 header"),
    (bytes(IP(src=A, dst=B, version=6)), "not 4"),
    (bytes(IP(src=A, dst=B) / UDP())[:25], "exceeds"),
    (bytes(IP(src=A, dst=B, ihl=4, len=20)), "below 20"),
    (bytes(IP(src=A, dst=B, ihl=6, len=20, options=[])) + b"\x00" * 4, "shorter than its header"),
]


@pytest.mark.parametrize(("packet", "message"), BAD_PACKETS, ids=[m for _, m in BAD_PACKETS])
def test_malformed_packets_are_refused(packet: bytes, message: str) -> None:
    with pytest.raises(PacketError, match=message):
        evaluate(parse(JUMPS), packet, "INPUT", None, None)


def test_chain_must_be_built_in() -> None:
    with pytest.raises(ValueError, match="chain must be one of"):
        evaluate(parse(JUMPS), tcp(), "a", None, None)


def test_unknown_packet_type_is_refused() -> None:
    with pytest.raises(ValueError, match="pkt_type"):
        evaluate(parse(JUMPS), tcp(), "INPUT", None, None, pkt_type="sideways")
