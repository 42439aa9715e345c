"""REJECT's answers in the bytecode programs: a REJECT rule drops the packet with the reject
type noted in the facts (Facts.REJECT), and the drop tail, finding it there, calls
`reject_reply` (codegen/reject: nf_send_reset and nf_send_unreach in C, linked from clang's
object) to turn the packet into the answer and send it: back out of the device it came in on
(INPUT, FORWARD), or into our own stack (OUTPUT), so that the local socket hears of it.

The ICMP error's source address is the kernel's choice: the packet's destination at INPUT (a
local route), the router's address on the device the packet came in on at FORWARD (the route
back to the sender; `interface_addresses`, filled at apply time with each device's address and
MAC: a frame that came to a broadcast or multicast MAC is answered from the device's own MAC).
At OUTPUT the kernel answers from the packet's own source (the route back to a local sender),
but an answer delivered to our stack from a device with a local source is a martian there and
is dropped before any socket sees it: so it comes from the packet's destination. The chain
program for BPF_PROG_TEST_RUN has no devices of its own: at FORWARD it answers from the
packet's destination.
"""

from __future__ import annotations

import itertools

from codegen import reject
from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R5, R6, R7, R8, R10, AluOp, JmpOp, Size
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.ctinfo import STATE_INVALID
from codegen.rules.extensions.reject import REJECT_WITH, Reject
from codegen.rules.model import Rule, Ruleset

from .layout import FACTS, SCRATCH_OFFSET, Facts, map_and_key
from .local import LocalAddresses, broadcasts, membership
from .parser import PACKET_HOST
from .program import Hook

# ifindex -> {its first IPv4 address (host order, 4 bytes), its MAC (6), 2 bytes of padding}
INTERFACE_ADDRESSES = "interface_addresses"
INTERFACE_VALUE_SIZE = 12
INTERFACE_ADDRESSES_ENTRIES = 256
RESET = REJECT_WITH["tcp-reset"]  # ipt_reject_with's IPT_TCP_RESET


Unavailable = reject.RejectUnavailable


def first_reject_rule(ruleset: Ruleset) -> tuple[str, int, Rule] | None:
    """The first REJECT rule, if any: its chain, 1-based index, itself."""
    return ruleset.first_with(Reject)


def rejects(ruleset: Ruleset) -> bool:
    return first_reject_rule(ruleset) is not None


def reply_tail(
    hook: Hook, builtin: str | None, plain_drop: str, local: LocalAddresses, tracking: bool
) -> list[Item]:
    """At the drop tail: jump to `plain_drop` unless a REJECT dropped the packet; else answer
    it and return what reject_reply says (a redirect, or TC_ACT_SHOT when no answer is due).
    `builtin` is the chain program's chain; `local` what the namespace delivers locally, whose
    broadcast addresses have broadcast routes (no answer to a packet to one); `tracking`: the
    facts hold the packet's connection (an answer sent back out of its device to a packet of
    none is marked so: reject.NO_CONNECTION). Keeps to
    registers (r7: the device's entry, r8: the reject type) and the one scratch slot: the
    tracker's calls leave the frame no room."""
    bridged = hook == "bridged"
    way = reject.HOOK_INGRESS
    if hook == "egress" or builtin == "OUTPUT":
        way = reject.HOOK_EGRESS
    elif bridged:
        way = reject.HOOK_BRIDGED
    call = "reply_call"
    code: list[Item] = [
        I.ldx(Size.B, R8, FACTS, Facts.REJECT.offset),
        I.jmp32(JmpOp.JEQ, R8, 0, plain_drop),
        I.alu32(AluOp.SUB, R8, 1),
        I.mov64(R7, 0),
    ]
    if hook in ("ingress", "bridged"):
        # The device the packet came in on (a bridged packet's: the bridge): its address
        # answers a forwarded packet, and its MAC a frame that came to a group MAC (reject_reply
        # swaps the frame's two). The bridge's ICMP error always comes from the bridge's MAC
        # (it is routed out of the bridge), its RST from the MAC the packet went to.
        code += [
            I.ldx(Size.W, R1, FACTS, Facts.IN_IFINDEX.offset),
            I.stx(Size.W, R10, SCRATCH_OFFSET, R1),
            *map_and_key(INTERFACE_ADDRESSES, SCRATCH_OFFSET),
            I.call("map_lookup_elem"),
            I.mov64(R7, R0),
            I.jmp(JmpOp.JEQ, R7, 0, plain_drop if bridged else call),
        ]
        if bridged:
            code += [
                I.jmp32(JmpOp.JEQ, R8, RESET, call),
                I.ldx(Size.W, R1, R7, 0),
                I.jmp32(JmpOp.JEQ, R1, 0, plain_drop),  # no address: no route back to it
            ]
        else:
            code += [
                I.ldx(Size.B, R1, FACTS, Facts.PKT_TYPE.offset),
                I.jmp32(JmpOp.JEQ, R1, PACKET_HOST, call),
            ]
        code += [
            I.mov64(R1, R6),
            I.mov64(R2, 0),
            I.mov64(R3, R7),
            I.alu64(AluOp.ADD, R3, 4),
            I.mov64(R4, 6),
            I.mov64(R5, 0),
            I.call("skb_store_bytes"),
        ]
    code += [
        Label(call),
        I.ldx(Size.W, R4, FACTS, Facts.DADDR.offset),
        I.ldx(Size.B, R5, FACTS, Facts.PKT_TYPE.offset),
    ]
    if tracking and way == reject.HOOK_INGRESS:
        state = Facts.connection("state")
        code += [
            I.ldx(state.size, R1, FACTS, state.offset),
            I.jmp32(JmpOp.JNE, R1, STATE_INVALID, "reply_tracked"),
            I.alu32(AluOp.OR, R5, reject.NO_CONNECTION),
            Label("reply_tracked"),
        ]
    if hook == "ingress":
        code += [
            I.ldx(Size.W, R1, FACTS, Facts.OUT_IFINDEX.offset),
            I.jmp32(JmpOp.JEQ, R1, 0, "reply_source"),  # INPUT: from the destination
            I.alu32(AluOp.OR, R5, reject.FORWARDED),
        ]
    if hook in ("ingress", "bridged"):
        code += [
            I.jmp(JmpOp.JEQ, R7, 0, "reply_source"),
            I.ldx(Size.W, R4, R7, 0),  # FORWARD: from the device's address
            Label("reply_source"),
        ]
    directed = broadcasts(local)
    if directed:  # a subnet's broadcast: RTCF_BROADCAST, which reject_reply is told of
        numbers = itertools.count()

        def label(stem: str) -> str:
            return f"reply_{stem}_{next(numbers)}"

        code += [
            I.ldx(Size.W, R1, FACTS, Facts.DADDR.offset),
            *membership(R1, directed, "reply_broadcast", "reply_go", label),
            Label("reply_broadcast"),
            I.alu32(AluOp.OR, R5, reject.BROADCAST_ROUTE),
            Label("reply_go"),
        ]
    return [
        *code,
        I.mov64(R1, R6),
        I.mov64(R2, R8),
        I.mov64(R3, way),
        I.call_local("reject_reply"),
        I.exit_(),
    ]


def functions() -> tuple:
    return reject.bytecode_functions()


# The C backend's programs (codegen/c) answer through a program of ours, tail-called from
# their drop tail with what reply_tail reads from the facts put in the skb's control block:
# cb[3] = the facts' REJECT byte | PKT_TYPE << 8 | (1 if FORWARD, at ingress) << 16 |
# (1 if conntrack found the packet INVALID) << REPLY_CB_NO_CONNECTION, cb[4] = the destination
# address (host order) and cb[2] = the in-interface (the device at ingress, the bridge of a
# bridged packet; the chain program's cb[2] was an input, read by now).
REPLY_CB_DEVICE, REPLY_CB_FIELDS, REPLY_CB_DADDR = 2, 3, 4
REPLY_CB_NO_CONNECTION = 17
TC_ACT_SHOT = 2


def reply_program(hook: Hook, builtin: str | None, local: LocalAddresses) -> list[Item]:
    """A whole program answering the REJECT a tail-calling program of `hook` (and chain
    `builtin`, for the chain program) noted in the skb's control block: the facts reply_tail
    reads are rebuilt on the stack from it, then reply_tail answers, or the packet is dropped.
    `local` as reply_tail takes it."""
    cb, state = SKB_OFFSETS["cb"], Facts.connection("state")
    zero = [I.st(Size.DW, FACTS, offset, 0) for offset in range(0, Facts.SIZE, 8)]
    return [
        I.mov64(R6, R1),
        I.mov64(FACTS, R10),
        I.alu64(AluOp.ADD, FACTS, -Facts.SIZE),
        *zero,
        I.ldx(Size.W, R1, R6, cb + 4 * REPLY_CB_FIELDS),
        I.stx(Size.B, FACTS, Facts.REJECT.offset, R1),
        I.alu32(AluOp.RSH, R1, 8),
        I.stx(Size.B, FACTS, Facts.PKT_TYPE.offset, R1),
        I.alu32(AluOp.RSH, R1, 8),
        I.mov32(R2, R1),
        I.alu32(AluOp.AND, R2, 1),
        I.stx(Size.W, FACTS, Facts.OUT_IFINDEX.offset, R2),  # non-zero: it was forwarded
        I.alu32(AluOp.RSH, R1, REPLY_CB_NO_CONNECTION - 16),
        I.jmp32(JmpOp.JEQ, R1, 0, "reply_connection"),
        I.st(state.size, FACTS, state.offset, STATE_INVALID),
        Label("reply_connection"),
        I.ldx(Size.W, R1, R6, cb + 4 * REPLY_CB_DADDR),
        I.stx(Size.W, FACTS, Facts.DADDR.offset, R1),
        I.ldx(Size.W, R1, R6, cb + 4 * REPLY_CB_DEVICE),
        I.stx(Size.W, FACTS, Facts.IN_IFINDEX.offset, R1),
        *reply_tail(hook, builtin, "reply_shot", local, tracking=True),
        Label("reply_shot"),
        I.mov64(R0, TC_ACT_SHOT),
        I.exit_(),
        *functions(),
    ]
