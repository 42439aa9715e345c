"""Ruleset -> the struct ipt_replace blob libiptc's TC_COMMIT builds (IPT_SO_SET_REPLACE).

Layout (libiptc's iptcc_compile_table): INPUT, FORWARD and OUTPUT, each its rules then its
policy entry (an unconditional standard target, the hook's underflow); then the user chains
sorted bytewise by name, each an ERROR entry carrying the chain name, its rules, and an
unconditional RETURN; then one ERROR entry named "ERROR". A jump's verdict is the byte offset
of the entry after the target chain's ERROR entry; a rule without a target jumps to the entry
after itself; `-g` is a jump with IPT_F_GOTO in ipt_ip.flags. Each match's payload, and a
target extension's (an xt_entry_target of its own name instead of the standard target), is
its extension's (codegen.rules.extensions).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import (
    CHAIN_ERROR_SIZE,
    CHAIN_FOOT_SIZE,
    CHAIN_START_SIZE,
    ENTRY_SIZE,
    ERROR_TARGET,
    FILTER_VALID_HOOKS,
    HOOKS,
    IFNAMSIZ,
    IPT_F_FRAG,
    IPT_F_GOTO,
    IPT_INV_DSTIP,
    IPT_INV_FRAG,
    IPT_INV_PROTO,
    IPT_INV_SRCIP,
    IPT_INV_VIA_IN,
    IPT_INV_VIA_OUT,
    MATCH_HEADER_SIZE,
    STANDARD_TARGET,
    STANDARD_TARGET_SIZE,
    TABLE_NAME,
    VERDICT_ACCEPT,
    VERDICT_DROP,
    XT_FUNCTION_MAXNAMELEN,
    XT_RETURN,
    IptEntry,
    IptIp,
    IptReplace,
    XtEntryMatch,
    name_bytes,
    xt_align,
)
from codegen.rules.extensions import extension_of, target_extension_of
from codegen.rules.model import (
    Accept,
    Address,
    Chain,
    Drop,
    ExtensionTarget,
    Fragment,
    Goto,
    Interface,
    Match,
    Protocol,
    Return,
    Rule,
    Ruleset,
)
from codegen.rules.names import BUILTIN_CHAINS
from codegen.rules.validation import validate


def _ipv4_bytes(value: int) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * 4)(*value.to_bytes(4, "big"))


def _set_interface(ip: IptIp, match: Interface) -> None:
    name = name_bytes(match.name, IFNAMSIZ, "interface name")
    # xtables_parse_interface: a wildcard's mask covers the prefix before `+` (so `+` alone
    # is an all-zero mask, any device); an exact name's mask covers its NUL terminator too.
    covered = len(name) - 1 if match.wildcard else len(name) + 1
    mask = (ctypes.c_uint8 * IFNAMSIZ)(*([0xFF] * covered))
    if match.direction == "in":
        ip.iniface, ip.iniface_mask = name, mask
        ip.invflags |= IPT_INV_VIA_IN if match.negated else 0
    else:
        ip.outiface, ip.outiface_mask = name, mask
        ip.invflags |= IPT_INV_VIA_OUT if match.negated else 0


def _encode_ip(rule: Rule) -> tuple[IptIp, list[Match]]:
    """The ipt_ip part of `rule` and its other matches, in order."""
    ip = IptIp()
    extensions: list[Match] = []
    for match in rule.matches:
        if isinstance(match, Address):
            if match.direction == "src":
                ip.src, ip.smsk = _ipv4_bytes(match.address), _ipv4_bytes(match.mask)
                ip.invflags |= IPT_INV_SRCIP if match.negated else 0
            else:
                ip.dst, ip.dmsk = _ipv4_bytes(match.address), _ipv4_bytes(match.mask)
                ip.invflags |= IPT_INV_DSTIP if match.negated else 0
        elif isinstance(match, Interface):
            _set_interface(ip, match)
        elif isinstance(match, Protocol):
            ip.proto = match.number
            ip.invflags |= IPT_INV_PROTO if match.negated else 0
        elif isinstance(match, Fragment):
            ip.flags |= IPT_F_FRAG
            ip.invflags |= IPT_INV_FRAG if match.negated else 0
        else:
            extensions.append(match)
    return ip, extensions


def _encode_match(match: Match) -> bytes:
    """One xt_entry_match, as libxt_NAME fills it in."""
    family = extension_of(match)
    return _extension(family.blob_name, family.revision, bytes(family.encode(match)))


def _extension(name: str, revision: int, data: bytes) -> bytes:
    size = MATCH_HEADER_SIZE + xt_align(len(data))
    header = XtEntryMatch()
    header.u.user.size = size
    header.u.user.name = name.encode()
    header.u.user.revision = revision
    return bytes(header) + data.ljust(size - MATCH_HEADER_SIZE, b"\0")


def _extension_target(target: ExtensionTarget) -> bytes:
    """A target extension's xt_entry_target, as libxt_NAME fills it in."""
    family = target_extension_of(target)
    return _extension(family.name, family.revision, bytes(family.encode(target)))


def _standard_target(verdict: int) -> bytes:
    return _extension(STANDARD_TARGET, 0, bytes(ctypes.c_int(verdict)))


def _error_target(name: str) -> bytes:
    errorname = name_bytes(name, XT_FUNCTION_MAXNAMELEN, "chain name")
    return _extension(ERROR_TARGET, 0, errorname.ljust(XT_FUNCTION_MAXNAMELEN, b"\0"))


def _entry(ip: IptIp, matches: bytes, target: bytes, counters: tuple[int, int]) -> bytes:
    entry = IptEntry(ip=ip)
    entry.target_offset = ENTRY_SIZE + len(matches)
    entry.next_offset = entry.target_offset + len(target)
    entry.counters.pcnt, entry.counters.bcnt = counters
    return bytes(entry) + matches + target


@dataclass(slots=True)
class _PlacedRule:
    rule: Rule
    ip: IptIp  # without the goto flag, which needs the layout
    matches: bytes
    target: bytes | None  # a target extension's; None: a standard target, made with the layout
    offset: int = 0

    @property
    def size(self) -> int:
        target = STANDARD_TARGET_SIZE if self.target is None else len(self.target)
        return ENTRY_SIZE + len(self.matches) + target


@dataclass(slots=True)
class _PlacedChain:
    chain: Chain
    rules: list[_PlacedRule]
    head: int = 0  # offset of a user chain's ERROR entry
    foot: int = 0  # offset of the policy (built-in) or RETURN (user) entry

    @property
    def entry(self) -> int:
        """Where the hook or a jump enters: the first rule, or the foot when there is none."""
        if not self.chain.builtin:
            return self.head + CHAIN_START_SIZE
        return self.rules[0].offset if self.rules else self.foot


def _ordered_chains(ruleset: Ruleset) -> list[Chain]:
    builtins = [ruleset.chains[name] for name in BUILTIN_CHAINS]
    # libiptc keeps user chains sorted by strcmp, i.e. bytewise.
    users = sorted(ruleset.user_chains, key=lambda chain: chain.name.encode("utf-8"))
    return builtins + users


def _layout(ruleset: Ruleset) -> tuple[list[_PlacedChain], int, int]:
    """Every chain and rule with its offset (libiptc's first compile pass), the size of the
    entries and their number."""
    placed: list[_PlacedChain] = []
    offset = count = 0
    for chain in _ordered_chains(ruleset):
        rules: list[_PlacedRule] = []
        for rule in chain.rules:
            ip, extensions = _encode_ip(rule)
            matches = b"".join(map(_encode_match, extensions))
            target = rule.target
            extension = _extension_target(target) if isinstance(target, ExtensionTarget) else None
            rules.append(_PlacedRule(rule, ip, matches, extension))
        item = _PlacedChain(chain, rules)
        if not chain.builtin:
            item.head = offset
            offset += CHAIN_START_SIZE
            count += 1
        for placed_rule in rules:
            placed_rule.offset = offset
            offset += placed_rule.size
            count += 1
        item.foot = offset
        offset += CHAIN_FOOT_SIZE
        count += 1
        placed.append(item)
    return placed, offset + CHAIN_ERROR_SIZE, count + 1


def _verdict(placed: _PlacedRule, entries: dict[str, int]) -> tuple[int, int]:
    """(verdict, extra ipt_ip flags) of a rule's standard target."""
    target = placed.rule.target
    if target is None:
        # libiptc's IPTCC_R_FALLTHROUGH: continue with the next entry.
        return placed.offset + placed.size, 0
    if isinstance(target, Accept):
        return VERDICT_ACCEPT, 0
    if isinstance(target, Drop):
        return VERDICT_DROP, 0
    if isinstance(target, Return):
        return XT_RETURN, 0
    return entries[target.chain], IPT_F_GOTO if isinstance(target, Goto) else 0


def _encode_entries(placed: list[_PlacedChain]) -> bytes:
    entries = {item.chain.name: item.entry for item in placed}
    parts: list[bytes] = []
    for item in placed:
        chain = item.chain
        if not chain.builtin:
            parts.append(_entry(IptIp(), b"", _error_target(chain.name), (0, 0)))
        for rule in item.rules:
            counters = (rule.rule.packets, rule.rule.bytes)
            if rule.target is not None:
                parts.append(_entry(rule.ip, rule.matches, rule.target, counters))
                continue
            verdict, flags = _verdict(rule, entries)
            rule.ip.flags |= flags
            parts.append(_entry(rule.ip, rule.matches, _standard_target(verdict), counters))
        if chain.builtin:
            verdict = VERDICT_ACCEPT if chain.policy == "ACCEPT" else VERDICT_DROP
            foot = (chain.packets, chain.bytes)
        else:
            verdict, foot = XT_RETURN, (0, 0)
        parts.append(_entry(IptIp(), b"", _standard_target(verdict), foot))
    parts.append(_entry(IptIp(), b"", _error_target(ERROR_TARGET), (0, 0)))
    return b"".join(parts)


def encode_counters(ruleset: Ruleset) -> list[tuple[int, int]]:
    """(packets, bytes) for every entry of the encoded table, in table order: each rule's,
    each policy's, and zero for the ERROR and user-chain RETURN entries."""
    counters: list[tuple[int, int]] = []
    for chain in _ordered_chains(ruleset):
        if not chain.builtin:
            counters.append((0, 0))
        counters.extend((rule.packets, rule.bytes) for rule in chain.rules)
        counters.append((chain.packets, chain.bytes) if chain.builtin else (0, 0))
    counters.append((0, 0))
    return counters


def encode_table(ruleset: Ruleset) -> bytes:
    """The struct ipt_replace (header then entries) for `ruleset`, byte for byte what
    `iptables-legacy-restore -c` hands the kernel, except `num_counters` and the `counters`
    pointer (zero here), which only the kernel call needs.

    Raises RuleError (from the model's `validate`) for a rule set iptables would refuse and
    BlobError for one the kernel's fields cannot hold."""
    validate(ruleset)
    placed, size, num_entries = _layout(ruleset)
    header = IptReplace(name=TABLE_NAME.encode(), valid_hooks=FILTER_VALID_HOOKS)
    header.num_entries = num_entries
    header.size = size
    by_name = {item.chain.name: item for item in placed}
    for hook, name in HOOKS:
        header.hook_entry[hook] = by_name[name].entry
        header.underflow[hook] = by_name[name].foot
    entries = _encode_entries(placed)
    assert len(entries) == size
    return bytes(header) + entries
