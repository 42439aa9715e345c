"""`-j NFLOG` in the rule layer: what iptables-legacy 1.8.9 takes and refuses, how it saves,
lists and encodes it (as iptables-legacy printed them in a namespace), and that the evaluator
lists it among the rules that logged the packet. The registry tests (test_target_extensions.py,
tests/net/test_ipt_blob.py, tests/net/test_list_format.py) take its examples through every
layer and through iptables-legacy itself."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, UDP

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.extensions.nflog import EXTENSION, NfLog

# (options as written, what iptables-legacy-save 1.8.9 printed for them)
SPELLINGS = [
    ("", "-j NFLOG"),
    ("--nflog-group 0", "-j NFLOG"),
    ("--nflog-group 3", "-j NFLOG --nflog-group 3"),
    ("--nflog-threshold 0", "-j NFLOG"),
    ("--nflog-threshold 4", "-j NFLOG --nflog-threshold 4"),
    ("--nflog-size 0", "-j NFLOG --nflog-size 0"),
    ("--nflog-range 5", "-j NFLOG --nflog-range 5"),
    ('--nflog-prefix "a b"', '-j NFLOG --nflog-prefix "a b"'),
    (
        "--nflog-threshold 3 --nflog-size 9 --nflog-prefix x --nflog-group 2",
        "-j NFLOG --nflog-prefix x --nflog-group 2 --nflog-size 9 --nflog-threshold 3",
    ),
    ("--nflog-g=0x10 --nflog-s=4294967295", "-j NFLOG --nflog-group 16 --nflog-size 4294967295"),
]


@pytest.mark.parametrize(("options", "saved"), SPELLINGS)
def test_every_spelling_iptables_takes(options: str, saved: str) -> None:
    ruleset = parse(f"*filter\n-A INPUT -j NFLOG {options}\nCOMMIT\n", "spelling")
    assert write(ruleset).splitlines()[4] == f"-A INPUT {saved}"


# (rule, column of the error, what the error says)
REFUSED_RULES = [
    ("-A INPUT -j NFLOG --nflog-group 65536", 33, "bad value for --nflog-group '65536'"),
    ("-A INPUT -j NFLOG --nflog-group -1", 33, "bad value for --nflog-group"),
    ("-A INPUT -j NFLOG --nflog-size 4294967296", 32, "bad value for --nflog-size"),
    ("-A INPUT -j NFLOG --nflog-range -1", 33, "bad value for --nflog-range"),
    ("-A INPUT -j NFLOG --nflog-threshold 65536", 37, "bad value for --nflog-threshold"),
    ("-A INPUT -j NFLOG --nflog-range 5 --nflog-size 7", 35, "cannot be given together"),
    ("-A INPUT -j NFLOG --nflog-size 7 --nflog-range 5", 34, "cannot be given together"),
    ("-A INPUT -j NFLOG --nflog-group 1 --nflog-group 2", 35, "can only be used once"),
    ('-A INPUT -j NFLOG --nflog-prefix ""', 34, "must not be empty"),
    (f"-A INPUT -j NFLOG --nflog-prefix {'x' * 64}", 34, "64 bytes long, 63 max"),
    ("-A INPUT -j NFLOG ! --nflog-group 1", 21, "cannot be negated"),
]


@pytest.mark.parametrize(("rule", "column", "message"), REFUSED_RULES)
def test_what_iptables_refuses_is_refused(rule: str, column: int, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n{rule}\nCOMMIT\n", "refused")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"refused:2:{column}: error:"), str(caught.value)


def test_list_and_payload_are_what_iptables_legacy_shows() -> None:
    target = NfLog(2, "x", 9, True, 3)
    assert (
        EXTENSION.describe(target) == " nflog-prefix x nflog-group 2 nflog-size 9 nflog-threshold 3"
    )
    assert EXTENSION.describe(NfLog(length=5)) == " nflog-range 5"
    assert EXTENSION.describe(NfLog()) == ""
    # struct xt_nflog_info: len, group, threshold, flags (XT_NFLOG_F_COPY_LEN), pad, prefix.
    assert bytes(EXTENSION.encode(target)).hex() == "090000000200030001000000" + ("78" + "00" * 63)
    assert bytes(EXTENSION.encode(NfLog(length=5)))[:10].hex() == "05000000000000000000"
    assert ctypes.sizeof(EXTENSION.data) == 76
    assert target.snapshot_length == 9 and NfLog(length=5).snapshot_length is None


def test_evaluation_lists_it_and_goes_on() -> None:
    ruleset = parse(
        "*filter\n-A INPUT -j NFLOG --nflog-group 5\n-A INPUT -j LOG\n-A INPUT -p udp -j DROP\n"
        "COMMIT\n",
        "nflog",
    )
    packet = bytes(IP(src="198.18.0.5", dst="198.18.1.1") / UDP(dport=53) / b"q")
    result = evaluate(ruleset, packet, "INPUT", "veth0", None)
    assert (result.verdict, result.deciding) == ("DROP", ("INPUT", 3))
    assert result.logged == (("INPUT", 1), ("INPUT", 2))
