"""The generated programs' connection tracker (codegen/conntrack, in both backends) against the
reference tracker, packet by packet, under BPF_PROG_TEST_RUN.

The flows and the counting rule set are those the reference is judged by against the kernel
(test_tracker_vs_netfilter): each packet's ctstate, direction, status bits and seconds to
expiry are counted by rules in INPUT and OUTPUT, whose chain programs share one table here, so
that a flow's two halves meet in it. The tracker's clock is fixed per packet to the flow's own
time, so timeouts run as they would in the kernel with no waiting.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP

from codegen.jiffies import kernel_hz
from codegen.rules import ConnectionTable, FlowStep, evaluate_flow, parse
from codegen.rules.tracking.timeouts import Timeouts
from harness.backends import BACKENDS
from harness.runner import ChainRunner, frame_for
from tests.net.test_tracker_vs_netfilter import FLOWS, RULES, UDP_STREAM_WAIT, WAIT, _flatten

pytestmark = pytest.mark.privileged

SECONDS_PER_PACKET = 0.001


def _steps(steps: list) -> list[FlowStep]:
    """The flow as FlowSteps, timed: a millisecond a packet, and WAIT's pause."""
    flow, now = [], 0.0
    for step in steps:
        if step == WAIT:
            now += UDP_STREAM_WAIT
            continue
        chain, packet = step
        interfaces = ("eth0", None) if chain == "INPUT" else (None, "eth0")
        flow.append(FlowStep(_flatten(packet), chain, *interfaces, time=now))
        now += SECONDS_PER_PACKET
    return flow


@pytest.fixture(scope="module", params=BACKENDS)
def runner(request: pytest.FixtureRequest) -> Iterator[ChainRunner]:
    """The counting rule set's chain programs, loaded once per backend."""
    with ChainRunner(parse(RULES, "tracker.rules"), backend=request.param) as loaded:
        yield loaded


@pytest.mark.parametrize(("name", "steps"), FLOWS, ids=[name for name, _ in FLOWS])
def test_programs_track_each_packet_as_the_reference(
    runner: ChainRunner, name: str, steps: list
) -> None:
    flow = _steps(steps)
    expected = evaluate_flow(runner.ruleset, flow, ConnectionTable())
    assert runner.tracker is not None
    runner.tracker.flush()  # each flow starts from an empty table, as in the reference
    for number, (step, reference) in enumerate(zip(flow, expected, strict=True), 1):
        outcome = runner.run(
            frame_for(step.packet), step.chain, step.in_iface, step.out_iface, time=step.time
        )
        want = reference.evaluation
        where = f"{name}, packet {number}"
        assert (outcome.verdict, outcome.deciding) == (want.verdict, want.deciding), where
        assert outcome.counters == want.counters, where


# A namespace's own conntrack sysctls (harness.deploy.conntrack_sysctls), compiled in: no
# window checks, no pickups, short UDP, ICMP and established timeouts.
SETTINGS = Timeouts(tcp_be_liberal=1, tcp_loose=0, udp=7, icmp=3, tcp_established=1000)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_namespaces_settings_track_as_the_reference_with_them(backend: str) -> None:
    """Every flow again with SETTINGS in both the programs and the reference; some flow must
    then go otherwise than with the kernel's defaults, or the settings were not compiled in."""
    ruleset = parse(RULES, "tracker.rules")
    changed = []
    with ChainRunner(ruleset, backend=backend, timeouts=SETTINGS) as runner:
        assert runner.tracker is not None
        for name, steps in FLOWS:
            flow = _steps(steps)
            expected = evaluate_flow(ruleset, flow, ConnectionTable(timeouts=SETTINGS))
            default = evaluate_flow(ruleset, flow, ConnectionTable())
            runner.tracker.flush()
            for number, (step, reference) in enumerate(zip(flow, expected, strict=True), 1):
                outcome = runner.run(
                    frame_for(step.packet),
                    step.chain,
                    step.in_iface,
                    step.out_iface,
                    time=step.time,
                )
                want = reference.evaluation
                where = f"{name}, packet {number}"
                assert (outcome.verdict, outcome.deciding) == (want.verdict, want.deciding), where
                assert outcome.counters == want.counters, where
            if [e.evaluation.counters for e in expected] != [
                e.evaluation.counters for e in default
            ]:
                changed.append(name)
    assert len(changed) >= 3, changed


EDGE_RULES = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 1 -m conntrack --ctorigsrc 0.0.0.0/0 -j ACCEPT
-A INPUT -p tcp --dport 2 -m conntrack --ctstate INVALID --ctorigsrc 0.0.0.0/0 -j ACCEPT
-A INPUT -p tcp --dport 3 -m conntrack --ctexpire 0:4294967295 -j ACCEPT
COMMIT
"""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("port", [1, 2, 3])
@pytest.mark.parametrize("flags", ["S", "SA"])  # a SYN is NEW; a lone SYN/ACK has no entry
def test_options_that_hold_for_any_entry_still_need_one(backend: str, port: int, flags: str):
    """xt_conntrack: with no entry only --ctstate is looked at; an option that every entry
    would pass (a /0 address, the whole expiry range) still fails a packet without one."""
    ruleset = parse(EDGE_RULES, "edge.rules")
    packet = _flatten(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(dport=port, flags=flags))
    step = FlowStep(packet, "INPUT", "eth0", None, time=0.0)
    (want,) = evaluate_flow(ruleset, [step], ConnectionTable())
    with ChainRunner(ruleset, backend=backend) as runner:
        got = runner.run(frame_for(packet), "INPUT", "eth0", time=0.0)
    assert (got.verdict, got.deciding) == (want.evaluation.verdict, want.evaluation.deciding)


EXPIRY_RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m conntrack --ctexpire 0 -j DROP
-A INPUT -p tcp -m conntrack --ctexpire 1:119 -j DROP
-A INPUT -p tcp -m conntrack --ctexpire 120 -j DROP
-A INPUT -p tcp -m conntrack --ctexpire 121:4294967295 -j DROP
COMMIT
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_entrys_expiry_is_read_against_the_jiffies(backend: str) -> None:
    """A SYN's entry is unconfirmed in the chains: nf_ct_expires reads its relative 120 s
    against the u32 jiffies, which the test runs' clock has at 0 when it reads 0 s."""
    hz = kernel_hz()
    times = {
        0.0: 3,  # jiffies 0: the whole 120 s
        30.0: 2,  # 90 s
        10_000.0: 1,  # past the timeout: 0
        ((1 << 31) + 200 * hz) / hz: 4,  # 80 s short of 2**31 jiffies ahead: 2**31 / HZ - 80
    }
    ruleset = parse(EXPIRY_RULES, "expiry.rules")
    with ChainRunner(ruleset, backend=backend) as runner:
        for number, (at, rule) in enumerate(times.items()):
            packet = _flatten(
                IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=4000 + number, flags="S")
            )
            step = FlowStep(packet, "INPUT", "eth0", None, time=at)
            (want,) = evaluate_flow(ruleset, [step], ConnectionTable())
            got = runner.run(frame_for(packet), "INPUT", "eth0", time=at)
            assert want.evaluation.deciding == ("INPUT", rule), at
            assert (got.verdict, got.deciding) == ("DROP", ("INPUT", rule)), at
