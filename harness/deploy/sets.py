"""The maps of `-m set` (codegen.tc.matches.set): the sets a rule set uses, read from the
namespace's own ipsets (`ipset save` run inside it) or from a file in that format, bound to
the rules (codegen.rules.extensions.set.bind_sets) and copied into one BPF map each.

Where sets come from, as `bpflab apply` takes them: `--sets FILE` when given (the namespace's
ipsets are not read then), else the namespace's own, read at apply time; `verify` and `run`
take `--sets FILE` or, without it, the stand-in sets (codegen.rules.sets.STANDIN_SETS). A set
changed after the apply (`ipset add`) is seen at the next apply, as routes are by -m addrtype.

`bpflab set add|del NAME ENTRY --netns NS` changes the applied copy in place, as `ipset add|del`
changes a set: each set's map is pinned as `set_<name in hex>` beside the rule set's other
state and its members are kept in the state file (`ipset save` text, "sets"), so that a change
is checked as ipset checks it (already there, not there, past maxelem), written into the map
(seen by the next packet, no program is reloaded) and recorded, or refused with nothing
changed. The copy lives until the next apply reads the sets again (`bpflab set save` prints
it in the form `--sets` takes).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

from codegen.bpf.maps import Map
from codegen.bpf.syscall import BpfError
from codegen.rules.extensions.set import bound_sets
from codegen.rules.model import Ruleset
from codegen.rules.set_changes import changed, save_text
from codegen.rules.sets import HASH_NET_IFACE, LIST_SET, IpSet, SetError, SetTable, parse_sets
from codegen.tc.matches.set import changes, entries, map_name, map_shape
from netns.namespace import CommandError, Namespace, NamespaceError

from .locking import serialised
from .state import LifecycleError, pin_dir, read_state, rewrite_state

PIN_PREFIX = "set_"


class SetsUnavailable(NamespaceError):
    """The namespace's ipsets cannot be read, in one sentence."""


def namespace_sets(namespace: Namespace) -> SetTable:
    """The ipsets of `namespace`, as `ipset save` prints them there."""
    if shutil.which("ipset") is None:
        raise SetsUnavailable(
            "the rules use -m set but ipset is not installed to read the namespace's sets "
            "(install it, or give --sets FILE)"
        )
    try:
        saved = namespace.run(["ipset", "save"]).stdout
    except CommandError as error:
        raise SetsUnavailable(f"ipset save failed in namespace {namespace.name}: {error}") from None
    try:
        return parse_sets(saved, f"ipset save in {namespace.name}")
    except SetError as error:
        raise SetsUnavailable(
            f"a set of namespace {namespace.name} cannot be copied: {error}"
        ) from None


def set_maps(ruleset: Ruleset, interfaces: Mapping[str, int] | None = None) -> dict[str, Map]:
    """A new map for each set `ruleset` (bound) uses, filled, by the name the programs use
    (hash:net,iface members under the ifindexes of `interfaces`, name -> ifindex; a list:set
    has none: its members do); the caller closes them."""
    maps: dict[str, Map] = {}
    with ExitStack() as undo:
        for name, table in bound_sets(ruleset).items():
            if table.kind == LIST_SET:
                continue
            kind, key_size, value_size, size, flags = map_shape(table, interfaces)
            held = undo.enter_context(
                Map(kind, key_size, value_size, size, flags=flags, name="bpflab_set")
            )
            filled = entries(table, None, interfaces)
            if filled:
                held.update_batch(list(filled), list(filled.values()))
            maps[map_name(name)] = held
        undo.pop_all()
    return maps


def pin_name(set_name: str) -> str:
    """The bpffs name of set `set_name`'s map (ipset names may hold any character)."""
    return PIN_PREFIX + set_name.encode().hex()


def applied_text(ruleset: Ruleset) -> str | None:
    """The sets `ruleset` (bound) uses as `ipset save` text, for its state (None: none)."""
    used = bound_sets(ruleset)
    return save_text(SetTable(used)) if used else None


def pin_sets(pins: Path, maps: dict[str, Map], replace: Callable[[Path, int], None]) -> None:
    """Pin the set maps of the rule set just attached (`maps` by the programs' names, as
    set_maps made them) and unpin the sets of the rule set it replaced."""
    wanted = {pin_name(name.removeprefix(map_name(""))): held.fd for name, held in maps.items()}
    for name, fd in wanted.items():
        replace(pins / name, fd)
    for stale in pins.glob(f"{PIN_PREFIX}*"):
        if stale.name not in wanted:
            stale.unlink()


def applied_sets(netns: str) -> SetTable:
    """The sets of the rule set applied in `netns`, as `bpflab set` changed them."""
    return _applied(netns)[1]


def _applied(netns: str) -> tuple[dict, SetTable]:
    """The state of the rule set applied in `netns` and its sets."""
    state = read_state(netns)
    if state is None:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    return state, parse_sets(state.get("sets") or "", f"the sets applied in {netns}")


@serialised
def change_set(
    netns: str, name: str, entry: str, *, delete: bool = False, exist: bool = False
) -> tuple[int, int]:
    """`ipset add|del NAME ENTRY` (`exist`: -exist) on the copy of set `name` the rule set
    applied in `netns` reads: the map the programs look up and the state both change, or
    neither does. Returns how many members went in and out."""
    state, sets = _applied(netns)
    if name not in sets:
        used = ", ".join(sets) or "none"
        raise LifecycleError(
            f"the rule set applied in namespace {netns} uses no set '{name}' (it uses: {used})"
        )
    table = sets[name]
    new, went_in, went_out = changed(table, entry, delete=delete, exist=exist)
    interfaces = _devices(netns) if table.kind == HASH_NET_IFACE else None
    written, gone = changes(table, went_in, went_out, interfaces)
    path = pin_dir(netns) / pin_name(name)
    try:
        held = Map.from_pin(str(path))
    except (BpfError, OSError):
        raise LifecycleError(
            f"the map of set '{name}' is not pinned at {path}: apply the rule set again"
        ) from None
    with held:
        try:
            for key, value in written.items():
                held.update(key, value)
            for key in gone:
                held.delete(key)
        except BpfError as error:
            _restore(held, [*written, *gone], table, interfaces)
            raise LifecycleError(
                f"the map of set '{name}' refused the change ({error.strerror}): nothing changed"
            ) from None
        state["sets"] = save_text(SetTable({**sets.sets, name: new}))
        try:
            rewrite_state(netns, state)
        except LifecycleError:
            _restore(held, [*written, *gone], table, interfaces)
            raise
    return len(went_in), len(went_out)


def _devices(netns: str) -> dict[str, int]:
    """The devices of `netns` by name, as hash:net,iface members are put under them."""
    with Namespace.existing(netns).ipr() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link["index"] for link in ipr.get_links()}


def _restore(
    held: Map, keys: list[bytes], table: IpSet, interfaces: Mapping[str, int] | None
) -> None:
    """Put `keys` of `held` back as `table` (the set before the change) has them: nothing
    half-applied."""
    before = entries(table, None, interfaces)
    for key in keys:
        if key in before:
            held.update(key, before[key])
        else:
            held.delete(key)


def load_sets(namespace: Namespace, text: str) -> None:
    """Create the sets of `text` (ipset save format) in `namespace` with ipset restore, as a
    packet script's `sets` asks (our programs then read them back at apply, the netfilter
    twin matches on them)."""
    if shutil.which("ipset") is None:
        raise SetsUnavailable("the script has sets but ipset is not installed to create them")
    with tempfile.NamedTemporaryFile("w", suffix=".ipset") as file:
        file.write(text)
        file.flush()
        try:
            namespace.run(["ipset", "restore", "-file", file.name])
        except CommandError as error:
            reason = error.stderr.strip() if error.stderr else str(error)
            raise SetsUnavailable(f"ipset restore refused the sets: {reason}") from None
