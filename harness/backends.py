"""The two code generators behind one call: `bytecode` (codegen.tc, our own instructions) and `c`
(codegen.c, C compiled by bcc). Both build the same programs over the same maps, so everything
that runs, attaches or reads counters works with either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from codegen.bpf.loader import VerifierStats, load
from codegen.rules.model import Ruleset
from codegen.tc.generator import Hook, compile_program

Backend = Literal["bytecode", "c"]
BACKENDS: tuple[Backend, ...] = ("bytecode", "c")


class Program(Protocol):
    """A loaded program, whichever backend made it."""

    fd: int
    name: str
    stats: VerifierStats | None

    @property
    def insn_count(self) -> int: ...

    def close(self) -> None: ...


def load_program(
    ruleset: Ruleset,
    hook: Hook,
    *,
    interfaces: Mapping[str, int],
    maps: Mapping[str, object],
    chain: str | None = None,
    fastpath: bool = False,
    backend: Backend = "bytecode",
) -> Program:
    """Generate, compile and load one program; `maps` by the names the generators use."""
    if backend == "bytecode":
        compiled = compile_program(
            ruleset, hook, interfaces=interfaces, chain=chain, fastpath=fastpath
        )
        return load(compiled.items, name=compiled.name, maps=maps)
    if backend == "c":
        from codegen.c import load_c_program

        return load_c_program(
            ruleset, hook, interfaces=interfaces, maps=maps, chain=chain, fastpath=fastpath
        )
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
