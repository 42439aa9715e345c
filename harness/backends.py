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
from codegen.reject import limits as reject_limits
from codegen.reject.limits import RateMaps
from codegen.rules.extensions.physdev import reads_ports
from codegen.rules.model import Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc import exact
from codegen.tc.generator import (
    BRIDGE_PORTS,
    EXACT_MAP,
    FRAGMENT_KEY_SIZE,
    FRAGMENT_VALUE_SIZE,
    FRAGMENTS_MAP,
    FRAGMENTS_TRACKED,
    Hook,
    LocalAddresses,
    compile_program,
)
from codegen.tc.replies import rejects

from . import classifier_tables
from .deploy.bridges import bridge_maps

Backend = Literal["bytecode", "c"]
BACKENDS: tuple[Backend, ...] = ("bytecode", "c")


class Program(Protocol):
    """A loaded program, whichever backend made it."""

    fd: int
    name: str
    stats: VerifierStats | None
    resources: list  # objects closed with the program (maps)

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
    bridges: bool = True,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> Program:
    """Generate, compile and load one program; `maps` by the names the generators use; `local`:
    what the namespace delivers locally, which an ingress program compares inline; `bridges`:
    whether a bridge may hand packets to iptables (-m physdev reads ports); `timeouts`: the
    connection tracker's settings (the namespace's conntrack sysctls). A program
    with REJECT given no rate-limit maps (a namespace's: harness.deploy.icmp_limits; a test
    run's) gets its own, unconfigured: its ICMP errors are not limited; one that reads bridge
    ports given no bridge maps gets its own, empty: it knows no bridge."""
    standins: dict[str, Map] = {}
    if rejects(ruleset) and not all(name in maps for name in reject_limits.MAPS):
        standins.update(RateMaps.create().maps)
    ports = hook == "ingress" and reads_ports(ruleset) and bridges
    bridged = hook in ("bridged", "port_ingress") or ports
    if bridged and BRIDGE_PORTS not in maps:
        standins.update(bridge_maps({}))
    if standins:
        try:
            program = load_program(
                ruleset,
                hook,
                interfaces=interfaces,
                maps={**maps, **standins},
                chain=chain,
                fastpath=fastpath,
                backend=backend,
                local=local,
                bridges=bridges,
                timeouts=timeouts,
            )
        except BaseException:
            for table in standins.values():
                table.close()
            raise
        program.resources.extend(standins.values())
        return program
    if backend == "bytecode":
        compiled = compile_program(
            ruleset,
            hook,
            interfaces=interfaces,
            chain=chain,
            fastpath=fastpath,
            local=local,
            bridges=bridges,
            timeouts=timeouts,
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
            layout = None
            if compiled.heads:  # with room for patches (harness.deploy.patch)
                made, layout = classifier_tables.make(compiled)
                own.update(made)
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
        program.layout = layout
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
            bridges=bridges,
            timeouts=timeouts,
        )
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
