"""`-m tcp` (xt_tcpudp's tcp_mt): the transport guard with the offset-1 hotdrop, ports, flags.
In an exact run it pins its single ports, with the TCP header as the lookup's condition."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.tcp import TCP_HEADER, TcpMatch
from codegen.rules.names import IPPROTO_TCP

from ..layout import Facts
from .base import (
    Context,
    Emitter,
    Pins,
    PortRanges,
    TransportHeader,
    masked_equal,
    transport_guard,
)
from .ports import emit_ports, pin_ports


def tcp(match: TcpMatch, ctx: Context) -> list[Item]:
    code = [*transport_guard(TCP_HEADER, ctx, evil_offset_one=True)]
    code += emit_ports(match.sport, match.dport, ctx)
    flags = match.flags
    if not flags.is_default:
        code += masked_equal(Facts.TCP_FLAGS, flags.mask, flags.compare, flags.negated, ctx)
    return code


def pins(match: TcpMatch) -> Pins | None:
    return pin_ports(match.sport, match.dport) if match.flags.is_default else None


def ranges(match: TcpMatch) -> PortRanges | None:
    return (match.sport, match.dport) if match.flags.is_default else None


EMITTER = Emitter(
    TcpMatch, tcp, pins, TransportHeader("tcp", IPPROTO_TCP, TCP_HEADER), ranges=ranges
)
