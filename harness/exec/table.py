"""The filter table as the kernel's ip_tables answers for it, made from a rule set: what
`bpflab exec` hands back for IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES and the revision queries,
and how it reads IPT_SO_SET_REPLACE and IPT_SO_SET_ADD_COUNTERS. Pure: bytes in, bytes out.

GET_ENTRIES returns the entries iptables-legacy-restore would send for the rule set (the
blob encoder), each with its counters and with the `comefrom` bits the kernel's
mark_source_chains leaves in it (which hooks reach the entry), so that the answer is the
kernel's own byte for byte.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass

from codegen.rules.blob.encode import encode_table
from codegen.rules.blob.structs import (
    ENTRY_SIZE,
    HOOKS,
    IptEntry,
    IptGetEntries,
    IptGetinfo,
    IptReplace,
    XtCounters,
    XtCountersInfo,
    XtEntryMatch,
    cstring,
    field_bytes,
)
from codegen.rules.extensions import MATCHES, TARGETS
from codegen.rules.model import Ruleset
from codegen.rules.names import BUILTIN_CHAINS
from codegen.tc.layout import Position

NF_INET_NUMHOOKS = 5
COUNTER = struct.Struct("<QQ")
XT_EXTENSION_MAXNAMELEN = 29
REVISION = struct.Struct(f"<{XT_EXTENSION_MAXNAMELEN}sB")  # struct xt_get_revision
GETINFO_SIZE = ctypes.sizeof(IptGetinfo)
GET_ENTRIES_SIZE = ctypes.sizeof(IptGetEntries)
REPLACE_SIZE = ctypes.sizeof(IptReplace)
COUNTERS_INFO_SIZE = ctypes.sizeof(XtCountersInfo)
COUNTERS_SIZE = ctypes.sizeof(XtCounters)
_COMEFROM = IptEntry.comefrom.offset
_COUNTERS = IptEntry.counters.offset


@dataclass(frozen=True)
class Table:
    """One rule set as the kernel holds it: its ipt_getinfo answer and its entries."""

    info: bytes  # struct ipt_getinfo
    entries: bytes
    positions: tuple[Position | None, ...]  # each entry's counter position (None: none)

    @property
    def size(self) -> int:
        return len(self.entries)


def entry_positions(ruleset: Ruleset) -> tuple[Position | None, ...]:
    """The counter position of each entry of the encoded table, in table order (libiptc's:
    INPUT, FORWARD, OUTPUT, then user chains sorted bytewise, then the final ERROR entry):
    a rule's, a built-in chain's policy, None for ERROR heads and user chains' RETURNs."""
    positions: list[Position | None] = []
    builtins = [ruleset.chains[name] for name in BUILTIN_CHAINS]
    users = sorted(ruleset.user_chains, key=lambda chain: chain.name.encode("utf-8"))
    for chain in builtins + users:
        if not chain.builtin:
            positions.append(None)
        positions.extend((chain.name, index) for index in range(1, len(chain.rules) + 1))
        positions.append((chain.name, "policy") if chain.builtin else None)
    positions.append(None)
    return tuple(positions)


def table_of(ruleset: Ruleset) -> Table:
    """The kernel's view of `ruleset` with its counters (the model's)."""
    blob = encode_table(ruleset)
    header = IptReplace.from_buffer_copy(blob)
    entries = bytearray(blob[REPLACE_SIZE:])
    positions = entry_positions(ruleset)
    _mark_source_chains(entries, header)
    counters = _model_counters(ruleset, positions)
    for offset, value in zip(_offsets(entries), counters, strict=True):
        COUNTER.pack_into(entries, offset + _COUNTERS, *value)
    return Table(_info(header), bytes(entries), positions)


def _info(header: IptReplace) -> bytes:
    info = IptGetinfo(name=b"filter", valid_hooks=header.valid_hooks)
    # translate_table starts every hook at 0xFFFFFFFF; only the table's own hooks are set.
    for hook in range(NF_INET_NUMHOOKS):
        valid = header.valid_hooks & (1 << hook)
        info.hook_entry[hook] = header.hook_entry[hook] if valid else 0xFFFFFFFF
        info.underflow[hook] = header.underflow[hook] if valid else 0xFFFFFFFF
    info.num_entries, info.size = header.num_entries, header.size
    return bytes(info)


def table_as_sent(header: IptReplace, entries: bytes, ruleset: Ruleset) -> Table:
    """The table the kernel would hold after a SET_REPLACE of `entries`: the entries as the
    caller sent them (the kernel hands back its payloads as given, not re-encoded: a model
    that reads `--icmp-type 255/255` as `any` must not change what `-D` compares), counters
    zero and comefrom set. `ruleset` is their decoding; when the entries are not laid out
    in its order (not libiptc's layout), its own encoding stands in."""
    offsets = _offsets(entries)
    positions = entry_positions(ruleset)
    if _positions_in(entries, header, offsets) != positions:
        return table_of(with_counters(ruleset, {}))
    sent = bytearray(entries)
    for offset in offsets:
        COUNTER.pack_into(sent, offset + _COUNTERS, 0, 0)
    _mark_source_chains(sent, header)
    return Table(_info(header), bytes(sent), positions)


def _positions_in(
    entries: bytes, header: IptReplace, offsets: list[int]
) -> tuple[Position | None, ...]:
    """Each entry's counter position as the entries themselves lay the chains out: rules
    from a hook's entry point to its underflow, user chains from their ERROR head to the
    RETURN before the next ERROR entry."""
    starts = {header.hook_entry[hook]: name for hook, name in HOOKS}
    policies = {header.underflow[hook]: name for hook, name in HOOKS}
    names = [_target_name(entries, offset) for offset in offsets]
    positions: list[Position | None] = []
    chain, index = "", 0
    for number, offset in enumerate(offsets):
        if offset in policies:
            positions.append((policies[offset], "policy"))
            chain = ""
            continue
        if offset in starts:
            chain, index = starts[offset], 0
        if names[number] == "ERROR":
            at = offset + IptEntry.from_buffer_copy(entries, offset).target_offset
            chain, index = cstring(entries[at + ctypes.sizeof(XtEntryMatch) :][:30]), 0
            positions.append(None)
            continue
        last = number + 1 < len(offsets) and names[number + 1] == "ERROR"
        if chain not in BUILTIN_CHAINS and last:
            positions.append(None)  # a user chain's RETURN
            continue
        index += 1
        positions.append((chain, index))
    return tuple(positions)


def _target_name(entries: bytes, offset: int) -> str:
    entry = IptEntry.from_buffer_copy(entries, offset)
    target = XtEntryMatch.from_buffer_copy(entries, offset + entry.target_offset)
    return target.u.user.name.decode("utf-8", "replace")


def with_live_counters(table: Table, values: dict[Position, tuple[int, int]]) -> Table:
    """`table` with each entry's counters from `values` (by position; others unchanged):
    how a table computed once per rule set answers with the counters of the moment."""
    entries = bytearray(table.entries)
    for offset, position in zip(_offsets(entries), table.positions, strict=True):
        if position is not None and position in values:
            COUNTER.pack_into(entries, offset + _COUNTERS, *values[position])
    return Table(table.info, bytes(entries), table.positions)


def _model_counters(
    ruleset: Ruleset, positions: tuple[Position | None, ...]
) -> list[tuple[int, int]]:
    values = []
    for position in positions:
        if position is None:
            values.append((0, 0))
            continue
        chain, index = position
        held = ruleset.chains[chain]
        item = held if index == "policy" else held.rules[index - 1]
        values.append((item.packets, item.bytes))
    return values


def _offsets(entries: bytes | bytearray) -> list[int]:
    offsets, offset = [], 0
    while offset < len(entries):
        offsets.append(offset)
        offset += IptEntry.from_buffer_copy(entries, offset).next_offset
    return offsets


def _standard_verdict(entries: bytes | bytearray, offset: int, entry: IptEntry) -> int | None:
    """The verdict of a standard target, None for any other target."""
    target = XtEntryMatch.from_buffer_copy(entries, offset + entry.target_offset)
    if target.u.user.name != b"":
        return None
    at = offset + entry.target_offset + ctypes.sizeof(XtEntryMatch)
    return int(struct.unpack_from("<i", entries, at)[0])


def _unconditional(entries: bytes | bytearray, offset: int, entry: IptEntry) -> bool:
    ip_size = ctypes.sizeof(type(entry.ip))
    return entry.target_offset == ENTRY_SIZE and not any(entries[offset : offset + ip_size])


def _mark_source_chains(entries: bytearray, header: IptReplace) -> None:
    """Set each entry's comefrom to the hooks that reach it, walking the table as the
    kernel's mark_source_chains does: along the chain, into jumps, back at an unconditional
    standard verdict (ACCEPT, DROP, RETURN: a chain's end) or at an entry already seen."""
    offsets = _offsets(entries)
    marks = dict.fromkeys(offsets, 0)
    for hook, _ in HOOKS:
        if not header.valid_hooks & (1 << hook):
            continue
        bit = 1 << hook
        callers: list[int] = []
        position = header.hook_entry[hook]
        for _ in range(len(offsets) * 2 + 2):  # each entry is entered at most once per hook
            entry = IptEntry.from_buffer_copy(entries, position)
            seen = bool(marks[position] & bit)
            marks[position] |= bit
            verdict = _standard_verdict(entries, position, entry)
            end = verdict is not None and verdict < 0 and _unconditional(entries, position, entry)
            if end or seen:
                if not callers:
                    break
                position = callers.pop()
            elif verdict is not None and verdict >= 0 and verdict != position + entry.next_offset:
                callers.append(position + entry.next_offset)
                position = verdict
            else:
                position += entry.next_offset
    for offset, mark in marks.items():
        struct.pack_into("<I", entries, offset + _COMEFROM, mark)


def with_counters(ruleset: Ruleset, values: dict[Position, tuple[int, int]]) -> Ruleset:
    """`ruleset` with the counters of `values` (positions missing: zero), in place."""
    for chain in ruleset.chains.values():
        if chain.builtin:
            chain.packets, chain.bytes = values.get((chain.name, "policy"), (0, 0))
        for index, rule in enumerate(chain.rules, 1):
            rule.packets, rule.bytes = values.get((chain.name, index), (0, 0))
    return ruleset


def counters_bytes(table: Table) -> bytes:
    """The entries' counters, in table order: what SET_REPLACE hands back as the old ones."""
    entries = table.entries
    return b"".join(
        entries[offset + _COUNTERS : offset + _COUNTERS + COUNTER.size]
        for offset in _offsets(entries)
    )


# Revision queries --------------------------------------------------------------------------


def revisions(target: bool) -> dict[str, int]:
    """The revision of each match (or target) extension we generate, by blob name."""
    if target:
        known = {extension.name: extension.revision for extension in TARGETS}
        known.update({"": 0, "ERROR": 0})  # the standard and ERROR targets
        return known
    return {extension.blob_name: extension.revision for extension in MATCHES}


def revision_answer(request: bytes, target: bool) -> int:
    """0 if we generate revision `request.revision` of the named extension, else the errno
    the kernel's xt_find_revision gives: ENOENT for a name it has no module for,
    EPROTONOSUPPORT for a revision it lacks."""
    raw_name, revision = REVISION.unpack(request)
    name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
    have = revisions(target).get(name)
    if have is None:
        return errno.ENOENT
    return 0 if revision == have else errno.EPROTONOSUPPORT


def request_name(raw: bytes) -> str:
    """The table name at the start of an ip_tables request (the kernel cuts it at 31)."""
    return cstring(raw[:31])


def replace_header(raw: bytes) -> IptReplace:
    return IptReplace.from_buffer_copy(raw[:REPLACE_SIZE])


def counters_info(raw: bytes) -> tuple[str, int]:
    info = XtCountersInfo.from_buffer_copy(raw[:COUNTERS_INFO_SIZE])
    return cstring(field_bytes(info, "name")), info.num_counters


def added_counters(
    positions: tuple[Position | None, ...], raw: bytes
) -> dict[Position, tuple[int, int]]:
    """The counters an ADD_COUNTERS payload adds, by position (entries without one dropped)."""
    added: dict[Position, tuple[int, int]] = {}
    for index, position in enumerate(positions):
        packets, bytes_ = COUNTER.unpack_from(raw, index * COUNTER.size)
        if position is not None:
            added[position] = (packets, bytes_)
    return added
