"""`-m recent` in the generated programs against the reference evaluator, packet by packet,
under BPF_PROG_TEST_RUN with the clock fixed per packet (ChainRunner.run's `time`, counted in
jiffies at the kernel's HZ by both), and the verifier's verdict on the largest ring.
"""

from __future__ import annotations

import re

import pytest
from scapy.layers.inet import IP, TCP, UDP

from codegen.jiffies import kernel_hz
from codegen.rules import parse
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow
from codegen.tc.generator import CompileError
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged

BACKENDS = ("bytecode", "c")
SSH_GUARD = (
    "-A INPUT -p tcp --dport 22 -m recent --set --name SSH\n"
    "-A INPUT -p tcp --dport 22 -m recent --update --seconds 60 --hitcount 4 --name SSH -j DROP\n"
    "-A INPUT -p tcp --dport 22 -j ACCEPT"
)


def _syn(number: int, source: str = "198.18.0.5", ttl: int = 64) -> bytes:
    return bytes(IP(src=source, dst="198.18.1.1", id=number, ttl=ttl) / TCP(dport=22, flags="S"))


def _udp(number: int, source: str = "198.18.0.5", ttl: int = 64) -> bytes:
    return bytes(IP(src=source, dst="198.18.1.1", id=number, ttl=ttl) / UDP(dport=53))


def _table(rules: str, chains: str = "", policy: str = "DROP") -> str:
    return (
        f"*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"{chains}{rules}\nCOMMIT\n"
    )


SOURCES = ["198.18.0.5", "198.18.0.6", "198.18.7.9"]
# (name, rule set, packets as (chain, time in seconds, packet))
CASES = [
    (
        "the ssh guard: 3 SYNs pass, the 4th within 60 s is dropped, after 60 s one passes",
        _table(SSH_GUARD),
        [("INPUT", t, _syn(n)) for n, t in enumerate([0, 1, 2, 3, 4, 30, 63.9, 64.1, 130])],
    ),
    (
        "the ssh guard, two sources interleaved, a third late",
        _table(SSH_GUARD),
        [("INPUT", t / 2, _syn(t, SOURCES[t % 2])) for t in range(16)]
        + [("INPUT", 200 + t, _syn(t, SOURCES[t % 3])) for t in range(9)],
    ),
    (
        "! --rcheck, --rdest, a /16 mask, --remove",
        _table(
            "-A INPUT -p udp -m recent --set --name a --mask 255.255.0.0\n"
            "-A INPUT -p tcp -m recent ! --rcheck --seconds 5 --name a -j DROP\n"
            "-A INPUT -p tcp -m recent --remove --name a\n"
            "-A INPUT -m recent --rcheck --name b --rdest -j DROP\n"
            "-A INPUT -p tcp -m recent --set --name b --rdest\n"
            "-A INPUT -j ACCEPT"
        ),
        [
            ("INPUT", 0, _syn(0, "198.18.3.3")),
            ("INPUT", 1, _udp(1, "198.18.9.9")),
            ("INPUT", 2, _syn(2, "198.18.3.3")),
            ("INPUT", 3, _syn(3, "198.18.3.4")),
            ("INPUT", 4, _udp(4, "198.18.3.3")),
            ("INPUT", 20, _syn(5, "198.18.200.1")),
            ("INPUT", 21, _udp(6, "198.19.0.1")),
            ("INPUT", 22, _syn(7, "198.19.0.1")),
        ],
    ),
    (
        "--rttl: a changed TTL is another host, TTL 0 any; ! --update",
        _table(
            "-A INPUT -p udp -m recent --set --name t\n"
            "-A INPUT -p tcp -m recent --rcheck --seconds 9 --hitcount 3 --rttl --name t -j DROP\n"
            "-A INPUT -p udp -m recent ! --update --seconds 2 --hitcount 2 --name t -j DROP\n"
            "-A INPUT -j ACCEPT"
        ),
        [
            ("INPUT", t, (_udp if kind == "u" else _syn)(n, ttl=ttl))
            for n, (t, kind, ttl) in enumerate(
                [
                    (0, "u", 64),
                    (0.5, "u", 64),
                    (1, "t", 64),
                    (1.5, "t", 63),
                    (2, "t", 0),
                    (2.5, "u", 63),
                    (3, "t", 63),
                    (3.5, "t", 64),
                    (10, "u", 64),
                    (10.1, "t", 64),
                    (11, "u", 64),
                    (11.2, "t", 64),
                    (30, "t", 64),
                ]
            )
        ],
    ),
    (
        "a user chain from INPUT and FORWARD shares a table; FORWARD's TTL is one more",
        _table(
            "-A INPUT -j guard\n-A FORWARD -j guard\n"
            "-A guard -m recent --update --seconds 30 --hitcount 3 --rttl --name g -j DROP\n"
            "-A guard -m recent --set --name g",
            ":guard - [0:0]\n",
            "ACCEPT",
        ),
        [
            (chain, t, _udp(t, ttl=64 if chain == "INPUT" else 63))
            for t, chain in enumerate(["INPUT", "FORWARD"] * 4 + ["FORWARD"] * 2)
        ],
    ),
    (
        "--hitcount 5 over a sliding 3 s window, stamps going stale one by one",
        _table(
            "-A INPUT -m recent --rcheck --seconds 3 --hitcount 5 --name r -j DROP\n"
            "-A INPUT -m recent --set --name r",
            policy="ACCEPT",
        ),
        [("INPUT", t / 2, _udp(t)) for t in range(12)]
        + [("INPUT", 10 + t * 0.8, _udp(t)) for t in range(12)],
    ),
]


def _steps(packets: list[tuple[str, float, bytes]]) -> list[FlowStep]:
    interfaces = {"INPUT": ("eth0", None), "FORWARD": ("eth0", "eth1"), "OUTPUT": (None, "eth0")}
    return [FlowStep(packet, chain, *interfaces[chain], time=t) for chain, t, packet in packets]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "rules", "packets"), CASES, ids=[c[0] for c in CASES])
def test_programs_remember_as_the_reference(
    backend: str, name: str, rules: str, packets: list[tuple[str, float, bytes]]
) -> None:
    ruleset = parse(rules, "recent.rules")
    steps = _steps(packets)
    expected = evaluate_flow(ruleset, steps, memory=MatchMemory(kernel_hz()))
    verdicts = set()
    with ChainRunner(ruleset, ["eth0", "eth1"], backend=backend) as runner:
        for number, (step, reference) in enumerate(zip(steps, expected, strict=True), 1):
            outcome = runner.run(
                frame_for(step.packet), step.chain, step.in_iface, step.out_iface, time=step.time
            )
            want = reference.evaluation
            where = f"{name}, packet {number} at {step.time} s"
            assert (outcome.verdict, outcome.deciding) == (want.verdict, want.deciding), where
            assert outcome.counters == want.counters, where
            verdicts.add(outcome.verdict)
    assert verdicts == {"ACCEPT", "DROP"}, "the case tests nothing"


@pytest.mark.parametrize(("backend", "hitcount"), [("bytecode", 256), ("c", 64)])
def test_the_largest_ring_passes_the_verifier(backend: str, hitcount: int) -> None:
    """The largest --hitcount each backend takes, 256 (a ring of 256 stamps, the counting
    loop's 256 places) and 64 in C: the hitcount-th packet within the minute is the first
    dropped, as the reference says."""
    rules = _table(
        "-A INPUT -m recent --set --name big\n"
        f"-A INPUT -m recent --update --seconds 60 --hitcount {hitcount} --name big -j DROP",
        policy="ACCEPT",
    )
    ruleset = parse(rules, "big.rules")
    steps = _steps([("INPUT", n / 100, _udp(n)) for n in range(hitcount + 4)])
    expected = evaluate_flow(ruleset, steps, memory=MatchMemory(kernel_hz()))
    with ChainRunner(ruleset, backend=backend) as runner:
        verdicts = [
            runner.run(frame_for(step.packet), "INPUT", "eth0", time=step.time).verdict
            for step in steps
        ]
    assert verdicts == [r.evaluation.verdict for r in expected]
    assert verdicts == ["ACCEPT"] * (hitcount - 1) + ["DROP"] * 5


def test_c_refuses_a_ring_above_64() -> None:
    rules = _table("-A INPUT -m recent --rcheck --seconds 5 --hitcount 65 --name r -j DROP")
    with pytest.raises(CompileError) as raised:
        ChainRunner(parse(rules, "recent.rules"), backend="c").program("INPUT")
    assert re.match(r"recent.rules:5:1: the C backend refuses .*--hitcount 65", str(raised.value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reap_is_refused_in_one_sentence(backend: str) -> None:
    rules = _table("-A INPUT -m recent --rcheck --seconds 5 --reap --name r -j DROP")
    with pytest.raises(CompileError) as raised:
        ChainRunner(parse(rules, "recent.rules"), backend=backend).program("INPUT")
    message = str(raised.value)
    assert re.match(r"recent.rules:5:1: .*-m recent --reap removes the table's least", message)
    assert message.count("\n") <= 1, message
