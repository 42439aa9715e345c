"""Rules of a classified run replaced in place (codegen.tc.classifier_patch), without a kernel:
after any number of patches, the lookup finds for every key what a scan of the rules as they
are now finds, on the trees and on the list of all rules."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from codegen.tc import classifier as C
from codegen.tc import classifier_patch as P
from tests.unit.test_classifier import INTERFACES, _key, _rule, run_rules

ROOM = 20_000


def _tables(entries):
    tables = C.Tables()
    run = tables.add_run(entries, list(range(len(entries))))
    trees, hulls = tables.shapes[run]
    spare = len(tables.records)
    tables.records += [bytes(C.RECORD.size)] * tables.every_rule(run)[1]  # the spare list
    return tables, run, P.RunShape(trees, [[hull] for hull in hulls], spare)


def _patched(tables: C.Tables, run: int, shape: P.RunShape, changes, entries) -> P.RunShape:
    """Patch the run in `tables` as harness.deploy.patch does in the maps."""
    space = P.Space(
        tables.nodes.__getitem__,
        tables.records.__getitem__,
        len(tables.nodes),
        len(tables.nodes) + ROOM,
        len(tables.records),
        len(tables.records) + ROOM,
    )
    made = P.patch(space, tables.heads[run], shape, changes, lambda place: (entries[place], place))
    source, target, count = made.copy
    tables.records[target : target + count] = tables.records[source : source + count]
    for values, written in ((tables.nodes, space.nodes), (tables.records, space.records)):
        values += [b""] * (max(written, default=-1) + 1 - len(values))
        for index, value in written.items():
            values[index] = value
    tables.heads[run] = made.head
    return made.shape


def _scan(entries, key):
    for place, made in enumerate(entries):
        if made.never:
            continue
        said = P.matches(C.RECORD.pack(*made.record, place, place), key)
        if said is not None:
            return place, said
    return None


@settings(max_examples=150, deadline=None)
@given(texts=run_rules(), data=st.data())
def test_patched_trees_find_what_a_scan_of_the_new_rules_finds(texts, data):
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables, run, shape = _tables(entries)
    refused = 0
    for _ in range(data.draw(st.integers(1, 4))):
        count = data.draw(st.integers(1, 3))
        places = data.draw(
            st.lists(st.integers(0, len(entries) - 1), min_size=1, max_size=count, unique=True)
        )
        news = [C.entry(_rule(text), INTERFACES) for text in data.draw(run_rules())[:count]]
        changes = [
            P.Change(place, entries[place], new, place)
            for place, new in zip(places, news, strict=False)
        ]
        after = list(entries)
        for change in changes:
            after[change.place] = change.new
        try:
            shape = _patched(tables, run, shape, changes, after)
        except P.Refused:
            refused += 1
            continue
        entries = after
        for _ in range(20):
            key = _key(data.draw)
            found = P.lookup(tables, run, key)
            got = None if found is None else (C.RECORD.unpack(found[0])[-2], found[1])
            assert got == _scan(entries, key), f"{texts}\nchanges {changes}\nkey {key}"
    assume(refused == 0)  # hypothesis says so if too few runs patch at all


def test_a_rule_taken_out_brings_back_the_rules_it_hid():
    # /8 first hides every /16 inside it: the leaves it covers list it alone. Taken out, the
    # 40 come back in one leaf (more than LEAF_LIMIT would be refused: cut the tree again).
    texts = ["-s 10.0.0.0/8 -j DROP"] + [f"-s 10.{i}.0.0/16 -j ACCEPT" for i in range(40)]
    texts += [f"-s 11.{i}.0.0/16 -j DROP" for i in range(100)]
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables, run, shape = _tables(entries)
    key = (0x0A050001, 0, 6, 1000, 80, 2, 0)
    assert C.RECORD.unpack(P.lookup(tables, run, key)[0])[-2] == 0
    new = C.entry(_rule("-s 11.0.0.0/16 -j DROP"), INTERFACES)
    after = [new, *entries[1:]]
    _patched(tables, run, shape, [P.Change(0, entries[0], new, 0)], after)
    assert C.RECORD.unpack(P.lookup(tables, run, key)[0])[-2] == 6  # 10.5.0.0/16
    assert C.RECORD.unpack(P.lookup(tables, run, (0x0B000001, *key[1:]))[0])[-2] == 0


def test_a_rule_put_in_outside_the_trees_hull_is_found_and_ends_nothing_inside_it():
    texts = [f"-s 10.{i}.0.0/16 -j ACCEPT" for i in range(100)]
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables, run, shape = _tables(entries)
    wide = C.entry(_rule("-j DROP"), INTERFACES)  # every packet, where 10.0/16s were
    after = [*entries[:3], wide, *entries[4:]]
    shape = _patched(tables, run, shape, [P.Change(3, entries[3], wide, 3)], after)
    assert len(shape.hulls[0]) == 2
    for saddr, place in ((0xC0A80001, 3), (0x0A010001, 1), (0x0A030001, 3), (0x0A500001, 3)):
        found = P.lookup(tables, run, (saddr, 0, 6, 1000, 80, 2, 0))
        assert C.RECORD.unpack(found[0])[-2] == place, hex(saddr)
    # Put back, the /16s after it decide again where it hid them.
    _patched(tables, run, shape, [P.Change(3, wide, entries[3], 3)], entries)
    found = P.lookup(tables, run, (0x0A500001, 0, 6, 1000, 80, 2, 0))
    assert C.RECORD.unpack(found[0])[-2] == 80


def test_a_rule_that_hid_others_narrowed_out_of_the_hull_brings_them_back():
    # `-s 10/8` ends every leaf's list (the third rule is hidden); replaced by a rule whose box
    # reaches out of the tree's hull, it must still give the leaves back what it hid, judged
    # by the hull they were made for (random seeds found the third rule lost).
    texts = ["-s 10.0.0.0/8 -p tcp -j ACCEPT", "-s 10.0.0.0/8 -j ACCEPT"]
    texts += ["-s 10.0.0.0/8 -i eth0 -j ACCEPT"]
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables, run, shape = _tables(entries)
    new = C.entry(_rule("-i eth0 -p tcp -j ACCEPT"), INTERFACES)
    after = [entries[0], new, entries[2]]
    shape = _patched(tables, run, shape, [P.Change(1, entries[1], new, 1)], after)
    assert len(shape.hulls[0]) == 2
    for key in ((0x0A000000, 0, 1, 0, 0, 2, 0), (0x0A000001, 0, 6, 1, 2, 2, 0)):
        found = P.lookup(tables, run, key)
        got = None if found is None else (C.RECORD.unpack(found[0])[-2], found[1])
        assert got == _scan(after, key), key


def test_what_cannot_be_patched_in_place_is_refused():
    texts = [f"-s 10.{i}.0.0/16 -j ACCEPT" for i in range(100)]
    entries = [C.entry(_rule(text), INTERFACES) for text in texts]
    tables, run, shape = _tables(entries)
    never = C.entry(_rule("-s 10.0.0.0/16 -i gone0 -j DROP"), INTERFACES)
    with pytest.raises(P.Refused):
        _patched(tables, run, shape, [P.Change(3, entries[3], never, 3)], entries)
