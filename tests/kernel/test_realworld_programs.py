"""The real tables the rule layer takes (tests/realworld_tables.py): both programs of each
backend load into the kernel's verifier, through `bpflab verify`, or the backend refuses the
table for the reason listed."""

from __future__ import annotations

import pytest

from harness.cli import main
from tests.realworld_tables import BACKEND_REFUSALS, SETS, table

pytestmark = pytest.mark.privileged

CASES = [(prefix, backend) for prefix in sorted(BACKEND_REFUSALS) for backend in ("bytecode", "c")]


@pytest.mark.parametrize(("prefix", "backend"), CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_both_programs_load_or_the_backend_says_why(prefix, backend, capsys, tmp_path) -> None:
    if backend == "c":
        pytest.importorskip("bcc", reason="the C backend needs bcc")
    path = table(prefix)
    sets = []
    if prefix in SETS:  # the ipsets its -m set rules name
        (tmp_path / "sets").write_text(SETS[prefix])
        sets = ["--sets", str(tmp_path / "sets")]
    status = main(["verify", str(path), "--backend", backend, *sets])
    out, err = capsys.readouterr()
    refusal = BACKEND_REFUSALS[prefix][backend]
    if refusal is None:
        assert status == 0, err
        assert out.count(": accepted;") == 2, out
    else:
        assert status == 2, out
        assert refusal in err and err.count("\n") == 1, err
