"""The kernel's default conntrack timeouts in seconds (the net.netfilter.nf_conntrack_*
sysctls of a new namespace) and the TCP knobs the tracker follows; an apply takes the
namespace's own (harness.deploy.conntrack_sysctls)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timeouts:
    tcp_syn_sent: int = 120
    tcp_syn_recv: int = 60
    tcp_established: int = 432000
    tcp_fin_wait: int = 120
    tcp_close_wait: int = 60
    tcp_last_ack: int = 30
    tcp_time_wait: int = 120
    tcp_close: int = 10
    tcp_syn_sent2: int = 120  # no sysctl: tcp_timeouts[TCP_CONNTRACK_SYN_SENT2]
    tcp_max_retrans: int = 300
    tcp_unacknowledged: int = 300
    tcp_max_retrans_count: int = 3  # nf_conntrack_tcp_max_retrans
    # nf_conntrack_tcp_be_liberal: 0, a TCP segment out of window is INVALID or ignored
    # (tcp_in_window); 1, it is accepted.
    tcp_be_liberal: int = 0
    # nf_conntrack_tcp_loose: 1, a connection is picked up from a segment other than a SYN.
    tcp_loose: int = 1
    udp: int = 30
    udp_stream: int = 120
    icmp: int = 30
    generic: int = 600

    @property
    def tcp_states(self) -> tuple[int, ...]:
        """Indexed by TCP conntrack state, NONE (unused) to SYN_SENT2."""
        return (
            self.tcp_syn_sent,
            self.tcp_syn_sent,
            self.tcp_syn_recv,
            self.tcp_established,
            self.tcp_fin_wait,
            self.tcp_close_wait,
            self.tcp_last_ack,
            self.tcp_time_wait,
            self.tcp_close,
            self.tcp_syn_sent2,
        )


DEFAULT_TIMEOUTS = Timeouts()
