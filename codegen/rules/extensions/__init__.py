"""The match extensions this project knows, one module each (see base.py for what a module
holds). Adding a family is adding its module and its name to FAMILIES; the parser, writer,
validator, blob codec, evaluator and `list` find it here and name no family themselves.
"""

from __future__ import annotations

from importlib import import_module

from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import Match

# The registration line. The order is the order error messages list the matches in.
FAMILIES = "tcp udp icmp multiport iprange length ttl pkttype mark comment conntrack state".split()

MATCHES: tuple[MatchExtension, ...] = tuple(
    import_module(f"{__name__}.{family}").EXTENSION for family in FAMILIES
)
BY_NAME: dict[str, MatchExtension] = {extension.name: extension for extension in MATCHES}
BY_MODEL: dict[type, MatchExtension] = {extension.model: extension for extension in MATCHES}
assert len(BY_NAME) == len(BY_MODEL) == len(MATCHES), "two families share a name or a model"
# The families that write each blob name: one, or an alias and its real match, which share a
# revision and a payload struct (and tell their payloads apart with `claims`).
BY_BLOB_NAME: dict[str, tuple[MatchExtension, ...]] = {
    name: tuple(extension for extension in MATCHES if extension.blob_name == name)
    for name in dict.fromkeys(extension.blob_name for extension in MATCHES)
}
assert all(
    len({(family.revision, family.data) for family in sharing}) == 1
    for sharing in BY_BLOB_NAME.values()
), "families sharing a blob name differ in revision or payload"


def extension_of(match: Match) -> MatchExtension:
    """The extension of an extension match; TypeError for anything else."""
    extension = BY_MODEL.get(type(match))
    if extension is None:
        raise TypeError(f"{match!r} is not a match of a registered extension")
    return extension


def supported_matches() -> str:
    """The names of the supported matches, for error messages."""
    return ", ".join(extension.name for extension in MATCHES)
