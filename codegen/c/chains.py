"""Chains as C: a built-in chain inline in its entry function, a user chain as a `static
__always_inline` function, and each rule's code under a comment holding its iptables-save text.

User chains are inlined, not BPF-to-BPF calls, because bcc loads one ELF section per program
and does not relocate calls (a `__noinline` callee loads as "call to invalid destination").
Inlining costs code size, one copy of a chain per path of calls to it (refused beyond
MAX_EXPANDED_RULES), and removes the 8-frame limit of BPF calls; the whole program shares one
512-byte stack, of which the FIB lookup takes 64 bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from codegen.rules.extensions import target_refusal
from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.extensions.reject import REJECT_WITH, Reject
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import Accept, Chain, Drop, Goto, Jump, Return, Rule, Ruleset
from codegen.tc import log
from codegen.tc.layout import CounterLayout
from codegen.tc.matches.limit import slots as limit_slots

from . import mark_target, matches, table
from .entries import CCompileError
from .source_text import Code, SpanMark, comment, indented, text_of
from .targets import GENERATED_TARGETS, REFUSED_TARGETS, BuiltinTargets, FunctionTargets, Targets

# Targets after which evaluation goes on with the next rule (XT_CONTINUE), besides none.
CONTINUING = (Jump, MarkTarget, ConnmarkTarget, *log.LOGGING)

# Rules after inlining every user chain at each of its call sites: past this, the C would be
# too big for clang and the verifier to be worth trying.
MAX_EXPANDED_RULES = 100_000


def user_chains_reached(ruleset: Ruleset, roots: Iterable[str]) -> list[str]:
    """User chains reachable from `roots`, in rule-set order; refuses a rule set whose chains,
    inlined at every call site, would hold more than MAX_EXPANDED_RULES rules."""
    expanded: dict[str, int] = {}
    reached: set[str] = set()

    def size(name: str) -> int:
        if name not in expanded:
            total = 0
            for rule in ruleset.chains[name].rules:
                total += 1
                if isinstance(rule.target, Jump | Goto):
                    reached.add(rule.target.chain)
                    total += size(rule.target.chain)
            expanded[name] = total
        return expanded[name]

    for root in roots:
        try:
            size(root)
        except RecursionError:
            raise CCompileError(f"user chains called from {root} nest too deep to inline") from None
        if size(root) > MAX_EXPANDED_RULES:
            raise CCompileError(
                f"chain {root} would hold {size(root):,} rules with every user chain inlined "
                f"where it is called (the C backend's limit is {MAX_EXPANDED_RULES:,}): "
                "call user chains from fewer places"
            )
    return [name for name in ruleset.chains if name in reached]


def c_identifier(chain: str, number: int) -> str:
    """A C function name for a user chain (chain names may hold `-` or other characters)."""
    return f"chain_{number}_{re.sub(r'[^A-Za-z0-9_]', '_', chain)}"


class ChainWriter:
    """The code of a rule set's chains, for one unit: `functions` names the C function of each
    user chain the unit holds; `table`, the entries of the runs of plain rules that the
    unit's chains (`builtins` and the user chains) scan from the rule table
    (codegen/c/table.py: runs of `table_from` rules or more)."""

    def __init__(
        self,
        ruleset: Ruleset,
        layout: CounterLayout,
        interfaces: Mapping[str, int],
        user_chains: Iterable[str],
        builtins: Iterable[str] = (),
        table_from: int = table.TABLE_FROM,
        bridges: bool = True,
    ):
        self.ruleset = ruleset
        self.bridges = bridges  # whether -m physdev reads the facts' ports
        self.layout = layout
        self.interfaces = interfaces
        self.slots = limit_slots(ruleset)  # each limit match's bucket
        numbers = {name: number for number, name in enumerate(ruleset.chains)}
        self.functions = {name: c_identifier(name, numbers[name]) for name in user_chains}
        self.table = table.RuleTable(interfaces, table_from)
        self.runs: dict[str, dict[int, table.Run]] = {}
        for name in [*builtins, *self.functions]:
            rules = ruleset.chains[name].rules
            slots = [layout.slot((name, index)) for index in range(1, len(rules) + 1)]
            self.runs[name] = {run.first: run for run in self.table.runs(rules, slots)}

    def user_chains(self) -> Code:
        """Every user chain's function, declared first so that chains may call each other in
        any order."""
        if not self.functions:
            return []
        code: Code = ["// User chains, inlined wherever they are called.", ""]
        code += [
            f"static __always_inline int {function}(struct __sk_buff *skb, facts_t *f);"
            for function in self.functions.values()
        ]
        code.append("")
        for name in self.functions:
            code += self.user_chain(self.ruleset.chains[name])
        return code

    def builtin_chain(self, name: str, accept: str, drop: str = "drop") -> Code:
        """Built-in chain `name` inline: its verdicts go to the tails `accept` and `drop` (each
        with its `counted_` variant), its policy after its last rule."""
        chain = self.ruleset.chains[name]
        policy = f"policy_{name}"
        code: Code = [f"// Chain {name}, policy {chain.policy}."]
        code += self.rules(chain, BuiltinTargets(accept, policy, drop))
        slot = self.layout.slot((name, "policy"))
        verdict = accept if chain.policy == "ACCEPT" else drop
        if f"goto {policy};" in text_of(code):
            code.append(f"{policy}:")
        else:
            code.append(f"// Policy of {name}.")
        return [*code, f"f->decided = {slot};", f"goto counted_{verdict};"]

    def user_chain(self, chain: Chain) -> Code:
        body = self.rules(chain, FunctionTargets())
        inside: Code = ["int answer;", ""] if "answer = " in text_of(body) else []
        inside += [*body, "return CONTINUE;"]
        for verdict in ("accept", "drop"):
            if f"goto counted_{verdict};" in text_of(body):
                inside += [
                    f"counted_{verdict}:",
                    "count(f->decided, f->tot_len);",
                    f"return {verdict.upper()};",
                ]
        return [
            comment(f"Chain {chain.name}: answers CONTINUE (returned), ACCEPT or DROP."),
            f"static __always_inline int {self.functions[chain.name]}"
            "(struct __sk_buff *skb, facts_t *f)",
            "{",
            *indented(inside),
            "}",
            "",
        ]

    def rules(self, chain: Chain, targets: Targets) -> Code:
        """A chain's rules in order: each inline, or a run of them as a scan of the table."""
        code: Code = []
        runs = self.runs.get(chain.name, {})
        index = 1
        while index <= len(chain.rules):
            run = runs.get(index)
            if run is None:
                code += self.rule(chain, index, chain.rules[index - 1], targets)
                index += 1
                continue
            texts = [write_rule(chain.name, rule) for rule in chain.rules[run.first - 1 : run.last]]
            code += table.scan(chain.name, run, targets, texts)
            index = run.last + 1
        return code

    def rule(self, chain: Chain, index: int, rule: Rule, targets: Targets) -> Code:
        slot = self.layout.slot((chain.name, index))
        miss, hotdrop = f"rule_{slot}_next", f"rule_{slot}_hotdrop"
        text = write_rule(chain.name, rule)
        labels = matches.Labels(
            miss,
            hotdrop,
            self.interfaces,
            rule=(chain.name, index),
            slots=self.slots,
            bridge_ports=self.bridges,
        )
        where = f"{rule.source}: " if rule.source is not None else ""
        refusal = target_refusal(rule.target, REFUSED_TARGETS, GENERATED_TARGETS)
        if refusal is None and log.refusal(rule) is not None:
            refusal = f"refuses this '-j LOG' because {log.refusal(rule)}"
        if refusal is not None:
            raise CCompileError(
                f"{where}the C backend {refusal} (rule {index} of {chain.name}): {text}"
            )
        try:
            code = matches.write_matches(rule.matches, labels)
        except matches.UnsupportedMatch as error:
            raise CCompileError(f"{where}{error}: {text}") from None
        decided = f"f->decided = {slot};"
        target = rule.target
        if not isinstance(target, Accept | Drop | Reject):  # verdicts count in a shared tail
            code.append(f"count({slot}, f->tot_len);")
        if isinstance(target, Accept):
            code += [decided, *targets.accept()]
        elif isinstance(target, Drop):
            code += [decided, *targets.drop()]
        elif isinstance(target, Reject):  # a drop that the drop tail answers (programs.py)
            code += [decided, f"f->reject = {1 + REJECT_WITH[target.reply]};", *targets.drop()]
        elif isinstance(target, log.LOGGING):
            code.append(f"log_event(skb, f, {slot});")  # and on with the next rule
        elif isinstance(target, MarkTarget):
            code += mark_target.set_mark(target)  # and on with the next rule
        elif isinstance(target, ConnmarkTarget):
            code += mark_target.connmark(target)  # and on with the next rule
        elif isinstance(target, Return):
            code += targets.return_()
        elif isinstance(target, Jump):
            code += targets.jump(self.functions[target.chain])
        elif isinstance(target, Goto):
            code += targets.goto(self.functions[target.chain])
        if any(matches.can_hotdrop(match) for match in rule.matches):
            if target is None or isinstance(target, CONTINUING):
                code.append(f"goto {miss};")  # past the hotdrop
            code += [f"{hotdrop}:", decided, *targets.hotdrop()]
        if any(f"goto {miss};" in line for line in code):
            code.append(f"{miss}:;")
        source = str(rule.source) if rule.source is not None else None
        return [
            SpanMark(True, chain.name, index, text, source),
            comment(text),
            *code,
            SpanMark(False, chain.name, index, text, source),
        ]
