"""The C backend's rule table (codegen/c/table.py): which rules are plain, what their entries
hold, and how chains are cut into runs. What the entries mean to a packet is the kernel tests'
(test_three_way, test_shape_differential)."""

from __future__ import annotations

import pytest

from codegen.c import table
from codegen.c.entries import Entry
from codegen.c.source import generate
from codegen.rules import parse

INTERFACES = {"eth0": 2, "eth1": 3, "veth0": 4}


def _rules(*lines: str):
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", *(f"-A INPUT {line}" for line in lines)])
    return parse(text + "\nCOMMIT\n", "t.rules").chains["INPUT"].rules


def _entry(line: str) -> tuple | None:
    (rule,) = _rules(line)
    packed = table.entry(rule, 7, INTERFACES)
    return None if packed is None else table.ENTRY.unpack(packed)


def test_an_entry_is_44_bytes_as_the_c_declares_it():
    assert table.ENTRY.size == 44
    assert len(table.FIELDS) == len(table.ENTRY.unpack(bytes(44)))


def test_addresses_devices_ports_and_verdict_land_in_their_fields():
    fields = _entry(
        "-s 198.18.0.0/15 ! -d 10.1.2.3/32 -i eth1 -p tcp -m tcp ! --dport 80:90 -j DROP"
    )
    assert fields is not None
    saddr, smask, daddr, dmask, in_ifindex, out_ifindex, slot = fields[:7]
    assert (saddr, smask) == (0xC6120000, 0xFFFE0000)
    assert (daddr, dmask) == (0x0A010203, 0xFFFFFFFF)
    assert (in_ifindex, out_ifindex, slot) == (3, 0, 7)
    sport_first, sport_last, dport_first, dport_last, flags = fields[7:12]
    assert (sport_first, sport_last, dport_first, dport_last) == (0, 0xFFFF, 80, 90)
    assert flags == table.DST_NOT | table.DPORT_NOT
    protocol, l4, _, _, verdict, _ = fields[12:]
    assert (protocol, l4, verdict) == (6, table.L4_TCP, table.DROP)


@pytest.mark.parametrize(
    ("line", "flags"),
    [
        ("-i gone0 -j ACCEPT", table.NEVER),  # nobody has it: matches nothing
        ("! -i gone0 -j ACCEPT", 0),  # and its negation everything
        ("-f -j DROP", table.LATER_FRAGMENT),
        ("! -f -j DROP", table.FIRST_FRAGMENT),
        ("-p tcp -m tcp ! --tcp-flags SYN,ACK SYN -j DROP", table.FLAGS_NOT),
        ("! -s 198.18.0.1 -m comment --comment hi", table.SRC_NOT),
    ],
)
def test_negations_and_impossible_matches_are_flags(line, flags):
    fields = _entry(line)
    assert fields is not None and fields[11] == flags


@pytest.mark.parametrize(
    "line",
    [
        "-p tcp -m multiport --dports 22,80 -j ACCEPT",  # another family
        "-j LOG",  # another target
        "-s 198.18.0.1 -j chain",  # a jump
        "-i veth+ -j ACCEPT",  # a wildcard naming two devices
    ],
)
def test_what_an_entry_cannot_hold_stays_inline(line):
    text = "\n".join(
        ["*filter", ":INPUT ACCEPT [0:0]", ":chain - [0:0]", f"-A INPUT {line}", "COMMIT", ""]
    )
    (rule,) = parse(text, "t.rules").chains["INPUT"].rules
    several = {"veth0": 4, "veth1": 5}
    assert table.entry(rule, 0, {**INTERFACES, **several}) is None


def test_a_wildcard_naming_one_device_is_that_device():
    (rule,) = _rules("-i veth+ -j ACCEPT")
    fields = table.ENTRY.unpack(table.entry(rule, 0, INTERFACES))
    assert fields[4] == 4


def test_chains_are_cut_into_runs_of_plain_rules():
    rules = _rules(
        *(f"-s 198.18.0.{i} -j DROP" for i in range(1, 4)),
        "-j LOG",
        *(f"-s 198.18.1.{i} -j ACCEPT" for i in range(1, 3)),
        "-p tcp -m multiport --dports 1,2",
        "-s 198.18.2.1",
    )
    cut = table.RuleTable(INTERFACES, table_from=2)
    runs = cut.runs(rules, list(range(100, 100 + len(rules))))
    assert runs == [table.Run(1, 3, 0), table.Run(5, 6, 3)]  # the last plain rule is alone
    assert len(cut.entries) == 5
    assert [table.ENTRY.unpack(entry)[6] for entry in cut.entries] == [100, 101, 102, 104, 105]
    assert table.RuleTable(INTERFACES, table_from=1).runs(rules, list(range(9)))[-1] == (
        table.Run(8, 8, 5)
    )
    with pytest.raises(ValueError, match="one rule"):
        table.RuleTable(INTERFACES, table_from=0)


def test_short_runs_stay_inline_and_long_ones_are_listed_by_entry():
    lines = [f"-s 198.18.0.{i} -p udp -m udp --dport {i} -j DROP" for i in range(1, 6)]
    ruleset = parse(
        "\n".join(
            ["*filter", ":INPUT ACCEPT [0:0]", *(f"-A INPUT {x}" for x in lines), "COMMIT", ""]
        ),
        "t",
    )
    inline = generate(ruleset, [Entry("chain", "INPUT")], interfaces=INTERFACES)
    assert inline.table == () and table.TABLE_MAP not in inline.text
    scanned = generate(ruleset, [Entry("chain", "INPUT")], interfaces=INTERFACES, table_from=5)
    assert len(scanned.table) == 5
    assert "// entry 4: -A INPUT -s 198.18.0.5/32 -p udp -m udp --dport 5 -j DROP" in scanned.text
    assert "while (can_loop)" in scanned.text
