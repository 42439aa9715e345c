"""-m recent's tables in an applied rule set: kept across a re-apply as netfilter keeps them,
and listed as /proc/net/xt_recent/NAME lists them.

netfilter (tried with iptables-legacy-restore in a namespace) keeps a table, entries and all,
across a table replace when the new rules still name it; it flushes it when a new rule asks
for a longer ring of stamps (a larger --hitcount), and drops a table no rule names any more.
Here each table's map is pinned as `recent_<digest of its name>` beside the rule set's other
state (bpffs takes no dots, and a name may hold them); an apply takes the pinned map of a name
its rules still have if it has the same shape (the ring the new rules ask for), else a new
empty one, and unpins the rest. What differs: a ring that shrinks (netfilter keeps the longer
ring and its entries, here the table starts empty) and a table whose --mask changed
(netfilter keeps the old mask, here the new one applies to entries kept).
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from codegen.bpf.maps import Map
from codegen.bpf.syscall import BpfError
from codegen.rules.extensions.recent import table_settings
from codegen.rules.model import Ruleset
from codegen.tc.matches.recent import (
    HEADER,
    create_maps,
    map_name,
    uses_recent,
    value_size,
)

PIN_PREFIX = "recent_"


def pin_name(table: str) -> str:
    """The bpffs name of table `table`'s map."""
    return PIN_PREFIX + hashlib.sha256(table.encode()).hexdigest()[:32]


def open_tables(
    ruleset: Ruleset, pins: Path, cleanup: ExitStack, replace: Callable[[Path, int], None]
) -> dict[str, Map]:
    """The maps of `ruleset`'s recent tables and their clock, by the names the programs use
    (none without -m recent): the pinned map of each table kept where its shape allows, the
    others new, all held by `cleanup`; when `cleanup` closes without an error (the apply
    attached the programs), the tables are pinned and the pins of names the rule set lost
    are removed, before the maps close."""
    maps = create_maps(ruleset) if uses_recent(ruleset) else {}
    for held in maps.values():
        cleanup.enter_context(held)
    for name, (_mask, ring) in table_settings(ruleset).items():
        path = pins / pin_name(name)
        if not path.exists():
            continue
        try:
            kept = Map.from_pin(str(path))
        except BpfError:
            continue
        cleanup.enter_context(kept)
        if kept.value_size == value_size(ring) and kept.key_size == 4:
            maps[map_name(name)] = kept

    def pin_on_success(error_type: type | None, *_: object) -> bool:
        if error_type is None:
            pin_tables(pins, ruleset, maps, replace)
        return False

    cleanup.push(pin_on_success)
    return maps


def pin_tables(
    pins: Path, ruleset: Ruleset, maps: dict[str, Map], replace: Callable[[Path, int], None]
) -> None:
    """Pin the tables of the rule set just attached and unpin those of names it lost."""
    wanted = {pin_name(name): maps[map_name(name)] for name in table_settings(ruleset)}
    for name, held in wanted.items():
        replace(pins / name, held.fd)
    for stale in pins.glob(f"{PIN_PREFIX}*"):
        if stale.name not in wanted:
            stale.unlink()


def entry_line(key: bytes, value: bytes, ring: int) -> str:
    """One entry as recent_seq_show prints it."""
    (address,) = struct.unpack("<I", key)
    ttl, index, nstamps = struct.unpack_from("<III", value)
    stamps = struct.unpack_from(f"<{ring}Q", value, HEADER)
    last = stamps[(index - 1) & (ring - 1)]
    text = (
        f"src={socket.inet_ntoa(address.to_bytes(4, 'big'))} ttl: {ttl} last_seen: {last} "
        f"oldest_pkt: {index}"
    )
    for number in range(min(nstamps, ring)):
        text += f"{',' if number else ''} {stamps[number]}"
    return text


def list_tables(ruleset: Ruleset, pins: Path, name: str | None = None) -> dict[str, list[str]]:
    """The entries of the applied rule set's tables (or of table `name`), by table, each
    line as /proc/net/xt_recent/NAME has it; KeyError for a name no rule has."""
    settings = table_settings(ruleset)
    if name is not None and name not in settings:
        raise KeyError(name)
    found: dict[str, list[str]] = {}
    for table, (_mask, ring) in settings.items():
        if name is not None and table != name:
            continue
        path = pins / pin_name(table)
        lines: list[str] = []
        if path.exists():
            with Map.from_pin(str(path)) as held:
                lines = [entry_line(key, value, ring) for key, value in held.items()]
        found[table] = lines
    return found


def namespace_tables(netns: str, name: str | None = None) -> dict[str, list[str]]:
    """list_tables for the rule set applied in `netns` (LifecycleError: none is; KeyError: no
    rule names table `name`)."""
    from codegen.rules import parse
    from netns.namespace import PIN_ROOT

    from .lifecycle import LifecycleError, read_state

    state = read_state(netns)
    if state is None:
        raise LifecycleError(f"no rule set is applied in namespace {netns}")
    return list_tables(parse(state["rules"], state["file"]), PIN_ROOT / netns, name)
