"""The 17 real filter tables of ../shared/realworld (ufw's, Docker's, kube-proxy's, firewalld's,
Shorewall's, ...: what users bring), and what this project does with each today.

They are read from beside the project, never copied into it: CI has them, a user's clone may
not, and there the tests that need them skip with that reason. The expectations are a ratchet:
a table that stops loading fails, and so does one whose gap closed (update the entry, and the
README's list of which real tables load).
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "realworld"

# What the rule layer refuses in each table (every refused line, by the feature it names), and
# for the tables it takes, whether each backend loads both programs (None) or what it refuses.
REFUSED_FEATURES: dict[str, set[str]] = {
    "01": set(),
    "02": set(),
    "03": set(),
    "04": set(),
    "05": set(),
    "06": set(),
    "07": set(),
    "08": set(),
    "09": set(),
    "10": set(),
    "11": set(),
    "12": set(),
    "13": set(),
    "14": set(),
    "15": set(),
    "16": set(),
    "17": set(),
}
BACKEND_REFUSALS: dict[str, dict[str, str | None]] = {
    "01": {"bytecode": None, "c": None},
    "02": {"bytecode": None, "c": None},
    "03": {"bytecode": None, "c": None},
    "04": {"bytecode": None, "c": None},
    "05": {"bytecode": None, "c": None},
    "06": {"bytecode": None, "c": None},
    "07": {"bytecode": None, "c": None},
    "08": {"bytecode": None, "c": None},
    "09": {"bytecode": None, "c": None},
    "10": {"bytecode": None, "c": None},
    "11": {"bytecode": None, "c": None},
    "12": {"bytecode": None, "c": None},
    "13": {"bytecode": None, "c": None},
    "14": {"bytecode": None, "c": None},
    "15": {"bytecode": None, "c": None},
    "16": {"bytecode": None, "c": None},
    "17": {"bytecode": None, "c": None},
}
assert set(BACKEND_REFUSALS) == {k for k, v in REFUSED_FEATURES.items() if not v}
# The ipsets a table's -m set rules name, as `ipset save` prints them (`bpflab verify --sets`):
# Docker 28 keeps the subnets of its bridges (bridge1's and docker0's in table 02) in
# docker-ext-bridges-v4.
SETS: dict[str, str] = {
    "02": "create docker-ext-bridges-v4 hash:net family inet hashsize 1024 maxelem 65536\n"
    "add docker-ext-bridges-v4 192.0.2.0/24\n"
    "add docker-ext-bridges-v4 172.17.0.0/16\n",
}


def table(prefix: str) -> Path:
    """The real table numbered `prefix`; skips the test when ../shared is not beside us."""
    if not SHARED.is_dir():
        pytest.skip(f"the real tables are not here ({SHARED} is missing: CI has it)")
    (path,) = SHARED.glob(f"{prefix}_*.rules")
    return path
