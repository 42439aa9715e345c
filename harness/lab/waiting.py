"""Waiting for an event with a generous bound instead of sleeping a fixed time.

A busy machine (other jobs' CPU load, namespaces and traffic) delays what a test waits for, so
a fixed sleep that is long enough alone is sometimes too short. `until` reads again and again
until the value is the one wanted, and gives back the last value either way: the test's own
assertion then reports what it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAIT = 10.0  # seconds: far beyond what any event here takes on an idle machine
POLL = 0.02


def until(
    read: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout: float = WAIT,
    interval: float = POLL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`read()` until `done` holds for its value or `timeout` seconds have passed; the last
    value read. `read` runs at least once, and once more after the deadline has passed."""
    deadline = clock() + timeout
    while True:
        late = clock() > deadline
        value = read()
        if done(value) or late:
            return value
        sleep(interval)
