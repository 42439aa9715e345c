"""`-m owner` (xt_owner revision 1): the socket a locally generated packet carries.

At TC egress the packet still holds its socket (skb->sk; the device's transmit orphans it).
What xt_owner reads of it is reached through the kernel's own structures, read-only: the
program casts its context to the kernel's sk_buff (bpf_cast_to_kern_ctx) and follows
sk -> sk_socket -> file -> f_cred, with sk_to_full_sk's turns first (a request socket stands
for its listener, a TIME_WAIT one for none) and owner_mt's test that the socket is in the
namespace of the hook (skb->dev's). bpf_get_socket_uid is not enough: it answers sk_uid,
which fchown changes and f_cred does not, and it has no gid and no "socket without a file".

That is done once per packet, before the chains (`owner_facts`, from the entry function,
which holds the context), into the facts: OWNER_STATE (0 no socket, 1 one no file holds, 2 a
file's), OWNER_UID and OWNER_GID, the fsuid and fsgid. The chain program (BPF_PROG_TEST_RUN,
whose packets carry a dummy socket no struct socket holds) takes them from the control block
when the test gives them: byte 1 of cb[2] is 0 (walk the socket) or 1 + the state, cb[3] the
uid, cb[4] the gid (harness.runner.ChainRunner.run's `owner`).

One difference stays: netfilter's OUTPUT runs when the packet is sent, TC egress when it
leaves, which for a packet held for neighbour resolution is later; a socket closed meanwhile
has lost its struct socket (the lab's links have permanent neighbours, so it never shows).

`--suppl-groups`: a cred's supplementary groups are its group_info's gid array, up to
NGROUPS_MAX (65,536) of them, kept sorted (setgroups sorts them; the kernel's own
groups_search relies on it). owner_facts answers every distinct gid range of the rule set's
--suppl-groups matches once per packet of a file's socket, into the facts' OWNER_GROUPS word
(bit N: the fsgid or a supplementary group lies in range N, which is what owner_mt asks
before it applies `!`): one binary search per range for the first group at or above the
range's start, at most 17 probes (bpf_probe_read_kernel: the array's length is a variable, so
it is read by address, not through BTF). The search's indexes are plain numbers the verifier
need not track, so it walks the loop once per step. The chain program's test gives the
groups in the `owner_groups` map, laid out as a group_info, whose address the same search
reads (ChainRunner.run's `owner`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, MutableSequence
from functools import cache

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.btf import vmlinux
from codegen.bpf.isa import R0, R1, R2, R3, R6, R7, R8, R10, AluOp, JmpOp, MapType, Reg, Size
from codegen.bpf.maps import Map
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.owner import OWNER_GID, OWNER_SOCKET, OWNER_UID, Owner
from codegen.rules.model import Ruleset
from codegen.rules.packet import SocketOwner

from ..layout import FACTS, FIB_PARAMS_OFFSET, SCRATCH_OFFSET, Facts
from ..program import CompileError, where
from .base import UINT32_MAX, Context, Emitter, in_range, load

NO_SOCKET, NO_FILE, FILE = 0, 1, 2
TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 6, 12
# The chain program's control-block words for a test's owner (see the module's docstring).
CB_OWNER_STATE_WORD, CB_OWNER_STATE_SHIFT, CB_OWNER_UID_WORD, CB_OWNER_GID_WORD = 2, 8, 3, 4

# --suppl-groups: a cred holds at most NGROUPS_MAX groups, which a binary search covers in
# SEARCH_STEPS probes; the facts' OWNER_GROUPS word answers up to MAX_DISTINCT gid ranges.
NGROUPS_MAX, SEARCH_STEPS, MAX_DISTINCT = 65536, 17, 32
GROUPS_MAP = "owner_groups"  # the chain program's test groups, laid out as a group_info
# The search's step count, a stack slot of its own (a helper's write into a slot forgets
# what was spilled there): the route lookup's parameters' first word, free while owner_facts
# runs (OUTPUT looks no route up; the fragments' key built there is built later).
STEPS_OFFSET = FIB_PARAMS_OFFSET


def cb_owner(cb: MutableSequence[int], owner: SocketOwner | None) -> None:
    """Put a test's owner in the chain program's control block (cb[2]'s byte 0, the packet
    type, is kept); its supplementary groups go in the groups map (`groups_value`)."""
    state = NO_SOCKET if owner is None else FILE if owner.file else NO_FILE
    word = cb[CB_OWNER_STATE_WORD] & ~(0xFF << CB_OWNER_STATE_SHIFT)
    cb[CB_OWNER_STATE_WORD] = word | (1 + state) << CB_OWNER_STATE_SHIFT
    cb[CB_OWNER_UID_WORD] = 0 if owner is None else owner.uid
    cb[CB_OWNER_GID_WORD] = 0 if owner is None else owner.gid


def uses_owner(ruleset: Ruleset) -> bool:
    return ruleset.first_with(Owner) is not None


def group_ranges(ruleset: Ruleset) -> tuple[tuple[int, int], ...]:
    """The distinct gid ranges (first, last) of the rule set's --suppl-groups matches, in
    rule-set order: range N answers in bit N of the facts' OWNER_GROUPS word."""
    return tuple(
        dict.fromkeys(
            (match.gid.first, match.gid.last)
            for *_, match in ruleset.matches_of(Owner)
            if match.supplementary and match.gid is not None
        )
    )


def group_bits(ruleset: Ruleset) -> dict[tuple[int, int], int]:
    """The OWNER_GROUPS bit each distinct --suppl-groups range answers in; more ranges than
    the word has bits are refused at the rule holding the first one too many."""
    ranges = group_ranges(ruleset)
    if len(ranges) > MAX_DISTINCT:
        extra = ranges[MAX_DISTINCT]
        for *_, rule, _, match in ruleset.matches_of(Owner):
            if match.supplementary and match.gid and (match.gid.first, match.gid.last) == extra:
                raise CompileError(
                    f"{where(rule)}the bytecode backend answers at most {MAX_DISTINCT} distinct"
                    f" --gid-owner ranges with --suppl-groups, and this rule holds number"
                    f" {MAX_DISTINCT + 1} of {len(ranges)}"
                )
    return {extent: bit for bit, extent in enumerate(ranges)}


def uses_groups(ruleset: Ruleset) -> bool:
    """Whether the chain program reads a test's supplementary groups (the groups map)."""
    return bool(group_ranges(ruleset))


def groups_value(groups: Iterable[int]) -> bytes:
    """The groups map's value for a test's supplementary groups: a group_info (its ngroups and
    gid array where the running kernel's BTF has them), sorted as setgroups sorts them."""
    k = _kernel_layout()
    ordered = sorted(groups)
    if len(ordered) > NGROUPS_MAX:
        raise ValueError(f"a cred holds at most {NGROUPS_MAX} supplementary groups")
    value = bytearray(k["gid"] + 4 * NGROUPS_MAX)
    struct.pack_into("=I", value, k["ngroups"], len(ordered))
    struct.pack_into(f"={len(ordered)}I", value, k["gid"], *ordered)
    return bytes(value)


def create_groups_map() -> Map:
    return Map(MapType.ARRAY, 4, len(groups_value(())), 1, name=GROUPS_MAP)


@cache
def _kernel_layout() -> dict[str, int]:
    """Offsets of what the walk reads, and the BTF id of struct sock, from the running
    kernel's BTF (programs are built for the kernel they load into)."""
    btf = vmlinux()
    paths = {
        "skb_sk": ("sk_buff", "sk"),
        "skb_dev": ("sk_buff", "dev"),
        "dev_net": ("net_device", "nd_net.net"),
        "sk_state": ("sock", "__sk_common.skc_state"),
        "sk_net": ("sock", "__sk_common.skc_net.net"),
        "sk_listener": ("sock", "__sk_common.skc_listener"),
        "sk_socket": ("sock", "sk_socket"),
        "socket_file": ("socket", "file"),
        "file_cred": ("file", "f_cred"),
        "fsuid": ("cred", "fsuid"),
        "fsgid": ("cred", "fsgid"),
        "group_info": ("cred", "group_info"),
        "ngroups": ("group_info", "ngroups"),
        "gid": ("group_info", "gid"),
    }
    layout = {name: btf.member_offset(*path)[0] for name, path in paths.items()}
    layout["sock_id"] = btf.struct_id("sock")
    return layout


def owner_facts(
    hook: str, new_label: Callable[[str], str], ranges: tuple[tuple[int, int], ...] = ()
) -> list[Item]:
    """Fill the facts' owner fields, and with `ranges` (`group_ranges`) their answers in
    OWNER_GROUPS (r6: the context; clobbers r0-r5, r7, r8)."""
    known = new_label("owner_known")
    full = new_label("owner_full_socket")
    search = new_label("owner_groups")
    cb = SKB_OFFSETS["cb"]
    code: list[Item] = [
        I.st(Size.B, FACTS, Facts.OWNER_STATE.offset, NO_SOCKET),
        I.st(Size.W, FACTS, Facts.OWNER_UID.offset, 0),
        I.st(Size.W, FACTS, Facts.OWNER_GID.offset, 0),
    ]
    if ranges:
        code.append(I.st(Size.W, FACTS, Facts.OWNER_GROUPS.offset, 0))
    if hook == "chain":
        walk = new_label("owner_walk")
        code += [
            I.ldx(Size.W, R1, R6, cb + 4 * CB_OWNER_STATE_WORD),
            I.alu32(AluOp.RSH, R1, CB_OWNER_STATE_SHIFT),
            I.alu32(AluOp.AND, R1, 0xFF),
            I.jmp32(JmpOp.JEQ, R1, 0, walk),
            I.alu32(AluOp.SUB, R1, 1),
            I.stx(Size.B, FACTS, Facts.OWNER_STATE.offset, R1),
            I.ldx(Size.W, R2, R6, cb + 4 * CB_OWNER_UID_WORD),
            I.stx(Size.W, FACTS, Facts.OWNER_UID.offset, R2),
            I.ldx(Size.W, R2, R6, cb + 4 * CB_OWNER_GID_WORD),
            I.stx(Size.W, FACTS, Facts.OWNER_GID.offset, R2),
        ]
        if ranges:  # a file's: the test's groups, from the map, as a group_info's address
            code += [
                I.jmp32(JmpOp.JNE, R1, FILE, known),
                I.ld_map_value(R1, GROUPS_MAP, 0),
                I.stx(Size.DW, R10, SCRATCH_OFFSET, R1),
                *_read_address(R10, SCRATCH_OFFSET, known),
                I.ja(search),
            ]
        code += [I.ja(known), Label(walk)]
    k = _kernel_layout()
    code += [
        I.mov64(R1, R6),
        I.call_kfunc("bpf_cast_to_kern_ctx"),
        I.ldx(Size.DW, R7, R0, k["skb_sk"]),
        I.jmp(JmpOp.JEQ, R7, 0, known),
        I.ldx(Size.DW, R8, R0, k["skb_dev"]),
        I.ldx(Size.B, R1, R7, k["sk_state"]),
        I.jmp32(JmpOp.JNE, R1, TCP_NEW_SYN_RECV, full),
        # sk_to_full_sk: a request socket (a SYN-ACK's) stands for its listener. The member
        # shares a union with a scalar, so the loaded value is cast back to a socket.
        I.ldx(Size.DW, R1, R7, k["sk_listener"]),
        I.mov64(R2, k["sock_id"]),
        I.call_kfunc("bpf_rdonly_cast"),
        I.mov64(R7, R0),
        I.jmp(JmpOp.JEQ, R7, 0, known),
        I.ldx(Size.B, R1, R7, k["sk_state"]),
        Label(full),
        I.jmp32(JmpOp.JEQ, R1, TCP_TIME_WAIT, known),  # sk_to_full_sk: no full socket
        # owner_mt: a socket of another namespace (a tunnel's) is no socket here.
        I.jmp(JmpOp.JEQ, R8, 0, known),
        I.ldx(Size.DW, R1, R7, k["sk_net"]),
        I.ldx(Size.DW, R2, R8, k["dev_net"]),
        I.jmp(JmpOp.JNE, R1, R2, known),
        I.ldx(Size.DW, R1, R7, k["sk_socket"]),
        I.jmp(JmpOp.JEQ, R1, 0, known),
        I.st(Size.B, FACTS, Facts.OWNER_STATE.offset, NO_FILE),
        I.ldx(Size.DW, R1, R1, k["socket_file"]),
        I.jmp(JmpOp.JEQ, R1, 0, known),
        I.ldx(Size.DW, R1, R1, k["file_cred"]),
        I.jmp(JmpOp.JEQ, R1, 0, known),
        I.ldx(Size.W, R2, R1, k["fsuid"]),
        I.stx(Size.W, FACTS, Facts.OWNER_UID.offset, R2),
        I.ldx(Size.W, R2, R1, k["fsgid"]),
        I.stx(Size.W, FACTS, Facts.OWNER_GID.offset, R2),
        I.st(Size.B, FACTS, Facts.OWNER_STATE.offset, FILE),
    ]
    if ranges:
        code += [
            I.alu64(AluOp.ADD, R1, k["group_info"]),  # the address of cred->group_info
            *_read_address(R1, 0, known),
            Label(search),
            I.jmp(JmpOp.JEQ, R7, 0, known),
        ]
        for bit, (first, last) in enumerate(ranges):
            code += _groups_answer(first, last, bit, new_label)
    return [*code, Label(known)]


def _read_address(base: Reg, offset: int, fail: str) -> list[Item]:
    """r7 = the 8 bytes at `base + offset`, read with bpf_probe_read_kernel so that r7 is a
    plain number: the search adds indexes to it, which on a pointer the verifier would track
    (and split its states on) at every probe. Jumps to `fail` if the read fails."""
    return [
        I.mov64(R3, base),
        I.alu64(AluOp.ADD, R3, offset),
        *_read(8, fail),
        I.ldx(Size.DW, R7, R10, SCRATCH_OFFSET),
    ]


def _probe(offset_register: Reg, offset: int, fail: str) -> list[Item]:
    """The u32 at r7 + `offset_register` + `offset` into the scratch word; `fail` if unread."""
    return [
        I.mov64(R3, offset_register),
        I.alu64(AluOp.ADD, R3, R7),
        I.alu64(AluOp.ADD, R3, offset),
        *_read(4, fail),
    ]


def _read(size: int, fail: str) -> list[Item]:
    """`size` bytes at the address in r3 into the scratch slot, or a jump to `fail`."""
    return [
        I.mov64(R1, R10),
        I.alu64(AluOp.ADD, R1, SCRATCH_OFFSET),
        I.mov64(R2, size),
        I.call("probe_read_kernel"),
        I.jmp(JmpOp.JNE, R0, 0, fail),
    ]


def _groups_answer(
    first: int, last: int, bit: int, new_label: Callable[[str], str]
) -> list[Item]:
    """Set OWNER_GROUPS' `bit` if the fsgid or one of the sorted groups of the group_info at
    r7 lies in [first, last]: a binary search for the first group >= first, answering at once
    when a probed group is inside. r8 holds the search's bounds, lo in its low half and hi in
    its high half; the slot at STEPS_OFFSET counts the steps (the verifier's bound)."""
    label = new_label
    held, done, lookup, loop, upper = (
        label(f"owner_groups_{n}") for n in ("held", "done", "lookup", "loop", "upper")
    )
    steps = STEPS_OFFSET
    gid = _kernel_layout()["gid"]
    if first > last:  # an empty range: nothing lies in it
        return []
    code: list[Item] = [load(Facts.OWNER_GID)]
    if first > 0:
        code.append(I.jmp32(JmpOp.JLT, R1, first, lookup))
    if last < UINT32_MAX:
        code.append(I.jmp32(JmpOp.JGT, R1, last, lookup))
    code += [
        I.ja(held),
        Label(lookup),
        I.mov64(R1, 0),
        *_probe(R1, _kernel_layout()["ngroups"], done),
        # hi = ngroups, unclamped: a constant here would make the verifier follow the
        # search value by value (a cred holds at most NGROUPS_MAX, which 17 steps cover).
        I.ldx(Size.W, R8, R10, SCRATCH_OFFSET),
        I.alu64(AluOp.LSH, R8, 32),
        I.st(Size.DW, R10, steps, 0),
        Label(loop),
        I.ldx(Size.DW, R1, R10, steps),
        I.jmp(JmpOp.JGE, R1, SEARCH_STEPS, done),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R10, steps, R1),
        *_middle(),
        I.jmp(JmpOp.JGE, R1, R2, done),  # lo == hi: no group at or above `first` is inside
        I.alu64(AluOp.ADD, R1, R2),
        I.alu64(AluOp.RSH, R1, 1),
        I.alu64(AluOp.LSH, R1, 2),
        *_probe(R1, gid, done),
        *_middle(),
        I.alu64(AluOp.ADD, R1, R2),
        I.alu64(AluOp.RSH, R1, 1),  # mid
        I.ldx(Size.W, R3, R10, SCRATCH_OFFSET),  # its group
    ]
    if first > 0:
        code += [
            I.jmp32(JmpOp.JGE, R3, first, upper),
            I.alu64(AluOp.ADD, R1, 1),  # below the range: lo = mid + 1
            I.alu64(AluOp.LSH, R2, 32),
            I.alu64(AluOp.OR, R2, R1),
            I.mov64(R8, R2),
            I.ja(loop),
        ]
    code.append(Label(upper))
    if last < UINT32_MAX:
        code += [
            I.jmp32(JmpOp.JLE, R3, last, held),
            I.alu64(AluOp.LSH, R1, 32),  # above it: hi = mid
            I.mov32(R2, R8),
            I.alu64(AluOp.OR, R1, R2),
            I.mov64(R8, R1),
            I.ja(loop),
        ]
    return [
        *code,
        Label(held),
        I.ldx(Size.W, R1, FACTS, Facts.OWNER_GROUPS.offset),
        I.alu32(AluOp.OR, R1, 1 << bit),
        I.stx(Size.W, FACTS, Facts.OWNER_GROUPS.offset, R1),
        Label(done),
    ]


def _middle() -> list[Item]:
    """r1 = lo, r2 = hi, from r8."""
    return [I.mov32(R1, R8), I.mov64(R2, R8), I.alu64(AluOp.RSH, R2, 32)]


def owner(match: Owner, ctx: Context) -> list[Item]:
    """owner_mt over the facts: what the packet's socket state decides alone is a jump
    fixed at generation time; the id ranges are compared for a file's socket."""
    flags, invert = match.flags
    matched = ctx.new_label("owner_matched")
    code: list[Item] = [load(Facts.OWNER_STATE)]
    # No socket (or none a struct socket holds): only a match of negated options holds.
    code.append(I.jmp32(JmpOp.JEQ, R1, NO_SOCKET, matched if flags ^ invert == 0 else ctx.miss))
    if flags & invert & OWNER_SOCKET:  # ! --socket-exists, and there is one
        return [*code, I.ja(ctx.miss), Label(matched)]
    # A socket no file holds: the uid and gid options fail unless negated.
    no_file_holds = (flags ^ invert) & (OWNER_UID | OWNER_GID) == 0
    code.append(I.jmp32(JmpOp.JEQ, R1, NO_FILE, matched if no_file_holds else ctx.miss))
    for field, ids in ((Facts.OWNER_UID, match.uid), (Facts.OWNER_GID, match.gid)):
        if ids is None:
            continue
        if field is Facts.OWNER_GID and match.supplementary:  # answered in owner_facts
            bit = 1 << ctx.owner_bits[(ids.first, ids.last)]
            unless = JmpOp.JNE if ids.negated else JmpOp.JEQ
            code += [load(Facts.OWNER_GROUPS), I.alu32(AluOp.AND, R1, bit)]
            code.append(I.jmp32(unless, R1, 0, ctx.miss))
        else:
            code += [load(field), *in_range(ids.first, ids.last, ids.negated, UINT32_MAX, ctx)]
    return [*code, Label(matched)]


EMITTER = Emitter(Owner, owner)
