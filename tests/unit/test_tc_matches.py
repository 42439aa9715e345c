"""The bytecode backend's emitter registry (codegen.tc.matches): every match the rule layer knows
has an emitter or is refused on purpose with a reason, a match without one is refused naming its
rule before anything is built, and what the emitters pin decides exact runs (codegen.tc.exact).
Nothing here loads a program."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from codegen.rules import parse
from codegen.rules.extensions import BY_MODEL, BY_NAME
from codegen.rules.extensions import FAMILIES as RULE_FAMILIES
from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.length import Length
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import (
    IP_PART,
    Accept,
    Address,
    ExtensionMatch,
    Fragment,
    Interface,
    Jump,
    Protocol,
    Rule,
)
from codegen.tc import exact, matches
from codegen.tc.generator import CompileError, Hook, compile_program

HEADER = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
INTERFACES = {"eth0": 2}


@dataclass(frozen=True, slots=True)
class Throwaway(ExtensionMatch):
    """A match no layer knows: neither the rule registry nor the emitters."""


def ruleset(*lines: str, user_chains: tuple[str, ...] = ()):
    chains = [f":{name} - [0:0]" for name in user_chains]
    return parse("\n".join([*HEADER, *chains, *lines, "COMMIT", ""]), "unsupported.rules")


def test_every_rule_layer_family_is_generated_or_refused_with_a_reason():
    generated = [family for family in RULE_FAMILIES if family not in matches.REFUSED]
    assert matches.FAMILIES == tuple(generated)
    assert set(matches.REFUSED) <= set(RULE_FAMILIES)
    assert all(reason.strip() for reason in matches.REFUSED.values())
    refused = {BY_NAME[family].model for family in matches.REFUSED}
    assert set(matches.EMITTERS) == (set(BY_MODEL) - refused) | set(IP_PART)
    assert all(emitter.model is model for model, emitter in matches.EMITTERS.items())


def test_a_refused_family_is_refused_with_its_reason_naming_the_rule(monkeypatch):
    """Every family is generated today, so refuse one for the test."""
    family = "comment"
    monkeypatch.setitem(matches.REFUSED, family, "it is refused for this test")
    monkeypatch.delitem(matches.EMITTERS, BY_NAME[family].model)
    example = BY_NAME[family].examples[0]
    rules = ruleset("-A INPUT -s 198.18.0.1/32 -j ACCEPT", f"-A INPUT {example} -j DROP")
    with pytest.raises(CompileError) as error:
        compile_program(rules, "chain", interfaces=INTERFACES, chain="INPUT")
    assert str(error.value) == (
        f"unsupported.rules:6:1: the bytecode backend refuses the '-m {family}' match of rule 2"
        f" of INPUT because it is refused for this test: -A INPUT {example} -j DROP"
    )


def test_a_match_without_an_emitter_is_refused_naming_its_rule():
    rules = ruleset("-A INPUT -s 198.18.0.1/32 -j ACCEPT", "-A INPUT -p tcp -m tcp --dport 22")
    rule = rules.chains["INPUT"].rules[1]
    rule.matches = (*rule.matches, Throwaway())
    with pytest.raises(CompileError) as error:
        compile_program(rules, "chain", interfaces=INTERFACES, chain="INPUT")
    assert str(error.value) == (
        "unsupported.rules:6:1: the bytecode backend has no code for the Throwaway match of "
        "rule 2 of INPUT: -A INPUT -p tcp -m tcp --dport 22"
    )


def test_a_family_the_rule_layer_knows_without_an_emitter_is_refused(monkeypatch):
    """A rule built in code (no source): its text is written from the model."""
    monkeypatch.delitem(matches.EMITTERS, Length)
    rules = ruleset()
    rules.chains["OUTPUT"].rules.append(Rule((Protocol(17), Length(0, 40)), Accept()))
    with pytest.raises(CompileError) as error:
        compile_program(rules, "egress", interfaces=INTERFACES)
    assert str(error.value) == (
        "the bytecode backend has no code for the '-m length' match of rule 1 of OUTPUT: "
        "-A OUTPUT -p udp -m length --length 0:40 -j ACCEPT"
    )


# Where the rule without an emitter is (chain, "jump" if INPUT jumps to it), the program, and
# whether that program runs it: only the chains a program runs are refused.
REACH = [
    ("INPUT", False, "ingress", True),
    ("FORWARD", False, "ingress", True),
    ("OUTPUT", False, "ingress", False),
    ("OUTPUT", False, "egress", True),
    ("INPUT", False, "egress", False),
    ("FORWARD", False, "chain", False),
    ("helper", True, "ingress", True),
    ("helper", True, "chain", True),
    ("helper", False, "ingress", False),
    ("helper", True, "egress", False),
]


@pytest.mark.parametrize(("holder", "jumped_to", "hook", "refused"), REACH)
def test_only_the_chains_a_program_runs_are_refused(
    holder: str, jumped_to: bool, hook: Hook, refused: bool
):
    rules = ruleset(*(["-A INPUT -j helper"] if jumped_to else []), user_chains=("helper",))
    rules.chains[holder].rules.append(Rule((Throwaway(),), Accept()))
    chain = "INPUT" if hook == "chain" else None
    if refused:
        expected = f"no code for the Throwaway match of rule 1 of {holder}$"
        with pytest.raises(CompileError, match=expected):
            compile_program(rules, hook, interfaces=INTERFACES, chain=chain)
    else:
        compile_program(rules, hook, interfaces=INTERFACES, chain=chain)


ANY = PortRange()
TCP_22 = TcpMatch(dport=PortRange(22, 22))
SHAPE_S_P_T_D = exact.Shape(True, False, True, True, False, True)
SHAPE_S = exact.Shape(True, False, False, False, False, False)
SHAPE_P_T = exact.Shape(False, False, True, True, False, False)

# Matches of an ACCEPT rule -> what exact.pinned makes of it (None: it joins no run).
PINNED = [
    ((Address("src", 7), Protocol(6), TCP_22), exact.Pinned(SHAPE_S_P_T_D, (7, 0, 0, 22, 6))),
    ((Address("src", 7), Comment("a"), Comment("b")), exact.Pinned(SHAPE_S, (7, 0, 0, 0, 0))),
    ((Protocol(17), UdpMatch()), exact.Pinned(SHAPE_P_T, (0, 0, 0, 0, 17))),
    ((Protocol(6), TcpMatch(flags=TcpFlags.syn())), None),
    ((Protocol(6), TcpMatch(dport=PortRange(22, 22, negated=True))), None),
    ((Protocol(6), TcpMatch(dport=PortRange(22, 23))), None),
    ((Protocol(6), TCP_22, UdpMatch()), None),  # two transport matches
    ((Protocol(1), TCP_22), None),  # a transport match needs a transport protocol
    ((TCP_22,), None),
    ((Address("src", 7), Length(0, 40)), None),  # a family that pins nothing
    ((Address("src", 7), Interface("in", "eth0")), None),
    ((Address("src", 7), Fragment(False)), None),
    ((Address("src", 7), Throwaway()), None),  # no emitter at all
]


@pytest.mark.parametrize(("rule_matches", "expected"), PINNED)
def test_what_a_rule_pins_for_an_exact_run(rule_matches, expected):
    assert exact.pinned(Rule(rule_matches, Accept())) == expected


def test_only_accept_and_drop_rules_join_runs():
    assert exact.pinned(Rule((Address("src", 7),), Jump("elsewhere"))) is None
    assert exact.pinned(Rule((Address("src", 7),), None)) is None
