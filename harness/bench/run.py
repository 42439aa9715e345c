"""`bpflab bench`: per-packet cost, throughput, and load and update time against the rule count,
side by side with the bcc C backend, iptables-legacy and nftables; results as JSON, a Markdown
table and PNG plots.

The sections live in `testrun` (BPF_PROG_TEST_RUN), `traffic` (veth pairs, trafgen, the other
filters) and `report` (Markdown, plots); `workload` is the rules and packets they share and
`settings` what a full or a quick run measures. This module chooses what to run, puts the
figures together with the machine and the method, writes the files and, for the CLI, reports
progress one line per step on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

# Only what the parser needs is imported here: `bpflab` builds every subcommand's parser on
# each run, and the measuring modules pull in the code generators.
from .settings import DEFAULT_SIZES, FULL, QUICK, QUICK_SIZES, Progress, Settings
from .workload import FRAME_BYTES, MAX_RULES, POSITIONS, STATEFUL_POSITIONS

DEFAULT_OUTPUT = Path("bench/results")
RESULTS_JSON = "bench.json"
RESULTS_MARKDOWN = "bench.md"
SCHEMA = 3  # 2: the stateful workload's section; 3: the fixed cost (`fixed`)
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

    return {
        "schema": SCHEMA,
        "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": clock() - started,
        "commit": _commit(),
        "machine": machine(),
        "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())},
        "tools": tool_versions(),
        "options": {
            "quick": settings.quick,
            "sizes": list(settings.sizes),
            "largest": settings.largest,
        },
        "method": method(settings, overhead),
        "sizes": sizes,
        "backends": backends,
        "filters": list(FILTERS),
        "floor": {**floor.to_json(), "instructions": floor_facts.xlated_instructions},
        "fixed": fixed,
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


def method(settings: Settings, overhead_s: float) -> dict:
    testrun = settings.testrun
    return {
        "workload": (
            "N rules `-A INPUT -s <distinct /32 in 198.19.0.0/16> -p tcp -m tcp --dport <distinct "
            "port from 1000> -j ACCEPT`, INPUT policy DROP. Test packets: 64-byte Ethernet frames, "
            "IPv4/TCP with the RST flag and 10 bytes of payload, matching the first rule, only the "
            "last rule, or no rule (the policy drops it)."
        ),
        "per_packet": (
            "The INPUT chain program (hook `chain`, with its per-rule counters) of each backend "
            "under BPF_PROG_TEST_RUN with an __sk_buff context of a unicast packet; the kernel's "
            f"mean ns per run over `repeat` runs is one trial; median of {testrun.trials} trials. "
            f"repeat is {testrun.repeat:,} unless a trial would exceed {testrun.budget_s} s "
            "(estimated from a 1,000-run probe): then as many as fit in that budget, at least "
            "1,000 (see `repeat` beside each figure). Each program is first checked to decide "
            "every test packet as the workload says. The floor is a program of two instructions "
            "(r0 = TC_ACT_OK; exit) on the same frame. instructions = the kernel's xlated count; "
            "verifier_processed = bpf_prog_info.verified_insns; load_s = generate, compile and "
            "verify."
        ),
        "stateful": (
            "The same N rules for UDP behind `-m conntrack --ctstate RELATED,ESTABLISHED -j "
            "ACCEPT` (nftables: `ct state established,related accept`; netfilter's conntrack on "
            "for both). established: a datagram answering one the host sent first (OUTPUT), "
            "decided by the first rule; new: a datagram to the last rule's source and port, "
            "never answered, so NEW every time. Test-run: the INPUT and OUTPUT chain programs "
            "of one table; throughput: the host writes first through a real socket before each "
            "window of established traffic."
        ),
        "largest": (
            "Verifier processed instructions at 1,000 and 5,000 rules fit a line that predicts "
            "where the budget of 1,000,000 runs out; loads of the chain and the ingress program "
            "around the prediction, in steps of 1%, find the largest that loads (its next step "
            "is refused)."
        ),
        "throughput": (
            "Four client/host namespace pairs over veth (offloads off, permanent neighbours), "
            "one per filter: none, bpflab's TC programs (`lifecycle.apply` on the host's eth0, "
            "ingress and egress), iptables-legacy's filter INPUT chain, an nftables "
            "`type filter hook input` chain, each holding the same N rules. trafgen (netsniff-ng) "
            "in the client sends one frame in a loop from one process (PACKET_MMAP ring, qdisc "
            "bypassed); veth processes the receive on the sending CPU, so the rate reflects send "
            "plus receive cost. Counted at the receiver: Ip InDelivers of the host namespace "
            "(packets past every filter, handed to TCP, which discards a RST to a closed port "
            f"without answering). After {settings.warmup_s} s of warm-up, the delivered count "
            f"over a {settings.window_s} s window is one trial; {settings.throughput_trials} "
            "trials per filter, the filters alternated within each round (order rotated each "
            "round). pps: the median over rounds; ratio: the median over rounds of the filter's "
            "rate divided by no filter's rate in the same round (the machine's speed drifts "
            "between rounds; pairing cancels most of it); ratio_of_medians and best_pps beside "
            "it. `offered_trials` is the client's transmit rate over the same windows."
        ),
        "load": (
            "Into a receiver holding no rules (flushed first): `lifecycle.apply` in process "
            "(parse, generate, verify, attach ingress and egress with tcx links, pin), "
            "`iptables-legacy-restore FILE` and `nft -f FILE` through `ip netns exec` "
            f"(whose own cost, median {overhead_s * 1000:.1f} ms, is included). Update: the same "
            "rule set applied again over the loaded one: apply's atomic link swap with counter "
            "carry-over, iptables-legacy-restore's table replace, nft -f of `flush table` plus "
            "the rules in one transaction."
        ),
        "parameters": {
            "frame_bytes": FRAME_BYTES,
            "testrun_trials": testrun.trials,
            "testrun_repeat": testrun.repeat,
            "testrun_budget_s": testrun.budget_s,
            "throughput_trials": settings.throughput_trials,
            "warmup_s": settings.warmup_s,
            "window_s": settings.window_s,
            "process_overhead_s": overhead_s,
            "positions": list(POSITIONS),
        },
    }


def machine() -> dict:
    cpu_model = "unknown"
    hypervisor = False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model == "unknown":
                cpu_model = value.strip()
            if key.strip() == "flags" and " hypervisor" in f" {value}":
                hypervisor = True
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "kernel_build": platform.version(),
        "architecture": platform.machine(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "virtual_machine": hypervisor,
        "python": platform.python_version(),
    }


def _first_line(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def tool_versions() -> dict:
    return {
        "trafgen": _first_line(["trafgen", "--version"]),
        "iptables": _first_line(["iptables-legacy", "--version"]),
        "nft": _first_line(["nft", "--version"]),
    }


def _commit() -> str | None:
    return _first_line(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
    )


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


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not sizes or any(not 1 <= size <= MAX_RULES for size in sizes):
        raise argparse.ArgumentTypeError(f"rule counts must be between 1 and {MAX_RULES}")
    return sizes


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else FULL
    if args.sizes is not None:
        # Sizes picked by hand: the search for the largest only when asked for.
        settings = replace(settings, sizes=args.sizes, largest=False)
    if args.largest is not None:
        settings = replace(settings, largest=args.largest)
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
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        metavar="DIR",
        help=f"where to write {RESULTS_JSON}, {RESULTS_MARKDOWN} and the plots "
        f"(default {DEFAULT_OUTPUT})",
    )
    sub.set_defaults(run=run)
    return sub
