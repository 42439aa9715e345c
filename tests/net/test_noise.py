"""scripts/noise, the noise job `make test-noisy` runs beside the suite: what it creates is its
own (`nz` namespaces, never `bl`), it sends traffic that conntrack tracks inside them, and it
leaves nothing behind however it ends: stopped, at its own deadline, or killed without its trap.

Each test runs a job of its own (its own state directory, so a `make test-noisy` job running
meanwhile is another one), without busy loops and without touching the host-wide
nf_log_all_netns, so the suite's other tests do not feel it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from harness.lab.waiting import until
from netns.namespace import NETNS_DIR, process_start_time

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

NOISE = Path(__file__).resolve().parents[2] / "scripts" / "noise"
QUIET = {"NOISE_CPUS": "0", "NOISE_NF_LOG": "0"}
GONE_WAIT = 60.0  # seconds a job may take to notice its deadline or its main process's end


def noise(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **QUIET, "NOISE_STATE_ROOT": str(state)}
    return subprocess.run(
        ["bash", str(NOISE), *args], capture_output=True, text=True, timeout=120, env=env
    )


def started(state: Path, seconds: int) -> int:
    result = noise(state, "start", str(seconds))
    try:
        assert result.returncode == 0, result.stderr
        pid = int((state / "current").read_text().split()[0])
        assert f"running as pid {pid}" in result.stdout
    except BaseException:
        noise(state, "stop")
        raise
    return pid


def namespaces_of(pid: int) -> set[str]:
    return {name for name in os.listdir(NETNS_DIR) if name.startswith(f"nz{pid}")}


def in_namespace(name: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def workers_of(state: Path, pid: int) -> list[tuple[int, int]]:
    lines = (state / str(pid) / "workers").read_text().split("\n")
    return [(int(p), int(t)) for p, t in (line.split() for line in lines if line)]


def test_the_job_runs_tracked_traffic_in_its_own_namespaces_and_removes_them(
    tmp_path: Path,
) -> None:
    pid = started(tmp_path, 120)
    try:
        a, b = f"nz{pid}a", f"nz{pid}b"
        assert {a, b} <= namespaces_of(pid)
        # Datagrams from a reach b's INPUT, where conntrack sees them.
        tracked = until(
            lambda: int(in_namespace(b, "conntrack", "-C").strip() or 0), lambda n: n > 0
        )
        assert tracked > 0
        listing = in_namespace(b, "iptables-legacy", "-w", "10", "-L", "INPUT", "-n")
        assert "ctstate RELATED,ESTABLISHED" in listing
        seen: set[str] = set()

        def forwarding() -> set[str]:
            seen.add(in_namespace(b, "cat", "/proc/sys/net/ipv4/ip_forward").strip())
            return seen

        # Changed inside its namespace, back and forth.
        assert until(forwarding, lambda seen: len(seen) == 2) == {"0", "1"}
        workers = workers_of(tmp_path, pid)
        assert len(workers) == 6  # no busy loop, no nf_log_all_netns loop
    finally:
        stopped = noise(tmp_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("noise: ran "), stopped.stdout
    assert stopped.stdout.rstrip().endswith("its namespaces deleted"), stopped.stdout
    assert "udp-" in stopped.stdout and "iptables " in stopped.stdout
    assert namespaces_of(pid) == set()
    assert process_start_time(pid) is None
    assert all(process_start_time(p) != t for p, t in workers)
    assert noise(tmp_path, "stop").stdout == "noise: no noise job is running.\n"


def test_the_job_ends_itself_at_its_deadline(tmp_path: Path) -> None:
    pid = started(tmp_path, 3)
    try:
        until(lambda: process_start_time(pid), lambda t: t is None, timeout=GONE_WAIT)
        assert process_start_time(pid) is None
        summary = (tmp_path / str(pid) / "summary").read_text()
        assert summary.rstrip().endswith("its namespaces deleted"), summary
        assert namespaces_of(pid) == set()
    finally:
        noise(tmp_path, "stop")


def test_stop_cleans_up_after_a_job_killed_without_its_trap(tmp_path: Path) -> None:
    pid = started(tmp_path, 120)
    try:
        workers = workers_of(tmp_path, pid)
        os.kill(pid, signal.SIGKILL)
        until(lambda: process_start_time(pid), lambda t: t is None)
        assert namespaces_of(pid)  # what the trap would have deleted
    finally:
        stopped = noise(tmp_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {pid} ended without cleaning up" in stopped.stdout
    # Its loops are gone too, so nothing creates a namespace again after the cleanup.
    alive = until(
        lambda: [p for p, t in workers if process_start_time(p) == t],
        lambda alive: not alive,
        timeout=GONE_WAIT,
    )
    assert alive == []
    assert namespaces_of(pid) == set()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "soon"], "noise: error: SECONDS must be a whole number from 1 to 99999"),
        (["run", "0"], "noise: error: SECONDS must be a whole number from 1 to 99999"),
        (["stop", "now"], "usage: scripts/noise start [SECONDS] | stop | run [SECONDS]"),
        (["restart"], "usage: scripts/noise start [SECONDS] | stop | run [SECONDS]"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = noise(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "current").exists()
