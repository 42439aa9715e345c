"""Fragmented datagrams on INPUT and OUTPUT, judged and counted once as netfilter does there.

INPUT sees a datagram after reassembly (ip_local_deliver) and OUTPUT before the kernel fragments
it (ip_finish_output): netfilter judges and counts it once, with its whole length. Here the
first fragment is judged and counted, and leaves the verdict and the rule (or policy) that gave
it in FRAGMENTS_MAP, an LRU hash of the program's own; a later fragment adds its payload's bytes
(not a packet) to that rule's counter and shares the verdict. A datagram that completes is
counted as netfilter counts it. Later fragments of a datagram whose first was not seen pass as
not handled.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R6, R7, R10, AluOp, JmpOp, Size, TcAction
from codegen.bpf.testrun import BPF_SOCK_OFFSETS, SKB_OFFSETS

from .counters import ADD_BYTES
from .layout import FACTS, FIB_PARAMS_OFFSET, SCRATCH_OFFSET, Facts, map_and_key

FRAGMENTS_MAP = "fragments"  # datagrams whose first fragment INPUT or OUTPUT judged
FRAGMENT_KEY_SIZE, FRAGMENT_VALUE_SIZE = 12, 4  # (saddr, daddr, id, protocol, pad) -> slot
FRAGMENTS_TRACKED = 4096  # an LRU map: the oldest datagrams are forgotten first
FIRST_DROPPED = 1 << 30  # in a FRAGMENTS_MAP value: the first fragment was dropped


def later_fragments(new_label: Callable[[str], str], *, written_whole: bool = False) -> list[Item]:
    """Before the chain: a later fragment takes its datagram's verdict and adds its bytes to
    the counter that judged the first; the last one forgets the datagram.

    `written_whole` (OUTPUT): a packet from an IPPROTO_RAW socket (IP_HDRINCL) was written
    whole by its sender, fragment fields and all, and the kernel never fragments those
    (it refuses them over the MTU): OUTPUT judged it as it is, so it is judged here too."""
    whole = new_label("whole_datagram")
    later = new_label("later_fragment")
    remembered = new_label("fragment_remembered")
    verdict = new_label("fragment_verdict")
    dropped = new_label("fragment_dropped")
    code: list[Item] = [
        I.ldx(Size.H, R1, FACTS, Facts.FRAGMENT.offset),
        I.jmp32(JmpOp.JEQ, R1, 0, whole),
    ]
    if written_whole:
        code += [
            I.ldx(Size.DW, R1, R6, SKB_OFFSETS["sk"]),
            I.jmp(JmpOp.JEQ, R1, 0, later),
            I.call("sk_fullsock"),
            I.jmp(JmpOp.JEQ, R0, 0, later),
            I.ldx(Size.W, R1, R0, BPF_SOCK_OFFSETS["type"]),
            I.jmp32(JmpOp.JNE, R1, socket.SOCK_RAW, later),
            I.ldx(Size.W, R1, R0, BPF_SOCK_OFFSETS["protocol"]),
            I.jmp32(JmpOp.JEQ, R1, socket.IPPROTO_RAW, whole),
        ]
    return [
        *code,
        Label(later),
        *_fragment_key(),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JNE, R0, 0, remembered),
        I.ja("not_handled"),
        Label(remembered),
        I.ldx(Size.W, R7, R0, 0),  # the slot, and FIRST_DROPPED if the first was
        I.mov32(R1, R7),
        I.alu32(AluOp.AND, R1, ~FIRST_DROPPED & 0xFFFFFFFF),
        I.ldx(Size.H, R2, FACTS, Facts.L4_LEN.offset),
        I.call_local(ADD_BYTES),
        I.ldx(Size.B, R1, FACTS, Facts.MORE_FRAGMENTS.offset),
        I.jmp32(JmpOp.JNE, R1, 0, verdict),
        *_fragment_key(),  # the last fragment: forget the datagram
        I.call("map_delete_elem"),
        Label(verdict),
        I.jmp(JmpOp.JSET, R7, FIRST_DROPPED, dropped),
        I.mov64(R0, TcAction.OK),
        I.exit_(),
        Label(dropped),
        I.ja("drop_counted"),  # far, maybe: only unconditional jumps can become gotol
        Label(whole),
    ]


def first_fragment_verdicts(new_label: Callable[[str], str]) -> list[Item]:
    """After the chain, at `whole_accept` and `whole_drop`: a first fragment leaves its verdict
    and the rule (or policy) that gave it for the rest of its datagram, then the verdict is
    carried out."""
    code: list[Item] = []
    for label, verdict, flag in (
        ("whole_accept", "accept", 0),
        ("whole_drop", "drop", FIRST_DROPPED),
    ):
        first = new_label("first_fragment")
        code += [
            Label(label),
            I.ldx(Size.B, R1, FACTS, Facts.MORE_FRAGMENTS.offset),
            I.jmp32(JmpOp.JNE, R1, 0, first),
            I.ja(verdict),  # whole (later fragments never get here)
            Label(first),
            I.ldx(Size.W, R1, FACTS, Facts.DECIDED.offset),
            *([I.alu32(AluOp.OR, R1, flag)] if flag else []),
            I.stx(Size.W, R10, SCRATCH_OFFSET, R1),
            *_fragment_key(),
            I.mov64(R3, R10),
            I.alu64(AluOp.ADD, R3, SCRATCH_OFFSET),
            I.mov64(R4, 0),  # BPF_ANY
            I.call("map_update_elem"),
            I.ja(verdict),
        ]
    return code


def _fragment_key() -> list[Item]:
    """R1, R2 = FRAGMENTS_MAP and a pointer to the datagram's key, built at
    FIB_PARAMS_OFFSET (INPUT and OUTPUT never use the lookup's parameters): source,
    destination, id, protocol and a zero pad byte."""
    key = FIB_PARAMS_OFFSET
    return [
        I.ldx(Size.W, R1, FACTS, Facts.SADDR.offset),
        I.stx(Size.W, R10, key, R1),
        I.ldx(Size.W, R1, FACTS, Facts.DADDR.offset),
        I.stx(Size.W, R10, key + 4, R1),
        I.ldx(Size.H, R1, FACTS, Facts.ID.offset),
        I.stx(Size.H, R10, key + 8, R1),
        I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
        I.stx(Size.B, R10, key + 10, R1),
        I.st(Size.B, R10, key + 11, 0),
        *map_and_key(FRAGMENTS_MAP, key),
    ]
