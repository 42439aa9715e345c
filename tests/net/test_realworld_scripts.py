"""Packet scripts over the real tables (tests/realworld/*.toml, each naming its table in
../shared/realworld by `rules_file`): real connections and crafted packets, in every backend
that loads the table (tests/realworld_tables.py), agree with what the scripts say and with the
netfilter twin where they say `netfilter`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.lab.replay import replay
from harness.lab.scripts import load_script
from tests.realworld_tables import BACKEND_REFUSALS, table

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "realworld").glob("*.toml"))
TABLE = re.compile(r"realworld/(\d\d)_")


def _cases() -> list[tuple[Path, str]]:
    cases = []
    for script in SCRIPTS:
        found = TABLE.search(script.read_text())
        assert found is not None, f"{script.name} names no real table"
        for backend, refusal in BACKEND_REFUSALS[found.group(1)].items():
            if refusal is None:
                cases.append((script, backend))
    return cases


CASES = _cases()


def test_every_table_that_loads_in_the_bytecode_backend_has_a_script_or_a_reason() -> None:
    scripted = {TABLE.search(script.read_text()).group(1) for script in SCRIPTS}  # type: ignore[union-attr]
    # Their traffic would only meet the policy: pod networks (10.244/16, 172.7/16, k3s's
    # 10.42/16 behind rules that name each pod), docker0,
    # marks set in mangle; the NAT-only OpenVPN table opens one UDP port to everything.
    # Tailscale's (13) marks and accepts only what comes in on tailscale0, a device the labs'
    # topologies do not have (tests/net/test_mark_vs_netfilter.py runs its pattern).
    unscripted = {"01", "04", "12", "13", "17"}
    loading = {prefix for prefix, refusals in BACKEND_REFUSALS.items() if not refusals["bytecode"]}
    assert loading - scripted == unscripted


@pytest.mark.parametrize(("script", "backend"), CASES, ids=[f"{s.stem}-{b}" for s, b in CASES])
def test_a_real_table_agrees_with_netfilter(script: Path, backend: str) -> None:
    if backend == "c":
        pytest.importorskip("bcc", reason="the C backend needs bcc")
    table(TABLE.search(script.read_text()).group(1))  # type: ignore[union-attr]
    report = replay(load_script(script), backend=backend)  # type: ignore[arg-type]
    assert report.ok, report.render()
