"""bcc as a compiler and loader: C source in, loaded programs over the caller's maps out.

How the C reaches the caller's maps: bcc opens a map declared with BPF_TABLE_PINNED from its
bpffs path while it compiles, so each compile pins the given maps in a fresh directory under
/sys/fs/bpf/bpflab/ (`c_<pid>_<n>`, no dots: bpffs refuses them), compiles, and removes the
pins at once; bcc holds the maps by fd from then on, and the loaded programs reference the very
maps the caller gave (a counter the program bumps is read through the caller's Map).

bcc prints clang's diagnostics and libbpf's complaints on stderr itself: file descriptor 2 is
pointed at a temporary file around every call into bcc (process-wide, so not thread-safe), and
what it caught becomes one sentence in the exception. Programs are loaded with bcc_func_load
and our own log buffer, at the verifier's statistics level, as the bytecode loader does.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import itertools
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from codegen import conntrack
from codegen.bpf.info import map_info, program_info
from codegen.bpf.isa import MapType, ProgType
from codegen.bpf.loader import (
    FAILURE_LOG_SIZE,
    REFUSALS,
    VerifierError,
    VerifierStats,
    failing_slot,
)
from codegen.bpf.maps import Map, pin
from codegen.bpf.syscall import BpfError, close, error_for
from codegen.conntrack import uses_conntrack
from codegen.rules.extensions.set import uses_sets
from codegen.rules.model import Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc.local import STANDIN, LocalAddresses
from codegen.tc.matches import addrtype as tc_addrtype
from codegen.tc.matches import hashlimit as tc_hashlimit
from codegen.tc.matches.limit import LIMIT_MAP, uses_limit
from codegen.tc.matches.limit import value_size as limit_value_size
from codegen.tc.matches.owner import GROUPS_MAP, uses_groups
from codegen.tc.matches.policy import SECPATH_MAP, SecpathValue, uses_policy
from codegen.tc.replies import rejects

from . import bridges as c_bridges
from . import log as c_log
from . import recent as c_recent
from .maps import REPLIES_MAP
from .matches import set as c_set
from .owner import groups_value_size
from .source import (
    COUNTERS_MAP,
    CCompileError,
    CSource,
    Entry,
    RuleSpan,
    generate,
)
from .table import ENTRY as TABLE_ENTRY
from .table import TABLE_FROM, TABLE_MAP

PIN_ROOT = Path("/sys/fs/bpf/bpflab")
STATS_LOG_SIZE = 1 << 16
LOG_LEVEL_VERBOSE, LOG_LEVEL_STATS = 1, 4
# (map type, key size, value size) each map must have for the C to read it right.
MAP_SHAPES = {
    COUNTERS_MAP: (MapType.PERCPU_ARRAY, 4, 16),
    conntrack.CT_TABLE: (
        MapType.LRU_HASH,
        ctypes.sizeof(conntrack.Key),
        ctypes.sizeof(conntrack.Entry),
    ),
    conntrack.CT_PENDING: (MapType.PERCPU_ARRAY, 4, ctypes.sizeof(conntrack.Pending)),
    conntrack.CT_CLOCK: (MapType.ARRAY, 4, 8),
    tc_addrtype.ADDRESS_TYPES: (MapType.LPM_TRIE, tc_addrtype.KEY.size, tc_addrtype.VALUE.size),
    SECPATH_MAP: (MapType.ARRAY, 4, ctypes.sizeof(SecpathValue)),
    **c_log.MAP_SHAPES,
    **c_bridges.MAP_SHAPES,
}
_compiles = itertools.count(1)
_DIAGNOSTIC = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):(?P<column>\d+): error: (?P<text>.*)$")
_LINE_INFO = re.compile(r"^; (.*) @ (?:/virtual/)?main\.c:(\d+)$", re.MULTILINE)


class BccUnavailable(CCompileError):
    """bcc cannot compile here: not importable, or no kernel headers for it."""


class CVerifierError(VerifierError):
    """The verifier refused a program bcc compiled; names the rule whose C it stopped in, when
    the log's line information says so."""

    def __init__(self, code: int, name: str, log: str, slot: int | None, rule: RuleSpan | None):
        super().__init__(code, name, log, slot, None)
        self.rule = rule
        if rule is not None:
            self.args = (code, f"{self.args[1]} (in the C of {rule})")


@dataclass
class CProgram:
    """A program loaded from bcc's compile; the fd is ours to close."""

    fd: int
    name: str
    stats: VerifierStats | None
    compiled_insns: int  # instructions as clang emitted them, before the verifier's rewrites
    source: CSource = field(repr=False)
    log: str = field(default="", repr=False)
    # Objects closed with the program; `keep` names those among them that must stay pinned
    # while it is attached (a program array forgets its programs with its last user reference).
    resources: list = field(default_factory=list, repr=False)
    keep: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def insn_count(self) -> int:
        """Instructions as the kernel holds them (xlated), as `bpftool prog` counts them."""
        xlated = _xlated_length(self.fd) if self.fd >= 0 else 0
        return xlated // 8 if xlated else self.compiled_insns

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        for resource in self.resources:
            resource.close()
        self.resources.clear()
        self.keep.clear()

    def __enter__(self) -> CProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_programs(
    ruleset: Ruleset,
    entries: Sequence[Entry],
    *,
    interfaces: Mapping[str, int],
    maps: Mapping[str, object],
    fastpath: bool = False,
    local: LocalAddresses | None = None,
    table_from: int = TABLE_FROM,
    bridges: bool = True,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> list[CProgram]:
    """Generate one C unit for `entries`, compile it once with bcc and load every entry
    (`local`: what the namespace delivers locally, for an ingress entry; `table_from`: the
    shortest run of plain rules scanned from the rule table, codegen/c/table.py)."""
    bcc, lib = _import_bcc()
    needed = [COUNTERS_MAP]
    if uses_conntrack(ruleset):
        needed += conntrack.MAPS
    if tc_addrtype.uses_addrtype(ruleset):
        needed.append(tc_addrtype.ADDRESS_TYPES)
    if c_log.logs(ruleset):
        needed += c_log.MAP_SHAPES
    if c_bridges.needed(ruleset, entries, bridges):
        needed += c_bridges.MAP_SHAPES
    if uses_policy(ruleset) and any(entry.hook == "chain" for entry in entries):
        needed.append(SECPATH_MAP)  # a test's security path (codegen/c/policy.py)
    fds = {name: _map_fd(maps, name) for name in needed}
    sizes = {name: _check_map(name, fd) for name, fd in fds.items()}
    if uses_sets(ruleset):  # -m set: each set's map, under its C name (codegen/c/matches/set)
        for identifier, (given, shape) in c_set.map_shapes(ruleset).items():
            fds[identifier] = _map_fd(maps, given)
            sizes[identifier] = _check_shape(identifier, fds[identifier], shape)
    if uses_groups(ruleset) and any(entry.hook == "chain" for entry in entries):
        # a test's supplementary groups, as a group_info (codegen/c/owner.py)
        fds[GROUPS_MAP] = _map_fd(maps, GROUPS_MAP)
        _check_shape(GROUPS_MAP, fds[GROUPS_MAP], (MapType.ARRAY, 4, groups_value_size()))
    if uses_limit(ruleset):  # one value, a word per limit match besides the clock's
        fds[LIMIT_MAP] = _map_fd(maps, LIMIT_MAP)
        _check_shape(LIMIT_MAP, fds[LIMIT_MAP], (MapType.ARRAY, 4, limit_value_size(ruleset)))
    if tc_hashlimit.uses_hashlimit(ruleset):  # -m hashlimit's entries, on the limit's clock
        name = tc_hashlimit.HASHLIMIT_MAP
        fds[name] = _map_fd(maps, name)
        shape = (MapType.LRU_HASH, tc_hashlimit.KEY.size, tc_hashlimit.VALUE.size)
        sizes[name] = _check_shape(name, fds[name], shape)
    if c_recent.matches_of(ruleset):  # -m recent: its clock and tables (codegen/c/recent.py)
        for identifier, (given, shape) in c_recent.map_shapes(ruleset).items():
            fds[identifier] = _map_fd(maps, given)
            sizes[identifier] = _check_shape(identifier, fds[identifier], shape)
    _remove_stale_pins()
    pin_dir = PIN_ROOT / f"c_{os.getpid()}_{next(_compiles)}"
    source = generate(
        ruleset,
        entries,
        interfaces=interfaces,
        fastpath=fastpath,
        pin_dir=str(pin_dir),
        map_entries=sizes,
        local=local,
        table_from=table_from,
        bridges=bridges,
        timeouts=timeouts,
    )
    replies = table = None
    try:
        if rejects(ruleset):
            replies = _reply_programs(entries, maps, STANDIN if local is None else local)
            fds[REPLIES_MAP] = replies.fd
        if source.table:
            table = _rule_table(source)
            fds[TABLE_MAP] = table.fd
        module = _compile(bcc, source, fds, pin_dir)
        try:
            programs = _load_all(bcc, lib, module, source)
        finally:
            module.cleanup()
            atexit.unregister(module.cleanup)
        if replies is not None:  # each program keeps its own reference to the array
            for program in programs:
                held = Map(MapType.PROG_ARRAY, 4, 4, len(entries), fd=os.dup(replies.fd))
                program.resources.append(held)
                program.keep[REPLIES_MAP] = held.fd
    finally:
        for own in (replies, table):  # the programs hold the table now
            if own is not None:
                own.close()
    return programs


def _rule_table(source: CSource) -> Map:
    """The unit's rule table, filled: an array of its own, not one of the caller's maps."""
    table = Map(MapType.ARRAY, 4, TABLE_ENTRY.size, len(source.table), name=TABLE_MAP)
    try:
        table.update_batch(list(range(len(source.table))), list(source.table))
    except BaseException:
        table.close()
        raise
    return table


def _reply_programs(
    entries: Sequence[Entry], maps: Mapping[str, object], local: LocalAddresses
) -> Map:
    """A program array holding, for each entry, the bytecode program that sends REJECT's
    answers for it (codegen.tc.replies.reply_program: the C answer builder as clang compiles
    it, in global functions the verifier checks once; bcc would inline it past what the
    verifier follows). The entry tail-calls it from its drop tail."""
    from codegen.bpf.loader import load
    from codegen.reject import limits as reject_limits
    from codegen.tc.replies import INTERFACE_ADDRESSES, Unavailable, reply_program

    array = Map(MapType.PROG_ARRAY, 4, 4, len(entries), name=REPLIES_MAP)
    try:
        for slot, entry in enumerate(entries):
            builtin = entry.chain if entry.hook == "chain" else None
            ingress = entry.hook in ("ingress", "bridged")  # the devices' addresses and MACs
            if ingress and INTERFACE_ADDRESSES not in maps:
                raise CCompileError(f"REJECT at {entry.hook} needs the {INTERFACE_ADDRESSES} map")
            wanted = {INTERFACE_ADDRESSES: maps[INTERFACE_ADDRESSES]} if ingress else {}
            for name in reject_limits.MAPS:  # the ICMP errors' rate limits
                if name not in maps:
                    raise CCompileError(f"REJECT needs the {name} map")
                wanted[name] = maps[name]
            try:
                items = reply_program(entry.hook, builtin, local)
            except Unavailable as error:
                raise CCompileError(str(error)) from None
            with load(items, name="bpflab_reply", maps=wanted) as program:
                array.update(slot.to_bytes(4, "little"), program.fd.to_bytes(4, "little"))
    except BaseException:
        array.close()
        raise
    return array


_PIN_DIR = re.compile(r"^c_(\d+)_\d+$")


def _remove_stale_pins() -> None:
    """Pin directories left by compiles of processes that died mid-compile (each holds maps
    alive): ours are `c_<pid>_<n>`, and only those of pids that no longer run are removed."""
    try:
        names = os.listdir(PIN_ROOT)
    except FileNotFoundError:
        return
    for name in names:
        found = _PIN_DIR.match(name)
        if found is None or _running(int(found[1])):
            continue
        directory = PIN_ROOT / name
        if directory.is_symlink() or not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.name in MAP_SHAPES and not entry.is_dir():
                entry.unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass  # not only ours: leave it


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _import_bcc():
    try:
        import bcc
        from bcc.libbcc import lib
    except ImportError:
        raise BccUnavailable(
            "bcc is not importable: the C backend needs the distribution's python3-bpfcc "
            "(scripts/bootstrap installs it) and the project's .venv"
        ) from None
    release = os.uname().release
    build = Path("/lib/modules") / release / "build"
    if not build.exists() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise BccUnavailable(
            f"bcc needs kernel headers and there are none for {release} at {build} "
            "(scripts/bootstrap sets them up)"
        )
    return bcc, lib


def _map_fd(maps: Mapping[str, object], name: str) -> int:
    if name not in maps:
        raise CCompileError(f"the C programs need the map {name!r}; got {', '.join(maps)}")
    value = maps[name]
    fd = getattr(value, "fd", value)
    if not isinstance(fd, int) or fd < 0:
        raise CCompileError(f"map {name!r} has no open file descriptor")
    return fd


def _check_map(name: str, fd: int) -> int:
    """The map's max_entries, after checking it has the shape the C declares."""
    return _check_shape(name, fd, MAP_SHAPES[name])


def _check_shape(name: str, fd: int, shape: tuple[MapType, int, int]) -> int:
    info = map_info(fd, f"map {name!r}")
    kind, key, value = shape
    if (info.type, info.key_size, info.value_size) != (kind, key, value):
        raise CCompileError(
            f"map {name!r} must be a {kind.name} map with {key}-byte keys and {value}-byte "
            f"values, not type {info.type} with {info.key_size}/{info.value_size}"
        )
    return int(info.max_entries)


def _xlated_length(fd: int) -> int:
    try:
        info = program_info(fd)
    except BpfError:
        return 0
    return int(info.xlated_prog_len)


@dataclass
class _Captured:
    text: str = ""


@contextmanager
def _stderr_captured() -> Iterator[_Captured]:
    """Point fd 2 at a temporary file for the duration: bcc and clang write there directly."""
    captured = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield captured
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                captured.text = sink.read().decode(errors="replace")
    finally:
        os.close(saved)


def _compile(bcc, source: CSource, fds: Mapping[str, int], pin_dir: Path):
    names = ", ".join(entry.function for entry in source.entries)
    pin_dir.mkdir(parents=True, exist_ok=False)
    try:
        for name, fd in fds.items():
            pin(fd, str(pin_dir / name))
        with _stderr_captured() as captured:
            try:
                module = bcc.BPF(text=source.text.encode())
            except Exception:  # bcc raises a bare Exception; the reason is on stderr
                module = None
    finally:
        for name in fds:
            (pin_dir / name).unlink(missing_ok=True)
        pin_dir.rmdir()
    if module is None:
        reason = _first_error(captured.text, source)
        raise CCompileError(f"bcc could not compile the C of {names}: {reason}")
    return module


def _first_error(diagnostics: str, source: CSource) -> str:
    for line in diagnostics.splitlines():
        found = _DIAGNOSTIC.match(line.strip())
        if found is None:
            continue
        where = Path(found["file"]).name
        message = f"{where}:{found['line']}:{found['column']}: {found['text']}"
        if where == "main.c":
            rule = source.rule_at(int(found["line"]))
            if rule is not None:
                message += f", in the code of rule {rule}"
        return message
    lines = [line.strip() for line in diagnostics.splitlines() if line.strip()]
    return lines[0] if lines else "no diagnostics"


def _load_all(bcc, lib, module, source: CSource) -> list[CProgram]:
    programs: list[CProgram] = []
    try:
        for entry in source.entries:
            programs.append(_load(bcc, lib, module, source, entry.function))
    except BaseException:
        for program in programs:
            program.close()
        raise
    return programs


def _load(bcc, lib, module, source: CSource, name: str) -> CProgram:
    function = name.encode()
    start = lib.bpf_function_start(module.module, function)
    size = lib.bpf_function_size(module.module, function)
    if not start:
        raise CCompileError(f"bcc compiled no function {name}")

    def attempt(level: int, log_size: int) -> tuple[int, int, str]:
        log = ctypes.create_string_buffer(log_size)
        with _stderr_captured():
            ctypes.set_errno(0)
            fd = lib.bcc_func_load(
                module.module,
                ProgType.SCHED_CLS,
                function,
                start,
                size,
                lib.bpf_module_license(module.module),
                lib.bpf_module_kern_version(module.module),
                level,
                log,
                log_size,
                None,
                -1,
            )
            code = ctypes.get_errno()
        return fd, code, log.value.decode(errors="replace")

    fd, code, log = attempt(LOG_LEVEL_STATS, STATS_LOG_SIZE)
    if fd >= 0:
        return CProgram(fd, name, VerifierStats.from_log(log), size // 8, source, log)
    code = code or errno.EINVAL
    if code not in REFUSALS:
        raise error_for(code, f"loading program {name!r}")
    # The kernel keeps the end of a log that overflows: where it stopped, and why.
    fd, _, log = attempt(LOG_LEVEL_VERBOSE | LOG_LEVEL_STATS, FAILURE_LOG_SIZE * 4)
    if fd >= 0:  # accepted on the second try: should not happen, but do not leak it
        close(fd)
        raise error_for(code, f"loading program {name!r}")
    raise CVerifierError(code, name, log, failing_slot(log), _rule_in_log(log, source))


def _rule_in_log(log: str, source: CSource) -> RuleSpan | None:
    """The rule whose C the verifier stopped in. The log's line information quotes source
    lines, but numbered in bcc's rewritten text (its map and helper rewrites add lines), so the
    quoted text is looked up in ours; a line written more than once is told apart by the offset
    of the nearest line that is written once."""
    quoted = [(text.strip(), int(line)) for text, line in _LINE_INFO.findall(log)]
    if not quoted:
        return None
    ours: dict[str, list[int]] = {}
    for number, line in enumerate(source.text.splitlines(), start=1):
        ours.setdefault(line.strip(), []).append(number)
    text, reported = quoted[-1]
    candidates = ours.get(text, [])
    if not candidates:
        return None
    offset = 0
    for other, line in reversed(quoted[:-1]):
        if len(ours.get(other, [])) == 1:
            offset = line - ours[other][0]
            break
    return source.rule_at(min(candidates, key=lambda number: abs(number + offset - reported)))
