"""Runs of exact-match rules (one hash lookup in front of their scan) against the reference
evaluator: hits, misses, the first of duplicate keys, ACCEPT and DROP mixed, TCP and UDP mixed,
runs between ordinary rules, and the packets the lookup must leave to the scan (later
fragments, truncated transport headers, TCP fragments at offset 1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import evaluate, parse, write
from codegen.tc import exact
from codegen.tc.generator import INLINE_SCAN, compile_program
from harness.runner import ChainRunner, frame_for, standin_interfaces

pytestmark = pytest.mark.privileged

ADDRESSES = [f"198.18.0.{i}" for i in range(1, 9)]
PORTS = [22, 53, 80, 443]


@st.composite
def run_rulesets(draw: st.DrawFn) -> str:
    """A chain with one or two long runs of exact rules among ordinary ones."""
    lines = [
        "*filter",
        f":INPUT {draw(st.sampled_from(['ACCEPT', 'DROP']))} [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
    ]
    length = draw(st.sampled_from([exact.MIN_RUN, exact.MIN_RUN + 20, INLINE_SCAN + 30]))
    shape = draw(st.sampled_from(["src-proto-dport", "src-dst", "proto-sport-dport"]))
    for block in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            lines.append(f"-A INPUT -p udp -m udp --dport {draw(st.sampled_from(PORTS))}")
        for _ in range(length):
            src, dst = draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from(ADDRESSES))
            proto = draw(st.sampled_from(["tcp", "udp"]))
            port, sport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
            verdict = draw(st.sampled_from(["ACCEPT", "DROP"]))
            if shape == "src-proto-dport":
                rule = f"-s {src}/32 -p {proto} -m {proto} --dport {port}"
            elif shape == "src-dst":
                rule = f"-s {src}/32 -d {dst}/32"
            else:
                rule = f"-p {proto} -m {proto} --sport {sport} --dport {port}"
            lines.append(f"-A INPUT {rule} -m comment --comment run{block} -j {verdict}")
    return "\n".join([*lines, "COMMIT", ""])


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.packet import Raw

    src, dst = draw(st.sampled_from(ADDRESSES)), draw(st.sampled_from(ADDRESSES))
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
    return bytes(IP(src=src, dst=dst, proto=number, frag=frag) / Raw(transport))


def test_runs_are_found_and_compiled_to_lookups():
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [
        f"-A INPUT -s 198.18.{i // 250}.{i % 250 + 1}/32 -p tcp -m tcp --dport 22 -j ACCEPT"
        for i in range(exact.MIN_RUN + 3)
    ]
    lines += ["-A INPUT -p tcp -m tcp --dport 23 -m ttl --ttl-lt 5 -j DROP"]
    lines += [f"-A INPUT -s 198.19.1.{i}/32 -j DROP" for i in range(1, 3)]  # too short a run
    ruleset = parse("\n".join([*lines, "COMMIT", ""]), "runs.rules")
    # The run's first rules are scanned before its lookup; the map holds the rest.
    assert exact.runs(ruleset.chains["INPUT"].rules) == [
        (exact.SCANNED_FIRST, exact.MIN_RUN + 2, exact.Shape(True, False, True, True, False, True))
    ]
    compiled = compile_program(
        ruleset, "chain", chain="INPUT", interfaces=standin_interfaces(ruleset)
    )
    held = exact.MIN_RUN + 3 - exact.SCANNED_FIRST
    assert len(compiled.exact) == held and "exact_rules" in compiled.maps


@settings(max_examples=60, deadline=None)
@given(text=run_rulesets(), traffic=st.lists(packets(), min_size=12, max_size=12))
def test_exact_runs_agree_with_the_evaluator(text, traffic):
    ruleset = parse(text, "runs.rules")
    with ChainRunner(ruleset) as runner:
        for packet in traffic:
            expected = evaluate(ruleset, packet, "INPUT", "eth0", None)
            got = runner.run(frame_for(packet), "INPUT", "eth0")
            detail = f"\n{write(ruleset)}packet {packet.hex()}\n{expected}\n{got}"
            assert (got.verdict, got.deciding) == (expected.verdict, expected.deciding), detail
            assert got.counters == expected.counters, detail


@settings(max_examples=20, deadline=None)
@given(text=run_rulesets(), traffic=st.lists(packets(), min_size=12, max_size=12))
def test_the_specialised_program_and_the_plain_scan_decide_alike(text, traffic):
    """The program specialised to the rule set (its exact runs answered by a lookup behind a
    scan of their first rules) and the general one (every rule scanned, no run) run on the same
    traffic: same verdict, same deciding rule, same counters."""
    ruleset = parse(text, "runs.rules")
    assert exact.runs(ruleset.chains["INPUT"].rules), "the drawn rule set has a run"
    with ChainRunner(ruleset) as specialised:
        seen = [specialised.run(frame_for(packet), "INPUT", "eth0") for packet in traffic]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exact, "MIN_RUN", 10**9)  # no run is long enough: the general program
        assert not exact.runs(ruleset.chains["INPUT"].rules)
        with ChainRunner(ruleset) as general:
            plain = [general.run(frame_for(packet), "INPUT", "eth0") for packet in traffic]
    for packet, special, scanned in zip(traffic, seen, plain, strict=True):
        detail = f"\n{write(ruleset)}packet {packet.hex()}\n{special}\n{scanned}"
        assert (special.verdict, special.deciding) == (scanned.verdict, scanned.deciding), detail
        assert special.counters == scanned.counters, detail
