"""The reference connection tracker: nf_conntrack for IPv4 in pure Python, on an explicit clock.

`ConnectionTable.classify` is nf_conntrack_in (the Connection a packet carries through the
chains), `ConnectionTable.confirm` is nf_confirm (a new entry survives only if the chains
accepted its packet). TCP follows nf_conntrack_proto_tcp.c, window tracking with the
`nf_conntrack_tcp_be_liberal` of its Timeouts (the kernel's default 0), UDP, ICMP (requests,
replies, errors RELATED to what they quote) and every other protocol as the generic tracker,
with the kernel's default timeouts.
"""

from codegen.rules.tracking.table import Classification, ConnectionTable, Entry, TrackingError
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

__all__ = [
    "DEFAULT_TIMEOUTS",
    "Classification",
    "ConnectionTable",
    "Entry",
    "Timeouts",
    "TrackingError",
]
