"""The kernel's rate limits on the ICMP errors it sends, which REJECT's answers go through
(ipt_REJECT -> nf_send_unreach -> icmp_send; a TCP RST has none): net/ipv4/icmp.c and
inetpeer.c as of Linux 6.12, checked on this machine (a burst of 20 rejected datagrams from one
peer got 6 answers, the next burst at once none, one a second later, three after 3 s more).

- icmpv4_mask_allow: a type outside `icmp_ratemask` (0x1818 by default: 3, 4, 11, 12) is never
  limited; REJECT's answers are all type 3.
- icmp_global_allow: one bucket per namespace. While its credit is above 0 every error may go;
  at 0 or below it refills once `HZ / 50` jiffies have passed since its stamp, by
  `icmp_msgs_per_sec * delta / HZ` (delta capped at HZ), up to `icmp_msgs_burst`.
- inet_peer_xrlim_allow: one bucket per peer (the error's destination) of `icmp_ratelimit`
  jiffies a message: tokens grow by one a jiffy up to 6 messages' worth (XRLIM_BURST_FACTOR),
  and a new peer starts full. Skipped where the error's route is loopback: an OUTPUT REJECT's
  answer to a local socket.
- icmp_global_consume: each error sent takes 0, 1 or 2 credits at random (so the global
  bucket lets about 50 through at once). The reference takes a fixed `draw` instead, and the
  programs under a test run are given the same (codegen.reject.limits).

The kernel's own ICMP errors (a UDP port nobody listens on) share these buckets in netfilter;
the programs' answers keep buckets of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ICMP_DEST_UNREACH = 3
XRLIM_BURST_FACTOR = 6
NEW_PEER_AGE_SECONDS = 60  # inet_getpeer: rate_last = jiffies - 60 * HZ, a full bucket
U32 = 0xFFFF_FFFF
DRAW = 1  # the global credits an error takes in the reference (the kernel's mean)


@dataclass(frozen=True, slots=True)
class IcmpSysctls:
    """The namespace's net.ipv4.icmp_* settings the limits read (the kernel's defaults)."""

    ratelimit_ms: int = 1000
    ratemask: int = 0x1818
    msgs_per_sec: int = 1000
    msgs_burst: int = 50

    def ratelimit_jiffies(self, hz: int) -> int:
        """icmp_ratelimit as the kernel holds it (proc_dointvec_ms_jiffies: rounded up)."""
        return -(-self.ratelimit_ms * hz // 1000)

    def limits_unreachable(self) -> bool:
        return bool(self.ratemask >> ICMP_DEST_UNREACH & 1)


@dataclass(slots=True)
class IcmpRateLimiter:
    """One namespace's buckets. `allows` is __icmp_send's decision for a destination
    unreachable to `peer` at `now` (jiffies)."""

    hz: int
    sysctls: IcmpSysctls = IcmpSysctls()
    draw: int = DRAW  # the global credits each error sent takes
    credit: int = 0
    stamp: int | None = None  # None: never refilled (the kernel's 0, long before any jiffies)
    peers: dict[int, list[int]] = field(default_factory=dict)  # peer -> [tokens, last]

    def allows(self, peer: int, now: int, *, local: bool) -> bool:
        if not self.sysctls.limits_unreachable():
            return True
        if not self._global_allows(now):
            return False
        if not local and not self._peer_allows(peer, now):
            return False
        self.credit -= self.draw
        return True

    def _global_allows(self, now: int) -> bool:
        if self.credit > 0:
            return True
        delta = self.hz if self.stamp is None else min((now - self.stamp) & U32, self.hz)
        if delta < self.hz // 50:
            return False
        increase = self.sysctls.msgs_per_sec * delta // self.hz
        if not increase:
            return False
        self.stamp = now & U32
        self.credit = min(self.credit + increase, self.sysctls.msgs_burst)
        return True

    def _peer_allows(self, peer: int, now: int) -> bool:
        timeout = self.sysctls.ratelimit_jiffies(self.hz)
        bucket = self.peers.setdefault(peer, [0, now - NEW_PEER_AGE_SECONDS * self.hz])
        tokens, last = bucket
        if now != last:
            bucket[1] = now
            tokens = min(tokens + now - last, XRLIM_BURST_FACTOR * timeout)
        allowed = tokens >= timeout
        bucket[0] = tokens - timeout if allowed else tokens
        return allowed
