"""Rule set -> TC programs.

Three program shapes, all SCHED_CLS in direct-action mode:
- `ingress`: parse, then classify: martians (what ip_route_input drops) are not handled; a
  destination the namespace delivers locally (map `local_addresses`: its addresses, broadcasts
  and joined groups) goes through INPUT; otherwise `bpf_fib_lookup` decides, and a forwardable
  packet (SUCCESS or NO_NEIGH, TTL > 1, addressed to us at layer 2) goes through FORWARD with
  the lookup's egress ifindex as out-interface. Everything else is what the kernel drops or
  does not filter: it passes untouched and is counted as "not handled".
- `egress`: OUTPUT, for packets generated here (skb ingress_ifindex 0); forwarded ones pass.
- INPUT and OUTPUT judge a fragmented datagram by its first fragment, as netfilter judges the
  whole datagram there; later ones share its verdict and add their bytes to the counter that
  judged it (map `fragments`, the program's own), except on egress for packets an IPPROTO_RAW
  socket wrote whole, which OUTPUT saw as they are.
- `chain`: one built-in chain on its own, for BPF_PROG_TEST_RUN: in-interface from the
  context's ingress_ifindex, out-interface from cb[0], packet type from cb[2]; the deciding
  counter slot comes back in cb[1].

Chains: a built-in chain of up to CHUNK_RULES rules is inline in the entry function; a longer
one is cut into chunk functions the entry calls in turn. Every user chain reachable from the
hook is a global BPF-to-BPF function (chunked in the same way if long), called from each `-j` and
`-g` rule. Global functions are verified once each, on their own, so verification grows with the
rule count rather than with the number of paths, and no function's pending branches approach the
verifier's limit of 8,192. A chain function answers CONTINUE (it returned or fell off its end),
ACCEPT or DROP; that gives jump and goto their iptables meaning without a stack of our own: a
jump continues after its rule on CONTINUE; a goto passes its callee's answer up, so a RETURN
after a goto resumes in the chain that jumped to the goto's chain. The cost is call depth: BPF
allows 8 frames, which `user_chains_called` checks (nesting of about 6 user chains).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram, remove_unreachable
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
    Size,
    TcAction,
)
from codegen.bpf.testrun import BPF_SOCK_OFFSETS, SKB_OFFSETS
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import Accept, Chain, Drop, Goto, Jump, Return, Rule, Ruleset
from codegen.rules.names import BUILTIN_CHAINS

from . import exact, matches
from .layout import (
    ACCEPT,
    CONTINUE,
    DROP,
    FACTS,
    FACTS_OFFSET,
    FIB_PARAMS_OFFSET,
    NOT_HANDLED,
    SCRATCH_OFFSET,
    CounterLayout,
    Facts,
    Field,
    Local,
)

Hook = Literal["ingress", "egress", "chain"]
MAX_FRAMES = 8  # MAX_CALL_FRAMES in the kernel
# Rules per function: a function's pending branch states stay far below the verifier's 8,192
# (BPF_COMPLEXITY_LIMIT_JMP_SEQ) whatever the rules hold, and each chunk, being a global
# function, is verified once on its own.
CHUNK_RULES = 256
RETURNED = 3  # a chunk's answer when its chain returns (RETURN, or a goto that came back)
INLINE_SCAN = CHUNK_RULES  # a longer exact run has its fallback scan in functions of its own
COUNTERS_MAP, LOCAL_MAP, EXACT_MAP = "counters", "local_addresses", "exact_rules"
FRAGMENTS_MAP = "fragments"  # ingress: datagrams whose first fragment INPUT accepted
FRAGMENT_KEY_SIZE, FRAGMENT_VALUE_SIZE = 12, 4  # (saddr, daddr, id, protocol, pad) -> slot
FRAGMENTS_TRACKED = 4096  # an LRU map: the oldest datagrams are forgotten first
FIRST_DROPPED = 1 << 30  # in a FRAGMENTS_MAP value: the first fragment was dropped
ETH_HLEN, ETH_P_IP_BE = 14, 0x0008
PACKET_HOST, PACKET_OTHERHOST = 0, 3
AF_INET = 2
HEADERS = ETH_HLEN + 60 + 20  # the most any match looks at: Ethernet, IPv4 with options, TCP
_CAN_HOTDROP = (matches.TcpMatch, matches.UdpMatch, matches.IcmpMatch, matches.Multiport)


class CompileError(ValueError):
    """A rule set these generators cannot turn into a program; names the rule."""


@dataclass(frozen=True)
class RuleNote:
    """The annotation every instruction of a rule carries: the rule's text and where it is."""

    chain: str
    index: int
    text: str
    source: str | None = None

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}"


@dataclass
class CompiledProgram:
    name: str
    hook: Hook
    chains: tuple[str, ...]  # built-in chains the program runs
    items: list[Item]
    layout: CounterLayout
    maps: tuple[str, ...]
    notes: list[RuleNote] = field(default_factory=list)
    exact: dict[bytes, bytes] = field(default_factory=dict)  # EXACT_MAP's entries


def compile_program(
    ruleset: Ruleset,
    hook: Hook,
    *,
    interfaces: Mapping[str, int],
    chain: str | None = None,
    fastpath: bool = False,
) -> CompiledProgram:
    """Generate the program for `hook` (for `chain`, name the built-in chain to run)."""
    if hook == "chain":
        if chain not in BUILTIN_CHAINS:
            raise CompileError(f"only a built-in chain can run on its own, not {chain!r}")
        builtins: tuple[str, ...] = (chain,)
    else:
        builtins = ("INPUT", "FORWARD") if hook == "ingress" else ("OUTPUT",)
    emitter = _Emitter(ruleset, CounterLayout.of(ruleset), interfaces, hook, fastpath)
    items = remove_unreachable(emitter.entry(builtins))
    maps = {
        "ingress": (COUNTERS_MAP, LOCAL_MAP, FRAGMENTS_MAP),
        "egress": (COUNTERS_MAP, FRAGMENTS_MAP),
    }.get(hook, (COUNTERS_MAP,))
    if emitter.exact:
        maps += (EXACT_MAP,)
    name = {"ingress": "bpflab_ingress", "egress": "bpflab_egress"}.get(hook, f"bpflab_{chain}")
    return CompiledProgram(
        name[:15], hook, builtins, items, emitter.layout, maps, emitter.notes, emitter.exact
    )


@dataclass(frozen=True)
class Segment:
    """Rules first..last (1-based) of a chain: scanned, or an exact run (with its shape)."""

    first: int
    last: int
    shape: exact.Shape | None = None

    @property
    def weight(self) -> int:
        # An exact run costs its function one lookup; its scan, if long, lives elsewhere.
        if self.shape is not None:
            return 1 if self.last - self.first + 1 > INLINE_SCAN else self.last - self.first + 1
        return self.last - self.first + 1


def _pieces(chain: Chain) -> list[list[Segment]]:
    """The chain's rules as segments, packed into functions of at most CHUNK_RULES weight."""
    segments: list[Segment] = []
    next_rule = 1
    for start, end, shape in exact.runs(chain.rules):
        if start + 1 > next_rule:
            segments.append(Segment(next_rule, start))
        segments.append(Segment(start + 1, end + 1, shape))
        next_rule = end + 2
    if next_rule <= len(chain.rules):
        segments.append(Segment(next_rule, len(chain.rules)))
    pieces: list[list[Segment]] = [[]]
    room = CHUNK_RULES
    for segment in segments:
        while segment.shape is None and segment.weight > room:
            if room:
                pieces[-1].append(Segment(segment.first, segment.first + room - 1))
                segment = Segment(segment.first + room, segment.last)
            pieces.append([])
            room = CHUNK_RULES
        if segment.weight > room:
            pieces.append([])
            room = CHUNK_RULES
        pieces[-1].append(segment)
        room -= segment.weight
    return pieces


def _chunks(chain: Chain) -> int:
    return len(_pieces(chain))


def _scans_elsewhere(chain: Chain) -> bool:
    """Whether an exact run's scan is in functions of its own (one more call frame)."""
    return any(
        segment.shape is not None and segment.last - segment.first + 1 > INLINE_SCAN
        for piece in _pieces(chain)
        for segment in piece
    )


def user_chains_called(ruleset: Ruleset, roots: tuple[str, ...]) -> list[str]:
    """User chains reachable from `roots`, in rule-set order, checking that the deepest path of
    calls fits in BPF's 8 call frames: the entry function, a chunk function for a built-in
    chain too long to be inline, one function per user chain (two if it is chunked), and the
    counter update at the end."""
    reached: set[str] = set()

    def frames(name: str, path: tuple[str, ...]) -> int:
        chain = ruleset.chains[name]
        own = 1 if _chunks(chain) == 1 else 2
        deepest = 2 if _scans_elsewhere(chain) else 1  # a scan function, the counter update
        for rule in chain.rules:
            if isinstance(rule.target, Jump | Goto):
                callee = rule.target.chain
                reached.add(callee)
                needed = frames(callee, (*path, callee))
                if needed + own > MAX_FRAMES:
                    raise CompileError(
                        f"{_where(rule)}the chain path {' -> '.join((*path, callee))} needs "
                        f"more than the {MAX_FRAMES} nested calls BPF allows; flatten the chains "
                        "or shorten them"
                    )
                deepest = max(deepest, needed)
        return own + deepest

    for root in roots:
        frames(root, (root,))
    return [name for name in ruleset.chains if name in reached]


def _where(rule: Rule) -> str:
    return f"{rule.source}: " if rule.source is not None else ""


class _Emitter:
    def __init__(
        self,
        ruleset: Ruleset,
        layout: CounterLayout,
        interfaces: Mapping[str, int],
        hook: Hook,
        fastpath: bool,
    ):
        self.ruleset = ruleset
        self.layout = layout
        self.interfaces = interfaces
        self.hook = hook
        self.fastpath = fastpath
        self.notes: list[RuleNote] = []
        self.pending: list[list[Item]] = []  # chunk functions, placed after the chains
        self.exact: dict[bytes, bytes] = {}
        self._runs = 0
        self._labels = itertools.count()

    def label(self, hint: str) -> str:
        return f"{hint}_{next(self._labels)}"

    # The entry function ---------------------------------------------------------------------

    def entry(self, builtins: tuple[str, ...]) -> list[Item]:
        code: list[Item] = [I.mov64(R6, R1)]
        if self.hook == "egress":
            # Forwarded packets left their FORWARD verdict on ingress; OUTPUT is for ours.
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
        code += [*self.parse(), I.ja("classify"), *self.tails(), Label("classify")]
        if self.hook == "ingress":
            code += self.ingress(builtins)
        else:
            if self.hook == "egress":
                code += [
                    *self.later_fragments(written_whole=True),
                    *self.builtin_chain("OUTPUT", "whole_accept", "whole_drop"),
                    *self.first_fragment_verdicts(),
                ]
            else:
                code += self.builtin_chain(builtins[0], "accept")
        for name in user_chains_called(self.ruleset, builtins):
            code += self.user_chain(self.ruleset.chains[name])
        for function in self.pending:
            code += function
        code += self.count_subprogram()
        if self.hook in ("ingress", "egress"):
            code += self.add_bytes_subprogram()
        return code

    def parse(self) -> list[Item]:
        """Fill the packet facts, or go to `not_handled` for anything the kernel would drop
        before netfilter sees it (ip_rcv_core's checks) or that is not IPv4."""
        nh = "not_handled"
        facts_store = [I.st(Size.DW, R10, FACTS_OFFSET + 8 * i, 0) for i in range(Facts.SIZE // 8)]
        code: list[Item] = [
            *facts_store,
            I.mov64(FACTS, R10),
            I.alu64(AluOp.ADD, FACTS, FACTS_OFFSET),
            # A VLAN tag taken off by offload (the frame data shows the inner EtherType): the
            # IP stack sees the packet on the VLAN device, whose own programs judge it, if any.
            I.ldx(Size.W, R1, R6, SKB_OFFSETS["vlan_present"]),
            I.jmp(JmpOp.JNE, R1, 0, nh),
            # Make the headers linear if they are not (large or non-linear skbs).
            I.ldx(Size.W, R2, R6, SKB_OFFSETS["len"]),
            I.jmp(JmpOp.JLE, R2, HEADERS, "pull_length_known"),
            I.mov64(R2, HEADERS),
            Label("pull_length_known"),
            I.ldx(Size.W, R3, R6, SKB_OFFSETS["data"]),
            I.ldx(Size.W, R4, R6, SKB_OFFSETS["data_end"]),
            I.alu64(AluOp.ADD, R3, R2),
            I.jmp(JmpOp.JLE, R3, R4, "linear"),
            I.mov64(R1, R6),
            I.call("skb_pull_data"),
            Label("linear"),
            I.ldx(Size.W, R2, R6, SKB_OFFSETS["data"]),
            I.ldx(Size.W, R3, R6, SKB_OFFSETS["data_end"]),
            I.mov64(R1, R2),
            I.alu64(AluOp.ADD, R1, ETH_HLEN + 20),
            I.jmp(JmpOp.JGT, R1, R3, nh),
            I.ldx(Size.H, R1, R2, 12),
            I.jmp32(JmpOp.JNE, R1, ETH_P_IP_BE, nh),
            I.ldx(Size.B, R4, R2, ETH_HLEN),
            I.mov32(R1, R4),
            I.alu32(AluOp.RSH, R1, 4),
            I.jmp32(JmpOp.JNE, R1, 4, nh),
            I.alu32(AluOp.AND, R4, 0x0F),
            I.jmp32(JmpOp.JLT, R4, 5, nh),
            I.alu32(AluOp.LSH, R4, 2),  # header length in bytes, 20..60
            I.ldx(Size.H, R1, R2, ETH_HLEN + 2),
            I.to_be(R1, 16),  # total length
            I.jmp32(JmpOp.JLT, R1, R4, nh),
            I.stx(Size.H, FACTS, Facts.TOT_LEN.offset, R1),
            I.alu32(AluOp.ADD, R1, ETH_HLEN),
            I.ldx(Size.W, R0, R6, SKB_OFFSETS["len"]),
            I.jmp32(JmpOp.JGT, R1, R0, nh),  # claims more than arrived: ip_rcv drops it
            I.alu32(AluOp.SUB, R1, ETH_HLEN),
            I.alu32(AluOp.SUB, R1, R4),
            I.stx(Size.H, FACTS, Facts.L4_LEN.offset, R1),
            *_copy_be(R2, ETH_HLEN + 6, Size.H, Facts.FRAGMENT, mask=0x1FFF),
            *_copy_be(R2, ETH_HLEN + 4, Size.H, Facts.ID),
            I.ldx(Size.B, R1, R2, ETH_HLEN + 6),
            I.alu32(AluOp.RSH, R1, 5),  # MF: bit 13 of the network-order flags and offset
            I.alu32(AluOp.AND, R1, 1),
            I.stx(Size.B, FACTS, Facts.MORE_FRAGMENTS.offset, R1),
            *_copy_be(R2, ETH_HLEN + 1, Size.B, Facts.TOS),
            *_copy_be(R2, ETH_HLEN + 8, Size.B, Facts.TTL),
            *_copy_be(R2, ETH_HLEN + 9, Size.B, Facts.PROTOCOL),
            *_copy_be(R2, ETH_HLEN + 12, Size.W, Facts.SADDR),
            *_copy_be(R2, ETH_HLEN + 16, Size.W, Facts.DADDR),
            I.ldx(Size.W, R1, R6, SKB_OFFSETS["mark"]),
            I.stx(Size.W, FACTS, Facts.MARK.offset, R1),
            # Test-run cannot make every packet type (its device is lo, whose broadcast address
            # is all zeros): the chain program takes the type from cb[2] instead.
            I.ldx(
                Size.W,
                R1,
                R6,
                SKB_OFFSETS["cb"] + 8 if self.hook == "chain" else SKB_OFFSETS["pkt_type"],
            ),
            I.stx(Size.B, FACTS, Facts.PKT_TYPE.offset, R1),
        ]
        if self.hook == "ingress":
            # ip_rcv drops frames for another host before any hook.
            code.append(I.jmp32(JmpOp.JEQ, R1, PACKET_OTHERHOST, nh))
        # The transport header, for first fragments only, as far as it is there.
        code += [
            I.ldx(Size.H, R1, FACTS, Facts.FRAGMENT.offset),
            I.jmp32(JmpOp.JNE, R1, 0, "parsed"),
            I.mov64(R7, R2),
            I.alu64(AluOp.ADD, R7, ETH_HLEN),
            I.alu64(AluOp.ADD, R7, R4),
            I.ldx(Size.H, R4, FACTS, Facts.L4_LEN.offset),
        ]
        for needed, loads in (
            (2, [(0, Size.B, Facts.ICMP_TYPE), (1, Size.B, Facts.ICMP_CODE)]),
            (4, [(0, Size.H, Facts.SPORT), (2, Size.H, Facts.DPORT)]),
            (14, [(13, Size.B, Facts.TCP_FLAGS)]),
        ):
            code += [
                I.jmp32(JmpOp.JLT, R4, needed, "parsed"),
                I.mov64(R1, R7),
                I.alu64(AluOp.ADD, R1, needed),
                I.jmp(JmpOp.JGT, R1, R3, "parsed"),
            ]
            for offset, size, fact in loads:
                code += _copy_be(R7, offset, size, fact)
        code.append(Label("parsed"))
        interfaces = {
            "ingress": (SKB_OFFSETS["ifindex"], None),
            "egress": (None, SKB_OFFSETS["ifindex"]),
            "chain": (SKB_OFFSETS["ingress_ifindex"], SKB_OFFSETS["cb"]),
        }[self.hook]
        for offset, fact in zip(interfaces, (Facts.IN_IFINDEX, Facts.OUT_IFINDEX), strict=True):
            if offset is not None:
                code += [I.ldx(Size.W, R1, R6, offset), I.stx(Size.W, FACTS, fact.offset, R1)]
        return code

    def _local_kind(self, fact: Field) -> list[Item]:
        """R0 = the `local_addresses` value of address `fact` (a Local kind), 0 if none."""
        done = self.label("kind_known")
        return [
            I.ldx(Size.W, R1, FACTS, fact.offset),
            I.stx(Size.W, R10, SCRATCH_OFFSET, R1),
            I.ld_map_fd(R1, LOCAL_MAP),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, SCRATCH_OFFSET),
            I.call("map_lookup_elem"),
            I.jmp(JmpOp.JEQ, R0, 0, done),
            I.ldx(Size.B, R0, R0, 0),
            Label(done),
        ]

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
            *self._local_kind(Facts.SADDR),
            I.jmp32(JmpOp.JEQ, R0, Local.ADDRESS, nh),
            Label("martians_checked"),
        ]

    def ingress(self, builtins: tuple[str, ...]) -> list[Item]:
        params = FIB_PARAMS_OFFSET
        code: list[Item] = [
            *self.martians(),
            # Local destination (an address, a broadcast, a joined group): INPUT.
            *self._local_kind(Facts.DADDR),
            I.mov64(R7, R0),
            I.ldx(Size.W, R1, FACTS, Facts.DADDR.offset),
            I.alu32(AluOp.RSH, R1, 28),
            I.jmp32(JmpOp.JNE, R1, 0xE, "unicast"),
            I.jmp32(JmpOp.JNE, R7, Local.GROUP, "not_handled"),  # a group nobody here joined
            I.ja("input"),
            Label("unicast"),
            I.jmp32(JmpOp.JEQ, R7, 0, "not_local"),
            I.ja("input"),  # far: past FORWARD
            Label("not_local"),
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
        code += self.builtin_chain("FORWARD", forward_accept)
        code += [
            Label("input"),
            *self.later_fragments(),
            *self.builtin_chain("INPUT", "whole_accept", "whole_drop"),
            *self.first_fragment_verdicts(),
        ]
        return code

    def _fragment_key(self) -> list[Item]:
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
            I.ld_map_fd(R1, FRAGMENTS_MAP),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, key),
        ]

    def later_fragments(self, *, written_whole: bool = False) -> list[Item]:
        """INPUT sees a datagram after reassembly (ip_local_deliver) and OUTPUT before the
        kernel fragments it (ip_finish_output): netfilter judges and counts it once, with its
        whole length. Here the first fragment is judged and counted, and leaves the verdict
        and the rule (or policy) that gave it in FRAGMENTS_MAP (`first_fragment_verdicts`); a
        later fragment adds its payload's bytes (not a packet) to that rule's counter and
        shares the verdict. A datagram that completes is counted as netfilter counts it.
        Later fragments of a datagram whose first was not seen pass as not handled.

        `written_whole` (OUTPUT): a packet from an IPPROTO_RAW socket (IP_HDRINCL) was written
        whole by its sender, fragment fields and all, and the kernel never fragments those
        (it refuses them over the MTU): OUTPUT judged it as it is, so it is judged here too."""
        whole = self.label("whole_datagram")
        later = self.label("later_fragment")
        remembered = self.label("fragment_remembered")
        verdict = self.label("fragment_verdict")
        dropped = self.label("fragment_dropped")
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
            *self._fragment_key(),
            I.call("map_lookup_elem"),
            I.jmp(JmpOp.JNE, R0, 0, remembered),
            I.ja("not_handled"),
            Label(remembered),
            I.ldx(Size.W, R7, R0, 0),  # the slot, and FIRST_DROPPED if the first was
            I.mov32(R1, R7),
            I.alu32(AluOp.AND, R1, ~FIRST_DROPPED & 0xFFFFFFFF),
            I.ldx(Size.H, R2, FACTS, Facts.L4_LEN.offset),
            I.call_local("add_bytes"),
            I.ldx(Size.B, R1, FACTS, Facts.MORE_FRAGMENTS.offset),
            I.jmp32(JmpOp.JNE, R1, 0, verdict),
            *self._fragment_key(),  # the last fragment: forget the datagram
            I.call("map_delete_elem"),
            Label(verdict),
            I.jmp(JmpOp.JSET, R7, FIRST_DROPPED, dropped),
            I.mov64(R0, TcAction.OK),
            I.exit_(),
            Label(dropped),
            I.ja("drop"),  # far, maybe: only unconditional jumps can become gotol
            Label(whole),
        ]

    def first_fragment_verdicts(self) -> list[Item]:
        """INPUT's and OUTPUT's verdicts: a first fragment leaves its verdict and the rule (or
        policy) that gave it for the rest of its datagram, then the verdict is carried out."""
        code: list[Item] = []
        for label, verdict, flag in (
            ("whole_accept", "accept", 0),
            ("whole_drop", "drop", FIRST_DROPPED),
        ):
            first = self.label("first_fragment")
            code += [
                Label(label),
                I.ldx(Size.B, R1, FACTS, Facts.MORE_FRAGMENTS.offset),
                I.jmp32(JmpOp.JNE, R1, 0, first),
                I.ja(verdict),  # whole (later fragments never get here)
                Label(first),
                I.ldx(Size.W, R1, FACTS, Facts.DECIDED.offset),
                *([I.alu32(AluOp.OR, R1, flag)] if flag else []),
                I.stx(Size.W, R10, SCRATCH_OFFSET, R1),
                *self._fragment_key(),
                I.mov64(R3, R10),
                I.alu64(AluOp.ADD, R3, SCRATCH_OFFSET),
                I.mov64(R4, 0),  # BPF_ANY
                I.call("map_update_elem"),
                I.ja(verdict),
            ]
        return code

    def tails(self) -> list[Item]:
        """The ends every verdict jumps to."""
        code: list[Item] = []
        report = self.hook == "chain"
        for label, action in (("accept", TcAction.OK), ("drop", TcAction.SHOT)):
            code += [Label(label), *self._report(report), I.mov64(R0, action), I.exit_()]
        slot = self.layout.slot(NOT_HANDLED)
        code += [
            Label("not_handled"),
            I.st(Size.W, FACTS, Facts.DECIDED.offset, slot),
            I.mov64(R1, slot),
            I.ldx(Size.W, R2, R6, SKB_OFFSETS["len"]),
            I.call_local("count"),
            *self._report(report),
            I.mov64(R0, TcAction.OK),
            I.exit_(),
        ]
        if self.hook == "ingress" and self.fastpath:
            code += self.fast_forward()
        return code

    def _report(self, enabled: bool) -> list[Item]:
        if not enabled:
            return []
        return [
            I.ldx(Size.W, R1, FACTS, Facts.DECIDED.offset),
            I.stx(Size.W, R6, SKB_OFFSETS["cb"] + 4, R1),
        ]

    def fast_forward(self) -> list[Item]:
        """ACCEPT in FORWARD with a complete lookup: forward here, as ip_forward would: TTL
        decremented with the checksum fixed up (ip_decrease_ttl), MACs from the lookup."""
        params = FIB_PARAMS_OFFSET
        return [
            Label("forward_accept"),
            I.jmp(JmpOp.JNE, R7, FibResult.SUCCESS, "accept"),  # no neighbour yet: the kernel
            I.ldx(Size.W, R2, R6, SKB_OFFSETS["data"]),
            I.ldx(Size.W, R3, R6, SKB_OFFSETS["data_end"]),
            I.mov64(R1, R2),
            I.alu64(AluOp.ADD, R1, ETH_HLEN + 20),
            I.jmp(JmpOp.JGT, R1, R3, "accept"),
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

    # Chains ---------------------------------------------------------------------------------

    def builtin_chain(self, name: str, accept: str, drop: str = "drop") -> list[Item]:
        chain = self.ruleset.chains[name]
        policy = f"policy_{name}"
        pieces = _pieces(chain)
        if len(pieces) == 1:
            code = self.rules(chain, _InlineTargets(accept, policy, drop), pieces[0])
        else:
            code = []
            for function in self.chunk_functions(chain):
                after = self.label("after_chunk")
                code += [
                    I.mov64(R1, FACTS),
                    I.call_local(function),
                    I.jmp(JmpOp.JEQ, R0, CONTINUE, after),
                    *_InlineTargets(accept, policy, drop).dispatch(self.label, returned=True),
                    Label(after),
                ]
        slot = self.layout.slot((name, "policy"))
        verdict = accept if chain.policy == "ACCEPT" else drop
        return [
            *code,
            Label(policy),
            I.mov64(R1, slot),
            I.ldx(Size.H, R2, FACTS, Facts.TOT_LEN.offset),
            I.call_local("count"),
            I.st(Size.W, FACTS, Facts.DECIDED.offset, slot),
            I.ja(verdict),
        ]

    def chunk_functions(self, chain: Chain) -> list[str]:
        """Queue the global functions that hold a long chain's rules, CHUNK_RULES each; they
        answer CONTINUE at their end, RETURNED when the chain returns, or a verdict."""
        names = []
        for number, piece in enumerate(_pieces(chain)):
            name = f"{_function(chain.name)}:{number}"
            self.pending.append(
                [
                    *_global_prologue(name),
                    *self.rules(chain, _FunctionTargets(RETURNED), piece),
                    I.mov64(R0, CONTINUE),
                    I.exit_(),
                ]
            )
            names.append(name)
        return names

    def scan_functions(self, chain: Chain, first: int, last: int) -> list[str]:
        """Global functions scanning rules first..last of an exact run (all ACCEPT or DROP):
        they answer CONTINUE when no rule matched, or the verdict."""
        names = []
        for start in range(first, last + 1, CHUNK_RULES):
            end = min(last, start + CHUNK_RULES - 1)
            name = f"{_function(chain.name)}:scan{start}"
            self.pending.append(
                [
                    *_global_prologue(name),
                    *self.rules(chain, _FunctionTargets(RETURNED), [Segment(start, end)]),
                    I.mov64(R0, CONTINUE),
                    I.exit_(),
                ]
            )
            names.append(name)
        return names

    def user_chain(self, chain: Chain) -> list[Item]:
        """A user chain's entry, a global function answering CONTINUE (it returned or fell off
        its end), ACCEPT or DROP."""
        name = _function(chain.name)
        pieces = _pieces(chain)
        if len(pieces) == 1:
            return [
                *_global_prologue(name),
                *self.rules(chain, _FunctionTargets(CONTINUE), pieces[0]),
                I.mov64(R0, CONTINUE),
                I.exit_(),
            ]
        code: list[Item] = list(_global_prologue(name))
        returned = self.label("returned")
        for function in self.chunk_functions(chain):
            after = self.label("after_chunk")
            code += [
                I.mov64(R1, FACTS),
                I.call_local(function),
                I.jmp(JmpOp.JEQ, R0, CONTINUE, after),
                I.jmp(JmpOp.JEQ, R0, RETURNED, returned),
                I.exit_(),
                Label(after),
            ]
        return [*code, Label(returned), I.mov64(R0, CONTINUE), I.exit_()]

    def rules(self, chain: Chain, targets: _Targets, segments: list[Segment]) -> list[Item]:
        """The code of some segments of `chain`: rules scanned one by one, or exact runs."""
        code: list[Item] = []
        for segment in segments:
            if segment.shape is not None:
                code += self.exact_run(chain, segment, targets)
            else:
                for index in range(segment.first, segment.last + 1):
                    code += self.annotated_rule(chain, index, targets)
        return code

    def annotated_rule(self, chain: Chain, index: int, targets: _Targets) -> list[Item]:
        rule = chain.rules[index - 1]
        note = RuleNote(
            chain.name,
            index,
            write_rule(chain.name, rule),
            str(rule.source) if rule.source else None,
        )
        self.notes.append(note)
        return [
            item.annotate(note) if isinstance(item, I.Insn) else item
            for item in self.rule(chain, index, rule, targets)
        ]

    def exact_run(self, chain: Chain, segment: Segment, targets: _Targets) -> list[Item]:
        """A hash lookup answering for rules first..last, then their scan for the packets the
        lookup cannot answer for (see codegen.tc.exact)."""
        first, last, shape = segment.first, segment.last, segment.shape
        assert shape is not None
        run_id = self._runs
        self._runs += 1
        slots = [self.layout.slot((chain.name, i)) for i in range(first, last + 1)]
        self.exact.update(exact.entries(run_id, chain.rules[first - 1 : last], slots))
        note = RuleNote(
            chain.name,
            first,
            f"rules {first} to {last} of {chain.name}: one hash "
            f"lookup for {last - first + 1} exact-match rules",
        )
        in_main = isinstance(targets, _InlineTargets)
        key = (SCRATCH_OFFSET - 24) if in_main else -24
        saved = key - 8
        scan, after, lookup = self.label("scan"), self.label("after_run"), self.label("lookup")
        code: list[Item] = []
        if shape.transport:
            tcp = self.label("tcp_header")
            code += [
                # Later fragments and short headers: the tcp/udp matches' own rules apply.
                I.ldx(Size.H, R1, FACTS, Facts.FRAGMENT.offset),
                I.jmp32(JmpOp.JNE, R1, 0, scan),
                I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
                I.jmp32(JmpOp.JEQ, R1, exact.IPPROTO_TCP, tcp),
                I.jmp32(JmpOp.JNE, R1, exact.IPPROTO_UDP, after),  # no rule here can match
                I.ldx(Size.H, R1, FACTS, Facts.L4_LEN.offset),
                I.jmp32(JmpOp.JLT, R1, matches.UDP_HEADER, scan),
                I.ja(lookup),
                Label(tcp),
                I.ldx(Size.H, R1, FACTS, Facts.L4_LEN.offset),
                I.jmp32(JmpOp.JLT, R1, matches.TCP_HEADER, scan),
            ]
        code += [Label(lookup), I.st(Size.W, R10, key, run_id)]
        fields = (
            (shape.source, Facts.SADDR, 4),
            (shape.destination, Facts.DADDR, 8),
            (shape.source_port, Facts.SPORT, 12),
            (shape.destination_port, Facts.DPORT, 14),
            (shape.protocol, Facts.PROTOCOL, 16),
        )
        for present, fact, offset in fields:
            if present:
                code += [
                    I.ldx(fact.size, R1, FACTS, fact.offset),
                    I.stx(fact.size, R10, key + offset, R1),
                ]
            else:
                code.append(I.st(fact.size, R10, key + offset, 0))
        code += [
            I.st(Size.B, R10, key + 17, 0),
            I.st(Size.H, R10, key + 18, 0),
            I.ld_map_fd(R1, EXACT_MAP),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, key),
            I.call("map_lookup_elem"),
            I.jmp(JmpOp.JEQ, R0, 0, after),
            I.ldx(Size.W, R1, R0, 0),
            I.stx(Size.W, FACTS, Facts.DECIDED.offset, R1),
            I.ldx(Size.W, R2, R0, 4),
            I.stx(Size.W, R10, saved, R2),
            I.ldx(Size.H, R2, FACTS, Facts.TOT_LEN.offset),
            I.call_local("count"),
            I.ldx(Size.W, R1, R10, saved),
        ]
        dropped = self.label("run_dropped")
        code += [
            I.jmp32(JmpOp.JNE, R1, exact.ACCEPT, dropped),
            *targets.accept(),
            Label(dropped),
            *targets.drop(),
        ]
        code = [item.annotate(note) if isinstance(item, I.Insn) else item for item in code]
        code.append(Label(scan))
        if last - first + 1 <= INLINE_SCAN:
            for index in range(first, last + 1):
                code += self.annotated_rule(chain, index, targets)
        else:
            for function in self.scan_functions(chain, first, last):
                scanned = self.label("scanned")
                code += [
                    I.mov64(R1, FACTS),
                    I.call_local(function),
                    *targets.after_jump(scanned, self.label),
                    Label(scanned),
                ]
        return [*code, Label(after)]

    def rule(self, chain: Chain, index: int, rule: Rule, targets: _Targets) -> list[Item]:
        slot = self.layout.slot((chain.name, index))
        miss = self.label("next")
        hotdrop = self.label("hotdrop")
        context = matches.Context(miss, hotdrop, self.label, self.interfaces)
        try:
            code = matches.emit(rule.matches, context)
        except matches.UnsupportedMatch as error:
            raise CompileError(f"{_where(rule)}{error}") from None
        code += [
            I.mov64(R1, slot),
            I.ldx(Size.H, R2, FACTS, Facts.TOT_LEN.offset),
            I.call_local("count"),
        ]
        decided = I.st(Size.W, FACTS, Facts.DECIDED.offset, slot)
        target = rule.target
        falls_through = False
        if isinstance(target, Accept):
            code += [decided, *targets.accept()]
        elif isinstance(target, Drop):
            code += [decided, *targets.drop()]
        elif isinstance(target, Return):
            code += targets.return_()
        elif isinstance(target, Jump):
            code += [I.mov64(R1, FACTS), I.call_local(_function(target.chain))]
            code += targets.after_jump(miss, self.label)
        elif isinstance(target, Goto):
            code += [I.mov64(R1, FACTS), I.call_local(_function(target.chain))]
            code += targets.after_goto(self.label)
        else:
            falls_through = True  # no target: the rule only counts
        if any(isinstance(m, _CAN_HOTDROP) for m in rule.matches):
            if falls_through:
                code.append(I.ja(miss))
            code += [Label(hotdrop), decided, *targets.hotdrop()]
        return [*code, Label(miss)]

    # Counters -------------------------------------------------------------------------------

    def add_bytes_subprogram(self) -> list[Item]:
        """add_bytes(r1 = slot, r2 = bytes): add bytes, and no packet, to a per-CPU slot."""
        return _counter_subprogram("add_bytes", packets=False)

    def count_subprogram(self) -> list[Item]:
        """count(r1 = slot, r2 = bytes): add one packet and its bytes to a per-CPU slot. No
        atomics: the slot is this CPU's and TC programs do not nest on one CPU."""
        return _counter_subprogram("count", packets=True)


def _counter_subprogram(name: str, *, packets: bool) -> list[Item]:
    """A subprogram (r1 = slot, r2 = bytes) adding the bytes, and one packet if `packets`, to
    a slot of COUNTERS_MAP."""
    done = f"{name}_done"
    one_more = [
        I.ldx(Size.DW, R1, R0, 0),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R0, 0, R1),
    ]
    return [
        Subprogram(name),
        I.stx(Size.W, R10, -4, R1),
        I.mov64(R6, R2),
        I.ld_map_fd(R1, COUNTERS_MAP),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, -4),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        *(one_more if packets else []),
        I.ldx(Size.DW, R1, R0, 8),
        I.alu64(AluOp.ADD, R1, R6),
        I.stx(Size.DW, R0, 8, R1),
        Label(done),
        I.mov64(R0, 0),
        I.exit_(),
    ]


def _function(chain: str) -> str:
    return f"chain:{chain}"


def _copy_be(base, offset: int, size: Size, fact: Field, mask: int | None = None) -> list[Item]:
    """Load a network-order packet field, convert it to host order, store it as a fact."""
    code: list[Item] = [I.ldx(size, R1, base, offset)]
    if size != Size.B:
        code.append(I.to_be(R1, size.bytes * 8))
    if mask is not None:
        code.append(I.alu32(AluOp.AND, R1, mask))
    return [*code, I.stx(fact.size, FACTS, fact.offset, R1)]


class _Targets:
    def accept(self) -> list[Item]:
        raise NotImplementedError

    def hotdrop(self) -> list[Item]:
        """A match dropped the packet on the spot: a drop, but no rule judged it."""
        return self.drop()

    def drop(self) -> list[Item]:
        raise NotImplementedError

    def return_(self) -> list[Item]:
        raise NotImplementedError

    def after_jump(self, next_rule: str, new_label) -> list[Item]:
        raise NotImplementedError

    def after_goto(self, new_label) -> list[Item]:
        raise NotImplementedError


@dataclass
class _InlineTargets(_Targets):
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

    def dispatch(self, new_label, *, returned: bool = False) -> list[Item]:
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

    def after_jump(self, next_rule: str, new_label) -> list[Item]:
        return [I.jmp(JmpOp.JEQ, R0, CONTINUE, next_rule), *self.dispatch(new_label)]

    def after_goto(self, new_label) -> list[Item]:
        decided = new_label("decided")
        return [
            I.jmp(JmpOp.JNE, R0, CONTINUE, decided),
            I.ja(self.policy_label),
            Label(decided),
            *self.dispatch(new_label),
        ]


@dataclass
class _FunctionTargets(_Targets):
    """Targets in a function: answers returned to the caller. `returned` is the answer for
    RETURN: CONTINUE from a whole user chain, RETURNED from a chunk of a longer chain."""

    returned: int

    def accept(self) -> list[Item]:
        return [I.mov64(R0, ACCEPT), I.exit_()]

    def drop(self) -> list[Item]:
        return [I.mov64(R0, DROP), I.exit_()]

    def return_(self) -> list[Item]:
        return [I.mov64(R0, self.returned), I.exit_()]

    def after_jump(self, next_rule: str, new_label) -> list[Item]:
        return [I.jmp(JmpOp.JEQ, R0, CONTINUE, next_rule), I.exit_()]

    def after_goto(self, new_label) -> list[Item]:
        # The callee's verdict is ours; if it came back, our chain returns.
        came_back = new_label("came_back")
        return [
            I.jmp(JmpOp.JEQ, R0, CONTINUE, came_back),
            I.exit_(),
            Label(came_back),
            *self.return_(),
        ]


def _global_prologue(name: str) -> list[Item]:
    """Start of a global function taking the facts pointer, which the verifier must see
    checked for NULL before use."""
    not_null = f"{name}:facts"
    return [
        Subprogram(name, "global", (Facts.SIZE,)),
        I.jmp(JmpOp.JNE, R1, 0, not_null),
        I.mov64(R0, CONTINUE),
        I.exit_(),
        Label(not_null),
        I.mov64(FACTS, R1),
    ]
