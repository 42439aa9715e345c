"""`-j LOG` in the generated programs of both backends under BPF_PROG_TEST_RUN: the records
each packet writes, as lines, against the reference evaluator's LOG rules turned into lines by
the same formatter (in order, several per packet, from built-in and user chains, inline and
in chunk functions); a full ring buffer loses events, never packets, and counts them; and
every hook's program with LOG rules passes the verifier. The lines against the kernel's own:
tests/net/test_log_vs_netfilter.py."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.bpf.testrun import prog_test_run
from codegen.conntrack import TrackerMaps
from codegen.rules import evaluate, parse, write
from codegen.rules.extensions.log import Log
from codegen.rules.extensions.log_line import LoggedPacket, logged_lines
from codegen.rules.extensions.nflog import NfLog
from codegen.rules.model import Rule
from codegen.rules.validation import validate
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import CounterLayout
from codegen.tc.log import HEADER, RECORD_SIZE
from codegen.tc.replies import INTERFACE_ADDRESSES, INTERFACE_VALUE_SIZE
from harness.backends import load_program
from harness.counters import CounterMap
from harness.log_reader import LogMaps
from harness.runner import ChainRunner, frame_for
from tests.strategies import packets, rulesets


def _bcc() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.privileged
BACKENDS = [
    "bytecode",
    pytest.param("c", marks=pytest.mark.skipif(not _bcc(), reason="the C backend needs bcc")),
]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:audit - [0:0]
:deep - [0:0]
-A INPUT -p tcp -j LOG --log-prefix "in tcp: " --log-tcp-sequence --log-tcp-options
-A INPUT -j audit
-A INPUT -p udp -j LOG --log-prefix "in udp: " --log-level 6
-A INPUT -p icmp -j LOG --log-prefix "in icmp: " --log-ip-options
-A INPUT -p udp -j DROP
-A INPUT -j LOG --log-prefix "in last: " --log-macdecode
-A FORWARD -j LOG --log-prefix "fwd: " --log-ip-options --log-tcp-options
-A FORWARD -i eth0 -g audit
-A OUTPUT -j LOG --log-prefix "out: " --log-tcp-sequence
-A OUTPUT -j deep
-A audit -j LOG --log-prefix "audit: " --log-macdecode
-A audit -p icmp -j RETURN
-A audit -j deep
-A audit -j LOG --log-prefix "audit after: "
-A deep -j LOG --log-prefix "deep: " --log-level 7 --log-ip-options
-A deep -p tcp -j ACCEPT
COMMIT
"""
SRC, DST = "198.18.0.1", "198.18.0.2"
OPTIONS = [("MSS", 1460), ("NOP", None), ("WScale", 7)]
QUOTED = bytes(IP(src=DST, dst=SRC, id=3, ttl=1) / TCP(sport=80, dport=4000, options=OPTIONS))
PACKETS = {
    "tcp with options": IP(src=SRC, dst=DST, id=1, options=b"\x07\x03\x04\x00")
    / TCP(sport=1111, dport=22, seq=99, flags="SE", options=OPTIONS),
    "udp": IP(src=SRC, dst=DST, id=2, tos=0xB8, flags="DF") / UDP(sport=53, dport=9) / b"x",
    "icmp echo": IP(src=SRC, dst=DST, id=3, options=b"\x07\x07\x04" + bytes(5))
    / ICMP(type=8, id=7, seq=9),
    "icmp error": IP(src=SRC, dst=DST, id=4) / ICMP(type=3, code=4, nexthopmtu=1280) / QUOTED,
    "later fragment": IP(src=SRC, dst=DST, id=5, frag=20, proto=6) / bytes(16),
    "short tcp": IP(src=SRC, dst=DST, id=6, proto=6) / bytes(8),
    "other protocol": IP(src=SRC, dst=DST, id=7, proto=47) / bytes(8),
}
WHERE = {"INPUT": ("eth0", None), "FORWARD": ("eth0", "eth1"), "OUTPUT": (None, "eth1")}


def _expected(ruleset, packet: bytes, chain: str, in_iface, out_iface, mark: int) -> tuple:
    evaluation = evaluate(ruleset, packet, chain, in_iface, out_iface, mark=mark)
    seen = LoggedPacket(
        packet, in_iface or "", out_iface or "", mac=frame_for(packet)[:14], mark=mark
    )
    lines = logged_lines(ruleset, evaluation.logged, seen, evaluation.logged_marks)
    return evaluation, tuple(lines)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chain", list(WHERE))
def test_the_records_are_the_reference_lines_in_order(chain: str, backend: str) -> None:
    ruleset = parse(RULES, "log")
    in_iface, out_iface = WHERE[chain]
    with ChainRunner(ruleset, backend=backend) as runner:
        for name, layer in PACKETS.items():
            _agree_on(runner, ruleset, bytes(layer), chain, in_iface, out_iface, name)
        assert runner.log_drops() == 0


def _agree_on(runner, ruleset, packet, chain, in_iface, out_iface, name) -> None:
    for mark in (0, 0x2A):
        evaluation, lines = _expected(ruleset, packet, chain, in_iface, out_iface, mark)
        got = runner.run(frame_for(packet), chain, in_iface, out_iface, mark=mark)
        assert (got.verdict, got.deciding) == (evaluation.verdict, evaluation.deciding), name
        assert got.counters == evaluation.counters, name
        assert got.log == lines, name
        assert len(lines) >= 2, name  # every case fires several LOG rules


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_log_rule_in_a_long_chain_logs(backend: str) -> None:
    """A chain past CHUNK_RULES lives in chunk functions of the bytecode programs: the
    context reaches them."""
    body = "".join(f"-A big -p udp --dport {port} -j DROP\n" for port in range(1, 300))
    text = (
        "*filter\n:big - [0:0]\n-A INPUT -j big\n"
        + body
        + '-A big -j LOG --log-prefix "chunk: "\n-A INPUT -j LOG --log-prefix "after: "\nCOMMIT\n'
    )
    ruleset = parse(text, "chunked")
    packet = bytes(PACKETS["tcp with options"])
    with ChainRunner(ruleset, backend=backend) as runner:
        got = runner.run(frame_for(packet), "INPUT", "eth0")
    _, lines = _expected(ruleset, packet, "INPUT", "eth0", None, 0)
    assert got.log == lines and [line.split(":")[0] for line in lines] == ["chunk", "after"]


BRIDGED = {  # chain -> the devices and the bridge ports br_netfilter gives it (None: none)
    "INPUT": ("br0", None, ("port1", None)),
    "FORWARD": ("br0", "br0", ("port1", "port2")),
    "routed FORWARD": ("br0", "eth1", ("port1", None)),
    "OUTPUT": (None, "br0", None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", list(BRIDGED))
def test_the_records_carry_the_bridge_ports(where: str, backend: str) -> None:
    """A packet a bridge handed to iptables: its lines name the ports (PHYSIN=, PHYSOUT=), as
    the evaluator's do, in a rule set without -m physdev."""
    ruleset = parse(RULES, "log")
    chain = where.split()[-1]
    in_iface, out_iface, ports = BRIDGED[where]
    packet = bytes(PACKETS["udp"])
    evaluation = evaluate(ruleset, packet, chain, in_iface, out_iface, bridge_ports=ports)
    phys_in, phys_out = ports or ("", "")
    seen = LoggedPacket(
        packet,
        in_iface or "",
        out_iface or "",
        mac=frame_for(packet)[:14],
        phys_in=phys_in or "",
        phys_out=phys_out or "",
    )
    lines = logged_lines(ruleset, evaluation.logged, seen, evaluation.logged_marks)
    devices = ("br0", "eth1", "port1", "port2")
    with ChainRunner(ruleset, devices, backend=backend) as runner:
        got = runner.run(frame_for(packet), chain, in_iface, out_iface, bridge_ports=ports)
    assert got.log == tuple(lines) and lines
    assert all(("PHYSIN=port1 " in line) == (ports is not None) for line in lines), lines
    assert all(("PHYSOUT=port2 " in line) == (where == "FORWARD") for line in lines), lines


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_ring_drops_events_not_packets_and_counts_them(backend: str) -> None:
    logs = "".join(f'-A INPUT -j LOG --log-prefix "n{n}: "\n' for n in range(20))
    ruleset = parse(f"*filter\n{logs}-A INPUT -p udp -j DROP\nCOMMIT\n", "full")
    room = 4096 // (RECORD_SIZE + 8)  # records of a one-page ring, each with its 8-byte header
    assert room == 13 and HEADER.size == 40
    packet = bytes(PACKETS["udp"])
    with ChainRunner(ruleset, log_ring_size=4096, backend=backend) as runner:
        for run in range(1, 4):
            got = runner.run(frame_for(packet), "INPUT", "eth0")
            assert got.verdict == "DROP" and got.deciding == ("INPUT", 21)
            assert all(got.counters[("INPUT", n)] == (1, len(packet)) for n in range(1, 21))
            assert [line.split(":")[0] for line in got.log] == [f"n{n}" for n in range(room)]
            assert runner.log_drops() == run * (20 - room)


def test_a_reader_waiting_on_the_ring_is_woken_by_a_record() -> None:
    """`bpflab log --follow` waits on the ring: the kernel wakes it when a program commits a
    record, long before its timeout."""
    ruleset = parse("*filter\n-A INPUT -j LOG\nCOMMIT\n", "wake")
    with ChainRunner(ruleset) as runner:
        assert runner.logging is not None
        ring = runner.logging.ring
        assert not ring.wait(0.05)  # nothing to read: it waits its timeout out
        program = runner.program("INPUT")
        woken: list[tuple[bool, float]] = []
        waiter = threading.Thread(target=lambda: woken.append((ring.wait(20), time.monotonic())))
        waiter.start()
        time.sleep(0.2)
        fired = time.monotonic()
        prog_test_run(program.fd, frame_for(bytes(PACKETS["udp"])))
        waiter.join(timeout=30)
        ((ready, at),) = woken
        assert ready and at - fired < 10, "woken by its timeout, not by the record"
        assert len(ring.records()) == 1 and ring.wait(0) is False


@settings(max_examples=60, deadline=None)
@given(
    ruleset=rulesets(),
    where=st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    flags=st.lists(st.sampled_from((0, 1, 2, 4, 0x20, 0x27)), min_size=6, max_size=6),
    traffic=st.lists(
        st.sampled_from(list(WHERE)).flatmap(
            lambda chain: st.tuples(st.just(chain), packets(chain))
        ),
        min_size=3,
        max_size=6,
    ),
)
def test_random_rule_sets_with_log_rules_agree_with_the_reference(
    ruleset, where, flags, traffic
) -> None:
    """LOG rules put at random places of random rule sets: every packet's lines, verdict and
    counters are the reference's."""
    chains = list(ruleset.chains.values())
    for number, (spot, flag) in enumerate(zip(where, flags, strict=False)):
        chain = chains[spot % len(chains)]
        rules = list(chain.rules)
        rules.insert(spot % (len(rules) + 1), Rule((), Log(spot % 8, f"r{number}: ", flag)))
        chain.rules = rules
    validate(ruleset)
    with ChainRunner(ruleset) as runner:
        for chain, packet in traffic:
            in_iface, out_iface = WHERE[chain]
            evaluation, lines = _expected(ruleset, packet, chain, in_iface, out_iface, 0)
            got = runner.run(frame_for(packet), chain, in_iface, out_iface)
            detail = f"\n{write(ruleset)}{chain} {packet.hex()}"
            assert (got.verdict, got.deciding) == (evaluation.verdict, evaluation.deciding), detail
            assert got.log == lines, detail


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", ["ingress", "egress"])
def test_the_attached_programs_with_log_rules_pass_the_verifier(hook: str, backend: str) -> None:
    """LOG in every built-in chain and in user chains, beside the tracker and REJECT (whose
    calls leave the entry function's frame little room)."""
    text = RULES.replace(
        "-A INPUT -p udp -j DROP",
        "-A INPUT -m conntrack --ctstate INVALID -j LOG --log-prefix ct:\n"
        "-A INPUT -p udp -j REJECT",
    )
    ruleset = parse(text, "hooks")
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
        Map(MapType.HASH, 4, INTERFACE_VALUE_SIZE, 16, name=INTERFACE_ADDRESSES) as sources,
        TrackerMaps.create(1024) as tracker,
        LogMaps() as logging,
    ):
        maps = {
            COUNTERS_MAP: counters,
            INTERFACE_ADDRESSES: sources,
            **tracker.maps,
            **logging.maps,
        }
        interfaces = {"eth0": 2, "eth1": 3}
        program = load_program(ruleset, hook, interfaces=interfaces, maps=maps, backend=backend)
        program.close()


NFLOG_RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:audit - [0:0]
-A INPUT -j NFLOG --nflog-group 3
-A INPUT -j audit
-A INPUT -p udp -j NFLOG --nflog-size 30
-A audit -j LOG --log-prefix "between: "
-A audit -j NFLOG --nflog-prefix x --nflog-range 10
COMMIT
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_nflog_rules_pass_their_packets_in_order(backend: str) -> None:
    """NFLOG shares LOG's records: each NFLOG rule's packet (cut at --nflog-size, whole with
    --nflog-range, which never worked), in order, and LOG's lines beside them."""
    ruleset = parse(NFLOG_RULES, "nflog")
    with ChainRunner(ruleset, backend=backend) as runner:
        for name, layer in PACKETS.items():
            packet = bytes(layer)
            evaluation, lines = _expected(ruleset, packet, "INPUT", "eth0", None, 0)
            fired = [ruleset.chains[c].rules[i - 1].target for c, i in evaluation.logged]
            cut = [t.snapshot_length for t in fired if isinstance(t, NfLog)]
            got = runner.run(frame_for(packet), "INPUT", "eth0")
            assert got.nflog == tuple(packet if n is None else packet[:n] for n in cut), name
            assert got.log == lines and len(lines) == 1, name
            assert len(got.nflog) == (3 if packet[9] == 17 else 2), name


def test_bpflab_run_prints_the_lines(tmp_path, capsys) -> None:
    from harness.cli import main

    rules = tmp_path / "log.rules"
    rules.write_text('*filter\n-A INPUT -p udp -j LOG --log-prefix "seen: "\nCOMMIT\n')
    frame = 'Ether()/IP(src="198.18.0.1",dst="198.18.0.2",id=9)/UDP(sport=5,dport=53)'
    assert main(["run", str(rules), "--chain", "INPUT", "--in", "eth0", "--packet", frame]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "packet 1: ACCEPT by INPUT policy"
    assert out[1].startswith("  log: seen: IN=eth0 OUT= MAC=")
    assert out[1].endswith(
        "SRC=198.18.0.1 DST=198.18.0.2 LEN=28 TOS=0x00 PREC=0x00 TTL=64 ID=9 PROTO=UDP SPT=5 "
        "DPT=53 LEN=8 "
    )
