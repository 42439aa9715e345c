"""`-m policy` in the rule layer: what iptables refuses, what iptables-save prints, the blob,
and policy_mt's answers (codegen.rules.extensions.policy)."""

from __future__ import annotations

import pytest

from codegen.rules import evaluate, parse
from codegen.rules.extensions.policy import EXTENSION as POLICY
from codegen.rules.extensions.policy import Policy
from codegen.rules.model import RuleError
from codegen.rules.packet import XfrmState
from codegen.rules.save import write
from codegen.rules.validation import validate

PACKET = bytes.fromhex("4500001c00010000401100000a0000010a000002") + bytes(8)


def _policy(options: str, chain: str = "INPUT") -> Policy:
    ruleset = parse(f"*filter\n-A {chain} {options}\nCOMMIT\n", "t")
    (match,) = ruleset.chains[chain].rules[0].matches
    assert isinstance(match, Policy)
    return match


@pytest.mark.parametrize(
    ("options", "column", "message"),
    [
        ("-m policy --pol ipsec", 10, "neither --dir in nor --dir out specified"),
        ("-m policy --dir up", 26, 'policy_match: invalid dir "up"'),
        ("-m policy --dir in --pol maybe", 35, 'invalid policy "maybe"'),
        ("-m policy --dir in --dir in", 29, 'option "--dir" can only be used once'),
        ("-m policy --dir in ! --pol none", 31, "cannot be negated"),
        ("-m policy --dir in --strict", 10, "empty policy element 0. --strict is in effect"),
        ("-m policy --dir in --next --spi 1", 10, 'option "--next" also requires "--strict"'),
        ("-m policy --dir in --pol none --strict", 10, "policy none but --strict given"),
        ("-m policy --dir in --pol none --strict --spi 1 --next", 10, "policy none but --strict"),
        ("-m policy --dir in --proto tcp", 37, "protocol must be ah/esp/ipcomp"),
        ("-m policy --dir in --proto bogus", 37, "unknown protocol 'bogus'"),
        ("-m policy --dir in --mode beet", 36, 'invalid mode "beet"'),
        ("-m policy --dir in --spi 1 --spi 2", 37, "double --spi option"),
        ("-m policy --dir in --reqid 4294967296", 37, "out of range (0-4294967295)"),
        ("-m policy --dir in --tunnel-src 10.0.0.1", 10, "only valid in tunnel mode"),
        ("-m policy --dir in ! --mode tunnel --tunnel-dst 10.0.0.1", 10, "only valid in tunnel"),
        (
            "-m policy --dir in --strict --spi 1 --next --spi 2 --next --spi 3 --next --spi 4"
            " --next",
            91,
            "maximum policy depth reached",
        ),
    ],
)
def test_what_libxt_policy_refuses_is_refused_where_it_is(
    options: str, column: int, message: str
) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n-A INPUT {options}\nCOMMIT\n", "t.rules")
    assert message in caught.value.message
    assert str(caught.value).startswith(f"t.rules:2:{column}: error: ")


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "-A OUTPUT -m policy --dir in --pol none",
            "input policy (--dir in) is not valid in OUTPUT",
        ),
        (
            "-A INPUT -m policy --dir out --pol none",
            "output policy (--dir out) is not valid in INPUT",
        ),
        ("-A c -m policy --dir in --pol none\n-A OUTPUT -j c", "not valid in OUTPUT"),
    ],
)
def test_the_kernels_hook_checks_are_made(rule: str, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        validate(parse(f"*filter\n:c - [0:0]\n{rule}\nCOMMIT\n", "t"))
    assert message in caught.value.message


def test_save_prints_what_libxt_policy_prints() -> None:
    text = (
        "*filter\n-A INPUT -m policy --pol ipsec --dir in --tunnel-src 10.1.2.3/255.255.0.0"
        " --mode tunnel --strict --spi 16 --reqid 0x10 --proto 50 --next ! --proto ipcomp\n"
        "COMMIT\n"
    )
    (line,) = [line for line in write(parse(text, "t")).splitlines() if "policy" in line]
    assert line == (
        "-A INPUT -m policy --dir in --pol ipsec --strict --reqid 16 --spi 0x10 --proto esp"
        " --mode tunnel --tunnel-src 10.1.2.3/16 --next ! --proto ipcomp"
    )
    assert POLICY.describe(_policy(text.split("-A INPUT ")[1].split("\n")[0])) == (
        " policy match dir in pol ipsec strict [0] reqid 16 spi 0x10 proto 50 mode tunnel"
        " tunnel-src 10.1.2.3/16 [1] ! proto 108"
    )


def test_pol_none_keeps_its_element_in_the_blob_but_save_does_not_print_it() -> None:
    match = _policy("-m policy --dir in --pol none --reqid 9")
    assert match.elements and not match.used
    data = POLICY.encode(match)
    assert data.len == 0 and data.pol[0].reqid == 9
    assert POLICY.decode(data) == match
    assert POLICY.save(match) == ["-m", "policy", "--dir", "in", "--pol", "none"]
    assert POLICY.as_saved(match) == _policy("-m policy --dir in --pol none")


def _verdict(options: str, secpath: tuple[XfrmState, ...] | None) -> str:
    ruleset = parse(f"*filter\n:INPUT DROP [0:0]\n-A INPUT {options} -j ACCEPT\nCOMMIT\n", "t")
    return evaluate(ruleset, PACKET, "INPUT", "eth0", None, secpath=secpath).verdict


ESP = XfrmState(proto=50, mode=1, spi=0x1000, reqid=7, saddr=0xC6120001, daddr=0xC6120002)


@pytest.mark.parametrize(
    ("options", "secpath", "verdict"),
    [
        ("-m policy --dir in --pol none", None, "ACCEPT"),
        ("-m policy --dir in --pol none", (ESP,), "DROP"),
        ("-m policy --dir in --pol none", (), "DROP"),  # a path, however empty
        ("-m policy --dir in --pol ipsec", None, "DROP"),
        ("-m policy --dir in --pol ipsec", (ESP,), "ACCEPT"),
        ("-m policy --dir in --pol ipsec", (), "DROP"),
        ("-m policy --dir in --proto esp --reqid 7 --mode tunnel", (ESP,), "ACCEPT"),
        ("-m policy --dir in ! --proto esp", (ESP,), "DROP"),
        ("-m policy --dir in --mode tunnel --tunnel-src 198.18.0.0/24", (ESP,), "ACCEPT"),
        ("-m policy --dir in --mode tunnel ! --tunnel-dst 198.18.0.2", (ESP,), "DROP"),
        # --spi is compared in host order with the SPI in network order.
        ("-m policy --dir in --spi 0x1000", (ESP,), "DROP"),
        ("-m policy --dir in --spi 0x00100000", (ESP,), "ACCEPT"),
        # Without --strict any state fits; with it, exactly one state, and it must fit.
        ("-m policy --dir in --reqid 8", (ESP, XfrmState(reqid=8)), "ACCEPT"),
        ("-m policy --dir in --strict --reqid 8", (XfrmState(reqid=8),), "ACCEPT"),
        ("-m policy --dir in --strict --reqid 8", (ESP, XfrmState(reqid=8)), "DROP"),
    ],
)
def test_policy_mt_answers_as_the_kernel(
    options: str, secpath: tuple[XfrmState, ...] | None, verdict: str
) -> None:
    assert _verdict(options, secpath) == verdict


def test_strict_over_two_states_is_not_judged() -> None:
    # match_policy_in would read the element before the first for the second state.
    options = "-m policy --dir in --strict --reqid 7 --next --reqid 8"
    assert _verdict(options, (ESP,)) == "DROP"  # one state, two elements: no match
    with pytest.raises(ValueError, match="memory outside the match"):
        _verdict(options, (XfrmState(reqid=8), ESP))
