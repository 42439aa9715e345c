"""What a rule's target becomes, in the two places a rule can be: inline in an entry function
(a built-in chain) or in a user chain's function.

User chains are `static __always_inline` functions answering CONTINUE, ACCEPT or DROP, so C's
own call and return give `-j` and `-g` their iptables meaning: a jump continues after its rule
on CONTINUE, a goto hands its callee's answer up (a RETURN after a goto resumes after the jump
that entered the goto's chain), RETURN or the end of a chain answers CONTINUE, and in a
built-in chain RETURN, or a goto that came back, applies the policy.

ACCEPT and DROP leave the rule's slot in f->decided and go to a tail that counts it: one
counter update per function rather than one per rule.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a user chain answers (the C's enum of the same names).
CONTINUE, ACCEPT, DROP = 0, 1, 2
# The rule layer's target extensions (codegen.rules.extensions.TARGETS) this backend refuses,
# each with the reason its refusal gives.
# The ones it generates (REJECT: its answers come from codegen.tc.replies' program, see
# codegen/c/programs.py; LOG, NFLOG: codegen/c/log.py; MARK, CONNMARK: codegen/c/mark_target.py).
GENERATED_TARGETS = frozenset({"REJECT", "LOG", "NFLOG", "MARK", "CONNMARK"})
REFUSED_TARGETS: dict[str, str] = {}


class Targets:
    """The statements of each target, and of a hotdrop, where the rule is."""

    def accept(self) -> list[str]:
        raise NotImplementedError

    def drop(self) -> list[str]:
        raise NotImplementedError

    def hotdrop(self) -> list[str]:
        """Dropped by a match: not counted."""
        raise NotImplementedError

    def return_(self) -> list[str]:
        raise NotImplementedError

    def jump(self, function: str) -> list[str]:
        raise NotImplementedError

    def goto(self, function: str) -> list[str]:
        raise NotImplementedError


@dataclass
class BuiltinTargets(Targets):
    """A built-in chain, inline in the entry: verdicts go to the entry's tails."""

    accept_label: str
    policy_label: str
    drop_label: str = "drop"

    def accept(self) -> list[str]:
        return [f"goto counted_{self.accept_label};"]

    def drop(self) -> list[str]:
        return [f"goto counted_{self.drop_label};"]

    def hotdrop(self) -> list[str]:
        return ["goto drop;"]

    def return_(self) -> list[str]:
        return [f"goto {self.policy_label};"]  # RETURN in a built-in chain: the policy

    def _verdicts(self) -> list[str]:
        return [
            f"if (answer == ACCEPT)\n    goto {self.accept_label};",
            f"if (answer == DROP)\n    goto {self.drop_label};",
        ]

    def jump(self, function: str) -> list[str]:
        return [f"answer = {function}(skb, f);", *self._verdicts()]

    def goto(self, function: str) -> list[str]:
        # Its answer is the chain's; if it came back, the built-in chain returns: its policy.
        return [
            f"answer = {function}(skb, f);",
            *self._verdicts(),
            f"goto {self.policy_label};",
        ]


class FunctionTargets(Targets):
    """A user chain's function: verdicts are answered to the caller."""

    def accept(self) -> list[str]:
        return ["goto counted_accept;"]

    def drop(self) -> list[str]:
        return ["goto counted_drop;"]

    def hotdrop(self) -> list[str]:
        return ["return DROP;"]

    def return_(self) -> list[str]:
        return ["return CONTINUE;"]

    def jump(self, function: str) -> list[str]:
        return [f"answer = {function}(skb, f);", "if (answer != CONTINUE)\n    return answer;"]

    def goto(self, function: str) -> list[str]:
        return [f"return {function}(skb, f);"]
