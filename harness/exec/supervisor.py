"""The supervisor of `bpflab exec` (harness.exec.process starts it): each intercepted
filter-table call answered from the namespace's applied rule set, or let through.

Semantics (the kernel's ip_tables, net/ipv4/netfilter/ip_tables.c):
- GET_INFO / GET_ENTRIES: the applied rule set with its live counters (summed over CPUs)
  encoded as libiptc would send it, with the kernel's comefrom bits (harness.exec.table); the
  encoding is kept in /run/bpflab/exec/NS.table by the rule set's digest, so a read does not
  parse the rules again. A namespace where nothing is applied reads as the empty filter
  table. A GET_ENTRIES whose size is not the table's fails with EAGAIN, as in the kernel.
- SET_REPLACE: decode, then lifecycle.apply (compile, verify, atomic swap) on every device of
  the namespace (netfilter's hooks see them all), with every counter at zero; the old
  table's counters, read after the swap, go to the caller's `counters` pointer. A blob we
  cannot decode or a rule set that does not compile or verify fails with EINVAL and changes
  nothing; the reason goes to the supervisor's stderr. `num_counters` not the old table's
  entry count fails with EAGAIN (someone replaced the table in between).
- ADD_COUNTERS: adds to the counters map (read, add, write: packets counted by the programs
  between the read and the write are lost; the kernel adds atomically per CPU).
- GET_REVISION_MATCH/TARGET: revision R of an extension we generate answers 0 when R is ours,
  EPROTONOSUPPORT otherwise, ENOENT for an extension we do not generate (xt_find_revision's
  errnos). The query names no table: a process whose command line names another table
  (`-t nat`) has its revision queries go to the kernel.

Serialisation: iptables' xtables lock orders iptables processes, from their GET_INFO to their
ADD_COUNTERS; here the namespace's writers' lock (harness.deploy.locking: a flock of
/run/bpflab/exec/NS.lock) is held around each SET_REPLACE and ADD_COUNTERS, so that two
supervisors, or a supervisor and `bpflab apply` or `flush`, which take it too, never change the
table at once, and the num_counters check sees a settled table.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import socket
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import BpfError
from codegen.rules import parse, write
from codegen.rules.blob.decode import decode_entries
from codegen.rules.blob.ipset import KernelSetIndexes
from codegen.rules.blob.structs import (
    IPT_SO_GET_ENTRIES,
    IPT_SO_GET_INFO,
    IPT_SO_SET_ADD_COUNTERS,
    IPT_SO_SET_REPLACE,
    TABLE_NAME,
    BlobError,
)
from codegen.rules.extensions.set import set_indexes
from codegen.rules.model import RuleError, Ruleset
from codegen.tc.layout import CounterLayout, Position
from netns.namespace import PIN_ROOT

from ..counters import CounterMap
from ..deploy.locking import LOCK_ROOT, NamespaceBusy, namespace_lock, table_path
from . import seccomp
from .table import (
    COUNTERS_INFO_SIZE,
    COUNTERS_SIZE,
    GET_ENTRIES_SIZE,
    GETINFO_SIZE,
    REPLACE_SIZE,
    REVISION,
    Table,
    added_counters,
    counters_bytes,
    counters_info,
    replace_header,
    request_name,
    revision_answer,
    table_as_sent,
    table_of,
    with_counters,
    with_live_counters,
)

IPT_SO_GET_REVISION_MATCH = 66
IPT_SO_GET_REVISION_TARGET = 67
SIOCGSKNS = 0x894C  # <linux/sockios.h>: a socket's network namespace, as an fd
POLL_MS = 200
MAX_TABLE_SIZE = 256 << 20  # bytes of entries a SET_REPLACE may hand us (10,000 rules: 2.5 MB)
SOURCE = "IPT_SO_SET_REPLACE"  # the file name the applied rule set's messages carry


class _Continue(Exception):
    """Not ours: let the kernel run the call."""


def exit_status(status: int) -> int:
    """A wait status as a shell's exit status: 128 + N for a signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def identity(fd: int) -> tuple[int, int]:
    """What tells network namespaces apart: the (device, inode) of a namespace fd."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


class Supervisor:
    """Answers one listener's notifications for namespace `netns`."""

    def __init__(
        self,
        netns: str,
        identity: tuple[int, int],
        backend: str,
        log: TextIO,
        *,
        fastpath: bool = False,
    ):
        self.netns = netns
        self.identity = identity
        self.backend = backend
        self.fastpath = fastpath  # on for every table applied, else as the applied one had it
        self.log = log
        # (digest of the rules text, its Table without counters): the last applied rule set
        self._cached: tuple[str, Table] | None = None

    def serve(self, listener: int, pid: int) -> int:
        """Answer calls until the child `pid` exits; its exit status. Each round waits at
        most POLL_MS for a call, so the child's end is seen within that."""
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while True:
            hung_up = False
            for _, event in poller.poll(POLL_MS):
                if event & select.POLLIN:
                    notif = seccomp.receive(listener)
                    if notif is not None:
                        self.answer(listener, notif)
                if event & (select.POLLHUP | select.POLLERR):
                    hung_up = True  # no filtered process is left
            done, status = os.waitpid(pid, 0 if hung_up else os.WNOHANG)
            if done:
                return exit_status(status)

    def answer(self, listener: int, notif: seccomp.SeccompNotif) -> None:
        """Exactly one response per notification."""
        call = _Call(listener, notif)
        try:
            number = self._dispatch(call)
        except _Continue:
            seccomp.let_through(listener, notif.id)
            return
        except seccomp.MemoryError_:
            number = errno.EFAULT
        except NamespaceBusy as busy:
            self._say(str(busy))
            number = errno.EAGAIN
        except Exception as error:  # a bug must not leave the caller blocked
            self._say(f"internal error answering {call.what}: {error!r}")
            number = errno.EINVAL
        seccomp.respond(listener, notif.id, error=number)

    def _say(self, message: str) -> None:
        print(f"bpflab exec: {message}", file=self.log, flush=True)

    # Dispatch -----------------------------------------------------------------------------

    def _dispatch(self, call: _Call) -> int:
        with self._socket(call) as sock:
            if call.setting:
                if call.option == IPT_SO_SET_REPLACE:
                    return self._replace(call, sock)
                if call.option == IPT_SO_SET_ADD_COUNTERS:
                    return self._add_counters(call, sock)
                raise _Continue
            if call.option == IPT_SO_GET_INFO:
                return self._get_info(call, sock)
            if call.option == IPT_SO_GET_ENTRIES:
                return self._get_entries(call, sock)
            return self._revision(call)

    @contextmanager
    def _socket(self, call: _Call):
        """The caller's socket, if it is an AF_INET socket of our namespace; else _Continue
        (the kernel answers, EBADF or ENOTSOCK included)."""
        taken = seccomp.take_fd(call.pid, call.fd)
        if taken is None:
            raise _Continue
        try:
            sock = socket.socket(fileno=taken)
        except OSError:
            os.close(taken)
            raise _Continue from None
        try:
            if sock.family != socket.AF_INET:
                raise _Continue
            try:
                namespace_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
            except OSError:
                raise _Continue from None
            try:
                if identity(namespace_fd) != self.identity:
                    raise _Continue
            finally:
                os.close(namespace_fd)
            yield sock
        finally:
            sock.close()

    # Reading ------------------------------------------------------------------------------

    def _table(self, sock: socket.socket) -> Table:
        """The applied table with its live counters (lifecycle.current's, without parsing
        the rule set again while it is the one applied)."""
        state = _read_state(self.netns)
        base = self._base(state, sock)
        counters = self._counter_map(state)
        if counters is None:
            if state is not None:
                self._say(f"the counters of namespace {self.netns} are gone; reading zeros")
            return base
        with counters:
            return with_live_counters(base, counters.read())

    def _base(self, state: dict | None, sock: socket.socket) -> Table:
        """The table of the rule set `state` holds, counters zero: kept in memory and in
        LOCK_ROOT/NS.table (keyed by the rule set text's digest), so that reading a big
        table does not parse its rules again."""
        rules = state["rules"] if state else ""
        digest = hashlib.sha256(rules.encode()).hexdigest()
        if self._cached is not None and self._cached[0] == digest:
            return self._cached[1]
        table = _load_table(self.netns, digest)
        if table is None:
            ruleset = parse(rules, state["file"]) if state else Ruleset()
            with set_indexes(KernelSetIndexes(sock)):
                table = table_of(with_counters(ruleset, {}))
            _store_table(self.netns, digest, table)
        self._cached = (digest, table)
        return table

    def _get_info(self, call: _Call, sock: socket.socket) -> int:
        length = call.length()
        if length != GETINFO_SIZE:
            raise _Continue  # the kernel's EINVAL
        request = call.read(call.buffer, length)
        if request_name(request) != TABLE_NAME:
            raise _Continue
        call.check()
        call.write(call.buffer, self._table(sock).info)
        return 0

    def _get_entries(self, call: _Call, sock: socket.socket) -> int:
        length = call.length()
        if length < GET_ENTRIES_SIZE:
            raise _Continue
        request = call.read(call.buffer, GET_ENTRIES_SIZE)
        size = struct.unpack_from("<I", request, 32)[0]
        if request_name(request) != TABLE_NAME or length != GET_ENTRIES_SIZE + size:
            raise _Continue
        call.check()
        table = self._table(sock)
        if size != table.size:
            return errno.EAGAIN
        call.write(call.buffer + GET_ENTRIES_SIZE, table.entries)
        return 0

    def _revision(self, call: _Call) -> int:
        if call.length() != REVISION.size or _names_other_table(call.pid):
            raise _Continue
        request = call.read(call.buffer, REVISION.size)
        call.check()
        return revision_answer(request, call.option == IPT_SO_GET_REVISION_TARGET)

    # Writing ------------------------------------------------------------------------------

    def _replace(self, call: _Call, sock: socket.socket) -> int:
        length = call.setsockopt_length
        if length < REPLACE_SIZE:
            raise _Continue
        header = replace_header(call.read(call.buffer, REPLACE_SIZE))
        if request_name(bytes(header)) != TABLE_NAME:
            raise _Continue
        if header.num_counters == 0 or length < REPLACE_SIZE + header.size:
            return errno.EINVAL
        if header.size > MAX_TABLE_SIZE:
            return errno.ENOMEM  # xt_alloc_table_info refuses tables beyond memory
        entries = call.read(call.buffer + REPLACE_SIZE, header.size)
        call.check()
        try:
            with set_indexes(KernelSetIndexes(sock)):
                ruleset = decode_entries(
                    entries,
                    tuple(header.hook_entry),
                    tuple(header.underflow),
                    header.valid_hooks,
                    header.num_entries,
                )
        except (BlobError, RuleError) as error:
            self._say(f"{SOURCE} refused, nothing changed: {error}")
            return errno.EINVAL
        with self._locked():
            return self._swap(call, sock, header, entries, ruleset)

    def _swap(
        self, call: _Call, sock: socket.socket, header, entries: bytes, ruleset: Ruleset
    ) -> int:
        from ..deploy.lifecycle import apply

        state = _read_state(self.netns)
        old = self._base(state, sock)
        if header.num_counters != len(old.positions):
            return errno.EAGAIN  # xt_replace_table: the table changed since GET_INFO
        old_counters = self._counter_map(state)  # held across the swap, read after it
        text = write(with_counters(ruleset, {}))
        try:
            apply(
                text,
                SOURCE,
                self.netns,
                devices=None,  # every device, as netfilter's hooks see every device
                fastpath=self.fastpath or bool(state and state.get("fastpath")),
                backend=self.backend,  # type: ignore[arg-type]
                carry_counters=False,
            )
        except Exception as error:  # compile, verify, attach: all refuse the whole update
            if old_counters is not None:
                old_counters.close()
            self._say(f"{SOURCE} refused, nothing changed: {_sentence(error)}")
            return errno.EINVAL
        new = table_as_sent(header, entries, ruleset)  # the new table, for the calls after
        digest = hashlib.sha256(text.encode()).hexdigest()
        _store_table(self.netns, digest, new)
        self._cached = (digest, new)
        values: dict[Position, tuple[int, int]] = {}
        if old_counters is not None:
            with old_counters:
                values = old_counters.read()
        final = with_live_counters(old, values)
        call.write(header.counters, counters_bytes(final)[: header.num_counters * COUNTERS_SIZE])
        return 0

    def _add_counters(self, call: _Call, sock: socket.socket) -> int:
        length = call.setsockopt_length
        if length < COUNTERS_INFO_SIZE:
            raise _Continue
        name, number = counters_info(call.read(call.buffer, COUNTERS_INFO_SIZE))
        if name != TABLE_NAME:
            raise _Continue
        if length != COUNTERS_INFO_SIZE + number * COUNTERS_SIZE:
            return errno.EINVAL
        raw = call.read(call.buffer + COUNTERS_INFO_SIZE, number * COUNTERS_SIZE)
        call.check()
        with self._locked():
            state = _read_state(self.netns)
            positions = self._base(state, sock).positions
            if number != len(positions):
                return errno.EINVAL  # do_add_counters: not the table's entry count
            added = {k: v for k, v in added_counters(positions, raw).items() if any(v)}
            counters = self._counter_map(state)
            if counters is None:
                if not added:
                    return 0
                self._say("ADD_COUNTERS refused: no rule set is applied, so no counters exist")
                return errno.EINVAL
            with counters:
                values = counters.read()
                changed = {}
                for position, (packets, bytes_) in added.items():
                    old_packets, old_bytes = values.get(position, (0, 0))
                    changed[position] = (old_packets + packets, old_bytes + bytes_)
                counters.write(changed)
        return 0

    def _counter_map(self, state: dict | None) -> CounterMap | None:
        if state is None:
            return None
        layout = CounterLayout(tuple(tuple(position) for position in state["positions"]))
        try:
            fd = get_pinned(str(PIN_ROOT / self.netns / "counters"))
        except BpfError:
            return None
        return CounterMap(layout, fd=fd)

    def _locked(self):
        return namespace_lock(self.netns)


def _load_table(netns: str, digest: str) -> Table | None:
    try:
        saved = json.loads(table_path(netns).read_text())
        if saved["digest"] != digest:
            return None
        positions = tuple(None if p is None else tuple(p) for p in saved["positions"])
        return Table(bytes.fromhex(saved["info"]), bytes.fromhex(saved["entries"]), positions)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_table(netns: str, digest: str, table: Table) -> None:
    LOCK_ROOT.mkdir(parents=True, exist_ok=True)
    saved = {
        "digest": digest,
        "info": table.info.hex(),
        "entries": table.entries.hex(),
        "positions": [None if p is None else list(p) for p in table.positions],
    }
    temporary = table_path(netns).with_suffix(".tmp")
    temporary.write_text(json.dumps(saved))
    os.replace(temporary, table_path(netns))


def _read_state(netns: str) -> dict | None:
    from ..deploy.lifecycle import read_state

    return read_state(netns)


def _sentence(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0] if "\n" in text else text


def _names_other_table(pid: int) -> bool:
    """Whether process `pid`'s command line names a table other than filter (-t, --table)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _names_other_table_in(words)


def _names_other_table_in(words: list[bytes]) -> bool:
    for index, word in enumerate(words):
        table = None
        if word in (b"-t", b"--table") and index + 1 < len(words):
            table = words[index + 1]
        elif word.startswith(b"--table="):
            table = word[len(b"--table=") :]
        elif word.startswith(b"-t") and len(word) > 2 and not word.startswith(b"--"):
            table = word[2:]
        if table is not None and table != b"filter":
            return True
    return False


class _Call:
    """One intercepted getsockopt/setsockopt: its arguments and the caller's memory."""

    def __init__(self, listener: int, notif: seccomp.SeccompNotif):
        data = notif.data
        self.listener = listener
        self.id = notif.id
        self.pid = notif.pid
        self.setting = data.nr == seccomp.NR_SETSOCKOPT
        self.fd = data.args[0] & 0xFFFFFFFF
        self.option = data.args[2] & 0xFFFFFFFF
        self.buffer = data.args[3]
        self.optlen = data.args[4]  # getsockopt: a pointer to the length; setsockopt: it
        self.setsockopt_length = data.args[4] & 0xFFFFFFFF
        self.what = f"{'setsockopt' if self.setting else 'getsockopt'} option {self.option}"

    def length(self) -> int:
        """*optlen of a getsockopt (an int; a negative one the kernel refuses)."""
        value = struct.unpack("<i", self.read(self.optlen, 4))[0]
        if value < 0:
            raise _Continue
        return value

    def read(self, address: int, length: int) -> bytes:
        return seccomp.read_memory(self.pid, address, length)

    def write(self, address: int, data: bytes) -> None:
        seccomp.write_memory(self.pid, address, data)

    def check(self) -> None:
        """The caller still waits (its pid was not reused while we read its memory)."""
        if not seccomp.still_valid(self.listener, self.id):
            raise _Continue
