"""Runs of rules answered by a decision tree over their fields instead of a scan.

Block lists, generated ACLs and port-range lists are long runs of rules that test only the IP
header part (`-s`, `-d`, `-i`, `-o`, `-p`, any masks, `!`) and the ports of `-m tcp` / `-m udp`,
and end in ACCEPT or DROP. A scan of such a run costs about a nanosecond per rule; this module
turns the run into data: one record per rule (its exact test) and a binary decision tree over
seven packet fields (source, destination, protocol, source port, destination port, in and out
device) whose leaves list the few rules a packet in that region can match, in rule order.

The tree is built as HyperSplit (Qi et al., 2009) builds its: each node cuts one field's range
in two at the point that best balances the rules overlapping each half (a rule overlapping both
goes to both), until a node holds at most LEAF_RULES rules, no cut helps, or MAX_DEPTH is
reached. A rule's part of the tree is the smallest box around its match (a negated or
non-contiguous mask is the whole range there); the leaf's records then test each candidate
exactly, in rule order, and the first that matches decides, so first-match order, counters per
rule and negations keep their meaning whatever the tree looks like. A leaf's list stops at the
first rule that matches every packet of the leaf's box: nothing after it can be first.

Transport headers are the matches' to read, and where the kernel's tcp and udp matches refuse
or hotdrop, the tree does too: a later fragment has no ports (ABSENT, outside every port
range: only the rules without a port match can take it); a first fragment too short for its
header, or a TCP fragment at offset 1, is hotdropped by the first rule whose IP part matches
if that rule has a port match: such packets take the run's records in order (the run's "all"
list), not the tree.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from codegen.rules.model import Accept, Address, Drop, Interface, Protocol, Rule
from codegen.rules.names import IPPROTO_TCP, IPPROTO_UDP

from .matches import emitter_of

U32 = 0xFFFF_FFFF
ABSENT = 0x1_0000  # the ports of a packet no port match may read (a later fragment)
HOT = 0x1_0001  # ... and of one the first port match hotdrops (too short, TCP offset 1)
FIELDS = ("saddr", "daddr", "protocol", "sport", "dport", "in", "out")
PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP})

LEAF_RULES = 4  # measured: a leaf's record test costs about two of the tree's steps
MAX_DEPTH = 48
MIN_RUN = 64  # measured: shorter runs scan faster than a lookup answers
SCANNED_FIRST = 8  # a run's first rules are scanned before the lookup, as exact runs do

# Record flags: which tests are negated, and whether the rule has a port match.
INV_SADDR, INV_DADDR, INV_PROTOCOL, INV_IN, INV_OUT = 1, 2, 4, 8, 16
PORTS, INV_SPORT, INV_DPORT = 32, 64, 128
ACCEPT, DROP = 1, 2
# saddr, smask, daddr, dmask, in, out, sport first/last, dport first/last, protocol, flags,
# verdict, the rule's place in its run, counter slot
RECORD = struct.Struct("<IIIIIIHHHHBBBxII")
NODE = struct.Struct("<IIII")  # field (LEAF for a leaf), threshold, left, right
LEAF = 8  # a leaf's field: left is its first record, right how many
# A run's first node (TREES): threshold is how many trees, left the first one's root, right a
# leaf listing every rule of the run in order. The program finds it by the run's number in an
# array of heads, so a new tree for a run is made live by one store (harness.deploy.patch).
TREES = 9
# A run is split into at most MAX_TREES trees, each of rules narrow on one field more
# (codegen.tc.classifier._groups); a rule is wide on a field if its part of the run's range
# there is over 1/2**WIDE_SHIFT of it.
MAX_TREES = 2  # measured: a third tree cost the 100,000-rule ACL more walk than it saved
WIDE_SHIFT = 12
MIN_GROUP = MIN_RUN  # the fewest rules a tree of a split run holds
REPLICATED = 4  # extra records per rule one tree may hold before a run is split


Box = tuple[tuple[int, int], ...]  # a range per field of FIELDS


@dataclass(frozen=True)
class Entry:
    """One rule of a run: its record without the counter slot, and its box in the tree."""

    record: tuple[int, ...]
    box: Box
    exact: bool  # every packet in the box matches the rule
    never: bool = False  # it names a device the namespace does not have: it cannot match


def _verdict(rule: Rule) -> int | None:
    if isinstance(rule.target, Accept):
        return ACCEPT
    if isinstance(rule.target, Drop):
        return DROP
    return None


def _address_box(address: int, mask: int, negated: bool) -> tuple[tuple[int, int], bool]:
    """The address's range in the tree and whether it is exactly the match."""
    inverse = ~mask & U32
    contiguous = inverse & (inverse + 1) == 0
    if negated or not contiguous:
        return (0, U32), mask == 0 and not negated
    return (address & mask, (address & mask) | inverse), True


def classifiable(rule: Rule) -> bool:
    """Whether the rule can join a classified run (what `entry` tells, without building it)."""
    return _fields(rule, {}) is not None


def _fields(rule: Rule, interfaces: Mapping[str, int]):
    """What a run's entry is built from (the verdict, the addresses, devices and protocol, the
    port ranges, whether it can match no packet), or None if it cannot join a run."""
    verdict = _verdict(rule)
    if verdict is None:
        return None
    addresses = {"src": (0, 0, False), "dst": (0, 0, False)}
    devices = {"in": (0, False), "out": (0, False)}
    protocol, protocol_negated = 0, False
    ranges = None
    never = False
    seen: set[str] = set()
    for match in rule.matches:
        if isinstance(match, Address):
            if match.direction in seen:
                return None
            seen.add(match.direction)
            addresses[match.direction] = (match.address & match.mask, match.mask, match.negated)
        elif isinstance(match, Protocol):
            if "protocol" in seen or (match.number == 0 and match.negated):
                return None
            seen.add("protocol")
            protocol, protocol_negated = match.number, match.negated
        elif isinstance(match, Interface):
            if match.wildcard or match.direction in seen:
                return None
            seen.add(match.direction)
            index = interfaces.get(match.name)
            if index is None:
                never = never or not match.negated  # negated: every packet passes this test
            else:
                devices[match.direction] = (index, match.negated)
        else:
            emitter = emitter_of(match)
            found = None if emitter is None else emitter.ranges(match)
            if emitter is None or found is None:
                return None
            if emitter.transport is not None:
                if ranges is not None or protocol_negated:
                    return None
                if emitter.transport.protocol != protocol:
                    return None
                ranges = found
            elif found[0].is_default is False or found[1].is_default is False:
                return None
    if ranges is not None and protocol not in PORT_PROTOCOLS:
        return None
    return verdict, addresses, devices, protocol, protocol_negated, ranges, never


def entry(rule: Rule, interfaces: Mapping[str, int]) -> Entry | None:
    """The rule as a run's entry, or None if it cannot join a classified run."""
    found = _fields(rule, interfaces)
    if found is None:
        return None
    verdict, addresses, devices, protocol, protocol_negated, ranges, never = found
    flags = 0
    box: list[tuple[int, int]] = []
    exact = True
    for direction, inverted in (("src", INV_SADDR), ("dst", INV_DADDR)):
        address, mask, negated = addresses[direction]
        flags |= inverted if negated else 0
        part, whole = _address_box(address, mask, negated)
        box.append(part)
        exact = exact and whole
    flags |= INV_PROTOCOL if protocol_negated else 0
    if protocol and not protocol_negated:
        box.append((protocol, protocol))
    else:
        box.append((0, 0xFF))
        exact = exact and not protocol
    ports = [(0, 0xFFFF), (0, 0xFFFF)]
    if ranges is not None:
        flags |= PORTS
        for number, (ports_range, inverted) in enumerate(
            zip(ranges, (INV_SPORT, INV_DPORT), strict=True)
        ):
            ports[number] = (ports_range.first, ports_range.last)
            if ports_range.negated:
                flags |= inverted
                box.append((0, 0xFFFF))
                exact = False
            else:
                box.append((ports_range.first, ports_range.last))
    else:
        box += [(0, ABSENT), (0, ABSENT)]
    for direction, inverted in (("in", INV_IN), ("out", INV_OUT)):
        index, negated = devices[direction]
        flags |= inverted if negated else 0
        box.append((index, index) if index and not negated else (0, U32))
        exact = exact and not (index and negated)
    record = (
        addresses["src"][0],
        addresses["src"][1],
        addresses["dst"][0],
        addresses["dst"][1],
        devices["in"][0],
        devices["out"][0],
        ports[0][0],
        ports[0][1],
        ports[1][0],
        ports[1][1],
        protocol,
        flags,
        verdict,
    )
    return Entry(record, tuple(box), exact, never)


def runs(rules: Sequence[Rule], taken: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of at least MIN_RUN consecutive rules that can be classified, none of them
    in `taken` (0-based indexes other runs hold), each but its first SCANNED_FIRST rules: their
    first and last index, 0-based, inclusive."""
    found = []
    start = 0
    while start < len(rules):
        end = start
        while end < len(rules) and end not in taken and classifiable(rules[end]):
            end += 1
        if end - start >= MIN_RUN:
            found.append((start + SCANNED_FIRST, end - 1))
        start = max(end, start + 1)
    return found


@dataclass
class Tables:
    """The trees and records of every classified run of one program."""

    nodes: list[bytes] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)
    depth: int = 0  # the deepest leaf of any tree (steps from its root)
    trees: int = 1  # the most trees any run has
    heads: list[int] = field(default_factory=list)  # each run's first node, by run number
    # Per run, what a patch needs (codegen.tc.classifier_patch): each place's tree ("0", "1",
    # ...; "-" for a rule that cannot match) and each tree's hull; None for add_list's runs.
    shapes: list[tuple[str, list[Box]] | None] = field(default_factory=list)

    def add_run(self, entries: Sequence[Entry], slots: Sequence[int]) -> int:
        """Add a run (its entries in rule order, their counter slots); its number."""
        live = [place for place, made in enumerate(entries) if not made.never]
        packed = {place: RECORD.pack(*entries[place].record, place, slots[place]) for place in live}
        all_first = len(self.records)
        self.records += packed.values()
        lows = [[made.box[at][0] for made in entries] for at in range(len(FIELDS))]
        highs = [[made.box[at][1] for made in entries] for at in range(len(FIELDS))]
        exact = [made.exact for made in entries]
        groups = _groups(live, lows, highs)
        head = len(self.nodes)
        every = head + 1 + len(groups)
        self.nodes.append(NODE.pack(TREES, len(groups), head + 1, every))
        self.nodes += [b""] * len(groups)
        self.nodes.append(NODE.pack(LEAF, 0, all_first, len(packed)))
        for number, members in enumerate(groups):
            self._tree(head + 1 + number, members, lows, highs, exact, packed)
        self.trees = max(self.trees, len(groups))
        tree_of = ["-"] * len(entries)
        for number, members in enumerate(groups):
            for place in members:
                tree_of[place] = str(number)
        self.shapes.append(("".join(tree_of), [_hull(m, lows, highs) for m in groups]))
        self.heads.append(head)
        return len(self.heads) - 1

    def add_list(self, entries: Sequence[Entry], slots: Sequence[int]) -> int:
        """Add a run as add_run does, but with one tree that is its list of every rule: every
        packet's records are the whole run, tested in order, for the packets an exact run's
        lookup cannot answer for (later fragments, short transport headers: codegen.tc.exact),
        rare enough to need no tree."""
        live = [place for place, made in enumerate(entries) if not made.never]
        first = len(self.records)
        self.records += [RECORD.pack(*entries[p].record, p, slots[p]) for p in live]
        head = len(self.nodes)
        self.nodes.append(NODE.pack(TREES, 1, head + 1, head + 1))
        self.nodes.append(NODE.pack(LEAF, 0, first, len(live)))
        self.shapes.append(None)
        self.heads.append(head)
        return len(self.heads) - 1

    def every_rule(self, run: int) -> tuple[int, int]:
        """The first record and count of a run's list of all its rules in order."""
        every = NODE.unpack(self.nodes[self.heads[run]])[3]
        return NODE.unpack(self.nodes[every])[2:]

    def _tree(self, root: int, members: list[int], lows, highs, exact, packed) -> None:
        """A tree of `members` (places in the run, in order) at node `root`."""
        # The root's region is the hull of the rules' boxes: a packet outside it matches none.
        # A field every rule tests alike cannot tell them apart anywhere, and is never cut.
        hull = _hull(members, lows, highs)
        fields = [
            at
            for at in range(len(FIELDS))
            if len({(lows[at][m], highs[at][m]) for m in members}) > 1
        ]
        work = [(root, members, hull, 0)]
        while work:
            node, members, region, depth = work.pop()
            members = _pruned(members, region, lows, highs, exact, fields)
            cut = None
            if len(members) > LEAF_RULES and depth < MAX_DEPTH:
                cut = _best_cut(members, region, lows, highs, fields)
            if cut is None:
                first = len(self.records)
                self.records += [packed[i] for i in members]
                self.nodes[node] = NODE.pack(LEAF, 0, first, len(members))
                self.depth = max(self.depth, depth)
                continue
            at, threshold, left, right = cut
            left_node, right_node = len(self.nodes), len(self.nodes) + 1
            self.nodes += [b"", b""]
            self.nodes[node] = NODE.pack(at, threshold, left_node, right_node)
            low, high = region[at]
            work.append((left_node, left, _with(region, at, (low, threshold)), depth + 1))
            work.append((right_node, right, _with(region, at, (threshold + 1, high)), depth + 1))


def _hull(members: list[int], lows, highs) -> Box:
    if not members:
        return tuple((0, 0) for _ in FIELDS)
    take = itemgetter(*members) if len(members) > 1 else lambda values: (values[members[0]],)
    return tuple((min(take(lows[at])), max(take(highs[at]))) for at in range(len(FIELDS)))


def _groups(members: list[int], lows, highs) -> list[list[int]]:
    """The run's rules in at most MAX_TREES groups, each a tree of its own.

    One tree of a mixed ACL holds a rule like `-s 10.0.0.0/8 -d NET --dport P` in every leaf
    the many narrower sources cut its /8 into. So the rules wide on the field that tells the
    most rules apart, and narrowed by another field, go to a tree of their own, cut there on
    the fields that narrow them (and so on, while MAX_TREES allows). A rule that is wide on
    that field and tests nothing else stays: it covers whole regions and ends their leaves'
    lists.

    Another tree costs every packet another walk, so a group is split off only where one
    tree would hold more than REPLICATED extra records per rule, estimated as a leaf per
    two narrow rules spread over the field, each wide rule in as many leaves as its share of
    the field's range holds; and only if both parts hold at least MIN_GROUP rules.
    """
    groups: list[list[int]] = []
    rest = members
    hull = _hull(members, lows, highs)
    free = [at for at in range(len(FIELDS)) if hull[at][0] < hull[at][1]]
    while len(groups) < MAX_TREES - 1 and len(free) > 1:
        # The field of the most distinct narrow parts, and the rules wide on it.
        wide_on = {}
        narrow_parts = {}
        for at in free:
            limit = (hull[at][1] - hull[at][0]) >> WIDE_SHIFT
            starts, ends = lows[at], highs[at]
            wide_on[at] = {m for m in rest if ends[m] - starts[m] > limit}
            narrow_parts[at] = len({(starts[m], ends[m]) for m in rest if m not in wide_on[at]})
        chosen = max(free, key=lambda at: narrow_parts[at])
        others = [at for at in free if at != chosen]
        split = [
            m
            for m in rest
            if m in wide_on[chosen]
            and any(lows[at][m] > hull[at][0] or highs[at][m] < hull[at][1] for at in others)
        ]
        if len(split) < MIN_GROUP or len(rest) - len(split) < MIN_GROUP:
            break
        span = hull[chosen][1] - hull[chosen][0] + 1
        share = sum(highs[chosen][m] - lows[chosen][m] + 1 for m in split) / span
        if (len(rest) - len(split)) / 2 * share <= REPLICATED * len(rest):
            break
        taken = set(split)
        groups.append([m for m in rest if m not in taken])
        rest, free = split, others
    return [*groups, rest]


def _with(region, at: int, part: tuple[int, int]):
    return (*region[:at], part, *region[at + 1 :])


def _pruned(members: list[int], region, lows, highs, exact, fields) -> list[int]:
    """`members` up to the first rule matching every packet of `region` (none after it can be
    the first to match). Only the fields cut anywhere need looking at: on the others every
    rule's box is the region's."""
    bounds = [(lows[at], highs[at], *region[at]) for at in fields]
    for position, member in enumerate(members):
        if not exact[member]:
            continue
        for rule_low, rule_high, low, high in bounds:  # a loop, not all(): measured faster
            if rule_low[member] > low or high > rule_high[member]:
                break
        else:
            return members[: position + 1]
    return members


def _best_cut(
    members: list[int], region, lows, highs, fields: list[int]
) -> tuple[int, int, list[int], list[int]] | None:
    """The field (of `fields`) and threshold (field <= threshold goes left) that leave the
    fewest rules in the larger half, with the members of each half; None if no cut leaves
    fewer than all. Every member overlaps the region, so for thresholds inside it the rules'
    own bounds count as well as bounds clipped to the region would."""
    best = None
    count = len(members)
    take = itemgetter(*members)
    for at in fields:
        low, high = region[at]
        if low == high:
            continue
        starts = sorted(take(lows[at]))
        ends = sorted(take(highs[at]))
        if starts[-1] <= low and ends[0] >= high:
            continue  # every rule spans the whole range: nothing to cut
        threshold = _balanced(starts, ends, low, high)
        larger = max(bisect_right(starts, threshold), count - bisect_right(ends, threshold))
        if larger < count and (best is None or larger < best[0]):
            best = (larger, at, threshold)
    if best is None:
        return None
    _, at, threshold = best
    left = [m for m in members if lows[at][m] <= threshold]
    right = [m for m in members if highs[at][m] > threshold]
    return at, threshold, left, right


def _nth_of_two(first: list[int], second: list[int], n: int) -> int:
    """sorted(first + second)[n] of two sorted lists, by bisecting how many come from `first`
    (O(log) steps instead of a merge of both)."""
    low, high = max(0, n + 1 - len(second)), min(n + 1, len(first))
    while low < high:  # the fewest of `first` among the n + 1 smallest
        taken = (low + high) // 2
        if first[taken] < second[n - taken]:
            low = taken + 1
        else:
            high = taken
    return max(first[low - 1] if low else -1, second[n - low] if n - low >= 0 else -1)


def _balanced(starts: list[int], ends: list[int], low: int, high: int) -> int:
    """The threshold in low..high-1 where the rules reaching the left half (starting at or
    below it) and the right half (ending above it) are closest to balanced.

    Left minus right, #(starts <= t) - #(ends > t), grows with t and first reaches 0 at the
    n-th smallest of all 2n bounds; the best threshold is there or just below it."""
    count = len(starts)
    crossing = min(max(_nth_of_two(starts, ends, count - 1), low), high - 1)

    def larger(t: int) -> int:
        return max(bisect_right(starts, t), count - bisect_right(ends, t))

    return min((crossing, crossing - 1) if crossing > low else (crossing,), key=larger)
