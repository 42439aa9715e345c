"""One program skeleton per hook, all SCHED_CLS in direct-action mode:

- `ingress`: parse, then classify: martians (what ip_route_input drops) are not handled; a
  destination the namespace delivers locally (its addresses, broadcasts and joined groups,
  compared inline: codegen.tc.local) goes through INPUT; otherwise `bpf_fib_lookup` decides,
  and a forwardable packet (SUCCESS or NO_NEIGH, TTL > 1, addressed to us at layer 2) goes
  through FORWARD with the lookup's egress ifindex as out-interface. Everything else is what
  the kernel drops or does not filter: it passes untouched and is counted as "not handled".
  With the fast path, what FORWARD accepts is forwarded here (TTL, checksum, MACs,
  bpf_redirect).
- `egress`: OUTPUT, for packets generated here (skb ingress_ifindex 0) and for REJECT's answers
  to packets that came in (marked, codegen.reject); forwarded ones pass.
- `bridged`: on a bridge port's egress, FORWARD for a packet bridged from another port of the
  same bridge (codegen.tc.bridges); everything else passes untouched.
- `chain`: one built-in chain on its own, for BPF_PROG_TEST_RUN: in-interface from the
  context's ingress_ifindex, out-interface from cb[0], packet type from cb[2]; the deciding
  counter slot comes back in cb[1].

INPUT and OUTPUT are wrapped in codegen.tc.fragments' handling of fragmented datagrams. A rule
set with ct matches classifies each packet before the chains (ct_classify, codegen.conntrack)
and confirms its connection at a final ACCEPT (ct_confirm); one with REJECT answers at the drop
tail (codegen.tc.replies).
"""

from __future__ import annotations

import socket

from codegen import conntrack, reject
from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import (
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R10,
    AluOp,
    FibResult,
    JmpOp,
    Reg,
    Size,
    TcAction,
)
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.conntrack import uses_conntrack
from codegen.rules.extensions.physdev import reads_ports
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

from . import bridges, classifier_code, replies
from .chains import ChainWriter, user_chains_called
from .counters import COUNT, add_bytes_subprogram, count_decided, count_subprogram
from .fragments import first_fragment_verdicts, later_fragments
from .layout import (
    FACTS,
    FIB_PARAMS_OFFSET,
    NOT_HANDLED,
    UNCOUNTED,
    Facts,
)
from .local import LocalAddresses, joined_groups, membership, own_addresses, unicast_destinations
from .log import log_subprogram, logs
from .matches.owner import NO_FILE, owner_facts, uses_owner
from .matches.policy import policy_facts
from .parser import ETH_HLEN, PACKET_HOST, ip_header_within, parse
from .program import Hook
from .replies import rejects, reply_tail

AF_INET = 2


class ProgramWriter:
    """The entry function of one hook's program, then its chain functions and subprograms."""

    def __init__(
        self,
        chains: ChainWriter,
        hook: Hook,
        fastpath: bool,
        local: LocalAddresses,
        bridges: bool = True,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.chains = chains
        self.timeouts = timeouts  # the tracker's settings, compiled into its functions
        self.local = local  # what the namespace delivers locally (codegen.tc.local)
        self.hook = hook
        self.fastpath = fastpath
        self.label = chains.label
        # Connections are tracked only for rule sets that ask about them, as in netfilter.
        self.tracking = uses_conntrack(chains.ruleset)
        # Some rule REJECTs: the drop tail answers.
        self.answering = rejects(chains.ruleset)
        # -m physdev and LOG read the ports only where a bridge may hand packets to iptables.
        self.physdev = reads_ports(chains.ruleset) and bridges
        self.builtin: str | None = None  # the chain program's chain

    def track(self) -> list[Item]:
        """nf_conntrack_in before the chains: ct_classify fills the facts' connection (at
        egress, ct_answer for an answer to what came in: nf_ct_attach gave it its connection).
        An answer's mark is taken off here, once what OUTPUT reads of it is read."""
        answers = self.hook == "egress" and self.answering
        if not self.tracking:
            if not answers:
                return []
            seen = self.label("answer_seen")
            return [*_routed_answer(JmpOp.JNE, seen), *self.answer_seen(), Label(seen)]
        code = [I.mov64(R1, R6), I.mov64(R2, FACTS), I.alu64(AluOp.ADD, R2, Facts.CONNECTION)]
        if not answers:
            return [*code, I.call_local("ct_classify")]
        # The answer to a packet of no connection has nothing attached: it is tracked as any
        # packet of ours (reject.BARE_ANSWER).
        classify, tracked = self.label("ct_classify"), self.label("ct_tracked")
        return [
            *code,
            *_tc_index(R3),
            I.jmp32(JmpOp.JNE, R3, reject.ROUTED_ANSWER, classify),
            I.call_local("ct_answer"),
            *self.answer_seen(),
            I.ja(tracked),
            Label(classify),
            I.call_local("ct_classify"),
            *_tc_index(),
            I.jmp32(JmpOp.JNE, R1, reject.BARE_ANSWER, tracked),
            *self.answer_seen(),
            Label(tracked),
        ]

    def answer_socket(self) -> list[Item]:
        """-m owner of an answer: an ICMP error's socket is the namespace's ICMP socket, which
        no file holds (icmp_send's); a RST has none (nf_send_reset), as owner_facts found."""
        done = self.label("answer_socket")
        return [
            *_routed_answer(JmpOp.JNE, done),
            I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
            I.jmp32(JmpOp.JNE, R1, socket.IPPROTO_ICMP, done),
            I.st(Size.B, FACTS, Facts.OWNER_STATE.offset, NO_FILE),
            Label(done),
        ]

    @staticmethod
    def answer_seen() -> list[Item]:
        """The answer's tc_index mark off, so that nothing past this program takes it for one
        (the verifier refuses BPF_ST into the context), and its packet mark: the kernel's
        answers carry IP4_REPLY_MARK, 0 with net.ipv4.fwmark_reflect off (its default)."""
        return [
            I.mov64(R1, 0),
            I.stx(Size.W, R6, SKB_OFFSETS["tc_index"], R1),
            I.stx(Size.W, R6, SKB_OFFSETS["mark"], R1),
            I.stx(Size.W, FACTS, Facts.MARK.offset, R1),
        ]

    def confirm(self) -> list[Item]:
        """nf_confirm on a final ACCEPT: the connection the packet would create joins the
        table (a packet that was not classified has nothing pending)."""
        if not self.tracking:
            return []
        done = self.label("confirmed")
        pending = Facts.connection("pending")
        return [
            I.ldx(pending.size, R1, FACTS, pending.offset),
            I.jmp32(JmpOp.JEQ, R1, 0, done),
            I.mov64(R1, FACTS),
            I.alu64(AluOp.ADD, R1, Facts.CONNECTION),
            I.call_local("ct_confirm"),
            Label(done),
        ]

    def entry(self, builtins: tuple[str, ...]) -> list[Item]:
        if self.hook in ("chain", "bridged"):
            self.builtin = builtins[0]
        code: list[Item] = [I.mov64(R6, R1)]
        if self.hook == "bridged":
            code += bridges.bridged_prologue()
        if self.hook == "ingress" and self.answering:
            # An OUTPUT REJECT's answer, delivered to our stack (codegen.reject): unjudged, as
            # netfilter's reaches the socket over lo.
            code += [
                I.ldx(Size.W, R1, R6, SKB_OFFSETS["tc_index"]),
                I.jmp32(JmpOp.JNE, R1, reject.OWN_ANSWER, "judged"),
                I.mov64(R1, 0),
                I.stx(Size.W, R6, SKB_OFFSETS["tc_index"], R1),  # the verifier refuses BPF_ST
                I.mov64(R0, TcAction.OK),
                I.exit_(),
                Label("judged"),
            ]
        if self.hook == "egress":
            # Forwarded packets left their FORWARD verdict on ingress; OUTPUT is for ours, and
            # for our answers to what came in.
            if self.answering:
                code += _routed_answer(JmpOp.JEQ, "local_output")
            code += [
                I.ldx(Size.W, R1, R6, SKB_OFFSETS["ingress_ifindex"]),
                I.jmp(JmpOp.JEQ, R1, 0, "local_output"),
                I.mov64(R0, TcAction.OK),
                I.exit_(),
                Label("local_output"),
            ]
        # The tails come right after the parser, before the chains: conditional jumps (16-bit
        # offsets) to `not_handled` stay short however many rules follow, and verdicts reach
        # the tails with unconditional jumps, which may be far.
        code += [
            *parse(self.hook, self.tracking),
            I.ja("classify"),
            *self.tails(),
            Label("classify"),
        ]
        runs_output = self.hook == "egress" or (self.hook == "chain" and builtins[0] == "OUTPUT")
        self.chains.bridge_ports = self.physdev and not runs_output  # the facts hold the ports
        if self.hook == "bridged":
            code += bridges.bridged_facts()
        elif self.physdev and self.hook == "chain" and not runs_output:
            code += bridges.tested_ports()
        elif self.physdev and self.hook == "ingress":  # on a bridge device, its frame's in-port
            code += [*bridges.no_ports(), *bridges.stamped_port(self.label("stamp_read"))]
        if runs_output and uses_owner(self.chains.ruleset):  # -m owner's socket, read once
            code += owner_facts(self.hook, self.label, tuple(self.chains.owner_bits))
            if self.hook == "egress" and self.answering:
                code += self.answer_socket()
        bits = self.chains.policy_bits
        if not runs_output and bits:  # -m policy's answers, found once
            code += policy_facts(self.hook, self.chains.ruleset, bits, self.label)
        if self.hook == "ingress":
            code += self.ingress()
        elif self.hook == "egress":
            code += [
                *later_fragments(self.label, written_whole=True),
                *self.track(),
                *self.chains.builtin_chain("OUTPUT", "whole_accept", "whole_drop"),
                *first_fragment_verdicts(self.label),
            ]
        else:  # one chain: the chain program's, or a bridged packet's FORWARD
            code += [*self.track(), *self.chains.builtin_chain(builtins[0], "accept")]
        ruleset = self.chains.ruleset
        for name in user_chains_called(ruleset, builtins):
            code += self.chains.user_chain(ruleset.chains[name])
        for function in self.chains.pending:
            code += function
        if self.chains.tables.nodes:
            code += classifier_code.functions(self.chains.tables.depth, self.chains.tables.trees)
        code += count_subprogram()
        if self.hook in ("ingress", "egress"):
            code += add_bytes_subprogram()
        if self.tracking:
            code += conntrack.bytecode_functions(self.timeouts)
        if self.answering:
            code += replies.functions()
        if logs(ruleset):
            code += log_subprogram(self.hook, self.builtin, self.chains.bridge_ports)
        return code

    def tails(self) -> list[Item]:
        """The ends every verdict jumps to."""
        code: list[Item] = []
        report = self.hook == "chain"
        for label, action in (("accept", TcAction.OK), ("drop", TcAction.SHOT)):
            # The deciding rule or policy is counted here (codegen.tc.counters); `*_counted`
            # is for what has been counted or counts nothing.
            code += [Label(label), *count_decided(f"{label}_counted"), Label(f"{label}_counted")]
            if label == "accept":
                code += self.confirm()
            code += _report(report)
            if label == "drop" and self.answering:
                tail = reply_tail(self.hook, self.builtin, "plain_drop", self.local, self.tracking)
                code += [*tail, Label("plain_drop")]
            code += [I.mov64(R0, action), I.exit_()]
        slot = self.chains.layout.slot(NOT_HANDLED)
        code += [
            Label("not_handled"),
            I.st(Size.W, FACTS, Facts.DECIDED.offset, slot),
            I.mov64(R1, slot),
            I.ldx(Size.W, R2, R6, SKB_OFFSETS["len"]),
            I.call_local(COUNT),
            *_report(report),
            I.mov64(R0, TcAction.OK),
            I.exit_(),
        ]
        if self.hook == "ingress" and self.fastpath:
            code += [
                Label("forward_accept"),
                *count_decided("forward_counted"),
                Label("forward_counted"),
                *self.confirm(),
                *_fast_forward(),
            ]
        return code

    def martians(self) -> list[Item]:
        """What ip_route_input drops as martian before any hook (rp_filter, accept_local and
        route_localnet off, as in a new namespace) is not handled: a multicast or limited
        broadcast source; an address of this namespace as source; to a unicast destination,
        a 127.0.0.0/8 source or destination, or 0.0.0.0 as either (ipv4_is_zeronet means
        0.0.0.0 alone since Linux 5.3); to a multicast group, a loopback source, or 0.0.0.0
        beyond 224.0.0.0/24 but for IGMP. (Whether a group was joined: `ingress`.)"""
        nh = "not_handled"
        return [
            I.ldx(Size.W, R2, FACTS, Facts.SADDR.offset),
            I.ldx(Size.W, R3, FACTS, Facts.DADDR.offset),
            I.mov32(R1, R2),
            I.alu32(AluOp.RSH, R1, 28),
            I.jmp32(JmpOp.JEQ, R1, 0xE, nh),  # multicast source
            I.jmp32(JmpOp.JEQ, R2, -1, nh),  # limited broadcast source
            I.mov32(R4, R2),
            I.alu32(AluOp.RSH, R4, 24),  # R4: the source's first byte
            I.mov32(R1, R3),
            I.alu32(AluOp.RSH, R1, 28),
            I.jmp32(JmpOp.JEQ, R1, 0xE, "martian_multicast"),
            I.jmp32(JmpOp.JEQ, R3, -1, "martian_broadcast"),
            I.jmp32(JmpOp.JEQ, R2, 0, nh),  # 0.0.0.0 source (ipv4_is_zeronet: only 0.0.0.0)
            I.jmp32(JmpOp.JEQ, R3, 0, nh),  # 0.0.0.0 destination
            I.jmp32(JmpOp.JEQ, R4, 127, nh),  # loopback source
            I.mov32(R1, R3),
            I.alu32(AluOp.RSH, R1, 24),
            I.jmp32(JmpOp.JEQ, R1, 127, nh),  # loopback destination
            I.ja("martian_own_source"),
            Label("martian_broadcast"),  # to 255.255.255.255: any source but ours
            I.jmp32(JmpOp.JEQ, R2, 0, "martians_checked"),
            I.ja("martian_own_source"),
            Label("martian_multicast"),
            I.jmp32(JmpOp.JEQ, R4, 127, nh),
            I.jmp32(JmpOp.JNE, R2, 0, "martian_own_source"),
            I.mov32(R1, R3),
            I.alu32(AluOp.RSH, R1, 8),
            I.jmp32(JmpOp.JEQ, R1, 0xE00000, "martians_checked"),  # 224.0.0.0/24
            I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
            I.jmp32(JmpOp.JEQ, R1, socket.IPPROTO_IGMP, "martians_checked"),
            I.ja(nh),
            Label("martian_own_source"),
            *membership(R2, own_addresses(self.local), nh, None, self.label),
            Label("martians_checked"),
        ]

    def ingress(self) -> list[Item]:
        params = FIB_PARAMS_OFFSET
        code: list[Item] = [
            *self.martians(),
            *self.track(),  # before routing, as PREROUTING's conntrack
            # Local destination (an address, a broadcast, a joined group): INPUT.
            I.ldx(Size.W, R2, FACTS, Facts.DADDR.offset),
            I.mov32(R1, R2),
            I.alu32(AluOp.RSH, R1, 28),
            I.jmp32(JmpOp.JNE, R1, 0xE, "unicast"),
            # A group nobody here joined is not handled.
            *membership(R2, joined_groups(self.local), "input", "not_handled", self.label),
            Label("unicast"),
            *membership(R2, unicast_destinations(self.local), "input", None, self.label),
            # Otherwise ask the FIB whether the kernel would forward it.
            *[I.st(Size.DW, R10, params + 8 * i, 0) for i in range(8)],
            I.st(Size.B, R10, params, AF_INET),
            I.ldx(Size.B, R1, FACTS, Facts.TOS.offset),
            I.stx(Size.B, R10, params + 12, R1),
            I.ldx(Size.W, R1, FACTS, Facts.IN_IFINDEX.offset),
            I.stx(Size.W, R10, params + 8, R1),
            I.ldx(Size.W, R1, FACTS, Facts.SADDR.offset),
            I.to_be(R1, 32),
            I.stx(Size.W, R10, params + 16, R1),
            I.ldx(Size.W, R1, FACTS, Facts.DADDR.offset),
            I.to_be(R1, 32),
            I.stx(Size.W, R10, params + 32, R1),
            I.mov64(R1, R6),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, params),
            I.mov64(R3, 64),
            I.mov64(R4, 0),
            I.call("fib_lookup"),
            I.mov64(R7, R0),  # kept for the fast path: only SUCCESS has the MACs
            I.jmp(JmpOp.JEQ, R0, FibResult.SUCCESS, "forwardable"),
            I.jmp(JmpOp.JNE, R0, FibResult.NO_NEIGH, "not_handled"),
            Label("forwardable"),
            # ip_forward drops these before the FORWARD hook.
            I.ldx(Size.B, R1, FACTS, Facts.PKT_TYPE.offset),
            I.jmp32(JmpOp.JNE, R1, PACKET_HOST, "not_handled"),
            I.ldx(Size.B, R1, FACTS, Facts.TTL.offset),
            I.jmp32(JmpOp.JLE, R1, 1, "not_handled"),
            # ip_forward decrements the TTL before the FORWARD hook: FORWARD matches see that.
            I.alu32(AluOp.SUB, R1, 1),
            I.stx(Size.B, FACTS, Facts.TTL.offset, R1),
            I.ldx(Size.W, R1, R10, params + 8),
            I.stx(Size.W, FACTS, Facts.OUT_IFINDEX.offset, R1),
        ]
        forward_accept = "forward_accept" if self.fastpath else "accept"
        code += self.chains.builtin_chain("FORWARD", forward_accept)
        code += [
            Label("input"),
            *later_fragments(self.label),
            *self.chains.builtin_chain("INPUT", "whole_accept", "whole_drop"),
            *first_fragment_verdicts(self.label),
        ]
        return code


def _tc_index(register: Reg = R1) -> list[Item]:
    """The packet's tc_index into `register` (an answer's mark, codegen.reject)."""
    return [I.ldx(Size.W, register, R6, SKB_OFFSETS["tc_index"])]


def _routed_answer(op: JmpOp, label: str) -> list[Item]:
    """Jump to `label` if (JEQ) or unless (JNE) the packet is the answer to a packet that came
    in, with its connection or without (reject.ROUTED_ANSWER, reject.BARE_ANSWER). Uses r1."""
    return [
        *_tc_index(),
        I.alu32(AluOp.OR, R1, reject.BARE_BIT),
        I.jmp32(op, R1, reject.BARE_ANSWER, label),
    ]


def _report(enabled: bool) -> list[Item]:
    """The chain program hands the deciding counter slot back in cb[1]."""
    if not enabled:
        return []
    return [
        I.ldx(Size.W, R1, FACTS, Facts.DECIDED.offset),
        I.alu32(AluOp.AND, R1, ~UNCOUNTED & 0xFFFFFFFF),
        I.stx(Size.W, R6, SKB_OFFSETS["cb"] + 4, R1),
    ]


def _fast_forward() -> list[Item]:
    """ACCEPT in FORWARD with a complete lookup: forward here, as ip_forward would: TTL
    decremented with the checksum fixed up (ip_decrease_ttl), MACs from the lookup."""
    params = FIB_PARAMS_OFFSET
    return [
        I.jmp(JmpOp.JNE, R7, FibResult.SUCCESS, "accept_counted"),  # no neighbour: the kernel
        *ip_header_within("accept_counted"),  # the helpers' calls left no pointer valid
        I.ldx(Size.H, R1, R2, ETH_HLEN + 10),
        I.alu32(AluOp.ADD, R1, 0x0001),  # htons(0x0100) on a little-endian load
        I.jmp32(JmpOp.JLT, R1, 0xFFFF, "checksum_done"),
        I.alu32(AluOp.ADD, R1, 1),
        Label("checksum_done"),
        I.stx(Size.H, R2, ETH_HLEN + 10, R1),
        I.ldx(Size.B, R1, R2, ETH_HLEN + 8),
        I.alu32(AluOp.SUB, R1, 1),
        I.stx(Size.B, R2, ETH_HLEN + 8, R1),
        # dmac sits at offset 58: copied in halves, as stack access must be aligned.
        *[
            insn
            for half in range(3)
            for insn in (
                I.ldx(Size.H, R1, R10, params + 58 + 2 * half),
                I.stx(Size.H, R2, 2 * half, R1),
            )
        ],
        I.ldx(Size.W, R1, R10, params + 52),  # smac
        I.stx(Size.W, R2, 6, R1),
        I.ldx(Size.H, R1, R10, params + 56),
        I.stx(Size.H, R2, 10, R1),
        I.ldx(Size.W, R1, R10, params + 8),
        I.mov64(R2, 0),
        I.call("redirect"),
        I.exit_(),
    ]
