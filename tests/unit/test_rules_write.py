"""Writing rule sets as iptables-legacy-save prints them, and the round trip through text.

The corpus files in tests/rules_corpus/ are iptables-legacy-save 1.8.9 output (header comments
removed) of rule sets loaded with iptables-legacy-restore: write(parse(file)) must give them back
byte for byte."""

from pathlib import Path

import pytest

from codegen.rules import (
    Accept,
    Address,
    Chain,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Protocol,
    Return,
    Rule,
    Ruleset,
    parse,
    write,
)
from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.iprange import AddressRange, IpRange
from codegen.rules.extensions.length import Length
from codegen.rules.extensions.mark import Mark
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.pkttype import PktType
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.ttl import Ttl
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.iptables_save import write_rule

CORPUS = sorted((Path(__file__).parent.parent / "rules_corpus").glob("*.rules"))
TCP = Protocol(6)
UDP = Protocol(17)
ICMP = Protocol(1)

# (matches, target, the line iptables-legacy-save prints)
CANONICAL = [
    ((), None, "-A INPUT"),
    ((), Accept(), "-A INPUT -j ACCEPT"),
    ((), Drop(), "-A INPUT -j DROP"),
    ((), Return(), "-A INPUT -j RETURN"),
    ((), Jump("u"), "-A INPUT -j u"),
    ((), Goto("u"), "-A INPUT -g u"),
    ((Address("src", 0xC6120001),), Accept(), "-A INPUT -s 198.18.0.1/32 -j ACCEPT"),
    (
        (Address.from_network("dst", "198.18.0.0/15", negated=True),),
        None,
        "-A INPUT ! -d 198.18.0.0/15",
    ),
    ((Address("src", 0x01020304, 0xFF00FF00),), None, "-A INPUT -s 1.0.3.0/255.0.255.0"),
    ((Address("src", 0, 0, negated=True),), None, "-A INPUT ! -s 0.0.0.0/0"),
    ((Address("src", 0x01020304, 0x80000000),), None, "-A INPUT -s 0.0.0.0/1"),
    ((Interface("in", "veth+", negated=True),), None, "-A INPUT ! -i veth+"),
    ((Interface("in", "eth0"), TCP), None, "-A INPUT -i eth0 -p tcp"),
    ((Protocol(47),), None, "-A INPUT -p gre"),
    ((Protocol(17, negated=True),), None, "-A INPUT ! -p udp"),
    ((Protocol(253),), None, "-A INPUT -p 253"),
    ((Protocol(58),), None, "-A INPUT -p ipv6-icmp"),
    ((Fragment(negated=True),), None, "-A INPUT ! -f"),
    # The IP header part is printed first, whatever order the model lists it in.
    (
        (Comment("c"), Fragment(), TCP, Interface("in", "a"), Address("dst", 1), Address("src", 2)),
        None,
        "-A INPUT -s 0.0.0.2/32 -d 0.0.0.1/32 -i a -p tcp -f -m comment --comment c",
    ),
    ((TCP, TcpMatch()), None, "-A INPUT -p tcp -m tcp"),
    (
        (TCP, TcpMatch(PortRange(1, 2), PortRange(22, 22, True), TcpFlags.syn())),
        None,
        "-A INPUT -p tcp -m tcp --sport 1:2 ! --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN",
    ),
    (
        (TCP, TcpMatch(flags=TcpFlags(0x3F, 0, negated=True))),
        None,
        "-A INPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,PSH,ACK,URG NONE",
    ),
    (
        (TCP, TcpMatch(flags=TcpFlags(0, 0, True))),
        None,
        "-A INPUT -p tcp -m tcp ! --tcp-flags NONE NONE",
    ),
    ((UDP, UdpMatch(dport=PortRange(53, 53))), None, "-A INPUT -p udp -m udp --dport 53"),
    ((UDP, UdpMatch(PortRange(0, 1023, True))), None, "-A INPUT -p udp -m udp ! --sport 0:1023"),
    ((ICMP, IcmpMatch(8)), None, "-A INPUT -p icmp -m icmp --icmp-type 8"),
    ((ICMP, IcmpMatch(3, 3, 3)), None, "-A INPUT -p icmp -m icmp --icmp-type 3/3"),
    ((ICMP, IcmpMatch(negated=True)), None, "-A INPUT -p icmp -m icmp ! --icmp-type any"),
    ((ICMP, IcmpMatch(3, negated=True)), None, "-A INPUT -p icmp -m icmp ! --icmp-type 3"),
    (
        (TCP, Multiport("dst", ((1, 1), (2, 3), (80, 80)))),
        None,
        "-A INPUT -p tcp -m multiport --dports 1,2:3,80",
    ),
    ((UDP, Multiport("any", ((5, 5),), True)), None, "-A INPUT -p udp -m multiport ! --ports 5"),
    (
        (Protocol(132), Multiport("src", ((7, 9),))),
        None,
        "-A INPUT -p sctp -m multiport --sports 7:9",
    ),
    (
        (IpRange(dst=AddressRange(1, 2, True), src=AddressRange(0x01020304, 0x01020309)),),
        None,
        "-A INPUT -m iprange --src-range 1.2.3.4-1.2.3.9 ! --dst-range 0.0.0.1-0.0.0.2",
    ),
    ((Length(10, 20),), None, "-A INPUT -m length --length 10:20"),
    ((Length(10, 10, True),), None, "-A INPUT -m length ! --length 10"),
    ((Ttl("eq", 5, True),), None, "-A INPUT -m ttl ! --ttl-eq 5"),
    ((Ttl("lt", 5),), None, "-A INPUT -m ttl --ttl-lt 5"),
    ((Ttl("gt", 250),), None, "-A INPUT -m ttl --ttl-gt 250"),
    ((PktType("unicast", True),), None, "-A INPUT -m pkttype ! --pkt-type unicast"),
    ((Mark(1),), None, "-A INPUT -m mark --mark 0x1"),
    ((Mark(0x10, 0xF0, True),), None, "-A INPUT -m mark ! --mark 0x10/0xf0"),
    ((Comment("x y"),), None, '-A INPUT -m comment --comment "x y"'),
    ((Comment("a-b_C9"),), None, "-A INPUT -m comment --comment a-b_C9"),
    ((Comment(""),), None, '-A INPUT -m comment --comment ""'),
    ((Comment("q\"b\\s'"),), None, '-A INPUT -m comment --comment "q\\"b\\\\s\\\'"'),
]


@pytest.mark.parametrize(
    ("matches", "target", "expected"), CANONICAL, ids=[c[2] for c in CANONICAL]
)
def test_canonical_rule_text(matches: tuple, target: object, expected: str) -> None:
    rule = Rule(matches, target)  # type: ignore[arg-type]
    assert write_rule("INPUT", rule) == expected
    # And it reads back as the same rule.
    ruleset = Ruleset()
    ruleset.add_chain("u")
    ruleset["INPUT"].rules.append(rule)
    again = parse(write(ruleset))
    assert again["INPUT"].rules[0] == Rule(
        tuple(sorted(matches, key=_ip_part_order)),
        target,  # type: ignore[arg-type]
    )


def _ip_part_order(match: object) -> int:
    order = [
        lambda m: isinstance(m, Address) and m.direction == "src",
        lambda m: isinstance(m, Address) and m.direction == "dst",
        lambda m: isinstance(m, Interface) and m.direction == "in",
        lambda m: isinstance(m, Interface) and m.direction == "out",
        lambda m: isinstance(m, Protocol),
        lambda m: isinstance(m, Fragment),
    ]
    for index, test in enumerate(order):
        if test(match):
            return index
    return len(order)


def test_whole_table_layout_and_counters() -> None:
    ruleset = Ruleset()
    ruleset["INPUT"].policy = "DROP"
    ruleset["INPUT"].packets, ruleset["INPUT"].bytes = 4, 240
    for name in ("zeta", "Beta", "alpha", "_x"):
        ruleset.add_chain(name)
    ruleset["zeta"].rules.append(Rule((), Return(), packets=1, bytes=60))
    ruleset["INPUT"].rules.append(Rule((), Jump("zeta"), packets=2, bytes=120))
    assert write(ruleset) == (
        "*filter\n"
        ":INPUT DROP [4:240]\n"
        ":FORWARD ACCEPT [0:0]\n"
        ":OUTPUT ACCEPT [0:0]\n"
        ":Beta - [0:0]\n"
        ":_x - [0:0]\n"
        ":alpha - [0:0]\n"
        ":zeta - [0:0]\n"
        "-A INPUT -j zeta\n"
        "-A zeta -j RETURN\n"
        "COMMIT\n"
    )
    with_counters = write(ruleset, counters=True)
    assert "[2:120] -A INPUT -j zeta\n[1:60] -A zeta -j RETURN\n" in with_counters
    assert parse(with_counters) == ruleset


def test_lossy_iptables_save_cases_keep_their_meaning() -> None:
    # iptables-legacy-save prints `! -i +` and `! --dport 0:65535` as nothing at all, which
    # would turn never-matching rules into always-matching ones; we keep them.
    text = "*filter\n-A INPUT ! -i + -p tcp ! --dport 0:65535 -j DROP\nCOMMIT\n"
    out = write(parse(text))
    assert "-A INPUT ! -i + -p tcp -m tcp ! --dport 0:65535 -j DROP" in out
    assert parse(out) == parse(text)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_round_trip(path: Path) -> None:
    text = path.read_text()
    ruleset = parse(text, str(path))
    assert write(ruleset) == text
    assert parse(write(ruleset)) == ruleset
    assert parse(write(ruleset, counters=True)) == ruleset


def test_corpus_covers_every_match_and_target() -> None:
    kinds: set[type] = set()
    for path in CORPUS:
        for chain in parse(path.read_text()).chains.values():
            assert isinstance(chain, Chain)
            for rule in chain.rules:
                kinds.update(type(m) for m in rule.matches)
                kinds.add(type(rule.target))
    expected = {
        Address, Interface, Protocol, Fragment, TcpMatch, UdpMatch, IcmpMatch, Multiport,
        IpRange, Length, Ttl, PktType, Mark, Comment, Accept, Drop, Return, Jump, Goto,
        type(None),
    }  # fmt: skip
    assert expected <= kinds
