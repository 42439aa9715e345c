"""`-m udp` (xt_tcpudp.c, udp_mt): ports, after the header check that can drop a packet."""

from __future__ import annotations

from codegen.rules.extensions.udp import UDP_HEADER, UdpMatch

from .common import Labels, transport_header
from .ports import write_ports

MODEL = UdpMatch


def write(match: UdpMatch, labels: Labels) -> list[str]:
    return [*transport_header(UDP_HEADER, labels), *write_ports(match.sport, match.dport, labels)]
