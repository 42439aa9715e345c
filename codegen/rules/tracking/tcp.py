"""TCP as nf_conntrack_proto_tcp.c tracks it: tcp_error's flag check (`read_segment`),
tcp_new's pickup rule (`new`), and the tcp_conntracks state table with tcp_packet's special
cases (`track`): reopening, ignored segments, RST validation, what is out of window, the
timeouts, ASSURED. The window bookkeeping is `tcp_window`'s; checksums are assumed correct.
"""

from __future__ import annotations

from dataclasses import dataclass

from codegen.rules.tracking.tcp_window import (
    ACK_SET,
    CLOSE,
    CLOSE_WAIT,
    ESTABLISHED,
    EXP_CHALLENGE_ACK,
    FIN_SET,
    FIN_WAIT,
    FLAG_BE_LIBERAL,
    FLAG_CLOSE_INIT,
    FLAG_DATA_UNACKNOWLEDGED,
    FLAG_MAXACK_SET,
    FLAG_SACK_PERM,
    FLAG_WINDOW_SCALE,
    IGNORE,
    LAST_ACK,
    NONE,
    NONE_SET,
    RST,
    RST_SET,
    SIMULTANEOUS_OPEN,
    SYN_RECV,
    SYN_SENT,
    SYN_SENT2,
    SYN_SET,
    SYNACK_SET,
    TIME_WAIT,
    U32,
    Segment,
    Side,
    TcpState,
    before,
    in_window,
    read_options,
)
from codegen.rules.tracking.tcp_window import INVALID as WINDOW_INVALID
from codegen.rules.tracking.timeouts import Timeouts

sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2, sIV, sIG = range(12)
# tcp_conntracks[direction][index][old state], as Linux 6.x has it.
TRANSITIONS = (
    (  # ORIGINAL
        (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),  # syn
        (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),  # synack
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),  # fin
        (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),  # ack
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),  # rst
        (sIV,) * 10,  # none
    ),
    (  # REPLY
        (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),
        (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),
        (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
        (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),
        (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
        (sIV,) * 10,
    ),
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What tcp_packet returns: `verdict` is "accept", "invalid" (-NF_ACCEPT: the packet
    carries no entry) or "repeat" (kill the entry and look up again); on accept, `timeout` is
    the refresh (None: not refreshed), `assured` whether to set ASSURED, `kill` whether the
    entry dies (a RST before any reply); on invalid, `shrink` whether the entry keeps at most
    the unacknowledged timeout if it has 120 s or more left (nf_tcp_handle_invalid)."""

    verdict: str
    timeout: int | None = None
    assured: bool = False
    kill: bool = False
    shrink: bool = False


INVALID = Outcome("invalid")
IGNORED = Outcome("accept")


def new(segment: Segment, loose: bool) -> TcpState | None:
    """tcp_new: the state of a new entry for a segment that has none (a SYN, or with `loose`
    a mid-stream segment picked up), or None if it may not create one."""
    new_state = TRANSITIONS[0][segment.index][NONE]
    if new_state == sIV or (new_state != sSS and not loose):
        return None
    tcp = TcpState()
    original = tcp.seen[0]
    original.td_end = segment.end
    original.td_maxwin = segment.window or 1
    if new_state == sSS:
        original.td_maxend = original.td_end
        read_options(segment.options, original)
    else:
        original.td_maxend = (original.td_end + original.td_maxwin) & U32
        for side in tcp.seen:
            side.flags = FLAG_SACK_PERM | FLAG_BE_LIBERAL
    tcp.last_index = NONE_SET
    return tcp


def _timeout(timeouts: Timeouts, state: int) -> int:
    return timeouts.tcp_states[state]


def track(
    tcp: TcpState,
    direction: int,
    segment: Segment,
    *,
    seen_reply: bool,
    assured: bool,
    timeouts: Timeouts,
) -> Outcome:
    """tcp_packet for a segment of the entry `tcp` travelling in `direction` (0 original, 1
    reply); `tcp` changes in place, as the kernel changes it before any chain runs."""
    old_state = tcp.state
    index = segment.index
    new_state = TRANSITIONS[direction][index][old_state]
    if new_state == sSS and old_state >= TIME_WAIT:
        closing = (tcp.seen[0].flags | tcp.seen[1].flags) & FLAG_CLOSE_INIT
        if closing or (tcp.last_dir == direction and tcp.last_index == RST_SET):
            return Outcome("repeat")  # reopen a closed or aborted connection
        new_state = sIG
    if new_state == sIG:
        if (
            index == SYNACK_SET
            and tcp.last_index == SYN_SET
            and tcp.last_dir != direction
            and segment.ack == tcp.last_end
        ):
            # This SYN/ACK answers a SYN that was ignored: resynchronise from it.
            old_state, new_state = SYN_SENT, SYN_RECV
            side = tcp.seen[tcp.last_dir]
            side.td_end = side.td_maxend = tcp.last_end
            side.td_maxwin = tcp.last_win or 1
            side.td_scale = tcp.last_wscale
            tcp.last_flags &= ~EXP_CHALLENGE_ACK
            side.flags = tcp.last_flags
            own = tcp.seen[direction]
            own.td_end = own.td_maxend = own.td_maxwin = own.td_maxack = own.td_scale = 0
            own.flags &= FLAG_BE_LIBERAL
        else:
            tcp.last_index, tcp.last_dir, tcp.last_seq = index, direction, segment.seq
            tcp.last_end, tcp.last_win = segment.end, segment.window
            if index == SYN_SET and direction == 0:
                seen = Side()
                read_options(segment.options, seen)
                tcp.last_flags = tcp.last_wscale = 0
                if seen.flags & FLAG_WINDOW_SCALE:
                    tcp.last_flags |= FLAG_WINDOW_SCALE
                    tcp.last_wscale = seen.td_scale
                tcp.last_flags |= seen.flags & FLAG_SACK_PERM
                if old_state == LAST_ACK:
                    tcp.last_flags |= EXP_CHALLENGE_ACK
            if old_state == SYN_SENT and index == ACK_SET and direction == 1:
                tcp.last_ack = segment.ack
            return IGNORED
    elif new_state == sIV:
        return INVALID
    elif new_state == TIME_WAIT:
        if (
            old_state == LAST_ACK
            and index == ACK_SET
            and tcp.last_dir != direction
            and tcp.last_index == SYN_SET
            and tcp.last_flags & EXP_CHALLENGE_ACK
        ):
            tcp.last_flags &= ~EXP_CHALLENGE_ACK
            return IGNORED  # an RFC 5961 challenge ACK, not the last ACK
    if new_state == SYN_SENT2:
        tcp.last_flags |= SIMULTANEOUS_OPEN
    elif new_state == SYN_RECV:
        if direction == 1 and index == ACK_SET and tcp.last_flags & SIMULTANEOUS_OPEN:
            new_state = ESTABLISHED
    skip_window = False
    if new_state == CLOSE and index == RST_SET:
        checked = _check_rst(tcp, direction, segment, old_state, seen_reply, assured)
        if checked is None:
            return INVALID
        new_state, skip_window = checked
    if not skip_window:
        action = in_window(tcp, direction, segment, bool(timeouts.tcp_be_liberal))
        if action == IGNORE:
            return IGNORED  # passes with its entry, which does not move
        if action == WINDOW_INVALID:
            return _invalid(tcp, direction, index, assured)
    return _commit(
        tcp, direction, index, segment, old_state, new_state, seen_reply, assured, timeouts
    )


def _check_rst(
    tcp: TcpState,
    direction: int,
    segment: Segment,
    old_state: int,
    seen_reply: bool,
    assured: bool,
) -> tuple[int, bool] | None:
    """tcp_packet's RST checks: None for an invalid RST, else (new state, whether the window
    check is skipped)."""
    if old_state in (FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE):  # tcp_can_early_drop
        return CLOSE, True
    new_state = CLOSE
    other = tcp.seen[1 - direction]
    established = old_state == ESTABLISHED and assured  # nf_conntrack_tcp_established
    if other.flags & FLAG_MAXACK_SET and tcp.last_index != SYN_SET:
        seq = segment.seq
        if seq == 0 and not established:
            return CLOSE, False  # likely the answer to a SYN let through
        if before(seq, other.td_maxack):
            return None
        if not established or seq == other.td_maxack:
            return CLOSE, False
        if tcp.last_index == ACK_SET and tcp.last_dir == direction and seq == tcp.last_end:
            return CLOSE, False  # the end of a train of segments
        new_state = old_state  # not exactly in sequence: wait for a challenge ACK
    if (
        (seen_reply and tcp.last_index == SYN_SET) or (not assured and tcp.last_index == ACK_SET)
    ) and segment.ack == tcp.last_end:
        return new_state, True
    if (
        old_state == SYN_SENT
        and tcp.last_index == ACK_SET
        and tcp.last_dir == 1
        and segment.seq == tcp.last_ack
    ):
        return new_state, True
    return new_state, False


def _invalid(tcp: TcpState, direction: int, index: int, assured: bool) -> Outcome:
    """nf_tcp_handle_invalid, for a segment out of window: an assured connection's FIN or RST
    that answers the other side's shrinks its timeout (`shrink`); another is remembered."""
    if not assured or index not in (RST_SET, FIN_SET):
        return INVALID
    if tcp.last_dir != direction and tcp.last_index in (FIN_SET, RST_SET):
        return Outcome("invalid", shrink=True)
    tcp.last_index, tcp.last_dir = index, direction
    return INVALID


def _commit(
    tcp: TcpState,
    direction: int,
    index: int,
    segment: Segment,
    old_state: int,
    new_state: int,
    seen_reply: bool,
    assured: bool,
    timeouts: Timeouts,
) -> Outcome:
    tcp.last_index, tcp.last_dir = index, direction
    tcp.state = new_state
    if old_state != new_state and new_state == FIN_WAIT:
        tcp.seen[direction].flags |= FLAG_CLOSE_INIT
    state_timeout = _timeout(timeouts, new_state)
    unacknowledged = (tcp.seen[0].flags | tcp.seen[1].flags) & FLAG_DATA_UNACKNOWLEDGED
    if tcp.retrans >= timeouts.tcp_max_retrans_count and state_timeout > timeouts.tcp_max_retrans:
        timeout = timeouts.tcp_max_retrans
    elif index == RST_SET:
        timeout = timeouts.tcp_states[CLOSE]
    elif unacknowledged and state_timeout > timeouts.tcp_unacknowledged:
        timeout = timeouts.tcp_unacknowledged
    elif tcp.last_win == 0 and state_timeout > timeouts.tcp_max_retrans:
        timeout = timeouts.tcp_max_retrans
    else:
        timeout = state_timeout
    if not seen_reply:
        if segment.has(RST):
            return Outcome("accept", kill=True)  # only a RST came back: no connection
        if index == SYN_SET and old_state == SYN_SENT:
            return Outcome("accept")  # a retransmitted SYN does not renew the timeout
        if new_state == ESTABLISHED:
            timeout = min(timeout, timeouts.tcp_unacknowledged)  # a picked-up connection
        return Outcome("accept", timeout)
    promote = not assured and old_state in (SYN_RECV, ESTABLISHED) and new_state == ESTABLISHED
    return Outcome("accept", timeout, assured=promote)
