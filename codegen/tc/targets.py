"""Where a rule's verdict goes, by where its chain's code lives: inline in the entry function
(a built-in chain short enough: jumps to the program's tails) or in a global function (a user
chain, or a chunk of a long chain: an answer in r0 for its caller).

A chain function answers CONTINUE (it returned or fell off its end), ACCEPT or DROP; a chunk of
a longer chain answers RETURNED when the chain returns. That gives jump and goto their iptables
meaning without a stack of our own: a jump continues after its rule on CONTINUE; a goto passes
its callee's answer up, so a RETURN after a goto resumes in the chain that jumped to the goto's
chain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram
from codegen.bpf.isa import R0, R1, R2, R6, JmpOp

from .layout import ACCEPT, CONTINUE, DROP, FACTS, Facts

RETURNED = 3  # a chunk's answer when its chain returns (RETURN, or a goto that came back)
# The rule layer's target extensions (codegen.rules.extensions.TARGETS) this backend refuses,
# each with the reason its refusal gives (REJECT it generates: codegen.tc.replies).
REFUSED_TARGETS: dict[str, str] = {}
# LOG, NFLOG: codegen.tc.log; MARK, CONNMARK: codegen.tc.mark_target
GENERATED_TARGETS = frozenset({"REJECT", "LOG", "NFLOG", "MARK", "CONNMARK"})
NewLabel = Callable[[str], str]


def chain_function(chain: str) -> str:
    """The name of the global function holding a user chain (or its first part)."""
    return f"chain:{chain}"


def global_prologue(name: str) -> list[Item]:
    """Start of a global function taking the facts pointer, which the verifier must see
    checked for NULL before use, and the context, kept in r6 as in the entry function (LOG's
    records read the packet through it: codegen.tc.log)."""
    not_null = f"{name}:facts"
    return [
        Subprogram(name, "global", (Facts.SIZE, "ctx")),
        I.jmp(JmpOp.JNE, R1, 0, not_null),
        I.mov64(R0, CONTINUE),
        I.exit_(),
        Label(not_null),
        I.mov64(FACTS, R1),
        I.mov64(R6, R2),
    ]


def call_function(name: str) -> list[Item]:
    """Call a global chain function with its two arguments: the facts and the context."""
    return [I.mov64(R1, FACTS), I.mov64(R2, R6), I.call_local(name)]


class Targets:
    def accept(self) -> list[Item]:
        raise NotImplementedError

    def hotdrop(self) -> list[Item]:
        """A match dropped the packet on the spot: a drop, but no rule judged it."""
        return self.drop()

    def drop(self) -> list[Item]:
        raise NotImplementedError

    def return_(self) -> list[Item]:
        raise NotImplementedError

    def after_jump(self, next_rule: str, new_label: NewLabel) -> list[Item]:
        raise NotImplementedError

    def after_goto(self, new_label: NewLabel) -> list[Item]:
        raise NotImplementedError


@dataclass
class InlineTargets(Targets):
    """Targets in a built-in chain, inline in the entry function: verdicts jump to the tails;
    only unconditional jumps go far, as they alone can become gotol."""

    accept_label: str
    policy_label: str
    drop_label: str = "drop"

    def accept(self) -> list[Item]:
        return [I.ja(self.accept_label)]

    def drop(self) -> list[Item]:
        return [I.ja(self.drop_label)]

    def hotdrop(self) -> list[Item]:
        return [I.ja("drop")]  # not INPUT's drop: no rule to leave for later fragments

    def return_(self) -> list[Item]:
        return [I.ja(self.policy_label)]  # RETURN in a built-in chain: its policy

    def dispatch(self, new_label: NewLabel, *, returned: bool = False) -> list[Item]:
        """After a call that did not answer CONTINUE: a verdict, or (from a chunk of this very
        chain) RETURNED, which means the policy."""
        code: list[Item] = []
        if returned:
            other = new_label("not_returned")
            code += [I.jmp(JmpOp.JNE, R0, RETURNED, other), I.ja(self.policy_label), Label(other)]
        dropped = new_label("dropped")
        return [
            *code,
            I.jmp(JmpOp.JNE, R0, ACCEPT, dropped),
            I.ja(self.accept_label),
            Label(dropped),
            I.ja(self.drop_label),
        ]

    def after_jump(self, next_rule: str, new_label: NewLabel) -> list[Item]:
        return [I.jmp(JmpOp.JEQ, R0, CONTINUE, next_rule), *self.dispatch(new_label)]

    def after_goto(self, new_label: NewLabel) -> list[Item]:
        decided = new_label("decided")
        return [
            I.jmp(JmpOp.JNE, R0, CONTINUE, decided),
            I.ja(self.policy_label),
            Label(decided),
            *self.dispatch(new_label),
        ]


@dataclass
class FunctionTargets(Targets):
    """Targets in a function: answers returned to the caller. `returned` is the answer for
    RETURN: CONTINUE from a whole user chain, RETURNED from a chunk of a longer chain."""

    returned: int

    def accept(self) -> list[Item]:
        return [I.mov64(R0, ACCEPT), I.exit_()]

    def drop(self) -> list[Item]:
        return [I.mov64(R0, DROP), I.exit_()]

    def return_(self) -> list[Item]:
        return [I.mov64(R0, self.returned), I.exit_()]

    def after_jump(self, next_rule: str, new_label: NewLabel) -> list[Item]:
        return [I.jmp(JmpOp.JEQ, R0, CONTINUE, next_rule), I.exit_()]

    def after_goto(self, new_label: NewLabel) -> list[Item]:
        # The callee's verdict is ours; if it came back, our chain returns.
        came_back = new_label("came_back")
        return [
            I.jmp(JmpOp.JEQ, R0, CONTINUE, came_back),
            I.exit_(),
            Label(came_back),
            *self.return_(),
        ]
