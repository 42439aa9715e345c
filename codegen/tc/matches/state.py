"""`-m state` (xt_conntrack as iptables writes it): the packet's state is one of the given ones
(none of them, negated); no entry is INVALID."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.ctinfo import AnyOf
from codegen.rules.extensions.state import State

from .base import Context, Emitter
from .conntrack import any_of


def state(match: State, ctx: Context) -> list[Item]:
    return any_of(AnyOf(match.states, match.negated), "state", ctx)


EMITTER = Emitter(State, state)
