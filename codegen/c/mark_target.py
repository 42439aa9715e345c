"""`-j MARK` in C: `mark = (mark & ~mask) ^ value` into the facts, which later `-m mark`
matches read (f->mark), and into skb->mark, which the packet carries on to the kernel's later
hooks (and BPF_PROG_TEST_RUN's returned context), as netfilter's does. The rule counts, then
goes on with the next rule (XT_CONTINUE).

`-j CONNMARK` (xt_connmark's connmark_tg_shift, written out per mode): a new connection mark
goes to the tracker's ct_set_mark (codegen/conntrack), which leaves a packet without a
connection alone; --restore-mark writes the packet's mark as MARK does, for a packet with one."""

from __future__ import annotations

from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.ctinfo import STATE_INVALID
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


def _masked(value: str, mask: int) -> str:
    if mask == 0:
        return "0"
    return value if mask == UINT32_MAX else f"({value} & {hex_literal(mask)})"


def _shifted(value: str, target: ConnmarkTarget) -> str:
    if not target.shift_bits:
        return value
    return f"({value} {'>>' if target.shift_right else '<<'} {target.shift_bits})"


def connmark(target: ConnmarkTarget) -> list[str]:
    """The statements of a CONNMARK rule after its count."""
    old = _masked("f->ct.mark", ~target.ctmask & UINT32_MAX)
    if target.mode == "set":
        new = _shifted(f"({old} ^ {hex_literal(target.ctmark)})", target)
        return [f"ct_set_mark(&f->ct, {new});"]
    if target.mode == "save":
        new = f"{old} ^ {_shifted(_masked('f->mark', target.nfmask), target)}"
        return [f"ct_set_mark(&f->ct, {new});"]
    moved = _shifted(_masked("f->ct.mark", target.ctmask), target)
    kept = _masked("f->mark", ~target.nfmask & UINT32_MAX)
    return [
        f"if (f->ct.state != {STATE_INVALID}) {{",
        f"    f->mark = {kept} ^ {moved};",
        f"    {STORE}",
        "}",
    ]


# skb->mark = f->mark, as one store at the context plus a constant: with many MARK rules in a
# function clang would compute &skb->mark once and store through that register, which the
# verifier refuses ("dereference of modified ctx ptr").
STORE = (
    'asm volatile("*(u32 *)(%[skb] + %[at]) = %[mark]" : : [skb] "r"(skb),'
    ' [at] "i"(__builtin_offsetof(struct __sk_buff, mark)), [mark] "r"(f->mark) : "memory");'
)
