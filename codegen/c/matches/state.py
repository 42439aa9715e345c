"""`-m state` (written to the kernel as xt_conntrack): the connection's state is one of the
given ones (none of them, negated); no entry is INVALID."""

from __future__ import annotations

from codegen.rules.extensions.ctinfo import AnyOf
from codegen.rules.extensions.state import State

from .common import Labels
from .conntrack import any_of

MODEL = State


def write(match: State, labels: Labels) -> list[str]:
    return any_of(AnyOf(match.states, match.negated), "state", labels)
