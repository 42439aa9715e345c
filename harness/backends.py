"""The two code generators behind one call: `bytecode` (codegen.tc, our own instructions) and `c`
(codegen.c, C compiled by bcc). Both build the same programs over the same maps, so everything
that runs, attaches or reads counters works with either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

from codegen.bpf.isa import MapType
from codegen.bpf.loader import VerifierStats, load
from codegen.bpf.maps import Map
from codegen.rules.model import Ruleset
from codegen.tc import exact
from codegen.tc.generator import (
    EXACT_MAP,
    FRAGMENT_KEY_SIZE,
    FRAGMENT_VALUE_SIZE,
    FRAGMENTS_MAP,
    FRAGMENTS_TRACKED,
    NODES_MAP,
    RECORDS_MAP,
    Hook,
    LocalAddresses,
    compile_program,
)

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
    local: LocalAddresses | None = None,
) -> Program:
    """Generate, compile and load one program; `maps` by the names the generators use; `local`:
    what the namespace delivers locally, which an ingress program compares inline."""
    if backend == "bytecode":
        compiled = compile_program(
            ruleset, hook, interfaces=interfaces, chain=chain, fastpath=fastpath, local=local
        )
        # Maps of the program's own, built here: the hash of exact-match runs, and on ingress
        # the datagrams whose first fragment INPUT accepted.
        own: dict[str, Map] = {}
        try:
            if compiled.exact:
                own[EXACT_MAP] = table = Map(
                    MapType.HASH,
                    exact.KEY.size,
                    exact.VALUE.size,
                    len(compiled.exact),
                    name=EXACT_MAP,
                )
                for key, value in compiled.exact.items():
                    table.update(key, value)
            for name, values in ((NODES_MAP, compiled.nodes), (RECORDS_MAP, compiled.records)):
                if values:
                    own[name] = array_of(name, values)
            if FRAGMENTS_MAP in compiled.maps and FRAGMENTS_MAP not in maps:
                own[FRAGMENTS_MAP] = Map(
                    MapType.LRU_HASH,
                    FRAGMENT_KEY_SIZE,
                    FRAGMENT_VALUE_SIZE,
                    FRAGMENTS_TRACKED,
                    name=FRAGMENTS_MAP,
                )
            program = load(compiled.items, name=compiled.name, maps={**maps, **own})
        except BaseException:
            for table in own.values():
                table.close()
            raise
        program.resources.extend(own.values())
        return program
    if backend == "c":
        from codegen.c import load_c_program

        return load_c_program(
            ruleset,
            hook,
            interfaces=interfaces,
            maps=maps,
            chain=chain,
            fastpath=fastpath,
            local=local,
        )
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def array_of(name: str, values: list[bytes]) -> Map:
    """An array map holding `values` (all of one size) in order, written in one batch."""
    table = Map(MapType.ARRAY, 4, len(values[0]), len(values), name=name)
    try:
        table.update_batch(list(range(len(values))), values)
    except BaseException:
        table.close()
        raise
    return table
