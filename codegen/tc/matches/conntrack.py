"""`-m conntrack` (xt_conntrack revision 3) over what ct_classify left in the facts
(codegen.conntrack.Result): with no entry only --ctstate is looked at, and the match then
holds only if it was given; otherwise every option given must hold."""

from __future__ import annotations

from dataclasses import fields

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, AluOp, JmpOp
from codegen.rules.extensions.conntrack import Conntrack, MaskedAddress
from codegen.rules.extensions.ctinfo import STATE_INVALID, AnyOf
from codegen.rules.extensions.ports import PortRange

from ..layout import Facts
from .base import Context, Emitter, in_range, jump_unless, load

# (model field, Result tuple, tuple part)
_ADDRESSES = (
    ("origsrc", "orig", "src"),
    ("origdst", "orig", "dst"),
    ("replsrc", "reply", "src"),
    ("repldst", "reply", "dst"),
)
_PORTS = (
    ("origsrc_port", "orig", "sport"),
    ("origdst_port", "orig", "dport"),
    ("replsrc_port", "reply", "sport"),
    ("repldst_port", "reply", "dport"),
)


def any_of(bits: AnyOf, name: str, ctx: Context) -> list[Item]:
    """Some of `bits` set in the Result's field `name` (none of them, negated), else miss."""
    code: list[Item] = [load(Facts.connection(name)), I.alu32(AluOp.AND, R1, bits.bits)]
    return [*code, I.jmp32(JmpOp.JNE if bits.negated else JmpOp.JEQ, R1, 0, ctx.miss)]


def _address(option: MaskedAddress, side: str, part: str, ctx: Context) -> list[Item]:
    if option.mask == 0:  # every address: matches, or never if negated
        return [I.ja(ctx.miss)] if option.negated else []
    return [
        load(Facts.connection(side, part)),
        I.alu32(AluOp.XOR, R1, option.address),
        I.alu32(AluOp.AND, R1, option.mask),
        jump_unless(not option.negated, 0, ctx.miss),
    ]


def _port(option: PortRange, side: str, part: str, ctx: Context) -> list[Item]:
    code: list[Item] = [load(Facts.connection(side, part))]
    return [*code, *in_range(option.first, option.last, option.negated, 0xFFFF, ctx)]


def conntrack(match: Conntrack, ctx: Context) -> list[Item]:
    code: list[Item] = [] if match.state is None else any_of(match.state, "state", ctx)
    if not _others(match):
        return code
    rest = _options(match, ctx)
    # No entry: the other options are not looked at, and the match holds iff --ctstate (which
    # held, to get here) was given.
    tracked = ctx.new_label("tracked")
    code += [load(Facts.connection("state")), I.jmp32(JmpOp.JNE, R1, STATE_INVALID, tracked)]
    if match.state is None:
        return [*code, I.ja(ctx.miss), Label(tracked), *rest]
    end = ctx.new_label("conntrack_end")
    return [*code, I.ja(end), Label(tracked), *rest, Label(end)]


def _others(match: Conntrack) -> bool:
    """Whether an option besides --ctstate was given (even one that holds for any entry, such
    as --ctorigsrc 0.0.0.0/0: it still needs an entry)."""
    return any(getattr(match, f.name) is not None for f in fields(match) if f.name != "state")


def _options(match: Conntrack, ctx: Context) -> list[Item]:
    """The options past --ctstate, in xt_conntrack's order."""
    code: list[Item] = []
    if match.direction is not None:
        reply = int(match.direction == "REPLY")
        code += [load(Facts.connection("dir")), jump_unless(True, reply, ctx.miss)]
    for field, side, part in _ADDRESSES:
        option = getattr(match, field)
        if option is not None:
            code += _address(option, side, part, ctx)
    for field, side, part in _PORTS:
        option = getattr(match, field)
        if option is not None:
            code += _port(option, side, part, ctx)
    if match.protocol is not None:
        code += [
            load(Facts.connection("l4proto")),
            jump_unless(not match.protocol.negated, match.protocol.number, ctx.miss),
        ]
    if match.status is not None:
        code += any_of(match.status, "status", ctx)
    if match.expires is not None:
        expires = match.expires
        code += [load(Facts.connection("expires"))]
        code += in_range(expires.min, expires.max, expires.negated, 0xFFFF_FFFF, ctx)
    return code


EMITTER = Emitter(Conntrack, conntrack)
