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

from .state import LifecycleError

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
    LOCK_ROOT.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(netns), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise NamespaceBusy(netns, wait) from None
            time.sleep(0.05)


def serialised(function: Callable[P, R]) -> Callable[P, R]:
    """`function`, holding the lock of the namespace its `netns` argument names."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        netns = signature.bind(*args, **kwargs).arguments["netns"]
        with namespace_lock(netns):
            return function(*args, **kwargs)

    return locked
