"""`-m set` in the bytecode programs under BPF_PROG_TEST_RUN against the reference evaluator,
both over the same sets: every set type, each direction, negation, --return-nomatch, fewer
and more directions than a set's dimension, packets whose port ip_set cannot read (protocol
0, later fragments, cut headers), in the entry function, a user chain's function and a chunk
function, by the bytecode and the C backend (which reads the same maps with code of its own,
codegen/c/matches/set.py); random hash:net sets with nested nomatch entries (hypothesis,
bytecode).
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from codegen.rules import evaluate, parse
from codegen.rules.sets import SetTable, parse_sets
from codegen.tc.chains import CHUNK_RULES
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

SETS_TEXT = """\
create hosts hash:ip family inet
add hosts 198.18.0.5
add hosts 198.18.0.2
create nets hash:net family inet
add nets 198.18.0.0/16
add nets 198.18.5.0/24 nomatch
add nets 198.18.5.9
add nets 10.0.0.0/8
create ports bitmap:port range 0-1024
add ports 22
add ports 53
add ports 0
create services hash:ip,port family inet
add services 198.18.0.5,tcp:80
add services 198.18.5.9,udp:53
add services 198.18.0.1,icmp:echo-request
add services 198.18.0.1,gre:0
add services 198.18.0.1,sctp:9
add services 198.18.0.1,udplite:9
create netports hash:net,port family inet
add netports 198.18.0.0/16,tcp:22
add netports 198.18.5.0/24,tcp:22 nomatch
add netports 198.18.5.9,udp:53
"""
SETS = parse_sets(SETS_TEXT, "sets")

MATCHES = [
    "-m set --match-set hosts src",
    "-m set --match-set hosts dst",
    "-m set ! --match-set hosts src",
    "-m set --match-set nets src",
    "-m set --match-set nets src --return-nomatch",
    "-m set ! --match-set nets dst --return-nomatch",
    "-m set --match-set ports dst",
    "-m set --match-set ports src",
    "-m set ! --match-set ports dst",
    "-m set --match-set services src,dst",
    "-m set --match-set services src,src",
    "-m set --match-set services src",
    "-m set ! --match-set services src",
    "-m set --match-set services src,dst,dst,src",
    "-m set --match-set netports src,dst",
    "-m set --match-set netports src,dst --return-nomatch",
    "-m set ! --match-set netports dst,src",
    "-m set --match-set hosts src --return-nomatch",
]
RULES = (
    "*filter\n:user - [0:0]\n"
    + "".join(f"-A INPUT {match}\n" for match in MATCHES)
    + "-A INPUT -j user\n"
    + "".join(f"-A user {match}\n" for match in MATCHES)
    + "-A user -m set --match-set nets src -j DROP\n"
    + "-A user -m set --match-set services src,dst -j ACCEPT\n"
    + "-A FORWARD -m set --match-set netports src,dst -j DROP\n"
    + "-A FORWARD -m set ! --match-set hosts dst -j ACCEPT\n"
    + "-A FORWARD -j DROP\n"
    + "COMMIT\n"
)
SOURCES = ("198.18.0.5", "198.18.0.1", "198.18.5.9", "198.18.5.1", "198.19.0.1", "0.0.0.0")
DESTINATIONS = ("198.18.0.2", "10.1.1.1", "198.18.5.9", "198.18.5.1")


def _layers() -> list[tuple[object, dict]]:
    tcp, udp = TCP(sport=22, dport=80), UDP(sport=53, dport=22)
    return [
        (tcp, {}),
        (TCP(sport=80, dport=22), {}),
        (udp, {}),
        (UDP(sport=9, dport=53), {}),
        (ICMP(type=8), {}),
        (ICMP(type=0), {}),
        (Raw(b"\x00\x09\x00\x09" + bytes(8)), {"proto": 132}),  # SCTP, whole
        (Raw(b"\x00\x09\x00\x09" + bytes(4)), {"proto": 132}),  # SCTP, cut to 8 bytes
        (Raw(b"\x00\x09\x00\x09" + bytes(4)), {"proto": 136}),  # UDPLITE
        (Raw(bytes(8)), {"proto": 47}),  # GRE: port 0
        (Raw(bytes(8)), {"proto": 0}),  # protocol 0: no port at all
        (Raw(bytes(bytes(tcp)[:12])), {"proto": 6}),  # TCP header cut short
        (Raw(bytes(20)), {"proto": 6, "frag": 3}),  # later fragments
        (Raw(bytes(20)), {"proto": 47, "frag": 3}),
        (Raw(bytes(8)), {"proto": 17, "flags": 1}),  # first fragment of UDP
    ]


def _packets() -> list[bytes]:
    return [
        bytes(IP(src=source, dst=destination, **fields) / layer)  # type: ignore[operator]
        for source in SOURCES
        for destination in DESTINATIONS
        for layer, fields in _layers()
    ]


def _compare(ruleset, runner: ChainRunner, sets: SetTable, cases) -> list:  # type: ignore[no-untyped-def]
    wrong = []
    for chain, packet in cases:
        inside, outside = ("eth0", "eth1") if chain == "FORWARD" else ("eth0", None)
        expected = evaluate(ruleset, packet, chain, inside, outside, sets=sets)
        got = runner.run(frame_for(packet), chain, inside, outside)
        if (got.verdict, got.deciding, got.counters) != (
            expected.verdict,
            expected.deciding,
            expected.counters,
        ):
            wrong.append((chain, IP(packet).summary(), got.deciding, expected.deciding))
    return wrong


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_type_and_direction_agrees_with_the_reference(backend: str) -> None:
    ruleset = parse(RULES, "sets")
    cases = [(chain, packet) for chain in ("INPUT", "FORWARD") for packet in _packets()]
    with ChainRunner(ruleset, sets=SETS, backend=backend) as runner:  # type: ignore[arg-type]
        assert _compare(ruleset, runner, SETS, cases) == []
    # The cases tell the rules apart: each rule counted some packets and missed others.
    seen = {}
    for chain, packet in cases:
        result = evaluate(ruleset, packet, chain, "eth0", "eth1", sets=SETS)
        for position in result.counters:
            seen[position] = seen.get(position, 0) + 1
    total = len([c for c in cases if c[0] == "INPUT"])
    for index, match in enumerate(MATCHES, 1):
        if match.endswith("services src"):  # fewer directions: never (negated: always)
            assert seen.get(("INPUT", index), 0) == (total if "!" in match else 0)
        else:
            assert 0 < seen.get(("INPUT", index), 0) < total, match


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_a_chunk_function(backend: str) -> None:
    rules = "".join(f"-A INPUT {MATCHES[i % len(MATCHES)]}\n" for i in range(CHUNK_RULES + 30))
    text = f"*filter\n{rules}-A INPUT -m set --match-set netports src,dst -j DROP\nCOMMIT\n"
    ruleset = parse(text, "chunk")
    cases = [("INPUT", packet) for packet in _packets()[::3]]
    with ChainRunner(ruleset, sets=SETS, backend=backend) as runner:  # type: ignore[arg-type]
        assert _compare(ruleset, runner, SETS, cases) == []


def test_a_set_the_sets_lack_is_refused_at_load() -> None:
    from codegen.rules import RuleError

    ruleset = parse("*filter\n-A INPUT -m set --match-set nope src\nCOMMIT\n", "lack.rules")
    with pytest.raises(RuleError, match="set 'nope' does not exist"):
        ChainRunner(ruleset, sets=SETS)


_networks = st.tuples(st.integers(0, 0xFFFF), st.integers(16, 32), st.booleans()).map(
    lambda t: (0xC6120000 | t[0], t[1], t[2])
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(_networks, min_size=1, max_size=12),
    probes=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=12),
    return_nomatch=st.booleans(),
)
def test_random_nets_with_nomatch(members: list, probes: list, return_nomatch: bool) -> None:
    lines = ["create r hash:net"]
    for network, prefix, nomatch in members:
        net = ipaddress.IPv4Network((network, prefix), strict=False)
        lines.append(f"add r {net}{' nomatch' if nomatch else ''}")
    sets = parse_sets("\n".join(lines) + "\n", "random")
    option = " --return-nomatch" if return_nomatch else ""
    ruleset = parse(f"*filter\n-A INPUT -m set --match-set r src{option} -j DROP\nCOMMIT\n")
    # Probe each member's own network and the addresses drawn.
    addresses = [network for network, _, _ in members] + [0xC6120000 | p for p in probes]
    cases = [
        ("INPUT", bytes(IP(src=str(ipaddress.IPv4Address(a)), dst="198.18.0.2") / UDP()))
        for a in addresses
    ]
    with ChainRunner(ruleset, sets=sets) as runner:
        assert _compare(ruleset, runner, sets, cases) == []


def _bpflab(*args: str):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_run_and_verify_take_sets_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    rules = tmp_path / "blocklist.rules"
    rules.write_text("*filter\n-A INPUT -m set --match-set blocked src -j DROP\nCOMMIT\n")
    sets = tmp_path / "blocked.ipset"
    sets.write_text("create blocked hash:net family inet\nadd blocked 198.18.7.0/24\n")
    packets = [
        f'Ether()/IP(src="{source}", dst="198.18.0.2")/UDP(dport=53)'
        for source in ("198.18.7.9", "198.18.8.9")
    ]
    result = _bpflab(
        "run", str(rules), "--chain", "INPUT", "--json", "--sets", str(sets),
        *[word for packet in packets for word in ("--packet", packet)],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line).get("verdict") for line in result.stdout.splitlines()[:2]]
    assert verdicts == ["DROP", "ACCEPT"]
    assert _bpflab("verify", str(rules), "--sets", str(sets)).returncode == 0
    # Without --sets, the stand-in sets hold no `blocked`: refused at the rule, exit 2.
    refused = _bpflab("verify", str(rules))
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"{rules}:2:1: error: set: set 'blocked' does not exist")
    sets.write_text("create blocked hash:net family inet\nadd blocked 198.18.7.0/24 timeout 9\n")
    bad = _bpflab("run", str(rules), "--chain", "INPUT", "--sets", str(sets), "--packet", "IP()")
    assert bad.returncode == 2 and bad.stderr.startswith(f"{sets}:2:")
    assert "Traceback" not in bad.stderr


IFACE_SETS = parse_sets(
    SETS_TEXT
    + """\
create ifnets hash:net,iface family inet hashsize 1024 maxelem 65536
add ifnets 198.18.0.0/16,eth0
add ifnets 198.18.5.0/24,eth0 nomatch
add ifnets 198.18.5.9,eth0
add ifnets 10.0.0.0/8,veth wildcard
add ifnets 10.1.0.0/16,veth0 nomatch
add ifnets 0.0.0.0/0,wg0
create either list:set size 4
add either hosts
add either netports
add either ifnets before netports
""",
    "iface-sets",
)
IFACE_MATCHES = [
    "-m set --match-set ifnets src,src",
    "-m set --match-set ifnets dst,dst",
    "-m set --match-set ifnets src,dst --return-nomatch",
    "-m set ! --match-set ifnets src,src",
    "-m set --match-set ifnets src",  # fewer directions than its dimension: never
    "-m set --match-set either src",  # only hosts has one dimension
    "-m set --match-set either src,src",
    "-m set --match-set either src,dst --return-nomatch",
    "-m set ! --match-set either dst,dst",
]
IFACE_DEVICES = {
    "INPUT": [("eth0", None), ("eth1", None), ("veth0", None), ("veth1", None), ("wg0", None)],
    "FORWARD": [("eth0", "veth1"), ("veth0", "eth0"), ("wg0", "eth1"), ("eth1", "wg0")],
    "OUTPUT": [(None, "eth0"), (None, "veth0"), (None, "wg0")],
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_net_iface_and_list_sets_agree_with_the_reference(backend: str) -> None:
    """hash:net,iface by the device of its second direction (a wildcard member by prefix, a
    device the packet lacks never), and a list:set through its members in order."""
    rules = "".join(f"-A {chain} {match}\n" for chain in IFACE_DEVICES for match in IFACE_MATCHES)
    ruleset = parse(f"*filter\n{rules}COMMIT\n", "iface")
    sources = ("198.18.0.5", "198.18.5.9", "198.18.5.1", "10.1.2.3", "10.2.2.2", "198.19.0.1")
    packets = [
        bytes(IP(src=source, dst=destination) / TCP(sport=22, dport=22))
        for source in sources
        for destination in ("198.18.0.2", "10.1.1.1", "198.18.5.9")
    ]
    counted: dict = {}
    with ChainRunner(ruleset, ["wg0", "veth1"], sets=IFACE_SETS, backend=backend) as runner:  # type: ignore[arg-type]
        for chain, devices in IFACE_DEVICES.items():
            for inside, outside in devices:
                for packet in packets:
                    expected = evaluate(ruleset, packet, chain, inside, outside, sets=IFACE_SETS)
                    got = runner.run(frame_for(packet), chain, inside, outside)
                    case = (chain, inside, outside, IP(packet).summary())
                    assert (got.verdict, got.deciding, got.counters) == (
                        expected.verdict,
                        expected.deciding,
                        expected.counters,
                    ), case
                    for position in expected.counters:
                        counted[position] = counted.get(position, 0) + 1
    # Each rule matched some packets and missed others, but where ifnets has no device to
    # look at (too few directions; INPUT has no out-device, OUTPUT no in-device): never.
    absent = {"INPUT": "dst", "FORWARD": "", "OUTPUT": "src"}
    for chain, devices in IFACE_DEVICES.items():
        total = len(devices) * len(packets)
        for index, match in enumerate(IFACE_MATCHES, 1):
            seen = counted.get((chain, index), 0)
            words = match.split()
            directions = words[words.index("--match-set") + 2].split(",")
            deviceless = match.endswith("ifnets src") or (
                "ifnets" in match and directions[-1] == absent[chain]
            )
            if deviceless:
                assert seen == (total if "!" in match else 0), (chain, match, seen)
            else:
                assert 0 < seen < total, (chain, match, seen)
