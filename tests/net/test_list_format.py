"""`bpflab list` prints exactly what `iptables-legacy -L -n -x` (and with `-v`) prints for the
same table: every corpus file and every registered extension's examples, loaded into
netfilter, are the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.rules import parse
from harness.deploy.listing import list_table
from netns import Namespace
from tests.net.test_ipt_blob import CORPUS, EXTENSION_EXAMPLES, restore

pytestmark = [pytest.mark.netns, pytest.mark.privileged]


CASES = [pytest.param(path.read_text(), path.name, id=path.name) for path in CORPUS] + [
    pytest.param(EXTENSION_EXAMPLES, "examples", id="extension-examples")
]


@pytest.mark.parametrize(("text", "name"), CASES)
def test_list_equals_iptables_list(text: str, name: str, tmp_path: Path) -> None:
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        verbose = ns.run(["iptables-legacy", "-L", "-v", "-n", "-x"]).stdout
        plain = ns.run(["iptables-legacy", "-L", "-n", "-x"]).stdout
    ruleset = parse(text, name)
    assert list_table(ruleset, verbose=True) == verbose
    assert list_table(ruleset, verbose=False) == plain
