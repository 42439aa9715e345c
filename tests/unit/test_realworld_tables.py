"""What the rule layer makes of each real table (tests/realworld_tables.py): every line it
refuses names a feature listed for that table, and every listed feature is refused somewhere."""

from __future__ import annotations

import re

import pytest

from codegen.rules import validate
from codegen.rules.iptables_save import ParseError, parse_dump
from tests.realworld_tables import REFUSED_FEATURES, table

FEATURE = re.compile(r"match '(-m [\w-]+)' is not supported|target '([\w-]+)' is not supported")


def refused_features(error: ParseError) -> set[str]:
    """The features named by each refused line of a ParseError (ParseErrors: all its lines)."""
    features = set()
    for one in getattr(error, "errors", (error,)):
        found = FEATURE.search(one.message)
        assert found is not None, f"a refusal that names no unsupported feature: {one}"
        features.add(found.group(1) or f"-j {found.group(2)}")
    return features


@pytest.mark.parametrize("prefix", sorted(REFUSED_FEATURES))
def test_the_rule_layer_refuses_exactly_the_features_it_lacks(prefix: str) -> None:
    path = table(prefix)
    try:
        dump = parse_dump(path.read_text(), str(path))
    except ParseError as error:
        assert refused_features(error) == REFUSED_FEATURES[prefix]
        return
    validate(dump.ruleset)
    assert REFUSED_FEATURES[prefix] == set(), "the table parses: its entry is out of date"
