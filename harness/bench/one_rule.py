"""One rule added to a big table and taken out again, three ways: the unmodified
`iptables-legacy -A`/`-D` under `bpflab exec`, `bpflab apply` of the same table with and without
the rule, and `iptables-legacy -A`/`-D` on the kernel's own table.

Every figure is a whole command as a user types it, timed from its start to its exit:
`bpflab exec` and `bpflab apply` as `python -m harness.cli` (the interpreter's start and imports
included, as they are for a user), iptables-legacy through `ip netns exec`. Under `bpflab exec`
iptables reads the table (GET_INFO, GET_ENTRIES), adds its rule and sends the whole table back
(SET_REPLACE), which bpflab compiles, verifies and swaps in as `apply` does; so exec costs an
apply plus the reading and decoding of the table.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .report import _seconds, _table
from .settings import Progress
from .traffic import Receiver
from .workload import iptables_rules, port, source

PROJECT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT = 600.0


class OneRuleError(Exception):
    """A command of the one-rule measurement failed: what it was and what it said."""


def extra_rule(count: int) -> list[str]:
    """The rule after the workload's `count` rules, as iptables arguments after the chain."""
    return [
        "-s", f"{source(count)}/32", "-p", "tcp", "-m", "tcp",
        "--dport", str(port(count)), "-j", "ACCEPT",
    ]  # fmt: skip


def _timed(argv: list[str], clock: Callable[[], float]) -> float:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    started = clock()
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=PROJECT,
        env=environment,
        check=False,
    )
    elapsed = clock() - started
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        raise OneRuleError(
            f"`{' '.join(argv)}` exited with {result.returncode}: {said[-1] if said else ''}"
        )
    return elapsed


def _bpflab(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


def measure(
    count: int,
    bpflab_receiver: Receiver,
    iptables_receiver: Receiver,
    *,
    trials: int,
    clock: Callable[[], float] = time.perf_counter,
    progress: Progress,
) -> dict:
    """Median seconds of each way of adding (and deleting) one rule at the end of INPUT
    holding `count` rules. The two receivers (bpflab's and iptables-legacy's) are emptied
    first and hold the `count` rules afterwards."""
    from ..deploy.lifecycle import apply

    rule = extra_rule(count)
    samples: dict[str, list[float]] = {
        name: []
        for name in (
            "exec_add_s",
            "exec_delete_s",
            "apply_add_s",
            "apply_delete_s",
            "iptables_add_s",
            "iptables_delete_s",
        )
    }
    with tempfile.TemporaryDirectory(prefix="bpflab-") as directory:
        base = Path(directory) / f"{count}.rules"
        base.write_text(iptables_rules(count))
        more = Path(directory) / f"{count + 1}.rules"
        more.write_text(iptables_rules(count + 1))
        bpflab_host, iptables_host = bpflab_receiver.host, iptables_receiver.host
        bpflab_receiver.clear()
        apply(base.read_text(), str(base), bpflab_host.name)
        bpflab_receiver.loaded = True
        iptables_receiver.clear()
        iptables_host.run(["iptables-legacy-restore", str(base)], timeout=COMMAND_TIMEOUT)
        iptables_receiver.loaded = True
        under_exec = _bpflab("exec", "--netns", bpflab_host.name, "--", "iptables-legacy")
        on_kernel = ["ip", "netns", "exec", iptables_host.name, "iptables-legacy"]
        for trial in range(trials):
            # Each pair leaves the table as it found it: `count` rules.
            samples["exec_add_s"].append(_timed([*under_exec, "-A", "INPUT", *rule], clock))
            samples["exec_delete_s"].append(_timed([*under_exec, "-D", "INPUT", *rule], clock))
            apply_cli = _bpflab("apply", "--netns", bpflab_host.name)
            samples["apply_add_s"].append(_timed([*apply_cli, str(more)], clock))
            samples["apply_delete_s"].append(_timed([*apply_cli, str(base)], clock))
            samples["iptables_add_s"].append(_timed([*on_kernel, "-A", "INPUT", *rule], clock))
            samples["iptables_delete_s"].append(_timed([*on_kernel, "-D", "INPUT", *rule], clock))
            progress(
                f"one rule   {count:>6,} rules, trial {trial + 1}/{trials}: "
                f"exec -A {samples['exec_add_s'][-1]:.2f} s, "
                f"apply {samples['apply_add_s'][-1]:.2f} s, "
                f"iptables-legacy -A {samples['iptables_add_s'][-1] * 1000:.0f} ms"
            )
    entry: dict = {"rules": count}
    for name, values in samples.items():
        entry[name] = statistics.median(values)
    entry["trials"] = {
        name: [round(value, 4) for value in values] for name, values in samples.items()
    }
    entry["exec_over_apply"] = entry["exec_add_s"] / entry["apply_add_s"]
    return entry


def report_lines(results: dict) -> list[str]:
    """One rule appended and deleted (bench/one_rule.py): exec, apply, iptables-legacy."""
    entries = results.get("one_rule") or []
    if not entries:
        return []
    lines = [
        "## One rule added to a big table, and deleted",
        "",
        "Whole commands as a user types them: the unmodified `iptables-legacy -A INPUT ...` "
        "(and `-D`) under `bpflab exec`, `bpflab apply` of the table with the rule (and "
        "without), and iptables-legacy on the kernel's table.",
        "",
    ]
    header = [
        "rules",
        "exec: iptables -A",
        "exec: iptables -D",
        "bpflab apply (+1)",
        "bpflab apply (-1)",
        "exec -A / apply",
        "iptables-legacy -A",
        "iptables-legacy -D",
    ]
    rows = [
        [
            f"{entry['rules']:,}",
            _seconds(entry["exec_add_s"]),
            _seconds(entry["exec_delete_s"]),
            _seconds(entry["apply_add_s"]),
            _seconds(entry["apply_delete_s"]),
            f"{entry['exec_over_apply']:.2f}x",
            _seconds(entry["iptables_add_s"]),
            _seconds(entry["iptables_delete_s"]),
        ]
        for entry in entries
    ]
    return lines + _table(header, rows)
