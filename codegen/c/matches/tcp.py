"""`-m tcp` (xt_tcpudp.c, tcp_mt): ports and flags, after the fragment and header checks that
can drop a packet on the spot."""

from __future__ import annotations

from codegen.rules.extensions.tcp import TCP_HEADER, TcpFlags, TcpMatch

from .common import Labels, always_miss, hex_literal, require, short_header_hotdrops
from .ports import write_ports

MODEL = TcpMatch


def _fragment(labels: Labels) -> list[str]:
    """A later fragment misses, except one at offset 1, which could overwrite the flags of the
    first: tcp_mt drops that one."""
    return [
        "if (f->fragment != 0) {",
        f"    if (f->fragment == 1) goto {labels.hotdrop};",
        f"    goto {labels.miss};",
        "}",
    ]


def _flags(flags: TcpFlags, labels: Labels) -> list[str]:
    if flags.is_default:
        return []
    if flags.compare & ~flags.mask:  # a flag compared but masked out: no packet matches
        return [] if flags.negated else always_miss(labels)
    hit = f"(f->tcp_flags & {hex_literal(flags.mask)}) == {hex_literal(flags.compare)}"
    return require(hit, flags.negated, labels)


def write(match: TcpMatch, labels: Labels) -> list[str]:
    return [
        *_fragment(labels),
        *short_header_hotdrops(TCP_HEADER, labels),
        *write_ports(match.sport, match.dport, labels),
        *_flags(match.flags, labels),
    ]
