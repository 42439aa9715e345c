"""`-m hashlimit` in the generated programs against the reference evaluator, packet by packet,
under BPF_PROG_TEST_RUN with the clock fixed per packet (ChainRunner.run's `time`, the same
seconds the reference counts in jiffies at the kernel's HZ): a bucket per key, keys from the
mode and the masks, names shared between rules, --hashlimit-above, expiry, and the entry lock
under two CPUs at once.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from codegen.bpf.testrun import prog_test_run
from codegen.jiffies import kernel_hz
from codegen.rules import parse
from codegen.rules.extensions.hashlimit import parse_rate
from codegen.rules.extensions.hashlimit_table import cost as hashlimit_cost
from codegen.rules.extensions.hashlimit_table import credit_cap
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged

BACKENDS = ("bytecode", "c")


def _udp(
    number: int, source: str = "198.18.0.5", sport: int = 4000, dport: int = 53, size: int = 29
) -> bytes:
    """A datagram of `size` bytes, its IP header included."""
    payload = b"q" * (size - 28)
    return bytes(
        IP(src=source, dst="198.18.1.1", id=number) / UDP(sport=sport, dport=dport) / payload
    )


def _table(rules: str, chains: str = "") -> str:
    return f"*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n{chains}{rules}\nCOMMIT\n"


SOURCES = ("198.18.0.5", "198.18.0.6", "198.18.0.77", "198.18.3.5")
# (name, rule set, packets as (chain, time in seconds, bytes))
CASES = [
    (
        "5/sec per source: two sources each get their burst",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 5/s --hashlimit-mode srcip"
            " --hashlimit-name perhost -j ACCEPT"
        ),
        [("INPUT", t, _udp(n, SOURCES[n % 2])) for n, t in enumerate([0.0] * 16 + [0.5] * 12)],
    ),
    (
        "a /24 source mask: .5 and .6 share a bucket, 198.18.3.5 has its own",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 2/s --hashlimit-burst 3 --hashlimit-mode"
            " srcip --hashlimit-srcmask 24 --hashlimit-name subnet -j ACCEPT"
        ),
        [("INPUT", n / 40, _udp(n, SOURCES[n % 4])) for n in range(60)],
    ),
    (
        "no mode: one bucket for all, above inverting",
        _table(
            "-A INPUT -m hashlimit --hashlimit-above 10/sec --hashlimit-burst 4"
            " --hashlimit-name all -j DROP\n-A INPUT -j ACCEPT"
        ),
        [("INPUT", n / 50, _udp(n, SOURCES[n % 3])) for n in range(80)],
    ),
    (
        "ports in the key: srcport,dstport, and ICMP with ports 0",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 2 --hashlimit-mode"
            " srcport,dstport,dstip --hashlimit-dstmask 16 --hashlimit-name ports -j ACCEPT"
        ),
        [
            ("INPUT", n / 10, packet)
            for n, packet in enumerate(
                [_udp(k, sport=1000 + k % 3, dport=53 + k % 2) for k in range(30)]
                + [bytes(IP(src="198.18.0.5", dst="198.18.1.1") / ICMP()) for _ in range(5)]
                + [
                    bytes(IP(src="198.18.0.5", dst="198.18.1.1") / TCP(sport=7, dport=80))
                    for _ in range(4)
                ]
            )
        ],
    ),
    (
        "a name shared by two rules and a user chain from INPUT and OUTPUT",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 3/sec --hashlimit-burst 3 --hashlimit-mode"
            " srcip --hashlimit-name shared -j ACCEPT\n"
            "-A INPUT -j sub\n-A OUTPUT -j sub\n"
            "-A sub -m hashlimit --hashlimit-above 3/sec --hashlimit-burst 3 --hashlimit-mode"
            " srcip --hashlimit-name shared -j DROP\n"
            "-A sub -m hashlimit --hashlimit-upto 1/min --hashlimit-name other -j ACCEPT",
            ":sub - [0:0]\n",
        ),
        [
            (chain, n / 8, _udp(n, SOURCES[n % 2]))
            for n in range(48)
            for chain in ("INPUT", "OUTPUT")
        ],
    ),
    (
        "an entry idle for htable-expire starts full again",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 2 --hashlimit-mode"
            " srcip --hashlimit-name slow --hashlimit-htable-expire 3000 -j ACCEPT"
        ),
        [
            ("INPUT", t, _udp(n))
            for n, t in enumerate([0.0, 0.0, 0.0, 2.996, 5.992, 8.992, 8.992, 8.992])
        ],
    ),
    (
        "7/day burst 1000000: the credit cap wraps in 64 bits, as the kernel's",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 7/day --hashlimit-burst 1000000"
            " --hashlimit-name wrap -j ACCEPT"
        ),
        [("INPUT", t, _udp(n)) for n, t in enumerate([0.0] * 10 + [3600.0] * 5)],
    ),
    (
        "a byte rate per source: datagrams of every size, a second's credit each, refilled",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 2kb/s --hashlimit-mode srcip"
            " --hashlimit-name bytes -j ACCEPT"
        ),
        [
            ("INPUT", n / 25, _udp(n, SOURCES[n % 2], size=(29, 1500, 600, 15, 40)[n % 5]))
            for n in range(80)
        ],
    ),
    (
        "a byte rate's burst: refills of a second's credit, then the rate; above inverting",
        _table(
            "-A INPUT -m hashlimit --hashlimit-above 1kb/s --hashlimit-burst 3kb"
            " --hashlimit-name refills --hashlimit-htable-expire 2000 -j DROP\n-A INPUT -j ACCEPT"
        ),
        [
            ("INPUT", t, _udp(n, size=1000))
            for n, t in enumerate([0.0] * 6 + [0.5, 1.0, 1.004, 1.5, 2.0, 4.5, 4.5, 4.5])
        ],
    ),
    (
        "16b/s: a datagram's price is capped at a second's credit",
        _table("-A INPUT -m hashlimit --hashlimit-upto 16b/s --hashlimit-name tiny -j ACCEPT"),
        [("INPUT", t, _udp(n, size=1500)) for n, t in enumerate([0.0, 0.0, 0.5, 1.0, 1.0])],
    ),
    (
        "rate match per source: a window takes burst + rate; the one after a busy window none",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 4/sec --hashlimit-burst 2 --hashlimit-mode"
            " srcip --hashlimit-name window --hashlimit-rate-match --hashlimit-htable-expire"
            " 60000 -j ACCEPT"
        ),
        [
            ("INPUT", t, _udp(n, SOURCES[n % 2]))
            for n, t in enumerate([0.0] * 16 + [0.99] * 2 + [1.0] * 4 + [2.5] * 8 + [4.0] * 2)
        ],
    ),
    (
        "rate match above a byte rate, 2-second windows counted in bytes",
        _table(
            "-A INPUT -m hashlimit --hashlimit-above 1kb/s --hashlimit-burst 2kb --hashlimit-name"
            " bytewin --hashlimit-rate-match --hashlimit-rate-interval 2 -j DROP\n"
            "-A INPUT -j ACCEPT"
        ),
        [("INPUT", n / 4, _udp(n, size=(29, 1500, 600, 300)[n % 4])) for n in range(40)],
    ),
    (
        "rate match 3/min: 60-second windows, their entries gone after 60 s idle",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 3/min --hashlimit-name minutes"
            " --hashlimit-rate-match -j ACCEPT"
        ),
        [
            ("INPUT", t, _udp(n))
            for n, t in enumerate([0.0] * 10 + [59.0, 60.0, 119.0, 120.0, 200.0])
        ],
    ),
    (
        "a truncated UDP header with a port mode is dropped on the spot",
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 5/sec --hashlimit-mode dstport"
            " --hashlimit-name cut -j ACCEPT"
        ),
        [
            ("INPUT", 0.0, _udp(1)),
            ("INPUT", 0.0, bytes(IP(src="198.18.0.5", dst="198.18.1.1", proto=17) / b"\x00\x35")),
        ],
    ),
]


def _steps(packets: list[tuple[str, float, bytes]]) -> list[FlowStep]:
    return [
        FlowStep(packet, chain, *(("eth0", None) if chain == "INPUT" else (None, "eth0")), time=t)
        for chain, t, packet in packets
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "rules", "packets"), CASES, ids=[c[0] for c in CASES])
def test_programs_count_as_the_reference(
    backend: str, name: str, rules: str, packets: list[tuple[str, float, bytes]]
) -> None:
    ruleset = parse(rules, "hashlimit.rules")
    steps = _steps(packets)
    expected = evaluate_flow(ruleset, steps, memory=MatchMemory(kernel_hz()))
    verdicts = set()
    with ChainRunner(ruleset, backend=backend) as runner:
        for number, (step, reference) in enumerate(zip(steps, expected, strict=True), 1):
            outcome = runner.run(
                frame_for(step.packet), step.chain, step.in_iface, step.out_iface, time=step.time
            )
            want = reference.evaluation
            where = f"{name}, packet {number} at {step.time} s"
            assert (outcome.verdict, outcome.deciding) == (want.verdict, want.deciding), where
            assert outcome.counters == want.counters, where
            verdicts.add((outcome.verdict, outcome.deciding))
    assert len(verdicts) > 1, "the case tests nothing: every packet had one fate"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_real_clock_counts_too(backend: str) -> None:
    """No fixed time: bpf_jiffies64. 20 packets at once from each of two sources through
    10/sec burst 5 per source: each source's five, and one more each per tenth of a second
    that went by meanwhile."""
    ruleset = parse(
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 10/sec --hashlimit-mode srcip"
            " --hashlimit-name real -j ACCEPT"
        )
    )
    with ChainRunner(ruleset, backend=backend) as runner:
        runner.program("INPUT")
        start = time.monotonic()
        verdicts = {
            source: [
                runner.run(frame_for(_udp(n, source)), "INPUT", "eth0").verdict for n in range(20)
            ]
            for source in SOURCES[:2]
        }
        elapsed = time.monotonic() - start
    for source, seen in verdicts.items():
        assert seen[:5] == ["ACCEPT"] * 5, source
        assert 5 <= seen.count("ACCEPT") <= 6 + int(elapsed * 10), source


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_cpus_spend_each_credit_once(backend: str) -> None:
    """Two CPUs running the program at once on one key, the clock fixed: together they let
    through exactly what its bucket holds, cap / cost packets (the entry lock loses none and
    lets none through twice; a packet that cannot get the lock in TRIES attempts is over
    the limit, which would show as fewer)."""
    rules = (
        "-A INPUT -m hashlimit --hashlimit-upto 10000/sec --hashlimit-burst 5000"
        " --hashlimit-mode srcip --hashlimit-name race -j ACCEPT"
    )
    ruleset = parse(_table(rules))
    match = ruleset["INPUT"].rules[0].matches[0]
    hz = kernel_hz()
    full = credit_cap(match, hz) // hashlimit_cost(match, hz)
    assert parse_rate("10000/sec") == (match.avg, 1)
    with ChainRunner(ruleset, backend=backend) as runner:
        runner.run(frame_for(_udp(0, "198.18.0.9")), "INPUT", "eth0", time=1.0)  # fixes the clock
        program = runner.program("INPUT").fd
        cpus = sorted(os.sched_getaffinity(0))[:2]
        frame = frame_for(_udp(1))

        def hammer(cpu: int) -> None:
            os.sched_setaffinity(0, {cpu})
            prog_test_run(program, frame, repeat=20000)

        threads = [threading.Thread(target=hammer, args=(cpu,)) for cpu in cpus]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counted = runner.counters.read()
    assert counted[("INPUT", 1)][0] == full + 1
    assert counted[("INPUT", "policy")][0] == 40000 - full


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpflab_run_counts_on_the_captures_clock(tmp_path, backend: str) -> None:
    """`bpflab run --pcap` fixes the clock hashlimit reads to the capture's timestamps: two
    sources through 10/sec burst 5 per source, 12 datagrams each at once, then 0.35 s later
    12 more: 5 each, then 3 each."""
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    from tests.kernel.test_cli import bpflab

    frames = []
    for number in range(48):
        frame = Ether() / IP(_udp(number, SOURCES[number % 2]))
        frame.time = 1_700_000_000 + (0.35 if number >= 24 else 0.0)
        frames.append(frame)
    capture = tmp_path / "burst.pcap"
    wrpcap(str(capture), frames)
    rules = tmp_path / "hashlimit.rules"
    rules.write_text(
        _table(
            "-A INPUT -m hashlimit --hashlimit-upto 10/sec --hashlimit-mode srcip"
            " --hashlimit-name pcap -j ACCEPT"
        )
    )
    result = bpflab(
        "run", str(rules), "--backend", backend, "--chain", "INPUT", "--in", "eth0",
        "--pcap", str(capture), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line)["verdict"] for line in result.stdout.splitlines()[:48]]
    counts = [
        [verdicts[i] for i in range(start, start + 24) if i % 2 == parity].count("ACCEPT")
        for start in (0, 24)
        for parity in (0, 1)
    ]
    assert counts == [5, 5, 3, 3]


_BYTE_RATES = {"16b/s": 16, "100b/s": 100, "1kb/s": 1024, "3kb/s": 3072, "64kb/s": 65536}
_PACKET_RATES = st.sampled_from(("3/sec", "20/sec", "1/min"))


@st.composite
def _byte_or_packet_rule(draw: st.DrawFn) -> str:
    """A hashlimit rule with a byte rate (and maybe a burst in bytes) or a packet rate."""
    words = [
        "-A INPUT -m hashlimit",
        draw(st.sampled_from(("--hashlimit-upto", "--hashlimit-above"))),
    ]
    if draw(st.booleans()):
        rate = draw(st.sampled_from(sorted(_BYTE_RATES)))
        words.append(rate)
        if draw(st.booleans()):  # one to four seconds' worth, and a little more
            seconds = draw(st.integers(1, 4))
            burst = seconds * _BYTE_RATES[rate] + draw(st.integers(0, 9))
            words.append(f"--hashlimit-burst {burst}b")
    else:
        words += [draw(_PACKET_RATES), f"--hashlimit-burst {draw(st.integers(1, 6))}"]
    mode = draw(st.sampled_from(("", "--hashlimit-mode srcip", "--hashlimit-mode dstport")))
    if draw(st.booleans()):  # rate matching, in windows of a drawn length
        words += ["--hashlimit-rate-match"]
        words += draw(
            st.sampled_from(([], ["--hashlimit-rate-interval 1"], ["--hashlimit-rate-interval 2"]))
        )
    return " ".join([*words, mode, "--hashlimit-name drawn -j ACCEPT"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _byte_or_packet_rule(),
    st.lists(
        st.tuples(
            st.integers(0, 3),  # source
            st.sampled_from((29, 44, 200, 576, 1000, 1500)),  # datagram size
            st.sampled_from((0.0, 0.001, 0.05, 0.3, 1.0)),  # seconds since the last
        ),
        min_size=5,
        max_size=40,
    ),
)
def test_drawn_rates_and_datagrams_count_as_the_reference(backend, rule, sent) -> None:  # type: ignore[no-untyped-def]
    """Drawn rates (bytes or packets), bursts, modes and datagrams of drawn sizes at drawn
    times: the programs decide every one as the reference does."""
    ruleset = parse(_table(rule), "drawn.rules")
    clock, packets = 0.0, []
    for number, (source, size, gap) in enumerate(sent):
        clock += gap
        packets.append(
            ("INPUT", clock, _udp(number, SOURCES[source], dport=53 + source % 2, size=size))
        )
    steps = _steps(packets)
    expected = evaluate_flow(ruleset, steps, memory=MatchMemory(kernel_hz()))
    with ChainRunner(ruleset, backend=backend) as runner:
        for number, (step, reference) in enumerate(zip(steps, expected, strict=True), 1):
            outcome = runner.run(
                frame_for(step.packet), step.chain, step.in_iface, step.out_iface, time=step.time
            )
            assert outcome.verdict == reference.evaluation.verdict, (rule, number)
