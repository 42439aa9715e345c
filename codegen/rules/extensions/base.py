"""What a match extension is, layer by layer: the contract every family module fulfils.

A family (iptables' `libxt_NAME.c` and the kernel's `xt_NAME.c` in one) gives, for its model
class (a frozen dataclass deriving from `ExtensionMatch`):

- text: a `MatchParser` for its options (`-m NAME --opt ...`), `save` (the words
  iptables-legacy-save prints), `describe` (what `iptables -L -n` prints), and `as_saved`
  (the match as it reads back after iptables-legacy-save, for what that cannot print);
- checks: `check`, what iptables' userspace and the kernel's checkentry refuse;
- kernel blob: its name, revision and `data` struct (the xt_entry_match payload), `encode` and
  `decode`; an alias (`-m state`, which iptables writes as a conntrack match) has the blob name
  of its real match and tells its payloads from the real match's (`claims`);
- meaning: `matches`, what the kernel's match function answers for a packet, raising HotDrop
  where it drops the packet on the spot (`can_hotdrop` says it may); a family whose match
  keeps state between packets (`stateful`: `-m limit`'s bucket) answers with that state in
  `matches_with`, a `Memory` the evaluator keeps per match;
- `examples`: rule options showing every feature, which the registry test round-trips through
  every layer.

The generators (codegen.tc, codegen.c) keep their emitters apart, registered by model type.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import ClassVar

from codegen.rules.model import Match, Rule, RuleError, Ruleset
from codegen.rules.names import BUILTIN_CHAINS
from codegen.rules.packet import Packet
from codegen.rules.syntax import MatchParser


@dataclass
class Memory:
    """What one stateful match keeps between packets, as the reference evaluator holds it
    (codegen.rules.reference.MatchMemory): `value`, the family's own (None until it first
    sets it); `time`, the packet's arrival (seconds); `hz`, the kernel's; `loaded_at`, when the
    table was loaded (seconds; None: at the match's first packet); `shared`, what every
    match of the load shares (by family: -m hashlimit's tables by name); `ruleset`, the rule
    set loaded (None: unknown), for a family whose state a load sizes from all its rules (-m
    recent's tables)."""

    time: float
    hz: int
    loaded_at: float | None = None
    value: object = None
    shared: dict[str, object] = field(default_factory=dict)
    ruleset: Ruleset | None = None


class MatchExtension:
    """One match family. Subclasses set the class attributes and override the methods; an
    instance (`EXTENSION` in the family's module) is what the registry holds."""

    name: ClassVar[str]  # `-m NAME`
    revision: ClassVar[int]  # the revision iptables-legacy 1.8 picks on current kernels
    model: ClassVar[type]
    data: ClassVar[type[ctypes.Structure]]
    parser: ClassVar[type[MatchParser]]
    implicit: ClassVar[bool] = False  # loaded by `-p NAME` for an option it does not know
    can_hotdrop: ClassVar[bool] = False
    stateful: ClassVar[bool] = False  # its matches keep state between packets
    examples: ClassVar[tuple[str, ...]] = ()

    @property
    def blob_name(self) -> str:
        """The name in the blob's xt_entry_match: NAME, unless the family is an alias that
        iptables writes as another match (libxtables' `real_name`)."""
        return self.name

    def claims(self, data: ctypes.Structure) -> bool:
        """Whether a payload of this family's blob name and revision is this family's: an alias
        and its real match share both and tell their payloads apart by a flag."""
        return True

    def save(self, match: Match) -> list[str]:
        """The words iptables-legacy-save prints for `match`, `-m NAME` included."""
        raise NotImplementedError

    def describe(self, match: Match) -> str:
        """What `iptables -L -n` prints for `match` (the extension's print function), with
        its leading space."""
        raise NotImplementedError

    def as_saved(self, match: Match) -> Match | None:
        """`match` as it reads back after iptables-legacy-save; None if it prints nothing."""
        return match

    def check(self, match: Match, rule: Rule, chain: str) -> None:
        """Raise RuleError (without a source: the caller adds it) if iptables would refuse
        `match` in `rule` of `chain`."""

    def check_ruleset(self, ruleset: Ruleset) -> None:
        """Raise RuleError (with the source of the rule at fault) if iptables or the kernel
        would refuse the family's matches together (-m hashlimit: one table per name)."""

    def hooks(self, match: Match) -> frozenset[str]:
        """The built-in chains whose hooks the kernel's checkentry lets `match` run in; a
        user chain takes the hooks that reach it (validation checks them all)."""
        return frozenset(BUILTIN_CHAINS)

    def hook_refusal(self, match: Match, hook: str) -> str:
        """Why `match` cannot run in built-in chain `hook` (one outside `hooks(match)`)."""
        return f"'-m {self.name}' cannot be used in {hook}"

    def encode(self, match: Match) -> ctypes.Structure:
        """The xt_entry_match payload libxt_NAME fills in; BlobError if it cannot hold it."""
        raise NotImplementedError

    def decode(self, data: ctypes.Structure) -> Match:
        """The model of a payload; BlobError (without an offset) for one it cannot hold."""
        raise NotImplementedError

    def matches(self, match: Match, packet: Packet) -> bool:
        """What the kernel's match function answers; raises HotDrop where it hotdrops."""
        raise NotImplementedError

    def matches_with(self, match: Match, packet: Packet, memory: Memory) -> bool:
        """What a stateful family's match function answers, with `memory` the match's own
        state (which it updates); others ignore it."""
        return self.matches(match, packet)


def require_protocol(rule: Rule, allowed: frozenset[int], message: str) -> None:
    """Refuse the rule unless its `-p` is one of `allowed`, not negated (what the kernel's
    checkentry of a transport match insists on)."""
    protocol = rule.protocol
    if protocol is None or protocol.number not in allowed or protocol.negated:
        raise RuleError(message)
