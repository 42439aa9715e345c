"""The bench's results as a Markdown table and PNG plots (matplotlib, without a display)."""

from __future__ import annotations

from pathlib import Path

# The modern bpfilter project's published BPF_PROG_TEST_RUN figures (rules before the drop,
# nanoseconds per packet), drawn beside ours for scale.
BPFILTER_PUBLISHED = ((1, 94.0), (512, 1900.0), (2048, 13700.0))
FILTER_LABELS = {
    "none": "no filter",
    "bytecode": "bpflab TC (bytecode)",
    "iptables-legacy": "iptables-legacy",
    "nftables": "nftables",
}
FILTER_COLOURS = {
    "none": "tab:blue",
    "bytecode": "tab:orange",
    "iptables-legacy": "tab:green",
    "nftables": "tab:red",
    "c": "tab:purple",
}
POSITION_LABELS = {"first": "first rule", "last": "last rule", "none": "no match (DROP)"}
PLOTS = {
    "ns_per_packet": "ns_per_packet.png",
    "throughput": "throughput.png",
    "load_time": "load_time.png",
}


class PlotError(Exception):
    """The plots cannot be drawn here (matplotlib missing)."""


def _ns(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.2f} us" if value >= 10_000 else f"{value:,.0f} ns"


def _mpps(entry: dict | None) -> str:
    if entry is None or entry.get("pps") is None:
        return "n/a"
    text = f"{entry['pps'] / 1e6:.3f}"
    if entry.get("ratio") is not None:
        text += f" ({entry['ratio']:.0%})"
    return text


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(row) for row in rows), ""]


def _short(reason: str) -> str:
    """The verifier's last word, not the whole way there."""
    return reason.rsplit(" / ", 1)[-1]


def markdown(results: dict) -> str:
    from .extensions import report_lines as extensions_lines
    from .log_rate import report_lines as log_rate_lines
    from .one_rule import report_lines as one_rule_lines
    from .shape_traffic import report_lines as shape_traffic_lines
    from .shaped import report_lines as shape_lines

    machine = results["machine"]
    load = results.get("load_average", {}).get("start")
    lines = [
        "# bpflab bench",
        "",
        f"{results['started']}; {machine['cpu_model']}, {machine['cores']} cores"
        + (" (virtual machine)" if machine.get("virtual_machine") else "")
        + f", Linux {machine['kernel']}; commit {results.get('commit') or 'unknown'}"
        + (f"; load average {load[0]:.2f} at the start" if load else "")
        + ("; quick run" if results["options"]["quick"] else "")
        + ".",
        "",
    ]
    sizes = results["sizes"]
    per_packet = results["per_packet"]
    backends = list(results["backends"])
    positions = ("first", "last", "none")
    lines += [
        "## Per-packet cost (BPF_PROG_TEST_RUN, median per packet)",
        "",
        f"The INPUT chain program; a 64-byte TCP packet matching the first rule, only the last "
        f"rule, or no rule (policy DROP). An empty program costs {_ns(results['floor']['ns'])}.",
        "",
    ]
    header = ["rules"] + [
        f"{backend}: {POSITION_LABELS[position]}" for backend in backends for position in positions
    ]
    rows = []
    for count in sizes:
        row = [f"{count:,}"]
        for backend in backends:
            entry = _find(per_packet, count, backend)
            row += [_ns(entry["ns_per_packet"][p]) if entry else "n/a" for p in positions]
        rows.append(row)
    lines += _table(header, rows)

    lines += _fixed(results)

    header = ["rules"]
    for backend in backends:
        header += [
            f"{backend}: instructions (xlated)",
            f"{backend}: verifier processed",
            f"{backend}: generate + load",
        ]
    rows = []
    for count in sizes:
        row = [f"{count:,}"]
        for backend in backends:
            entry = _find(per_packet, count, backend)
            row += [
                _count(entry and entry["instructions"]),
                _count(entry and entry["verifier_processed"]),
                _seconds(entry["load_s"]) if entry else "n/a",
            ]
        rows.append(row)
    lines += _table(header, rows)
    for name, info in results["backends"].items():
        if not info["available"]:
            lines += [f"Backend `{name}` unavailable: {info['reason']}", ""]
            continue
        failures = [e for e in per_packet if e["backend"] == name and not e["loaded"]]
        untried = [e["rules"] for e in failures if e["error"].startswith("not tried")]
        for entry in failures:
            if entry["rules"] not in untried:
                lines += [f"- Backend `{name}`, {entry['rules']:,} rules: {_short(entry['error'])}"]
        if untried:
            counts = ", ".join(f"{count:,}" for count in untried)
            lines += [f"- Backend `{name}` not tried at {counts} rules."]
        if failures:
            lines.append("")
    largest = results.get("largest")
    if largest:
        refused = (
            f"; {largest['refused_at']:,} are refused: {_short(largest['refusal'])}"
            if largest.get("refused_at")
            else ""
        )
        lines += [
            f"Largest rule set that loads (bytecode): {largest['rules']:,} rules, "
            f"{largest['verifier_processed']:,} instructions processed by the verifier{refused}.",
            "",
        ]

    lines += extensions_lines(results)
    lines += log_rate_lines(results)
    lines += shape_lines(results)
    lines += shape_traffic_lines(results)
    filters = results["filters"]
    lines += [
        "## Throughput across a veth pair (Mpps delivered, median over rounds; in brackets the "
        "median ratio to no filter in the same round)",
        "",
    ]
    for position in ("last", "first"):
        lines += [f"Traffic matching the {POSITION_LABELS[position]}:", ""]
        rows = []
        for count in sizes:
            entry = _find_throughput(results["throughput"], count, position)
            rows.append(
                [f"{count:,}"]
                + [_mpps(entry["filters"].get(name) if entry else None) for name in filters]
            )
        lines += _table(["rules"] + [FILTER_LABELS[name] for name in filters], rows)

    lines += _stateful(results)
    lines += ["## Load and update time", ""]
    header = [
        "rules",
        "bpflab apply",
        "re-apply (atomic swap)",
        "iptables-legacy-restore",
        "again (replace)",
        "nft -f",
        "again (one transaction)",
    ]
    rows = []
    for count in sizes:
        entry = next((e for e in results["load"] if e["rules"] == count), None)
        row = [f"{count:,}"]
        for name in ("bytecode", "iptables-legacy", "nftables"):
            figures = entry["filters"].get(name, {}) if entry else {}
            row += [_seconds(figures.get("load_s")), _seconds(figures.get("update_s"))]
        rows.append(row)
    lines += _table(header, rows)
    lines += one_rule_lines(results)
    lines += _aims(results)
    lines += ["Method: `method` in the JSON file beside this one.", ""]
    return "\n".join(lines)


STATEFUL_LABELS = {"established": "established flow", "new": "new flow (last rule)"}


FIXED_CASES = {
    "local": "local (INPUT)",
    "forwarded": "forwarded (FORWARD)",
    "martian": "martian",
    "fragment": "later fragment",
    "output": "output (egress)",
    "bridged": "bridged (port egress)",
}


def _fixed(results: dict) -> list[str]:
    """The whole programs' cost before any rule (bench/fixed.py), per backend."""
    entries = results.get("fixed") or []
    if not entries:
        return []
    lines = [
        "## Fixed cost (BPF_PROG_TEST_RUN, the whole programs, one rule)",
        "",
        "The ingress program on a local, a forwarded, a martian packet and a later fragment, "
        "the egress program on a packet made here, beside the INPUT chain program alone: the "
        "fixed cost is what the ingress program adds in front of INPUT's first rule.",
        "",
    ]
    header = ["backend", *FIXED_CASES.values(), "chain program", "fixed cost"]
    rows = [
        [
            entry["backend"],
            *(_ns(entry["cases"].get(case)) for case in FIXED_CASES),
            _ns(entry["chain_ns"]),
            _ns(entry["fixed_ns"]),
        ]
        for entry in entries
    ]
    return lines + _table(header, rows)


def _stateful(results: dict) -> list[str]:
    """The stateful workload: per-packet cost beside the stateless first-rule cost, and
    throughput for each filter with its conntrack on."""
    stateful = results.get("stateful")
    if not stateful or not stateful["sizes"]:
        return []
    backends = list(results["backends"])
    lines = [
        "## Stateful workload (`--ctstate RELATED,ESTABLISHED -j ACCEPT` first)",
        "",
        "Per packet under BPF_PROG_TEST_RUN, INPUT chain program; beside it the stateless "
        "workload's first-rule packet at the same size:",
        "",
    ]
    header = ["rules"]
    for backend in backends:
        header += [f"{backend}: {label}" for label in STATEFUL_LABELS.values()]
        header.append(f"{backend}: stateless, first rule")
    rows = []
    for count in stateful["sizes"]:
        row = [f"{count:,}"]
        for backend in backends:
            entry = _find(stateful["per_packet"], count, backend)
            row += [_ns(entry["ns_per_packet"][p]) if entry else "n/a" for p in STATEFUL_LABELS]
            stateless = _find(results["per_packet"], count, backend)
            row.append(_ns(stateless["ns_per_packet"]["first"]) if stateless else "n/a")
        rows.append(row)
    lines += _table(header, rows)
    filters = results["filters"]
    for position, label in STATEFUL_LABELS.items():
        lines += [f"Throughput, {label} (Mpps, ratio to no filter):", ""]
        rows = []
        for count in stateful["sizes"]:
            entry = _find_throughput(stateful["throughput"], count, position)
            rows.append(
                [f"{count:,}"]
                + [_mpps(entry["filters"].get(name) if entry else None) for name in filters]
            )
        lines += _table(["rules"] + [FILTER_LABELS[name] for name in filters], rows)
    return lines


def _aims(results: dict) -> list[str]:
    """The figures DESIGN.md sets aims for, next to them."""
    found = []
    for entry in results["throughput"]:
        if entry["rules"] == 5000 and entry["filters"]["bytecode"]["ratio"] is not None:
            found.append(
                f"- Throughput at 5,000 rules, traffic matching the "
                f"{POSITION_LABELS[entry['packet']]}: {entry['filters']['bytecode']['ratio']:.0%} "
                "of no filter (aim: at least 95%)."
            )
    drop = _find(results["per_packet"], 2048, "bytecode")
    if drop is not None:
        found.append(
            f"- A drop after 2,048 rules: {_ns(drop['ns_per_packet']['none'])} under "
            "BPF_PROG_TEST_RUN (modern bpfilter publishes 13.7 us)."
        )
    both = [
        (count, bytecode, c)
        for count in results["sizes"]
        if (bytecode := _find(results["per_packet"], count, "bytecode"))
        and (c := _find(results["per_packet"], count, "c"))
    ]
    if both:
        count, bytecode, c = both[-1]
        found.append(
            f"- Against C compiled by clang (bcc), {count:,} rules, last rule: bytecode "
            f"{_ns(bytecode['ns_per_packet']['last'])}, C {_ns(c['ns_per_packet']['last'])} "
            "(aim: bytecode cheaper)."
        )
    return ["## Against the aims of DESIGN.md", "", *found, ""] if found else []


def _find(entries: list[dict], count: int, backend: str) -> dict | None:
    for entry in entries:
        if entry["rules"] == count and entry["backend"] == backend and entry["loaded"]:
            return entry
    return None


def _find_throughput(entries: list[dict], count: int, position: str) -> dict | None:
    for entry in entries:
        if entry["rules"] == count and entry["packet"] == position:
            return entry
    return None


def plot(results: dict, directory: Path) -> list[Path]:
    """Draw the plots into `directory`; return their paths."""
    try:
        import matplotlib
    except ImportError as error:
        raise PlotError(
            "matplotlib is not installed: pip install -r requirements-bench.txt"
        ) from error
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    paths = []
    sizes = results["sizes"]
    title = (
        f"{results['machine']['cpu_model']}, {results['machine']['cores']} cores, "
        f"Linux {results['machine']['kernel']}"
    )

    figure, axes = plt.subplots(figsize=(8, 5.5))
    # Colour says where the packet matches, the line says which backend: "last" and "no
    # match" cost the same, so the latter is drawn small and dashed on top.
    markers = {"first": ("o", 7, "tab:green"), "last": ("s", 7, "tab:red"), "none": ("^", 4, "k")}
    lines_of = {"bytecode": "-", "c": "-."}
    for backend, info in results["backends"].items():
        if not info["available"]:
            continue
        for position in ("first", "last", "none"):
            points = [
                (count, entry["ns_per_packet"][position])
                for count in sizes
                if (entry := _find(results["per_packet"], count, backend))
                and entry["ns_per_packet"][position] is not None
            ]
            if points:
                marker, size, colour = markers[position]
                axes.plot(
                    *zip(*points, strict=True),
                    marker=marker,
                    markersize=size,
                    color=colour,
                    linestyle="--" if position == "none" else lines_of.get(backend, ":"),
                    linewidth=1 if position == "none" else 1.8,
                    label=f"{backend}: {POSITION_LABELS[position]}",
                )
    if results["floor"]["ns"]:
        axes.axhline(
            results["floor"]["ns"], color="grey", linestyle=":", label="empty program (floor)"
        )
    axes.plot(
        *zip(*BPFILTER_PUBLISHED, strict=True),
        "kx",
        markersize=9,
        label="modern bpfilter, published (drop)",
    )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rules")
    axes.set_ylabel("ns per packet (BPF_PROG_TEST_RUN, median)")
    axes.set_title(f"Per-packet cost\n{title}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / PLOTS["ns_per_packet"])
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    # Top: the rates; bottom: each filter's rate over no filter's in the same round, which the
    # machine's drift between rounds does not move.
    figure, panels = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True, sharey="row")
    highest = 0.0
    for column, position in enumerate(("last", "first")):
        for row, (key, scale) in enumerate((("pps", 1e6), ("ratio", 0.01))):
            axes = panels[row][column]
            for name in results["filters"]:
                points = [
                    (count, entry["filters"][name][key] / scale)
                    for count in sizes
                    if (entry := _find_throughput(results["throughput"], count, position))
                    and entry["filters"].get(name, {}).get(key) is not None
                ]
                if points:
                    axes.plot(
                        *zip(*points, strict=True),
                        "o-",
                        color=FILTER_COLOURS[name],
                        label=FILTER_LABELS[name],
                    )
                    if key == "pps":
                        highest = max(highest, *(mpps for _, mpps in points))
            axes.set_xscale("log")
            axes.grid(True, which="both", alpha=0.3)
        panels[0][column].set_title(
            f"traffic matching the {POSITION_LABELS[position]}", fontsize=10
        )
        panels[1][column].set_xlabel("rules")
    # From zero: the drop a filter causes is read as a fraction of the height.
    panels[0][0].set_ylim(0, highest * 1.1 or 1)
    panels[1][0].set_ylim(0, 115)
    panels[0][0].set_ylabel("Mpps delivered (64-byte frames over veth, median)")
    panels[1][0].set_ylabel("% of no filter (same round, median)")
    panels[0][0].legend(fontsize=8)
    figure.suptitle(f"Throughput\n{title}", fontsize=10)
    figure.tight_layout()
    paths.append(directory / PLOTS["throughput"])
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(8, 5))
    for name in ("bytecode", "iptables-legacy", "nftables"):
        for kind, style in (("load_s", "o-"), ("update_s", "s--")):
            points = [
                (entry["rules"], entry["filters"][name][kind])
                for entry in results["load"]
                if entry["filters"].get(name, {}).get(kind) is not None
            ]
            if points:
                what = "load" if kind == "load_s" else "update"
                axes.plot(
                    *zip(*points, strict=True),
                    style,
                    color=FILTER_COLOURS[name],
                    label=f"{FILTER_LABELS[name]}: {what}",
                )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rules")
    axes.set_ylabel("seconds")
    axes.set_title(f"Load and atomic update time\n{title}", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    paths.append(directory / PLOTS["load_time"])
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    from .shape_traffic import plot as plot_shapes

    paths += plot_shapes(results, directory, plt, title)
    return paths
