"""One writer at a time per namespace: `bpflab apply`, `flush` and `bpflab exec`'s table
replaces and counter additions take the namespace's lock file (`/run/bpflab/exec/NS.lock`,
flock), so that two of them never swap programs and pins at once.

flock locks belong to an open file, so a thread that holds the lock and takes it again (exec's
supervisor applies while it holds it; finishing a killed apply applies from inside another
command) would wait for itself: the lock is counted per thread instead, and only the first
taking opens and locks the file.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

from netns.namespace import NETNS_DIR, on_removal

from .state import LifecycleError, remove_stale

LOCK_ROOT = Path("/run/bpflab/exec")
LOCK_WAIT = 60.0  # seconds a writer waits for another one of the namespace
P = ParamSpec("P")
R = TypeVar("R")

_local = threading.local()  # .held: netns -> how many times this thread holds its lock


class NamespaceBusy(LifecycleError):
    """Another process held the namespace's lock for the whole wait."""

    def __init__(self, netns: str, waited: float) -> None:
        super().__init__(
            f"namespace {netns} is busy: another bpflab command held {lock_path(netns)} for"
            f" {waited:.0f} s"
        )


def lock_path(netns: str) -> Path:
    return LOCK_ROOT / f"{netns}.lock"


def table_path(netns: str) -> Path:
    """Where `bpflab exec` keeps the table it last answered with (harness.exec.supervisor)."""
    return LOCK_ROOT / f"{netns}.table"


@contextmanager
def namespace_lock(netns: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the writers' lock of `netns` for the block; NamespaceBusy after `wait` seconds."""
    held: dict[str, int] = _local.__dict__.setdefault("held", {})
    fd = None if held.get(netns) else _take(netns, wait)
    held[netns] = held.get(netns, 0) + 1
    try:
        yield
    finally:
        held[netns] -= 1
        if not held[netns]:
            del held[netns]
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the file releases its flock


def _take(netns: str, wait: float) -> int:
    """The locked descriptor of the namespace's lock file. `flush` removes the file while it
    holds it: a lock taken on a file no longer at the path is let go and taken again."""
    LOCK_ROOT.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock_path(netns), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NamespaceBusy(netns, wait) from None
                    time.sleep(0.05)
            if _still_there(fd, netns):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _still_there(fd: int, netns: str) -> bool:
    try:
        here = os.stat(lock_path(netns))
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def forget_lock(netns: str) -> None:
    """Remove the namespace's lock file and exec's table, from inside its lock (flush: nothing
    is left to guard or to answer from); a writer that was waiting on it takes the lock of a
    new file."""
    assert _local.__dict__.get("held", {}).get(netns), "only the lock's holder removes it"
    _remove_files(netns)


def _remove_files(netns: str) -> None:
    table_path(netns).unlink(missing_ok=True)
    lock_path(netns).unlink(missing_ok=True)


def serialised(function: Callable[P, R], *, last: bool = False) -> Callable[P, R]:
    """`function`, holding the lock of the namespace its `netns` argument names; `last`: the
    namespace's last writer (flush), which removes the lock file when it succeeds."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        netns = signature.bind(*args, **kwargs).arguments["netns"]
        with namespace_lock(netns):
            try:
                result = function(*args, **kwargs)
            finally:
                if _gone(netns):  # e.g. `apply` into a namespace that does not exist: no lock left
                    forget_lock(netns)
            if last:
                forget_lock(netns)
            return result

    return locked


def _gone(netns: str) -> bool:
    return not (NETNS_DIR / netns).exists()


@on_removal
def _forget_namespace(netns: str) -> None:
    """When the lab removes one of its namespaces, the rule set's pins and state and exec's
    files of that name go too (without detaching anything: the devices went with it)."""
    remove_stale(netns)
    _remove_files(netns)


def serialised_last(function: Callable[P, R]) -> Callable[P, R]:
    """serialised, for the namespace's last writer: the lock file goes when it succeeds."""
    return serialised(function, last=True)
