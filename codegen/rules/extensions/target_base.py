"""What a target extension is, layer by layer: the contract every target family module
fulfils, beside the match families' (base.py).

A target family (iptables' `libxt_NAME.c` / `libipt_NAME.c` and the kernel's `xt_NAME.c` /
`ipt_NAME.c` in one) gives, for its model class (a frozen dataclass deriving from
`ExtensionTarget`):

- text: a `TargetParser` for its options (`-j NAME --opt ...`, read by getopt's rules like a
  match's), `save` (the words iptables-legacy-save prints, `-j NAME` included) and `describe`
  (what `iptables -L -n` prints after the matches; the target column shows NAME);
- checks: `check`, what iptables' userspace and the kernel's checkentry refuse, and `hooks`,
  the built-in chains whose hooks the kernel lets it run in (a user chain takes the hooks that
  reach it);
- kernel blob: its name, revision and `data` struct (the xt_entry_target payload), `encode`
  and `decode`;
- meaning: `terminal` (whether evaluation stops at it) and `act`, the verdict it gives and
  what the kernel sends back for a packet (`act_with` for a `stateful` family, whose answer
  depends on what went before: REJECT's ICMP rate limits);
- `examples`: target options showing every feature (each a whole `-j ...` with the rule
  options it needs before it), which the registry tests take through every layer.

The generators (codegen.tc, codegen.c) keep their code apart, and refuse a family they do
not generate by its name.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar, Literal

from codegen.rules.extensions.base import Memory
from codegen.rules.model import ExtensionTarget, Rule
from codegen.rules.names import BUILTIN_CHAINS
from codegen.rules.packet import Packet
from codegen.rules.syntax import TargetParser


@dataclass(frozen=True, slots=True)
class TargetAction:
    """What a target does with one packet: `verdict` None is XT_CONTINUE (evaluation goes on
    with the next rule); `reply` names what the kernel sends back (None: nothing); `logged`
    says it logged the packet (the evaluator lists such rules in order; log_line.py writes
    their lines); `mark` is the packet's mark from now on (None: unchanged), which later rules
    of the traversal match on (MARK); `ctmark` is the packet's connection's mark from now on
    (None: unchanged; CONNMARK)."""

    verdict: Literal["ACCEPT", "DROP"] | None
    reply: str | None = None
    logged: bool = False  # the target wrote a log line about the packet (LOG)
    mark: int | None = None  # the skb mark the target wrote (MARK, CONNMARK --restore-mark)
    ctmark: int | None = None  # the connection's mark the target wrote (CONNMARK)


class TargetExtension:
    """One target family. Subclasses set the class attributes and override the methods; an
    instance (`EXTENSION` in the family's module) is what the registry holds."""

    name: ClassVar[str]  # `-j NAME`, and the name in the blob's xt_entry_target
    revision: ClassVar[int]  # the revision iptables-legacy 1.8 picks on current kernels
    model: ClassVar[type[ExtensionTarget]]
    data: ClassVar[type[ctypes.Structure]]
    parser: ClassVar[type[TargetParser]]
    terminal: ClassVar[bool]  # whether `act` always gives a verdict
    hooks: ClassVar[frozenset[str]] = frozenset(BUILTIN_CHAINS)
    stateful: ClassVar[bool] = False  # `act_with` is given what it keeps between packets
    # Each a `-j NAME ...` with what the rule needs before it (`-p tcp -j REJECT ...`).
    examples: ClassVar[tuple[str, ...]] = ()

    def save(self, target: ExtensionTarget) -> list[str]:
        """The words iptables-legacy-save prints for `target`, `-j NAME` included."""
        raise NotImplementedError

    def describe(self, target: ExtensionTarget) -> str:
        """What `iptables -L -n` prints for `target` after the matches (the extension's print
        function), with its leading space."""
        raise NotImplementedError

    def check(self, target: ExtensionTarget, rule: Rule, chain: str) -> None:
        """Raise RuleError (without a source: the caller adds it) if iptables would refuse
        `target` in `rule` of `chain`."""

    def encode(self, target: ExtensionTarget) -> ctypes.Structure:
        """The xt_entry_target payload libxt_NAME fills in; BlobError if it cannot hold it."""
        raise NotImplementedError

    def decode(self, data: ctypes.Structure) -> ExtensionTarget:
        """The model of a payload; BlobError (without an offset) for one it cannot hold."""
        raise NotImplementedError

    def act(self, target: ExtensionTarget, packet: Packet) -> TargetAction:
        """What the kernel's target function does with `packet`."""
        raise NotImplementedError

    def act_with(self, target: ExtensionTarget, packet: Packet, memory: Memory) -> TargetAction:
        """`act` for a packet at `memory.time`, with what the family keeps between packets
        (for a `stateful` family)."""
        return self.act(target, packet)
