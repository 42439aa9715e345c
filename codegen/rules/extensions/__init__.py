"""The match and target extensions this project knows, one module each (see base.py and
target_base.py for what a module holds). Adding a family is adding its module and its name to
FAMILIES (matches) or TARGET_FAMILIES (targets); the parser, writer, validator, blob codec,
evaluator and `list` find it here and name no family themselves.
"""

from __future__ import annotations

from importlib import import_module

from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.target_base import TargetExtension
from codegen.rules.model import ExtensionTarget, Match
from codegen.rules.names import BUILTIN_CHAINS

# The registration line. The order is the order error messages list the matches in.
FAMILIES = (
    "tcp udp icmp multiport iprange length ttl pkttype mark connmark comment conntrack state"
    " limit addrtype owner set hashlimit recent physdev policy"
).split()


def _load(families: list[str]) -> tuple:
    """The EXTENSION of each family's module, in registration order."""
    return tuple(import_module(f"{__name__}.{family}").EXTENSION for family in families)


MATCHES: tuple[MatchExtension, ...] = _load(FAMILIES)
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


# The targets' registration line (module names; each module's EXTENSION is a TargetExtension).
TARGET_FAMILIES = "reject log nflog mark_target connmark_target".split()

TARGETS: tuple[TargetExtension, ...] = _load(TARGET_FAMILIES)
TARGETS_BY_NAME: dict[str, TargetExtension] = {extension.name: extension for extension in TARGETS}
TARGETS_BY_MODEL: dict[type, TargetExtension] = {
    extension.model: extension for extension in TARGETS
}
assert len(TARGETS_BY_NAME) == len(TARGETS_BY_MODEL) == len(TARGETS), "two targets share a name"
# In the filter table every chain runs in hooks INPUT, FORWARD or OUTPUT: a target allowed in
# all three needs no check of which hooks reach a user chain. One allowed in fewer needs that
# check (xt_check_target's hook mask) written first.
assert all(extension.hooks == frozenset(BUILTIN_CHAINS) for extension in TARGETS), (
    "a target restricted to some hooks: validation does not check hooks reaching user chains"
)


def target_extension_of(target: ExtensionTarget) -> TargetExtension:
    """The extension of an extension target; TypeError for anything else."""
    extension = TARGETS_BY_MODEL.get(type(target))
    if extension is None:
        raise TypeError(f"{target!r} is not a target of a registered extension")
    return extension


def supported_targets() -> str:
    """The supported targets, for error messages."""
    return ", ".join(["ACCEPT", "DROP", "RETURN", *TARGETS_BY_NAME, "or a user-defined chain"])


def target_refusal(
    target: object, refused: dict[str, str], generated: frozenset[str] = frozenset()
) -> str | None:
    """Why a generator does not generate `target`, as the end of a sentence ("refuses the '-j
    LOG' target because REASON", REASON from `refused` by family name, or "has no code for
    ..."); None for a standard target or one of the families it `generated`."""
    if not isinstance(target, ExtensionTarget):
        return None
    name = target_extension_of(target).name
    if name in generated:
        return None
    what = f"the '-j {name}' target"
    reason = refused.get(name)
    return f"has no code for {what}" if reason is None else f"refuses {what} because {reason}"
