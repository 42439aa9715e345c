"""The iptables project's own test vectors (extensions/*.t, kept beside this checkout in
../shared/iptables-tests, not in the project) for the families whose every line we claim:
each OK line must save as the vector says, each FAIL line must be refused.

A vector line is `RULE;RESULT;OK|FAIL`, RESULT `=` meaning RULE itself (iptables-test.py's
format; see the SOURCE file there). The vectors are iptables 1.8.13's: where 1.8.9, the
version this project is checked against, is laxer (it takes `--ctproto 0`, and ranges whose
first value is above their last), we refuse as the vectors say.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.rules import RuleError, parse, write
from codegen.rules.extensions.set import bind_sets
from codegen.rules.sets import SetTable

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "iptables-tests"
FILES = (
    "libxt_conntrack.t",
    "libipt_conntrack.t",
    "libxt_state.t",
    "libipt_REJECT.t",
    "libipt_LOG.t",
    "libxt_NFLOG.t",
    "libxt_limit.t",
    "libxt_addrtype.t",
    "libxt_MARK.t",
    "libxt_mark.t",
    "libxt_hashlimit.t",
    "libxt_set.t",
    "libxt_recent.t",
    "libipt_recent.t",
    "libxt_physdev.t",
    "libxt_policy.t",
    "libipt_policy.t",
)
BUILTIN = ("INPUT", "FORWARD", "OUTPUT")
# Lines of a file for a feature this project refuses on purpose, by what the rule holds: each
# must be refused (RuleError, one sentence) instead of saving as the vector says.
UNCLAIMED: dict[str, tuple[str, ...]] = {}


def _vectors() -> list:
    found = []
    for name in FILES:
        path = VECTORS / name
        if not path.is_file():
            continue
        chain: str | None = "INPUT"
        table = "filter"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith(":"):
                # None: chains of other tables only (POSTROUTING), whose lines are not ours.
                chain = next((c for c in line[1:].split(",") if c in BUILTIN), None)
                continue
            if line.startswith("*"):
                table = line[1:]
                continue
            fields = line.split(";")
            if table != "filter" or chain is None:
                continue
            marks = []
            if len(fields) != 3:  # a result for the legacy or nft variant only
                marks = [pytest.mark.skip(reason="a line for one iptables variant only")]
            rule, result, verdict = (fields + ["", ""])[:3]
            if verdict == "OK" and any(part in rule for part in UNCLAIMED.get(name, ())):
                verdict = "UNCLAIMED"
            found.append(
                pytest.param(
                    chain, rule, result, verdict, id=f"{name}:{number}: {rule}", marks=marks
                )
            )
    return found


CASES = _vectors()


def test_the_vectors_are_there() -> None:
    if not VECTORS.is_dir():
        pytest.skip(f"no iptables test vectors at {VECTORS} (they sit beside the lab's checkout)")
    missing = [name for name in FILES if not (VECTORS / name).is_file()]
    assert not missing, f"vector files missing from {VECTORS}: {missing}"
    assert len(CASES) >= 50


@pytest.mark.skipif(not CASES, reason=f"no iptables test vectors at {VECTORS}")
@pytest.mark.parametrize(("chain", "rule", "result", "verdict"), CASES or [("", "", "", "")])
def test_vector(chain: str, rule: str, result: str, verdict: str) -> None:
    text = f"*filter\n-A {chain} {rule}\nCOMMIT\n"
    if verdict in ("FAIL", "UNCLAIMED"):
        with pytest.raises(RuleError):
            # The vectors run where no ipset exists: a rule naming one is refused when the
            # rules are bound to the (here empty) sets, as iptables refuses it.
            bind_sets(parse(text, "vector"), SetTable())
        return
    assert verdict == "OK", f"a verdict this test does not know: {verdict!r}"
    expected = rule if result == "=" else result
    assert f"-A {chain} {expected}" in write(parse(text, "vector")).splitlines()
