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

from codegen.rules import ConnectionTable, FlowStep, evaluate_flow, parse
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
