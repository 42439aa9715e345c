"""The bytecode backend's match emitters, one module per family (mirroring
codegen.rules.extensions), found here by model type. Adding a family's code is adding its module
(an `EMITTER` for its model class, see base.py) and its name to FAMILIES; nothing else in
codegen.tc names a family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import import_module

from codegen.bpf.asm import Item
from codegen.rules.extensions import BY_MODEL
from codegen.rules.model import IP_PART, Match

from . import ip_header
from .base import Context, Emitter, Pins, TransportHeader

__all__ = [
    "FAMILIES",
    "EMITTERS",
    "REFUSED",
    "TRANSPORT_HEADERS",
    "Context",
    "Pins",
    "emit",
    "emitter_of",
    "refusal_of",
]

# The registration lines, one per family.
FAMILIES = (
    "tcp",
    "udp",
    "icmp",
    "multiport",
    "iprange",
    "length",
    "ttl",
    "pkttype",
    "mark",
    "connmark",
    "comment",
    "conntrack",
    "state",
    "limit",
    "addrtype",
    "owner",
    "set",
    "hashlimit",
    "recent",
    "physdev",
    "policy",
)

# The rule layer's families this backend refuses on purpose, each with the reason its refusal
# gives: a family is either in FAMILIES or here.
REFUSED: dict[str, str] = {}
assert not set(REFUSED) & set(FAMILIES), "a family both generated and refused"

_FAMILY_EMITTERS: tuple[Emitter, ...] = tuple(
    import_module(f"{__name__}.{family}").EMITTER for family in FAMILIES
)
EMITTERS: dict[type, Emitter] = {e.model: e for e in (*ip_header.EMITTERS, *_FAMILY_EMITTERS)}
assert len(EMITTERS) == len(ip_header.EMITTERS) + len(FAMILIES), "two emitters share a model"
# The headers an exact run's lookup may read, in FAMILIES order (the order its checks go in).
TRANSPORT_HEADERS: tuple[TransportHeader, ...] = tuple(
    e.transport for e in _FAMILY_EMITTERS if e.transport is not None
)


def emitter_of(match: Match) -> Emitter | None:
    """The emitter of `match`'s model, None if this backend has no code for it."""
    return EMITTERS.get(type(match))


def refusal_of(match: Match) -> str | None:
    """Why this backend refuses `match` on purpose (its family is in REFUSED, or its emitter
    refuses this match), else None."""
    extension = BY_MODEL.get(type(match))
    if extension is not None and extension.name in REFUSED:
        return REFUSED[extension.name]
    emitter = EMITTERS.get(type(match))
    return None if emitter is None else emitter.refusal(match)


def emit(matches: Sequence[Match], ctx: Context) -> list[Item]:
    """All matches of a rule in netfilter's order: the IP header part (ip_packet_match), then
    the extensions in the order given. The order matters where an extension can hotdrop.
    Every match must have an emitter (the caller refuses rules with one that has none)."""
    numbered = list(enumerate(matches))
    ordered = [(n, m) for n, m in numbered if isinstance(m, IP_PART)]
    ordered += [(n, m) for n, m in numbered if not isinstance(m, IP_PART)]
    code: list[Item] = []
    for number, match in ordered:
        code += EMITTERS[type(match)].emit(match, replace(ctx, place=(*ctx.rule, number)))
    return code
