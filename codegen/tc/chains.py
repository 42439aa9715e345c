"""Chains and their rules as code, and where that code lives.

A built-in chain of up to CHUNK_RULES rules is inline in the entry function; a longer one is cut
into chunk functions the entry calls in turn. Every user chain reachable from the hook is a
global BPF-to-BPF function (chunked in the same way if long), called from each `-j` and `-g`
rule. Global functions are verified once each, on their own, so verification grows with the
rule count rather than with the number of paths, and no function's pending branches approach
the verifier's limit of 8,192. What chain functions answer, and how jumps and gotos use that,
is codegen.tc.targets'. The cost is call depth: BPF allows 8 frames, which
`user_chains_called` checks (nesting of about 6 user chains).

How a chain's rules fall into segments and functions is codegen.tc.segments'. A run of
exact-match rules (codegen.tc.exact) is a lookup with the run's scan behind it, inline if short
or in functions of its own; a classified run (codegen.tc.classifier) is one call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from codegen import conntrack
from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, JmpOp, Size
from codegen.rules.extensions import BY_MODEL, TARGETS_BY_MODEL, extension_of, target_refusal
from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.extensions.reject import REJECT_WITH, Reject
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import (
    IP_PART,
    Accept,
    Chain,
    Drop,
    ExtensionTarget,
    Goto,
    Jump,
    Match,
    Return,
    Rule,
    Ruleset,
)
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

from . import classifier, classifier_code, exact, log, mark_target, matches, replies
from .counters import COUNT
from .layout import CONTINUE, FACTS, SCRATCH_OFFSET, UNCOUNTED, CounterLayout, Facts
from .matches.limit import slots as limit_slots
from .matches.owner import group_bits
from .matches.policy import answer_bits
from .program import CompileError, Labels, RuleNote, where
from .segments import CHUNK_RULES, INLINE_SCAN, Segment, pieces
from .targets import (
    GENERATED_TARGETS,
    REFUSED_TARGETS,
    RETURNED,
    FunctionTargets,
    InlineTargets,
    Targets,
    call_function,
    chain_function,
    global_prologue,
)

MAX_FRAMES = 8  # MAX_CALL_FRAMES in the kernel
VERDICTS = (Accept, Drop, Reject)  # targets whose rule the verdict's tail counts


def _scans_elsewhere(chain: Chain) -> bool:
    """Whether an exact run's scan is in functions of its own, or a classified run calls the
    classifier (one more call frame, which calls no further than the record test)."""
    return any(
        segment.classified
        or (segment.shape is not None and segment.last - segment.first + 1 > INLINE_SCAN)
        for piece in pieces(chain)
        for segment in piece
    )


def user_chains_called(ruleset: Ruleset, roots: tuple[str, ...]) -> list[str]:
    """User chains reachable from `roots`, in rule-set order, checking that the deepest path of
    calls fits in BPF's 8 call frames: the entry function, a chunk function for a built-in
    chain too long to be inline, one function per user chain (two if it is chunked), and the
    counter update at the end."""
    reached: set[str] = set()

    def frames(name: str, path: tuple[str, ...]) -> int:
        chain = ruleset.chains[name]
        own = 1 if len(pieces(chain)) == 1 else 2
        # a scan function or the classifier (and its record test), or the counter update
        deepest = 2 if _scans_elsewhere(chain) else 1
        for rule in chain.rules:
            if isinstance(rule.target, Jump | Goto):
                callee = rule.target.chain
                reached.add(callee)
                needed = frames(callee, (*path, callee))
                if needed + own > MAX_FRAMES:
                    raise CompileError(
                        f"{where(rule)}the chain path {' -> '.join((*path, callee))} needs "
                        f"more than the {MAX_FRAMES} nested calls BPF allows; flatten the chains "
                        "or shorten them"
                    )
                deepest = max(deepest, needed)
        return own + deepest

    for root in roots:
        frames(root, (root,))
    return [name for name in ruleset.chains if name in reached]


def refuse_unsupported(ruleset: Ruleset, names: tuple[str, ...]) -> None:
    """CompileError for the first rule of chains `names` with a match or target extension
    this backend has no code for, saying why when its family is refused on purpose."""
    for name in names:
        for index, rule in enumerate(ruleset.chains[name].rules, 1):
            refusal = target_refusal(rule.target, REFUSED_TARGETS, GENERATED_TARGETS)
            if refusal is None and log.refusal(rule) is not None:
                refusal = f"refuses this '-j LOG' because {log.refusal(rule)}"
            if refusal is not None:
                raise CompileError(
                    f"{where(rule)}the bytecode backend {refusal} (rule {index} of {name})"
                    f"{_rule_text(name, rule)}"
                )
            for match in rule.matches:
                reason = matches.refusal_of(match)
                if matches.emitter_of(match) is not None and reason is None:
                    continue
                what = f"the {_match_name(match)} match of rule {index} of {name}"
                said = (
                    f"has no code for {what}"
                    if reason is None
                    else f"refuses {what} because {reason}"
                )
                raise CompileError(
                    f"{where(rule)}the bytecode backend {said}{_rule_text(name, rule)}"
                )


def require_runtime(ruleset: Ruleset, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
    """CompileError naming the first rule that needs a fixed component written in C (the
    connection tracker of codegen/conntrack, with `timeouts`' settings; REJECT's answers of
    codegen/reject) when clang's object of it cannot be built here."""
    needs = (
        (
            "the connection tracker",
            conntrack.first_tracking_rule,
            lambda: conntrack.bytecode_functions(timeouts),
        ),
        ("REJECT's answers", replies.first_reject_rule, replies.functions),
    )
    for what, first, build in needs:
        found = first(ruleset)
        if found is None:
            continue
        chain, index, rule = found
        try:
            build()
        except (conntrack.TrackerUnavailable, replies.Unavailable) as error:
            raise CompileError(
                f"{where(rule)}the bytecode backend cannot build {what} that rule {index} of "
                f"{chain} needs: {error}{_rule_text(chain, rule)}"
            ) from error


def _match_name(match: Match) -> str:
    extension = BY_MODEL.get(type(match))
    return f"'-m {extension.name}'" if extension is not None else type(match).__name__


def _rule_text(chain: str, rule: Rule) -> str:
    """`: TEXT` of a rule, as read or else as written from its model; empty when the rule layer
    cannot write one of its matches either."""
    if rule.source is not None:
        return f": {rule.source.text}"
    extension_target = isinstance(rule.target, ExtensionTarget)
    if extension_target and type(rule.target) not in TARGETS_BY_MODEL:
        return ""
    if all(isinstance(m, IP_PART) or type(m) in BY_MODEL for m in rule.matches):
        return f": {write_rule(chain, rule)}"
    return ""


def _can_hotdrop(rule: Rule) -> bool:
    return any(not isinstance(m, IP_PART) and extension_of(m).can_hotdrop for m in rule.matches)


class ChainWriter:
    """The code of a program's chains: built-in chains inline (or calling their chunks), user
    chains and chunks as global functions, queued in `pending` for after the entry function.
    Collects the notes of the rules it writes and the entries of the exact runs' map."""

    def __init__(
        self,
        ruleset: Ruleset,
        layout: CounterLayout,
        interfaces: Mapping[str, int],
        labels: Labels,
    ):
        self.ruleset = ruleset
        self.layout = layout
        self.interfaces = interfaces
        self.label = labels
        self.notes: list[RuleNote] = []
        self.pending: list[list[Item]] = []  # chunk functions, placed after the chains
        self.exact: dict[bytes, bytes] = {}
        self.tables = classifier.Tables()  # the classified runs' trees and records
        self.runs: list[tuple[str, int, int]] = []  # by run number: chain, first, last rule
        self._runs = 0
        self.slots = limit_slots(ruleset)  # each limit match's bucket (codegen.tc.matches.limit)
        self.policy_bits = answer_bits(ruleset)  # codegen.tc.matches.policy
        self.owner_bits = group_bits(ruleset)  # codegen.tc.matches.owner's --suppl-groups
        self.bridge_ports = True  # whether the facts hold -m physdev's ports (not at OUTPUT)

    def builtin_chain(self, name: str, accept: str, drop: str = "drop") -> list[Item]:
        chain = self.ruleset.chains[name]
        policy = f"policy_{name}"
        targets = InlineTargets(accept, policy, drop)
        chunks = pieces(chain)
        if len(chunks) == 1:
            code = self.rules(chain, targets, chunks[0])
        else:
            code = []
            for function in self.chunk_functions(chain):
                code += self._call_chunk(
                    function, lambda: targets.dispatch(self.label, returned=True)
                )
        slot = self.layout.slot((name, "policy"))
        verdict = accept if chain.policy == "ACCEPT" else drop
        return [
            *code,
            Label(policy),
            I.st(Size.W, FACTS, Facts.DECIDED.offset, slot),  # counted at the verdict's tail
            I.ja(verdict),
        ]

    def user_chain(self, chain: Chain) -> list[Item]:
        """A user chain's entry, a global function answering CONTINUE (it returned or fell off
        its end), ACCEPT or DROP."""
        name = chain_function(chain.name)
        chunks = pieces(chain)
        if len(chunks) == 1:
            return self._function(name, chain, CONTINUE, chunks[0])
        code: list[Item] = list(global_prologue(name))
        returned = self.label("returned")
        for function in self.chunk_functions(chain):
            code += self._call_chunk(
                function, lambda: [I.jmp(JmpOp.JEQ, R0, RETURNED, returned), I.exit_()]
            )
        return [*code, Label(returned), I.mov64(R0, CONTINUE), I.exit_()]

    def _call_chunk(self, function: str, answered: Callable[[], list[Item]]) -> list[Item]:
        """Call a chunk function; the code `answered` makes handles any answer but CONTINUE."""
        after = self.label("after_chunk")
        return [
            *call_function(function),
            I.jmp(JmpOp.JEQ, R0, CONTINUE, after),
            *answered(),
            Label(after),
        ]

    def chunk_functions(self, chain: Chain) -> list[str]:
        """Queue the global functions that hold a long chain's rules, CHUNK_RULES each; they
        answer CONTINUE at their end, RETURNED when the chain returns, or a verdict."""
        names = []
        for number, piece in enumerate(pieces(chain)):
            name = f"{chain_function(chain.name)}:{number}"
            self.pending.append(self._function(name, chain, RETURNED, piece))
            names.append(name)
        return names

    def scan_functions(self, chain: Chain, first: int, last: int) -> list[str]:
        """Global functions scanning rules first..last of an exact run (all ACCEPT or DROP):
        they answer CONTINUE when no rule matched, or the verdict."""
        names = []
        for start in range(first, last + 1, CHUNK_RULES):
            end = min(last, start + CHUNK_RULES - 1)
            name = f"{chain_function(chain.name)}:scan{start}"
            self.pending.append(self._function(name, chain, RETURNED, [Segment(start, end)]))
            names.append(name)
        return names

    def _function(
        self, name: str, chain: Chain, returned: int, segments: list[Segment]
    ) -> list[Item]:
        """A global function holding `segments` of `chain`, answering `returned` for RETURN
        and CONTINUE at its end."""
        return [
            *global_prologue(name),
            *self.rules(chain, FunctionTargets(returned), segments),
            I.mov64(R0, CONTINUE),
            I.exit_(),
        ]

    def rules(self, chain: Chain, targets: Targets, segments: list[Segment]) -> list[Item]:
        """The code of some segments of `chain`: rules scanned one by one, or exact runs."""
        code: list[Item] = []
        for segment in segments:
            if segment.classified:
                code += self.classified_run(chain, segment, targets)
            elif segment.shape is not None:
                code += self.exact_run(chain, segment, targets)
            else:
                for index in range(segment.first, segment.last + 1):
                    code += self.annotated_rule(chain, index, targets)
        return code

    def annotated_rule(self, chain: Chain, index: int, targets: Targets) -> list[Item]:
        rule = chain.rules[index - 1]
        note = RuleNote(
            chain.name,
            index,
            write_rule(chain.name, rule),
            str(rule.source) if rule.source else None,
        )
        self.notes.append(note)
        return _annotated(self.rule(chain, index, rule, targets), note)

    def exact_run(self, chain: Chain, segment: Segment, targets: Targets) -> list[Item]:
        """A hash lookup answering for rules first..last, then their scan for the packets the
        lookup cannot answer for (see codegen.tc.exact)."""
        first, last, shape = segment.first, segment.last, segment.shape
        assert shape is not None
        run_id = self._runs
        self._runs += 1
        slots = [self.layout.slot((chain.name, i)) for i in range(first, last + 1)]
        self.exact.update(exact.entries(run_id, chain.rules[first - 1 : last], slots))
        note = RuleNote(
            chain.name,
            first,
            f"rules {first} to {last} of {chain.name}: one hash "
            f"lookup for {last - first + 1} exact-match rules",
        )
        key = (SCRATCH_OFFSET - 24) if isinstance(targets, InlineTargets) else -24
        scan, after = self.label("scan"), self.label("after_run")
        code = exact.lookup(shape, run_id, key, scan=scan, after=after, new_label=self.label)
        dropped = self.label("run_dropped")
        code += [
            I.jmp32(JmpOp.JNE, R1, exact.ACCEPT, dropped),
            *targets.accept(),
            Label(dropped),
            *targets.drop(),
        ]
        code = [*_annotated(code, note), Label(scan)]
        rules = chain.rules[first - 1 : last]
        if last - first + 1 <= INLINE_SCAN:
            for index in range(first, last + 1):
                code += self.annotated_rule(chain, index, targets)
        elif all(entries := [classifier.entry(rule, self.interfaces) for rule in rules]):
            # The run's records in order, tested by the classifier's loop: one call, however
            # long the run (a scan's code would cost the verifier a few instructions a rule).
            run = self.tables.add_list(entries, slots)  # type: ignore[arg-type]
            self.runs.append((chain.name, first, last))
            code += classifier_code.call(run, targets, after, self.label)
        else:
            for function in self.scan_functions(chain, first, last):
                scanned = self.label("scanned")
                code += [
                    *call_function(function),
                    *targets.after_jump(scanned, self.label),
                    Label(scanned),
                ]
        return [*code, Label(after)]

    def classified_run(self, chain: Chain, segment: Segment, targets: Targets) -> list[Item]:
        """Rules first..last answered by the classifier (see codegen.tc.classifier)."""
        first, last = segment.first, segment.last
        rules = chain.rules[first - 1 : last]
        entries = [classifier.entry(rule, self.interfaces) for rule in rules]
        slots = [self.layout.slot((chain.name, i)) for i in range(first, last + 1)]
        run = self.tables.add_run(entries, slots)  # type: ignore[arg-type]
        self.runs.append((chain.name, first, last))
        note = RuleNote(
            chain.name,
            first,
            f"rules {first} to {last} of {chain.name}: a decision tree over "
            f"{last - first + 1} rules",
        )
        after = self.label("after_run")
        code = classifier_code.call(run, targets, after, self.label)
        return [*_annotated(code, note), Label(after)]

    def rule(self, chain: Chain, index: int, rule: Rule, targets: Targets) -> list[Item]:
        slot = self.layout.slot((chain.name, index))
        miss = self.label("next")
        hotdrop = self.label("hotdrop")
        # The key slot an exact run's lookup uses, free while a rule's matches run.
        key = (SCRATCH_OFFSET - 24) if isinstance(targets, InlineTargets) else -24
        context = matches.Context(
            miss,
            hotdrop,
            self.label,
            self.interfaces,
            key,
            rule=(chain.name, index),
            slots=self.slots,
            ruleset=self.ruleset,
            policy_bits=self.policy_bits,
            owner_bits=self.owner_bits,
            bridge_ports=self.bridge_ports,
        )
        code = matches.emit(rule.matches, context)
        target = rule.target
        # A verdict's rule is counted once, at the verdict's tail (codegen.tc.hooks), from the
        # slot it leaves as the deciding one; any other rule is counted here.
        decided = I.st(Size.W, FACTS, Facts.DECIDED.offset, slot)
        if not isinstance(target, VERDICTS):
            code += [
                I.mov64(R1, slot),
                I.ldx(Size.H, R2, FACTS, Facts.TOT_LEN.offset),
                I.call_local(COUNT),
            ]
        falls_through = False
        if isinstance(target, Accept):
            code += [decided, *targets.accept()]
        elif isinstance(target, Drop):
            code += [decided, *targets.drop()]
        elif isinstance(target, Reject):
            # A drop, and the drop tail answers it (codegen.tc.replies).
            answer = I.st(Size.B, FACTS, Facts.REJECT.offset, 1 + REJECT_WITH[target.reply])
            code += [decided, answer, *targets.drop()]
        elif isinstance(target, log.LOGGING):
            code += log.log_call(slot)  # and on with the next rule
            falls_through = True
        elif isinstance(target, MarkTarget):
            code += mark_target.set_mark(target)  # and on with the next rule
            falls_through = True
        elif isinstance(target, ConnmarkTarget):
            code += mark_target.connmark(target, self.label)  # and on with the next rule
            falls_through = True
        elif isinstance(target, Return):
            code += targets.return_()
        elif isinstance(target, Jump):
            code += call_function(chain_function(target.chain))
            code += targets.after_jump(miss, self.label)
        elif isinstance(target, Goto):
            code += call_function(chain_function(target.chain))
            code += targets.after_goto(self.label)
        else:
            falls_through = True  # no target: the rule only counts
        if _can_hotdrop(rule):
            if falls_through:
                code.append(I.ja(miss))
            # The rule decided, but a hotdrop counts nothing (its tail finds no such slot).
            uncounted = I.st(Size.W, FACTS, Facts.DECIDED.offset, slot | UNCOUNTED)
            code += [Label(hotdrop), uncounted, *targets.hotdrop()]
        return [*code, Label(miss)]


def _annotated(code: list[Item], note: RuleNote) -> list[Item]:
    return [item.annotate(note) if isinstance(item, I.Insn) else item for item in code]
