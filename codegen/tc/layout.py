"""Where generated programs keep things: the packet facts on the stack and the counter slots.

Packet facts are parsed once per packet into a small struct on the entry function's stack. Every
chain, inline or a subprogram, reads them through one register (`FACTS`, r9) that points there:
subprograms get the pointer as their argument, since BPF-to-BPF calls share no registers.
Multi-byte fields are kept in host order so that ranges compare with plain unsigned jumps.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.bpf import insn as I
from codegen.bpf.asm import Item
from codegen.bpf.isa import R1, R2, R9, R10, AluOp, Size
from codegen.conntrack import Result, result_field
from codegen.rules.model import Ruleset
from codegen.rules.names import BUILTIN_CHAINS

FACTS = R9
_SIZES = {1: Size.B, 2: Size.H, 4: Size.W, 8: Size.DW}


@dataclass(frozen=True)
class Field:
    offset: int
    size: Size


class Facts:
    """Offsets from the facts pointer. The struct is zeroed before it is filled."""

    SADDR = Field(0, Size.W)
    DADDR = Field(4, Size.W)
    IN_IFINDEX = Field(8, Size.W)
    OUT_IFINDEX = Field(12, Size.W)
    MARK = Field(16, Size.W)
    DECIDED = Field(20, Size.W)  # counter slot of the rule (or policy) that gave the verdict
    TOT_LEN = Field(24, Size.H)
    FRAGMENT = Field(26, Size.H)  # fragment offset in 8-byte units; non-zero: not the first
    L4_LEN = Field(28, Size.H)  # bytes after the IP header, within the IP total length
    SPORT = Field(30, Size.H)  # first two bytes of the transport header (ports)
    DPORT = Field(32, Size.H)
    PROTOCOL = Field(34, Size.B)
    TTL = Field(35, Size.B)
    PKT_TYPE = Field(36, Size.B)
    TCP_FLAGS = Field(37, Size.B)
    ICMP_TYPE = Field(38, Size.B)
    ICMP_CODE = Field(39, Size.B)
    TOS = Field(40, Size.B)
    ID = Field(42, Size.H)  # the IP identification, host order
    MORE_FRAGMENTS = Field(44, Size.B)  # the MF flag, 0 or 1
    REJECT = Field(45, Size.B)  # 0, or 1 + the ipt_reject_with of the REJECT that dropped it
    # -m addrtype's answers for the source and the destination, found at the first rule that
    # asks: 0 (not yet), or 1 + the type | 0x80 / 0x40 when it holds on the in / out device
    # (codegen.tc.matches.addrtype).
    SRC_ADDRESS_TYPE = Field(46, Size.B)
    DST_ADDRESS_TYPE = Field(47, Size.B)
    CONNECTION = 48  # codegen.conntrack.Result: what ct_classify found (rule sets with ct matches)
    # -m owner's socket (codegen.tc.matches.owner, rule sets with owner matches): OWNER_STATE
    # 0 none, 1 one no file holds, 2 one of a file whose fsuid and fsgid follow.
    OWNER_STATE = Field(41, Size.B)
    OWNER_UID = Field(CONNECTION + ctypes.sizeof(Result) + 3 & ~3, Size.W)
    OWNER_GID = Field(OWNER_UID.offset + 4, Size.W)
    # -m policy's answers (codegen.tc.matches.policy, rule sets with policy matches): bit N
    # is whether the rule set's Nth distinct policy match holds.
    POLICY = Field(OWNER_GID.offset + 4, Size.W)
    # The same word where OUTPUT runs, which -m policy --dir in never does: bit N is whether
    # the fsgid or a supplementary group lies in the rule set's Nth distinct --suppl-groups
    # gid range (codegen.tc.matches.owner).
    OWNER_GROUPS = POLICY
    # -m physdev's bridge ports (ifindexes; codegen.tc.bridges), where INPUT and FORWARD run,
    # in the owner's words, which only OUTPUT reads (OUTPUT never has bridge information): the
    # port the packet came in by (0: no bridge handed it to iptables) and, for a bridged
    # packet, the one it leaves by. The frame has no 8 bytes to spare: the tracker's deepest
    # calls stand at the verifier's 512-byte stack limit.
    PHYS_IN = OWNER_UID
    PHYS_OUT = OWNER_GID
    SIZE = POLICY.offset + 4 + 7 & ~7

    @staticmethod
    def connection(name: str, part: str | None = None) -> Field:
        """A field of the connection's Result, or `part` of one of its tuples."""
        offset, size = result_field(name, part)
        return Field(Facts.CONNECTION + offset, _SIZES[size])


# In DECIDED, beside the slot: the verdict counts nothing (a match's hotdrop). The verdict's
# tail counts the slot DECIDED names, and a lookup this far out of the counters finds nothing.
UNCOUNTED = 1 << 31


class Local:
    """Values of the `local_addresses` map (key: an IPv4 address, host order): what the
    namespace's routing makes of a packet to it, taken when the rule set is applied."""

    ADDRESS = 1  # an address of one of its devices (a /32 local route)
    BROADCAST = 2  # a subnet broadcast or the limited broadcast
    GROUP = 3  # a multicast group one of its devices joined


# Frame of the entry function: facts, then the bpf_fib_lookup parameters, then scratch.
FACTS_OFFSET = -Facts.SIZE
FIB_PARAMS_OFFSET = FACTS_OFFSET - 64
SCRATCH_OFFSET = FIB_PARAMS_OFFSET - 8


def map_and_key(map_name: str, key_offset: int) -> list[Item]:
    """r1 = the map, r2 = its key, built on the stack at `key_offset` from the frame pointer:
    the first two arguments of every map helper."""
    return [I.ld_map_fd(R1, map_name), I.mov64(R2, R10), I.alu64(AluOp.ADD, R2, key_offset)]


# Chain functions return one of these in r0.
CONTINUE, ACCEPT, DROP = 0, 1, 2

Position = tuple[str, int | str]  # (chain, 1-based rule index) or (built-in chain, "policy")
NOT_HANDLED: Position = ("", "not handled")


@dataclass(frozen=True)
class CounterLayout:
    """One per-CPU counter slot {packets, bytes} for every rule, every built-in chain's policy,
    and one for packets the programs do not handle (not IPv4, or dropped by the kernel before
    netfilter would see them)."""

    positions: tuple[Position, ...]

    @classmethod
    def of(cls, ruleset: Ruleset) -> CounterLayout:
        positions: list[Position] = []
        for chain in ruleset.chains.values():
            positions.extend((chain.name, index) for index in range(1, len(chain.rules) + 1))
        positions.extend((name, "policy") for name in BUILTIN_CHAINS)
        positions.append(NOT_HANDLED)
        return cls(tuple(positions))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_slots", {p: i for i, p in enumerate(self.positions)})

    def slot(self, position: Position) -> int:
        return self._slots[position]  # type: ignore[attr-defined]

    def __contains__(self, position: object) -> bool:
        return position in self._slots  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.positions)
