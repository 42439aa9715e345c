"""`-m policy --dir in` (xt_policy.c's policy_mt and match_policy_in, revision 0) over the
states codegen/c/policy.py's `policy_of` put in the facts: without a path `--pol none` holds
and ipsec does not; with one, ipsec without `--strict` asks whether any state fits the
element (match_xfrm_state), with it (one element) whether the path is that one state.

Refused, as by the bytecode backend and for the same reasons: `--dir out` (a TC program never
sees the route's bundle) and `--strict` with more than one element (the kernel compares the
second state with memory outside the match)."""

from __future__ import annotations

from codegen.rules.extensions.conntrack import MaskedAddress
from codegen.rules.extensions.policy import Compared, Policy, PolicyElement
from codegen.rules.packet import XFRM_MAX_DEPTH

from .common import Labels, UnsupportedMatch, hex_literal

MODEL = Policy


def _fits(element: PolicyElement, state: str) -> str:
    """match_xfrm_state of `element` for the facts' `state`, as a C condition."""
    parts = []

    def address(field: str, option: MaskedAddress | None) -> None:
        if option is not None:
            op = "!=" if option.negated else "=="
            masked = f"((BE32({state}.{field}) ^ {hex_literal(option.address)})"
            parts.append(f"({masked} & {hex_literal(option.mask)}) {op} 0)")

    def scalar(field: str, option: Compared | None) -> None:
        if option is not None:
            op = "!=" if option.negated else "=="
            parts.append(f"{state}.{field} {op} {hex_literal(option.value)}")

    address("saddr", element.tunnel_src)
    address("daddr", element.tunnel_dst)
    scalar("proto", element.proto)
    scalar("mode", element.mode)
    scalar("spi", element.spi)
    scalar("reqid", element.reqid)
    return " && ".join(f"({part})" for part in parts) or "1"


def write(match: Policy, labels: Labels) -> list[str]:
    if match.direction == "out":
        raise UnsupportedMatch(
            "the C backend refuses '-m policy --dir out' because a TC program never sees the"
            " route's IPsec bundle (at egress the packet is already encapsulated)"
        )
    if match.strict and len(match.used) > 1:
        raise UnsupportedMatch(
            "the C backend refuses '-m policy --strict' with more than one element because the"
            " kernel compares the second state with memory outside the match"
        )
    miss = f"goto {labels.miss};"
    if match.none:
        return [f"if (f->sp_len >= 0) {miss}"]
    element = match.used[0]
    if match.strict:
        return [f"if (f->sp_len != 1 || !({_fits(element, 'f->sp[0]')})) {miss}"]
    held = " || ".join(
        f"(f->sp_len > {index} && {_fits(element, f'f->sp[{index}]')})"
        for index in range(XFRM_MAX_DEPTH)
    )
    return [f"if (!({held})) {miss}"]
