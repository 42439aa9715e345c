"""Long runs of plain rules as entries of a rule table that a loop in the C interprets, so that
the C backend loads rule sets of any length (its inline code stops near 1,600 rules: bcc's clang
emits no `gotol`, and a jump across more than 32,767 instructions is refused).

A plain rule compares only what every rule has (addresses under any mask, devices, protocol,
`-f`), at most one `-m tcp` (ports, flags) or `-m udp` (ports), and comments, and its target is
ACCEPT, DROP, RETURN or none. A run of at least `table_from` plain rules in a row becomes one
entry each in TABLE_MAP, an array built here from the rule model (nothing of the bytecode
backend's classifier or its builder: this backend stays a second opinion), and one loop in the
C: entry by entry, in rule order, the first that matches decides, as ipt_do_table's walk does.
Each entry costs the same whatever the rule set, so a packet that matches nothing pays the
whole run; the C backend is an oracle, not the fast path.

Why `may_goto` and not bpf_loop: bcc does not relocate the callback's address (bpf_loop gets a
null function and the verifier refuses it), and a plain bounded loop is walked by the verifier
once per iteration (100,000 rules would be millions of instructions). A loop headed by
`may_goto` (Linux 6.9) is checked until its state repeats: the index lives in the facts, which
the verifier does not track, so two passes suffice. The kernel bounds such loops at 8,388,608
iterations per run of the program; a run never nears it (MAX_EXPANDED_RULES), and a packet
that would exhaust it is dropped and counted as not handled rather than judged by later rules.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.tcp import TCP_HEADER, TcpMatch
from codegen.rules.extensions.udp import UDP_HEADER, UdpMatch
from codegen.rules.model import Accept, Address, Drop, Fragment, Interface, Protocol, Return, Rule

from .source_text import Code, comment
from .targets import Targets

TABLE_MAP = "rule_table"
# Runs shorter than this stay inline C, the backend's most direct translation of a rule.
TABLE_FROM = 64

# What an entry says when its rule matches, and what the loop makes of the entries it scans.
MISS, COUNT, ACCEPT, DROP, RETURN, HOTDROP, EXHAUSTED = range(7)
_VERDICTS = {type(None): COUNT, Accept: ACCEPT, Drop: DROP, Return: RETURN}
L4_NONE, L4_TCP, L4_UDP = 0, 1, 2

# Entry flags: `!` of each comparison, `-f` / `! -f`, and a rule that can match nothing.
SRC_NOT, DST_NOT, IN_NOT, OUT_NOT, PROTO_NOT = 1, 2, 4, 8, 16
LATER_FRAGMENT, FIRST_FRAGMENT, SPORT_NOT, DPORT_NOT, FLAGS_NOT, NEVER = 32, 64, 128, 256, 512, 1024

# struct table_rule, as the C declares it: seven u32, five u16, six u8 (44 bytes, no padding).
ENTRY = struct.Struct("<7I5H6B")
FIELDS = [
    "u32 saddr;",
    "u32 smask;",
    "u32 daddr;",
    "u32 dmask;",
    "u32 in_ifindex;  // 0: any device",
    "u32 out_ifindex;",
    "u32 slot;  // the rule's counter slot",
    "u16 sport_first;",
    "u16 sport_last;",
    "u16 dport_first;",
    "u16 dport_last;",
    "u16 flags;",
    "u8 protocol;  // 0: any protocol",
    "u8 l4;  // 0, or the -m tcp or -m udp whose ports and flags follow",
    "u8 tcp_mask;",
    "u8 tcp_compare;",
    "u8 verdict;",
    "u8 unused;",
]


@dataclass
class _Fields:
    """An entry being filled in, in ENTRY's order."""

    saddr: int = 0
    smask: int = 0
    daddr: int = 0
    dmask: int = 0
    in_ifindex: int = 0
    out_ifindex: int = 0
    slot: int = 0
    sport_first: int = 0
    sport_last: int = 0xFFFF
    dport_first: int = 0
    dport_last: int = 0xFFFF
    flags: int = 0
    protocol: int = 0
    l4: int = L4_NONE
    tcp_mask: int = 0
    tcp_compare: int = 0
    verdict: int = COUNT

    def pack(self) -> bytes:
        values = list(vars(self).values())
        return ENTRY.pack(*values, 0)


def _device(fields: _Fields, match: Interface, interfaces: Mapping[str, int]) -> bool:
    """A device as the ifindex known when the program is built (as codegen/c/matches does);
    False when a wildcard names several devices, which an entry cannot hold."""
    if match.wildcard:
        indexes = [i for name, i in interfaces.items() if name.startswith(match.name[:-1])]
    else:
        indexes = [interfaces[match.name]] if match.name in interfaces else []
    if len(indexes) > 1:
        return False
    if not indexes:  # nobody has it: never matches, and `!` always does
        fields.flags |= 0 if match.negated else NEVER
        return True
    if match.direction == "in":
        fields.in_ifindex = indexes[0]
        fields.flags |= IN_NOT if match.negated else 0
    else:
        fields.out_ifindex = indexes[0]
        fields.flags |= OUT_NOT if match.negated else 0
    return True


def _transport(fields: _Fields, match: TcpMatch | UdpMatch) -> None:
    fields.l4 = L4_TCP if isinstance(match, TcpMatch) else L4_UDP
    fields.sport_first, fields.sport_last = match.sport.first, match.sport.last
    fields.dport_first, fields.dport_last = match.dport.first, match.dport.last
    fields.flags |= (SPORT_NOT if match.sport.negated else 0) | (
        DPORT_NOT if match.dport.negated else 0
    )
    if isinstance(match, TcpMatch):
        fields.tcp_mask, fields.tcp_compare = match.flags.mask, match.flags.compare
        fields.flags |= FLAGS_NOT if match.flags.negated else 0


def entry(rule: Rule, slot: int, interfaces: Mapping[str, int]) -> bytes | None:
    """The table entry of a plain rule, or None for a rule that is not plain."""
    verdict = _VERDICTS.get(type(rule.target))
    if verdict is None:
        return None
    fields = _Fields(slot=slot, verdict=verdict)
    seen: set[type] = set()
    for match in rule.matches:
        kind = type(match)
        if kind is Comment:
            continue
        key = (kind, getattr(match, "direction", None))
        if key in seen or (kind in (TcpMatch, UdpMatch) and fields.l4 != L4_NONE):
            return None  # a second match of one kind: kept inline
        seen.add(key)  # type: ignore[arg-type]
        if isinstance(match, Address):
            negated = match.negated
            if match.direction == "src":
                fields.saddr, fields.smask = match.address, match.mask
                fields.flags |= SRC_NOT if negated else 0
            else:
                fields.daddr, fields.dmask = match.address, match.mask
                fields.flags |= DST_NOT if negated else 0
        elif isinstance(match, Interface):
            if not _device(fields, match, interfaces):
                return None
        elif isinstance(match, Protocol):
            if match.number == 0:  # -p all: no comparison; `! -p all` matches nothing
                fields.flags |= NEVER if match.negated else 0
            else:
                fields.protocol = match.number
                fields.flags |= PROTO_NOT if match.negated else 0
        elif isinstance(match, Fragment):
            fields.flags |= FIRST_FRAGMENT if match.negated else LATER_FRAGMENT
        elif isinstance(match, TcpMatch | UdpMatch):
            _transport(fields, match)
        else:
            return None
    return fields.pack()


@dataclass(frozen=True)
class Run:
    """Rules `first`..`last` (1-based) of a chain, entries `base`.. of the table."""

    first: int
    last: int
    base: int


class RuleTable:
    """The entries of a unit's runs, in the order the chains were cut into them."""

    def __init__(self, interfaces: Mapping[str, int], table_from: int = TABLE_FROM):
        if table_from < 1:
            raise ValueError(f"runs start at one rule, not {table_from}")
        self.interfaces = interfaces
        self.table_from = table_from
        self.entries: list[bytes] = []

    def runs(self, rules: Sequence[Rule], slots: Sequence[int]) -> list[Run]:
        """Cut a chain (its rules and their counter slots) into runs of plain rules, adding
        their entries; what lies between runs stays inline."""
        found: list[Run] = []
        pending: list[bytes] = []
        for index, rule in enumerate([*rules, None], start=1):
            packed = None if rule is None else entry(rule, slots[index - 1], self.interfaces)
            if packed is not None:
                pending.append(packed)
                continue
            if len(pending) >= self.table_from:
                first = index - len(pending)
                found.append(Run(first, index - 1, len(self.entries)))
                self.entries += pending
            pending = []
        return found


def declarations(entries: int) -> list[str]:
    """The entry struct, the table (the caller's map: compiler.py fills and pins it), the loop's
    guard and the test of one entry."""
    return [
        "// Runs of plain rules as entries of a rule table (codegen/c/table.py).",
        "struct table_rule {",
        *[f"    {field}" for field in FIELDS],
        "};",
        f'BPF_TABLE_PINNED("array", u32, struct table_rule, {TABLE_MAP}, {entries},',
        f'                 PIN_DIR "/{TABLE_MAP}");',
        f"enum {{ RT_MISS = {MISS}, RT_COUNT = {COUNT}, RT_ACCEPT = {ACCEPT}, RT_DROP = {DROP},",
        f"       RT_RETURN = {RETURN}, RT_HOTDROP = {HOTDROP}, RT_EXHAUSTED = {EXHAUSTED} }};",
        f"enum {{ RT_SRC_NOT = {SRC_NOT}, RT_DST_NOT = {DST_NOT}, RT_IN_NOT = {IN_NOT},",
        f"       RT_OUT_NOT = {OUT_NOT}, RT_PROTO_NOT = {PROTO_NOT}, RT_LATER = {LATER_FRAGMENT},",
        f"       RT_FIRST = {FIRST_FRAGMENT}, RT_SPORT_NOT = {SPORT_NOT},",
        f"       RT_DPORT_NOT = {DPORT_NOT}, RT_FLAGS_NOT = {FLAGS_NOT}, RT_NEVER = {NEVER} }};",
        "",
        "// True while the kernel's bound on may_goto loops is not spent (may_goto jumps to",
        "// l_break when it is); the instruction written as bytes, as bpf_experimental.h does",
        "// for assemblers that do not know it.",
        "#define can_loop                                                                  \\",
        "    ({                                                                            \\",
        "        __label__ l_break, l_continue;                                            \\",
        "        bool ret = true;                                                          \\",
        '        asm volatile goto("1:.byte 0xe5; .byte 0;"                                \\',
        '                          ".long ((%l[l_break] - 1b - 8) / 8) & 0xffff;"          \\',
        '                          ".short 0" :::: l_break);                               \\',
        "        goto l_continue;                                                          \\",
        "    l_break:                                                                      \\",
        "        ret = false;                                                              \\",
        "    l_continue:;                                                                  \\",
        "        ret;                                                                      \\",
        "    })",
        "",
        "// `!` as a flag: whether a comparison's outcome misses the rule.",
        "#define RT_MISSES(hit, not) ((hit) == !!(flags & (not)))",
        "",
        "// Entry `at` against the packet, in ip_packet_match's order and then tcp_mt's or",
        "// udp_mt's: RT_MISS, or RT_HOTDROP or the entry's verdict with its slot in f->decided.",
        "static __always_inline int table_rule_decides(facts_t *f, u32 at)",
        "{",
        f"    struct table_rule *r = {TABLE_MAP}.lookup(&at);",
        "",
        "    if (!r)",
        "        return RT_MISS;  // never: the loop stays within the table",
        "    u32 flags = r->flags;",
        "",
        "    if (flags & RT_NEVER)",
        "        return RT_MISS;",
        "    if (RT_MISSES((f->saddr & r->smask) == r->saddr, RT_SRC_NOT))",
        "        return RT_MISS;",
        "    if (RT_MISSES((f->daddr & r->dmask) == r->daddr, RT_DST_NOT))",
        "        return RT_MISS;",
        "    if (r->in_ifindex && RT_MISSES(f->in_ifindex == r->in_ifindex, RT_IN_NOT))",
        "        return RT_MISS;",
        "    if (r->out_ifindex && RT_MISSES(f->out_ifindex == r->out_ifindex, RT_OUT_NOT))",
        "        return RT_MISS;",
        "    if (r->protocol && RT_MISSES(f->protocol == r->protocol, RT_PROTO_NOT))",
        "        return RT_MISS;",
        "    if ((flags & RT_LATER) && f->fragment == 0)",
        "        return RT_MISS;",
        "    if ((flags & RT_FIRST) && f->fragment != 0)",
        "        return RT_MISS;",
        f"    if (r->l4 != {L4_NONE}) {{",
        "        // A later fragment has no header; tcp_mt drops one at offset 1 (it could",
        "        // overwrite the flags); a header cut short is dropped by either.",
        "        if (f->fragment != 0 && (r->l4 != " + str(L4_TCP) + " || f->fragment != 1))",
        "            return RT_MISS;",
        "        if (f->fragment != 0",
        f"            || f->l4_len < (r->l4 == {L4_TCP} ? {TCP_HEADER} : {UDP_HEADER})) {{",
        "            f->decided = r->slot;",
        "            return RT_HOTDROP;",
        "        }",
        "        u32 sport = f->sport, dport = f->dport;",
        "",
        "        if (RT_MISSES(sport >= r->sport_first && sport <= r->sport_last, RT_SPORT_NOT))",
        "            return RT_MISS;",
        "        if (RT_MISSES(dport >= r->dport_first && dport <= r->dport_last, RT_DPORT_NOT))",
        "            return RT_MISS;",
        "        if (RT_MISSES((f->tcp_flags & r->tcp_mask) == r->tcp_compare, RT_FLAGS_NOT))",
        "            return RT_MISS;",
        "    }",
        "    f->decided = r->slot;",
        "    return r->verdict;",
        "}",
        "",
    ]


def scan(chain: str, run: Run, targets: Targets, texts: Sequence[str]) -> Code:
    """The loop over one run's entries, and what its answer becomes where the run is; `texts`
    are the run's rules, listed in a comment by their entries."""
    end = run.base + run.last - run.first + 1
    listing = [comment(f"entry {run.base + offset}: {text}") for offset, text in enumerate(texts)]
    return [
        comment(
            f"Rules {run.first} to {run.last} of {chain}: entries {run.base} to {end - 1} of"
            f" the rule table, the first that matches decides."
        ),
        *listing,
        f"f->table_at = {run.base};",
        "f->table_result = RT_EXHAUSTED;",
        "while (can_loop) {",
        "    u32 at = f->table_at;",
        "",
        f"    if (at >= {end}) {{",
        "        f->table_result = RT_MISS;",
        "        break;",
        "    }",
        "    f->table_at = at + 1;",
        "    int found = table_rule_decides(f, at);",
        "",
        "    if (found == RT_MISS)",
        "        continue;",
        "    if (found == RT_COUNT) {  // a rule without a target: counted, and on",
        "        count(f->decided, f->tot_len);",
        "        continue;",
        "    }",
        "    f->table_result = found;",
        "    break;",
        "}",
        "if (f->table_result == RT_ACCEPT) {",
        *[f"    {line}" for line in targets.accept()],
        "}",
        "if (f->table_result == RT_DROP) {",
        *[f"    {line}" for line in targets.drop()],
        "}",
        "if (f->table_result == RT_RETURN) {",
        "    count(f->decided, f->tot_len);",
        *[f"    {line}" for line in targets.return_()],
        "}",
        "if (f->table_result == RT_HOTDROP) {",
        *[f"    {line}" for line in targets.hotdrop()],
        "}",
        "if (f->table_result == RT_EXHAUSTED) {  // never near: see codegen/c/table.py",
        "    f->decided = NOT_HANDLED;",
        *[f"    {line}" for line in targets.hotdrop()],
        "}",
    ]
