"""What the port matches share (tcp, udp; as codegen.rules.extensions.ports does for the rule
layer): comparing the packet's ports with their ranges, and what a port pair pins for an exact
run. Not a family of its own."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.ports import PortRange

from ..layout import Facts
from .base import Context, Pins, in_range, load


def emit_ports(sport: PortRange, dport: PortRange, ctx: Context) -> list[Item]:
    code: list[Item] = []
    for field, ports in ((Facts.SPORT, sport), (Facts.DPORT, dport)):
        if not ports.is_default:
            code += [load(field), *in_range(ports.first, ports.last, ports.negated, 0xFFFF, ctx)]
    return code


def pin_ports(sport: PortRange, dport: PortRange) -> Pins | None:
    """Each range pins one port or none (the full range); anything else keeps the rule out."""
    pinned: list[int | None] = []
    for ports in (sport, dport):
        if ports.is_default:
            pinned.append(None)
        elif ports.first == ports.last and not ports.negated:
            pinned.append(ports.first)
        else:
            return None
    return Pins(*pinned)
