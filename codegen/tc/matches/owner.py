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

`--suppl-groups` is refused: the groups of a cred are an array of up to 65536 entries, which
would need a loop the verifier bounds by the array's length, not written yet.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from functools import cache

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.btf import vmlinux
from codegen.bpf.isa import R0, R1, R2, R6, R7, R8, AluOp, JmpOp, Size
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.owner import OWNER_GID, OWNER_SOCKET, OWNER_UID, Owner
from codegen.rules.model import Ruleset
from codegen.rules.packet import SocketOwner

from ..layout import FACTS, Facts
from .base import UINT32_MAX, Context, Emitter, in_range, load

NO_SOCKET, NO_FILE, FILE = 0, 1, 2
TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 6, 12
# The chain program's control-block words for a test's owner (see the module's docstring).
CB_OWNER_STATE_WORD, CB_OWNER_STATE_SHIFT, CB_OWNER_UID_WORD, CB_OWNER_GID_WORD = 2, 8, 3, 4

REFUSED_OPTIONS = {
    "supplementary": "--suppl-groups is not generated (the bytecode backend does not walk a"
    " cred's group list yet)",
}


def cb_owner(cb: MutableSequence[int], owner: SocketOwner | None) -> None:
    """Put a test's owner in the chain program's control block (cb[2]'s byte 0, the packet
    type, is kept)."""
    if owner is not None and owner.groups:
        raise ValueError("the chain program takes no supplementary groups (no --suppl-groups)")
    state = NO_SOCKET if owner is None else FILE if owner.file else NO_FILE
    word = cb[CB_OWNER_STATE_WORD] & ~(0xFF << CB_OWNER_STATE_SHIFT)
    cb[CB_OWNER_STATE_WORD] = word | (1 + state) << CB_OWNER_STATE_SHIFT
    cb[CB_OWNER_UID_WORD] = 0 if owner is None else owner.uid
    cb[CB_OWNER_GID_WORD] = 0 if owner is None else owner.gid


def uses_owner(ruleset: Ruleset) -> bool:
    return ruleset.first_with(Owner) is not None


def refusal(match: Owner) -> str | None:
    """Why this backend refuses an owner match it cannot generate exactly, else None."""
    return REFUSED_OPTIONS["supplementary"] if match.supplementary else None


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
    }
    layout = {name: btf.member_offset(*where)[0] for name, where in paths.items()}
    layout["sock_id"] = btf.struct_id("sock")
    return layout


def owner_facts(hook: str, new_label: Callable[[str], str]) -> list[Item]:
    """Fill the facts' owner fields (r6: the context; clobbers r0-r5, r7, r8)."""
    known = new_label("owner_known")
    full = new_label("owner_full_socket")
    cb = SKB_OFFSETS["cb"]
    code: list[Item] = [
        I.st(Size.B, FACTS, Facts.OWNER_STATE.offset, NO_SOCKET),
        I.st(Size.W, FACTS, Facts.OWNER_UID.offset, 0),
        I.st(Size.W, FACTS, Facts.OWNER_GID.offset, 0),
    ]
    if hook == "chain":
        walk = new_label("owner_walk")
        code += [
            I.ldx(Size.W, R1, R6, cb + 4 * CB_OWNER_STATE_WORD),
            I.alu32(AluOp.RSH, R1, CB_OWNER_STATE_SHIFT),
            I.alu32(AluOp.AND, R1, 0xFF),
            I.jmp32(JmpOp.JEQ, R1, 0, walk),
            I.alu32(AluOp.SUB, R1, 1),
            I.stx(Size.B, FACTS, Facts.OWNER_STATE.offset, R1),
            I.ldx(Size.W, R1, R6, cb + 4 * CB_OWNER_UID_WORD),
            I.stx(Size.W, FACTS, Facts.OWNER_UID.offset, R1),
            I.ldx(Size.W, R1, R6, cb + 4 * CB_OWNER_GID_WORD),
            I.stx(Size.W, FACTS, Facts.OWNER_GID.offset, R1),
            I.ja(known),
            Label(walk),
        ]
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
        Label(known),
    ]
    return code


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
        if ids is not None:
            code += [load(field), *in_range(ids.first, ids.last, ids.negated, UINT32_MAX, ctx)]
    return [*code, Label(matched)]


EMITTER = Emitter(Owner, owner, refusal=refusal)
