"""`-m policy --dir in` in the programs of both backends under BPF_PROG_TEST_RUN against the
reference evaluator: security paths of none to six states given through the test map, every option
negated or not, masks at their edges, --strict, a user chain and a chunk function, and the
skb's own path (a test run's packets have none, which the program reads through the kernel's
structures); random matches and paths (hypothesis). The ingress program loads with the walk,
and what the backends refuse is refused in one sentence naming the rule."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.c import c_source
from codegen.rules import evaluate, parse
from codegen.rules.extensions.conntrack import MaskedAddress
from codegen.rules.extensions.policy import Compared, Policy, PolicyElement, in_memory
from codegen.rules.model import Accept, Chain, Drop, Jump, Rule, Ruleset
from codegen.rules.packet import XfrmState
from codegen.tc.chains import CHUNK_RULES
from codegen.tc.generator import COUNTERS_MAP, CompileError, compile_program
from codegen.tc.layout import CounterLayout
from harness.backends import load_program
from harness.counters import CounterMap
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

UDP = bytes.fromhex("4500001c0001000040110000c6120001c61200029c40138800080000")

RULES = """\
*filter
:ipsec - [0:0]
-A INPUT -m policy --dir in --pol none
-A INPUT -m policy --dir in --pol ipsec
-A INPUT -m policy --dir in --pol ipsec --proto esp --mode tunnel
-A INPUT -m policy --dir in --pol ipsec ! --proto esp
-A INPUT -m policy --dir in --pol ipsec --reqid 7
-A INPUT -m policy --dir in --pol ipsec ! --reqid 7 ! --mode transport
-A INPUT -m policy --dir in --pol ipsec --spi 0x00100000
-A INPUT -m policy --dir in --pol ipsec --spi 0x1000
-A INPUT -m policy --dir in --pol ipsec --mode tunnel --tunnel-src 198.18.0.0/15
-A INPUT -m policy --dir in --pol ipsec --mode tunnel ! --tunnel-dst 198.18.0.2
-A INPUT -m policy --dir in --pol ipsec --mode tunnel --tunnel-src 198.18.0.1/255.255.0.0
-A INPUT -m policy --dir in --pol ipsec --strict --reqid 8
-A INPUT -m policy --dir in --pol ipsec --strict ! --proto ah --mode tunnel
-A INPUT -m policy --dir in --pol ipsec --proto ipcomp -j ipsec
-A INPUT -m policy --dir in --pol none -j DROP
-A ipsec -m policy --dir in --pol ipsec --reqid 8 -j RETURN
-A ipsec -m policy --dir in --pol ipsec --proto ipcomp -j ACCEPT
COMMIT
"""
ESP = XfrmState(proto=50, mode=1, spi=0x1000, reqid=7, saddr=0xC6120001, daddr=0xC6120002)
PATHS: tuple[tuple[XfrmState, ...] | None, ...] = (
    None,
    (),
    (ESP,),
    (XfrmState(proto=51, mode=0, spi=0x00100000, reqid=8, saddr=1, daddr=2),),
    (XfrmState(proto=108, mode=1, reqid=8, saddr=0xC6130001, daddr=0xC6120002),),
    (XfrmState(proto=108, mode=1, reqid=9), ESP),
    (
        XfrmState(mode=4, saddr=0xC6FF0001, daddr=0xFFFFFFFF),
        *[XfrmState(reqid=n) for n in range(5)],
    ),
)


def _agree(runner: ChainRunner, ruleset: Ruleset, secpath) -> None:  # type: ignore[no-untyped-def]
    ours = runner.run(frame_for(UDP), "INPUT", "eth0", secpath=secpath)
    expected = evaluate(ruleset, UDP, "INPUT", "eth0", None, secpath=secpath)
    assert (ours.verdict, ours.deciding, ours.counters) == (
        expected.verdict,
        expected.deciding,
        expected.counters,
    ), secpath


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_path_through_every_option(backend: str) -> None:
    ruleset = parse(RULES, "policy")
    with ChainRunner(ruleset, devices=["eth0"], backend=backend) as runner:
        for secpath in PATHS:
            _agree(runner, ruleset, secpath)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_test_runs_own_packet_has_no_security_path(backend: str) -> None:
    ruleset = parse(RULES, "policy")
    with ChainRunner(ruleset, devices=["eth0"], backend=backend) as runner:
        read = runner.run(frame_for(UDP), "INPUT", "eth0")  # the program walks the skb
        said = runner.run(frame_for(UDP), "INPUT", "eth0", secpath=None)
    assert (read.verdict, read.deciding, read.counters) == (
        said.verdict,
        said.deciding,
        said.counters,
    )
    assert read.verdict == "DROP" and read.deciding == ("INPUT", 15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_matches_in_a_chunk_function(backend: str) -> None:
    """Past CHUNK_RULES rules a chain is cut into functions that get only the facts: the
    answers found once in the entry function reach them."""

    def reqid(value: int) -> Policy:
        return Policy("in", elements=(PolicyElement(reqid=Compared(value)),))

    rules = [Rule((reqid(n % 3),), None) for n in range(CHUNK_RULES + 5)]
    rules.append(Rule((reqid(5),), Drop()))
    rules.append(Rule((Policy("in", none=True, elements=()),), Accept()))
    ruleset = Ruleset(
        {
            "INPUT": Chain("INPUT", "ACCEPT", rules=[Rule((), Jump("many"))]),
            "FORWARD": Chain("FORWARD", "ACCEPT"),
            "OUTPUT": Chain("OUTPUT", "ACCEPT"),
            "many": Chain("many", None, rules=rules),
        }
    )
    with ChainRunner(ruleset, devices=["eth0"], backend=backend) as runner:
        for secpath in (None, (XfrmState(reqid=5),), (XfrmState(reqid=1),), ()):
            _agree(runner, ruleset, secpath)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ingress_program_loads_with_the_walk(backend: str) -> None:
    """The ingress program reads the skb's path only (no test map): the verifier takes the
    walk through sk_buff, skb_ext, sec_path and xfrm_state."""
    ruleset = parse(RULES, "policy")
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        program = load_program(
            ruleset,
            "ingress",
            interfaces={"eth0": 2},
            maps={COUNTERS_MAP: counters},
            backend=backend,
        )
        program.close()


@pytest.mark.parametrize("backend", ["bytecode", "c"])
@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("-A FORWARD -m policy --dir out --pol ipsec -j DROP", "--dir out"),
        (
            "-A INPUT -m policy --dir in --strict --reqid 1 --next --reqid 2 -j DROP",
            "more than one element",
        ),
    ],
)
def test_what_the_backends_refuse_is_one_sentence_at_the_rule(
    backend: str, rule: str, reason: str
) -> None:
    ruleset = parse(f"*filter\n{rule}\nCOMMIT\n", "p.rules")
    generate = c_source if backend == "c" else compile_program
    with pytest.raises(CompileError) as caught:
        generate(ruleset, "ingress", interfaces={})
    message = str(caught.value)
    assert message.startswith("p.rules:2:1: ") and reason in message and "\n" not in message


addresses = st.sampled_from([0, 1, 0xC6120001, 0xC6120002, 0xC6130001, 0xFFFFFFFF]) | st.integers(
    0, 0xFFFFFFFF
)
masks = st.sampled_from([0, 0xFFFFFFFF, 0xFFFF0000, 0xFFFE0000, 0xFF00FF00, 0x80000000])
small = st.sampled_from([0, 1, 7, 8, 0x1000, in_memory(0x1000), 0xFFFFFFFF])


def _maybe(strategy):  # type: ignore[no-untyped-def]
    return st.none() | strategy


@st.composite
def elements(draw) -> PolicyElement:  # type: ignore[no-untyped-def]
    def compared(values) -> Compared | None:  # type: ignore[no-untyped-def]
        return draw(_maybe(st.builds(Compared, values, st.booleans())))

    tunnel = draw(st.booleans())
    mode = Compared(1) if tunnel else compared(st.sampled_from([0, 1]))
    address = _maybe(st.builds(MaskedAddress, addresses, masks, st.booleans()))
    return PolicyElement(
        reqid=compared(small),
        spi=compared(small),
        proto=compared(st.sampled_from([50, 51, 108])),
        mode=mode,
        tunnel_src=draw(address) if tunnel else None,
        tunnel_dst=draw(address) if tunnel else None,
    )


@st.composite
def policies(draw) -> Policy:  # type: ignore[no-untyped-def]
    if draw(st.integers(0, 4)) == 0:
        return Policy("in", none=True, elements=())
    element = draw(elements())
    strict = draw(st.booleans()) and not element.empty
    return Policy("in", strict=strict, elements=(element,))


states = st.builds(
    XfrmState,
    st.sampled_from([50, 51, 108, 4]),
    st.sampled_from([0, 1, 4]),
    small,
    small,
    addresses,
    addresses,
)
paths = st.none() | st.lists(states, max_size=6).map(tuple)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(policies(), min_size=1, max_size=6), st.lists(paths, max_size=8))
def test_random_policy_matches_agree_with_the_reference(backend, matches, secpaths) -> None:  # type: ignore[no-untyped-def]
    rules = [Rule((match,), None) for match in matches]
    rules.append(Rule((matches[0],), Drop()))
    ruleset = Ruleset(
        {
            "INPUT": Chain("INPUT", "ACCEPT", rules=rules),
            "FORWARD": Chain("FORWARD", "ACCEPT"),
            "OUTPUT": Chain("OUTPUT", "ACCEPT"),
        }
    )
    with ChainRunner(ruleset, devices=["eth0"], backend=backend) as runner:
        for secpath in [None, *secpaths]:
            _agree(runner, ruleset, secpath)


def test_more_distinct_matches_than_answer_bits_are_refused_at_the_rule() -> None:
    rules = "".join(f"-A INPUT -m policy --dir in --reqid {n}\n" for n in range(40))
    ruleset = parse(f"*filter\n{rules}COMMIT\n", "many.rules")
    with pytest.raises(CompileError) as caught:
        compile_program(ruleset, "ingress", interfaces={})
    assert str(caught.value).startswith("many.rules:34:1: ")
    assert "rule 33 of INPUT holds number 33 of 40" in str(caught.value)
