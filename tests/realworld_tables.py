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
    "02": {"-m set"},
    "03": {"-m addrtype"},
    "04": {"-m addrtype", "-m physdev", "-j MARK", "-j NFLOG"},
    "05": {"-m addrtype", "-m hashlimit", "-m recent"},
    "06": set(),
    "07": set(),
    "08": set(),
    "09": set(),
    "10": set(),
    "11": {"-m hashlimit", "-m owner", "-m policy"},
    "12": set(),
    "13": {"-j MARK"},
    "14": set(),
    "15": {"-m owner"},
    "16": {"-m addrtype"},
    "17": set(),
}
BACKEND_REFUSALS: dict[str, dict[str, str | None]] = {
    "01": {"bytecode": None, "c": None},
    "06": {"bytecode": None, "c": "'-j REJECT'"},
    "07": {"bytecode": None, "c": "'-j REJECT'"},
    "08": {"bytecode": None, "c": "'-j REJECT'"},
    "09": {"bytecode": None, "c": None},
    "10": {"bytecode": None, "c": "'-j REJECT'"},
    "12": {"bytecode": None, "c": None},
    "14": {"bytecode": "LOG", "c": "'-j LOG'"},
    "17": {"bytecode": None, "c": None},
}
assert set(BACKEND_REFUSALS) == {k for k, v in REFUSED_FEATURES.items() if not v}


def table(prefix: str) -> Path:
    """The real table numbered `prefix`; skips the test when ../shared is not beside us."""
    if not SHARED.is_dir():
        pytest.skip(f"the real tables are not here ({SHARED} is missing: CI has it)")
    (path,) = SHARED.glob(f"{prefix}_*.rules")
    return path
