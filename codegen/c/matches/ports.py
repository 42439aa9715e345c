"""The port ranges tcp and udp share (xt_tcpudp's port_match), as the rule layer shares their
model (codegen.rules.extensions.ports). Not a family of its own."""

from __future__ import annotations

from codegen.rules.extensions.ports import PortRange

from .common import UINT16_MAX, Labels, range_match


def write_ports(sport: PortRange, dport: PortRange, labels: Labels) -> list[str]:
    """Source then destination port, each only when it restricts anything."""
    code: list[str] = []
    for field, ports in (("f->sport", sport), ("f->dport", dport)):
        if not ports.is_default:
            code += range_match(field, ports.first, ports.last, ports.negated, UINT16_MAX, labels)
    return code
