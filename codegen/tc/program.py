"""What a compilation makes and how it fails: the program (its hook, items, maps, the notes its
rules' instructions carry) and CompileError. Every module of the backend uses these, so they
sit below all of them; codegen.tc.generator, the entry point, re-exports them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from codegen.bpf.asm import Item
from codegen.rules.model import Rule

from .layout import CounterLayout

Hook = Literal["ingress", "egress", "chain", "bridged", "port_ingress"]


class CompileError(ValueError):
    """A rule set these generators cannot turn into a program; names the rule."""


def where(rule: Rule) -> str:
    """`FILE:LINE:COL: ` of a rule read from text, for the start of an error; empty if none."""
    return f"{rule.source}: " if rule.source is not None else ""


@dataclass(frozen=True)
class RuleNote:
    """The annotation every instruction of a rule carries: the rule's text and where it is."""

    chain: str
    index: int
    text: str
    source: str | None = None

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}"


@dataclass
class CompiledProgram:
    name: str
    hook: Hook
    chains: tuple[str, ...]  # built-in chains the program runs
    items: list[Item]
    layout: CounterLayout
    maps: tuple[str, ...]
    notes: list[RuleNote] = field(default_factory=list)
    exact: dict[bytes, bytes] = field(default_factory=dict)  # EXACT_MAP's entries
    # The classified runs' first nodes by run number, their tree nodes and their records
    # (codegen.tc.classifier), in array order.
    heads: list[int] = field(default_factory=list)
    nodes: list[bytes] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)
    # By run number: its chain, first and last rule, and what a patch needs of it.
    runs: list[tuple[str, int, int]] = field(default_factory=list)
    shapes: list = field(default_factory=list)  # codegen.tc.classifier.Tables.shapes


class Labels:
    """Label names unique in one program: `labels("next")` gives next_0, next_1, ..."""

    def __init__(self) -> None:
        self._numbers = itertools.count()

    def __call__(self, hint: str) -> str:
        return f"{hint}_{next(self._numbers)}"
