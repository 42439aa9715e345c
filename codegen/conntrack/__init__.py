"""The programs' connection tracker: one C source (tracker.bpf.c) that both backends build into
their programs, the maps it keeps its table in, and their layouts as Python reads them.

Why a table of our own and not the kernel's (through the conntrack kfuncs): TC ingress runs
before PREROUTING, so the kernel's entry would lag one packet behind; the kfuncs take TCP and
UDP only; the kernel moves an entry only where netfilter's hooks are on; and BPF_PROG_TEST_RUN
never passes nf_conntrack_in, so no state would carry from packet to packet there. The C is
written once because it is one fixed component, not code generated from rules: the bytecode
backend links the object clang makes of it (codegen.bpf.elf), the C backend compiles it with
its own unit; both are judged against the reference tracker (codegen/rules/tracking).

The maps (`MAPS`), shared by every program of a namespace, ingress and egress alike:
- `ct_table`: LRU hash, Key -> Entry, one element a connection under the lesser of its two
  tuples;
- `ct_pending`: per-CPU array of one Pending: the entry a packet without one would create,
  which ct_confirm puts in the table when the chains accept the packet;
- `ct_clock`: array of two u64: 0 for the monotonic clock, or a fixed time in ns that test
  runs set per packet (a pcap's timestamps, a test's explicit clock), and with a fixed time
  the kernel's jiffies then (xt_conntrack reads a new entry's timeout against them).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map, MapGroup, open_pins
from codegen.jiffies import kernel_hz
from codegen.rules.extensions.connmark import Connmark
from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.conntrack import Conntrack
from codegen.rules.extensions.state import State
from codegen.rules.model import Rule, Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

SOURCE = Path(__file__).with_name("tracker.bpf.c")
CT_TABLE, CT_PENDING, CT_CLOCK = "ct_table", "ct_pending", "ct_clock"
MAPS = (CT_TABLE, CT_PENDING, CT_CLOCK)
SEGMENT_SIZE = 44  # struct ct_segment (scratch in Pending; the layout checks cover it)
CLOCK_ENTRIES = 2  # ct_clock: a fixed time in ns, the jiffies then
TABLE_ENTRIES = 65536  # nf_conntrack_max is 262144; an LRU map forgets the oldest first


class Tuple(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint32),
        ("dst", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class Key(ctypes.Structure):
    _fields_ = [("tuple", Tuple), ("proto", ctypes.c_uint32)]


class Side(ctypes.Structure):
    _fields_ = [
        ("td_end", ctypes.c_uint32),
        ("td_maxend", ctypes.c_uint32),
        ("td_maxwin", ctypes.c_uint32),
        ("td_maxack", ctypes.c_uint32),
        ("td_scale", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class Entry(ctypes.Structure):
    _fields_ = [
        ("orig", Tuple),
        ("reply", Tuple),
        ("deadline", ctypes.c_uint64),
        ("udp_stream_after", ctypes.c_uint64),
        ("status", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("tcp_state", ctypes.c_uint8),
        ("last_index", ctypes.c_uint8),
        ("last_dir", ctypes.c_uint8),
        ("last_seq", ctypes.c_uint32),
        ("last_ack", ctypes.c_uint32),
        ("last_end", ctypes.c_uint32),
        ("last_win", ctypes.c_uint32),
        ("last_wscale", ctypes.c_uint8),
        ("last_flags", ctypes.c_uint8),
        ("retrans", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("mark", ctypes.c_uint32),
        ("seen", Side * 2),
    ]


class Pending(ctypes.Structure):
    _fields_ = [("key", Key), ("entry", Entry), ("segment", ctypes.c_uint8 * SEGMENT_SIZE)]


class Result(ctypes.Structure):
    """struct ct_result: what ct_classify leaves for the chains (the generated matches read
    its fields at these offsets)."""

    _fields_ = [
        ("state", ctypes.c_uint16),
        ("dir", ctypes.c_uint8),
        ("l4proto", ctypes.c_uint8),
        ("status", ctypes.c_uint32),
        ("expires", ctypes.c_uint32),
        ("orig", Tuple),
        ("reply", Tuple),
        ("pending", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
    ]


# The layouts the C must agree with, checked when it compiles (_Static_assert).
LAYOUTS = {"ct_tuple": Tuple, "ct_key": Key, "ct_entry": Entry, "ct_pending": Pending}


def result_field(name: str, part: str | None = None) -> tuple[int, int]:
    """(offset, size) of a field of Result, or of `part` of one of its tuples."""
    descriptor = getattr(Result, name)
    if part is None:
        return descriptor.offset, descriptor.size
    inner = getattr(Tuple, part)
    return descriptor.offset + inner.offset, inner.size


def first_tracking_rule(ruleset: Ruleset) -> tuple[str, int, Rule] | None:
    """The first rule that asks about connections or marks them, if any: its chain, 1-based
    index, itself."""
    return ruleset.first_with((Conntrack, State, Connmark, ConnmarkTarget))


def uses_conntrack(ruleset: Ruleset) -> bool:
    """Whether any rule asks about connections or marks them: netfilter tracks them only
    then (a ct match or target registers the conntrack hooks of the namespace), and so do the
    programs."""
    return first_tracking_rule(ruleset) is not None


def defines(timeouts: Timeouts = DEFAULT_TIMEOUTS) -> dict[str, int]:
    """The tracker's compile-time settings: the timeouts in seconds, the TCP knobs, HZ."""
    values = {f"CT_TIMEOUT_{f.name.upper()}": getattr(timeouts, f.name) for f in fields(timeouts)}
    for knob in ("MAX_RETRANS_COUNT", "BE_LIBERAL", "LOOSE"):
        values[f"CT_TCP_{knob}"] = values.pop(f"CT_TIMEOUT_TCP_{knob}")
    values["CT_HZ"] = kernel_hz()  # a new entry's expiry is read in the kernel's jiffies
    return values


def layout_checks() -> list[str]:
    """_Static_assert lines that stop the compile if the C's structs and ours differ."""
    checks = [
        f"_Static_assert(sizeof(struct {name}) == {ctypes.sizeof(struct)}, "
        f'"struct {name} differs from codegen/conntrack");'
        for name, struct in LAYOUTS.items()
    ]
    for name, _ in Result._fields_:
        offset = getattr(Result, name).offset
        checks.append(
            f"_Static_assert(__builtin_offsetof(struct ct_result, {name}) == {offset}, "
            f'"ct_result.{name} moved");'
        )
    for name, size in (("ct_result", ctypes.sizeof(Result)), ("ct_segment", SEGMENT_SIZE)):
        checks.append(
            f"_Static_assert(sizeof(struct {name}) == {size}, "
            f'"struct {name} differs from codegen/conntrack");'
        )
    return checks


def source(
    prelude: Iterable[str],
    *,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    line_marker: bool = True,
) -> str:
    """The tracker as C text: `prelude` (the includer's types, helpers and map macros), the
    defines (`timeouts`' settings), the C (its lines numbered as in its file, with
    `line_marker`), the layout checks."""
    settings = defines(timeouts).items()
    lines = [*prelude, *(f"#define {name} {value}" for name, value in settings)]
    if line_marker:
        lines.append(f'#line 1 "{SOURCE.name}"')
    lines += [SOURCE.read_text(), *layout_checks()]
    return "\n".join(lines) + "\n"


# The tracker's functions, each verified once (the C's CT_GLOBAL): their arguments as the BTF
# the assembler writes describes them (a pointer is to that many bytes).
GLOBALS: dict[str, tuple[str | int, ...]] = {
    "ct_classify": ("ctx", ctypes.sizeof(Result)),
    "ct_confirm": (ctypes.sizeof(Result),),
    "ct_set_mark": (ctypes.sizeof(Result), "scalar"),
    "ct_pending_expiry": (ctypes.sizeof(Result),),
    "ct_related": ("ctx", "scalar", "scalar", "scalar", ctypes.sizeof(Result)),
    "ct_answer": ("ctx", ctypes.sizeof(Result)),
    "ct_tcp": (ctypes.sizeof(Entry), "scalar", SEGMENT_SIZE, "scalar"),
    "ct_tcp_window": (ctypes.sizeof(Entry), "scalar", SEGMENT_SIZE),
    "ct_tcp_segment": ("ctx", "scalar", "scalar", SEGMENT_SIZE),
    "ct_tcp_option": ("ctx", "scalar", "scalar", SEGMENT_SIZE),
}

# What clang needs around the C to make an object whose maps the bytecode backend links by name.
CLANG_PRELUDE = (
    "#include <linux/bpf.h>",
    "#include <bpf/bpf_helpers.h>",
    f"#define CT_DECLARE_MAPS extern int {', '.join(MAPS)};",
    "#define CT_LOOKUP(map, key) bpf_map_lookup_elem(&map, key)",
    "#define CT_INSERT(map, key, value) bpf_map_update_elem(&map, key, value, BPF_NOEXIST)",
    "#define CT_DELETE(map, key) bpf_map_delete_elem(&map, key)",
)


class TrackerUnavailable(RuntimeError):
    """The tracker cannot be built here (no clang for the BPF target, or it failed)."""


@functools.cache
def bytecode_functions(timeouts: Timeouts = DEFAULT_TIMEOUTS) -> tuple:
    """The tracker's functions as assembler items (BTF-described globals the bytecode
    backend's programs call), from clang's object of it with `timeouts`' settings; compiled
    once per source and settings, and cached. Raises TrackerUnavailable, saying why, where
    that cannot be done."""
    from codegen.bpf.clang import ClangError, ClangUnavailable, linked_globals
    from codegen.bpf.elf import ObjectError

    try:
        text = source(CLANG_PRELUDE, timeouts=timeouts)
        return linked_globals(text, name="tracker", arguments=GLOBALS)
    except (ClangUnavailable, ClangError, ObjectError) as error:
        raise TrackerUnavailable(str(error)) from error


class TrackerMaps(MapGroup):
    """The three maps of one namespace's tracker (or of one test run's), created anew or
    opened from their pins; `maps` gives them by the names the programs use."""

    @classmethod
    def create(cls, entries: int = TABLE_ENTRIES) -> TrackerMaps:
        return cls.made(
            {
                CT_TABLE: (MapType.LRU_HASH, ctypes.sizeof(Key), ctypes.sizeof(Entry), entries),
                CT_PENDING: (MapType.PERCPU_ARRAY, 4, ctypes.sizeof(Pending), 1),
                CT_CLOCK: (MapType.ARRAY, 4, 8, CLOCK_ENTRIES),
            }
        )

    @classmethod
    def from_pins(cls, directory: Path) -> TrackerMaps | None:
        """The maps pinned in `directory` (by their names), or None if any is missing or not
        of the shape this tracker uses (then a new table starts)."""

        def fits(opened: Mapping[str, Map]) -> bool:
            table, clock = opened[CT_TABLE], opened[CT_CLOCK]
            shape = (ctypes.sizeof(Key), ctypes.sizeof(Entry))
            return (table.key_size, table.value_size) == shape and (
                clock.max_entries == CLOCK_ENTRIES
            )

        opened = open_pins(directory, MAPS, fits)
        return None if opened is None else cls(opened)

    def set_clock(self, nanoseconds: int, jiffies: int = 0) -> None:
        """Fix the tracker's clock at `nanoseconds`, when the kernel's jiffies read `jiffies`
        (0 nanoseconds: back to the monotonic clock and the real jiffies)."""
        self.maps[CT_CLOCK].update(1, (jiffies & 0xFFFF_FFFF).to_bytes(8, "little"))
        self.maps[CT_CLOCK].update(0, nanoseconds.to_bytes(8, "little"))

    def entries(self) -> list[Entry]:
        return [Entry.from_buffer_copy(value) for _, value in self.maps[CT_TABLE].items()]

    def flush(self) -> int:
        keys = list(self.maps[CT_TABLE].keys())
        for key in keys:
            self.maps[CT_TABLE].delete(key)
        return len(keys)
