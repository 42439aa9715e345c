"""The tracker's table as `conntrack -L` (conntrack-tools 1.4) prints the kernel's: one line a
connection, protocol name and number, seconds left, the TCP state, the original tuple,
[UNREPLIED] while no reply was seen, the reply tuple, [ASSURED], the mark and use count."""

from __future__ import annotations

import ipaddress

from codegen.rules.packet import IPS_ASSURED, IPS_SEEN_REPLY
from codegen.rules.tracking.tcp_window import STATE_NAMES

from . import Entry, Tuple

NS = 1_000_000_000
# libnetfilter_conntrack's protocol names; any other protocol is "unknown".
PROTOCOL_NAMES = {
    1: "icmp",
    6: "tcp",
    17: "udp",
    33: "dccp",
    47: "gre",
    132: "sctp",
    136: "udplite",
}


def _tuple(proto: int, tuple_: Tuple) -> str:
    text = f"src={ipaddress.IPv4Address(tuple_.src)} dst={ipaddress.IPv4Address(tuple_.dst)} "
    if proto in (6, 17):
        return text + f"sport={tuple_.sport} dport={tuple_.dport} "
    if proto == 1:
        return text + f"type={tuple_.dport >> 8} code={tuple_.dport & 0xFF} id={tuple_.sport} "
    return text


def entry_line(entry: Entry, now: int) -> str:
    """One entry as conntrack -L prints it; `now` in ns on the tracker's clock."""
    seconds = max(0, (entry.deadline - now) // NS)
    line = f"{PROTOCOL_NAMES.get(entry.proto, 'unknown'):<8} {entry.proto} {seconds} "
    if entry.proto == 6:
        line += f"{STATE_NAMES[entry.tcp_state]} "
    line += _tuple(entry.proto, entry.orig)
    if not entry.status & IPS_SEEN_REPLY:
        line += "[UNREPLIED] "
    line += _tuple(entry.proto, entry.reply)
    if entry.status & IPS_ASSURED:
        line += "[ASSURED] "
    return line + f"mark={entry.mark} use=1"


def table_lines(entries: list[Entry], now: int) -> list[str]:
    """The live entries (a lookup skips an expired one, and so does the listing), soonest
    to expire last, as their lines."""
    live = sorted((e for e in entries if e.deadline > now), key=lambda e: -e.deadline)
    return [entry_line(entry, now) for entry in live]
