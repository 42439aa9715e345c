"""The corpus through iptables-legacy itself: what iptables-legacy-save prints for a loaded file
is what our parser and writer print for it, and `bpflab import` (the blob read) prints it too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codegen.rules import parse, write
from codegen.rules.extensions import extension_of
from codegen.rules.model import IP_PART
from netns import Namespace
from tests.net.test_ipt_blob import CORPUS, EXTENSION_EXAMPLES, restore, save

pytestmark = [pytest.mark.netns, pytest.mark.privileged]


@pytest.mark.parametrize("path", CORPUS, ids=[path.name for path in CORPUS])
def test_parse_then_write_equals_iptables_legacy_save(path: Path, tmp_path: Path) -> None:
    text = path.read_text()
    ours = write(parse(text, str(path))).splitlines()
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        assert save(ns) == ours
        imported = subprocess.run(
            [sys.executable, "-m", "harness.cli", "import", "--netns", ns.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        assert imported.stdout.splitlines() == ours


def test_every_extension_example_writes_as_iptables_legacy_save(tmp_path: Path) -> None:
    """Each family's `save`, and its `as_saved` for what iptables-legacy-save cannot print
    (`--tcp-flags NONE FIN`, `! --dport 0:65535`), against iptables-legacy-save itself."""
    ruleset = parse(EXTENSION_EXAMPLES, "examples")
    for rule in ruleset["INPUT"].rules:
        shown = (m if isinstance(m, IP_PART) else extension_of(m).as_saved(m) for m in rule.matches)
        rule.matches = tuple(match for match in shown if match is not None)
    ours = write(ruleset).splitlines()
    with Namespace() as ns:
        restore(ns, EXTENSION_EXAMPLES, tmp_path)
        assert save(ns) == ours
