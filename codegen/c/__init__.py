"""The C backend: a rule set's TC programs written as C and compiled and loaded by bcc.

An independent second generator beside the bytecode one (codegen.tc): same programs, same
semantics (the reference evaluator's, with the TC placement documented in the README), same
maps and counter layout, so that runners, lifecycle and listings work with either. It serves as
a differential oracle and as the yardstick of what clang makes of the same rules.

Layout choice: built-in chains inline in each entry function; user chains as `static
__always_inline` C functions answering CONTINUE/ACCEPT/DROP, inlined at every call site (bcc
cannot load BPF-to-BPF calls; see codegen/c/chains.py). Maps: the caller's, pinned for the
length of one compile so that BPF_TABLE_PINNED opens them (see codegen/c/compiler.py).

    c_source(ruleset, hook, interfaces=..., chain=None, fastpath=False) -> str
    load_c_program(ruleset, hook, interfaces=..., maps=..., chain=None, fastpath=False)
    load_c_programs(ruleset, [Entry(hook, chain), ...], interfaces=..., maps=...)  # one compile

Errors: CCompileError (a subclass of codegen.tc.generator.CompileError) for anything that stops
a compile, BccUnavailable (a CCompileError) when bcc cannot run here, CVerifierError (a
codegen.bpf.loader.VerifierError) when the verifier refuses what bcc compiled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from codegen.rules.model import Ruleset
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc.local import LocalAddresses

from .compiler import BccUnavailable, CProgram, CVerifierError, load_programs
from .source import CCompileError, CSource, Entry, Hook, RuleSpan, generate
from .table import TABLE_FROM

__all__ = [
    "BccUnavailable",
    "CCompileError",
    "CProgram",
    "CSource",
    "CVerifierError",
    "Entry",
    "RuleSpan",
    "c_source",
    "generate",
    "load_c_program",
    "load_c_programs",
]


def c_source(
    ruleset: Ruleset,
    hook: Hook,
    *,
    interfaces: Mapping[str, int],
    chain: str | None = None,
    fastpath: bool = False,
    bridges: bool = True,
) -> str:
    """The C for one program, as `bpflab compile --backend c` prints it: each rule's code under
    a comment holding the rule's iptables-save text."""
    source = generate(
        ruleset, [Entry(hook, chain)], interfaces=interfaces, fastpath=fastpath, bridges=bridges
    )
    return source.text


def load_c_program(
    ruleset: Ruleset,
    hook: Hook,
    *,
    interfaces: Mapping[str, int],
    maps: Mapping[str, object],
    chain: str | None = None,
    fastpath: bool = False,
    local: LocalAddresses | None = None,
    table_from: int = TABLE_FROM,
    bridges: bool = True,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
) -> CProgram:
    """Generate, compile (bcc) and load one program over the caller's maps ("counters", and
    those its matches read); `local`: what the namespace delivers locally, for ingress
    (codegen.tc.local); `table_from`: the shortest run of plain rules scanned from the rule
    table (codegen/c/table.py); `bridges`: whether a bridge may hand packets to iptables
    (-m physdev reads the ports); `timeouts`: the connection tracker's settings. The caller
    closes it."""
    (program,) = load_programs(
        ruleset,
        [Entry(hook, chain)],
        interfaces=interfaces,
        maps=maps,
        fastpath=fastpath,
        local=local,
        table_from=table_from,
        bridges=bridges,
        timeouts=timeouts,
    )
    return program


def load_c_programs(
    ruleset: Ruleset,
    entries: Sequence[Entry],
    *,
    interfaces: Mapping[str, int],
    maps: Mapping[str, object],
    fastpath: bool = False,
    local: LocalAddresses | None = None,
    table_from: int = TABLE_FROM,
    bridges: bool = True,
) -> list[CProgram]:
    """Several programs from one C unit and one bcc compile (compiles take most of the time),
    in the order of `entries`; `table_from`: the shortest run of plain rules scanned from the
    rule table (codegen/c/table.py)."""
    return load_programs(
        ruleset,
        entries,
        interfaces=interfaces,
        maps=maps,
        fastpath=fastpath,
        local=local,
        table_from=table_from,
        bridges=bridges,
    )
