"""Throughput over veth for the rule sets of real shapes (bench/shapes.py), against
iptables-legacy and nftables, and each filter's load and re-load time.

Per shape and size, every filter of traffic.TrafficBench holds the same rule set: our programs
(`apply`), iptables-legacy (`iptables-legacy-restore` of the same text, after `ipset restore`
of the set shape's set) and nftables (the ACL rule for rule; each list shape as one rule over an
interval set, shapes.nft_rules). The packet is the one each shape lets through only after
trying every rule: for the deny lists (CIDRs, port ranges, the set) the packet no rule or member
matches, accepted by the policy; for the ACL the packet its last rule accepts. Rates are
measured as traffic.TrafficBench.rates measures them, against no filter in the same round; a
filter that delivers nothing has dropped what its rules accept, and the section stops there
(BenchCheckFailed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .settings import Progress, Settings
from .shapes import SHAPES, nft_rules, packet, rules, sets
from .testrun import BenchCheckFailed
from .traffic import FILTERS, RuleSetTexts, TrafficBench

PLOT = "shape_throughput.png"
# The packet each shape accepts only after every rule was tried (shapes.decided_by).
THROUGH = {"cidr": "none", "acl": "last", "ranges": "none", "set": "none"}


def measure(
    traffic: TrafficBench,
    sizes: tuple[int, ...],
    settings: Settings,
    clock: Callable[[], float],
    progress: Progress,
) -> list[dict]:
    """Every shape at every size, smallest first: load times and rates per filter."""
    entries = []
    for shape in SHAPES:
        position = THROUGH[shape]
        for count in sorted(sizes):
            texts = RuleSetTexts(
                f"{shape}-{count}",
                rules(shape, count),
                nft_rules(shape, count),
                nft_rules(shape, count, replace=True),
                sets(shape, count),
            )
            load = traffic.load_texts(texts, clock)
            progress(
                f"shape load {shape:7} {count:>7,} rules: "
                + ", ".join(
                    f"{name} {times['load_s']:.2f} s (again {times['update_s']:.2f} s)"
                    for name, times in load.items()
                )
            )
            frames = {
                name: traffic.receivers[name].framed(packet(shape, position)) for name in FILTERS
            }
            rates = traffic.rates(
                frames,
                f"{shape} {count:>7,} rules, {position} packet",
                trials=settings.throughput_trials,
                warmup_s=settings.warmup_s,
                window_s=settings.window_s,
                progress=progress,
            )
            silent = [name for name, rate in rates.items() if not rate["best_pps"]]
            if silent:
                raise BenchCheckFailed(
                    f"{', '.join(silent)} delivered none of the {shape} shape's {position} "
                    f"packets at {count:,} rules, which the rules accept"
                )
            entries.append(
                {"shape": shape, "rules": count, "packet": position, "load": load, "filters": rates}
            )
    return entries


def report_lines(results: dict) -> list[str]:
    """The shapes' throughput table (bench/shape_traffic.py)."""
    from .report import _table

    entries = results.get("shape_throughput") or []
    if not entries:
        return []
    lines = [
        "## Rule sets of real shapes over veth",
        "",
        "Packets delivered across a veth pair as a share of the unfiltered rate in the same "
        "round (median of the rounds), for the packet each shape accepts after trying every "
        "rule; load and load again (the atomic update), seconds. nftables: the ACL rule for "
        "rule, each list as one rule over an interval set.",
        "",
    ]
    rows = []
    for entry in entries:
        rates, load = entry["filters"], entry["load"]
        rows.append(
            [
                entry["shape"],
                f"{entry['rules']:,}",
                entry["packet"],
                f"{rates['none']['pps'] / 1e6:.3f} Mpps",
                *(_share(rates[name]["ratio"]) for name in FILTERS[1:]),
                *(
                    f"{load[name]['load_s']:.2f} / {load[name]['update_s']:.2f} s"
                    for name in FILTERS[1:]
                ),
            ]
        )
    header = [
        "shape",
        "rules",
        "packet",
        "no filter",
        *FILTERS[1:],
        *(f"load, again: {name}" for name in FILTERS[1:]),
    ]
    return [*lines, *_table(header, rows), ""]


def _share(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.0%}"


def plot(results: dict, directory: Path, plt, title: str) -> list[Path]:
    """One panel per shape: each filter's share of the unfiltered rate against the rules."""
    from .report import FILTER_COLOURS, FILTER_LABELS

    entries = results.get("shape_throughput") or []
    shapes = [shape for shape in SHAPES if any(entry["shape"] == shape for entry in entries)]
    if not shapes:
        return []
    figure, panels = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 4.5), squeeze=False)
    for axes, shape in zip(panels[0], shapes, strict=True):
        mine = sorted((e for e in entries if e["shape"] == shape), key=lambda e: e["rules"])
        for name in FILTERS[1:]:
            points = [(e["rules"], e["filters"][name]["ratio"] * 100) for e in mine]
            axes.plot(*zip(*points, strict=True), "o-", color=FILTER_COLOURS[name],
                      label=FILTER_LABELS[name])  # fmt: skip
        axes.set_xscale("log")
        axes.set_ylim(0, 110)
        axes.set_xlabel("rules")
        axes.set_ylabel("% of the unfiltered rate")
        axes.set_title(f"{shape}: {SHAPES[shape].summary}\n{THROUGH[shape]} packet", fontsize=9)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"Throughput over veth, rule sets of real shapes\n{title}", fontsize=10)
    figure.tight_layout()
    path = directory / PLOT
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [path]
