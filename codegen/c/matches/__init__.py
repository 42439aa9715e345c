"""The C writers of a rule's matches, one module per match family (named as the family's
module in codegen.rules.extensions), registered here by the model type each writes; the IP
header part is ip_header. Adding a family's C is adding its module and its name to FAMILIES;
nothing else in codegen.c names a family.

Written from the kernel's matches (and the reference evaluator), not from codegen.tc.matches:
this backend is meant to be an independent second opinion. Conditions are plain C over the
packet facts (`f->...`, host order); clang does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import import_module

from codegen.rules.extensions import BY_MODEL, extension_of
from codegen.rules.model import IP_PART, ExtensionMatch, Match

from . import ip_header
from .common import Labels, UnsupportedMatch, Writer

__all__ = [
    "FAMILIES",
    "REFUSED",
    "WRITERS",
    "Labels",
    "UnsupportedMatch",
    "can_hotdrop",
    "write_matches",
]

# The registration line: each name is a module here with MODEL and write(match, labels).
FAMILIES = tuple(
    "tcp udp icmp multiport iprange length ttl pkttype mark connmark comment conntrack state limit"
    " addrtype owner set hashlimit recent physdev policy".split()
)
# The rule layer's families this backend refuses on purpose, each with the reason its refusal
# gives: a family is either in FAMILIES or here.
REFUSED: dict[str, str] = {}
assert not set(REFUSED) & set(FAMILIES), "a family both written and refused"

_FAMILY_MODULES = tuple(import_module(f"{__name__}.{family}") for family in FAMILIES)
WRITERS: dict[type, Writer] = ip_header.WRITERS | {
    module.MODEL: module.write for module in _FAMILY_MODULES
}
assert len(WRITERS) == len(ip_header.WRITERS) + len(FAMILIES), "two writers for one model"


def can_hotdrop(match: Match) -> bool:
    """Whether `match` may drop a packet on the spot, as its family in the rule layer says
    (the IP header part never does)."""
    return isinstance(match, ExtensionMatch) and extension_of(match).can_hotdrop


def _refusal(match: Match) -> str:
    extension = BY_MODEL.get(type(match))
    reason = None if extension is None else REFUSED.get(extension.name)
    if extension is None or reason is None:
        return f"the C backend has no code for {type(match).__name__}"
    return f"the C backend refuses the '-m {extension.name}' match because {reason}"


def write_matches(matches: Sequence[Match], labels: Labels) -> list[str]:
    """A rule's matches in the order ipt_do_table checks them: the IP header part
    (ip_packet_match) first, then the extensions as listed. The order decides hotdrops."""
    numbered = list(enumerate(matches))
    ordered = [(n, m) for n, m in numbered if isinstance(m, IP_PART)]
    ordered += [(n, m) for n, m in numbered if not isinstance(m, IP_PART)]
    code: list[str] = []
    for number, match in ordered:
        writer = WRITERS.get(type(match))
        if writer is None:
            raise UnsupportedMatch(_refusal(match))
        code += writer(match, replace(labels, place=(*labels.rule, number)))
    return code
