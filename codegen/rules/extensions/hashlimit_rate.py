"""`-m hashlimit --hashlimit-rate-match` (XT_HASHLIMIT_RATE_MATCH, revision 3): instead of a
token bucket, a key counts its packets (a byte rate: their bytes) in windows of
`--hashlimit-rate-interval` seconds, and matches while the window before was not over the rate
and the count stays within the burst.

Text, as iptables-legacy 1.8.9's libxt_hashlimit takes it (tried in a namespace):
`--hashlimit-rate-match` takes no value; `--hashlimit-rate-interval N` is atoi's N (blanks and a
sign first, then digits, anything after them ignored, the long cut to an int), refused unless
it is above 0 (`0x10` is 0). With --hashlimit-rate-match a packet rate's period is divided by
its unit's seconds (`3/min` is stored as the period of 3/sec) and the interval defaults to
that unit's seconds (1 for a byte rate). An interval given without --hashlimit-rate-match is
stored and means nothing; save does not print it. Save prints `--hashlimit-rate-match` after
the masks, then `--hashlimit-rate-interval N` unless N is 1; `-L` prints a packet rate's
period times the interval (any interval, rate matching or not: `3/min` lists as `4320/day`)
and ` rate-match rate-interval N` likewise.

Meaning (xt_hashlimit.c's rateinfo_init, rateinfo_recalc and hashlimit_mt_common): a key's
entry starts a window at its first packet, with `rate` = SCALE / avg (a byte rate:
cost_to_bytes(avg), bytes a second) and `burst` = the burst + rate (a byte rate: the burst's
refills times rate, or rate without a burst). Every packet adds its cost (1, or its IP
datagram's length) to the window's count and matches if the window before was not over and
the count is at most `burst`. A packet `interval * HZ` jiffies (a u32 product) or more after
the window started starts a new one, counted from 0, and the window that ended was over when
`count * interval * HZ > jiffies since it started * rate` (u64 products). The kernel refuses an
avg of 0 or above UINT32_MAX (ERANGE) and an interval of 0 (EINVAL), and skips the credit
checks of the other hashlimit matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from codegen.rules.extensions.hashlimit_bytes import cost_to_bytes
from codegen.rules.syntax import strtol_clamped


class Hashlimit(Protocol):
    """What rate matching reads of a hashlimit match (codegen.rules.extensions.
    hashlimit_table's model, which imports this module)."""

    @property
    def avg(self) -> int: ...
    @property
    def burst(self) -> int: ...
    @property
    def bytes(self) -> bool: ...
    @property
    def rate_match(self) -> bool: ...
    @property
    def interval(self) -> int: ...


SCALE = 1_000_000  # XT_HASHLIMIT_SCALE_v2
UINT32 = 0xFFFF_FFFF
UINT64 = (1 << 64) - 1


def parse_interval(text: str) -> int | None:
    """parse_interval: atoi(text) (glibc: strtol cut to an int), None unless above 0."""
    value = strtol_clamped(text) & UINT32
    value = value - (1 << 32) if value >> 31 else value
    return value if value > 0 else None


def stored(avg: int, unit_seconds: int, interval: int, byte_rate: bool) -> tuple[int, int]:
    """hashlimit_mt_check's rate matching: the avg and interval the blob holds, from the
    parsed avg, its unit's seconds and the interval given (0: none)."""
    if not byte_rate:
        avg //= unit_seconds
    if interval == 0:
        interval = 1 if byte_rate else unit_seconds
    return avg, interval


def refusal(match: Hashlimit) -> str | None:
    """What hashlimit_mt_check_common refuses of a rate-matching hashlimit."""
    if match.avg == 0 or match.avg > UINT32:
        return (
            f"hashlimit: the kernel refuses --hashlimit-rate-match with a period of {match.avg}"
            " (1 to 4294967295: Numerical result out of range); a packet rate of more than"
            " 1000000 per unit leaves none"
        )
    if match.interval == 0:
        return "hashlimit: the kernel refuses a rate-match interval of 0 (Invalid argument)"
    return None


def save_words(match: Hashlimit, prefix: str) -> list[str]:
    """What save (`prefix` "--hashlimit-") or -L ("") prints last for rate matching."""
    if not match.rate_match:
        return []
    words = [f"{prefix}rate-match"]
    if match.interval != 1:
        words += [f"{prefix}rate-interval", str(match.interval)]
    return words


def window_rate(match: Hashlimit) -> int:
    """rateinfo.rate: packets (or bytes) a window may average per second."""
    if match.bytes:
        return cost_to_bytes(match.avg & UINT32)
    return SCALE // match.avg


def window_burst(match: Hashlimit) -> int:
    """rateinfo.burst: the most a window counts and still matches (u64 as compared)."""
    rate = window_rate(match)
    if match.bytes:
        return (match.burst * rate if match.burst else rate) & UINT64
    return (match.burst + rate) & UINT64


def interval_jiffies(match: Hashlimit, hz: int) -> int:
    """`rateinfo.interval * HZ`, multiplied as the kernel's u32 and int do."""
    return match.interval * hz & UINT32


@dataclass
class Window:
    """One key's window: the jiffy it started at, its count, and whether the one before was
    over the rate."""

    start: int
    count: int = 0
    over: bool = False

    def take(self, now: int, cost: int, match: Hashlimit, hz: int) -> bool:
        """rateinfo_recalc then the rate match for a packet of `cost` at jiffy `now`: whether
        it is under the limit (the caller inverts for --hashlimit-above)."""
        elapsed = now - self.start
        length = interval_jiffies(match, hz)
        if elapsed and elapsed >= length:
            rate = window_rate(match)
            self.over = (self.count * length & UINT64) > (elapsed * rate & UINT64)
            self.start, self.count = now, 0
        self.count = (self.count + cost) & UINT64
        return not self.over and self.count <= window_burst(match)
