"""`-m conntrack` (xt_conntrack.c conntrack_mt, revision 3) over the connection ct_classify
left in `f->ct` (codegen/conntrack): --ctstate first; with no entry (INVALID) the match then
holds only if --ctstate was given, and otherwise each option given must hold."""

from __future__ import annotations

from dataclasses import fields

from codegen.rules.extensions.conntrack import Conntrack
from codegen.rules.extensions.ctinfo import STATE_INVALID, AnyOf

from .common import UINT16_MAX, UINT32_MAX, Labels, hex_literal, in_range, require

MODEL = Conntrack
# (model field, f->ct member) of the tuple addresses and ports.
_ADDRESSES = (
    ("origsrc", "orig.src"),
    ("origdst", "orig.dst"),
    ("replsrc", "reply.src"),
    ("repldst", "reply.dst"),
)
_PORTS = (
    ("origsrc_port", "orig.sport"),
    ("origdst_port", "orig.dport"),
    ("replsrc_port", "reply.sport"),
    ("repldst_port", "reply.dport"),
)


def any_of(bits: AnyOf, member: str, labels: Labels) -> list[str]:
    """Some of `bits` in f->ct.`member` (none of them, negated)."""
    return require(f"(f->ct.{member} & {hex_literal(bits.bits)}) != 0", bits.negated, labels)


def write(match: Conntrack, labels: Labels) -> list[str]:
    code = [] if match.state is None else any_of(match.state, "state", labels)
    others = any(getattr(match, f.name) is not None for f in fields(match) if f.name != "state")
    if not others:  # an option that holds for any entry still needs one
        return code
    rest = _options(match, labels)
    if match.state is None:  # no entry, and nothing that could match one: a miss
        return [*code, f"if (f->ct.state == {STATE_INVALID}) goto {labels.miss};", *rest]
    return [
        *code,
        f"if (f->ct.state != {STATE_INVALID}) {{",
        *(f"    {line}" for line in rest),
        "}",
    ]


def _options(match: Conntrack, labels: Labels) -> list[str]:
    code: list[str] = []
    if match.direction is not None:
        code += require(f"f->ct.dir == {int(match.direction == 'REPLY')}", False, labels)
    for field, member in _ADDRESSES:
        option = getattr(match, field)
        if option is not None and option.mask != 0:
            hit = (
                f"((f->ct.{member} ^ {hex_literal(option.address)}) & "
                f"{hex_literal(option.mask)}) == 0"
            )
            code += require(hit, option.negated, labels)
        elif option is not None and option.negated:
            code.append(f"goto {labels.miss};")  # no address is outside /0
    for field, member in _PORTS:
        option = getattr(match, field)
        if option is not None:
            hit = in_range(f"f->ct.{member}", option.first, option.last, UINT16_MAX)
            code += require(hit, option.negated, labels)
    if match.protocol is not None:
        code += require(f"f->ct.l4proto == {match.protocol.number}", match.protocol.negated, labels)
    if match.status is not None:
        code += any_of(match.status, "status", labels)
    if match.expires is not None:
        expires = match.expires
        hit = in_range("f->ct.expires", expires.min, expires.max, UINT32_MAX)
        code += require(hit, expires.negated, labels)
    return code
