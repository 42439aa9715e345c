"""apply, list, save and flush: a rule set's programs attached in a network namespace.

State lives where separate processes can find it:
- bpffs, `/sys/fs/bpf/bpflab/NS/`: the counters map, both programs (the namespace's local
  addresses are constants in the ingress program, read at each apply), one
  tcx link per device and direction (a pinned link stays attached when we exit), and for a
  rule set with conntrack matches the connection tracker's maps (codegen.conntrack), which a
  re-apply keeps, entries and all; for a rule set with LOG rules, their ring buffer and its
  count of dropped events (`log_events`, `log_drops`: new at each apply); -m limit's buckets
  are in no pin but held by the programs, a new map at each apply with every bucket full, as
  netfilter refills every bucket at each table load (codegen.tc.matches.limit); -m hashlimit's
  entries (`hashlimit`), which a re-apply keeps for the names its rules still have, as
  netfilter keeps those tables across a table replace (codegen.tc.matches.hashlimit); -m set's
  sets, one map each (`set_<name in hex>`), which `bpflab set add|del` changes in place
  (harness.deploy.sets); each bytecode program's classifier maps (`classifier_heads_HOOK`,
  `classifier_nodes_HOOK`, `classifier_records_HOOK`), which a re-apply that only replaces
  rules of tree runs patches in place, the programs kept (harness.deploy.patch);
- `/run/bpflab/rulesets/NS.json`: the rule set text, the devices and the counter layout, which
  bpffs cannot hold and `list`/`save` need to put names on counters, and the sets' members.

An apply compiles and verifies everything before it touches what is running; it then swaps each
device's programs with a link update (atomic per hook) and rolls the links back if any step
fails. Counters of rules that did not change are carried over by rule text
(harness.deploy.carry).

Both the state file and the pins record the kernel namespace they belong to (harness.deploy.
identity; the `identity` pin): what a namespace deleted and made again under its name left is
never used, nor written through (its links were severed with its devices); apply removes it
first and starts fresh, and every other command reads it as no rule set applied.

A SIGKILL cannot leave half a switch: before its first link update an apply writes the state it
commits as a journal (`NS.journal`, with the id of its counters map), and renames it over the
state file once every pin is in place. A command that finds a journal applies its rules again,
whole, carrying the counters from whichever map is pinned (the journal's id says whose layout
it has). `BPFLAB_FAULT=POINT` (tests only) makes apply SIGKILL itself at one of FAULT_POINTS.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

from codegen.bpf.info import map_info
from codegen.bpf.isa import MapType
from codegen.bpf.links import TcAttachment
from codegen.bpf.maps import Map, get_pinned, pin
from codegen.bpf.syscall import BpfError
from codegen.conntrack import TrackerMaps, uses_conntrack
from codegen.conntrack.listing import table_lines
from codegen.rules import parse, write
from codegen.rules.extensions.physdev import reads_ports
from codegen.rules.extensions.set import bind_sets, uses_sets
from codegen.rules.iptables_save import parse_dump
from codegen.rules.model import Ruleset
from codegen.rules.sets import SetTable
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS
from codegen.rules.validation import validate
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import CounterLayout, Position
from codegen.tc.log import LOG_DROPS, LOG_EVENTS, logs
from codegen.tc.matches.addrtype import ADDRESS_TYPES, uses_addrtype
from codegen.tc.matches.hashlimit import HASHLIMIT_MAP
from codegen.tc.matches.limit import LIMIT_MAP, uses_limit
from codegen.tc.matches.limit import create_map as create_limit_map
from codegen.tc.replies import (
    INTERFACE_ADDRESSES,
    INTERFACE_ADDRESSES_ENTRIES,
    INTERFACE_VALUE_SIZE,
    rejects,
)
from netns.namespace import PIN_ROOT as PIN_ROOT  # re-exported: where the pins are
from netns.namespace import Namespace

from ..backends import Backend, Program, load_program
from ..collector import collector_held_off
from ..counters import CounterMap
from ..log_reader import LogMaps
from . import attach, identity, patch, recent
from . import hashlimit as hashlimit_tables
from .addresses import fill_interface_map, interface_addresses, local_addresses
from .bridges import BridgeError, bridge_maps, namespace_bridges
from .carry import carry_over, identities_of
from .conntrack_sysctls import namespace_timeouts
from .icmp_limits import open_limits
from .locking import serialised, serialised_last
from .routes import address_types_map, namespace_routes
from .sets import SetsUnavailable, applied_text, namespace_sets, pin_sets, set_maps
from .state import STATE_ROOT as STATE_ROOT  # re-exported: where the state files are
from .state import LifecycleError, finish_killed, read_state, remove_stale
from .state import fault as _fault
from .state import journal_file as _journal_file
from .state import journal_state as _journal_state
from .state import pin_dir as _pin_dir
from .state import previous_state as _previous
from .state import saved_state as _saved_state
from .state import stale as _stale
from .state import state_file as _state_file
from .state import write_journal as _write_state

LOG_PINS = (LOG_EVENTS, LOG_DROPS)  # pinned under these names, as the programs call them


@dataclass
class Applied:
    """What one apply did, for the CLI to report."""

    devices: list[str]
    replaced: bool
    programs: dict[str, Program]
    carried: int  # rules whose counters were carried over
    left_out: tuple[str, ...] = ()  # the other tables of a full dump, not applied
    fresh: str | None = None  # what was removed first: state of a namespace that is gone
    # Rules replaced in the maps, the programs kept (harness.deploy.patch); if whole, why.
    patched: int | str | None = None


def _devices(namespace: Namespace, wanted: list[str] | None) -> dict[str, int]:
    with namespace.ipr() as ipr:
        present = {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}
    if wanted:
        missing = [name for name in wanted if name not in present]
        if missing:
            raise LifecycleError(
                f"no device {', '.join(missing)} in namespace {namespace.name} "
                f"(it has {', '.join(sorted(present))})"
            )
        return {name: present[name] for name in wanted}
    return {name: index for name, index in present.items() if name != "lo"}


@serialised
@collector_held_off  # harness.collector: its full passes cost 100,000 rules seconds
def apply(
    rules_text: str,
    filename: str,
    netns: str,
    *,
    devices: list[str] | None = None,
    fastpath: bool = False,
    backend: Backend = "bytecode",
    sets: SetTable | None = None,
    carry_counters: bool = True,
) -> Applied:
    """Compile, verify and attach `rules_text` to the devices of `netns`; see the module doc.
    `sets`: the ipsets -m set looks up (None: the namespace's own, read now).
    `carry_counters=False`: every counter starts at zero, as after the kernel's
    IPT_SO_SET_REPLACE (`bpflab exec`, where iptables carries counters itself)."""
    dump = parse_dump(rules_text, filename)
    ruleset = dump.ruleset
    validate(ruleset, parsed=True)  # its rules were checked as parse_dump read them
    namespace = Namespace.existing(netns)
    try:
        bridges = namespace_bridges(namespace)
    except BridgeError as error:
        raise LifecycleError(str(error)) from None
    # State left under this name by a namespace that is gone is removed before anything reads
    # it (its connection table, recent and hashlimit entries are not this namespace's).
    # The state file is read once (100,000 rules' identities are megabytes of JSON), and
    # again only where what follows changed it.
    try:
        saved = _saved_state(netns)
    except (OSError, ValueError):
        saved = None  # unreadable: judged by the pins and journal alone, as stale() does
    stale = _stale(netns, saved)
    if stale is not None:
        remove_stale(netns)
        saved = None
    if finish_killed(netns):  # an apply killed before its commit: whole again before this one
        saved = _saved_state(netns)
    here = identity.of(netns)
    if uses_sets(ruleset):
        # -m set's sets as they are now, each copied into a map (harness.deploy.sets); a
        # name they do not hold is refused here, as iptables refuses it.
        if sets is None:
            try:
                sets = namespace_sets(namespace)
            except SetsUnavailable as error:
                raise LifecycleError(str(error)) from None
        ruleset = bind_sets(ruleset, sets)
    targets = _devices(namespace, devices)
    previous = _previous(netns, saved)
    pins = _pin_dir(netns)
    layout = CounterLayout.of(ruleset)
    # Its local addresses as they are now, written into the ingress program: a change is
    # seen at the next apply (codegen.tc.local).
    local = local_addresses(namespace)
    interfaces = _all_interfaces(namespace)
    # Its conntrack sysctls as they are now, compiled into the tracker: a change is seen at
    # the next apply (harness.deploy.conntrack_sysctls).
    timeouts = namespace_timeouts(namespace) if uses_conntrack(ruleset) else DEFAULT_TIMEOUTS
    built_for = patch.applied_with(ruleset, interfaces, local, bridges.ports, timeouts)
    hooks = attach.roles(targets, bridges.ports)
    state = {
        "netns": netns,
        "rules_text": rules_text,
        "filename": filename,
        "targets": targets,
        "fastpath": fastpath,
        "layout": layout,
        "belongs_to": here,
        "backend": backend,
        "carry_counters": carry_counters,
        "applied_with": built_for,
    }
    patched: patch.Patched | str = "no rule set applied before"
    if stale is None and previous is not None and previous is saved:
        patched = patch.try_patch(previous, ruleset, state)
        if isinstance(patched, patch.Patched):  # the programs stay: only rules of runs changed
            if rejects(ruleset):  # the ICMP limits' sysctls as they are now
                open_limits(pins, namespace).close()
            kept = sum(isinstance(position[1], int) for position in layout.positions)
            carried = kept - patched.rules
            return Applied(sorted(targets), True, {}, carried, dump.left_out, None, patched.rules)
    identities = identities_of(ruleset, layout)
    with ExitStack() as cleanup:
        counters = cleanup.enter_context(CounterMap(layout))
        tracker = _tracker(ruleset, pins)
        if tracker is not None:
            cleanup.enter_context(tracker)
        extra: dict[str, object] = {} if tracker is None else dict(tracker.maps)
        if rejects(ruleset):
            shape = (MapType.HASH, 4, INTERFACE_VALUE_SIZE, INTERFACE_ADDRESSES_ENTRIES)
            sources = cleanup.enter_context(Map(*shape, name=INTERFACE_ADDRESSES))
            fill_interface_map(sources, interface_addresses(namespace))
            extra[INTERFACE_ADDRESSES] = sources
        limits = cleanup.enter_context(open_limits(pins, namespace)) if rejects(ruleset) else None
        if limits is not None:  # the ICMP errors' rate limits, kept across applies
            extra.update(limits.maps)
        if uses_addrtype(ruleset):
            # -m addrtype's routes, as they are now: a route changed later is seen at the
            # next apply (codegen.tc.matches.addrtype).
            routes = namespace_routes(namespace)
            extra[ADDRESS_TYPES] = cleanup.enter_context(address_types_map(routes, interfaces))
        if uses_limit(ruleset):
            # -m limit's buckets, every one full: a table load refills them in netfilter too.
            extra[LIMIT_MAP] = cleanup.enter_context(create_limit_map(ruleset))
        hashlimits = hashlimit_tables.kept_or_new(ruleset, pins)
        if hashlimits is not None:  # kept across an apply, as netfilter keeps them
            extra[HASHLIMIT_MAP] = cleanup.enter_context(hashlimits)
        logging = cleanup.enter_context(LogMaps()) if logs(ruleset) else None
        if logging is not None:  # LOG rules' records (codegen.tc.log): a new ring each apply
            extra.update(logging.maps)
        sets_held = set_maps(ruleset, interfaces) if uses_sets(ruleset) else {}
        for name, held in sets_held.items():
            extra[name] = cleanup.enter_context(held)
        extra.update(recent.open_tables(ruleset, pins, cleanup, _replace_pin))  # deploy.recent
        needed = [hook for hook in attach.HOOKS if any(hook in pair for pair in hooks.values())]
        if bridges.ports or reads_ports(ruleset):  # the bridge ports' (codegen.tc.bridges)
            for name, made in bridge_maps(bridges.filtering).items():
                extra[name] = cleanup.enter_context(made)
        programs: dict[str, Program] = {}
        for hook in needed:
            programs[hook] = cleanup.enter_context(
                closing(
                    load_program(
                        ruleset,
                        hook,
                        interfaces=interfaces,
                        maps={COUNTERS_MAP: counters, **extra},
                        fastpath=fastpath,
                        backend=backend,
                        local=local,
                        bridges=bool(bridges.filtering),
                        timeouts=timeouts,
                    )
                )
            )
        _fault("after-compile")
        carried = 0
        if previous is not None and carry_counters:
            carried = carry_over(previous, identities, counters)
        pins.mkdir(parents=True, exist_ok=True)
        if here is not None:  # before any link is pinned: every link pin is judged by it
            identity.pin(pins, here, _replace_pin)
        # The journal: the state this apply commits, written before the first link changes so
        # that a command after a SIGKILL from here to the commit finishes it (read_state).
        layouts = {hook: getattr(program, "layout", None) for hook, program in programs.items()}
        _write_state(
            netns,
            _journal_state(
                **state,
                identities=identities,
                counters_id=map_info(counters.fd).id,
                sets=applied_text(ruleset) if sets_held else None,
                classifier={hook: found for hook, found in layouts.items() if found},
            ),
        )
        try:
            attach.attach_all(namespace, pins, targets, hooks, programs)
        except BaseException:
            _journal_file(netns).unlink(missing_ok=True)  # rolled back: nothing to finish
            raise
        # Attached: from here on the new objects replace the pinned ones.
        pins.mkdir(parents=True, exist_ok=True)
        _replace_pin(pins / "counters", counters.fd)
        for hook in attach.HOOKS:  # what the links run, for bpftool's eyes
            if hook in programs:
                _replace_pin(pins / f"prog_{hook}", programs[hook].fd)
            else:
                (pins / f"prog_{hook}").unlink(missing_ok=True)
        _fault("after-pinning-maps")
        (pins / "local").unlink(missing_ok=True)  # the local-address map of older versions
        _pin_kept(pins, programs)
        patch.pin_tables(pins, programs, _replace_pin)
        if tracker is not None:
            tracker.pin(pins, _replace_pin)
        if limits is not None:
            limits.pin(pins, _replace_pin)
        for name in LOG_PINS:
            if logging is None:
                (pins / name).unlink(missing_ok=True)
            else:
                _replace_pin(pins / name, logging.maps[name].fd)
        hashlimit_tables.keep(hashlimits, ruleset, pins, _replace_pin)
        pin_sets(pins, sets_held, _replace_pin)
        os.replace(_journal_file(netns), _state_file(netns))  # the commit
        fresh = None
        if stale is not None:
            fresh = (
                f"the rule set state under the name {netns} belonged to a namespace that is "
                "gone: removed it and started fresh"
            )
        replaced = previous is not None
        return Applied(sorted(targets), replaced, programs, carried, dump.left_out, fresh, patched)


def _pin_kept(pins: Path, programs: dict[str, Program]) -> None:
    """Pin what each program needs kept while it is attached (the C backend's program array of
    REJECT's answers, which forgets its programs with its last user reference) as
    `keep_NAME_HOOK`, and unpin what the programs replaced kept and these do not."""
    kept = set()
    for hook, program in programs.items():
        for name, fd in getattr(program, "keep", {}).items():
            kept.add(f"keep_{name}_{hook}")
            _replace_pin(pins / f"keep_{name}_{hook}", fd)
    for stale in pins.glob("keep_*"):
        if stale.name not in kept:
            stale.unlink()


def _tracker(ruleset: Ruleset, pins: Path) -> TrackerMaps | None:
    """The connection table of a rule set that asks about connections: the one already pinned
    for the namespace (its connections live on across a re-apply, as netfilter's do across
    a table replace), else a new one."""
    if not uses_conntrack(ruleset):
        return None
    return TrackerMaps.from_pins(pins) or TrackerMaps.create()


def log_maps(netns: str) -> LogMaps:
    """The LOG rules' ring buffer and drop count of the rule set applied in `netns`."""
    if read_state(netns) is None:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    pins = _pin_dir(netns)
    if not all((pins / name).exists() for name in LOG_PINS):
        raise LifecycleError(f"the rule set applied in namespace {netns} has no LOG or NFLOG rules")
    try:
        return LogMaps.from_pins(*(str(pins / name) for name in LOG_PINS))
    except BpfError as error:
        raise LifecycleError(f"the log of namespace {netns} cannot be opened: {error}") from None


def connection_table(netns: str) -> TrackerMaps | None:
    """The connection tracker's maps of the rule set applied in `netns` (None: it has none)."""
    return TrackerMaps.from_pins(_pin_dir(netns))


def _tracked(netns: str) -> TrackerMaps:
    if read_state(netns) is None:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    tracker = connection_table(netns)
    if tracker is None:
        raise LifecycleError(
            f"namespace {netns} has no connection table: no rule set with -m conntrack or "
            "-m state was applied there"
        )
    return tracker


def connections(netns: str) -> list[str]:
    """The connections the programs of `netns` track, as `conntrack -L` lines."""
    with _tracked(netns) as tracker:
        return table_lines(tracker.entries(), time.monotonic_ns())


def forget_connections(netns: str) -> int:
    """Empty the connection table of `netns` (`conntrack -F`); how many entries it held."""
    with _tracked(netns) as tracker:
        return tracker.flush()


def _all_interfaces(namespace: Namespace) -> dict[str, int]:
    with namespace.ipr() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}


def _replace_pin(path: Path, fd: int) -> None:
    temporary = path.with_name(f"new_{path.name}")  # bpffs refuses names with dots
    temporary.unlink(missing_ok=True)
    pin(fd, str(temporary))
    os.replace(temporary, path)


def current(netns: str) -> tuple[Ruleset, dict[Position, tuple[int, int]]]:
    """The applied rule set of `netns` with its live counters folded in."""
    state = read_state(netns)
    if state is None:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    ruleset = parse(state["rules"], state["file"])
    layout = CounterLayout.of(ruleset)
    try:
        fd = get_pinned(str(_pin_dir(netns) / "counters"))
    except BpfError as error:
        raise LifecycleError(f"the counters of namespace {netns} are gone: {error}") from None
    with CounterMap(layout, fd=fd) as counters:
        values = counters.read()
    for position, (packets, bytes_) in values.items():
        chain, index = position
        if chain not in ruleset.chains:
            continue
        target = ruleset.chains[chain]
        if index == "policy":
            target.packets, target.bytes = packets, bytes_
        else:
            rule = target.rules[index - 1]
            rule.packets, rule.bytes = packets, bytes_
    return ruleset, values


def save(netns: str, counters: bool) -> str:
    ruleset, _ = current(netns)
    return write(ruleset, counters=counters)


@serialised_last
def flush(netns: str) -> list[str]:
    """Detach every program of `netns` and remove its pins and state; returns what was removed.
    What a namespace of that name that is gone left is removed without detaching anything."""
    if _stale(netns) is not None:
        remove_stale(netns)
        raise LifecycleError(
            f"no rule set is applied in namespace {netns} (what was left under that name "
            "belonged to a namespace that is gone, and was removed)"
        )
    pins = _pin_dir(netns)
    removed: list[str] = []
    if pins.is_dir():
        for entry in sorted(pins.iterdir()):
            if entry.name.startswith("link_"):
                try:
                    fd = get_pinned(str(entry))
                except BpfError:
                    fd = -1
                if fd >= 0:
                    TcAttachment(0, "ingress", "tcx", fd).detach()
            entry.unlink()
            removed.append(entry.name)
        pins.rmdir()
    had_state = _state_file(netns).exists() or _journal_file(netns).exists()
    _journal_file(netns).unlink(missing_ok=True)  # a killed apply's: flushed with the rest
    _state_file(netns).unlink(missing_ok=True)
    if not removed and not had_state:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    return removed
