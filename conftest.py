"""Test policy shared by every test directory.

Tests that need root, BPF, bpffs, namespaces, llvm-mc or bcc carry a marker (see pyproject.toml).
Where the capability is missing they skip with a one-line reason, except under
BPFLAB_REQUIRE_PRIVILEGED=1 (CI), where that skip is a failure: CI must run every test.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from harness.environment import PROBES, require_privileged

# Fixed seed and a modest number of examples in CI; more locally; many more on demand.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile(
    "deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, probe in PROBES.items():
        if item.get_closest_marker(marker) is None:
            continue
        reason = probe()
        if reason is None:
            continue
        if require_privileged():
            pytest.fail(f"BPFLAB_REQUIRE_PRIVILEGED=1 but {marker} test cannot run: {reason}")
        pytest.skip(reason)
