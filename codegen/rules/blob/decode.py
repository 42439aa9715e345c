"""A filter table's entries -> Ruleset, for tables laid out as libiptc lays them out (see
codegen.rules.blob.encode). Matches come in the order the iptables-save parser gives them: -s,
-d, -i, -o, -p, -f, then the match extensions in table order, each decoded by its extension
(codegen.rules.extensions), as is a target extension's payload.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import (
    ENTRY_SIZE,
    ERROR_TARGET,
    FILTER_VALID_HOOKS,
    HOOKS,
    IFNAMSIZ,
    IPT_F_FRAG,
    IPT_F_GOTO,
    IPT_F_MASK,
    IPT_INV_DSTIP,
    IPT_INV_FRAG,
    IPT_INV_MASK,
    IPT_INV_PROTO,
    IPT_INV_SRCIP,
    IPT_INV_TOS,
    IPT_INV_VIA_IN,
    IPT_INV_VIA_OUT,
    MATCH_HEADER_SIZE,
    STANDARD_TARGET,
    VERDICT_ACCEPT,
    VERDICT_DROP,
    VERDICT_QUEUE,
    XT_ALIGNMENT,
    XT_EXTENSION_MAXNAMELEN,
    XT_FUNCTION_MAXNAMELEN,
    XT_RETURN,
    BlobError,
    IptEntry,
    IptIp,
    IptReplace,
    XtEntryMatch,
    cstring,
    field_bytes,
    xt_align,
)
from codegen.rules.extensions import BY_BLOB_NAME, TARGETS_BY_NAME
from codegen.rules.model import (
    Accept,
    Address,
    Chain,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    Ruleset,
    Target,
)
from codegen.rules.names import BUILTIN_CHAINS

_VERDICTS: dict[int, Target] = {
    VERDICT_ACCEPT: Accept(),
    VERDICT_DROP: Drop(),
    XT_RETURN: Return(),
}


@dataclass(frozen=True, slots=True)
class _Extension:
    offset: int
    name: str
    revision: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    entry: IptEntry
    matches: tuple[_Extension, ...]
    target: _Extension

    @property
    def unconditional(self) -> bool:
        # The kernel's unconditional(): an all-zero ipt_ip and no matches.
        return not self.matches and bytes(self.entry.ip) == bytes(IptIp())

    @property
    def end(self) -> int:
        return self.offset + self.entry.next_offset


def _read_extension(entries: bytes, offset: int, limit: int, what: str, entry: int) -> _Extension:
    if offset + MATCH_HEADER_SIZE > limit:
        raise BlobError(f"{what} header runs past the end of the entry", entry)
    header = XtEntryMatch.from_buffer_copy(entries, offset)
    size = header.u.user.size
    if size < MATCH_HEADER_SIZE or offset + size > limit:
        raise BlobError(f"{what} size {size} does not fit the entry", entry)
    name = cstring(bytes(entries[offset + 2 : offset + 2 + XT_EXTENSION_MAXNAMELEN]))
    data = bytes(entries[offset + MATCH_HEADER_SIZE : offset + size])
    return _Extension(offset, name, header.u.user.revision, data)


def _split_entries(entries: bytes) -> Iterator[_Entry]:
    offset = 0
    while offset < len(entries):
        if offset + ENTRY_SIZE > len(entries):
            raise BlobError("entry header runs past the end of the table", offset)
        entry = IptEntry.from_buffer_copy(entries, offset)
        target_offset, next_offset = entry.target_offset, entry.next_offset
        if not ENTRY_SIZE <= target_offset <= next_offset - MATCH_HEADER_SIZE:
            raise BlobError(
                f"bad target_offset {target_offset} for next_offset {next_offset}", offset
            )
        if offset + next_offset > len(entries) or next_offset % XT_ALIGNMENT:
            raise BlobError(f"bad next_offset {next_offset}", offset)
        matches: list[_Extension] = []
        position = offset + ENTRY_SIZE
        while position < offset + target_offset:
            match = _read_extension(entries, position, offset + target_offset, "match", offset)
            matches.append(match)
            position += len(match.data) + MATCH_HEADER_SIZE
        target = _read_extension(
            entries, offset + target_offset, offset + next_offset, "target", offset
        )
        yield _Entry(offset, entry, tuple(matches), target)
        offset += next_offset


def _struct_from(
    extension: _Extension, struct: type[ctypes.Structure], what: str, entry: int
) -> ctypes.Structure:
    if len(extension.data) != xt_align(ctypes.sizeof(struct)):
        raise BlobError(
            f"{what} has {len(extension.data)} bytes of data, expected"
            f" {xt_align(ctypes.sizeof(struct))}",
            entry,
        )
    return struct.from_buffer_copy(extension.data)


def _verdict_of(entry: _Entry) -> int | None:
    """The verdict of a standard target, None for any other target."""
    target = entry.target
    if target.name != STANDARD_TARGET:
        return None
    if len(target.data) < ctypes.sizeof(ctypes.c_int):
        raise BlobError("standard target too short for its verdict", entry.offset)
    return ctypes.c_int.from_buffer_copy(target.data).value


_ADDRESS_FIELDS: tuple[tuple[Literal["src", "dst"], str, str, int], ...] = (
    ("src", "src", "smsk", IPT_INV_SRCIP),
    ("dst", "dst", "dmsk", IPT_INV_DSTIP),
)
_INTERFACE_FIELDS: tuple[tuple[Literal["in", "out"], str, int], ...] = (
    ("in", "iniface", IPT_INV_VIA_IN),
    ("out", "outiface", IPT_INV_VIA_OUT),
)


def _interface(
    direction: Literal["in", "out"], name: bytes, mask: bytes, negated: bool
) -> Interface | None:
    if mask[0] == 0:
        # An empty mask matches every device: only its negation is worth keeping (it never
        # matches), which the parser writes as `! -i +`.
        return Interface(direction, "+", True) if negated else None
    # iptables-save's print_iface: the name under the mask, and `+` when the mask stops
    # before the name's NUL.
    text = bytearray()
    for index in range(IFNAMSIZ):
        if mask[index]:
            if name[index]:
                text.append(name[index])
        else:
            if name[index - 1]:
                text.extend(b"+")
            break
    return Interface(direction, text.decode("utf-8", "surrogateescape"), negated)


def _decode_ip(entry: _Entry) -> list[Match]:
    ip = entry.entry.ip
    if ip.flags & ~IPT_F_MASK or ip.invflags & ~IPT_INV_MASK:
        raise BlobError(
            f"unknown ipt_ip flags 0x{ip.flags:02x} or invflags 0x{ip.invflags:02x}", entry.offset
        )
    if ip.invflags & IPT_INV_TOS:
        raise BlobError("the TOS inversion flag is set, which iptables never does", entry.offset)
    inv = ip.invflags
    matches: list[Match] = []
    for side, address_field, mask_field, flag in _ADDRESS_FIELDS:
        mask = int.from_bytes(field_bytes(ip, mask_field), "big")
        if mask or inv & flag:
            address = int.from_bytes(field_bytes(ip, address_field), "big")
            matches.append(Address(side, address, mask, bool(inv & flag)))
    for direction, field, flag in _INTERFACE_FIELDS:
        name = field_bytes(ip, field)
        interface = _interface(direction, name, field_bytes(ip, f"{field}_mask"), bool(inv & flag))
        if interface is not None:
            matches.append(interface)
    if ip.proto or inv & IPT_INV_PROTO:
        if ip.proto > 0xFF:
            raise BlobError(f"protocol {ip.proto} is not an IP protocol number", entry.offset)
        matches.append(Protocol(ip.proto, bool(inv & IPT_INV_PROTO)))
    if ip.flags & IPT_F_FRAG:
        matches.append(Fragment(bool(inv & IPT_INV_FRAG)))
    return matches


_SUPPORTED = ", ".join(
    f"{name} (revision {families[0].revision})" for name, families in BY_BLOB_NAME.items()
)


def _decode_match(extension: _Extension, entry: int) -> Match:
    families = BY_BLOB_NAME.get(extension.name, ())
    if not families:
        raise BlobError(
            f"match '{extension.name}' is not supported (supported: {_SUPPORTED})", entry
        )
    revision = families[0].revision  # families sharing a blob name share revision and struct
    if extension.revision != revision:
        raise BlobError(
            f"match '{extension.name}' revision {extension.revision} is not supported"
            f" (only revision {revision}, the one iptables-legacy uses)",
            entry,
        )
    data = _struct_from(extension, families[0].data, f"match '{extension.name}'", entry)
    family = next((family for family in families if family.claims(data)), None)
    if family is None:
        raise BlobError(f"match '{extension.name}': no supported match reads this payload", entry)
    try:
        return family.decode(data)
    except BlobError as error:
        raise BlobError(error.message, entry) from None


def _decode_target(entry: _Entry, chain_starts: dict[int, str]) -> Target | None:
    target = entry.target
    if target.name == ERROR_TARGET:
        raise BlobError("an ERROR entry in the middle of a chain", entry.offset)
    goto = bool(entry.entry.ip.flags & IPT_F_GOTO)
    verdict = _verdict_of(entry)
    if verdict is None:
        return _decode_extension_target(target, goto, entry.offset)
    if verdict < 0:
        found = _VERDICTS.get(verdict)
        if found is None:
            name = "QUEUE" if verdict == VERDICT_QUEUE else f"verdict {verdict}"
            raise BlobError(f"{name} is not supported", entry.offset)
        if goto:
            raise BlobError(f"goto flag on a {type(found).__name__} verdict", entry.offset)
        return found
    if verdict == entry.end and not goto:
        return None
    chain = chain_starts.get(verdict)
    if chain is None:
        raise BlobError(
            f"jumps to offset {verdict}, which is not the start of a user chain",
            entry.offset,
        )
    return Goto(chain) if goto else Jump(chain)


_SUPPORTED_TARGETS = ", ".join(
    f"{name} (revision {family.revision})" for name, family in TARGETS_BY_NAME.items()
)


def _decode_extension_target(target: _Extension, goto: bool, entry: int) -> Target:
    family = TARGETS_BY_NAME.get(target.name)
    if family is None:
        raise BlobError(
            f"target '{target.name}' is not supported (supported: ACCEPT, DROP, RETURN,"
            f" {_SUPPORTED_TARGETS}, jumps and gotos to user chains)",
            entry,
        )
    if target.revision != family.revision:
        raise BlobError(
            f"target '{target.name}' revision {target.revision} is not supported"
            f" (only revision {family.revision}, the one iptables-legacy uses)",
            entry,
        )
    if goto:
        raise BlobError(f"goto flag on a {target.name} target", entry)
    data = _struct_from(target, family.data, f"target '{target.name}'", entry)
    try:
        return family.decode(data)
    except BlobError as error:
        raise BlobError(error.message, entry) from None


def _policy(entry: _Entry, chain: Chain) -> None:
    verdict = _verdict_of(entry)
    if not entry.unconditional or verdict not in (VERDICT_ACCEPT, VERDICT_DROP):
        raise BlobError(
            f"the policy entry of {chain.name} is not an unconditional ACCEPT or DROP",
            entry.offset,
        )
    chain.policy = "ACCEPT" if verdict == VERDICT_ACCEPT else "DROP"
    chain.packets = entry.entry.counters.pcnt
    chain.bytes = entry.entry.counters.bcnt


def _error_name(entry: _Entry) -> str:
    data = entry.target.data
    return cstring(data[:XT_FUNCTION_MAXNAMELEN])


def decode_entries(
    entries: bytes,
    hook_entry: Sequence[int],
    underflow: Sequence[int],
    valid_hooks: int = FILTER_VALID_HOOKS,
    num_entries: int | None = None,
) -> Ruleset:
    """The Ruleset of a filter table's entries, given where each hook starts and where its
    policy entry is (from ipt_getinfo or ipt_replace). Rule and policy counters come from the
    entries. Raises BlobError for anything the model cannot hold or that is not laid out as
    libiptc lays tables out."""
    if valid_hooks != FILTER_VALID_HOOKS:
        raise BlobError(
            f"valid hooks 0x{valid_hooks:x} are not the filter table's"
            f" 0x{FILTER_VALID_HOOKS:x} (INPUT, FORWARD, OUTPUT)"
        )
    parsed = list(_split_entries(entries))
    if num_entries is not None and num_entries != len(parsed):
        raise BlobError(f"the table says {num_entries} entries but holds {len(parsed)}")
    if not parsed or parsed[-1].target.name != ERROR_TARGET or _error_name(parsed[-1]) != "ERROR":
        raise BlobError("the table does not end with the ERROR entry")
    starts = {hook_entry[hook]: name for hook, name in HOOKS}
    policies = {name: underflow[hook] for hook, name in HOOKS}
    if len(starts) != len(HOOKS):
        raise BlobError("two built-in chains start at the same entry")
    offsets = {entry.offset for entry in parsed}
    for hook, name in HOOKS:
        if hook_entry[hook] not in offsets or underflow[hook] not in offsets:
            raise BlobError(f"the entry or policy offset of {name} is not an entry boundary")

    # First pass: user chains, so that jumps forward and backward resolve alike.
    chain_starts: dict[int, str] = {}
    user_names: list[tuple[int, str]] = []
    seen_names: set[str] = set()
    for entry in parsed[:-1]:
        if entry.target.name == ERROR_TARGET:
            name = _error_name(entry)
            if name in BUILTIN_CHAINS or name in seen_names:
                raise BlobError(f"chain name '{name}' appears twice", entry.offset)
            user_names.append((entry.offset, name))
            seen_names.add(name)
            chain_starts[entry.end] = name

    ruleset = Ruleset()
    for _, name in user_names:
        ruleset.chains[name] = Chain(name)
    current: Chain | None = None
    finished: set[str] = set()
    for index, entry in enumerate(parsed[:-1]):
        if entry.offset in starts:
            if current is not None:
                raise BlobError(
                    f"chain {current.name} runs into the start of {starts[entry.offset]}",
                    entry.offset,
                )
            current = ruleset.chains[starts[entry.offset]]
        if entry.target.name == ERROR_TARGET:
            if current is not None:
                raise BlobError(f"chain {current.name} has no end", entry.offset)
            if not entry.unconditional:
                raise BlobError("a user chain's ERROR entry has matches", entry.offset)
            current = ruleset.chains[_error_name(entry)]
            continue
        if current is None:
            raise BlobError("the entry belongs to no chain", entry.offset)
        if current.builtin and entry.offset == policies[current.name]:
            _policy(entry, current)
            finished.add(current.name)
            current = None
            continue
        if not current.builtin and parsed[index + 1].target.name == ERROR_TARGET:
            # libiptc ends each user chain with an unconditional RETURN before the next ERROR.
            if not entry.unconditional or _verdict_of(entry) != XT_RETURN:
                raise BlobError(
                    f"user chain {current.name} does not end with an unconditional RETURN",
                    entry.offset,
                )
            current = None
            continue
        try:
            matches = _decode_ip(entry)
            matches.extend(_decode_match(match, entry.offset) for match in entry.matches)
            target = _decode_target(entry, chain_starts)
        except BlobError as error:
            where = f"chain {current.name} rule {len(current.rules) + 1}"
            raise BlobError(f"{where}: {error.message}", entry.offset) from None
        counters = entry.entry.counters
        current.rules.append(Rule(tuple(matches), target, counters.pcnt, counters.bcnt))
    if current is not None:
        raise BlobError(f"chain {current.name} has no end before the final ERROR entry")
    for _, name in HOOKS:
        if name not in finished:
            raise BlobError(f"built-in chain {name} has no policy entry")
    return ruleset


def decode_table(blob: bytes) -> Ruleset:
    """The Ruleset of a struct ipt_replace blob, as encode_table makes it."""
    header_size = ctypes.sizeof(IptReplace)
    if len(blob) < header_size:
        raise BlobError(f"an ipt_replace blob is at least {header_size} bytes, got {len(blob)}")
    header = IptReplace.from_buffer_copy(blob)
    if len(blob) != header_size + header.size:
        raise BlobError(
            f"the ipt_replace header says {header.size} bytes of entries, got"
            f" {len(blob) - header_size}"
        )
    return decode_entries(
        blob[header_size:],
        tuple(header.hook_entry),
        tuple(header.underflow),
        header.valid_hooks,
        header.num_entries,
    )
