"""A re-apply that changes only rules of classified runs, made in the maps: the programs that
run stay, and so do every other rule's counters.

A block list or a generated ACL changes a rule at a time; compiling and verifying 100,000 rules
again for that takes seconds, and replaces the programs. When the new text differs from the
applied one only in rule lines, each replacing a rule inside a run the programs answer with
decision trees (codegen.tc.classifier) by a rule that can join it, the trees are patched in
place (codegen.tc.classifier_patch): new nodes and records in the maps' free room, then one
store per run into its heads array, which the programs read at every packet. A changed rule's
counters start at zero, as a rule that is new does.

Anything else applies whole, as before: another backend, other devices, interfaces or local
addresses than the applied programs were built for (they are in their code), rule sets whose
apply refreshes more than rules (-m limit's buckets, LOG's ring, -m set, -m addrtype's routes,
REJECT's interface addresses), a changed policy, chain or line that is not a rule, a rule that
is not in a tree run or cannot join one, or a patch the maps have no room for
(classifier_patch.Refused); a full apply lays the maps out afresh.

The commit is the journal's, as a full apply's: the new state is written as the journal before
the first map changes, and renamed over the state file after the last; a command finding the
journal of a killed patch applies its rules whole (harness.deploy.state.finish).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass
from pathlib import Path

from codegen.bpf.maps import Map, get_pinned
from codegen.bpf.syscall import BpfError
from codegen.rules import RuleError, parse
from codegen.rules.extensions.set import uses_sets
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import Goto, Jump, Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc import classifier
from codegen.tc import classifier_patch as patching
from codegen.tc.classifier_code import HEADS_MAP, NODES_MAP, RECORDS_MAP
from codegen.tc.log import logs
from codegen.tc.matches.addrtype import uses_addrtype
from codegen.tc.matches.limit import uses_limit
from codegen.tc.replies import rejects

from ..classifier_tables import MappedArray
from ..counters import CounterMap
from .carry import identities_of, identities_replaced
from .state import (
    PATCH_FAULT,
    fault,
    journal_file,
    journal_state,
    pin_dir,
    state_file,
    write_journal,
)

HOOKS = {"ingress": ("INPUT", "FORWARD"), "egress": ("OUTPUT",)}
PINNED = (HEADS_MAP, NODES_MAP, RECORDS_MAP)


def pin_name(table: str, hook: str) -> str:
    return f"{table}_{hook}"


def pin_tables(pins: Path, programs: dict, replace_pin: Callable[[Path, int], None]) -> None:
    """Pin each bytecode program's classifier maps for a later patch (`classifier_nodes_ingress`,
    ...), and unpin those of programs that have none."""
    for hook, program in programs.items():
        has = getattr(program, "layout", None) is not None
        for name in PINNED:
            path = pins / pin_name(name, hook)
            if has:
                replace_pin(path, program.maps[name])
            else:
                path.unlink(missing_ok=True)


@dataclass
class Changed:
    """A rule line of the applied text replaced: its chain and index, its rules then and now."""

    chain: str
    index: int
    old: object
    new: object


def changed_rules(previous: dict, rules_text: str, ruleset: Ruleset) -> list[Changed] | None:
    """The rules the new text replaces, line for line, if every line that differs is a rule
    (of the same chain) in both; None if any other line differs."""
    old_lines = previous["rules"].splitlines()
    new_lines = rules_text.splitlines()
    if len(old_lines) != len(new_lines):
        return None
    rules_at = {}
    for name, chain in ruleset.chains.items():
        for index, rule in enumerate(chain.rules, start=1):
            if rule.source is not None:
                rules_at[rule.source.line] = (name, index)
    changed = []
    for number, (old, new) in enumerate(zip(old_lines, new_lines, strict=True), start=1):
        if old == new:
            continue
        where = rules_at.get(number)
        if where is None or not old.startswith(f"-A {where[0]} "):
            return None
        chain, index = where
        policy = "ACCEPT" if chain in ("INPUT", "FORWARD", "OUTPUT") else "-"
        try:
            before = parse(f"*filter\n:{chain} {policy} [0:0]\n{old}\nCOMMIT\n", "applied")
        except RuleError:
            return None
        rule, old_rule = ruleset.chains[chain].rules[index - 1], before.chains[chain].rules[0]
        if write_rule(chain, rule) != write_rule(chain, old_rule):  # not only respelled
            changed.append(Changed(chain, index, old_rule, rule))
    return changed


def applied_with(
    ruleset: Ruleset,
    interfaces: dict[str, int],
    local: dict[int, int],
    ports: dict[int, int],
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> dict:
    """What the programs of an apply were built for, beside the rules (kept in its state):
    a patch is made only while the namespace still has all of it. `ports`: the bridge ports
    (ifindex -> bridge), whose programs get no patches; `timeouts`: the tracker's settings
    (the namespace's conntrack sysctls) compiled in."""
    return {
        "interfaces": dict(sorted(interfaces.items())),
        "local": sorted([address, int(kind)] for address, kind in local.items()),
        "bridge_ports": sorted([port, bridge] for port, bridge in ports.items()),
        "conntrack": asdict(timeouts),
    }


def refreshes_more(ruleset: Ruleset) -> bool:
    """Whether an apply of the rule set refreshes more than its rules (see the module doc)."""
    return any(test(ruleset) for test in (uses_limit, logs, uses_sets, uses_addrtype, rejects))


@dataclass
class Patched:
    rules: int  # rules replaced in place
    state: dict  # the state committed


def try_patch(previous: dict | None, ruleset: Ruleset, state: dict) -> Patched | str:
    """Make the re-apply of `ruleset` a patch of the maps, if it can be one (see the module
    doc); if it cannot, why not (nothing was changed). `state`: what the apply commits (the
    keywords of harness.deploy.state.journal_state but the identities and ids)."""
    rules_text, layout, built_for = state["rules_text"], state["layout"], state["applied_with"]
    backend, fastpath = state["backend"], state["fastpath"]
    devices, carry_counters = sorted(state["targets"]), state["carry_counters"]
    if previous is None or not carry_counters or backend != "bytecode":
        return "a first apply, counters not carried, or the C backend"
    if (previous.get("backend"), previous.get("fastpath")) != ("bytecode", fastpath):
        return "the programs running were built with another backend or fast path"
    if previous.get("devices") != devices or previous.get("applied_with") != built_for:
        return "other devices, interfaces or local addresses than the programs were built for"
    if built_for["bridge_ports"]:
        return "bridge ports, whose programs are not patched"
    layouts = previous.get("classifier")
    if not layouts or refreshes_more(ruleset):
        return "no classified runs, or an apply refreshes more than rules"
    if previous.get("positions") != [list(position) for position in layout.positions]:
        return "rules or chains added or removed"
    changes = changed_rules(previous, rules_text, ruleset)
    if changes is None:
        return "a line that is not a rule changed"
    interfaces = built_for["interfaces"]
    pins = pin_dir(previous["netns"])
    with ExitStack() as held:
        work = []
        for hook, roots in HOOKS.items():
            chains = _reached(ruleset, roots)
            touched = [change for change in changes if change.chain in chains]
            if not touched:
                continue
            if hook not in layouts:
                return f"the {hook} program has no classified runs"
            try:
                tables = {
                    name: held.enter_context(Map.from_pin(str(pins / pin_name(name, hook))))
                    for name in PINNED
                }
            except BpfError:
                return f"the {hook} program's classifier maps are not pinned"
            made = patch_hook(layouts[hook], tables, touched, ruleset, layout, interfaces, held)
            if isinstance(made, str):
                return made
            work.append((hook, tables, made))
        identities = identities_replaced(previous, changes) or identities_of(ruleset, layout)
        committed = journal_state(
            **state, identities=identities, counters_id=previous.get("counters_id", 0)
        )
        committed["classifier"] = {**layouts}
        for hook, _, (hook_layout, _) in work:
            committed["classifier"][hook] = hook_layout
        netns = previous["netns"]
        write_journal(netns, committed)
        try:
            for _, tables, (_, writes) in work:
                writes.write(tables)
            fault(PATCH_FAULT)
            counters = held.enter_context(CounterMap(layout, fd=get_pinned(str(pins / "counters"))))
            counters.write({(change.chain, change.index): (0, 0) for change in changes})
        except (BpfError, OSError):
            # Some runs may hold the new rules already: the caller applies them whole,
            # over this journal (which a command after a crash would apply whole too).
            return "writing the maps failed"
        os.replace(journal_file(netns), state_file(netns))
    return Patched(len(changes), committed)


def _reached(ruleset: Ruleset, roots: tuple[str, ...]) -> set[str]:
    """The chains a hook's program runs: its built-in chains and the user chains they call."""
    reached, work = set(roots), list(roots)
    while work:
        for rule in ruleset.chains[work.pop()].rules:
            if isinstance(rule.target, Jump | Goto) and rule.target.chain not in reached:
                reached.add(rule.target.chain)
                work.append(rule.target.chain)
    return reached


@dataclass
class _Writes:
    """What a hook's patch writes, in order: the runs' lists of all rules copied, the new
    records and nodes, then each run's new first node into the heads array."""

    nodes: MappedArray
    records: MappedArray
    space: patching.Space
    copies: list[tuple[int, int, int]]
    heads: dict[int, int]

    def write(self, tables: dict[str, Map]) -> None:
        for source, target, count in self.copies:
            self.records.copy(source, target, count)
        for index, value in self.space.records.items():
            self.records[index] = value
        for index, value in self.space.nodes.items():
            self.nodes[index] = value
        for run, head in self.heads.items():
            tables[HEADS_MAP].update(run, head.to_bytes(4, "little"))


def patch_hook(hook_layout, tables, touched, ruleset, layout, interfaces, held):
    """The new layout of a program's classifier maps (`hook_layout`: harness.classifier_tables;
    `tables`: the maps by name) with the rules of `touched` replaced, and what to write for
    it (their `write(tables)`), or why it cannot be done; `held` keeps the maps' memory."""
    runs = hook_layout["runs"]
    sizes = {
        NODES_MAP: (hook_layout["node_end"], classifier.NODE.size),
        RECORDS_MAP: (hook_layout["record_end"], classifier.RECORD.size),
        HEADS_MAP: (len(runs), 4),
    }
    if any((tables[name].max_entries, tables[name].value_size) != sizes[name] for name in sizes):
        return "the pinned classifier maps are not the ones the state describes"
    by_run: dict[int, list[patching.Change]] = {}
    for change in touched:
        covering = [
            number
            for number, run in enumerate(runs)
            if run["chain"] == change.chain and run["first"] <= change.index <= run["last"]
        ]
        if not covering or any(runs[number]["trees"] is None for number in covering):
            return f"rule {change.index} of {change.chain} is not in a tree run"
        old = classifier.entry(change.old, interfaces)
        new = classifier.entry(change.new, interfaces)
        if old is None or new is None:
            return f"rule {change.index} of {change.chain} cannot join a tree run"
        slot = layout.slot((change.chain, change.index))
        for number in covering:
            place = change.index - runs[number]["first"]
            by_run.setdefault(number, []).append(patching.Change(place, old, new, slot))
    nodes = held.enter_context(closing(MappedArray(tables[NODES_MAP])))
    records = held.enter_context(closing(MappedArray(tables[RECORDS_MAP])))
    space = patching.Space(
        nodes.__getitem__,
        records.__getitem__,
        hook_layout["free_nodes"],
        hook_layout["node_end"],
        hook_layout["free_records"],
        hook_layout["record_end"],
    )
    new_runs = list(runs)
    copies, heads = [], {}
    for number, changes in by_run.items():
        run = runs[number]
        chain, first = run["chain"], run["first"]
        rules = ruleset.chains[chain].rules

        def member(place: int, chain=chain, first=first, rules=rules):
            made = classifier.entry(rules[first - 1 + place], interfaces)
            assert made is not None  # it joined the run when it was built
            return made, layout.slot((chain, first + place))

        hulls = [[tuple(tuple(part) for part in box) for box in boxes] for boxes in run["hulls"]]
        shape = patching.RunShape(run["trees"], hulls, run["spare"])
        head = int.from_bytes(tables[HEADS_MAP].lookup(number) or b"", "little")
        try:
            made = patching.patch(space, head, shape, changes, member)
        except patching.Refused as refused:
            return str(refused)
        new_runs[number] = {**run, "spare": made.shape.spare, "hulls": made.shape.hulls}
        copies.append(made.copy)
        heads[number] = made.head
    after = {
        **hook_layout,
        "runs": new_runs,
        "free_nodes": space.free_nodes,
        "free_records": space.free_records,
    }
    return after, _Writes(nodes, records, space, copies, heads)
