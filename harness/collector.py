"""Python's cyclic garbage collector held off while a rule set is read and compiled.

A rule set of 100,000 rules is millions of objects alive at once (its model, the classifier's
boxes, the program's instructions), none of them garbage, and each of the collector's full
passes walks them all; they come more often the more objects are made, so the passes cost a
rule set's apply time that grows faster than its size. Reference counting still frees every
object that is not in a cycle the moment it is dropped; the cycles left (few: the compiler
makes trees, not rings) wait for the collector, which runs again as soon as the work is done.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def held_off() -> Iterator[None]:
    """No cyclic collection inside; as before after (a nested use changes nothing)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def collector_held_off(function: Callable[P, R]) -> Callable[P, R]:
    """`function` run with the collector held off (held_off)."""

    @wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with held_off():
            return function(*args, **kwargs)

    return run
