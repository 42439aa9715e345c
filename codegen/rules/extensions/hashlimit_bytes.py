"""`-m hashlimit`'s byte rates (XT_HASHLIMIT_BYTES): `--hashlimit-upto 512kb/s`, as
libxt_hashlimit (iptables-legacy 1.8.9, tried in a namespace) writes them and xt_hashlimit
counts them.

Text: a rate is a byte rate when `b/s` follows its first character; N as atoll reads it, times
1024 or 1024^2 when the character before `b/s` is `k` or `m`. The blob's avg is then a cost,
`UINT32_MAX / ((bytes >> 4) + 1)` (bytes_to_cost), and iptables prints it back as the byte
rate that cost stands for, `((UINT32_MAX / avg) - 1) << 4` (cost_to_bytes: 100b/s reads back
as 96b/s), in the coarsest of mb, kb and b that gives the same cost. Below 16 bytes a second
that rate is 0 (iptables-save prints `0b/s`, which does not read back, and iptables divides by
it, and dies, when a burst is given too): refused here. `--hashlimit-burst` is then a byte
count (`k` and `m` after the number multiply; a bare number still at most 1000000) of at
least one second's rate, kept as how many times a second's worth the bucket may be refilled:
`burst / rate`, rounded up (0 without a burst). The default htable-expire is 15 s, 60 s with
a burst.

Meaning (rateinfo_init, rateinfo_recalc, hashlimit_byte_cost): a new entry holds a second's
credits, `CPJB * HZ` (CPJB = POW2_BELOW32(UINT32_MAX / HZ)), and `burst` refills; every jiffy
since its last packet adds CPJB, up to a second's worth. A packet costs `((len >> 4) + 1) *
user2credits_byte(avg)` (16-byte chunks; at most a second's worth), where `len` is the IP
datagram's length; when the credit is short and a refill is left, the credit is made full
again at the refill's expense. It matches (under the limit) when the credit covers the cost,
which it then takes.
"""

from __future__ import annotations

from dataclasses import dataclass

UINT32 = 0xFFFF_FFFF
UINT64 = (1 << 64) - 1
BYTE_SHIFT = 4  # XT_HASHLIMIT_BYTE_SHIFT: 16-byte chunks
EXPIRE_S, EXPIRE_BURST_S = 15, 60  # XT_HASHLIMIT_BYTE_EXPIRE and _EXPIRE_BURST
_FACTORS = {"m": 1024 * 1024, "k": 1024}
_UNITS = (("m", 1024 * 1024), ("k", 1024), ("", 1))


def is_byte_rate(text: str) -> bool:
    """parse_bytes' test: `b/s` somewhere after the first character."""
    return text.find("b/s") > 0


def bytes_to_cost(count: int) -> int:
    """libxt_hashlimit's bytes_to_cost (`count` >> 4 taken as a u32, which must not be
    UINT32_MAX: iptables would divide by zero)."""
    return UINT32 // (((count & UINT64) >> BYTE_SHIFT & UINT32) + 1)


def cost_to_bytes(cost: int) -> int:
    """libxt_hashlimit's cost_to_bytes: the byte rate a cost stands for."""
    per = UINT32 // cost if cost else UINT32
    return ((per - 1) << BYTE_SHIFT) & UINT64


def parse_bytes(text: str, atoll: object) -> int | str | None:
    """parse_bytes: the cost of a byte rate, why it is refused, or None when `text` is not
    one (no `b/s` after its first character, or a number 0: it is then read as a packet
    rate, which refuses it)."""
    found = text.find("b/s")
    if found <= 0:
        return None
    rate = atoll(text)  # type: ignore[operator]
    if rate == 0:
        return None
    count = (rate * _FACTORS.get(text[found - 1], 1)) & UINT64
    if (count >> BYTE_SHIFT & UINT32) == UINT32:
        return f'Rate too high "{text}"'
    cost = bytes_to_cost(count)
    if cost == 0:
        return f'Rate too high "{text}"'
    if cost_to_bytes(cost) == 0:
        return (
            f"a byte rate of {text} is below 16 bytes a second, which iptables lists as 0b/s"
            " (and divides by, with a burst)"
        )
    return cost


def burst_refills(burst: int, cost: int) -> int | str:
    """hashlimit_mt_check's burst in byte mode: how many seconds' worth `burst` bytes are,
    rounded up (a u32, as iptables keeps it), or why iptables refuses it."""
    unit = cost_to_bytes(cost)
    if burst < unit:
        return f"burst cannot be smaller than {unit}b"
    refills = (burst & UINT32) // unit
    if burst % unit:
        refills += 1
    return refills & UINT32


def print_bytes(cost: int, refills: int, prefix: str) -> tuple[list[str], int]:
    """print_bytes: the rate's words (and the burst's, `prefix` before `burst`), and the
    default expire (ms) save compares htable-expire with."""
    rate = cost_to_bytes(cost)
    unit, size = next(
        (name, size)
        for name, size in _UNITS
        if size == 1 or (rate >= size and bytes_to_cost(rate & ~(size - 1)) == cost)
    )
    words = [f"{rate // size}{unit}b/s"]
    if refills == 0:
        return words, EXPIRE_S * 1000
    total = (rate * refills) & UINT64
    unit, size = next((name, size) for name, size in _UNITS if size == 1 or total >= size)
    words += [f"{prefix}burst", f"{total // size}{unit}b"]
    return words, EXPIRE_BURST_S * 1000


# ---------------------------------------------------------------------------------------------
# xt_hashlimit's arithmetic in byte mode


def _pow2_below32(value: int) -> int:
    for shift in (1, 2, 4, 8, 16):
        value |= value >> shift
    return (value >> 1) + 1


def credits_per_jiffy(hz: int) -> int:
    """CREDITS_PER_JIFFY_BYTES: POW2_BELOW32(UINT32_MAX / HZ)."""
    return _pow2_below32(UINT32 // hz)


def full(hz: int) -> int:
    """A second's credits, what a new entry (or a refill) holds and the most it keeps."""
    return credits_per_jiffy(hz) * hz


def chunk_cost(cost: int, hz: int) -> int:
    """user2credits_byte: the credits of one 16-byte chunk (avg taken as a u32)."""
    return ((cost & UINT32) * hz * credits_per_jiffy(hz)) >> 32 & UINT32


def packet_cost(length: int, cost: int, hz: int) -> int:
    """hashlimit_byte_cost's price of a datagram of `length` bytes."""
    return min(((length >> BYTE_SHIFT) + 1) * chunk_cost(cost, hz), full(hz))


@dataclass
class Bucket:
    """One key's rateinfo in byte mode: its credit and the refills left."""

    credit: int
    refills: int

    @classmethod
    def new(cls, refills: int, hz: int) -> Bucket:
        return cls(full(hz), refills)

    def refill(self, jiffies: int, hz: int) -> None:
        """rateinfo_recalc for `jiffies` since the entry's last packet."""
        if jiffies:
            self.credit = min(self.credit + jiffies * credits_per_jiffy(hz), full(hz))

    def take(self, length: int, cost: int, hz: int) -> bool:
        """The packet's price taken if the credit (refilled once more if short) covers it."""
        price = packet_cost(length, cost, hz)
        if self.credit < price and self.refills:
            self.refills -= 1
            self.credit = full(hz)
        if self.credit >= price:
            self.credit -= price
            return True
        return False
