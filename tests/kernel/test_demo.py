"""The built-in demonstration (`make demo`) and the CLI's handling of a missing privilege."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.demo import run_demo

pytestmark = pytest.mark.privileged


def test_demo_prints_every_verdict_and_agrees_with_itself():
    lines: list[str] = []
    assert run_demo(lines.append) == 0
    verdicts = [line.split()[0] for line in lines if line.endswith("[ok]")]
    assert verdicts == ["drop", "pass", "pass", "pass", "pass"]
    assert any(line.strip().startswith("Verifier: accepted") for line in lines)
    assert lines[-1].strip() == "Counters (per-CPU array, summed): pass=4 drop=1"


def test_unprivileged_demo_is_one_sentence_and_exit_2():
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "harness.cli",
            "demo",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "bpflab: error: needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN): run with sudo"
    )
