"""The connection table: what nf_conntrack_in makes of each IPv4 packet before the chains, and
what nf_confirm commits after them.

The kernel's two steps are two calls here. `classify` is nf_conntrack_in (PREROUTING for an
arriving packet, LOCAL_OUT for a locally generated one): it looks the packet's tuple up, moves
an existing entry's state (TCP state, SEEN_REPLY, ASSURED, timeout) at once, as the kernel does
before any chain runs, and gives the Connection the packet carries through the chains. A packet
without an entry gets a new, unconfirmed one that only `confirm` (nf_confirm, at the end of
INPUT or POSTROUTING, so only if the chains accepted the packet) puts in the table: a dropped
first packet leaves nothing behind, while a dropped packet of a known connection has already
changed it.

Time is explicit (seconds, any origin, never decreasing): an entry whose deadline has come is
gone, as nf_ct_is_expired makes lookups skip it. The kernel's jiffies on that clock
(`jiffies_origin`, `hz`) are read for one thing only: xt_conntrack's --ctexpire of an entry not
yet confirmed, whose relative timeout nf_ct_expires reads against them (`_expires`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from codegen.jiffies import kernel_hz
from codegen.rules.extensions.limit import seconds_to_jiffies
from codegen.rules.packet import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    Connection,
    ConnectionState,
    ConnectionTuple,
)
from codegen.rules.tracking import tcp
from codegen.rules.tracking.tcp_window import STATE_NAMES, TcpState, read_segment
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
U32 = 0xFFFF_FFFF
# Protocols with trackers of their own in the kernel that this one does not follow.
UNMODELLED = {33: "DCCP", 47: "GRE", 132: "SCTP", 136: "UDP-Lite"}
# ICMP types (linux/icmp.h).
ECHO_REPLY, DEST_UNREACH, SOURCE_QUENCH, REDIRECT, ECHO = 0, 3, 4, 5, 8
TIME_EXCEEDED, PARAMETERPROB = 11, 12
NR_ICMP_TYPES = 18
ICMP_ERRORS = frozenset({DEST_UNREACH, SOURCE_QUENCH, REDIRECT, TIME_EXCEEDED, PARAMETERPROB})
# icmp_invert_tuple's invmap: request <-> reply; other types have no inverse.
ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
ICMP_VALID_NEW = frozenset({8, 13, 15, 17})  # echo, timestamp, info and address requests
UDP_STREAM_AFTER = 2  # seconds of replied traffic before UDP is a stream (udp.stream_ts)

Key = tuple[int, ConnectionTuple]


class TrackingError(ValueError):
    """A packet the tracker cannot judge as nf_conntrack would: not IPv4, a fragment (the
    kernel reassembles before conntrack), or a protocol whose own tracker is not followed."""


@dataclass(eq=False, slots=True)
class Entry:
    """One connection (struct nf_conn): its tuples, IPS_* status, when it expires (seconds,
    on the table's clock) and the protocol's private state."""

    protocol: int
    original: ConnectionTuple
    reply: ConnectionTuple
    status: int = 0
    deadline: float = 0.0
    tcp: TcpState | None = None
    udp_stream_after: float = 0.0
    mark: int = 0  # ct->mark (-j CONNMARK, -m connmark)

    @property
    def tcp_state(self) -> str | None:
        """The TCP conntrack state's name (as /proc/net/nf_conntrack prints it), if TCP."""
        return None if self.tcp is None else STATE_NAMES[self.tcp.state]


@dataclass(frozen=True, slots=True)
class Classification:
    """What `classify` found: the connection the packet carries through the chains (None: no
    entry, which conntrack matches see as INVALID) and the entry itself, for `confirm`."""

    connection: Connection | None
    entry: Entry | None = None


@dataclass(slots=True)
class ConnectionTable:
    """IPv4 connection tracking as nf_conntrack follows it, with the timeouts,
    `nf_conntrack_tcp_be_liberal` and `nf_conntrack_tcp_loose` of `timeouts` (`loose` False
    turns pickups off whatever they say)."""

    timeouts: Timeouts = DEFAULT_TIMEOUTS
    loose: bool = True
    # The kernel's jiffies (low 32 bits) when the table's clock reads 0, and its HZ (None: the
    # running kernel's, found when first needed). 0: as the test runs' fixed clock has them.
    jiffies_origin: int = 0
    hz: int | None = None
    _entries: dict[Key, tuple[Entry, int]] = field(default_factory=dict)

    def entries(self, now: float) -> list[Entry]:
        """The confirmed entries alive at `now`, oldest first."""
        self._expire(now)
        unique = {id(entry): entry for entry, _ in self._entries.values()}
        return list(unique.values())

    def find(self, protocol: int, tuple_: ConnectionTuple, now: float) -> tuple[Entry, int] | None:
        """The live entry one of whose tuples is `tuple_`, and which (0 original, 1 reply)."""
        found = self._entries.get((protocol, tuple_))
        if found is None:
            return None
        if found[0].deadline <= now:
            self._remove(found[0])
            return None
        return found

    def classify(self, packet: bytes, now: float) -> Classification:
        """nf_conntrack_in for `packet` (IPv4, from the IP header on) at time `now`, the same
        at PREROUTING and LOCAL_OUT here (the kernel verifies checksums only at PREROUTING,
        which the tracker does not)."""
        header = _ip_header(packet)
        data = packet[: header.total_length]
        protocol, transport = header.protocol, header.transport
        if protocol in UNMODELLED:
            raise TrackingError(f"{UNMODELLED[protocol]} has a tracker of its own, not followed")
        if protocol == IPPROTO_ICMP:
            icmp = data[transport : transport + 8]
            if len(icmp) < 8 or icmp[0] > NR_ICMP_TYPES:
                return Classification(None)  # icmp_error: short, or an unknown type
            if icmp[0] in ICMP_ERRORS:
                return self._related(data, transport + 8, header.daddr, now)
        for _ in range(2):  # a TCP reopen kills the old entry and looks up once more
            original = _tuple(data, protocol, transport, header.saddr, header.daddr)
            if original is None:
                return Classification(None)
            found = self.find(protocol, original, now)
            if found is None:
                reply = _invert(protocol, original)
                if reply is None:
                    return Classification(None)  # init_conntrack: no inverse tuple
                entry, direction = Entry(protocol, original, reply), 0
            else:
                entry, direction = found
            verdict = self._packet(entry, direction, data, transport, now)
            if verdict == "repeat":
                self._remove(entry)
                continue
            if verdict == "invalid":
                return Classification(None)
            if direction == 1:
                entry.status |= IPS_SEEN_REPLY
            if direction == 1:
                state: ConnectionState = "ESTABLISHED"
            elif entry.status & IPS_SEEN_REPLY:
                state = "ESTABLISHED"
            elif entry.status & IPS_EXPECTED:
                state = "RELATED"
            else:
                state = "NEW"
            return Classification(self._connection(entry, state, direction, now), entry)
        raise AssertionError("a reopened TCP connection found its old entry again")

    def confirm(self, classification: Classification) -> None:
        """nf_confirm: a new entry whose packet the chains accepted joins the table."""
        entry = classification.entry
        if entry is None or entry.status & IPS_CONFIRMED:
            return
        entry.status |= IPS_CONFIRMED
        self._entries[(entry.protocol, entry.original)] = (entry, 0)
        self._entries[(entry.protocol, entry.reply)] = (entry, 1)

    # -- the protocols --------------------------------------------------------------------

    def _packet(self, entry: Entry, direction: int, data: bytes, transport: int, now: float) -> str:
        """The l4 tracker's packet(): "accept", "invalid" or "repeat"."""
        confirmed = bool(entry.status & IPS_CONFIRMED)
        timeouts = self.timeouts
        if entry.protocol == IPPROTO_TCP:
            segment = read_segment(data, transport)
            if segment is None:
                return "invalid"
            if not confirmed:
                entry.tcp = tcp.new(segment, self.loose and bool(self.timeouts.tcp_loose))
                if entry.tcp is None:
                    return "invalid"
            assert entry.tcp is not None
            outcome = tcp.track(
                entry.tcp,
                direction,
                segment,
                seen_reply=bool(entry.status & IPS_SEEN_REPLY),
                assured=bool(entry.status & IPS_ASSURED),
                timeouts=timeouts,
            )
            if outcome.shrink:  # nf_tcp_handle_invalid
                left = entry.deadline - now
                if left >= 120 and left > timeouts.tcp_unacknowledged:
                    entry.deadline = now + timeouts.tcp_unacknowledged
            if outcome.verdict != "accept":
                return outcome.verdict
            if outcome.kill:
                self._remove(entry)
            if outcome.timeout is not None:
                entry.deadline = now + outcome.timeout
            if outcome.assured:
                entry.status |= IPS_ASSURED
        elif entry.protocol == IPPROTO_UDP:
            udp = data[transport : transport + 8]
            length = int.from_bytes(udp[4:6], "big")
            if len(udp) < 8 or length > len(data) - transport or length < 8:
                return "invalid"  # udp_error: truncated or malformed
            if not confirmed:
                entry.udp_stream_after = now + UDP_STREAM_AFTER
            timeout = timeouts.udp
            if entry.status & IPS_SEEN_REPLY and now > entry.udp_stream_after:
                timeout = timeouts.udp_stream
                entry.status |= IPS_ASSURED
            entry.deadline = now + timeout
        elif entry.protocol == IPPROTO_ICMP:
            if entry.original.dport >> 8 not in ICMP_VALID_NEW:
                return "invalid"  # only requests make ICMP connections
            entry.deadline = now + timeouts.icmp
        else:
            entry.deadline = now + timeouts.generic
        return "accept"

    def _related(self, data: bytes, inner: int, outer_daddr: int, now: float) -> Classification:
        """nf_conntrack_inet_error: an ICMP error is RELATED to the connection whose packet it
        quotes, if that connection's packet in that direction went to the error's target."""
        if len(data) < inner + 20:
            return Classification(None)
        fragment_offset = int.from_bytes(data[inner + 6 : inner + 8], "big") & 0x1FFF
        inner_transport = inner + (data[inner] & 0x0F) * 4
        if fragment_offset or inner_transport > len(data):
            return Classification(None)
        protocol = data[inner + 9]
        if protocol in UNMODELLED:
            raise TrackingError(f"an ICMP error quoting {UNMODELLED[protocol]}, not followed")
        quoted = _tuple(
            data,
            protocol,
            inner_transport,
            int.from_bytes(data[inner + 12 : inner + 16], "big"),
            int.from_bytes(data[inner + 16 : inner + 20], "big"),
        )
        inverted = None if quoted is None else _invert(protocol, quoted)
        found = None if inverted is None else self.find(protocol, inverted, now)
        if found is None:
            return Classification(None)
        entry, direction = found
        if (entry.reply if direction else entry.original).dst != outer_daddr:
            return Classification(None)
        return Classification(self._connection(entry, "RELATED", direction, now), entry)

    # -- the table itself -----------------------------------------------------------------

    def _connection(
        self, entry: Entry, state: ConnectionState, direction: int, now: float
    ) -> Connection:
        return Connection(
            state=state,
            direction="REPLY" if direction else "ORIGINAL",
            protocol=entry.protocol,
            original=entry.original,
            reply=entry.reply,
            status=entry.status,
            expires=self._expires(entry, now),
            mark=entry.mark,
        )

    def _expires(self, entry: Entry, now: float) -> int:
        """Whole seconds left as xt_conntrack reads them (nf_ct_expires / HZ): a timeout
        refreshed by this very packet reads in full, as conntrack and the chains run within one
        jiffy. An entry not yet confirmed holds the timeout this packet set relative, in
        jiffies, which nf_ct_expires reads against the u32 jiffies all the same: max(0,
        (s32)(timeout - jiffies)) / HZ: 0 unless the u32 jiffies are at most the timeout
        (within 300 s + the timeout of boot: jiffies start 300 s before they wrap) or past
        2**31 + the timeout (the later half of each wrap)."""
        left = max(0.0, entry.deadline - now)
        if entry.status & IPS_CONFIRMED:
            return math.floor(left)
        if self.hz is None:
            self.hz = kernel_hz()
        jiffies = (self.jiffies_origin + seconds_to_jiffies(now, self.hz)) & U32
        ahead = (math.ceil(round(left, 6)) * self.hz - jiffies) & U32
        return 0 if ahead == 0 or ahead >= 1 << 31 else ahead // self.hz

    def _remove(self, entry: Entry) -> None:
        for key in ((entry.protocol, entry.original), (entry.protocol, entry.reply)):
            if self._entries.get(key, (None,))[0] is entry:
                del self._entries[key]

    def _expire(self, now: float) -> None:
        for entry, _ in list(self._entries.values()):
            if entry.deadline <= now:
                self._remove(entry)


@dataclass(frozen=True, slots=True)
class _Header:
    saddr: int
    daddr: int
    protocol: int
    total_length: int
    transport: int


def _ip_header(packet: bytes) -> _Header:
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[0] & 0x0F < 5:
        raise TrackingError("not an IPv4 packet with a whole header")
    total_length = int.from_bytes(packet[2:4], "big")
    transport = (packet[0] & 0x0F) * 4
    if not transport <= total_length <= len(packet):
        raise TrackingError(f"IP total length {total_length} does not fit the packet")
    if int.from_bytes(packet[6:8], "big") & 0x3FFF:
        raise TrackingError("a fragment: conntrack sees datagrams whole (nf_defrag_ipv4)")
    return _Header(
        saddr=int.from_bytes(packet[12:16], "big"),
        daddr=int.from_bytes(packet[16:20], "big"),
        protocol=packet[9],
        total_length=total_length,
        transport=transport,
    )


def _tuple(
    data: bytes, protocol: int, transport: int, saddr: int, daddr: int
) -> ConnectionTuple | None:
    """nf_ct_get_tuple: ports for TCP and UDP, (id; type, code) for ICMP, none otherwise;
    None when the header is too short to hold them."""
    if protocol in (IPPROTO_TCP, IPPROTO_UDP):
        ports = data[transport : transport + 4]
        if len(ports) < 4:
            return None
        return ConnectionTuple(
            saddr, daddr, int.from_bytes(ports[:2], "big"), int.from_bytes(ports[2:], "big")
        )
    if protocol == IPPROTO_ICMP:
        icmp = data[transport : transport + 8]
        if len(icmp) < 8:
            return None
        return ConnectionTuple(
            saddr, daddr, int.from_bytes(icmp[4:6], "big"), icmp[0] << 8 | icmp[1]
        )
    return ConnectionTuple(saddr, daddr)


def _invert(protocol: int, original: ConnectionTuple) -> ConnectionTuple | None:
    if protocol == IPPROTO_ICMP:
        inverse = ICMP_INVERSE.get(original.dport >> 8)
        if inverse is None:
            return None
        return ConnectionTuple(
            original.dst, original.src, original.sport, inverse << 8 | original.dport & 0xFF
        )
    return ConnectionTuple(original.dst, original.src, original.dport, original.sport)
