"""Classified runs (codegen.tc.classifier: a decision tree over the run's fields, its records
tested in rule order) against the reference evaluator and against the plain scan of the same
rules: overlapping prefixes and ranges of every length, non-contiguous masks, negations, devices
the namespace has and has not, ACCEPT and DROP mixed, packets aimed at prefix edges and range
ends, and the packets the transport matches refuse or hotdrop (later fragments, offset-1 TCP
fragments, truncated headers)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from codegen.rules import evaluate, parse, write
from codegen.rules.iptables_save import write_rule
from codegen.tc import classifier
from codegen.tc.generator import compile_program
from harness.deploy.patch import Changed, patch_hook
from harness.runner import ChainRunner, frame_for, standin_interfaces

pytestmark = pytest.mark.privileged

NETWORKS = ["198.18.0.0", "198.18.1.0", "198.19.128.0", "198.19.129.0"]
# Mostly long prefixes, so that few rules match a packet and the tree, not the run's first
# rules (scanned), decides most of them.
LENGTHS = [8, 15, 16, 23, 24, 25, 26, 30, 31, 32, 32, 32, 32]
EDGES = [0, 1, 2, 3, 63, 64, 127, 128, 254, 255]
PORTS = [0, 1, 22, 23, 79, 80, 81, 443, 1023, 1024, 65535]
DEVICES = ["eth0", "eth1", "gone0"]  # gone0 is not in the namespace


def _address(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(NETWORKS))
    octets = base.split(".")
    octets[3] = str(draw(st.sampled_from(EDGES)))
    return ".".join(octets)


@st.composite
def rule_text(draw: st.DrawFn) -> str:
    parts = []
    for option in ("-s", "-d"):  # a source always: few rules match most packets
        if option == "-s" or draw(st.integers(0, 3)):
            negated = "! " if draw(st.integers(0, 5)) == 0 else ""
            if draw(st.integers(0, 9)) == 0:
                mask = "255.0.255.0"  # not contiguous
            else:
                mask = str(draw(st.sampled_from(LENGTHS)))
            parts.append(f"{negated}{option} {_address(draw)}/{mask}")
    for option in ("-i",):
        if draw(st.integers(0, 4)) == 0:
            negated = "! " if draw(st.booleans()) else ""
            parts.append(f"{negated}{option} {draw(st.sampled_from(DEVICES))}")
    protocol = draw(st.sampled_from(["tcp", "udp", "icmp", None, None]))
    if protocol is not None:
        negated = "! " if protocol == "icmp" and draw(st.booleans()) else ""
        parts.append(f"{negated}-p {protocol}")
    if protocol in ("tcp", "udp") and draw(st.integers(0, 3)):
        parts.append(f"-m {protocol}")
        for option in ("--sport", "--dport"):
            if draw(st.integers(0, 2)):
                first = draw(st.sampled_from(PORTS))
                last = draw(st.sampled_from([p for p in PORTS if p >= first]))
                negated = "! " if draw(st.integers(0, 4)) == 0 else ""
                ports = str(first) if first == last else f"{first}:{last}"
                parts.append(f"{negated}{option} {ports}")
    parts.append(f"-j {draw(st.sampled_from(['ACCEPT', 'DROP']))}")
    return " ".join(parts)


@st.composite
def rulesets(draw: st.DrawFn) -> str:
    lines = [
        "*filter",
        f":INPUT {draw(st.sampled_from(['ACCEPT', 'DROP']))} [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
    ]
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            lines.append("-A INPUT -p udp -m udp --dport 53 -m ttl --ttl-lt 2 -j DROP")
        count = classifier.MIN_RUN + draw(st.integers(0, 40))
        lines += [f"-A INPUT {draw(rule_text())}" for _ in range(count)]
    return "\n".join([*lines, "COMMIT", ""])


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.packet import Raw

    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    kind = draw(st.sampled_from(["whole"] * 6 + ["later fragment", "offset 1", "truncated"]))
    if proto == "tcp":
        transport = bytes(TCP(sport=sport, dport=dport, flags="S"))
    elif proto == "udp":
        transport = bytes(UDP(sport=sport, dport=dport))
    else:
        transport = b"\x08\x00\x00\x00\x00\x00\x00\x00"
    number = {"tcp": 6, "udp": 17, "icmp": 1}[proto]
    if kind == "truncated":
        transport = transport[: draw(st.integers(0, len(transport) - 1))]
    frag = {"later fragment": 3, "offset 1": 1}.get(kind, 0)
    src, dst = _address(draw), _address(draw)
    return bytes(IP(src=src, dst=dst, proto=number, frag=frag) / Raw(transport))


def test_a_long_run_becomes_one_call_and_its_tables():
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f"-A INPUT -s 10.{i}.0.0/16 -j DROP" for i in range(classifier.MIN_RUN + 2)]
    lines += ["-A INPUT -p tcp -m tcp --dport 23 -m ttl --ttl-lt 5 -j DROP"]
    ruleset = parse("\n".join([*lines, "COMMIT", ""]), "runs.rules")
    rules = ruleset.chains["INPUT"].rules
    assert classifier.runs(rules, set()) == [(classifier.SCANNED_FIRST, classifier.MIN_RUN + 1)]
    compiled = compile_program(
        ruleset, "chain", chain="INPUT", interfaces=standin_interfaces(ruleset)
    )
    assert {"classifier_nodes", "classifier_records"} <= set(compiled.maps)
    # The run's list of all its rules, then its leaves' records.
    assert len(compiled.records) > classifier.MIN_RUN + 2 - classifier.SCANNED_FIRST


# The default, and splits wherever they can be: most drawn runs have several trees.
@pytest.mark.parametrize("min_group", [classifier.MIN_GROUP, 2])
@settings(max_examples=40, deadline=None)
@given(text=rulesets(), traffic=st.lists(packets(), min_size=16, max_size=16))
def test_classified_runs_agree_with_the_evaluator(min_group, text, traffic):
    ruleset = parse(text, "runs.rules")
    with (
        pytest.MonkeyPatch.context() as patch,
        ChainRunner(ruleset, ["eth0", "eth1"]) as runner,
    ):
        patch.setattr(classifier, "MIN_GROUP", min_group)
        patch.setattr(
            classifier,
            "REPLICATED",
            classifier.REPLICATED if min_group == classifier.MIN_GROUP else 0,
        )
        runner.program("INPUT")  # compiled with the groups patched
        for packet in traffic:
            for device in ("eth0", "eth1", None):
                expected = evaluate(ruleset, packet, "INPUT", device, None)
                got = runner.run(frame_for(packet), "INPUT", device)
                detail = f"\n{write(ruleset)}packet {packet.hex()} in {device}\n{expected}\n{got}"
                assert (got.verdict, got.deciding) == (expected.verdict, expected.deciding), detail
                assert got.counters == expected.counters, detail


@settings(max_examples=15, deadline=None)
@given(text=rulesets(), traffic=st.lists(packets(), min_size=16, max_size=16))
def test_the_classified_program_and_the_plain_scan_decide_alike(text, traffic):
    ruleset = parse(text, "runs.rules")
    assert classifier.runs(ruleset.chains["INPUT"].rules, set()), "the drawn rule set has a run"
    with ChainRunner(ruleset, ["eth0"]) as classified:
        seen = [classified.run(frame_for(packet), "INPUT", "eth0") for packet in traffic]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classifier, "MIN_RUN", 10**9)
        with ChainRunner(ruleset, ["eth0"]) as general:
            plain = [general.run(frame_for(packet), "INPUT", "eth0") for packet in traffic]
    for packet, tree, scanned in zip(traffic, seen, plain, strict=True):
        detail = f"\n{write(ruleset)}packet {packet.hex()}\n{tree}\n{scanned}"
        assert (tree.verdict, tree.deciding) == (scanned.verdict, scanned.deciding), detail
        assert tree.counters == scanned.counters, detail


@settings(max_examples=30, deadline=None)
@given(text=rulesets(), data=st.data(), traffic=st.lists(packets(), min_size=12, max_size=12))
def test_runs_patched_in_their_maps_agree_with_the_evaluator_on_the_new_rules(text, data, traffic):
    # The program stays; its maps are patched as a re-apply patches them (harness.deploy.
    # patch), twice; each time the new rules decide every packet as the evaluator says.
    ruleset = parse(text, "runs.rules")
    with ChainRunner(ruleset, ["eth0", "eth1"]) as runner, ExitStack() as held:
        program = runner.program("INPUT")
        tables = {table.name: table for table in program.resources if hasattr(table, "name")}
        layout = program.layout
        assert layout is not None
        in_trees = [
            index
            for run in layout["runs"]
            if run["trees"] is not None
            for index in range(run["first"], run["last"] + 1)
        ]
        patched = 0
        for _ in range(2):
            lines = write(ruleset).splitlines()
            at = [number for number, line in enumerate(lines) if line.startswith("-A INPUT")]
            chosen = data.draw(st.lists(st.sampled_from(in_trees), min_size=1, max_size=3))
            for index in set(chosen):
                lines[at[index - 1]] = f"-A INPUT {data.draw(rule_text())}"
            new = parse("\n".join([*lines, ""]), "runs.rules")
            changes = [
                Changed("INPUT", index, old, now)
                for index, (old, now) in enumerate(
                    zip(ruleset.chains["INPUT"].rules, new.chains["INPUT"].rules, strict=True),
                    start=1,
                )
                if write_rule("INPUT", old) != write_rule("INPUT", now)
            ]
            made = patch_hook(layout, tables, changes, new, runner.layout, runner.interfaces, held)
            if isinstance(made, str):  # a rule naming a device the namespace lacks, ...
                continue
            layout, writes = made
            writes.write(tables)
            ruleset, patched = new, patched + 1
            for packet in traffic:
                for device in ("eth0", "eth1", None):
                    expected = evaluate(ruleset, packet, "INPUT", device, None)
                    got = runner.run(frame_for(packet), "INPUT", device)
                    detail = f"\n{write(ruleset)}packet {packet.hex()} in {device}\n{got}"
                    assert (got.verdict, got.deciding) == (
                        expected.verdict,
                        expected.deciding,
                    ), f"{detail}\n{expected}"
                    assert got.counters == expected.counters, detail
        assume(patched)
