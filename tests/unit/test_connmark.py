"""`-j CONNMARK` and `-m connmark` in the rule layer: what iptables-legacy 1.8.9 takes and
refuses on this kernel, how it saves and lists them (as it printed them in a namespace), the
payloads, the arithmetic of each mode, and the evaluator along a flow: a connection's mark is
its entry's, kept by later packets, lost with an entry that is never confirmed, untouched for a
packet without a connection. The registry tests take the examples through every layer and
through iptables-legacy itself (tests/net/test_ipt_blob.py)."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, TCP

from codegen.rules import ConnectionTable, FlowStep, RuleError, evaluate_flow, parse, write
from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.connmark import EXTENSION as MATCH
from codegen.rules.extensions.connmark import Connmark
from codegen.rules.extensions.connmark_target import EXTENSION, ConnmarkTarget

# (options as written, what iptables-legacy-save 1.8.9 printed for them)
SPELLINGS = [
    ("--set-mark 0x1", "--set-xmark 0x1/0xffffffff"),
    ("--set-mark 5/0xf", "--set-xmark 0x5/0xf"),
    ("--and-mark 0xf", "--set-xmark 0x0/0xfffffff0"),
    ("--or-mark 0x3", "--set-xmark 0x3/0x3"),
    ("--xor-mark 3", "--set-xmark 0x3/0x0"),
    ("--save-mark", "--save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
    ("--save-mark --mask 0xff", "--save-mark --nfmask 0xff --ctmask 0xff"),
    ("--save-mark --ctmask 3", "--save-mark --nfmask 0xffffffff --ctmask 0x3"),
    ("--restore-mark --ctmask 0xf --nfmask 0xf0", "--restore-mark --nfmask 0xf0 --ctmask 0xf"),
    ("--set-xmark 0x5/0xf --left-shift-mark 3", "--set-xmark 0x5/0xf --left-shift-mark 3"),
    ("--save-mark --left-shift-mark 0", "--save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
    # Each option writes its fields where it comes: --mask after --and-mark overwrites its mask,
    # the last shift wins.
    ("--and-mark 1 --mask 3", "--set-xmark 0x0/0x3"),
    (
        "--restore-mark --left-shift-mark 2 --right-shift-mark 3",
        "--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff --right-shift-mark 3",
    ),
    ("--restore-mark --right-shift-mark 31",
     "--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff --right-shift-mark 31"),
]  # fmt: skip


@pytest.mark.parametrize(("options", "saved"), SPELLINGS)
def test_every_spelling_iptables_takes(options: str, saved: str) -> None:
    ruleset = parse(f"*filter\n-A INPUT -j CONNMARK {options}\nCOMMIT\n", "spelling")
    assert write(ruleset).splitlines()[4] == f"-A INPUT -j CONNMARK {saved}"


# (rule, column of the error, what the error says: iptables-legacy's words, or the kernel's
# EINVAL as a sentence)
REFUSED_RULES = [
    ("-A INPUT -j CONNMARK", 10, "CONNMARK target: No operation specified"),
    ("-A INPUT -j CONNMARK --ctmask 1", 10, "No operation specified"),
    (
        "-A INPUT -j CONNMARK --set-mark 1 --save-mark",
        22,
        'option "--set-mark" cannot be used together with "--save-mark"',
    ),
    (
        "-A INPUT -j CONNMARK --save-mark --mask 3 --ctmask 4",
        43,
        'option "--ctmask" cannot be used together with "--mask"',
    ),
    (
        "-A INPUT -j CONNMARK --xor-mark 1 --set-xmark 2 --or-mark 3",
        35,
        'option "--set-xmark" cannot be used together with "--or-mark"',
    ),
    ("-A INPUT -j CONNMARK --set-mark 1 --set-mark 2", 35, '"--set-mark" can only be used once'),
    ("-A INPUT -j CONNMARK --restore-mark --nfmask 1 --nfmask 2", 48, "can only be used once"),
    ("-A INPUT -j CONNMARK --set-mark 0x1/0x100000000", 33, "bad integer value"),
    ("-A INPUT -j CONNMARK --and-mark 1/2", 33, "bad integer value"),
    ("-A INPUT -j CONNMARK --save-mark --left-shift-mark 33", 52, "out of range (0-32)"),
    ("-A INPUT -j CONNMARK --set-mark 1 --left-shift-mark 32", 10, "refuses a shift of 32"),
    ("-A INPUT -m connmark", 10, "connmark: --mark must be specified"),
    ("-A INPUT -m connmark --mark 1 --mark 2", 31, "only one --mark allowed"),
    ("-A INPUT -m connmark --mark 0x100000000", 29, "connmark: bad value"),
]


@pytest.mark.parametrize(("rule", "column", "message"), REFUSED_RULES)
def test_what_iptables_or_the_kernel_refuses_is_refused(rule: str, column: int, message: str):
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n{rule}\nCOMMIT\n", "refused")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"refused:2:{column}: error:"), str(caught.value)


def test_list_and_payload_are_what_iptables_legacy_shows() -> None:
    # As `iptables-legacy -L -n` printed them (connmark_tg_print_v2, connmark_mt_print).
    listed = [
        ("--set-mark 0x1", " CONNMARK set 0x1"),
        ("--set-mark 5/0xf", " CONNMARK xset 0x5/0xf"),
        ("--and-mark 0xf", " CONNMARK and 0xf"),
        ("--or-mark 0x3", " CONNMARK or 0x3"),
        ("--xor-mark 3", " CONNMARK xor 0x3"),
        ("--save-mark", " CONNMARK save"),
        ("--save-mark --mask 0xff", " CONNMARK save mask 0xff"),
        ("--save-mark --nfmask 0xf --ctmask 0xf0", " CONNMARK save nfmask 0xf ctmask ~0xf0"),
        ("--restore-mark", " CONNMARK restore"),
        ("--restore-mark --mask 0xff", " CONNMARK restore mask 0xff"),
        (
            "--restore-mark --ctmask 0xf --nfmask 0xf0",
            " CONNMARK restore ctmask 0xf nfmask ~0xf0",
        ),
        ("--set-xmark 0x5/0xf --left-shift-mark 3", " CONNMARK xset 0x5/0xf left-shift-mark 3"),
    ]
    for options, text in listed:
        rule = parse(f"*filter\n-A INPUT -j CONNMARK {options}\nCOMMIT\n", "l").chains["INPUT"]
        assert EXTENSION.describe(rule.rules[0].target) == text
    assert MATCH.describe(Connmark(1)) == " connmark match  0x1"
    assert MATCH.describe(Connmark(0x10, 0xF0, True)) == " connmark match ! 0x10/0xf0"
    # struct xt_connmark_tginfo2 { u32 ctmark, ctmask, nfmask; u8 shift_dir, shift_bits, mode; }
    assert ctypes.sizeof(EXTENSION.data) == 16
    target = ConnmarkTarget("restore", 0, 0xFF0, 0xFF, True, 4)
    encoded = bytes(EXTENSION.encode(target))
    assert encoded.hex() == "00000000f00f0000ff000000010402" + "00"
    assert EXTENSION.decode(EXTENSION.data.from_buffer_copy(encoded)) == target
    with pytest.raises(BlobError, match="mode 3"):
        EXTENSION.decode(EXTENSION.data.from_buffer_copy(encoded[:14] + b"\x03\x00"))


@pytest.mark.parametrize(
    ("target", "before", "after"),
    [
        # ((ct & ~ctmask) ^ ctmark) << shift
        (ConnmarkTarget("set", 0x5, 0xF, shift_bits=4), (0x1234, 7), (0x12350, 7)),
        (ConnmarkTarget("set", 0x40, 0xF0, shift_right=True, shift_bits=1), (0xFF, 7), (0x27, 7)),
        # (ct & ~ctmask) ^ ((mark & nfmask) << shift)
        (ConnmarkTarget("save", 0, 0xFFFF, 0xF0F, False, 4), (0xAB0000, 0x123), (0xAB1030, 0x123)),
        # mark = (mark & ~nfmask) ^ ((ct & ctmask) >> shift)
        (ConnmarkTarget("restore", 0, 0xFF0, 0xFF, True, 4), (0xABC, 0x1234), (0xABC, 0x12AB)),
        (ConnmarkTarget("save", shift_bits=31), (0, 3), (0x80000000, 3)),
    ],
)
def test_each_mode_computes_as_xt_connmark(target, before, after) -> None:
    assert target.marks(*before) == after


HOST, PEER = "198.18.0.2", "198.18.0.1"


def _tcp(flags: str, inbound: bool = True, dport: int = 22) -> bytes:
    src, dst = (PEER, HOST) if inbound else (HOST, PEER)
    ports = (40000, dport) if inbound else (dport, 40000)
    return bytes(IP(src=src, dst=dst) / TCP(sport=ports[0], dport=ports[1], flags=flags))


FLOW_RULES = """*filter
-A INPUT -m connmark --mark 0x0 -j CONNMARK --set-mark 0x1
-A INPUT -p tcp --dport 23 -j DROP
-A INPUT -m conntrack --ctstate ESTABLISHED -j CONNMARK --xor-mark 0x3
-A INPUT -p tcp --tcp-flags PSH PSH -m connmark --mark 0x1 -j DROP
-A OUTPUT -j CONNMARK --restore-mark
COMMIT
"""


def test_a_connection_keeps_its_mark_along_the_flow() -> None:
    ruleset = parse(FLOW_RULES, "flow")
    table = ConnectionTable()
    steps = [
        FlowStep(_tcp("S"), "INPUT", "eth0", time=0.0),  # NEW: marked 1, confirmed
        FlowStep(_tcp("S", dport=23), "INPUT", "eth0", time=0.1),  # marked, dropped: gone
        FlowStep(_tcp("SA", inbound=False), "OUTPUT", None, "eth0", time=0.2),  # restores 1
        FlowStep(_tcp("A"), "INPUT", "eth0", time=0.3),  # 1 ^ 3
        FlowStep(_tcp("PA"), "INPUT", "eth0", time=0.4),  # 2 ^ 3, then dropped
        FlowStep(_tcp("SA", dport=24), "INPUT", "eth0", time=0.5),  # no connection
    ]
    results = evaluate_flow(ruleset, steps, table)
    policy = ("INPUT", "policy")
    assert [r.evaluation.deciding for r in results] == [
        policy,
        ("INPUT", 2),
        ("OUTPUT", "policy"),
        policy,
        ("INPUT", 4),
        policy,
    ]
    assert [r.evaluation.connection_mark for r in results] == [1, 1, 1, 2, 1, None]
    # A known connection's mark changes with the packet, dropped or not; the dropped NEW
    # packet's entry was never kept, and with it its mark.
    assert {entry.original.dport: entry.mark for entry in table.entries(1.0)} == {22: 1}
    assert results[2].evaluation.mark == 1  # --restore-mark on the SYN/ACK
    assert results[5].evaluation.counters == {policy: (1, 40)}  # CONNMARK left it alone
