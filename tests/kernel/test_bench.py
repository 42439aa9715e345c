"""`bpflab bench`: the workload it measures, its options, and a smoke test of `--quick` that checks
what it writes (well-formed JSON with every section, the Markdown table, PNG plots). Timing is
measured by the bench, never asserted here."""

from __future__ import annotations

import argparse
import json

import pytest

from codegen.rules import parse
from codegen.rules.validation import validate
from harness.bench import extensions as bench_extensions
from harness.bench import run as bench
from harness.bench import shapes as bench_shapes
from harness.bench.workload import (
    FRAME_BYTES,
    MAX_RULES,
    WorkloadError,
    ethernet_frame,
    ip_packet,
    iptables_rules,
    matched_rule,
    nft_rules,
    source,
)
from harness.environment import require_privileged

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bpflab")
    bench.add_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_rules_are_distinct_and_parse_as_iptables_would():
    ruleset = parse(iptables_rules(300), "bench.rules")
    validate(ruleset)
    rules = ruleset.chains["INPUT"].rules
    assert len(rules) == 300
    assert ruleset.chains["INPUT"].policy == "DROP"
    assert len({str(source(i)) for i in range(MAX_RULES)}) == MAX_RULES
    assert not any(str(source(i)).startswith("198.18.") for i in range(0, MAX_RULES, 97))


def test_nft_rules_say_the_same_and_replace_in_one_file():
    text = nft_rules(3)
    assert "policy drop;" in text
    assert text.count(" accept") == 3
    assert "ip saddr 198.19.0.3 tcp dport 1002 accept" in text
    assert nft_rules(3, replace=True).startswith("flush table ip ")


@pytest.mark.parametrize(
    ("line", "nft"),
    [
        ("-A INPUT -s 10.0.0.0/8 -j DROP", "ip saddr 10.0.0.0/8 drop"),
        (
            "-A INPUT -s 1.2.3.0/24 -d 5.6.7.8/32 -i eth1 -p udp -m udp --dport 10:20 -j ACCEPT",
            'ip saddr 1.2.3.0/24 ip daddr 5.6.7.8/32 iifname "eth1" udp dport 10-20 accept',
        ),
        ("-A INPUT -p tcp -m tcp --dport 53 -j DROP", "tcp dport 53 drop"),
    ],
)
def test_shape_rules_say_the_same_for_nft(line, nft):
    assert bench_shapes._nft_rule(line) == nft


@pytest.mark.parametrize("shape", list(bench_shapes.SHAPES))
def test_a_shape_for_nft_keeps_every_rule_and_the_policy(shape):
    count = 40
    lines = [
        line
        for line in bench_shapes.rules(shape, count).splitlines()
        if line.startswith("-A INPUT")
    ]
    text = bench_shapes.nft_rules(shape, count)
    assert f"policy {bench_shapes.SHAPES[shape].policy.lower()};" in text
    if shape in bench_shapes.NFT_LISTS:  # every rule DROP on one field: one interval set
        (elements,) = [line for line in text.splitlines() if "elements = {" in line]
        values = elements.split("{", 1)[1].strip(" }").split(", ")
        listed = bench_shapes.sets(shape, count)
        if listed is None:
            assert values == [line.split()[-3].replace(":", "-") for line in lines]
        else:  # the set's members, as ipset holds them
            assert values == [line.split()[2] for line in listed.splitlines()[1:]]
            assert len(set(values)) == count and len(lines) == 1
        assert text.count(" drop") == 1
    else:
        assert text.count(" accept\n") + text.count(" drop\n") == count
    assert bench_shapes.nft_rules(shape, count, replace=True).startswith("flush table ip ")


@pytest.mark.parametrize("count", [0, MAX_RULES + 1])
def test_rule_counts_out_of_range_are_refused(count):
    with pytest.raises(WorkloadError):
        iptables_rules(count)


@pytest.mark.parametrize(
    "position, rule, source_index", [("first", 1, 0), ("last", 50, 49), ("none", None, 50)]
)
def test_packets_are_64_bytes_and_aimed_at_their_rule(position, rule, source_index):
    from ipaddress import IPv4Address

    from scapy.layers.inet import IP, TCP

    assert matched_rule(50, position) == rule
    packet = ip_packet(50, position, IPv4Address("198.18.0.2"))
    frame = ethernet_frame(
        packet, source_mac="02:00:c6:12:00:01", destination_mac="02:00:c6:12:00:02"
    )
    assert len(frame) == FRAME_BYTES
    parsed = IP(packet)
    assert parsed.src == str(source(source_index))
    assert parsed[TCP].dport == 1000 + source_index
    assert parsed[TCP].flags == "R"  # a RST to a closed port draws no answer


@pytest.mark.parametrize(
    "argv, sizes, largest",
    [
        ([], bench.DEFAULT_SIZES, True),
        (["--quick"], bench.QUICK_SIZES, False),
        (["--sizes", "5,50"], (5, 50), False),
        (["--sizes", "5", "--largest"], (5,), True),
        (["--no-largest"], bench.DEFAULT_SIZES, False),
    ],
)
def test_options_choose_sizes_and_the_largest_search(argv, sizes, largest):
    settings = bench.settings_from(_parser().parse_args(["bench", *argv]))
    assert (settings.sizes, settings.largest) == (sizes, largest)


@pytest.mark.parametrize(
    "argv, sizes",
    [
        ([], bench.SHAPE_SIZES),
        (["--quick"], bench.QUICK.shape_sizes),
        (["--quick", "--shape-sizes", "200000"], (200_000,)),
    ],
)
def test_shape_sizes_go_past_the_workloads_limit(argv, sizes):
    assert 200_000 > MAX_RULES
    assert bench.settings_from(_parser().parse_args(["bench", *argv])).shape_sizes == sizes


@pytest.mark.parametrize("text", ["0", "a,b", "", f"{MAX_RULES + 1}"])
def test_bad_sizes_are_refused_by_the_parser(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["bench", "--sizes", text])
    assert exit_info.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def _require_bench_tools() -> None:
    """Skip (fail under BPFLAB_REQUIRE_PRIVILEGED=1) without trafgen, iptables, nft or
    matplotlib: the markers cover privileges, not these."""
    from harness.bench.traffic import missing_tools

    reason = missing_tools()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reason = reason or "matplotlib is not installed: pip install -r requirements-bench.txt"
    if reason is None:
        return
    if require_privileged():
        pytest.fail(f"BPFLAB_REQUIRE_PRIVILEGED=1 but the bench cannot run: {reason}")
    pytest.skip(reason)


@pytest.mark.privileged
@pytest.mark.netns
@pytest.mark.bcc
def test_quick_bench_writes_json_markdown_and_plots(tmp_path, capsys):
    _require_bench_tools()
    args = _parser().parse_args(["bench", "--quick", "--output", str(tmp_path)])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    assert "per-packet bytecode" in captured.err  # the progress display, one line per step

    results = json.loads((tmp_path / bench.RESULTS_JSON).read_text())
    assert results["schema"] == bench.SCHEMA
    assert {"kernel", "cpu_model", "cores"} <= results["machine"].keys()
    assert {"workload", "per_packet", "throughput", "load", "parameters"} <= results[
        "method"
    ].keys()
    sizes = list(bench.QUICK_SIZES)
    assert results["sizes"] == sizes
    assert results["options"]["quick"] is True
    assert results["largest"] is None
    assert isinstance(results["floor"]["ns"], float) and results["floor"]["repeat"] >= 1000
    # The whole programs, per case and backend; each case was checked to go where it says
    # (the bench stops otherwise), so these are the paths they name.
    assert [entry["backend"] for entry in results["fixed"]] == [
        name for name, info in results["backends"].items() if info["available"]
    ]
    for entry in results["fixed"]:
        cases = {"local", "forwarded", "martian", "fragment", "output", "bridged"}
        assert set(entry["cases"]) == cases
        assert entry["fixed_ns"] == entry["cases"]["local"] - entry["chain_ns"]
        assert all(ns > 0 for ns in entry["cases"].values())
    assert "## Fixed cost" in (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    # One rule of each extension, each checked to end where its case says (the bench stops
    # otherwise); the LOG that fires had room for every event, the one on a full ring none.
    extensions = {entry["case"]: entry for entry in results["extensions"]}
    assert list(extensions) == [case.name for case in bench_extensions.CASES]
    assert all(entry["ns"] > 0 for entry in extensions.values())
    assert extensions["-j LOG, firing"]["log_drops"] == 0
    assert extensions["-j LOG, ring full (event dropped)"]["log_drops"] > 0
    # REJECT's answer replaces the packet: timed one run per call, so every run builds one
    # (repeats would time the answer going through the chain), against a baseline timed alike.
    # LOG events through the ring, read as `bpflab log --follow` reads them: at twice the
    # reader's rate the ring overflows and counts the loss, well below it far less is lost
    # (none on a quiet machine).
    log_rate = results["log_rate"]
    assert log_rate["held"] > 0 and log_rate["reader_events_per_s"] > 0
    slow, *_, fast = log_rate["runs"]
    assert slow["arrived"] > 0 and fast["dropped"] > slow["dropped"]
    assert (
        "## LOG events through the ring buffer" in (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    )
    reject = extensions["-j REJECT (answer built)"]
    assert reject["one_shot"] and reject["repeat"] == 1
    # -m owner runs in OUTPUT's chain program, against OUTPUT's bare rule.
    owned = [entry for name, entry in extensions.items() if name.startswith("-m owner")]
    assert len(owned) == 3 and all(entry["chain"] == "OUTPUT" for entry in owned)
    assert reject["added_ns"] == reject["ns"] - reject["baseline_ns"]
    assert (
        "## What one rule of each extension adds" in (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    )
    # Each shape at each size, each packet checked to be decided by the rule it is aimed at
    # (the bench stops otherwise); the whole rule set applied twice.
    assert [(entry["shape"], entry["rules"]) for entry in results["shapes"]] == [
        (shape, count) for shape in bench_shapes.SHAPES for count in bench.QUICK.shape_sizes
    ]
    for entry in results["shapes"]:
        assert all(ns > 0 for ns in entry["ns_per_packet"].values())
        assert entry["apply_s"] > entry["parse_s"] > 0 and entry["reapply_s"] > 0
        assert all(hook["verifier_processed"] > 0 for hook in entry["hooks"].values())
        # The C backend's chain program on the same packets (bcc is here: the test needs it).
        assert all(ns > 0 for ns in entry["c"]["ns_per_packet"].values())
    markdown = (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    assert "## Rule sets of real shapes" in markdown
    assert "The C backend (bcc) on the same rule sets" in markdown
    # The same shapes over veth: every filter loaded them twice and delivered the packet the
    # shape accepts after every rule (the bench stops otherwise); one panel per shape.
    assert [(e["shape"], e["rules"]) for e in results["shape_throughput"]] == [
        (shape, count) for shape in bench_shapes.SHAPES for count in bench.QUICK.shape_sizes
    ]
    for entry in results["shape_throughput"]:
        assert set(entry["load"]) == {"bytecode", "iptables-legacy", "nftables"}
        assert all(
            times["load_s"] > 0 and times["update_s"] > 0 for times in entry["load"].values()
        )
        assert all(figures["best_pps"] > 0 for figures in entry["filters"].values())
    assert (
        "## Rule sets of real shapes over veth" in (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    )
    assert (tmp_path / "shape_throughput.png").stat().st_size > 0

    backends = results["backends"]
    assert backends["bytecode"]["available"] is True
    assert set(backends) == {"bytecode", "c"}
    assert (backends["c"]["reason"] is None) == backends["c"]["available"]
    for count in sizes:
        for backend in backends:
            (entry,) = [
                e for e in results["per_packet"] if e["rules"] == count and e["backend"] == backend
            ]
            assert set(entry["ns_per_packet"]) == {"first", "last", "none"}
            if backend == "bytecode":
                assert entry["loaded"] and entry["error"] is None
            if entry["loaded"]:
                assert entry["instructions"] > 0 and entry["verifier_processed"] > 0
                for position in ("first", "last", "none"):
                    timing = entry["timing"][position]
                    assert len(timing["trials"]) == bench.QUICK.testrun.trials
                    assert timing["ns"] == entry["ns_per_packet"][position]
            else:
                assert entry["error"] and entry["ns_per_packet"]["first"] is None

    filters = ["none", "bytecode", "iptables-legacy", "nftables"]
    assert results["filters"] == filters
    assert sorted((e["rules"], e["packet"]) for e in results["throughput"]) == sorted(
        (count, position) for count in sizes for position in ("first", "last")
    )
    for entry in results["throughput"]:
        assert list(entry["filters"]) == filters
        for name, figures in entry["filters"].items():
            assert {"pps", "ratio", "best_pps", "offered_trials"} <= figures.keys()
            assert len(figures["trials"]) == bench.QUICK.throughput_trials
            # Not a speed check: every packet matches an ACCEPT rule, so a filter that
            # delivered nothing would be dropping what it must accept.
            assert all(delivered > 0 for delivered in figures["trials"]), (name, entry)
    for entry in results["load"]:
        assert set(entry["filters"]) == {"bytecode", "iptables-legacy", "nftables"}
        for figures in entry["filters"].values():
            assert isinstance(figures["load_s"], float) and isinstance(figures["update_s"], float)

    # One rule added and deleted, three ways: each -D found the rule its -A added (iptables
    # exits 1 otherwise and the bench stops), so these figures are of commands that worked.
    assert [entry["rules"] for entry in results["one_rule"]] == list(bench.QUICK.one_rule_sizes)
    for entry in results["one_rule"]:
        for way in ("exec", "apply", "iptables"):
            for change in ("add", "delete"):
                name = f"{way}_{change}_s"
                assert entry[name] > 0 and len(entry["trials"][name]) == bench.QUICK.one_rule_trials
        assert entry["exec_over_apply"] == entry["exec_add_s"] / entry["apply_add_s"]

    markdown = (tmp_path / bench.RESULTS_MARKDOWN).read_text()
    assert "| rules |" in markdown and "## Throughput" in markdown
    assert "## One rule added to a big table" in markdown
    for png in ("ns_per_packet.png", "throughput.png", "load_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE
    printed = captured.out.split()
    assert str(tmp_path / bench.RESULTS_JSON) in printed
