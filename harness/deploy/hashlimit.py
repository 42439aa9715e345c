"""-m hashlimit's entries across applies: netfilter keeps a name's table across a table replace
when the new table has a rule of that name, and destroys it with its last rule (tried with
iptables-legacy-restore: the same rules restored twice let nothing more through). An apply
does the same with the map it pins (`hashlimit`): `kept_or_new` takes the pinned one when it
fits the new rule set (codegen.tc.matches.hashlimit.reusable), `keep` drops the entries of
names the new rule set lacks and pins it once the new programs are attached."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from codegen.bpf.maps import Map, open_pins
from codegen.rules.model import Ruleset
from codegen.tc.matches.hashlimit import HASHLIMIT_PIN, create_map, prune, reusable, uses_hashlimit


def kept_or_new(ruleset: Ruleset, pins: Path) -> Map | None:
    """The entries' map for a rule set with hashlimit matches (None without): the one the
    namespace's rule set had if it fits, else a new one with every key fresh."""
    if not uses_hashlimit(ruleset):
        return None
    def fits(opened: Mapping[str, Map]) -> bool:
        return reusable(opened[HASHLIMIT_PIN], ruleset)

    kept = open_pins(pins, (HASHLIMIT_PIN,), fits)
    return create_map(ruleset) if kept is None else kept[HASHLIMIT_PIN]


def keep(
    table: Map | None, ruleset: Ruleset, pins: Path, replace_pin: Callable[[Path, int], None]
) -> None:
    """After the new programs are attached: `table` pinned without the entries of names
    `ruleset` has no rule for (or the pin removed, for a rule set without hashlimit)."""
    if table is None:
        (pins / HASHLIMIT_PIN).unlink(missing_ok=True)
        return
    prune(table, ruleset)
    replace_pin(pins / HASHLIMIT_PIN, table.fd)
