"""`-m limit` in the generated programs against the reference evaluator, packet by packet, under
BPF_PROG_TEST_RUN with the clock fixed per packet (ChainRunner.run's `time`: the same seconds
the reference counts in jiffies at the kernel's HZ), and the buckets' update under two CPUs at
once.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from scapy.layers.inet import IP, UDP

from codegen.bpf.testrun import prog_test_run
from codegen.jiffies import kernel_hz
from codegen.rules import parse
from codegen.rules.extensions.limit import Limit, cost, credit_cap, parse_rate
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged

BACKENDS = ("bytecode", "c")


def _udp(number: int, source: str = "198.18.0.5") -> bytes:
    return bytes(IP(src=source, dst="198.18.1.1", id=number) / UDP(dport=53) / b"q")


def _table(rules: str, chains: str = "") -> str:
    return f"*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n{chains}{rules}\nCOMMIT\n"


# (name, rule set, packets as (chain, time in seconds))
BURST = [("INPUT", 0.0)] * 20 + [("INPUT", 0.35)] * 20 + [("INPUT", 2.35)] * 20
CASES = [
    ("10/sec burst 5", _table("-A INPUT -m limit --limit 10/sec -j ACCEPT"), BURST),
    (
        "3/min burst 10, a minute",
        _table("-A INPUT -m limit --limit 3/min --limit-burst 10 -j ACCEPT"),
        [("INPUT", t / 4) for t in range(0, 240)],
    ),
    (
        "25/sec burst 50",
        _table("-A INPUT -p udp -m limit --limit 25/sec --limit-burst 50 -j ACCEPT"),
        [("INPUT", t / 100) for t in range(300)],
    ),
    (
        "3/hour, the dividing branch",
        _table("-A INPUT -m limit -j ACCEPT"),
        [("INPUT", 0.0)] * 7 + [("INPUT", 1199.99), ("INPUT", 1200.0), ("INPUT", 1200.0)],
    ),
    (
        "10000/sec burst 10, a cost of a few credits",
        _table("-A INPUT -m limit --limit 10000/sec --limit-burst 10 -j ACCEPT"),
        [("INPUT", t / 1000) for t in range(10) for _ in range(15)],
    ),
    (
        "a user chain reached from INPUT and OUTPUT shares its bucket",
        _table(
            "-A INPUT -j shared\n-A OUTPUT -j shared\n"
            "-A shared -m limit --limit 2/sec --limit-burst 3 -j ACCEPT\n-A shared -j DROP",
            ":shared - [0:0]\n",
        ),
        [(chain, t / 10) for t in range(40) for chain in ("INPUT", "OUTPUT")],
    ),
    (
        "two buckets in one rule, one in a rule without a target, a RETURN",
        _table(
            "-A INPUT -m limit --limit 5/sec --limit-burst 2\n"
            "-A INPUT -j sub\n"
            "-A INPUT -m limit --limit 4/sec --limit-burst 4 -m limit --limit 1/sec"
            " --limit-burst 2 -j ACCEPT\n"
            "-A sub -m limit --limit 3/sec --limit-burst 1 -j RETURN\n"
            "-A sub -p udp -j DROP",
            ":sub - [0:0]\n",
        ),
        [("INPUT", t / 20) for t in range(100)],
    ),
    (
        "a jump of 2^31 jiffies and more",
        _table("-A INPUT -m limit --limit 10/sec -j ACCEPT"),
        [("INPUT", 0.0)] * 6
        + [("INPUT", 2**31 / 250 + 0.004 * k) for k in range(6)]
        + [("INPUT", 2**33 / 250 + 1.0)] * 6,
    ),
    (
        "the u32 credit wrapping after 1.55 idle days",
        _table("-A INPUT -m limit --limit 10/sec -j ACCEPT"),
        [("INPUT", 0.0)] * 5 + [("INPUT", ((2**32 - 10000) // 128 + 1) / 250)] * 6,
    ),
]


def _steps(packets: list[tuple[str, float]]) -> list[FlowStep]:
    return [
        FlowStep(_udp(n), chain, *(("eth0", None) if chain == "INPUT" else (None, "eth0")), time=t)
        for n, (chain, t) in enumerate(packets)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "rules", "packets"), CASES, ids=[c[0] for c in CASES])
def test_programs_count_as_the_reference(
    backend: str, name: str, rules: str, packets: list[tuple[str, float]]
) -> None:
    ruleset = parse(rules, "limit.rules")
    steps = _steps(packets)
    expected = evaluate_flow(ruleset, steps, memory=MatchMemory(kernel_hz()))
    accepted = 0
    with ChainRunner(ruleset, backend=backend) as runner:
        for number, (step, reference) in enumerate(zip(steps, expected, strict=True), 1):
            outcome = runner.run(
                frame_for(step.packet), step.chain, step.in_iface, step.out_iface, time=step.time
            )
            want = reference.evaluation
            where = f"{name}, packet {number} at {step.time} s"
            assert (outcome.verdict, outcome.deciding) == (want.verdict, want.deciding), where
            assert outcome.counters == want.counters, where
            accepted += outcome.verdict == "ACCEPT"
    assert 0 < accepted < len(steps) or name.startswith("a user chain"), "the case tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_real_clock_counts_too(backend: str) -> None:
    """No fixed time: bpf_jiffies64. 20 packets at once through 10/sec burst 5: the five of
    the burst, and one more for each tenth of a second that went by meanwhile."""
    ruleset = parse(_table("-A INPUT -m limit --limit 10/sec -j ACCEPT"))
    with ChainRunner(ruleset, backend=backend) as runner:
        runner.program("INPUT")
        start = time.monotonic()
        verdicts = [runner.run(frame_for(_udp(n)), "INPUT", "eth0").verdict for n in range(20)]
        elapsed = time.monotonic() - start
    assert verdicts[:5] == ["ACCEPT"] * 5
    assert 5 <= verdicts.count("ACCEPT") <= 6 + int(elapsed * 10)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_cpus_spend_each_credit_once(backend: str) -> None:
    """Two CPUs running the program at once on one bucket, the clock fixed: together they
    let through exactly what the bucket holds, cap / cost packets, no more and no fewer."""
    ruleset = parse(_table("-A INPUT -m limit --limit 10000/sec --limit-burst 10000 -j ACCEPT"))
    match = Limit(parse_rate("10000/sec"), 10000)
    hz = kernel_hz()
    full = credit_cap(match, hz) // cost(match, hz)
    with ChainRunner(ruleset, backend=backend) as runner:
        runner.run(frame_for(_udp(0)), "INPUT", "eth0", time=1.0)  # fixes the clock
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
    assert counted[("INPUT", 1)][0] == full
    assert counted[("INPUT", "policy")][0] == 40001 - full


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpflab_run_counts_on_the_captures_clock(tmp_path, backend: str) -> None:
    """`bpflab run --pcap` fixes the buckets' clock to the capture's timestamps, as it does
    the tracker's: the verified 10/sec burst 5 sequence, however fast the run goes."""
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    from tests.kernel.test_cli import bpflab

    frames = []
    for number, (_, when) in enumerate(BURST):
        frame = Ether() / IP(_udp(number))
        frame.time = 1_700_000_000 + when
        frames.append(frame)
    capture = tmp_path / "burst.pcap"
    wrpcap(str(capture), frames)
    rules = tmp_path / "limit.rules"
    rules.write_text(_table("-A INPUT -m limit --limit 10/sec -j ACCEPT"))
    result = bpflab(
        "run", str(rules), "--backend", backend, "--chain", "INPUT", "--in", "eth0",
        "--pcap", str(capture), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line)["verdict"] for line in result.stdout.splitlines()[: len(BURST)]]
    assert [verdicts[i : i + 20].count("ACCEPT") for i in (0, 20, 40)] == [5, 3, 5]
