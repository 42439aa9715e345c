"""Rule-set sizes the verifier accepts, and the layout that gets them there: chains cut into
global functions of CHUNK_RULES rules, exact runs answered by a lookup and, for what it cannot
answer, the classifier's loop over their records. The largest rule set that loads is measured
by `bpflab bench`, not asserted here."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from codegen.rules import parse
from codegen.tc.generator import CHUNK_RULES, CompileError, compile_program
from harness.bench import shapes
from harness.runner import ChainRunner, frame_for, standin_interfaces

pytestmark = pytest.mark.privileged


def _address(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}"


def many_rules(count: int, chain: str = "INPUT") -> str:
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [
        f"-A {chain} -s {_address(i)}/32 -p tcp -m tcp --dport {1000 + i} -j ACCEPT"
        for i in range(count)
    ]
    return "\n".join([*lines, "COMMIT", ""])


@pytest.mark.parametrize("count", [1, 100, 1000, 5000, 60_000])
def test_rule_sets_load_and_decide(count):
    ruleset = parse(many_rules(count), f"{count}.rules")
    with ChainRunner(ruleset) as runner:
        for index in sorted({0, count // 2, count - 1}):
            packet = bytes(IP(src=_address(index), dst="198.18.0.2") / TCP(dport=1000 + index))
            outcome = runner.run(frame_for(packet), "INPUT")
            assert (outcome.verdict, outcome.deciding) == ("ACCEPT", ("INPUT", index + 1))
            # What the lookup cannot answer: a later fragment has no ports (no rule matches
            # it), a TCP header cut short is hotdropped by the first rule its addresses match.
            later = IP(src=_address(index), dst="198.18.0.2", proto=6, frag=100) / bytes(8)
            assert runner.run(frame_for(bytes(later)), "INPUT").deciding == ("INPUT", "policy")
            short = IP(src=_address(index), dst="198.18.0.2", proto=6) / bytes(8)
            outcome = runner.run(frame_for(bytes(short)), "INPUT")
            assert (outcome.verdict, outcome.deciding) == ("DROP", ("INPUT", index + 1))
        stranger = bytes(IP(src="198.19.0.1", dst="198.18.0.2") / TCP(dport=1000))
        assert runner.run(frame_for(stranger), "INPUT").deciding == ("INPUT", "policy")
        stats = runner.program("INPUT").stats
        assert stats is not None and stats.insns_processed < 1_000_000


@pytest.mark.parametrize("hook", ["ingress", "egress"])
def test_hook_programs_load_with_5000_rules(hook):
    from codegen.tc.generator import COUNTERS_MAP
    from codegen.tc.layout import CounterLayout
    from harness.backends import load_program
    from harness.counters import CounterMap

    ruleset = parse(many_rules(5000, "INPUT" if hook == "ingress" else "OUTPUT"), "big.rules")
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        program = load_program(
            ruleset,
            hook,
            interfaces=standin_interfaces(ruleset),
            maps={COUNTERS_MAP: counters},
        )
        try:
            # One exact run: its lookup, and the classifier's loop over its records for what
            # the lookup cannot answer, cost the verifier what a run of 300 rules does.
            assert program.stats is not None and program.stats.insns_processed < 100_000
        finally:
            program.close()


def test_long_user_chain_is_chunked_and_keeps_order():
    count = 2 * CHUNK_RULES + 10
    lines = [
        "*filter",
        ":INPUT DROP [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":long - [0:0]",
        "-A INPUT -p tcp -j long",
        "-A INPUT -p tcp -j ACCEPT",
    ]
    lines += [f"-A long -p tcp -m tcp --dport {i} -j RETURN" for i in range(1, count)]
    lines += ["-A long -p tcp -m tcp --dport 9999 -j DROP", "COMMIT", ""]
    ruleset = parse("\n".join(lines), "long.rules")
    with ChainRunner(ruleset) as runner:
        near_end = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(dport=count - 1))
        outcome = runner.run(frame_for(near_end), "INPUT")
        assert outcome.deciding == ("INPUT", 2)  # RETURN from chunk 3 came back to INPUT
        assert outcome.counters[("long", count - 1)] == (1, len(near_end))
        last = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(dport=9999))
        assert runner.run(frame_for(last), "INPUT").deciding == ("long", count)


def test_nesting_beyond_the_call_frames_is_refused_naming_the_rule():
    depth = 8
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":c{i} - [0:0]" for i in range(depth)]
    lines.append("-A INPUT -j c0")
    lines += [f"-A c{i} -j c{i + 1}" for i in range(depth - 1)]
    ruleset = parse("\n".join([*lines, "COMMIT", ""]), "deep.rules")
    with pytest.raises(CompileError) as caught:
        compile_program(ruleset, "ingress", interfaces={})
    message = str(caught.value)
    assert message.startswith("deep.rules:")
    assert "INPUT -> c0 -> c1" in message and "8 nested calls" in message


@pytest.mark.bcc
@pytest.mark.parametrize("shape", ["cidr", "acl", "ranges"])
def test_the_c_backend_scans_long_rule_sets_from_its_table(shape):
    """Past about 1,600 rules the C backend's inline code no longer loads; a run of plain rules
    becomes entries of its rule table (codegen/c/table.py), whose loop the verifier checks
    once, whatever the run's length."""
    count = 20_000
    ruleset = parse(shapes.rules(shape, count), f"{shape}.rules")
    with ChainRunner(ruleset, shapes.INTERFACES, backend="c") as runner:
        program = runner.program("INPUT")
        assert len(program.source.table) == count
        assert program.stats is not None and program.stats.insns_processed < 5_000
        for position in ("first", "last", "none"):
            outcome = runner.run(frame_for(shapes.packet(shape, position)), "INPUT", "eth1")
            verdict, rule = shapes.decided_by(shape, count, position)
            assert (outcome.verdict, outcome.deciding) == (verdict, ("INPUT", rule))


@pytest.mark.bcc
@pytest.mark.parametrize("hook", ["chain", "ingress", "egress"])
def test_a_table_run_behind_a_conntrack_rule_loads_beside_the_tracker(hook):
    """The common firewall: established traffic first, then a long deny list. In the C the
    tracker and the rule table share one unit (their names must not clash) and, at ingress,
    one 512-byte stack with the FIB lookup."""
    from codegen.conntrack import TrackerMaps
    from codegen.tc.generator import COUNTERS_MAP
    from codegen.tc.layout import CounterLayout
    from harness.backends import load_program
    from harness.counters import CounterMap

    chain = "OUTPUT" if hook == "egress" else "INPUT"
    lines = shapes.rules("cidr", 2000).replace("-A INPUT", f"-A {chain}").splitlines()
    at = lines.index(":OUTPUT ACCEPT [0:0]") + 1
    lines.insert(at, f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    ruleset = parse("\n".join(lines) + "\n", "stateful-list.rules")
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
        TrackerMaps.create(1024) as tracker,
    ):
        program = load_program(
            ruleset,
            hook,
            interfaces=standin_interfaces(ruleset),
            maps={COUNTERS_MAP: counters, **tracker.maps},
            chain=chain if hook == "chain" else None,
            backend="c",
        )
        try:
            assert len(program.source.table) == 2000
            assert program.stats is not None and program.stats.insns_processed < 1_000_000
        finally:
            program.close()
