"""Per-packet cost with BPF_PROG_TEST_RUN, program sizes, and the largest rule set that loads.

The program timed is the INPUT chain program (`hook="chain"`), the one `bpflab run` tests: the
chain's rules, their counters and the policy, without the ingress program's classification
(local-address map and fib lookup), which costs the same whatever the rule count. The kernel runs
it `repeat` times in a loop and reports the mean nanoseconds per run; a trial is one such loop and
the figure is the median of the trials.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address

from codegen.bpf.info import program_info
from codegen.bpf.syscall import BpfError
from codegen.bpf.testrun import SkBuff, prog_test_run
from codegen.rules import parse
from codegen.rules.names import PKT_TYPES
from codegen.tc.generator import COUNTERS_MAP, CompileError
from codegen.tc.layout import CounterLayout

from ..backends import Backend, load_program
from ..counters import CounterMap
from ..runner import ChainRunner, frame_for, standin_interfaces
from .settings import Progress, TimingSettings
from .workload import (
    MAX_RULES,
    POSITIONS,
    Position,
    ip_packet,
    iptables_rules,
    matched_rule,
)

# The test-run device is lo; the destination only has to be the same for every packet.
DESTINATION = IPv4Address("198.18.0.2")
# The verifier's budget of processed instructions (BPF_COMPLEXITY_LIMIT_INSNS).
VERIFIER_BUDGET = 1_000_000
CALIBRATION_REPEAT = 1000
MIN_REPEAT = 1000


class BenchCheckFailed(Exception):
    """A program under measurement did not decide what the workload says it must."""


@dataclass(frozen=True)
class Timing:
    ns: float  # median over trials of the kernel's mean ns per run
    trials: list[int]
    repeat: int

    def to_json(self) -> dict:
        return {"ns": self.ns, "trials": self.trials, "repeat": self.repeat}


@dataclass(frozen=True)
class ProgramFacts:
    """What the kernel holds of a loaded program, whichever backend made it."""

    xlated_instructions: int  # after the verifier's rewrites, as `bpftool prog dump xlated`
    jited_bytes: int
    verifier_processed: int  # the kernel's own count (bpf_prog_info.verified_insns)

    @classmethod
    def of(cls, fd: int) -> ProgramFacts:
        info = program_info(fd)
        return cls(info.xlated_prog_len // 8, info.jited_prog_len, info.verified_insns)


def c_backend_problem() -> str | None:
    """None when the bcc backend can be used, else why not, in one sentence."""
    try:
        from codegen.c import load_c_program  # noqa: F401
    except Exception as error:  # an unfinished backend may fail in any way on import
        return f"the C backend (codegen.c) cannot be imported: {type(error).__name__}: {error}"
    from ..environment import missing_bcc

    return missing_bcc()


def unicast_context() -> SkBuff:
    """The context ChainRunner.run gives an INPUT packet with no interfaces: a unicast packet."""
    context = SkBuff()
    context.cb[2] = PKT_TYPES["unicast"]
    return context


def time_program(
    fd: int, frame: bytes, settings: TimingSettings, *, context: SkBuff | None = None
) -> Timing:
    """Median of `settings.trials` test-run loops; fewer repeats when one loop would take longer
    than the budget. `context` defaults to a chain program's for a unicast packet."""

    def made() -> SkBuff:
        return unicast_context() if context is None else SkBuff.from_buffer_copy(context)

    estimate = prog_test_run(fd, frame, repeat=CALIBRATION_REPEAT, context=made()).duration_ns
    repeat = settings.repeat
    if estimate * repeat > settings.budget_s * 1e9:
        repeat = max(MIN_REPEAT, int(settings.budget_s * 1e9 / max(estimate, 1)))
    samples = [
        prog_test_run(fd, frame, repeat=repeat, context=made()).duration_ns
        for _ in range(settings.trials)
    ]
    return Timing(float(statistics.median(samples)), samples, repeat)


def time_floor(settings: TimingSettings) -> tuple[Timing, ProgramFacts]:
    """The empty program (r0 = TC_ACT_OK; exit) on the same frame: the cost of test-run itself."""
    from codegen.bpf.insn import exit_, mov64
    from codegen.bpf.isa import R0
    from codegen.bpf.loader import load

    frame = frame_for(ip_packet(1, "first", DESTINATION))
    with load([mov64(R0, 0), exit_()], name="bench_floor") as program:
        return time_program(program.fd, frame, settings), ProgramFacts.of(program.fd)


def measure_backend(
    count: int, backend: Backend, settings: TimingSettings, clock: Callable[[], float]
) -> dict:
    """Load the INPUT chain program of `count` rules with `backend`, check that it decides each
    test packet as the workload says, and time it on each."""
    ruleset = parse(iptables_rules(count), f"bench-{count}.rules")
    started = clock()
    with ChainRunner(ruleset, backend=backend) as runner:
        program = runner.program("INPUT")
        load_s = clock() - started
        facts = ProgramFacts.of(program.fd)
        figures: dict[str, dict] = {}
        for position in POSITIONS:
            frame = frame_for(ip_packet(count, position, DESTINATION))
            _check_decision(runner, frame, count, position, backend)
            figures[position] = time_program(program.fd, frame, settings).to_json()
        stats = program.stats
        return {
            "rules": count,
            "backend": backend,
            "loaded": True,
            "error": None,
            "load_s": load_s,
            "instructions": facts.xlated_instructions,
            "submitted_instructions": program.insn_count,
            "jited_bytes": facts.jited_bytes,
            "verifier_processed": facts.verifier_processed,
            "verifier_states": stats.states_total if stats is not None else None,
            "verification_us": stats.verification_usec if stats is not None else None,
            "ns_per_packet": {position: figures[position]["ns"] for position in POSITIONS},
            "timing": figures,
        }


def _check_decision(
    runner: ChainRunner, frame: bytes, count: int, position: Position, backend: str
) -> None:
    outcome = runner.run(frame, "INPUT")
    rule = matched_rule(count, position)
    want = ("ACCEPT", ("INPUT", rule)) if rule is not None else ("DROP", ("INPUT", "policy"))
    if (outcome.verdict, outcome.deciding) != want:
        raise BenchCheckFailed(
            f"{backend} program of {count} rules decided {outcome.verdict} by "
            f"{outcome.deciding} for the {position}-rule packet, want {want[0]} by {want[1]}"
        )


def not_loaded(count: int, backend: Backend, reason: str) -> dict:
    """The entry of a program that was not measured, and why."""
    return {
        "rules": count,
        "backend": backend,
        "loaded": False,
        "error": reason,
        "load_s": None,
        "instructions": None,
        "submitted_instructions": None,
        "jited_bytes": None,
        "verifier_processed": None,
        "verifier_states": None,
        "verification_us": None,
        "ns_per_packet": {position: None for position in POSITIONS},
        "timing": None,
    }


# The largest rule set -----------------------------------------------------------------------


def _processed_or_refusal(count: int) -> tuple[int | None, str | None]:
    """Load the chain program and the ingress program of `count` rules (the two programs the
    bench uses): the larger verifier count, or why the verifier refused one of them."""
    ruleset = parse(iptables_rules(count), f"bench-{count}.rules")
    interfaces = standin_interfaces(ruleset)
    processed = 0
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        for hook, chain in (("chain", "INPUT"), ("ingress", None)):
            try:
                program = load_program(
                    ruleset,
                    hook,
                    interfaces=interfaces,
                    maps={COUNTERS_MAP: counters},
                    chain=chain,
                )
            except (BpfError, CompileError) as error:
                # VerifierError is a BpfError; a program too large to submit is one too.
                return None, f"{hook} program: {str(error).splitlines()[0]}"
            try:
                processed = max(processed, ProgramFacts.of(program.fd).verifier_processed)
            finally:
                program.close()
    return processed, None


def find_largest(
    progress: Progress, *, probes: tuple[int, int] = (1000, 5000), max_attempts: int = 8
) -> dict:
    """The largest rule count whose chain and ingress programs both load, to within 1%.

    Verification grows at most linearly with the rule count (chains are cut into functions
    verified once each; exact and classified runs cost the same at any length), so two loads
    predict where the verifier's budget runs out; loads around the prediction confirm it: the
    answer loads and the answer plus one step is refused. Where verification does not grow,
    the answer is the workload's largest rule set (MAX_RULES), if it loads.
    """
    points = []
    for count in probes:
        processed, refusal = _processed_or_refusal(count)
        if processed is None:
            raise BenchCheckFailed(f"{count} rules do not load: {refusal}")
        points.append((count, processed))
    (n1, p1), (n2, p2) = points
    per_rule = (p2 - p1) / (n2 - n1)
    fixed = p1 - per_rule * n1
    if per_rule > 0:
        predicted = int((VERIFIER_BUDGET - fixed) / per_rule)
        why = f"{per_rule:.1f} processed instructions per rule predicts {predicted:,} rules"
    else:  # verification does not grow with the rules: the workload's own limit
        predicted = MAX_RULES
        why = f"verification does not grow with the rules; trying the workload's {MAX_RULES:,}"
    step = max(1, round(predicted / 100))
    progress(f"largest: {why}; checking in steps of {step:,}")
    attempts = 0
    loaded: dict[int, int] = {}
    refused: dict[int, str] = {}

    def attempt(count: int) -> bool:
        nonlocal attempts
        attempts += 1
        processed, refusal = _processed_or_refusal(count)
        if processed is None:
            refused[count] = refusal or "refused"
            progress(f"largest: {count:,} rules refused ({refusal})")
            return False
        loaded[count] = processed
        progress(f"largest: {count:,} rules load ({processed:,} processed)")
        return True

    count = min(predicted, MAX_RULES)
    if attempt(count):
        while attempts < max_attempts and count + step <= MAX_RULES and attempt(count + step):
            count += step
    else:
        while attempts < max_attempts and count - step >= 1:
            count -= step
            if attempt(count):
                break
    if count not in loaded:
        raise BenchCheckFailed(f"no rule count near {predicted:,} loads within {attempts} tries")
    above = count + step
    return {
        "rules": count,
        "verifier_processed": loaded[count],
        "resolution": step,
        "refused_at": above if above in refused else None,
        "refusal": refused.get(above),
        "predicted": predicted,
        "processed_per_rule": per_rule,
    }
