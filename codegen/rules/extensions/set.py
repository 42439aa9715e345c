"""`-m set [!] --match-set NAME src|dst[,src|dst...] [--return-nomatch] [! --update-counters]
[! --update-subcounters]` (libxt_set.c and xt_set.c, revision 4, the one iptables-legacy 1.8.9
picks on this kernel): whether the packet's addresses and ports, taken in the directions given,
are in the ipset NAME (what a set answers: codegen.rules.sets).

Names and indexes. The kernel's payload holds the set's index in the namespace's ip_set list
(ip_set_id_t), not its name; the model holds the name. `encode` and `decode` translate through
the `SetIndexes` of the context (`with set_indexes(...)`): codegen.rules.blob.kernel installs
the namespace's own (ip_set's getsockopt by name and by index) around every read and write of a
table, so a blob read from a namespace names its sets. Without one, a process-wide stand-in
numbers names in the order first encoded, and decodes only those: enough for blobs that never
meet a kernel (round-trip tests), and an index it never gave is a BlobError.

Counters. Revision 4's --packets-eq/-lt/-gt and --bytes-eq/-lt/-gt compare a member's
counters, which only sets created with `counters` keep; codegen.rules.sets refuses such sets,
so these options are refused here in one sentence. `! --update-counters` and
`! --update-subcounters` only stop counters being updated: accepted, kept and saved, and of no
effect on the verdict.

Which set a match reads: in the reference evaluator, the packet's `sets` when the caller
gives them; else the set bound to the match (`bind_sets`, which every caller that generates
code runs at apply time, and which refuses a name the sets do not hold, as iptables refuses a
rule naming a set that does not exist); else the stand-in of its name
(codegen.rules.sets.STANDIN_SETS). The generators read the bound set, or the stand-in.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Protocol

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError, Ruleset
from codegen.rules.packet import Packet
from codegen.rules.sets import (
    BITMAP_PORT,
    HASH_NET_IFACE,
    LIST_SET,
    NAME_MAX,
    PORT_HEADERS,
    STANDIN_SETS,
    WITH_NOMATCH,
    IpSet,
    SetTable,
)
from codegen.rules.syntax import Line, MatchParser, OptionContext, Token

DIMENSIONS_MAX = 6  # IPSET_DIM_MAX
IPSET_INV_MATCH = 1
RETURN_NOMATCH, SKIP_COUNTER_UPDATE, SKIP_SUBCOUNTER_UPDATE = 1 << 7, 1 << 3, 1 << 4
INVALID_INDEX = 0xFFFF  # IPSET_INVALID_ID
COUNTER_OPTIONS = ("packets-eq", "packets-lt", "packets-gt", "bytes-eq", "bytes-lt", "bytes-gt")


@dataclass(frozen=True, slots=True)
class SetMatch(ExtensionMatch):
    """`-m set`: set `name` looked up with `directions` ("src"/"dst", one per dimension, at
    most 6), maybe negated. `bound` is the set the rules were applied with (not part of the
    rule's identity)."""

    name: str
    directions: tuple[str, ...]
    negated: bool = False
    return_nomatch: bool = False
    skip_counter_update: bool = False
    skip_subcounter_update: bool = False
    bound: IpSet | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.directions) <= DIMENSIONS_MAX or not all(
            direction in ("src", "dst") for direction in self.directions
        ):
            raise ValueError(f"directions must be 1-6 of 'src'/'dst', not {self.directions!r}")
        if not 0 < len(self.name) <= NAME_MAX:
            raise ValueError(f"set name must be 1-{NAME_MAX} characters, not {self.name!r}")

    @property
    def flags(self) -> int:
        """xt_set_info.flags' direction bits: IPSET_DIM_ONE_SRC << N for a source in N."""
        return sum(1 << n for n, d in enumerate(self.directions, 1) if d == "src")


class XtSetInfo(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint16), ("dim", ctypes.c_uint8), ("flags", ctypes.c_uint8)]


class IpSetCounterMatch(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("op", ctypes.c_uint8)]


class XtSetInfoMatchV4(ctypes.Structure):
    _fields_ = [
        ("match_set", XtSetInfo),
        ("packets", IpSetCounterMatch),
        ("bytes", IpSetCounterMatch),
        ("flags", ctypes.c_uint32),
    ]


assert ctypes.sizeof(XtSetInfoMatchV4) == 48


class SetIndexes(Protocol):
    """How set names and the kernel's indexes relate: None where one is unknown."""

    def index_of(self, name: str) -> int | None: ...

    def name_of(self, index: int) -> str | None: ...


class StandinIndexes:
    """Indexes given in the order names are first asked for, for blobs no kernel sees."""

    def __init__(self) -> None:
        self.indexes: dict[str, int] = {}

    def index_of(self, name: str) -> int | None:
        return self.indexes.setdefault(name, len(self.indexes))

    def name_of(self, index: int) -> str | None:
        return next((name for name, held in self.indexes.items() if held == index), None)


_STANDIN = StandinIndexes()
_INDEXES: ContextVar[SetIndexes | None] = ContextVar("set_indexes", default=None)


@contextmanager
def set_indexes(indexes: SetIndexes) -> Iterator[None]:
    """Encode and decode `-m set` payloads with `indexes` in this block."""
    token = _INDEXES.set(indexes)
    try:
        yield
    finally:
        _INDEXES.reset(token)


def _indexes() -> SetIndexes:
    return _INDEXES.get() or _STANDIN


class SetParser(MatchParser):
    name = "set"
    options = {
        "match-set": ("match-set", True),
        "set": ("match-set", True),  # libxt_set's old spelling, still taken
        "return-nomatch": ("return-nomatch", False),
        "update-counters": ("update-counters", False),
        "update-subcounters": ("update-subcounters", False),
        **{option: ("counters", True) for option in COUNTER_OPTIONS},
    }
    invertible = frozenset({"match-set", "update-counters", "update-subcounters", "counters"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.found: tuple[str, tuple[str, ...], bool] | None = None
        self.return_nomatch = self.skip_counters = self.skip_subcounters = False

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key == "counters":
            raise ctx.error(
                f"set: {ctx.option.text} compares a member's counters, which only sets with "
                "counters keep, and this project refuses such sets"
            )
        if key == "return-nomatch":
            self.return_nomatch = True
            return
        if key == "update-counters":
            self.skip_counters = self.skip_counters or ctx.negated
            return
        if key == "update-subcounters":
            self.skip_subcounters = self.skip_subcounters or ctx.negated
            return
        if key in self.given:
            raise ctx.error("set: --match-set can be specified only once")
        assert ctx.value is not None
        name = ctx.value.text
        if len(name) > NAME_MAX:
            raise ctx.error(
                f"set: setname '{name}' too long, max {NAME_MAX} characters", at_value=True
            )
        if not name:
            raise ctx.error("set: the set name is empty", at_value=True)
        words = ctx.next_word()
        if words is None:
            raise ctx.error("set: --match-set requires two args (NAME and src|dst[,...])")
        directions = tuple(words.text.split(","))
        if len(directions) > DIMENSIONS_MAX:
            raise ctx.line.error(
                f"set: Can't be more src/dst options than {DIMENSIONS_MAX}.", words.column
            )
        if not all(direction in ("src", "dst") for direction in directions):
            raise ctx.line.error(
                "set: You must specify (the comma separated list of) 'src' or 'dst'.",
                words.column,
            )
        self.found = (name, directions, ctx.negated)

    def finish(self, line: Line) -> SetMatch:
        if self.found is None:
            raise self.missing(line, "--match-set")
        name, directions, negated = self.found
        return SetMatch(
            name,
            directions,
            negated,
            self.return_nomatch,
            self.skip_counters,
            self.skip_subcounters,
        )


def port_of(packet: Packet, source: bool) -> tuple[int, int] | None:
    """ip_set_get_ip4_port: (protocol, port) of the packet, None where it fails (protocol 0,
    a later fragment of a protocol with ports, a header too short for it)."""
    protocol = packet.protocol
    if protocol == 0:
        return None
    if packet.fragment_offset:
        return None if protocol in PORT_HEADERS else (protocol, 0)
    needed = PORT_HEADERS.get(protocol)
    if needed is None:
        return (protocol, 0)
    header = packet.data[packet.transport : packet.transport + needed]
    if len(header) < needed:
        return None
    if protocol == 1:
        return (1, header[0] << 8 | header[1])
    return (protocol, int.from_bytes(header[0:2] if source else header[2:4], "big"))


def set_answers(match: SetMatch, table: IpSet, packet: Packet) -> bool:
    """ip_set_test of `table` for `packet` in `match`'s directions (before any `!`)."""
    if len(match.directions) < table.dimension:
        return False
    if table.kind == LIST_SET:  # list_set_ktest: the first member set that holds it
        return any(set_answers(match, member, packet) for member in table.listed)
    first = match.directions[0] == "src"
    if table.kind == BITMAP_PORT:
        return table.test(0, port_of(packet, first), False)
    address = packet.saddr if first else packet.daddr
    if table.kind == HASH_NET_IFACE:  # the device of the second direction, by name
        device = packet.in_device if match.directions[1] == "src" else packet.out_device
        return table.test(address, None, match.return_nomatch, device)
    port = port_of(packet, match.directions[1] == "src") if table.dimension > 1 else None
    return table.test(address, port, match.return_nomatch and table.kind in WITH_NOMATCH)


def _dirs(match: SetMatch) -> str:
    return ",".join(match.directions)


class SetExtension(MatchExtension):
    name = "set"
    revision = 4
    model = SetMatch
    data = XtSetInfoMatchV4
    parser = SetParser
    examples = (
        "-m set --match-set hosts src",
        "-m set ! --match-set nets dst",
        "-m set --match-set nets src --return-nomatch",
        "-m set --match-set services dst,dst",
        "-m set --match-set netports src,src,dst ! --update-counters ! --update-subcounters",
        "-m set --match-set ports src",
        "-m set ! --match-set services src",
    )

    def save(self, match: SetMatch) -> list[str]:
        words = ["-m", "set", *(["!"] if match.negated else [])]
        words += ["--match-set", match.name, _dirs(match)]
        if match.return_nomatch:
            words.append("--return-nomatch")
        if match.skip_counter_update:
            words += ["!", "--update-counters"]
        if match.skip_subcounter_update:
            words += ["!", "--update-subcounters"]
        return words

    def describe(self, match: SetMatch) -> str:
        text = f" {'! ' if match.negated else ''}match-set {match.name} {_dirs(match)}"
        if match.return_nomatch:
            text += " return-nomatch"
        if match.skip_counter_update:
            text += " ! update-counters"
        if match.skip_subcounter_update:
            text += " ! update-subcounters"
        return text

    def encode(self, match: SetMatch) -> XtSetInfoMatchV4:
        index = _indexes().index_of(match.name)
        if index is None or index >= INVALID_INDEX:
            raise BlobError(f"set match: no set named '{match.name}' to take the index of")
        data = XtSetInfoMatchV4()
        data.match_set = XtSetInfo(
            index, len(match.directions), match.flags | (IPSET_INV_MATCH if match.negated else 0)
        )
        data.flags = (
            (RETURN_NOMATCH if match.return_nomatch else 0)
            | (SKIP_COUNTER_UPDATE if match.skip_counter_update else 0)
            | (SKIP_SUBCOUNTER_UPDATE if match.skip_subcounter_update else 0)
        )
        return data

    def decode(self, data: XtSetInfoMatchV4) -> SetMatch:
        info = data.match_set
        if not 1 <= info.dim <= DIMENSIONS_MAX:
            raise BlobError(f"set match: dimension {info.dim} is not 1-{DIMENSIONS_MAX}")
        if info.flags & ~((2 << info.dim) - 1):
            raise BlobError(f"set match: direction flags {info.flags:#x} past its dimension")
        if data.packets.op or data.bytes.op:
            raise BlobError("set match: counter comparisons (--packets-*, --bytes-*) are refused")
        known = RETURN_NOMATCH | SKIP_COUNTER_UPDATE | SKIP_SUBCOUNTER_UPDATE
        if data.flags & ~known:
            raise BlobError(f"set match: unknown flags {data.flags & ~known:#x}")
        name = _indexes().name_of(info.index)
        if name is None:
            raise BlobError(f"set match: set index {info.index} has no name here")
        directions = tuple("src" if info.flags >> n & 1 else "dst" for n in range(1, info.dim + 1))
        return SetMatch(
            name,
            directions,
            bool(info.flags & IPSET_INV_MATCH),
            bool(data.flags & RETURN_NOMATCH),
            bool(data.flags & SKIP_COUNTER_UPDATE),
            bool(data.flags & SKIP_SUBCOUNTER_UPDATE),
        )

    def matches(self, match: SetMatch, packet: Packet) -> bool:
        if packet.sets is not None:
            table = packet.sets.sets.get(match.name)
        else:
            table = match.bound or STANDIN_SETS.sets.get(match.name)
        if table is None:
            raise RuleError(f"set: set '{match.name}' does not exist")
        return set_answers(match, table, packet) != match.negated


EXTENSION = SetExtension()


def uses_sets(ruleset: Ruleset) -> list[str]:
    """The names of the sets `ruleset`'s rules look up, in the order first used."""
    return list(dict.fromkeys(match.name for *_, match in ruleset.matches_of(SetMatch)))


def bound_sets(ruleset: Ruleset) -> dict[str, IpSet]:
    """The sets `ruleset`'s set matches are bound to, by name, a list:set's members before
    it; ValueError for one that is not bound (bind_sets was not run)."""
    found: dict[str, IpSet] = {}
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            for match in rule.matches:
                if isinstance(match, SetMatch):
                    if match.bound is None:
                        raise ValueError(f"set match of '{match.name}' is not bound to a set")
                    found.update((member.name, member) for member in match.bound.listed)
                    found[match.name] = match.bound
    return found


def bind_sets(ruleset: Ruleset, sets: SetTable | None) -> Ruleset:
    """`ruleset` with each set match bound to the set of its name in `sets` (None:
    STANDIN_SETS); RuleError at the rule for a name `sets` does not hold. Rules without set
    matches are shared with `ruleset`, which is not changed."""
    table = STANDIN_SETS if sets is None else sets
    if not uses_sets(ruleset):
        return ruleset
    bound = Ruleset(chains={})
    for name, chain in ruleset.chains.items():
        rules = [_bind_rule(rule, table) for rule in chain.rules]
        bound.chains[name] = replace(chain, rules=rules)
    return bound


def _bind_rule(rule: Rule, table: SetTable) -> Rule:
    if not any(isinstance(match, SetMatch) for match in rule.matches):
        return rule
    matches = []
    for match in rule.matches:
        if isinstance(match, SetMatch):
            held = table.sets.get(match.name)
            if held is None:
                raise RuleError(f"set: set '{match.name}' does not exist", rule.source, match)
            match = replace(match, bound=held)
        matches.append(match)
    return replace(rule, matches=tuple(matches))
