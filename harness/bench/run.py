"""`bpflab bench`: per-packet cost, throughput, and load and update time against the rule count,
side by side with the bcc C backend, iptables-legacy and nftables; results as JSON, a Markdown
table and PNG plots.

The sections live in `testrun` (BPF_PROG_TEST_RUN), `traffic` (veth pairs, trafgen, the other
filters), `one_rule` (one rule added under `bpflab exec`, by apply, by iptables-legacy) and
`report` (Markdown, plots); `workload` is the rules and packets they share, `settings` what a
full or a quick run measures and `facts` the method, machine and tools recorded. This module
chooses what to run, puts the figures together with the machine and the method, writes the
files and, for the CLI, reports progress one line per step on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

# Only what the parser needs is imported here: `bpflab` builds every subcommand's parser on
# each run, and the measuring modules pull in the code generators.
from .facts import commit, machine, method, tool_versions
from .settings import (
    DEFAULT_SIZES,
    FULL,
    QUICK,
    QUICK_SIZES,
    SHAPE_SIZES,
    Progress,
    Settings,
)
from .shapes import MAX_SHAPE_RULES
from .workload import MAX_RULES, STATEFUL_POSITIONS

DEFAULT_OUTPUT = Path("bench/results")
RESULTS_JSON = "bench.json"
RESULTS_MARKDOWN = "bench.md"
# 2: the stateful workload's section; 3: the fixed cost (`fixed`); 4: one rule added and
# deleted (`one_rule`); 6: rule sets of real shapes (`shapes`); 7: their throughput over veth
# (`shape_throughput`)
SCHEMA = 8
# The stateful workload runs at the sizes up to this (the largest set that loads is stateless).
STATEFUL_LARGEST = 5000
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BenchError(Exception):
    """The bench cannot run here (privileges, tools), in one sentence."""


class StderrProgress:
    """One line per step, with the seconds since the bench started."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        self.stream.write(f"bench [{time.monotonic() - self.started:6.1f}s] {message}\n")
        self.stream.flush()


def _no_progress(message: str) -> None:
    pass


def missing_requirements() -> str | None:
    """None when the whole bench can run here, else what is missing."""
    from .. import environment
    from .traffic import missing_tools

    for probe in (
        environment.missing_bpf,
        environment.missing_bpffs,
        environment.missing_netns,
        missing_tools,
    ):
        if (reason := probe()) is not None:
            return reason
    return None


# The run ------------------------------------------------------------------------------------


def run_bench(settings: Settings, progress: Progress = _no_progress) -> dict:
    """Measure everything `settings` asks for and return the results (see the JSON's keys)."""
    if (reason := missing_requirements()) is not None:
        raise BenchError(reason)
    from .extensions import measure as measure_extensions
    from .log_rate import measure as measure_log_rate
    from .one_rule import measure as measure_one_rule
    from .shape_traffic import measure as measure_shape_traffic
    from .shaped import measure as measure_shapes
    from .stateful import per_packet as stateful_per_packet
    from .testrun import c_backend_problem, find_largest, time_floor
    from .traffic import FILTERS, TrafficBench, process_overhead

    clock = time.perf_counter
    started_at = datetime.now(UTC)
    started = clock()
    # Other work on the machine skews every figure: the load averages say how much there was.
    load_at_start = os.getloadavg()
    c_problem = c_backend_problem()
    backends = {
        "bytecode": {"available": True, "reason": None},
        "c": {"available": c_problem is None, "reason": c_problem},
    }
    if c_problem is not None:
        progress(f"backend c unavailable: {c_problem}")

    floor, floor_facts = time_floor(settings.testrun)
    progress(f"floor: empty program {floor.ns:.0f} ns per packet")
    fixed = _fixed(backends, settings, progress)
    extensions = measure_extensions(settings.testrun, progress)
    log_rate = measure_log_rate(progress)
    shapes = measure_shapes(
        settings.shape_sizes, settings.testrun, clock, progress, c_backend=c_problem is None
    )

    sizes = sorted(set(settings.sizes))
    largest = None
    if settings.largest:
        largest = find_largest(progress)
        sizes = sorted({*sizes, largest["rules"]})

    per_packet = _per_packet(sizes, backends, settings, clock, progress)

    stateful_sizes = [count for count in sizes if count <= STATEFUL_LARGEST]
    stateful = stateful_per_packet(stateful_sizes, backends, settings, clock, progress, per_packet)

    load: list[dict] = []
    throughput: list[dict] = []
    stateful_load: list[dict] = []
    stateful_throughput: list[dict] = []
    one_rule: list[dict] = []
    progress(f"throughput: building {len(FILTERS)} topologies (client and host over veth)")
    with TrafficBench() as traffic:
        overhead = process_overhead(traffic.receivers["none"].host)
        for count in sizes:
            figures = traffic.load(count, clock)
            load.append({"rules": count, "filters": figures})
            progress(
                f"load       {count:>6,} rules: "
                + ", ".join(
                    f"{name} {times['load_s']:.3f} s (update {times['update_s']:.3f} s)"
                    for name, times in figures.items()
                )
            )
            throughput += _throughput(traffic, count, ("last", "first"), settings, progress)
        for count in stateful_sizes:
            figures = traffic.load(count, clock, stateful=True)
            stateful_load.append({"rules": count, "filters": figures})
            stateful_throughput += _throughput(
                traffic, count, STATEFUL_POSITIONS, settings, progress
            )
        shape_throughput = measure_shape_traffic(
            traffic, settings.shape_sizes, settings, clock, progress
        )
        for count in settings.one_rule_sizes:
            one_rule.append(
                measure_one_rule(
                    count,
                    traffic.receivers["bytecode"],
                    traffic.receivers["iptables-legacy"],
                    trials=settings.one_rule_trials,
                    clock=clock,
                    progress=progress,
                )
            )

    return {
        "schema": SCHEMA,
        "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": clock() - started,
        "commit": commit(),
        "machine": machine(),
        "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())},
        "tools": tool_versions(),
        "options": {
            "quick": settings.quick,
            "sizes": list(settings.sizes),
            "largest": settings.largest,
            "one_rule_sizes": list(settings.one_rule_sizes),
            "shape_sizes": list(settings.shape_sizes),
        },
        "method": method(settings, overhead),
        "sizes": sizes,
        "backends": backends,
        "filters": list(FILTERS),
        "floor": {**floor.to_json(), "instructions": floor_facts.xlated_instructions},
        "fixed": fixed,
        "extensions": extensions,
        "log_rate": log_rate,
        "shapes": shapes,
        "shape_throughput": shape_throughput,
        "largest": largest,
        "per_packet": per_packet,
        "throughput": throughput,
        "load": load,
        "stateful": {
            "sizes": stateful_sizes,
            "per_packet": stateful,
            "throughput": stateful_throughput,
            "load": stateful_load,
        },
        "one_rule": one_rule,
    }


def _fixed(backends: dict[str, dict], settings: Settings, progress: Progress) -> list[dict]:
    """The whole programs' cost per case, for each backend that can run (bench/fixed.py)."""
    from .fixed import measure_fixed

    entries = []
    for backend, info in backends.items():
        if not info["available"]:
            continue
        entry = measure_fixed(settings.testrun, backend)  # type: ignore[arg-type]
        entries.append(entry)
        cases = ", ".join(f"{case} {ns:.0f}" for case, ns in entry["cases"].items())
        progress(
            f"fixed cost {backend:8}: {cases} ns; chain program {entry['chain_ns']:.0f} ns, "
            f"so {entry['fixed_ns']:.0f} ns before INPUT's first rule"
        )
    return entries


def _per_packet(
    sizes: list[int],
    backends: dict[str, dict],
    settings: Settings,
    clock: Callable[[], float],
    progress: Progress,
) -> list[dict]:
    from .testrun import measure_backend, not_loaded

    entries: list[dict] = []
    skip = {name: info["reason"] for name, info in backends.items() if not info["available"]}
    last_load: dict[str, tuple[int, float]] = {}
    for count in sizes:
        for backend in backends:
            reason = skip.get(backend)
            if reason is None and backend != "bytecode" and backend in last_load:
                # bcc's compile time grows about with the square of the rule count (6 s at
                # 1,000 rules, 24 s at 2,048, 122 s at 5,000 here): skip what would blow the
                # bench's time rather than wait for it.
                measured, seconds = last_load[backend]
                predicted = seconds * (count / measured) ** 2
                if predicted > settings.slow_load_budget_s:
                    reason = (
                        f"not tried: loading would take about {predicted:.0f} s "
                        f"({measured:,} rules took {seconds:.1f} s)"
                    )
            if reason is not None:
                entries.append(not_loaded(count, backend, reason))
                continue
            try:
                entry = measure_backend(count, backend, settings.testrun, clock)
            except Exception as error:
                if backend == "bytecode":
                    raise
                # Another engineer's backend, still being written: its failure is a figure.
                reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                entries.append(not_loaded(count, backend, reason))
                skip[backend] = f"not tried: {backend} failed at {count:,} rules"
                progress(f"per-packet {backend:8} {count:>6,} rules: failed ({reason})")
                continue
            entries.append(entry)
            last_load[backend] = (count, entry["load_s"])
            figures = entry["ns_per_packet"]
            progress(
                f"per-packet {backend:8} {count:>6,} rules: first {figures['first']:,.0f} ns, "
                f"last {figures['last']:,.0f} ns, no match {figures['none']:,.0f} ns; "
                f"{entry['instructions']:,} instructions, {entry['verifier_processed']:,} "
                f"processed, loaded in {entry['load_s']:.2f} s"
            )
    return entries


def _throughput(traffic, count: int, positions, settings: Settings, progress: Progress):
    """Every filter's rate for each kind of packet at `count` rules."""
    entries = []
    for position in positions:
        results = traffic.throughput(
            count,
            position,
            trials=settings.throughput_trials,
            warmup_s=settings.warmup_s,
            window_s=settings.window_s,
            progress=progress,
        )
        entries.append({"rules": count, "packet": position, "filters": results})
    return entries


# Output -------------------------------------------------------------------------------------


def write_results(results: dict, directory: Path) -> list[Path]:
    """Write the JSON, the Markdown and the plots into `directory`; return their paths."""
    from .report import markdown, plot

    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / RESULTS_JSON
    temporary = json_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, json_path)
    markdown_path = directory / RESULTS_MARKDOWN
    markdown_path.write_text(markdown(results))
    return [json_path, markdown_path, *plot(results, directory)]


# Command line -------------------------------------------------------------------------------


def _sizes_up_to(maximum: int) -> Callable[[str], tuple[int, ...]]:
    def sizes(text: str) -> tuple[int, ...]:
        try:
            sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of numbers"
            ) from None
        if not sizes or any(not 1 <= size <= maximum for size in sizes):
            raise argparse.ArgumentTypeError(f"rule counts must be between 1 and {maximum:,}")
        return sizes

    return sizes


_sizes = _sizes_up_to(MAX_RULES)


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    if args.sizes is not None:
        # Sizes picked by hand: the search for the largest only when asked for.
        settings = replace(settings, sizes=args.sizes, largest=False)
    if args.largest is not None:
        settings = replace(settings, largest=args.largest)
    if args.shape_sizes is not None:
        settings = replace(settings, shape_sizes=args.shape_sizes)
    return settings


def run(args: argparse.Namespace) -> int:
    from netns.namespace import NamespaceError

    from .report import PlotError
    from .testrun import BenchCheckFailed
    from .traffic import TrafficError

    try:
        results = run_bench(settings_from(args), StderrProgress())
        paths = write_results(results, args.output)
    except BenchCheckFailed as error:
        print(f"bpflab: bench: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (BenchError, TrafficError, NamespaceError, PlotError) as error:
        print(f"bpflab: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in paths:
        print(path)
    return EXIT_OK


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` to the CLI's subcommands."""
    description = (
        "measure per-packet cost (BPF_PROG_TEST_RUN), throughput over veth and load time "
        "against the rule count, beside the C backend, iptables-legacy and nftables; write "
        "JSON, a Markdown table and plots"
    )
    sub = commands.add_parser("bench", help=description, description=description)
    sub.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {', '.join(map(str, QUICK_SIZES))}, fewer trials and repeats, short "
        "windows: under a minute",
    )
    sub.add_argument(
        "--sizes",
        type=_sizes,
        metavar="N,N,...",
        help=f"rule counts to measure (default {','.join(map(str, DEFAULT_SIZES))} and the "
        "largest that loads)",
    )
    sub.add_argument(
        "--largest",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also find and measure the largest rule set that loads (default: on, except "
        "with --quick or --sizes)",
    )
    sub.add_argument(
        "--shape-sizes",
        type=_sizes_up_to(MAX_SHAPE_RULES),
        metavar="N,N,...",
        help="rule counts of the real-shape rule sets: CIDR deny list, mixed ACL, port ranges "
        f"(default {','.join(map(str, SHAPE_SIZES))}; {','.join(map(str, QUICK.shape_sizes))} "
        "with --quick)",
    )
    sub.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"where to write {RESULTS_JSON}, {RESULTS_MARKDOWN} and the plots "
        f"(default {DEFAULT_OUTPUT})",
    )
    sub.set_defaults(run=run)
    return sub
