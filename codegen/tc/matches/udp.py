"""`-m udp` (xt_tcpudp's udp_mt): the transport guard, then ports. In an exact run it pins its
single ports, with the UDP header as the lookup's condition."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.udp import UDP_HEADER, UdpMatch
from codegen.rules.names import IPPROTO_UDP

from .base import Context, Emitter, Pins, PortRanges, TransportHeader, transport_guard
from .ports import emit_ports, pin_ports


def udp(match: UdpMatch, ctx: Context) -> list[Item]:
    return [*transport_guard(UDP_HEADER, ctx), *emit_ports(match.sport, match.dport, ctx)]


def pins(match: UdpMatch) -> Pins | None:
    return pin_ports(match.sport, match.dport)


def ranges(match: UdpMatch) -> PortRanges:
    return (match.sport, match.dport)


EMITTER = Emitter(
    UdpMatch, udp, pins, TransportHeader("udp", IPPROTO_UDP, UDP_HEADER), ranges=ranges
)
