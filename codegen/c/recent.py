"""`-m recent`'s tables in C: the bytecode backend's maps (codegen.tc.matches.recent: one LRU
hash per table, key the masked address in host order, value {ttl, index, nstamps, pad,
stamps[ring]}; `recent_clock`, a fixed clock word then a zero template), declared for bcc, and
one function per distinct recent match of the unit, recent_mt written anew as C: 1 when it
matches, 0 when not, -1 where the kernel would hotdrop (an entry it cannot make)."""

from __future__ import annotations

import hashlib

from codegen.bpf.isa import MapType
from codegen.jiffies import HzUnknown, kernel_hz
from codegen.rules.extensions.recent import Recent, table_settings
from codegen.rules.model import Ruleset
from codegen.tc.matches.recent import (
    CLOCK_MAP,
    HEADER,
    clock_size,
    ip_list_tot,
    map_name,
    value_size,
)

from .entries import CCompileError


def c_name(table: str) -> str:
    """The C identifier (and pin name) of table `table`'s map: names may hold any byte."""
    return "recent_" + hashlib.sha256(table.encode()).hexdigest()[:32]


def function_name(match: Recent) -> str:
    """The function that answers for `match` (one per distinct match of a unit)."""
    return "recent_mt_" + hashlib.sha256(repr(match).encode()).hexdigest()[:16]


def matches_of(ruleset: Ruleset) -> list[Recent]:
    """The distinct recent matches of `ruleset`, in rule-set order."""
    found: dict[Recent, None] = {}
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            for match in rule.matches:
                if isinstance(match, Recent):
                    found.setdefault(match)
    return list(found)


def map_shapes(ruleset: Ruleset) -> dict[str, tuple[str, tuple[MapType, int, int]]]:
    """C name -> (the name the caller's maps give it, its shape), the clock's included."""
    shapes = {CLOCK_MAP: (CLOCK_MAP, (MapType.ARRAY, 4, clock_size(ruleset)))}
    for name, (_mask, ring) in table_settings(ruleset).items():
        shapes[c_name(name)] = (map_name(name), (MapType.LRU_HASH, 4, value_size(ring)))
    return shapes


def _hz() -> int:
    try:
        return kernel_hz()
    except HzUnknown as error:
        raise CCompileError(f"-m recent counts in the kernel's jiffies, but {error}") from error


def declarations(ruleset: Ruleset, entries: dict[str, int]) -> list[str]:
    settings = table_settings(ruleset)
    template = clock_size(ruleset) - 8
    lines = [
        "// -m recent (codegen.tc.matches.recent's maps): the clock (0: jiffies) and a zero",
        "// template new entries are made from, then one LRU hash per table.",
        f"struct recent_clock {{ u64 now; u8 zero[{template}]; }};",
        f'BPF_TABLE_PINNED("array", u32, struct recent_clock, {CLOCK_MAP}, 1,',
        f'                 PIN_DIR "/{CLOCK_MAP}");',
    ]
    assert HEADER == 16
    for name, (_mask, ring) in settings.items():
        identifier = c_name(name)
        size = entries.get(identifier, ip_list_tot())
        lines += [
            f"// table {name!r}: a ring of {ring} stamps per address",
            f"struct {identifier}_entry {{ u32 ttl; u32 index; u32 nstamps; u32 pad;"
            f" u64 stamps[{ring}]; }};",
            f'BPF_TABLE_PINNED("lru_hash", u32, struct {identifier}_entry, {identifier}, {size},',
            f'                 PIN_DIR "/{identifier}");',
        ]
    for match in matches_of(ruleset):
        lines += _function(match, *settings[match.name])
    return [*lines, ""]


def _function(match: Recent, mask: int, ring: int) -> list[str]:
    identifier = c_name(match.name)
    entry = f"struct {identifier}_entry"
    yes, no = ("0", "1") if match.negated else ("1", "0")
    lines = [
        f"static __always_inline int {function_name(match)}(facts_t *f)",
        "{",
        "    u32 zero = 0;",
        f"    struct recent_clock *clock = {CLOCK_MAP}.lookup(&zero);",
        "    if (!clock)",
        "        return 0;",
        "    u64 now = clock->now;",
        "    if (!now)",
        "        now = bpf_jiffies64();",
        "    u32 ttl = f->ttl;",
        "    if (f->in_ifindex && f->out_ifindex)",
        "        ttl = (ttl + 1) & 0xff;  // the TTL before forwarding",
        f"    u32 key = f->{'daddr' if match.dest else 'saddr'} & 0x{mask:x}u;",
        f"    {entry} *e = {identifier}.lookup(&key);",
    ]
    if match.rttl:
        lines += ["    if (e && !(e->ttl == ttl || e->ttl == 0 || ttl == 0))", "        e = 0;"]
    lines += ["    if (!e) {"]
    if match.command == "set":
        lines += [
            f"        if ({identifier}.update(&key, ({entry} *)clock->zero))",
            "            return -1;",
            f"        e = {identifier}.lookup(&key);",
            "        if (!e)",
            "            return -1;",
            "        e->ttl = ttl;",
            "        e->index = 1;",
            "        e->nstamps = 1;",
            "        e->stamps[0] = now;",
            f"        return {yes};",
            "    }",
        ]
    else:
        lines += [f"        return {no};", "    }"]
    update = [
        f"    u32 at = e->index & {ring - 1};",
        "    e->stamps[at] = now;",
        "    at += 1;",
        "    e->index = at;",
        "    if (at > e->nstamps)",
        "        e->nstamps = at;",
        "    e->ttl = ttl;",
    ]
    if match.command == "set":
        return [*lines, *update, f"    return {yes};", "}", ""]
    if match.command == "remove":
        return [*lines, f"    {identifier}.delete(&key);", f"    return {yes};", "}", ""]
    if match.seconds:
        window = match.seconds * _hz()
        lines += [
            f"    u64 time = now - {window}ull;",
            "    u32 hits = 0;",
            "    u64 stamps = e->nstamps;",
            "    // Every place of the ring, counted when below nstamps and !time_after(time, it):",
            "    // a trip count clang cannot tie to nstamps: offsets the verifier can bound.",
            f"    for (u32 i = 0; i < {ring}; i++) {{",
            "        u64 fresh = (time - e->stamps[i] - 1) >> 63;",
            "        u64 used = ((u64)i - stamps) >> 63;",
            "        hits += (u32)(fresh & used);",
            "    }",
        ]
    else:
        lines += ["    u32 hits = e->nstamps;"]
    held = f"hits >= {max(match.hitcount, 1)}"
    answer = f"!({held})" if match.negated else held
    lines += [f"    int answer = {answer};"]
    if match.command == "update":
        lines += ["    if (answer) {", *("    " + line for line in update), "    }"]
    return [*lines, "    return answer;", "}", ""]
