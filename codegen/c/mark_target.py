"""`-j MARK` in C: `mark = (mark & ~mask) ^ value` into the facts, which later `-m mark`
matches read (f->mark), and into skb->mark, which the packet carries on to the kernel's later
hooks (and BPF_PROG_TEST_RUN's returned context), as netfilter's does. The rule counts, then
goes on with the next rule (XT_CONTINUE)."""

from __future__ import annotations

from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.model import UINT32_MAX

from .matches.common import hex_literal


def set_mark(target: MarkTarget) -> list[str]:
    """The statements of a MARK rule after its count."""
    keep = ~target.mask & UINT32_MAX
    if keep == 0:
        value = hex_literal(target.value)
    else:
        value = "f->mark" if keep == UINT32_MAX else f"(f->mark & {hex_literal(keep)})"
        if target.value:
            value = f"{value} ^ {hex_literal(target.value)}"
    return [f"f->mark = {value};", STORE]


# skb->mark = f->mark, as one store at the context plus a constant: with many MARK rules in a
# function clang would compute &skb->mark once and store through that register, which the
# verifier refuses ("dereference of modified ctx ptr").
STORE = (
    'asm volatile("*(u32 *)(%[skb] + %[at]) = %[mark]" : : [skb] "r"(skb),'
    ' [at] "i"(__builtin_offsetof(struct __sk_buff, mark)), [mark] "r"(f->mark) : "memory");'
)
