"""A classified run's tables read and changed in place: the program's lookup written again in
Python, and the patch that replaces rules of a run without building its trees again.

A patch never writes where a packet may be reading. For each changed rule it copies, into free
nodes, the path from the root of the rule's tree down to every leaf whose region the old or
the new rule overlaps, with those leaves' lists rewritten into free records; then a new first
node for the run (TREES: its roots, the new one among them, and a new list of all its rules,
written into the run's spare list); the caller makes it live with one store into the heads
array (codegen.tc.classifier_code reads a run's first node from there at every packet).

What a leaf's list holds is kept as codegen.tc.classifier builds it: the members of the tree
that overlap the leaf's region, in rule order, up to the first that matches every packet of
the region inside the tree's hull. A rule taken out of a leaf whose list it ended brings back
the members after it, up to the next such rule; a rule put in goes to its place, unless an
earlier member already ends the list, and ends the list itself if it covers the region. The
region of a node is what the cuts on the path to it leave of every field's whole range (the
builder's regions start from the hull; a packet outside it matches no member, and the hull of
a tree is kept: a new rule reaching out of it is not patched, the caller applies whole).

A patch can refuse (None): no free space left, a leaf list that would grow past LEAF_LIMIT
(the tree would be cut further there), a rule that can match nothing (it names a device the
namespace does not have). The caller then compiles and loads the rule set whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import classifier as C

LEAF_LIMIT = 64
MAX_HULLS = 64  # per tree, until a full apply builds the trees again
WHOLE: C.Box = (
    (0, C.U32),
    (0, C.U32),
    (0, 0xFF),
    (0, C.ABSENT),
    (0, C.ABSENT),
    (0, C.U32),
    (0, C.U32),
)


class Refused(Exception):
    """The patch cannot be made in place (the sentence says why); apply whole instead."""


def matches(record: bytes, key: Sequence[int]) -> str | None:
    """What a record says of a packet's key (the FIELDS values): "match", "hotdrop" or None;
    the program's record test, written again for the builder's tests."""
    (saddr, smask, daddr, dmask, device_in, device_out, *ports, protocol, flags, _, _, _) = (
        C.RECORD.unpack(record)
    )
    tests = (
        ((key[0] & smask) == saddr, flags & C.INV_SADDR),
        ((key[1] & dmask) == daddr, flags & C.INV_DADDR),
        (not protocol or key[2] == protocol, protocol and flags & C.INV_PROTOCOL),
        (not device_in or key[5] == device_in, device_in and flags & C.INV_IN),
        (not device_out or key[6] == device_out, device_out and flags & C.INV_OUT),
    )
    if any(hit == bool(negated) for hit, negated in tests):
        return None
    if not flags & C.PORTS:
        return "match"
    if key[3] == C.HOT:
        return "hotdrop"
    if key[3] == C.ABSENT:
        return None
    sport = (ports[0] <= key[3] <= ports[1]) != bool(flags & C.INV_SPORT)
    dport = (ports[2] <= key[4] <= ports[3]) != bool(flags & C.INV_DPORT)
    return "match" if sport and dport else None


def lookup(tables: C.Tables, run: int, key: Sequence[int]):
    """The record that decides a packet's key in a run (by its number) and what it says (None:
    no rule of the run), by the trees or, for a HOT key, the run's list: the program's lookup,
    in Python. Each tree's leaf is tested in order up to the first match, or to a rule after
    the best match an earlier tree found."""
    if key[3] == C.HOT:
        lists = [tables.every_rule(run)]
    else:
        lists = []
        _, count, first_root, _ = C.NODE.unpack(tables.nodes[tables.heads[run]])
        for node in range(first_root, first_root + count):
            while True:
                at, threshold, left, right = C.NODE.unpack(tables.nodes[node])
                if at == C.LEAF:
                    lists.append((left, right))
                    break
                node = left if key[at] <= threshold else right
    best = None
    for first, count in lists:
        for record in tables.records[first : first + count]:
            place = C.RECORD.unpack(record)[-2]
            if best is not None and place >= best[0]:
                break
            said = matches(record, key)
            if said is not None:
                best = (place, record, said)
                break
    return None if best is None else best[1:]


@dataclass(frozen=True)
class Change:
    """One rule of a run replaced: its place, its entry before and after, its counter slot."""

    place: int
    old: C.Entry
    new: C.Entry
    slot: int


@dataclass
class Space:
    """The tables as they are (`node`, `record`: read by index) and where a patch may write:
    free nodes and records from `free_nodes` and `free_records` up to their ends. What the
    patch writes is kept here, read back by later changes, and written out by the caller."""

    node: Callable[[int], bytes]
    record: Callable[[int], bytes]
    free_nodes: int
    node_end: int
    free_records: int
    record_end: int
    nodes: dict[int, bytes] = field(default_factory=dict)
    records: dict[int, bytes] = field(default_factory=dict)

    def read_node(self, index: int) -> tuple[int, int, int, int]:
        return C.NODE.unpack(self.nodes.get(index) or self.node(index))

    def read_record(self, index: int) -> bytes:
        return self.records.get(index) or self.record(index)

    def add_nodes(self, values: list[bytes]) -> int:
        first = self.free_nodes
        if first + len(values) > self.node_end:
            raise Refused("the tree nodes' map has no room left for the patch")
        for offset, value in enumerate(values):
            self.nodes[first + offset] = value
        self.free_nodes += len(values)
        return first

    def add_records(self, values: list[bytes]) -> int:
        first = self.free_records
        if first + len(values) > self.record_end:
            raise Refused("the records' map has no room left for the patch")
        for offset, value in enumerate(values):
            self.records[first + offset] = value
        self.free_records += len(values)
        return first


def _overlaps(box: C.Box, region: C.Box) -> bool:
    return all(
        low <= top and bottom <= high
        for (low, high), (bottom, top) in zip(box, region, strict=True)
    )


def _covers(entry: C.Entry, region: C.Box) -> bool:
    """Whether the entry matches every packet of `region` (an empty region: yes)."""
    if any(bottom > top for bottom, top in region):
        return True
    return entry.exact and all(
        low <= bottom and top <= high
        for (low, high), (bottom, top) in zip(entry.box, region, strict=True)
    )


def _inside(box: C.Box, hull: C.Box) -> bool:
    return all(
        h_low <= low and high <= h_high
        for (low, high), (h_low, h_high) in zip(box, hull, strict=True)
    )


def _clip(region: C.Box, hull: C.Box) -> C.Box:
    return tuple(
        (max(low, h_low), min(high, h_high))
        for (low, high), (h_low, h_high) in zip(region, hull, strict=True)
    )


def _ends(entry: C.Entry, region: C.Box, hulls: list[C.Box]) -> bool:
    """Whether the entry matches every packet of the region that any member of the tree can
    match (each member is inside one of its hulls): nothing after it can be first there."""
    return all(_covers(entry, _clip(region, hull)) for hull in hulls)


@dataclass
class RunShape:
    """What a patch knows of a run beside its tables: each place's tree ("-": none, a rule
    that cannot match), each tree's hulls (boxes every member is inside one of: the builder's
    hull, and the box of each rule a patch put in outside them), and where the next patch
    writes the run's list of all rules (the first record of a free stretch as long as it)."""

    trees: str
    hulls: list[list[C.Box]]
    spare: int


@dataclass(frozen=True)
class Patch:
    """A patch written into its Space: the run's new first node, the copy of its list of all
    rules (from, to, how many records: made before the Space's records are written), and
    the run's shape after it."""

    head: int
    copy: tuple[int, int, int]
    shape: RunShape


Member = Callable[[int], tuple[C.Entry, int]]  # a place's entry as the rule set has it now, slot


def patch(space: Space, head: int, shape: RunShape, changes: list[Change], member: Member) -> Patch:
    """Write into `space` a run (its first node `head`) with `changes` made; Refused if it
    cannot be done in place."""
    _, count, first_root, every = space.read_node(head)
    roots = [C.NODE.pack(*space.read_node(first_root + tree)) for tree in range(count)]
    _, _, all_first, all_count = space.read_node(every)
    # The changes are made one at a time: a rule of one not made yet is its old one.
    pending = {change.place: (change.old, change.slot) for change in changes}

    def now(place: int) -> tuple[C.Entry, int]:
        return pending[place] if place in pending else member(place)

    for change in changes:
        if change.old.never or change.new.never:
            raise Refused("a rule names a device the namespace does not have")
        tree = int(shape.trees[change.place])
        before = shape.hulls[tree]  # what the lists were made for, the old rule included
        if not any(_inside(change.new.box, hull) for hull in shape.hulls[tree]):
            if len(shape.hulls[tree]) >= MAX_HULLS:
                raise Refused("too many rules were put in outside their tree's hulls")
            hulls = [*shape.hulls]
            hulls[tree] = [*hulls[tree], change.new.box]
            shape = RunShape(shape.trees, hulls, shape.spare)
        del pending[change.place]
        walk = _Walk(space, shape, change, tree, now, before)
        made = walk.node(C.NODE.unpack(roots[tree]), WHOLE)
        if made is not None:
            roots[tree] = made
    for change in changes:
        position = change.place - shape.trees.count("-", 0, change.place)
        space.records[shape.spare + position] = C.RECORD.pack(
            *change.new.record, change.place, change.slot
        )
    new_first = space.add_nodes([*roots, C.NODE.pack(C.LEAF, 0, shape.spare, all_count)])
    new_head = space.add_nodes([C.NODE.pack(C.TREES, count, new_first, new_first + count)])
    return Patch(
        new_head, (all_first, shape.spare, all_count), RunShape(shape.trees, shape.hulls, all_first)
    )


class _Walk:
    """One change made to one tree: the nodes on the paths to the leaves it changes, copied.
    Whether the old rule ended a leaf's list, and where the members it hid end again, is
    judged by the hulls the lists were made for (`before`): every member but the new rule
    is inside them, and a box the new rule added would make the old rule look as if it had
    hidden nothing. Whether the new rule is hidden or hides is judged with its box too."""

    def __init__(
        self,
        space: Space,
        shape: RunShape,
        change: Change,
        tree: int,
        member: Member,
        before: list[C.Box],
    ):
        self.space, self.shape, self.change, self.tree = space, shape, change, tree
        self.member = member
        self.hulls, self.before = shape.hulls[tree], before

    def node(self, node: tuple[int, int, int, int], region: C.Box) -> bytes | None:
        """The node's new content (a copy), or None if nothing under it changes."""
        at, threshold, left, right = node
        if at == C.LEAF:
            records = self.leaf(left, right, region)
            if records is None:
                return None
            first = self.space.add_records(records) if records else 0
            return C.NODE.pack(C.LEAF, 0, first, len(records))
        low, high = region[at]
        children = []
        for child, part in ((left, (low, threshold)), (right, (threshold + 1, high))):
            below = (*region[:at], part, *region[at + 1 :])
            made = None
            if part[0] <= part[1] and (
                _overlaps(self.change.old.box, below) or _overlaps(self.change.new.box, below)
            ):
                made = self.node(self.space.read_node(child), below)
            children.append(child if made is None else self.space.add_nodes([made]))
        if children == [left, right]:
            return None
        return C.NODE.pack(at, threshold, *children)

    def leaf(self, first: int, count: int, region: C.Box) -> list[bytes] | None:
        """The leaf's new list of records, or None if it stays as it is."""
        change, hulls = self.change, self.hulls
        listed = {}
        for at in range(first, first + count):
            record = self.space.read_record(at)
            listed[C.RECORD.unpack(record)[-2]] = record
        last = max(listed, default=None)
        changed = change.place in listed
        if changed:
            del listed[change.place]
            if last == change.place and _ends(change.old, region, self.before):
                self.refill(listed, region)  # what the old rule hid comes back
            last = max(listed, default=None)
        ended = (
            last is not None and last < change.place and _ends(self.member(last)[0], region, hulls)
        )
        if not ended and _overlaps(change.new.box, region):
            changed = True
            listed[change.place] = C.RECORD.pack(*change.new.record, change.place, change.slot)
            if _ends(change.new, region, hulls):
                listed = {
                    place: record for place, record in listed.items() if place <= change.place
                }
        if not changed:
            return None
        if len(listed) > LEAF_LIMIT:
            raise Refused(f"a leaf of the tree would list over {LEAF_LIMIT} rules")
        return [listed[place] for place in sorted(listed)]

    def refill(self, listed: dict[int, bytes], region: C.Box) -> None:
        """Add the tree's members after the changed rule that overlap `region`, in order, up
        to the first that covers it (as the builder's list would have them)."""
        mark = str(self.tree)
        place = self.shape.trees.find(mark, self.change.place + 1)
        while place >= 0:
            made, slot = self.member(place)
            if _overlaps(made.box, region):
                listed[place] = C.RECORD.pack(*made.record, place, slot)
                if _ends(made, region, self.before):
                    return
                if len(listed) > LEAF_LIMIT:
                    raise Refused(f"a leaf of the tree would list over {LEAF_LIMIT} rules")
            place = self.shape.trees.find(mark, place + 1)
