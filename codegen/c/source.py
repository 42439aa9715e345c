"""Rule set -> C source for bcc: the same TC programs as codegen.tc, written as C.

A translation unit holds one or more entry functions (`bpflab_ingress`, `bpflab_egress`,
`bpflab_INPUT`, ...), each a SCHED_CLS program in direct-action mode; bcc compiles the unit once
and each entry loads on its own. This module assembles a unit; its parts are:

- prologue.py: includes, constants, the packet facts (facts.py: struct, map, `parse`), the
  caller's maps (maps.py) and the fragments map (fragments.py);
- chains.py: the user chains' functions, and the code of every rule (matches/: one writer per
  match family; targets.py: what a target becomes where the rule is);
- programs.py: the entry functions, one flavour per hook (ingress classification, egress,
  a single chain for test-run), with the built-in chains inline.

Facts live in a one-slot per-CPU array (the units' own map, `facts`) and are read through a
volatile pointer, so that verification stays linear in the rule count (see the C's comment).
Size: about 20 instructions per inline rule of the shape `-s ADDR -p tcp --dport PORT -j
ACCEPT`, so inline code stops loading at about 1,600 such rules: clang as bcc drives it emits
no `gotol`, and a jump across more than 32,767 instructions is refused ("jump out of range").
Runs of `table_from` plain rules or more are not inline: they are entries of the rule table
(table.py), scanned by one loop whatever their length.

Counters: the same per-CPU array and slot layout as codegen.tc (codegen.tc.layout.CounterLayout),
so every reader of counters works with either backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from codegen.conntrack import uses_conntrack
from codegen.rules.extensions.set import uses_sets
from codegen.rules.model import Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc.layout import CounterLayout
from codegen.tc.local import LocalAddresses
from codegen.tc.log import RING_SIZE
from codegen.tc.matches.addrtype import ADDRESS_TYPES, ADDRESS_TYPES_ENTRIES, uses_addrtype
from codegen.tc.matches.hashlimit import HASHLIMIT_MAP, uses_hashlimit
from codegen.tc.matches.hashlimit import map_entries as hashlimit_entries
from codegen.tc.matches.limit import uses_limit
from codegen.tc.matches.owner import uses_groups, uses_owner
from codegen.tc.matches.policy import uses_policy
from codegen.tc.replies import rejects

from . import bridges as c_bridges
from . import hashlimit as c_hashlimit
from . import limit as c_limit
from . import log as c_log
from . import owner as c_owner
from . import policy as c_policy
from . import recent as c_recent
from . import table as c_table
from .chains import MAX_EXPANDED_RULES, ChainWriter, c_identifier, user_chains_reached
from .entries import CCompileError, Entry, Hook
from .facts import FACTS_MAP, HEADERS
from .fragments import FIRST_DROPPED, FRAGMENTS_MAP, FRAGMENTS_TRACKED
from .maps import COUNTERS_MAP, DEFAULT_PIN_DIR
from .matches import addrtype
from .matches import set as c_set
from .programs import entry_function
from .prologue import prologue
from .source_text import RuleSpan, SourceText, comment
from .targets import ACCEPT, CONTINUE, DROP

__all__ = [
    "ACCEPT",
    "CONTINUE",
    "COUNTERS_MAP",
    "DEFAULT_PIN_DIR",
    "DROP",
    "FACTS_MAP",
    "FIRST_DROPPED",
    "FRAGMENTS_MAP",
    "FRAGMENTS_TRACKED",
    "HEADERS",
    "MAX_EXPANDED_RULES",
    "CCompileError",
    "CSource",
    "Entry",
    "Hook",
    "RuleSpan",
    "c_identifier",
    "comment",
    "generate",
    "user_chains_reached",
]


@dataclass(frozen=True)
class CSource:
    """A translation unit: its text, the programs it holds and where each rule's code is."""

    text: str
    entries: tuple[Entry, ...]
    spans: tuple[RuleSpan, ...]
    layout: CounterLayout
    table: tuple[bytes, ...] = ()  # the rule table's entries (codegen/c/table.py), if any

    def rule_at(self, line: int) -> RuleSpan | None:
        """The rule whose code holds `line` of the source, if any (every copy of an inlined
        chain is the same source lines, so this is exact)."""
        for span in self.spans:
            if span.first_line <= line <= span.last_line:
                return span
        return None


def generate(
    ruleset: Ruleset,
    entries: Sequence[Entry],
    *,
    interfaces: Mapping[str, int],
    fastpath: bool = False,
    pin_dir: str = DEFAULT_PIN_DIR,
    map_entries: Mapping[str, int] | None = None,
    local: LocalAddresses | None = None,
    table_from: int = c_table.TABLE_FROM,
    bridges: bool = True,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> CSource:
    """The C translation unit for `entries`. `map_entries` gives the maps' max_entries as
    declared to bcc (default: the counter layout's size); `local`, what the namespace delivers
    locally (codegen.tc.local; None: its STANDIN); runs of `table_from` plain rules or more
    are scanned from the rule table (codegen/c/table.py); `bridges`: whether a bridge may hand
    packets to iptables (-m physdev reads the ports); `timeouts`: the connection tracker's
    settings (the namespace's conntrack sysctls)."""
    if not entries:
        raise CCompileError("no program to generate")
    names = [entry.function for entry in entries]
    if len(set(names)) != len(names):
        raise CCompileError(f"the same program twice in one unit: {', '.join(names)}")
    entries = tuple(entries)
    layout = CounterLayout.of(ruleset)
    roots = sorted({name for entry in entries for name in entry.builtins})
    reached = user_chains_reached(ruleset, roots)
    chains = ChainWriter(ruleset, layout, interfaces, reached, roots, table_from, bridges)
    text = SourceText()
    text.write(
        prologue(
            layout,
            entries,
            pin_dir,
            map_entries or {},
            timeouts if uses_conntrack(ruleset) else None,
            rejects(ruleset),
            local,
            uses_policy(ruleset),
        )
    )
    if uses_policy(ruleset):
        text.write(c_policy.declarations(any(entry.hook == "chain" for entry in entries)))
    if uses_addrtype(ruleset):
        entries_held = (map_entries or {}).get(ADDRESS_TYPES, ADDRESS_TYPES_ENTRIES)
        text.write(addrtype.declarations(entries_held))
    if c_log.logs(ruleset):
        text.write(c_log.declarations((map_entries or {}).get(c_log.LOG_EVENTS, RING_SIZE)))
    if uses_limit(ruleset):
        text.write(c_limit.declarations(ruleset))
    if uses_owner(ruleset):
        tested = any(entry.hook == "chain" for entry in entries)
        text.write(c_owner.declarations(uses_groups(ruleset), tested))
    if uses_hashlimit(ruleset):
        held = (map_entries or {}).get(HASHLIMIT_MAP, hashlimit_entries(ruleset))
        text.write(c_hashlimit.declarations(held))
    if uses_sets(ruleset):
        text.write(c_set.declarations(ruleset, dict(map_entries or {})))
    if c_recent.matches_of(ruleset):
        text.write(c_recent.declarations(ruleset, dict(map_entries or {})))
    if c_bridges.needed(ruleset, entries, bridges):
        text.write(c_bridges.declarations())
    if chains.table.entries:
        text.write(c_table.declarations(len(chains.table.entries)))
    text.write(chains.user_chains())
    for slot, entry in enumerate(entries):
        text.write(entry_function(entry, chains, fastpath, slot))
    return CSource(text.text, entries, tuple(text.spans), layout, tuple(chains.table.entries))
