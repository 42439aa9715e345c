"""`bpflab list` prints exactly what `iptables-legacy -L -n -x` (and with `-v`) prints for the
same table: every corpus file, loaded into netfilter, is the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.rules import parse
from harness.deploy.listing import list_table
from netns import Namespace
from tests.net.test_ipt_blob import CORPUS, restore

pytestmark = [pytest.mark.netns, pytest.mark.privileged]


@pytest.mark.parametrize("path", CORPUS, ids=[path.name for path in CORPUS])
def test_list_equals_iptables_list(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        verbose = ns.run(["iptables-legacy", "-L", "-v", "-n", "-x"]).stdout
        plain = ns.run(["iptables-legacy", "-L", "-n", "-x"]).stdout
    ruleset = parse(text, str(path))
    assert list_table(ruleset, verbose=True) == verbose
    assert list_table(ruleset, verbose=False) == plain
