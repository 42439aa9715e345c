"""TCP segments as nf_conntrack_proto_tcp.c reads them, and tcp_in_window's bookkeeping:
the state enum, flags and sequence arithmetic, the per-direction window data (td_end,
td_maxend, td_maxwin, td_maxack, the flags) that RST validation and the timeouts read.

tcp_in_window decides ACCEPT, IGNORE (the segment passes with its entry, which does not move)
or INVALID (it carries none) for a segment out of window, as nf_tcp_log_invalid does: with
`nf_conntrack_tcp_be_liberal=1`, or for a sender marked liberal (a picked-up connection),
what is out of window is accepted and only its bookkeeping skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE = range(9)
SYN_SENT2, MAX, IGNORE = 9, 10, 11
STATE_NAMES = (
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
)
# enum tcp_bit_set: the row of the state table a segment selects.
SYN_SET, SYNACK_SET, FIN_SET, ACK_SET, RST_SET, NONE_SET = range(6)
# TCP header flags.
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << bit for bit in range(8))
# tcp_valid_flags: what tcp_error lets through once PSH, ECE and CWR are taken off.
VALID_FLAGS = frozenset(
    {SYN, SYN | URG, SYN | ACK, RST, RST | ACK, FIN | ACK, FIN | ACK | URG, ACK, ACK | URG}
)
# ip_ct_tcp_state.flags and ip_ct_tcp.last_flags bits.
FLAG_WINDOW_SCALE, FLAG_SACK_PERM, FLAG_CLOSE_INIT, FLAG_BE_LIBERAL = 0x01, 0x02, 0x04, 0x08
FLAG_DATA_UNACKNOWLEDGED, FLAG_MAXACK_SET, EXP_CHALLENGE_ACK = 0x10, 0x20, 0x40
SIMULTANEOUS_OPEN = 0x80
MAX_WSCALE = 14
MAXACKWINCONST = 66000
U32 = 0xFFFFFFFF
# What tcp_in_window decides (enum nf_ct_tcp_action).
ACCEPT, IGNORE, INVALID = "accept", "ignore", "invalid"


def before(a: int, b: int) -> bool:
    """(s32)(a - b) < 0: sequence number `a` comes before `b`."""
    return (a - b) & U32 >= 0x80000000


def after(a: int, b: int) -> bool:
    return before(b, a)


@dataclass(frozen=True, slots=True)
class Segment:
    """The TCP header fields conntrack reads; `end` is segment_seq_plus_len."""

    seq: int
    ack: int
    window: int
    flags: int
    end: int
    options: bytes

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    @property
    def index(self) -> int:  # get_conntrack_index
        if self.flags & RST:
            return RST_SET
        if self.flags & SYN:
            return SYNACK_SET if self.flags & ACK else SYN_SET
        if self.flags & FIN:
            return FIN_SET
        return ACK_SET if self.flags & ACK else NONE_SET


def read_segment(data: bytes, transport: int) -> Segment | None:
    """The segment of an IPv4 packet trimmed to its total length, or None where tcp_packet and
    tcp_error find it INVALID: a short or malformed header, or an impossible flag combination."""
    header = data[transport : transport + 20]
    if len(header) < 20:
        return None
    doff = (header[12] >> 4) * 4
    if doff < 20 or len(data) - transport < doff:
        return None
    flags = header[13]
    if flags & ~(ECE | CWR | PSH) not in VALID_FLAGS:
        return None
    seq = int.from_bytes(header[4:8], "big")
    end = seq + len(data) - transport - doff + bool(flags & SYN) + bool(flags & FIN)
    return Segment(
        seq=seq,
        ack=int.from_bytes(header[8:12], "big"),
        window=int.from_bytes(header[14:16], "big"),
        flags=flags,
        end=end & U32,
        options=data[transport + 20 : transport + doff],
    )


@dataclass(slots=True)
class Side:
    """struct ip_ct_tcp_state: what one direction has sent."""

    td_end: int = 0
    td_maxend: int = 0
    td_maxwin: int = 0
    td_maxack: int = 0
    td_scale: int = 0
    flags: int = 0


@dataclass(slots=True)
class TcpState:
    """struct ip_ct_tcp."""

    state: int = NONE
    seen: tuple[Side, Side] = field(default_factory=lambda: (Side(), Side()))
    last_index: int = SYN_SET
    last_dir: int = 0
    last_seq: int = 0
    last_ack: int = 0
    last_end: int = 0
    last_win: int = 0
    last_wscale: int = 0
    last_flags: int = 0
    retrans: int = 0


def read_options(options: bytes, side: Side) -> None:
    # tcp_options: window scale and SACK permitted.
    side.td_scale = 0
    side.flags &= FLAG_BE_LIBERAL
    position = 0
    while position < len(options):
        kind = options[position]
        if kind == 0:
            return
        if kind == 1:
            position += 1
            continue
        if len(options) - position < 2:
            return
        size = options[position + 1]
        if size < 2 or size > len(options) - position:
            return
        if kind == 4 and size == 2:
            side.flags |= FLAG_SACK_PERM
        elif kind == 3 and size == 3:
            side.td_scale = min(options[position + 2], MAX_WSCALE)
            side.flags |= FLAG_WINDOW_SCALE
        position += size


def _sack(options: bytes, sack: int) -> int:
    # tcp_sack: the highest right edge of the SACK blocks, if above the ack.
    if len(options) == 12 and options[:4] == bytes([1, 1, 8, 10]):
        return sack
    position = 0
    while position < len(options):
        kind = options[position]
        if kind == 0:
            return sack
        if kind == 1:
            position += 1
            continue
        if len(options) - position < 2:
            return sack
        size = options[position + 1]
        if size < 2 or size > len(options) - position:
            return sack
        if kind == 5 and size >= 10 and (size - 2) % 8 == 0:
            for block in range(position + 2, position + size, 8):
                edge = int.from_bytes(options[block + 4 : block + 8], "big")
                if after(edge, sack):
                    sack = edge
            return sack
        position += size
    return sack


def _init_sender(sender: Side, receiver: Side, segment: Segment, direction: int) -> None:
    sender.td_end = sender.td_maxend = segment.end
    sender.td_maxwin = segment.window or 1
    read_options(segment.options, sender)
    if direction == 1 and not (
        sender.flags & FLAG_WINDOW_SCALE and receiver.flags & FLAG_WINDOW_SCALE
    ):
        sender.td_scale = receiver.td_scale = 0


def in_window(tcp: TcpState, direction: int, segment: Segment, liberal: bool) -> str:
    """tcp_in_window: ACCEPT, IGNORE or INVALID; a segment out of window skips the bookkeeping
    (as the kernel returns before it), and is accepted where `liberal`
    (nf_conntrack_tcp_be_liberal) or its sender is."""
    sender, receiver = tcp.seen[direction], tcp.seen[1 - direction]

    def out_of_window(action: str) -> str:
        return ACCEPT if liberal or sender.flags & FLAG_BE_LIBERAL else action

    seq, ack, window = segment.seq, segment.ack, segment.window
    end = segment.end
    sack = _sack(segment.options, ack) if receiver.flags & FLAG_SACK_PERM else ack
    if sender.td_maxwin == 0:
        if segment.has(SYN):
            _init_sender(sender, receiver, segment, direction)
            if not segment.has(ACK):
                return ACCEPT
        else:
            sender.td_end = end
            scaled = window << sender.td_scale
            sender.td_maxwin = scaled or 1
            sender.td_maxend = (end + sender.td_maxwin) & U32
            if receiver.td_maxwin == 0:
                receiver.td_end = receiver.td_maxend = sack
            elif sack == (receiver.td_end + 1) & U32:
                receiver.td_end = (receiver.td_end + 1) & U32
    elif segment.has(SYN) and after(end, sender.td_end) and tcp.state in (SYN_SENT, SYN_RECV):
        _init_sender(sender, receiver, segment, direction)
        if direction == 1 and not segment.has(ACK):
            return ACCEPT
    if not segment.has(ACK) or (segment.flags & (ACK | RST) == ACK | RST and ack == 0):
        ack = sack = receiver.td_end
    if segment.has(RST) and seq == 0 and tcp.state == SYN_SENT:
        seq = end = sender.td_end
    maxackwindow = max(sender.td_maxwin, MAXACKWINCONST)
    if not before(seq, sender.td_maxend + 1):
        overshot = (end - sender.td_maxend + 1) & U32
        in_receive_window = bool(receiver.td_maxwin) and after(
            end, sender.td_end - receiver.td_maxwin - 1
        )
        if (
            in_receive_window
            and after(sack, receiver.td_end - maxackwindow - 1)
            and overshot <= receiver.td_maxwin
            and before(sack, receiver.td_end + 1)
        ):
            sender.td_end = end
            sender.flags |= FLAG_DATA_UNACKNOWLEDGED
            return out_of_window(IGNORE)  # more bytes than the window
        return out_of_window(INVALID)  # SEQ over the upper bound
    if not before(sack, receiver.td_end + 1):
        return out_of_window(INVALID)  # ACK over the upper bound
    if receiver.td_maxwin and not after(end, sender.td_end - receiver.td_maxwin - 1):
        return out_of_window(IGNORE)  # SEQ under the lower bound
    if not after(sack, receiver.td_end - maxackwindow - 1):
        return out_of_window(IGNORE)  # ACK under the lower bound
    if not segment.has(SYN):
        window <<= sender.td_scale
    swin = window + ((sack - ack) & U32)
    sender.td_maxwin = max(sender.td_maxwin, swin)
    if after(end, sender.td_end):
        sender.td_end = end
        sender.flags |= FLAG_DATA_UNACKNOWLEDGED
    if segment.has(ACK):
        if not sender.flags & FLAG_MAXACK_SET:
            sender.td_maxack = ack
            sender.flags |= FLAG_MAXACK_SET
        elif after(ack, sender.td_maxack):
            sender.td_maxack = ack
    if receiver.td_maxwin and after(end, sender.td_maxend):
        receiver.td_maxwin += (end - sender.td_maxend) & U32
    if after(sack + window, receiver.td_maxend - 1):
        receiver.td_maxend = (sack + window + (window == 0)) & U32
    if ack == receiver.td_end:
        receiver.flags &= ~FLAG_DATA_UNACKNOWLEDGED
    if segment.index == ACK_SET:
        last = (tcp.last_dir, tcp.last_seq, tcp.last_ack, tcp.last_end, tcp.last_win)
        if last == (direction, seq, ack, end, segment.window):
            tcp.retrans += 1
        else:
            tcp.last_dir, tcp.last_seq, tcp.last_ack = direction, seq, ack
            tcp.last_end, tcp.last_win, tcp.retrans = end, segment.window, 0
    return ACCEPT
