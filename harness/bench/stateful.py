"""The stateful workload's per-packet cost with BPF_PROG_TEST_RUN (see workload.py for its
rules and packets).

The INPUT and OUTPUT chain programs of one ChainRunner share a connection table, as a host's
programs do: the host's first datagram goes through OUTPUT, then the client's answer through
INPUT is timed (ESTABLISHED: the first rule decides, after a table lookup that refreshes the
entry). The new flow's datagram matches only the last rule; after its first run its entry
exists but was never answered, so every timed run is a NEW packet that goes down the chain.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address

from codegen.rules import parse

from ..backends import Backend
from ..runner import ChainRunner, frame_for
from .settings import Progress, Settings, TimingSettings
from .testrun import BenchCheckFailed, ProgramFacts, time_program
from .workload import (
    STATEFUL_POSITIONS,
    priming_packet,
    stateful_iptables_rules,
    stateful_matched_rule,
    stateful_packet,
)

CLIENT, HOST = IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")


def measure_stateful(
    count: int, backend: Backend, settings: TimingSettings, clock: Callable[[], float]
) -> dict:
    """Load the stateful rule set's INPUT and OUTPUT programs, check each test packet's
    verdict, and time INPUT on each."""
    ruleset = parse(stateful_iptables_rules(count), f"bench-stateful-{count}.rules")
    started = clock()
    with ChainRunner(ruleset, backend=backend) as runner:
        program = runner.program("INPUT")
        runner.program("OUTPUT")
        load_s = clock() - started
        facts = ProgramFacts.of(program.fd)
        runner.run(frame_for(priming_packet(CLIENT, HOST)), "OUTPUT")
        figures: dict[str, dict] = {}
        for position in STATEFUL_POSITIONS:
            frame = frame_for(stateful_packet(count, position, CLIENT, HOST))
            outcome = runner.run(frame, "INPUT")
            want = ("ACCEPT", ("INPUT", stateful_matched_rule(count, position)))
            if (outcome.verdict, outcome.deciding) != want:
                raise BenchCheckFailed(
                    f"{backend} stateful program of {count} rules decided {outcome.verdict} by "
                    f"{outcome.deciding} for the {position} packet, want {want[0]} by {want[1]}"
                )
            figures[position] = time_program(program.fd, frame, settings).to_json()
    return {
        "rules": count,
        "backend": backend,
        "loaded": True,
        "error": None,
        "load_s": load_s,
        "instructions": facts.xlated_instructions,
        "verifier_processed": facts.verifier_processed,
        "ns_per_packet": {position: figures[position]["ns"] for position in STATEFUL_POSITIONS},
        "timing": figures,
    }


def not_measured(count: int, backend: Backend, reason: str) -> dict:
    return {
        "rules": count,
        "backend": backend,
        "loaded": False,
        "error": reason,
        "ns_per_packet": {position: None for position in STATEFUL_POSITIONS},
    }


def per_packet(
    sizes: list[int],
    backends: dict[str, dict],
    settings: Settings,
    clock: Callable[[], float],
    progress: Progress,
    stateless: list[dict],
) -> list[dict]:
    """Every backend at every size; a backend other than bytecode that fails is a figure, and
    one whose stateless rule set of the same size did not load (in `stateless`, the per-packet
    entries) is not tried: its stateful one is larger."""
    loaded = {(entry["rules"], entry["backend"]) for entry in stateless if entry["loaded"]}
    entries: list[dict] = []
    for count in sizes:
        for backend, info in backends.items():
            if not info["available"]:
                entries.append(not_measured(count, backend, info["reason"]))
                continue
            if (count, backend) not in loaded:
                reason = f"not tried: the stateless {count:,} rules did not load either"
                entries.append(not_measured(count, backend, reason))
                continue
            try:
                entry = measure_stateful(count, backend, settings.testrun, clock)
            except Exception as error:
                if backend == "bytecode":
                    raise
                reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
                entries.append(not_measured(count, backend, reason))
                progress(f"stateful   {backend:8} {count:>6,} rules: failed ({reason})")
                continue
            entries.append(entry)
            figures = entry["ns_per_packet"]
            progress(
                f"stateful   {backend:8} {count:>6,} rules: established "
                f"{figures['established']:,.0f} ns, new {figures['new']:,.0f} ns; "
                f"{entry['verifier_processed']:,} processed"
            )
    return entries
