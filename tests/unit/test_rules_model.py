"""Validation of rule sets built in code, without text: the checks iptables and the kernel make."""

from collections.abc import Callable

import pytest

from codegen.rules import (
    Accept,
    Address,
    Goto,
    Interface,
    Jump,
    Protocol,
    Return,
    Rule,
    RuleError,
    Ruleset,
    Source,
)
from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.ttl import Ttl
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.validation import validate

HERE = Source("model.rules", 3, 5, "-A INPUT -j nowhere")


def with_rule(chain: str, rule: Rule, *user_chains: str) -> Ruleset:
    ruleset = Ruleset()
    for name in user_chains:
        ruleset.add_chain(name)
    ruleset[chain].rules.append(rule)
    return ruleset


def user_policy() -> Ruleset:
    ruleset = Ruleset()
    ruleset.add_chain("u").policy = "DROP"
    return ruleset


def builtin_policy() -> Ruleset:
    ruleset = Ruleset()
    ruleset["INPUT"].policy = None
    return ruleset


def loop() -> Ruleset:
    ruleset = with_rule("INPUT", Rule((), Jump("a")), "a", "b")
    ruleset["a"].rules.append(Rule((), Goto("b")))
    ruleset["b"].rules.append(Rule((), Jump("a"), source=HERE))
    return ruleset


# (name, build, expected message substring)
INVALID: list[tuple[str, Callable[[], Ruleset], str]] = [
    ("jump to unknown chain", lambda: with_rule("INPUT", Rule((), Jump("x"), source=HERE)),
     "jump to unknown chain 'x'"),
    ("goto unknown chain", lambda: with_rule("INPUT", Rule((), Goto("x"))), "goto unknown chain"),
    ("jump to built-in chain", lambda: with_rule("INPUT", Rule((), Jump("OUTPUT"))),
     "cannot jump to built-in chain 'OUTPUT'"),
    ("loop", loop, "loop in the chain graph: a -> b -> a"),
    ("policy on a user chain", user_policy, "cannot have a policy"),
    ("built-in without policy", builtin_policy, "must be ACCEPT or DROP"),
    ("tcp without -p tcp", lambda: with_rule("INPUT", Rule((TcpMatch(),))), "needs '-p tcp'"),
    ("tcp with ! -p tcp", lambda: with_rule("INPUT", Rule((Protocol(6, True), TcpMatch()))),
     "needs '-p tcp'"),
    ("udp with -p tcp", lambda: with_rule("INPUT", Rule((Protocol(6), UdpMatch()))),
     "needs '-p udp'"),
    ("icmp without -p", lambda: with_rule("INPUT", Rule((IcmpMatch(8),))), "needs '-p icmp'"),
    ("multiport with icmp",
     lambda: with_rule("INPUT", Rule((Protocol(1), Multiport("dst", ((1, 1),))))),
     "multiport needs"),
    ("multiport with 16 slots",
     lambda: with_rule("INPUT", Rule((Protocol(6), Multiport("dst", ((1, 2),) * 8)))),
     "too many ports"),
    ("reversed port range",
     lambda: with_rule("INPUT", Rule((Protocol(6), TcpMatch(dport=PortRange(9, 1))))),
     "min > max"),
    ("negated ttl-lt", lambda: with_rule("INPUT", Rule((Ttl("lt", 3, True),))),
     "cannot be negated"),
    ("-i in OUTPUT", lambda: with_rule("OUTPUT", Rule((Interface("in", "a"),))), "-i with OUTPUT"),
    ("-o in INPUT", lambda: with_rule("INPUT", Rule((Interface("out", "a"),))), "-o with INPUT"),
    ("long interface", lambda: with_rule("FORWARD", Rule((Interface("in", "x" * 16),))),
     "longer than 15"),
    ("two -s", lambda: with_rule("INPUT", Rule((Address("src", 1), Address("src", 2)))),
     "more than one -s"),
    ("! -p all", lambda: with_rule("INPUT", Rule((Protocol(0, True),))), "never match"),
    ("long comment", lambda: with_rule("INPUT", Rule((Comment("é" * 128),))), "256 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid(name: str, build: Callable[[], Ruleset], message: str) -> None:
    ruleset = build()
    with pytest.raises(RuleError, match=message):
        validate(ruleset)
    with pytest.raises(RuleError, match=message):
        validate(ruleset)


def test_error_text_names_the_place() -> None:
    with pytest.raises(RuleError) as caught:
        validate(with_rule("INPUT", Rule((), Jump("nowhere"), source=HERE)))
    assert str(caught.value) == (
        "model.rules:3:5: error: jump to unknown chain 'nowhere'\n-A INPUT -j nowhere"
    )


def test_valid_rule_set() -> None:
    ruleset = with_rule("INPUT", Rule((Protocol(6), TcpMatch()), Jump("a")), "a", "b")
    ruleset["a"].rules += [Rule((), Goto("b")), Rule((), Return())]
    ruleset["b"].rules.append(Rule((), Accept()))
    # A loop nothing reaches is loaded by the kernel too.
    ruleset.add_chain("c").rules.append(Rule((), Jump("c")))
    validate(ruleset)


@pytest.mark.parametrize("name", ["INPUT", "ACCEPT", "RETURN", "", "a b", "x" * 29])
def test_bad_chain_names(name: str) -> None:
    with pytest.raises(RuleError):
        Ruleset().add_chain(name)


def test_duplicate_chain() -> None:
    ruleset = Ruleset()
    ruleset.add_chain("a")
    with pytest.raises(RuleError, match="already exists"):
        ruleset.add_chain("a")


def test_address_is_stored_masked_and_keeps_odd_masks() -> None:
    address = Address("src", 0x01020304, 0xFF00FF00)
    assert (address.address, address.network) == (0x01000300, None)
    assert Address.from_network("dst", "198.18.0.7/24").address == 0xC6120000


def test_out_of_range_values_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        PortRange(0, 70000)
    with pytest.raises(ValueError):
        Protocol(256)
