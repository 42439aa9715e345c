"""Two pytest runs at once, each with two xdist workers, over packet scripts: names, pins,
rule-set state and iptables locks must not collide.

The scripts are four of tests/scripts (which the suite runs whole anyway), chosen for what two
runs share: each applies and flushes rule sets, two load netfilter twins (the xtables lock),
one tracks connections (the tracker's pins), one runs commands in the namespaces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = (
    "host_input_basic",
    "router_netfilter_both_ways",
    "router_stateful_connections",
    "host_commands",
)


def test_two_parallel_runs_do_not_collide(tmp_path):
    env = {**os.environ, "BPFLAB_ARTEFACTS": str(tmp_path / "artefacts")}
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-n",
        "2",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "bytecode",
        *(f"tests/scripts/{name}.toml" for name in SCRIPTS),
    ]
    runs = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output
        assert " passed" in output and "failed" not in output
