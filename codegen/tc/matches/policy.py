"""`-m policy --dir in` (xt_policy revision 0): the IPsec states that decapsulated a packet.

A tunnel-mode packet that IPsec decapsulated comes back through the device's receive path,
TC ingress included, with its security path (the skb's SKB_EXT_SEC_PATH extension, one
struct xfrm_state per transform) attached; every other packet has none. The programs read the
path once per packet, before the chains (`policy_facts`, from the entry function, which holds
the context), and answer every distinct policy match of the rule set there: bit N of the
facts' POLICY word is the answer of match N (`distinct`, in rule-set order). A match in a
chain is then one bit test. Without a path the answers are constants (`--pol none` holds,
`--pol ipsec` does not), which is what nearly every packet costs: one load and one test.

The path is reached as policy_mt reaches it, read-only, through the kernel's own structures:
bpf_cast_to_kern_ctx gives the sk_buff; its `active_extensions` bit and `extensions`' offset
give the sec_path (bpf_rdonly_cast, since the offset is a variable); its `len` and `xvec`
give the states, whose id (daddr, spi, proto) and props (reqid, mode, saddr) are compared
as match_xfrm_state compares them (addresses and the SPI as they lie in memory, in network
order). Offsets come from the running kernel's BTF; a kernel without XFRM has no path, and
its programs keep the constants.

The chain program (BPF_PROG_TEST_RUN, whose packets never carry a path) takes a test's path
from the `policy_secpath` map when byte 2 of cb[2] says so (ChainRunner.run's `secpath`):
0 read the skb, 1 no path, 2 the map's. The map's states are laid out as SecpathValue, in
the order the path holds them, with the same comparisons run over them.

Refused: `--dir out`, since a program at TC egress sees a packet after IPsec encapsulated it
(its bundle popped) and one at ingress has no route bundle at all, so what the match asks
about is never there; and `--strict` with two elements or more, where the kernel compares the
second state with memory outside the match (codegen.rules.extensions.policy).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.btf import BtfError, vmlinux
from codegen.bpf.isa import (
    R0,
    R1,
    R2,
    R3,
    R5,
    R6,
    R7,
    R8,
    R10,
    AluOp,
    AtomicOp,
    JmpOp,
    MapType,
    Size,
)
from codegen.bpf.maps import Map
from codegen.bpf.testrun import SKB_OFFSETS
from codegen.rules.extensions.conntrack import MaskedAddress
from codegen.rules.extensions.policy import Compared, Policy, PolicyElement, in_memory
from codegen.rules.model import Ruleset
from codegen.rules.packet import XFRM_MAX_DEPTH, XfrmState

from ..layout import FACTS, SCRATCH_OFFSET, Facts, map_and_key
from ..program import CompileError, where
from .base import Context, Emitter, load

SECPATH_MAP = "policy_secpath"
MAX_DISTINCT = 32  # bits of the facts' POLICY word
CB_WORD, CB_SHIFT = 2, 16  # byte 2 of cb[2]: 0 read the skb, 1 no path, 2 the map's
CB_SKB, CB_NONE, CB_MAP = 0, 1, 2


class SecpathState(ctypes.Structure):
    """One state as the test map holds it: the fields as they lie in the kernel's struct."""

    _fields_ = [
        ("spi", ctypes.c_uint32),  # network order in memory
        ("reqid", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),  # network order in memory
        ("daddr", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("_pad", ctypes.c_uint16),
    ]


class SecpathValue(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("xvec", SecpathState * XFRM_MAX_DEPTH),
    ]


def secpath_value(states: tuple[XfrmState, ...]) -> bytes:
    """The map value that stands for a security path of `states`."""
    value = SecpathValue(len=len(states))
    for index, state in enumerate(states):
        value.xvec[index] = SecpathState(
            in_memory(state.spi),
            state.reqid,
            in_memory(state.saddr),
            in_memory(state.daddr),
            state.proto,
            state.mode,
        )
    return bytes(value)


def create_map() -> Map:
    return Map(MapType.ARRAY, 4, ctypes.sizeof(SecpathValue), 1, name=SECPATH_MAP)


def cb_secpath(cb: list[int], states: tuple[XfrmState, ...] | None, table: Map) -> None:
    """Give the chain program a test's security path (None: none) through cb and the map."""
    word = cb[CB_WORD] & ~(0xFF << CB_SHIFT)
    if states is None:
        cb[CB_WORD] = word | CB_NONE << CB_SHIFT
        return
    table.update(0, secpath_value(states))
    cb[CB_WORD] = word | CB_MAP << CB_SHIFT


def distinct(ruleset: Ruleset) -> tuple[Policy, ...]:
    """The rule set's distinct policy matches, in rule-set order: match N answers in bit N."""
    return tuple(dict.fromkeys(match for *_, match in ruleset.matches_of(Policy)))


def uses_policy(ruleset: Ruleset) -> bool:
    return bool(distinct(ruleset))


def answer_bits(ruleset: Ruleset) -> dict[Policy, int]:
    """The bit of the facts' POLICY word each distinct policy match answers in."""
    return {match: bit for bit, match in enumerate(distinct(ruleset))}


def refusal(match: Policy) -> str | None:
    if match.direction == "out":
        return (
            "--dir out asks about the route's IPsec bundle, which no TC program sees: at egress"
            " the packet is already encapsulated, at ingress it has no route yet"
        )
    if match.strict and len(match.used) > 1:
        return (
            "with --strict and more than one element the kernel compares the second state with"
            " memory outside the match, which no program can reproduce"
        )
    return None


@dataclass(frozen=True)
class _Source:
    """Where the states are read from: the kernel's structs or the test map's value."""

    state: Callable[[int], list[Item]]  # r5 = state i (r7: the path), jump to `done` if none
    fields: dict[str, tuple[int, Size]]  # field -> (offset in a state, size)


@cache
def _kernel_layout() -> dict[str, int] | None:
    """Offsets of what the walk reads, from the running kernel's BTF; None without XFRM."""
    btf = vmlinux()
    try:
        layout = {
            "active": btf.member_offset("sk_buff", "active_extensions")[0],
            "extensions": btf.member_offset("sk_buff", "extensions")[0],
            "ext_offset": btf.member_offset("skb_ext", "offset")[0],
            "sp_len": btf.member_offset("sec_path", "len")[0],
            "sp_xvec": btf.member_offset("sec_path", "xvec")[0],
            "spi": btf.member_offset("xfrm_state", "id.spi")[0],
            "daddr": btf.member_offset("xfrm_state", "id.daddr")[0],
            "proto": btf.member_offset("xfrm_state", "id.proto")[0],
            "reqid": btf.member_offset("xfrm_state", "props.reqid")[0],
            "mode": btf.member_offset("xfrm_state", "props.mode")[0],
            "saddr": btf.member_offset("xfrm_state", "props.saddr")[0],
            "sec_path_id": btf.struct_id("sec_path"),
            "sec_path_ext": btf.enum("skb_ext_id")["SKB_EXT_SEC_PATH"],
        }
    except BtfError:
        return None
    return layout


def _fits(element: PolicyElement, fields: dict[str, tuple[int, Size]], miss: str) -> list[Item]:
    """match_xfrm_state of element for the state at r5: falls through if it fits, else
    jumps to `miss` (r1 clobbered)."""
    code: list[Item] = []

    def scalar(name: str, option: Compared | None) -> None:
        if option is None:
            return
        offset, size = fields[name]
        op = JmpOp.JNE if not option.negated else JmpOp.JEQ
        code.extend([I.ldx(size, R1, R5, offset), I.jmp32(op, R1, option.value, miss)])

    def address(name: str, option: MaskedAddress | None) -> None:
        if option is None:
            return
        offset, size = fields[name]
        op = JmpOp.JNE if not option.negated else JmpOp.JEQ
        code.extend(
            [
                I.ldx(size, R1, R5, offset),
                I.alu32(AluOp.XOR, R1, in_memory(option.address)),
                I.alu32(AluOp.AND, R1, in_memory(option.mask)),
                I.jmp32(op, R1, 0, miss),
            ]
        )

    address("saddr", element.tunnel_src)
    address("daddr", element.tunnel_dst)
    scalar("proto", element.proto)
    scalar("mode", element.mode)
    scalar("spi", element.spi)
    scalar("reqid", element.reqid)
    return code


def _update(op: AtomicOp, value: int) -> list[Item]:
    """POLICY op= value, as an atomic operation: the verifier then keeps no value for the
    word, so the paths through the answers (one per combination of bits, were it tracked)
    meet again and are verified once."""
    return [I.mov32(R1, value), I.atomic(Size.W, op, FACTS, Facts.POLICY.offset, R1)]


def _answers(
    matches: tuple[Policy, ...], source: _Source, new_label: Callable[[str], str], done: str
) -> list[Item]:
    """With a path at r7 holding r8 states: set the bit of every ipsec match that holds."""
    code: list[Item] = _update(AtomicOp.AND, 0)  # none of --pol none holds
    for index in range(XFRM_MAX_DEPTH):
        code += [I.jmp32(JmpOp.JLE, R8, index, done), *source.state(index)]
        for bit, match in enumerate(matches):
            if match.none or (match.strict and index > 0):
                continue
            skip = new_label("policy_next")
            if match.strict:  # one element: the path must hold exactly one state
                code.append(I.jmp32(JmpOp.JNE, R8, 1, skip))
            code += [
                *_fits(match.used[0], source.fields, skip),
                *_update(AtomicOp.OR, 1 << bit),
                Label(skip),
            ]
    return code


def _kernel_walk(
    matches: tuple[Policy, ...], new_label: Callable[[str], str], done: str
) -> list[Item]:
    """policy_facts' reading of the skb's own path (r6: the context)."""
    k = _kernel_layout()
    if k is None:
        return []

    def state(index: int) -> list[Item]:
        return [
            I.ldx(Size.DW, R5, R7, k["sp_xvec"] + 8 * index),
            I.jmp(JmpOp.JEQ, R5, 0, done),
        ]

    fields = {
        "spi": (k["spi"], Size.W),
        "reqid": (k["reqid"], Size.W),
        "saddr": (k["saddr"], Size.W),
        "daddr": (k["daddr"], Size.W),
        "proto": (k["proto"], Size.B),
        "mode": (k["mode"], Size.B),
    }
    return [
        I.mov64(R1, R6),
        I.call_kfunc("bpf_cast_to_kern_ctx"),
        I.ldx(Size.B, R1, R0, k["active"]),
        I.alu32(AluOp.AND, R1, 1 << k["sec_path_ext"]),
        I.jmp32(JmpOp.JEQ, R1, 0, done),
        I.ldx(Size.DW, R2, R0, k["extensions"]),
        I.jmp(JmpOp.JEQ, R2, 0, done),
        # skb_ext_find: the path lies offset[SKB_EXT_SEC_PATH] 8-byte chunks into the block.
        I.ldx(Size.B, R3, R2, k["ext_offset"] + k["sec_path_ext"]),
        I.alu64(AluOp.LSH, R3, 3),
        I.alu64(AluOp.ADD, R2, R3),
        I.mov64(R1, R2),
        I.mov64(R2, k["sec_path_id"]),
        I.call_kfunc("bpf_rdonly_cast"),
        I.mov64(R7, R0),
        I.jmp(JmpOp.JEQ, R7, 0, done),
        I.ldx(Size.W, R8, R7, k["sp_len"]),
        *_answers(matches, _Source(state, fields), new_label, done),
    ]


def _map_path(
    matches: tuple[Policy, ...], new_label: Callable[[str], str], done: str
) -> list[Item]:
    """policy_facts' reading of a test's path from the map (the chain program)."""
    value = SecpathValue
    base = value.xvec.offset
    size = ctypes.sizeof(SecpathState)

    def state(index: int) -> list[Item]:
        return [I.mov64(R5, R7), I.alu64(AluOp.ADD, R5, base + size * index)]

    fields = {
        name: (
            getattr(SecpathState, name).offset,
            Size.W if name not in ("proto", "mode") else Size.B,
        )
        for name in ("spi", "reqid", "saddr", "daddr", "proto", "mode")
    }
    return [
        I.st(Size.W, R10, SCRATCH_OFFSET, 0),
        *map_and_key(SECPATH_MAP, SCRATCH_OFFSET),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        I.mov64(R7, R0),
        I.ldx(Size.W, R8, R7, value.len.offset),
        *_answers(matches, _Source(state, fields), new_label, done),
    ]


def policy_facts(
    hook: str, ruleset: Ruleset, bits: dict[Policy, int], new_label: Callable[[str], str]
) -> list[Item]:
    """Fill the facts' POLICY word with the answer of each match in `bits` (`answer_bits` of
    `ruleset`) (r6: the context; clobbers r0-r5, r7, r8)."""
    matches = tuple(bits)
    if len(matches) > MAX_DISTINCT:
        found = ruleset.first_rule(lambda rule: matches[MAX_DISTINCT] in rule.matches)
        assert found is not None
        chain, index, rule = found
        raise CompileError(
            f"{where(rule)}the bytecode backend answers at most {MAX_DISTINCT} distinct -m policy"
            f" matches, and rule {index} of {chain} holds number {MAX_DISTINCT + 1} of"
            f" {len(matches)}"
        )
    done = new_label("policy_known")
    none_bits = sum(1 << bit for bit, match in enumerate(matches) if match.none)
    code: list[Item] = [
        I.st(Size.W, FACTS, Facts.POLICY.offset, 0),
        *_update(AtomicOp.OR, none_bits),
    ]
    if hook == "chain":
        walk = new_label("policy_walk")
        cb = SKB_OFFSETS["cb"] + 4 * CB_WORD
        code += [
            I.ldx(Size.W, R1, R6, cb),
            I.alu32(AluOp.RSH, R1, CB_SHIFT),
            I.alu32(AluOp.AND, R1, 0xFF),
            I.jmp32(JmpOp.JEQ, R1, CB_SKB, walk),
            I.jmp32(JmpOp.JNE, R1, CB_MAP, done),
            *_map_path(matches, new_label, done),
            I.ja(done),
            Label(walk),
        ]
    return [*code, *_kernel_walk(matches, new_label, done), Label(done)]


def policy(match: Policy, ctx: Context) -> list[Item]:
    bit = ctx.policy_bits[match]
    return [
        load(Facts.POLICY),
        I.alu32(AluOp.AND, R1, 1 << bit),
        I.jmp32(JmpOp.JEQ, R1, 0, ctx.miss),
    ]


EMITTER = Emitter(Policy, policy, refusal=refusal)
