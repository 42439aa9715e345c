"""`-j LOG` in the bytecode programs: a record per logged packet in a BPF ring buffer, which
userspace turns into the kernel's line (codegen.rules.extensions.log_line, harness.log_reader).
`-j NFLOG` writes the same record; the reader turns it into a packet (`bpflab log --pcap`).

A LOG rule counts, calls `log_event(ctx, facts, slot)` and goes on with the next rule, as
XT_CONTINUE does. `slot` is the rule's counter slot (codegen.tc.layout.CounterLayout): the same
in every program of a rule set, so the reader maps it back to the rule and its Log target
(prefix, level, flags) without a table of its own. Every function of the chains has the
context in r6 (global chain functions take it as their second argument), so LOG works in
user chains and chunks as inline.

`log_event` reserves one RECORD in LOG_EVENTS; when the ring is full it drops the event, never
the packet, and adds one to LOG_DROPS (a per-CPU array of one u64 the reader sums). The record
(little-endian):

    u32 slot          the LOG rule
    u8  hook          HOOK_IDS: 0 INPUT, 1 FORWARD, 2 OUTPUT; | RECEIVED from the ingress
                      program (TC sees the packet before ip_rcv_options fills in a Record
                      Route option: the reader does it), | TTL_PENDING from its FORWARD (the
                      kernel decrements the TTL before FORWARD: the reader takes one off)
    u8  reserved
    u16 captured      packet bytes in `data` (0 if they could not be read)
    u32 in_ifindex    u32 out_ifindex    u32 mark    u32 skb_len (the frame, Ethernet included)
    u64 time          bpf_ktime_get_ns
    u32 phys_in       u32 phys_out: the bridge ports (ifindexes, 0: none) of a packet a
                      bridge handed to iptables, where INPUT and FORWARD run (PHYSIN=, PHYSOUT=)
    u8  data[CAPTURE] the frame from its Ethernet header on

CAPTURE is 256 bytes: Ethernet (14) + an IP header with options (60) + TCP with options (60)
is 134; an ICMP error quoting a packet (14 + 60 + 8 + 60 + 60: the quoted header and its TCP
header with options) is 202; both fit, rounded up to a power of two. Longer packets are
captured in part, which the line never needs beyond those headers; `skb_len` says how long
the packet was, so that the line says INCOMPLETE or TRUNCATED only where the kernel would.
"""

from __future__ import annotations

import struct

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram
from codegen.bpf.isa import R0, R1, R2, R3, R4, R6, R7, R8, R9, R10, AluOp, JmpOp, Reg, Size
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.log import Log
from codegen.rules.extensions.nflog import NfLog
from codegen.rules.model import Rule, Ruleset

from .layout import FACTS, Facts

LOG_EVENTS = "log_events"  # BPF_MAP_TYPE_RINGBUF
LOG_DROPS = "log_drops"  # BPF_MAP_TYPE_PERCPU_ARRAY, 1 entry of u64: events the full ring lost
LOG_EVENT = "log_event"  # the subprogram's name, for call_local
RING_SIZE = 256 * 1024  # bytes of an applied rule set's ring: some 880 records
CAPTURE = 256
HEADER = struct.Struct("<IBBHIIIIQII")
RECORD_SIZE = HEADER.size + CAPTURE
HOOK_IDS = {"INPUT": 0, "FORWARD": 1, "OUTPUT": 2}
TTL_PENDING = 0x80
RECEIVED = 0x40
UID_REFUSAL = (
    "--log-uid needs the packet's socket owner, which TC programs cannot read the way "
    "the kernel does (UID= GID=); drop --log-uid"
)


# The targets that write a record: LOG (a line), NFLOG (the packet, for `bpflab log --pcap`).
LOGGING = (Log, NfLog)


def logs(ruleset: Ruleset) -> bool:
    """Whether some rule of the rule set is a LOG or NFLOG rule."""
    return ruleset.first_with(LOGGING) is not None


def refusal(rule: Rule) -> str | None:
    """Why this backend does not generate the rule's LOG target as written; None if it does."""
    if isinstance(rule.target, Log) and rule.target.flags & 0x08:
        return UID_REFUSAL
    return None


def log_call(slot: int) -> list[Item]:
    """A LOG or NFLOG rule's code after its counter: the record, and on to the next rule."""
    return [I.mov64(R1, R6), I.mov64(R2, FACTS), I.mov64(R3, slot), I.call_local(LOG_EVENT)]


def log_subprogram(hook: str, builtin: str | None, ports: bool) -> list[Item]:
    """log_event(r1 = ctx, r2 = facts, r3 = slot): one record into LOG_EVENTS, or one more
    in LOG_DROPS when the ring is full. A static subprogram: verified at each call, where r1
    is the context (the entry function's r6, or a chain function's second argument).
    `ports`: whether the facts hold the bridge ports (ChainWriter.bridge_ports)."""
    record = R9
    full, captured, submit, done = "log_full", "log_captured", "log_submit", "log_done"
    code: list[Item] = [
        Subprogram(LOG_EVENT),
        I.mov64(R6, R1),
        I.mov64(R7, R2),
        I.mov64(R8, R3),
        I.ld_map_fd(R1, LOG_EVENTS),
        I.mov64(R2, RECORD_SIZE),
        I.mov64(R3, 0),
        I.call("ringbuf_reserve"),
        I.jmp(JmpOp.JEQ, R0, 0, full),
        I.mov64(record, R0),
        I.stx(Size.W, record, 0, R8),
    ]
    if hook == "ingress":
        # INPUT has no out-device; FORWARD has the lookup's.
        code += [
            I.ldx(Size.W, R1, R7, Facts.OUT_IFINDEX.offset),
            I.mov64(R2, HOOK_IDS["INPUT"] | RECEIVED),
            I.jmp(JmpOp.JEQ, R1, 0, "log_hook"),
            I.mov64(R2, HOOK_IDS["FORWARD"] | RECEIVED | TTL_PENDING),
            Label("log_hook"),
            I.stx(Size.B, record, 4, R2),
        ]
    else:
        chain = "OUTPUT" if hook == "egress" else builtin
        assert chain is not None
        code.append(I.st(Size.B, record, 4, HOOK_IDS[chain]))
    code += [I.st(Size.B, record, 5, 0)]
    for offset, fact in ((8, Facts.IN_IFINDEX), (12, Facts.OUT_IFINDEX), (16, Facts.MARK)):
        code += [I.ldx(Size.W, R1, R7, fact.offset), I.stx(Size.W, record, offset, R1)]
    code += [
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["len"]),
        I.stx(Size.W, record, 20, R1),
        I.call("ktime_get_ns"),
        I.stx(Size.DW, record, 24, R0),
        *_ports(record, ports),
        I.ldx(Size.W, R4, R6, SKB_OFFSETS["len"]),
        I.jmp(JmpOp.JLE, R4, CAPTURE, captured),
        I.mov64(R4, CAPTURE),
        Label(captured),
        I.stx(Size.H, record, 6, R4),
        I.jmp(JmpOp.JLT, R4, 1, submit),
        I.mov64(R1, R6),
        I.mov64(R2, 0),
        I.mov64(R3, record),
        I.alu64(AluOp.ADD, R3, HEADER.size),
        I.call("skb_load_bytes"),
        I.jmp(JmpOp.JEQ, R0, 0, submit),
        I.st(Size.H, record, 6, 0),
        Label(submit),
        I.mov64(R1, record),
        I.mov64(R2, 0),
        I.call("ringbuf_submit"),
        I.mov64(R0, 0),
        I.exit_(),
        Label(full),
        I.st(Size.W, R10, -4, 0),
        I.ld_map_fd(R1, LOG_DROPS),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, -4),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        I.ldx(Size.DW, R1, R0, 0),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R0, 0, R1),
        Label(done),
        I.mov64(R0, 0),
        I.exit_(),
    ]
    return code


def _ports(record: Reg, ports: bool) -> list[Item]:
    """The record's bridge ports: the facts', where the program reads them (`ports`); zero
    elsewhere, where those words are unwritten or hold OUTPUT's socket owner."""
    if not ports:
        return [I.st(Size.W, record, 32, 0), I.st(Size.W, record, 36, 0)]
    code: list[Item] = []
    for offset, fact in ((32, Facts.PHYS_IN), (36, Facts.PHYS_OUT)):
        code += [I.ldx(Size.W, R1, R7, fact.offset), I.stx(Size.W, record, offset, R1)]
    return code
