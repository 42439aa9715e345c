"""Three voices on the same random cases: the reference evaluator, the bytecode generator's chain
programs and the C backend's (bcc), all run with BPF_PROG_TEST_RUN; and a sample of such cases
against the kernel's own netfilter as a fourth.

Each example is a random rule set aimed at its traffic (the trick of test_tc_differential) and
packets for every built-in chain. The C programs of a rule set come from one bcc compile (three
entry functions, three loads): compiles dominate the time. Verdict, deciding rule and every moved
counter must be equal everywhere. CI runs a fixed seed; `--hypothesis-profile=deep` runs more.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.c import Entry, load_c_programs
from codegen.rules import Evaluation, Ruleset, evaluate, write
from codegen.rules.names import BUILTIN_CHAINS
from codegen.tc.generator import COUNTERS_MAP
from harness.netfilter import NetfilterOracle, Observation, disagreement
from harness.runner import ChainRunner, Outcome, frame_for
from tests.kernel.test_tc_differential import DEVICES, aimed, cases
from tests.strategies import Scenario, rulesets, scenarios

pytestmark = [pytest.mark.privileged, pytest.mark.bcc]

RULESETS = 40
PACKETS_PER_CHAIN = 9  # 40 rule sets x 3 chains x 9 packets: 1,080 cases
MIN_CASES = 1000
NETFILTER_RULESETS = 12
NETFILTER_PACKETS_PER_CHAIN = 6  # 12 x 3 x 6: 216 cases
MIN_NETFILTER_CASES = 200
SUPPRESSED = [HealthCheck.too_slow, HealthCheck.data_too_large]


class OneCompileRunner(ChainRunner):
    """A ChainRunner whose three C chain programs come from a single bcc compile."""

    def __init__(self, ruleset: Ruleset, devices=()):
        super().__init__(ruleset, devices, backend="c")
        self.c_programs: dict[str, object] | None = None

    def program(self, chain: str):
        if self.c_programs is None:
            entries = [Entry("chain", name) for name in BUILTIN_CHAINS]
            loaded = load_c_programs(
                self.ruleset,
                entries,
                interfaces=self.interfaces,
                maps={COUNTERS_MAP: self.counters},
            )
            self.c_programs = dict(zip(BUILTIN_CHAINS, loaded, strict=True))
        return self.c_programs[chain]

    def close(self) -> None:
        for program in (self.c_programs or {}).values():
            program.close()
        self.c_programs = None
        super().close()


def as_evaluation(outcome: Outcome) -> Evaluation:
    return Evaluation(outcome.verdict, outcome.deciding, outcome.counters)  # type: ignore[arg-type]


def report(ruleset: Ruleset, case: str, voices: dict[str, Evaluation | Outcome]) -> str | None:
    """None when every voice gives the same verdict, deciding rule and counters; otherwise who
    said what."""
    said = {
        name: (voice.verdict, voice.deciding, dict(sorted(voice.counters.items(), key=str)))
        for name, voice in voices.items()
    }
    if len({repr(value) for value in said.values()}) == 1:
        return None
    lines = [f"{name:9} {verdict} by {deciding}; counters {counters}"
             for name, (verdict, deciding, counters) in said.items()]  # fmt: skip
    return f"the voices disagree\n{write(ruleset)}{case}\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Evaluator, bytecode and C on 1,000+ random cases


def _examples(minimum: int, share: int) -> int:
    """`minimum` in CI and by default; more under a bigger profile (`--hypothesis-profile=deep`
    runs one rule set per `share` of its examples)."""
    return max(minimum, settings.default.max_examples // share)


def test_evaluator_bytecode_and_c_agree():
    ran = 0

    @given(
        ruleset=rulesets(),
        traffic=st.fixed_dictionaries(
            {
                chain: st.lists(
                    cases(chain), min_size=PACKETS_PER_CHAIN, max_size=PACKETS_PER_CHAIN
                )
                for chain in BUILTIN_CHAINS
            }
        ),
        data=st.data(),
    )
    def three_agree(ruleset, traffic, data):
        nonlocal ran
        ruleset = data.draw(aimed(ruleset, traffic))
        with ChainRunner(ruleset, DEVICES) as bytecode, OneCompileRunner(ruleset, DEVICES) as c:
            for chain, chain_cases in traffic.items():
                for packet, in_iface, out_iface, mark, pkt_type in chain_cases:
                    frame = frame_for(packet)
                    options = {"mark": mark, "pkt_type": pkt_type}
                    voices = {
                        "evaluator": evaluate(
                            ruleset, packet, chain, in_iface, out_iface, **options
                        ),
                        "bytecode": bytecode.run(frame, chain, in_iface, out_iface, **options),
                        "c": c.run(frame, chain, in_iface, out_iface, **options),
                    }
                    case = (
                        f"chain {chain} in={in_iface} out={out_iface} mark={mark:#x} "
                        f"type={pkt_type}\npacket {packet.hex()}"
                    )
                    problem = report(ruleset, case, voices)
                    if problem is not None:
                        pytest.fail(problem, pytrace=False)
                    ran += 1

    examples = _examples(RULESETS, 10)
    settings(max_examples=examples, deadline=None, suppress_health_check=SUPPRESSED)(three_agree)()
    assert ran >= examples * 3 * PACKETS_PER_CHAIN >= MIN_CASES, f"only {ran} cases ran"


# ---------------------------------------------------------------------------------------------
# A sample against netfilter


@pytest.fixture(scope="module")
def oracle() -> Iterator[NetfilterOracle]:
    with NetfilterOracle() as oracle:
        yield oracle


def _backend_case(runner: ChainRunner, observation: Observation) -> Outcome:
    """The packet as netfilter's chain saw it (FORWARD: TTL decremented), with its devices."""
    return runner.run(
        frame_for(observation.packet),
        observation.chain,
        observation.in_iface,
        observation.out_iface,
        mark=observation.mark,
        pkt_type=observation.pkt_type,
    )


@pytest.mark.netns
def test_four_voices_on_a_sample_with_netfilter(oracle: NetfilterOracle) -> None:
    """Scenarios made for the oracle (tests/strategies.py): rules aimed at the packets of each
    chain with the devices, packet types and marks netfilter's twin topologies give them."""
    ran = 0

    @given(scenarios(packets_per_chain=NETFILTER_PACKETS_PER_CHAIN))
    def four_agree(scenario: Scenario) -> None:
        nonlocal ran
        loaded = oracle.load(scenario.ruleset)
        text = write(loaded)
        with ChainRunner(loaded, DEVICES) as bytecode, OneCompileRunner(loaded, DEVICES) as c:
            for chain, packet, mark in scenario.cases():
                observation = oracle.run(packet, chain, mark=mark)
                voices = {
                    "evaluator": observation.reference(loaded),
                    "bytecode": as_evaluation(_backend_case(bytecode, observation)),
                    "c": as_evaluation(_backend_case(c, observation)),
                }
                for label, voice in voices.items():
                    problem = disagreement(text, observation, voice, label)
                    if problem is not None:
                        pytest.fail(problem, pytrace=False)
                case = (
                    f"chain {chain} mark={observation.mark:#x}, "
                    f"packet as it saw it {observation.packet.hex()}"
                )
                problem = report(loaded, case, voices)
                if problem is not None:
                    pytest.fail(problem, pytrace=False)
                ran += 1

    examples = _examples(NETFILTER_RULESETS, 40)
    settings(max_examples=examples, deadline=None, suppress_health_check=SUPPRESSED)(four_agree)()
    assert ran >= examples * 3 * NETFILTER_PACKETS_PER_CHAIN >= MIN_NETFILTER_CASES, (
        f"only {ran} cases ran"
    )
