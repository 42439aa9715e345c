"""Throwaway network namespaces owned by one process.

Every namespace the project creates is named `bl...` and has a state file under
/run/bpflab/netns/<name> naming its owner (pid and process start time), written before the
namespace exists and removed after it is gone. The reaper relies on that order: a `bl`
namespace without a state file was never ours to track, and a state file whose owner is dead
marks leftovers that are safe to remove.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from socket import socket as Socket
from types import TracebackType

import pyroute2.netns
from pyroute2 import IPRoute

PREFIX = "bl"
MAX_NAME_LENGTH = 15  # IFNAMSIZ - 1: keeps names usable wherever the kernel stores them
NETNS_DIR = Path(pyroute2.netns.NETNS_RUN_DIR)  # where `ip netns` and pyroute2 keep names
STATE_DIR = Path("/run/bpflab/netns")
PIN_ROOT = Path("/sys/fs/bpf/bpflab")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


class NamespaceError(Exception):
    """A namespace could not be created, entered, used or removed."""


class CommandError(NamespaceError):
    """A command run inside a namespace failed or timed out."""

    def __init__(
        self,
        namespace: str,
        argv: Sequence[str],
        returncode: int | None,
        stdout: str,
        stderr: str,
        timeout: float | None = None,
    ) -> None:
        self.namespace = namespace
        self.argv = list(argv)
        self.returncode = returncode  # None when the command was killed after `timeout` seconds
        self.stdout = stdout
        self.stderr = stderr
        if returncode is None:
            outcome = f"timed out after {timeout} s and was killed"
        else:
            outcome = f"exited with status {returncode}"
        detail = stderr.strip() or stdout.strip()
        super().__init__(
            f"`{shlex.join(self.argv)}` in namespace {namespace} {outcome}"
            + (f": {detail}" if detail else "")
        )


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
        if number == 0:
            return text


def format_name(pid: int, worker: str | None, counter: int) -> str:
    """Build `bl<pid base36>-<worker>-<counter base36>`.

    `worker` is a pytest-xdist worker id (`gw3` becomes `3`); outside xdist it is None and the
    part reads `m` (main). The pid makes names unique across processes, the counter within one;
    the worker part only tells a human which xdist worker owned a leftover.
    """
    if worker is None:
        worker_part = "m"
    else:
        match = re.fullmatch(r"gw(\d+)", worker)
        if match is None:
            raise NamespaceError(f"unexpected pytest-xdist worker id {worker!r} (want gw<N>)")
        worker_part = match.group(1)
    name = f"{PREFIX}{_base36(pid)}-{worker_part}-{_base36(counter)}"
    if len(name) > MAX_NAME_LENGTH:
        raise NamespaceError(
            f"namespace name {name} is longer than {MAX_NAME_LENGTH} characters; "
            "this process has created too many namespaces"
        )
    return name


def new_name() -> str:
    """A fresh namespace name for the calling process and pytest-xdist worker."""
    return format_name(os.getpid(), os.environ.get("PYTEST_XDIST_WORKER"), next(_counter))


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of proc(5), counted from field 3


def owner_alive(state_file: Path) -> bool | None:
    """Whether the owner named in `state_file` still runs; None if the file is unreadable."""
    try:
        state = json.loads(state_file.read_text())
        pid, start_time = int(state["pid"]), int(state["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return process_start_time(pid) == start_time


def remove_namespace(name: str) -> None:
    """Unmount and unlink the named namespace; a namespace already gone is not an error."""
    try:
        pyroute2.netns.remove(name)
    except FileNotFoundError:
        pass


def remove_pins(name: str) -> None:
    """Remove the bpffs pins of namespace `name`, i.e. the tree under PIN_ROOT/<name>."""
    # Only a plain `bl...` entry directly under PIN_ROOT: never `..`, a path or a symlink.
    top = PIN_ROOT / name
    if not name.startswith(PREFIX) or "/" in name or top.is_symlink() or not top.is_dir():
        return
    for directory, subdirectories, files in os.walk(top, topdown=False):
        for entry in files:
            os.unlink(os.path.join(directory, entry))
        for entry in subdirectories:
            path = os.path.join(directory, entry)
            # os.walk lists a symlink to a directory as a directory; remove the link only.
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    os.rmdir(top)


def _setns(fd: int) -> None:
    # os.setns only arrived in Python 3.12 and the project supports 3.11: call libc directly.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _write_state(path: Path) -> None:
    start_time = process_start_time(os.getpid())
    text = json.dumps({"pid": os.getpid(), "start_time": start_time})
    # Write then rename, so that a reaper never reads a half-written file.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


# What else goes with a namespace of ours when its block ends: functions of its name, which
# the layers above register (harness.deploy.locking: the rule set's state, exec's files).
_removal_hooks: list[Callable[[str], None]] = []


def on_removal(hook: Callable[[str], None]) -> Callable[[str], None]:
    """Call `hook(name)` after each namespace of ours is removed; returns `hook`."""
    _removal_hooks.append(hook)
    return hook


class Namespace:
    """A named network namespace that exists for the duration of a `with` block.

    `with Namespace() as ns:` creates it (and its state file); leaving the block removes the
    namespace, its bpffs pins under PIN_ROOT/<name>, its state file and what the hooks of
    `on_removal` remove. Sockets opened with
    `socket()` keep the kernel namespace alive until they are closed, but not its name.
    """

    def __init__(self) -> None:
        self.name = new_name()
        self.path = NETNS_DIR / self.name
        self.state_file = STATE_DIR / self.name
        self.pin_dir = PIN_ROOT / self.name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @classmethod
    def existing(cls, name: str) -> Namespace:
        """A namespace created elsewhere (`ip netns add NAME`): usable like ours, but never
        entered as a `with` block, so never removed by us."""
        namespace = cls.__new__(cls)
        namespace.name = name
        namespace.path = NETNS_DIR / name
        namespace.state_file = STATE_DIR / name
        namespace.pin_dir = PIN_ROOT / name
        if "/" in name or name in ("", ".", "..") or not namespace.path.exists():
            raise NamespaceError(f"network namespace {name!r} does not exist (see `ip netns list`)")
        return namespace

    def __enter__(self) -> Namespace:
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            _write_state(self.state_file)
            pyroute2.netns.create(self.name)
        except BaseException as error:
            # A namespace of that name that existed before is not ours to remove; anything
            # else is what a failed create left behind (an empty mount point file).
            if not isinstance(error, FileExistsError):
                remove_namespace(self.name)
            self.state_file.unlink(missing_ok=True)
            if not isinstance(error, OSError):
                raise
            if error.errno in (errno.EPERM, errno.EACCES):
                raise NamespaceError(
                    "creating network namespaces needs root (CAP_SYS_ADMIN); "
                    "run as root or with sudo"
                ) from error
            raise NamespaceError(f"cannot create network namespace {self.name}: {error}") from error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        remove_namespace(self.name)
        remove_pins(self.name)
        for hook in _removal_hooks:
            hook(self.name)
        self.state_file.unlink(missing_ok=True)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise NamespaceError(f"network namespace {self.name} does not exist") from error

    def ipr(self) -> IPRoute:
        """An IPRoute socket bound to this namespace; close it, or use it in a `with` block."""
        # flags=0: pyroute2 would otherwise create a missing namespace instead of failing.
        try:
            return IPRoute(netns=self.name, flags=0)
        except FileNotFoundError as error:
            raise NamespaceError(f"network namespace {self.name} does not exist") from error

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Move the calling thread into this namespace, and back when the block ends.

        Only the calling thread moves: other threads, and the process as a whole
        (/proc/self/ns/net follows the main thread), stay where they are.
        """
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = self._open()
            try:
                _setns(target)
            except OSError as error:
                raise NamespaceError(f"cannot enter namespace {self.name}: {error}") from error
            finally:
                os.close(target)
            try:
                yield
            finally:
                try:
                    _setns(original)
                except OSError as error:
                    raise NamespaceError(
                        f"cannot return from namespace {self.name}: {error}; "
                        "the thread is left inside it"
                    ) from error
        finally:
            os.close(original)

    def run(
        self, argv: Sequence[str], check: bool = True, timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace through `ip netns exec`, capturing its output.

        Raises CommandError if it runs longer than `timeout` seconds (it is killed), or, with
        `check`, if it exits with a non-zero status.
        """
        command = ["ip", "netns", "exec", self.name, *argv]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as error:
            raise CommandError(self.name, argv, None, "", "", timeout) from error
        if check and result.returncode != 0:
            raise CommandError(self.name, argv, result.returncode, result.stdout, result.stderr)
        return result

    def ifindex(self, ifname: str) -> int:
        """The index of interface `ifname` inside this namespace."""
        with self.ipr() as ipr:
            indexes = ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise NamespaceError(f"no interface {ifname} in namespace {self.name}")
        return int(indexes[0])

    def sysctl(self, key: str, value: str | int) -> None:
        """Write sysctl `key` (dotted, as in `net.ipv4.ip_forward`) inside this namespace."""
        # /proc/sys/net shows the namespace of the thread that opens the file, so open it
        # while entered; no remount of /proc is needed.
        path = Path("/proc/sys", *key.split("."))
        with self.enter():
            try:
                path.write_text(f"{value}\n")
            except FileNotFoundError as error:
                raise NamespaceError(f"no sysctl {key} in namespace {self.name}") from error
            except OSError as error:
                raise NamespaceError(
                    f"cannot set sysctl {key}={value} in namespace {self.name}: {error}"
                ) from error

    def read_sysctls(self, keys: dict[str, str]) -> dict[str, int]:
        """The integer sysctls `keys` names (name -> dotted key) as this namespace has them,
        by name; one the kernel does not show, or not as an integer, is left out."""
        read: dict[str, int] = {}
        with self.enter():  # /proc/sys/net shows the namespace of the thread reading it
            for name, key in keys.items():
                try:
                    read[name] = int(Path("/proc/sys", *key.split(".")).read_text())
                except (FileNotFoundError, ValueError):
                    continue
        return read

    def socket(self, family: int, type: int, proto: int = 0) -> Socket:
        """A socket created inside this namespace; it stays there wherever it is used."""
        with self.enter():
            return Socket(family, type, proto)
