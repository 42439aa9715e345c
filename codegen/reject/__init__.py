"""REJECT's answers in the TC programs: one C source (reject.bpf.c) that both backends build into
their programs, as the connection tracker is (codegen/conntrack).

`reject_reply(skb, with, hook, icmp_source, pkt_type)` rewrites the packet into the answer
ipt_REJECT sends for it (a TCP RST, or an ICMP destination unreachable quoting it) and returns
bpf_redirect's TC_ACT_REDIRECT, or TC_ACT_SHOT where the kernel sends nothing (the rules of
codegen/rules/extensions/reject.py) or the answer cannot be built. `with` is the enum
ipt_reject_with value; `hook` is HOOK_INGRESS (the answer leaves by the device the packet came
in on), HOOK_EGRESS (the packet was leaving: the answer is delivered to our own stack) or
HOOK_BRIDGED (a bridge forwards it from port to port: the answer leaves by its in-port);
`icmp_source` the ICMP error's source address, host order; `pkt_type` the packet's (skb's, or
the test-run context's), as only PACKET_HOST packets get ICMP errors, with BROADCAST_ROUTE
or'd in for a packet to a broadcast address of the namespace and FORWARDED for one the
kernel routes. An ICMP error goes
only as the kernel's ICMP rate limits let it, kept in the maps of codegen.reject.limits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

SOURCE = Path(__file__).with_name("reject.bpf.c")
HOOK_INGRESS, HOOK_EGRESS, HOOK_BRIDGED = 0, 1, 2
# skb->tc_index of an answer delivered to our own stack (an OUTPUT REJECT's): the ingress
# program lets it by unjudged (codegen.tc.hooks, codegen.c.programs).
OWN_ANSWER = 0xBF1A
# skb->tc_index of the answer to a packet that came in (INPUT's or FORWARD's), sent back out
# of its device: the egress program judges it with OUTPUT, as the kernel's answer passes OUTPUT
# (ip_local_out) with the packet's connection attached, RELATED (codegen.tc.hooks,
# codegen.c.programs; the tracker's ct_answer).
ROUTED_ANSWER = 0xBF1B
# skb->tc_index of such an answer to a packet that had no connection (conntrack found it
# INVALID): nothing is attached to it, so OUTPUT's conntrack tracks it as any packet the host
# sends (a RST of no connection is INVALID, an ICMP error RELATED to the connection it quotes,
# if any). It is ROUTED_ANSWER with BARE_BIT set: `tc_index | BARE_BIT == BARE_ANSWER` is
# true of both.
BARE_BIT = 0x4
BARE_ANSWER = ROUTED_ANSWER | BARE_BIT
TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
# Or'd into reject_reply's `pkt_type` when the packet's destination is one of the namespace's
# broadcast addresses (a subnet's): its route is RTCF_BROADCAST, which no answer is sent to.
BROADCAST_ROUTE = 0x100
# Or'd into `pkt_type` for a packet the kernel routes (FORWARD at TC ingress): ip_forward took
# one off its TTL before FORWARD, and the ICMP error quotes it so.
FORWARDED = 0x200
# Or'd into `pkt_type` for a packet conntrack found INVALID: its answer is marked BARE_ANSWER.
NO_CONNECTION = 0x400


def source(prelude: Iterable[str], *, line_marker: bool = True) -> str:
    """The C as text: `prelude` (the includer's types, helpers and constants), then the C (its
    lines numbered as in its file, with `line_marker`)."""
    lines = [*prelude]
    if line_marker:
        lines.append(f'#line 1 "{SOURCE.name}"')
    lines.append(SOURCE.read_text())
    return "\n".join(lines) + "\n"


# The function verified once (the C's RJ_GLOBAL): its arguments as the BTF the assembler writes
# describes them.
GLOBALS: dict[str, tuple[str | int, ...]] = {
    "reject_reply": ("ctx", "scalar", "scalar", "scalar", "scalar"),
}

# What clang needs around the C.
CLANG_PRELUDE = (
    "#include <linux/bpf.h>",
    "#include <bpf/bpf_helpers.h>",
    f"#define RJ_OWN_ANSWER {OWN_ANSWER:#x}",
    f"#define RJ_ROUTED_ANSWER {ROUTED_ANSWER:#x}",
    f"#define RJ_BARE_ANSWER {BARE_ANSWER:#x}",
    f"#define RJ_NO_CONNECTION {NO_CONNECTION:#x}",
    f"#define RJ_BROADCAST_ROUTE {BROADCAST_ROUTE:#x}",
    f"#define RJ_FORWARDED {FORWARDED:#x}",
    f"#define RJ_HOOK_EGRESS {HOOK_EGRESS}",
    f"#define RJ_HOOK_BRIDGED {HOOK_BRIDGED}",
)


class RejectUnavailable(RuntimeError):
    """REJECT's answers cannot be built here (no clang for the BPF target, or it failed)."""


@functools.cache
def bytecode_functions() -> tuple:
    """reject_reply as assembler items (a BTF-described global the bytecode backend's programs
    call), from clang's object of the C; compiled once per source and cached. Raises
    RejectUnavailable, saying why, where that cannot be done."""
    from codegen.bpf.clang import ClangError, ClangUnavailable, linked_globals
    from codegen.bpf.elf import ObjectError

    try:
        return linked_globals(source(CLANG_PRELUDE), name="reject", arguments=GLOBALS)
    except (ClangUnavailable, ClangError, ObjectError) as error:
        raise RejectUnavailable(f"REJECT's answers cannot be built: {error}") from error
