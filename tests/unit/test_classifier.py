"""The classifier's tables (codegen.tc.classifier) without a kernel: its lookup, walked in Python
as the program walks it, finds for every key the record a scan of the run's rules in order
finds; which rules can join a run, and what their records and boxes say."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import parse
from codegen.tc import classifier as C
from codegen.tc import classifier_patch as P

INTERFACES = {"eth0": 2, "eth1": 3}
PREFIXES = [(0x0A000000, 8), (0x0A010000, 16), (0x0A010100, 24), (0x0A010180, 25), (0x0A010181, 32)]
PORT_EDGES = [0, 1, 79, 80, 81, 1023, 1024, 65535]


def _rule(text: str):
    ruleset = parse(f"*filter\n:INPUT ACCEPT [0:0]\n-A INPUT {text}\nCOMMIT\n", "t.rules")
    return ruleset.chains["INPUT"].rules[0]


@pytest.mark.parametrize(
    "text, joins",
    [
        ("-s 10.0.0.0/8 -j DROP", True),
        ("! -s 10.0.0.0/255.0.255.0 -d 10.1.1.1 -i eth0 -j ACCEPT", True),
        ("-p tcp -m tcp ! --dport 80:90 --sport 1024: -j DROP", True),
        ("-p udp -m udp --dport 53 -m comment --comment dns -j ACCEPT", True),
        ("-i gone0 -j DROP", True),  # a device the namespace lacks: a rule that never matches
        ("-i eth+ -j DROP", False),  # wildcards are not in the tree
        ("-p tcp -m tcp --syn -j DROP", False),  # flags are not in the tree
        ("-f -j DROP", False),
        ("-s 10.0.0.0/8 -j RETURN", False),
        ("-s 10.0.0.0/8", False),
        ("-p tcp -m ttl --ttl-lt 5 -j DROP", False),
    ],
)
def test_which_rules_join_a_run(text, joins):
    assert (C.entry(_rule(text), INTERFACES) is not None) == joins
    assert C.classifiable(_rule(text)) == joins  # what the runs are cut by, devices unknown


def test_a_record_says_what_its_rule_says():
    made = C.entry(
        _rule("! -s 10.1.0.0/16 -p tcp -m tcp --dport 80:90 -i eth1 -j ACCEPT"), INTERFACES
    )
    assert made is not None and not made.exact
    saddr, smask, _, dmask, device_in, _, *ports, protocol, flags, verdict = made.record
    assert (saddr, smask, dmask, device_in, protocol) == (0x0A010000, 0xFFFF0000, 0, 3, 6)
    assert ports == [0, 0xFFFF, 80, 90] and verdict == C.ACCEPT
    assert flags == C.INV_SADDR | C.PORTS
    # The negated source is the whole range in the tree; the ports exclude ABSENT.
    assert made.box[0] == (0, C.U32) and made.box[4] == (80, 90) and made.box[5] == (3, 3)
    never = C.entry(_rule("-i gone0 -j DROP"), INTERFACES)
    assert never is not None and never.never


@st.composite
def run_rules(draw: st.DrawFn) -> list[str]:
    texts = []
    for _ in range(draw(st.integers(1, 120))):
        parts = []
        if draw(st.integers(0, 4)):
            address, length = draw(st.sampled_from(PREFIXES))
            negated = "! " if draw(st.integers(0, 6)) == 0 else ""
            mask = "255.0.255.0" if draw(st.integers(0, 9)) == 0 else str(length)
            parts.append(
                f"{negated}-s {address >> 24}.{address >> 16 & 255}."
                f"{address >> 8 & 255}.{address & 255}/{mask}"
            )
        if draw(st.integers(0, 5)) == 0:
            negated = "! " if draw(st.booleans()) else ""
            parts.append(f"{negated}-i {draw(st.sampled_from(['eth0', 'eth1', 'gone0']))}")
        protocol = draw(st.sampled_from(["tcp", "udp", None]))
        if protocol:
            parts.append(f"-p {protocol}")
            if draw(st.booleans()):
                first = draw(st.sampled_from(PORT_EDGES))
                last = draw(st.sampled_from([p for p in PORT_EDGES if p >= first]))
                negated = "! " if draw(st.integers(0, 4)) == 0 else ""
                parts.append(f"-m {protocol} {negated}--dport {first}:{last}")
        parts.append(f"-j {draw(st.sampled_from(['ACCEPT', 'DROP']))}")
        texts.append(" ".join(parts))
    return texts


def _key(draw: st.DrawFn) -> tuple[int, ...]:
    address, length = draw(st.sampled_from(PREFIXES))
    saddr = address + draw(
        st.sampled_from([-1, 0, 1, (1 << (32 - length)) - 1, 1 << (32 - length)])
    )
    port = draw(st.sampled_from([*PORT_EDGES, C.ABSENT, C.HOT]))
    protocol = draw(st.sampled_from([1, 6, 17]))
    device = draw(st.sampled_from([0, 2, 3]))
    return (saddr & C.U32, 0, protocol, port, port, device, 0)


# The default, and splits wherever they can be: many drawn runs have several trees.
@pytest.mark.parametrize("min_group", [C.MIN_GROUP, 2])
@settings(max_examples=200, deadline=None)
@given(texts=run_rules(), data=st.data())
def test_the_tree_finds_what_a_scan_in_rule_order_finds(min_group, texts, data):
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    assert all(made is not None for made in entries)
    tables = C.Tables()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(C, "MIN_GROUP", min_group)
        patch.setattr(C, "REPLICATED", C.REPLICATED if min_group == C.MIN_GROUP else 0)
        run = tables.add_run(entries, list(range(len(entries))))
    live = [i for i, made in enumerate(entries) if not made.never]
    for _ in range(20):
        key = _key(data.draw)
        scanned = None
        for position, slot in enumerate(live):
            said = P.matches(tables.records[tables.every_rule(run)[0] + position], key)
            if said is not None:
                scanned = (slot, said)
                break
        found = P.lookup(tables, run, key)
        got = None if found is None else (C.RECORD.unpack(found[0])[-1], found[1])
        assert got == scanned, f"{texts}\nkey {key}"


@pytest.mark.parametrize("replicated, trees", [(C.REPLICATED, 1), (0, C.MAX_TREES)])
def test_rules_wide_on_the_telling_field_and_narrowed_elsewhere_get_trees_of_their_own(
    monkeypatch, replicated, trees
):
    # Narrow sources; /8 sources narrowed by a destination; /8 sources narrowed by a port
    # only; and /8 sources alone, which stay with the narrow ones (they end leaves' lists).
    narrow = [
        f"-s 10.{i // 256}.{i % 256}.0/24 -p tcp -m tcp --dport 80 -j ACCEPT" for i in range(80)
    ]
    by_destination = [f"-s {20 + i % 50}.0.0.0/8 -d 192.0.{i}.0/24 -j DROP" for i in range(70)]
    by_port = [
        f"-s {80 + i % 50}.0.0.0/8 -p udp -m udp --dport {1000 + i} -j DROP" for i in range(70)
    ]
    alone = [f"-s {140 + i}.0.0.0/8 -j DROP" for i in range(10)]
    texts = [*narrow, *by_destination, *by_port, *alone]
    # 230 rules replicate too little to be worth a walk more, unless any replication is.
    monkeypatch.setattr(C, "REPLICATED", replicated)
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables = C.Tables()
    run = tables.add_run(entries, list(range(len(entries))))
    head = tables.heads[run]
    assert C.NODE.unpack(tables.nodes[head])[:3] == (C.TREES, trees, head + 1)
    assert tables.trees == trees
    # Each rule is found: the narrow one at its /24, the others by what narrows them.
    cases = [
        (0, (0x0A000005, 0, 6, 40000, 80, 2, 0)),
        (80, (0x14000001, 0xC0000001, 6, 40000, 80, 2, 0)),
        (150, (0x50000001, 0, 17, 40000, 1000, 2, 0)),
        (220, (0x8C000001, 0, 1, C.ABSENT, C.ABSENT, 2, 0)),
    ]
    for place, key in cases:
        found = P.lookup(tables, run, key)
        assert found is not None and C.RECORD.unpack(found[0])[-2] == place, texts[place]


@settings(max_examples=300)
@given(
    first=st.lists(st.integers(0, 40), max_size=12).map(sorted),
    second=st.lists(st.integers(0, 40), min_size=1, max_size=12).map(sorted),
    data=st.data(),
)
def test_the_nth_of_two_sorted_lists_is_that_of_their_merge(first, second, data):
    n = data.draw(st.integers(0, len(first) + len(second) - 1))
    assert C._nth_of_two(first, second, n) == sorted(first + second)[n]
    assert C._nth_of_two(second, first, n) == sorted(first + second)[n]
