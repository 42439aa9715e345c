"""`-j LOG` in the rule layer: what iptables-legacy 1.8.9 takes and refuses, how it saves,
lists and encodes it (checked against it in a namespace), and that evaluation goes on after it.
The registry tests (test_target_extensions.py) take its examples through every layer."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, UDP

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.blob.structs import IptEntry, IptReplace
from codegen.rules.extensions.log import EXTENSION, Log
from codegen.rules.ipt_blob import BlobError, decode_table, encode_table

ALL = "--log-tcp-sequence --log-tcp-options --log-ip-options --log-uid --log-macdecode"

# (rule, column of the error, what the error says)
REFUSED_RULES = [
    ("-A INPUT -j LOG --log-level bad", 29, "log level 'bad' unknown"),
    ("-A INPUT -j LOG --log-level warn", 29, "log level 'warn' unknown"),
    ("-A INPUT -j LOG --log-level err", 29, "log level 'err' unknown"),
    ("-A INPUT -j LOG --log-level WARNING", 29, "unknown"),
    ("-A INPUT -j LOG --log-level 8", 29, "log level '8' unknown"),
    ("-A INPUT -j LOG --log-level 08", 29, "unknown"),
    ("-A INPUT -j LOG --log-level 3x", 29, "unknown"),
    ("-A INPUT -j LOG --log-prefix", 17, "requires an argument"),
    ('-A INPUT -j LOG --log-prefix ""', 30, "must not be empty"),
    (f"-A INPUT -j LOG --log-prefix {'a' * 30}", 30, "30 bytes long, 29 max"),
    ("-A INPUT -j LOG --log-prefix a --log-prefix b", 32, '"--log-prefix" can only be used once'),
    ("-A INPUT -j LOG --log-level 1 --log-level 2", 31, '"--log-level" can only be used once'),
    ("-A INPUT -j LOG --log-uid --log-uid", 27, '"--log-uid" can only be used once'),
    ("-A INPUT -j LOG ! --log-uid", 19, "cannot be negated"),
    ("-A INPUT --log-uid -j LOG", 10, "unknown option '--log-uid'"),
]


@pytest.mark.parametrize(("rule", "column", "message"), REFUSED_RULES)
def test_what_iptables_refuses_is_refused(rule: str, column: int, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n{rule}\nCOMMIT\n", "refused")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"refused:2:{column}: error:"), str(caught.value)


# (options as written, what iptables-legacy-save 1.8.9 printed for them)
SPELLINGS = [
    ("", "-j LOG"),
    ("--log-level 4", "-j LOG"),
    ("--log-level warning", "-j LOG"),
    ("--log-level panic", "-j LOG --log-level 0"),
    ("--log-level emerg", "-j LOG --log-level 0"),
    ("--log-level alert", "-j LOG --log-level 1"),
    ("--log-level crit", "-j LOG --log-level 2"),
    ("--log-level error", "-j LOG --log-level 3"),
    ("--log-level notice", "-j LOG --log-level 5"),
    ("--log-level info", "-j LOG --log-level 6"),
    ("--log-level debug", "-j LOG --log-level 7"),
    ("--log-level 0x3", "-j LOG --log-level 3"),
    ("--log-level 07", "-j LOG --log-level 7"),
    (
        f"--log-macdecode --log-uid --log-level 7 {ALL.replace(' --log-uid --log-macdecode', '')}"
        ' --log-prefix "a b\\"c\'"',
        f'-j LOG --log-prefix "a b\\"c\\\'" --log-level 7 {ALL}',
    ),
    ("--log-pre=x --log-l=1", "-j LOG --log-prefix x --log-level 1"),
]


@pytest.mark.parametrize(("options", "saved"), SPELLINGS)
def test_every_spelling_iptables_takes(options: str, saved: str) -> None:
    ruleset = parse(f"*filter\n-A INPUT -j LOG {options}\nCOMMIT\n", "spelling")
    assert write(ruleset).splitlines()[4] == f"-A INPUT {saved}"


def test_list_and_payload_are_what_iptables_legacy_shows() -> None:
    target = Log(7, "a b\"c'", 0x2F)
    assert EXTENSION.describe(target) == ' LOG flags 47 level 7 prefix "a b"c\'"'
    assert EXTENSION.describe(Log()) == " LOG flags 0 level 4"
    # As iptables-legacy-restore wrote them (read back with IPT_SO_GET_ENTRIES).
    assert bytes(EXTENSION.encode(target)).hex() == "072f612062226327" + "00" * 24
    assert bytes(EXTENSION.encode(Log(prefix="test: ", level=1))).hex() == (
        "0100746573743a20" + "00" * 24
    )
    assert ctypes.sizeof(EXTENSION.data) == 32


def test_evaluation_continues_after_log() -> None:
    ruleset = parse(
        "*filter\n-A INPUT -j LOG --log-prefix seen\n-A INPUT -p udp -j DROP\nCOMMIT\n", "log"
    )
    packet = bytes(IP(src="198.18.0.5", dst="198.18.1.1") / UDP(dport=53) / b"q")
    result = evaluate(ruleset, packet, "INPUT", "veth0", None)
    assert (result.verdict, result.deciding, result.reply) == ("DROP", ("INPUT", 2), None)
    assert result.counters[("INPUT", 1)] == (1, len(packet))


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"\x08", "level 8 is past 7"),
        (1, b"\x10", "unknown flags 0x10"),
        (31, b"x", "no terminating NUL"),
    ],
)
def test_a_payload_the_kernel_refuses_is_refused(offset: int, value: bytes, message: str) -> None:
    blob = encode_table(parse("*filter\n-A INPUT -j LOG\nCOMMIT\n"))
    header = ctypes.sizeof(IptReplace)
    at = header + IptEntry.from_buffer_copy(blob, header).target_offset + 32 + offset
    patched = blob[:at] + value + blob[at + 1 :]
    with pytest.raises(BlobError) as caught:
        decode_table(patched)
    assert message in str(caught.value)
