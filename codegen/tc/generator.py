"""Rule set -> TC programs: the bytecode backend's entry point.

`compile_program` builds the program of one hook (codegen.tc.hooks has the three skeletons:
ingress, egress, and a single chain for BPF_PROG_TEST_RUN). The parts, each a module:

- parser: the packet's headers into the facts every match reads (layout.Facts);
- hooks: classification on ingress (martians, local delivery, bpf_fib_lookup, the fast path),
  the verdict tails; local: the namespace's local addresses, compared inline;
- chains: where chains and rules live (inline, chunks, global functions) and their code;
  targets: what a verdict, jump or goto becomes there;
- matches: one emitter per match family, registered by model type;
- exact: runs of exact-match rules answered by a hash lookup;
- fragments: datagrams judged and counted once on INPUT and OUTPUT;
- counters: the subprograms that update the per-CPU counters.

Names other code imports from here (maps, sizes, limits) are re-exported from those modules.
"""

from __future__ import annotations

from collections.abc import Mapping

from codegen import conntrack
from codegen.bpf.asm import remove_unreachable
from codegen.conntrack import uses_conntrack
from codegen.reject import limits as reject_limits
from codegen.rules.extensions.physdev import reads_ports
from codegen.rules.model import Ruleset
from codegen.rules.names import BUILTIN_CHAINS
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

from .bridges import BRIDGE_PORTS, BRIDGE_PORTS_ENTRIES, PORT_STAMP, STAMP_VALUE_SIZE, stamp_program
from .chains import (
    CHUNK_RULES,
    INLINE_SCAN,
    MAX_FRAMES,
    ChainWriter,
    refuse_unsupported,
    require_runtime,
    user_chains_called,
)
from .classifier_code import HEADS_MAP, NODES_MAP, RECORDS_MAP
from .counters import COUNTERS_MAP
from .exact import EXACT_MAP
from .fragments import (
    FIRST_DROPPED,
    FRAGMENT_KEY_SIZE,
    FRAGMENT_VALUE_SIZE,
    FRAGMENTS_MAP,
    FRAGMENTS_TRACKED,
)
from .hooks import ProgramWriter
from .layout import CounterLayout
from .local import STANDIN, LocalAddresses
from .log import LOG_DROPS, LOG_EVENTS, logs
from .matches.addrtype import ADDRESS_TYPES, uses_addrtype
from .matches.hashlimit import HASHLIMIT_MAP, uses_hashlimit
from .matches.limit import LIMIT_MAP, uses_limit
from .program import CompiledProgram, CompileError, Hook, Labels, RuleNote
from .replies import INTERFACE_ADDRESSES, rejects
from .targets import RETURNED

__all__ = [
    "BRIDGE_PORTS",
    "BRIDGE_PORTS_ENTRIES",
    "PORT_STAMP",
    "STAMP_VALUE_SIZE",
    "CHUNK_RULES",
    "COUNTERS_MAP",
    "EXACT_MAP",
    "FIRST_DROPPED",
    "FRAGMENTS_MAP",
    "FRAGMENTS_TRACKED",
    "FRAGMENT_KEY_SIZE",
    "FRAGMENT_VALUE_SIZE",
    "INLINE_SCAN",
    "MAX_FRAMES",
    "HEADS_MAP",
    "NODES_MAP",
    "RECORDS_MAP",
    "RETURNED",
    "CompileError",
    "CompiledProgram",
    "Hook",
    "LocalAddresses",
    "RuleNote",
    "compile_program",
    "user_chains_called",
]


def compile_program(
    ruleset: Ruleset,
    hook: Hook,
    *,
    interfaces: Mapping[str, int],
    chain: str | None = None,
    fastpath: bool = False,
    local: LocalAddresses | None = None,
    bridges: bool = True,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> CompiledProgram:
    """Generate the program for `hook` (for `chain`, name the built-in chain to run). `local`:
    what the namespace delivers locally, which the ingress program compares inline
    (codegen.tc.local; None: its STANDIN). `bridges`: whether a bridge of the namespace may hand
    packets to iptables; without one, -m physdev is the constant answer for no bridge
    information (codegen.tc.bridges). `timeouts`: the connection tracker's settings (the
    namespace's conntrack sysctls), compiled in."""
    if hook == "port_ingress":  # no chains: a stamp for the bridge device (codegen.tc.bridges)
        layout = CounterLayout.of(ruleset)
        return CompiledProgram("bpflab_port_in", hook, (), stamp_program(), layout, (PORT_STAMP,))
    if hook == "chain":
        if chain not in BUILTIN_CHAINS:
            raise CompileError(f"only a built-in chain can run on its own, not {chain!r}")
        builtins: tuple[str, ...] = (chain,)
    else:
        builtins = {"ingress": ("INPUT", "FORWARD"), "bridged": ("FORWARD",)}.get(hook, ("OUTPUT",))
    refuse_unsupported(ruleset, (*builtins, *user_chains_called(ruleset, builtins)))
    require_runtime(ruleset, timeouts)
    chains = ChainWriter(ruleset, CounterLayout.of(ruleset), interfaces, Labels())
    local = STANDIN if local is None else local
    writer = ProgramWriter(chains, hook, fastpath, local, bridges, timeouts)
    items = remove_unreachable(writer.entry(builtins))
    maps = {
        "ingress": (COUNTERS_MAP, FRAGMENTS_MAP),
        "egress": (COUNTERS_MAP, FRAGMENTS_MAP),
    }.get(hook, (COUNTERS_MAP,))
    if hook == "bridged":
        maps += (BRIDGE_PORTS,)
    elif hook == "ingress" and reads_ports(ruleset) and bridges:
        maps += (BRIDGE_PORTS, PORT_STAMP)
    if chains.exact:
        maps += (EXACT_MAP,)
    if chains.tables.nodes:
        maps += (HEADS_MAP, NODES_MAP, RECORDS_MAP)
    if uses_conntrack(ruleset):
        maps += conntrack.MAPS
    if hook in ("ingress", "bridged") and rejects(ruleset):
        maps += (INTERFACE_ADDRESSES,)
    if rejects(ruleset):  # the ICMP errors' limits (codegen.reject.limits)
        maps += reject_limits.MAPS
    if logs(ruleset):
        maps += (LOG_EVENTS, LOG_DROPS)
    if uses_addrtype(ruleset):
        maps += (ADDRESS_TYPES,)
    if uses_limit(ruleset):
        maps += (LIMIT_MAP,)
    if uses_hashlimit(ruleset):
        maps += (HASHLIMIT_MAP,)
    names = {"ingress": "bpflab_ingress", "egress": "bpflab_egress", "bridged": "bpflab_bridged"}
    name = names.get(hook, f"bpflab_{chain}")
    return CompiledProgram(
        name[:15],
        hook,
        builtins,
        items,
        chains.layout,
        maps,
        chains.notes,
        chains.exact,
        chains.tables.heads,
        chains.tables.nodes,
        chains.tables.records,
        chains.runs,
        chains.tables.shapes,
    )
