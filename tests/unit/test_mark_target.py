"""`-j MARK` in the rule layer: what iptables-legacy 1.8.9 takes and refuses, how it saves,
lists and encodes it (as iptables-legacy printed them in a namespace), and what the evaluator
makes of it: the new mark seen by every later `-m mark` of the traversal, in the chain that set
it and in its callers, and the final mark in the Evaluation. The registry tests
(test_target_extensions.py, tests/net/test_ipt_blob.py, tests/net/test_list_format.py) take its
examples through every layer and through iptables-legacy itself."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, UDP

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.extensions.mark_target import EXTENSION, MarkTarget, pair

# (options as written, what iptables-legacy-save 1.8.9 printed for them)
SPELLINGS = [
    ("--set-xmark 0x10000/0x10000", "0x10000/0x10000"),
    ("--set-mark 0x5/0xf0", "0x5/0xf5"),
    ("--set-mark 0x5", "0x5/0xffffffff"),
    ("--set-mark 0x1/0x0", "0x1/0x1"),
    ("--and-mark 0xff", "0x0/0xffffff00"),
    ("--or-mark 0x3", "0x3/0x3"),
    ("--xor-mark 0x9", "0x9/0x0"),
    ("--set-xmark 7", "0x7/0xffffffff"),
    ("--set-xmark 0x3/0x1", "0x3/0x1"),
    ("--set-x 3", "0x3/0xffffffff"),
    ('--set-mark " 5"', "0x5/0xffffffff"),
    ('--set-mark "5/ 6"', "0x5/0x7"),
    ("--set-xmark=010/0X10", "0x8/0x10"),
    ("--xor-mark 4294967295", "0xffffffff/0x0"),
]


@pytest.mark.parametrize(("options", "saved"), SPELLINGS)
def test_every_spelling_iptables_takes(options: str, saved: str) -> None:
    ruleset = parse(f"*filter\n-A INPUT -j MARK {options}\nCOMMIT\n", "spelling")
    assert write(ruleset).splitlines()[4] == f"-A INPUT -j MARK --set-xmark {saved}"


# (rule, column of the error, what the error says)
REFUSED_RULES = [
    ("-A INPUT -j MARK", 10, "one of the --set-xmark, --{and,or,xor,set}-mark options"),
    ("-A INPUT -j MARK --set-mark 1 --or-mark 2", 18, '"--set-mark" cannot be used together'),
    # xtables_options_fcheck after every option: the first of the table's order, named with
    # the lowest xtables id it excludes; a bad value comes first (iptables-legacy 1.8.9).
    (
        "-A INPUT -j MARK --or-mark 1 --and-mark 2 --set-mark 3",
        43,
        '"--set-mark" cannot be used together with "--and-mark"',
    ),
    ("-A INPUT -j MARK --or-mark 1 --and-mark zz", 41, "bad value 'zz' for --and-mark"),
    ("-A INPUT -j MARK --xor-mark 1 --set-xmark 2", 31, '"--set-xmark" cannot be used together'),
    ("-A INPUT -j MARK --set-mark 1 --set-mark 2", 31, '"--set-mark" can only be used once'),
    ("-A INPUT -j MARK --set-xmark 0x1/", 30, "bad value '0x1/' for --set-xmark"),
    ("-A INPUT -j MARK --set-xmark /0x1", 30, "bad value"),
    ("-A INPUT -j MARK --set-xmark 1/2/3", 30, "bad value"),
    ("-A INPUT -j MARK --set-xmark 4294967296", 30, "bad value"),
    ("-A INPUT -j MARK --set-xmark -1", 30, "bad value"),
    ("-A INPUT -j MARK --and-mark 0x1/0x2", 29, "bad value '0x1/0x2' for --and-mark"),
    ("-A INPUT -j MARK --or-mark -1", 28, "bad value"),
    ("-A INPUT -j MARK --xor-mark 5x", 29, "bad value"),
    ("-A INPUT -j MARK ! --set-mark 3", 20, "cannot be negated"),
    ("-A INPUT -j MARK --set 3", 18, "ambiguous"),
]


@pytest.mark.parametrize(("rule", "column", "message"), REFUSED_RULES)
def test_what_iptables_refuses_is_refused(rule: str, column: int, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n{rule}\nCOMMIT\n", "refused")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"refused:2:{column}: error:"), str(caught.value)


def test_list_and_payload_are_what_iptables_legacy_shows() -> None:
    # mark_tg_print's cases in its order, as `iptables-legacy -L -n` printed them.
    listed = [
        (MarkTarget(0x10000, 0x10000), " MARK or 0x10000"),
        (MarkTarget(0x5, 0xF5), " MARK xset 0x5/0xf5"),
        (MarkTarget(0x5), " MARK set 0x5"),
        (MarkTarget(0, 0xFFFFFF00), " MARK and 0xff"),
        (MarkTarget(0, 0xFFFEFFFF), " MARK and 0x10000"),
        (MarkTarget(0x9, 0), " MARK xor 0x9"),
        (MarkTarget(0, 0), " MARK and 0xffffffff"),
        (MarkTarget(0x3, 0x1), " MARK xset 0x3/0x1"),
    ]
    for target, text in listed:
        assert EXTENSION.describe(target) == text
    # struct xt_mark_tginfo2 { u32 mark, mask; }
    assert ctypes.sizeof(EXTENSION.data) == 8
    assert bytes(EXTENSION.encode(MarkTarget(0x40000, 0xFF0000))).hex() == "000004000000ff00"
    assert EXTENSION.decode(EXTENSION.data.from_buffer_copy(bytes.fromhex("0300000001000000"))) == (
        MarkTarget(3, 1)
    )


@pytest.mark.parametrize(
    ("option", "bits", "before", "after"),
    [
        ("set-xmark", (0x3, 0x1), 0xF0, 0xF3),  # clear bit 0, then xor 0x3 in
        ("set-xmark", (0x3, 0x1), 0xF1, 0xF3),
        ("set-mark", (0x5, 0xF0), 0xFFFF, 0xFF0F),
        ("set-mark", (0x5, 0xFFFFFFFF), 0xFFFF, 0x5),
        ("and-mark", (0xFF, 0), 0x1234, 0x34),
        ("or-mark", (0x3, 0), 0x1234, 0x1237),
        ("xor-mark", (0x9, 0), 0x1234, 0x123D),
        ("xor-mark", (0xFFFFFFFF, 0), 0x1, 0xFFFFFFFE),
    ],
)
def test_each_option_does_what_its_help_says(
    option: str, bits: tuple[int, int], before: int, after: int
) -> None:
    value, mask = bits
    target = MarkTarget(
        *pair(option, value, mask) if option.startswith("set") else pair(option, value)
    )
    assert target.apply(before) == after


PACKET = bytes(IP(src="198.18.0.5", dst="198.18.1.1") / UDP(sport=1, dport=53) / b"q")

# Tailscale's and k3s's patterns: a user chain marks, its caller matches the mark; a later MARK
# clears the bit again; RETURN and goto keep what was set.
RULES = """*filter
:mark-it - [0:0]
:clear - [0:0]
-A INPUT -i wg0 -j mark-it
-A INPUT -m mark --mark 0x40000/0xff0000 -j ACCEPT
-A INPUT -i lan0 -j MARK --set-xmark 0x10000/0x10000
-A INPUT -m mark ! --mark 0x10000/0x10000 -j DROP
-A INPUT -g clear
-A mark-it -j MARK --set-xmark 0x40000/0xffffffff
-A mark-it -j RETURN
-A mark-it -j MARK --set-xmark 0x0/0xffffffff
-A clear -j MARK --set-xmark 0x0/0x10000
-A clear -m mark --mark 0x0/0x10000 -j MARK --or-mark 0x7
COMMIT
"""


@pytest.mark.parametrize(
    ("device", "mark", "verdict", "deciding", "final"),
    [
        ("wg0", 0, "ACCEPT", ("INPUT", 2), 0x40000),
        ("wg0", 0xFF00FF, "ACCEPT", ("INPUT", 2), 0x40000),
        ("lan0", 0, "ACCEPT", ("INPUT", "policy"), 0x7),
        ("lan0", 0x80000000, "ACCEPT", ("INPUT", "policy"), 0x80000007),
        ("eth0", 0, "DROP", ("INPUT", 4), 0),
        ("eth0", 0x30000, "ACCEPT", ("INPUT", "policy"), 0x20007),
    ],
)
def test_later_rules_and_callers_see_the_new_mark(
    device: str, mark: int, verdict: str, deciding: tuple, final: int
) -> None:
    ruleset = parse(RULES, "marks")
    result = evaluate(ruleset, PACKET, "INPUT", device, None, mark=mark)
    assert (result.verdict, result.deciding, result.mark) == (verdict, deciding, final)
    # Every MARK rule that matched counts, as any rule does.
    if device == "lan0":
        assert ("INPUT", 3) in result.counters and ("clear", 2) in result.counters


def test_the_final_mark_is_the_packets_own_without_mark_rules() -> None:
    ruleset = parse("*filter\n-A INPUT -p tcp -j DROP\nCOMMIT\n", "plain")
    assert evaluate(ruleset, PACKET, "INPUT", "eth0", None, mark=0x1234).mark == 0x1234


def test_a_hotdrop_reports_the_mark_set_before_it() -> None:
    # A TCP packet cut short in its header: the tcp match hotdrops it after the MARK rule.
    short = bytes(IP(src="198.18.0.5", dst="198.18.1.1", proto=6) / bytes(4))
    ruleset = parse(
        "*filter\n-A INPUT -j MARK --or-mark 0x2\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n",
        "hotdrop",
    )
    result = evaluate(ruleset, short, "INPUT", "eth0", None, mark=0x1)
    assert (result.verdict, result.hotdrop, result.mark) == ("DROP", True, 0x3)
