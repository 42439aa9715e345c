"""`-m hashlimit`'s model and meaning (codegen.rules.extensions.hashlimit has its text and blob;
a byte rate's arithmetic is codegen.rules.extensions.hashlimit_bytes').

Meaning (xt_hashlimit's hashlimit_mt_common, packet mode): the tables are the kernel's, by
name: every hashlimit match of one name shares one table (validation refuses two that differ
in anything but upto/above, whose table settings netfilter would take from one of them). A key
met for the first time gets a full bucket (rateinfo_init: credit = credit_cap = user2credits(
avg * burst), cost = user2credits(avg), with revision 3's 64-bit credits: CPJ =
POW2_BELOW64(2^64 / (HZ * 86400)), 2^39 at HZ 250); each packet adds `(jiffies - prev) * CPJ`
(wrapping in 64 bits), caps, and matches if credit >= cost, taking cost (--hashlimit-above
answers the opposite; rate matching counts windows instead: codegen.rules.extensions.
hashlimit_rate). An entry idle for htable-expire ms is gone (the kernel's gc removes it
at its next run, up to gcinterval later: this model removes it at once) and the key starts
again full; a new key when htable-max entries live is dropped (hotdrop), as is a packet whose
ports the mode needs but which is too short to hold them. The ports are the two 16-bit words
proto_ports_offset says (AH: its SPI), read at the transport offset of any fragment, as the
kernel reads them. The tables live in the reference's MatchMemory (one per table load, in its
`shared`): a table netfilter keeps across a reload is the caller's to carry over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache

from codegen.rules.extensions import hashlimit_bytes as byte_arithmetic
from codegen.rules.extensions.hashlimit_bytes import print_bytes
from codegen.rules.extensions.hashlimit_rate import Window
from codegen.rules.extensions.hashlimit_rate import refusal as rate_refusal
from codegen.rules.extensions.limit import KERNEL_HZ
from codegen.rules.model import ExtensionMatch, Ruleset, check_uint
from codegen.rules.packet import HotDrop, Packet

SCALE = 1_000_000  # XT_HASHLIMIT_SCALE_v2: avg is the period in microseconds
DEFAULT_BURST = 5
BURST_MAX = 1_000_000
DEFAULT_GC_INTERVAL = 1000  # ms
DEFAULT_MASK = 32
NAME_MAX = 255
UINT32 = 0xFFFF_FFFF
UINT64 = (1 << 64) - 1

# hashlimit_cfg3.mode bits (enum in linux/netfilter/xt_hashlimit.h)
HASH_DIP, HASH_DPT, HASH_SIP, HASH_SPT = 1, 2, 4, 8
INVERT, BYTES, RATE_MATCH = 0x10, 0x20, 0x40
MODE_BITS = HASH_DIP | HASH_DPT | HASH_SIP | HASH_SPT
_MODE_NAMES = {"dstip": HASH_DIP, "srcip": HASH_SIP, "srcport": HASH_SPT, "dstport": HASH_DPT}
# print_mode's order
_MODE_ORDER = (
    ("srcip", HASH_SIP),
    ("srcport", HASH_SPT),
    ("dstip", HASH_DIP),
    ("dstport", HASH_DPT),
)
_PRINTED = (("day", SCALE * 86400), ("hour", SCALE * 3600), ("min", SCALE * 60), ("sec", SCALE))

# proto_ports_offset: where a protocol's two 16-bit "ports" are in its header (AH: its SPI).
PORT_OFFSETS = {6: 0, 17: 0, 33: 0, 50: 0, 132: 0, 136: 0, 51: 4}


@dataclass(frozen=True, slots=True)
class Hashlimit(ExtensionMatch):
    """`-m hashlimit`: at most one packet per `avg` (microseconds) per key on average, `burst`
    at once; `above` inverts. `mode` holds the HASH_* bits; `expire` and `gc_interval` are in
    ms; `size` and `max` 0 mean the kernel's defaults."""

    name: str
    avg: int
    burst: int = DEFAULT_BURST
    above: bool = False
    mode: int = 0
    srcmask: int = DEFAULT_MASK
    dstmask: int = DEFAULT_MASK
    size: int = 0
    max: int = 0
    gc_interval: int = DEFAULT_GC_INTERVAL
    expire: int = 1000
    # A byte rate (XT_HASHLIMIT_BYTES, codegen.rules.extensions.hashlimit_bytes): `avg` is
    # then the cost of a byte rate, `burst` the refills a key's bucket may take.
    bytes: bool = False
    # Rate matching (XT_HASHLIMIT_RATE_MATCH, codegen.rules.extensions.hashlimit_rate): windows
    # of `interval` seconds (the blob's, stored and ignored without rate matching).
    rate_match: bool = False
    interval: int = 0

    def __post_init__(self) -> None:
        check_uint(self.avg, 64, "hashlimit avg")
        check_uint(self.burst, 64, "hashlimit burst")
        check_uint(self.mode, 4, "hashlimit mode")
        for name in ("srcmask", "dstmask"):
            check_uint(getattr(self, name), 8, f"hashlimit {name}")
        for name in ("size", "max", "gc_interval", "expire", "interval"):
            check_uint(getattr(self, name), 32, f"hashlimit {name}")
        if not isinstance(self.name, str) or not 0 < len(self.name.encode()) < NAME_MAX:
            raise ValueError(f"hashlimit name must be 1 to {NAME_MAX - 1} bytes: {self.name!r}")

    @property
    def rate(self) -> str:
        if self.bytes:
            return print_bytes(self.avg, 0, "")[0][0]
        return print_rate(self.avg)[0]

    @property
    def table(self) -> tuple:
        """What the kernel's table of this name takes from the match that made it."""
        return (
            self.avg,
            self.burst,
            self.mode,
            self.srcmask,
            self.dstmask,
            self.size,
            self.max,
            self.gc_interval,
            self.expire,
            self.bytes,
            self.rate_match,
            self.interval,
        )


def print_rate(avg: int) -> tuple[str, int]:
    """print_rate: `N/unit` in the coarsest unit that does not round N more than the next
    finer one, and that unit in ms (the `quantum` save compares expire with)."""
    if avg == 0:
        return "inf", 0
    index = 1
    while index < len(_PRINTED):
        period = _PRINTED[index][1]
        if avg > period or period // avg < period % avg:
            break
        index += 1
    name, period = _PRINTED[index - 1]
    return f"{period // avg}/{name}", period // SCALE * 1000


def name_refusal(name: str) -> str | None:
    """Why libxtables or the kernel (xt_check_proc_name) refuses a table name; None if not.
    A blank or quote is refused too: iptables-save prints the name bare, so a name holding
    one would not read back."""
    if not name:
        return "Argument must have a minimum length of 1 characters"
    if len(name.encode()) >= NAME_MAX:
        return (
            f"--hashlimit-name is longer than {NAME_MAX - 1} bytes (iptables-legacy would cut"
            " it short silently)"
        )
    if name in (".", "..") or "/" in name:
        return (
            f"the kernel refuses --hashlimit-name '{name}' (a file name in /proc: Invalid argument)"
        )
    if any(c.isspace() or c in "\"'\\" for c in name) or not name.isprintable():
        return (
            f"--hashlimit-name {name!r} holds a blank, quote or control character, which"
            " iptables-save would print bare"
        )
    return None


# ---------------------------------------------------------------------------------------------
# xt_hashlimit's arithmetic (revision 3, packet mode)


def _pow2_below64(value: int) -> int:
    for shift in (1, 2, 4, 8, 16, 32):
        value |= value >> shift
    return (value >> 1) + 1


def credits_per_jiffy(hz: int) -> int:
    """CREDITS_PER_JIFFY of revisions 2 and 3: POW2_BELOW64(2^64-1 / (HZ * 86400))."""
    return _pow2_below64(UINT64 // (hz * 86400))


def user2credits(user: int, hz: int) -> int:
    """user2credits (revision 3): `user * (HZ * CPJ / SCALE)` in u64, the constant divided
    first (or the other way round when HZ * CPJ < SCALE, which no HZ gives)."""
    per_second = hz * credits_per_jiffy(hz)
    if SCALE >= per_second:
        return (user & UINT64) // (SCALE // per_second)
    return ((user & UINT64) * (per_second // SCALE)) & UINT64


def cost(match: Hashlimit, hz: int) -> int:
    return user2credits(match.avg, hz)


def credit_cap(match: Hashlimit, hz: int) -> int:
    return user2credits((match.avg * match.burst) & UINT64, hz)


def kernel_refusal(match: Hashlimit) -> str | None:
    """What hashlimit_mt_check_common refuses (at some HZ); None if every kernel takes it."""
    if match.gc_interval == 0 or match.expire == 0:
        return (
            "hashlimit: the kernel refuses an htable gcinterval or expire of 0 (Invalid argument)"
        )
    if match.srcmask > 32 or match.dstmask > 32:
        return "hashlimit: the kernel refuses a mask of more than 32 bits (Invalid argument)"
    if match.rate_match:  # no credits to overflow (libxt_hashlimit still bounds the burst)
        problem = rate_refusal(match)
        if problem is None and not match.bytes and match.burst > BURST_MAX:
            problem = _burst_refusal()
        return problem or name_refusal(match.name)
    if match.bytes:
        return _byte_refusal(match) or name_refusal(match.name)
    if match.burst > BURST_MAX:
        return _burst_refusal()
    refusing = [
        hz for hz in KERNEL_HZ if match.burst == 0 or credit_cap(match, hz) < cost(match, hz)
    ]
    if refusing:
        at = ", ".join(str(hz) for hz in refusing)
        return (
            f"hashlimit: {match.rate} with burst {match.burst} overflows xt_hashlimit's "
            f"credits: the kernel refuses it at HZ {at} (Numerical result out of range)"
        )
    return name_refusal(match.name)


def _burst_refusal() -> str:
    return f'hashlimit: bad value for option "--hashlimit-burst", or out of range (1-{BURST_MAX})'


def _byte_refusal(match: Hashlimit) -> str | None:
    """hashlimit_mt_check_common in byte mode: a cost whose chunk is worth no credit."""
    refusing = [hz for hz in KERNEL_HZ if byte_arithmetic.chunk_cost(match.avg, hz) == 0]
    if refusing:
        at = ", ".join(str(hz) for hz in refusing)
        return (
            f"hashlimit: the kernel refuses a byte rate of {match.rate} at HZ {at} (overflow,"
            " rate too high: Invalid argument)"
        )
    if match.burst > UINT32:
        return f"hashlimit: a byte rate's burst of {match.burst} refills is more than a u32"
    return None


def msecs_to_jiffies(msecs: int, hz: int) -> int:
    """The kernel's msecs_to_jiffies for an HZ that divides 1000 (rounding up), or the
    general rounding up of msecs * HZ / 1000."""
    if 1000 % hz == 0:
        step = 1000 // hz
        return (msecs + step - 1) // step
    return (msecs * hz + 999) // 1000


@cache
def _total_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def table_size(match: Hashlimit, ram: int | None = None) -> int:
    """htable_create's bucket count: the size given, else one per 16 KiB of memory per
    8-byte list head, 8192 above 1 GiB, at least 16."""
    if match.size:
        return match.size
    ram = _total_ram() if ram is None else ram
    if ram > 1 << 30:
        return 8192
    return max(16, ram // 16384 // 8)


def table_max(match: Hashlimit, ram: int | None = None) -> int:
    """The most entries a table holds: 8 * size if max is 0, never fewer than size."""
    size = table_size(match, ram)
    if match.max == 0:
        return 8 * size
    return max(match.max, size)


@dataclass
class Entry:
    """One key's dsthash_ent: rateinfo (prev in jiffies, 64-bit credit) and when it was last
    seen (its expiry is that plus htable-expire)."""

    prev: int
    credit: int
    seen: int
    bucket: byte_arithmetic.Bucket | None = None  # byte mode's credit and refills
    window: Window | None = None  # rate matching's window


@dataclass
class Table:
    """One named table (xt_hashlimit_htable): its settings, from the first match of the name
    met, and its entries by key."""

    match: Hashlimit
    hz: int
    entries: dict[tuple[int, int, int, int], Entry] = field(default_factory=dict)

    def take(self, key: tuple[int, int, int, int], now: int, length: int) -> bool:
        """hashlimit_mt_common for a packet of `key` (an IP datagram of `length` bytes) at
        jiffies `now`: whether it is under the limit (the caller inverts for
        --hashlimit-above); HotDrop when the table is full."""
        match, hz = self.match, self.hz
        expire = msecs_to_jiffies(match.expire, hz)
        for old in [k for k, e in self.entries.items() if now - e.seen >= expire]:
            del self.entries[old]
        entry = self.entries.get(key)
        cap = 0 if match.bytes else credit_cap(match, hz)
        if entry is None:
            if len(self.entries) >= table_max(match):
                raise HotDrop
            entry = self.entries[key] = Entry(now, cap, now)
            if match.rate_match:
                entry.window = Window(now)
            elif match.bytes:
                entry.bucket = byte_arithmetic.Bucket.new(match.burst, hz)
        elif now < entry.prev:
            raise ValueError(f"the clock went back from jiffy {entry.prev} to {now}")
        elif entry.window is not None:
            entry.prev = now
        elif entry.bucket is not None:
            entry.bucket.refill(now - entry.prev, hz)
            entry.prev = now
        elif now != entry.prev:
            credit = (entry.credit + (now - entry.prev) * credits_per_jiffy(hz)) & UINT64
            entry.credit, entry.prev = min(credit, cap), now
        entry.seen = now
        if entry.window is not None:
            return entry.window.take(now, length if match.bytes else 1, match, hz)
        if entry.bucket is not None:
            return entry.bucket.take(length, match.avg, hz)
        price = cost(match, hz)
        if entry.credit >= price:
            entry.credit -= price
            return True
        return False


def _mask(address: int, length: int) -> int:
    return (UINT32 << (32 - length)) & UINT32 & address if length else 0


def packet_key(match: Hashlimit, packet: Packet) -> tuple[int, int, int, int]:
    """hashlimit_init_dst: the masked addresses and the ports the mode names (0 for the
    rest; a protocol without ports has ports 0); HotDrop if the ports are not all there."""
    mode = match.mode
    source = _mask(packet.saddr, match.srcmask) if mode & HASH_SIP else 0
    destination = _mask(packet.daddr, match.dstmask) if mode & HASH_DIP else 0
    sport = dport = 0
    if mode & (HASH_SPT | HASH_DPT):
        offset = PORT_OFFSETS.get(packet.protocol)
        if offset is not None:
            start = packet.transport + offset
            ports = packet.data[start : start + 4]
            if len(ports) < 4:
                raise HotDrop
            if mode & HASH_SPT:
                sport = int.from_bytes(ports[:2], "big")
            if mode & HASH_DPT:
                dport = int.from_bytes(ports[2:], "big")
    return source, destination, sport, dport


def hashlimit_names(ruleset: Ruleset) -> list[str]:
    """The table names of `ruleset`'s hashlimit matches, in rule-set order."""
    return list(dict.fromkeys(match.name for *_, match in ruleset.matches_of(Hashlimit)))


def tables(ruleset: Ruleset) -> dict[str, Hashlimit]:
    """Each table name's settings (the first match of the name), in rule-set order."""
    found: dict[str, Hashlimit] = {}
    for *_, match in ruleset.matches_of(Hashlimit):
        found.setdefault(match.name, match)
    return found
