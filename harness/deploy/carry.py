"""Counters carried over from the rule set running to the one an apply puts in its place, by
rule identity: chain, rule text (as iptables-save writes it) and which repeat of that text in
its chain, so that a rule keeps its counters wherever it moved and whatever changed around it.
The old layout and identities come from the state file (harness.deploy.state): the old rules
need no parsing.
"""

from __future__ import annotations

import os
from collections import Counter

from codegen.bpf.maps import Map
from codegen.bpf.syscall import BpfError
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import Ruleset
from codegen.tc.layout import CounterLayout, Position

from ..counters import CounterMap
from .state import fault, pin_dir


def identities_of(ruleset: Ruleset, layout: CounterLayout) -> dict[tuple, Position]:
    """Rule identity for carrying counters over: chain, rule text and which repeat of it."""
    seen: Counter[tuple[str, str]] = Counter()
    identities: dict[tuple, Position] = {}
    for position in layout.positions:
        chain, index = position
        if isinstance(index, int):
            text = write_rule(chain, ruleset.chains[chain].rules[index - 1])
            seen[(chain, text)] += 1
            identities[(chain, text, seen[(chain, text)])] = position
        else:
            identities[position] = position
    return identities


def carry_over(previous: dict, identities: dict[tuple, Position], counters: CounterMap) -> int:
    """Copy the running counters of rules that are still there (by identity) into `counters`.
    The old layout and identities come from the state file: no need to parse the old rules."""
    pins = pin_dir(previous["netns"])
    try:
        old_map = Map.from_pin(str(pins / "counters"))
    except BpfError:
        return 0
    old_layout = CounterLayout(tuple(_position(p) for p in previous["positions"]))
    with old_map, CounterMap(old_layout, fd=os.dup(old_map.fd)) as old:
        values = old.read()
    fault("during-carry")
    carried = {}
    for key, position in previous["identities"]:
        new_position = identities.get(_position(key))
        if new_position is not None and _position(position) in values:
            carried[new_position] = values[_position(position)]
    counters.write(carried)
    return sum(1 for position in carried if isinstance(position[1], int))


def _position(saved: list) -> tuple:
    """A position or identity back from JSON, where tuples became lists."""
    return tuple(saved)


def identities_replaced(previous: dict, changes: list) -> dict[tuple, Position] | None:
    """The identities of the previous state's rules with `changes` (harness.deploy.patch:
    chain, index, new rule) made, without writing every rule's text again; None where a
    changed rule's old or new text repeats in its chain (the repeats' numbers would move)."""
    count: Counter[tuple[str, str]] = Counter()
    identities: dict[tuple, Position] = {}
    for key, position in previous["identities"]:
        identities[_position(key)] = _position(position)
        if len(key) == 3:
            count[(key[0], key[1])] += 1
    by_position = {position: key for key, position in identities.items()}
    for change in changes:
        old_key = by_position.get((change.chain, change.index))
        text = write_rule(change.chain, change.new)
        if old_key is None or count[old_key[:2]] != 1 or count[(change.chain, text)]:
            return None
        count[(change.chain, text)] += 1
        del identities[old_key]
        identities[(change.chain, text, 1)] = (change.chain, change.index)
    return identities
