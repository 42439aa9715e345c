"""`-m limit [--limit RATE] [--limit-burst N]` (libxt_limit.c, xt_limit.c): a token bucket per
rule, shared by every packet the rule sees.

Text, as iptables-legacy 1.8.9 takes it (tried in a namespace): RATE is `N[/UNIT]`, UNIT any
prefix, in any case, of `second`, `minute`, `hour` or `day` (`s`, `Mi`, `H`, `day`; seconds if
no `/`); N as atoi reads it (leading blanks, a sign, digits, the rest ignored: `10abc/sec` is
10/sec, `0x10` is 0, a number past 32 bits wraps). iptables stores the period,
`avg = 10000 * seconds_per_unit / N` (XT_LIMIT_SCALE), and refuses N = 0 ("bad rate") and a
period that rounds to 0 ("Rate too fast": more than 10000/sec). `--limit-burst` is 0 to 10000
(base 0: `0x10`, `010`); the defaults are 3/hour and 5; neither option can be negated or given
twice. Save prints `--limit` as print_rate does (the coarsest unit that says the rate without
rounding more than it must) and `--limit-burst` only when not 5; `-L` prints
`limit: avg 10/sec burst 5`.

The kernel (limit_mt_check) refuses a burst of 0 and an `avg * burst` that overflows its
credits (ERANGE, "Numerical result out of range"): `user2credits(avg * burst) <
user2credits(avg)` in u32 arithmetic, which depends on the kernel's HZ (2/day with burst 10000
is taken at HZ 250 and 1000, refused at HZ 100 and 300; 1/day with burst 5 is refused at every
HZ). The rule layer refuses what any of the kernel's HZ values (100, 250, 300, 1000) refuses,
so that a rule set it takes loads on every kernel: of 61,166 sampled (rate, burst) pairs, 13
are refused at one HZ and taken at another.

Blob: revision 0, `struct xt_rateinfo` (avg, burst, then the kernel's own prev, credit,
credit_cap, cost and master pointer: 40 bytes on x86_64). iptables-legacy sends zeros past
burst; limit_mt_check fills cost and credit_cap in its copy when cost is 0, but the match's
usersize (offsetof(prev)) makes IPT_SO_GET_ENTRIES return zeros there, so a table read back
from the kernel has avg and burst only, and decode reads nothing else.

Meaning (xt_limit's arithmetic, HZ given): credits per jiffy `CPJ = POW2_BELOW32(0xFFFFFFFF /
(HZ * 86400))` (128 at HZ 250, 32 at HZ 1000); `cost = user2credits(avg)`,
`credit_cap = user2credits(avg * burst)`; the bucket starts full at the table load; each packet
adds `(jiffies - prev) * CPJ` to a u32 credit (wrapping, as the kernel's does after about
1.55 idle days at HZ 250), caps it, and matches if `credit >= cost`, taking `cost` away.
`Bucket` is that arithmetic; the reference evaluator keeps one per limit match (codegen.rules.
reference). `matches`, the stateless question, answers for a fresh full bucket: the first
packet after a load always matches.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension, Memory
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import (
    Line,
    OptionContext,
    ParseError,
    SingleMatchParser,
    Token,
    strtol_clamped,
    strtoui,
)

SCALE = 10000  # XT_LIMIT_SCALE: avg is the period in 1/10000 s
DEFAULT_AVG = SCALE * 3600 // 3  # 3/hour
DEFAULT_BURST = 5
BURST_MAX = 10000
UINT32 = 0xFFFF_FFFF
# The HZ values a kernel can be built with (CONFIG_HZ_100 ... CONFIG_HZ_1000).
KERNEL_HZ = (100, 250, 300, 1000)
_UNITS = (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400))
# print_rate's table: the unit names it prints and the period of one per unit.
_PRINTED = (("day", SCALE * 86400), ("hour", SCALE * 3600), ("min", SCALE * 60), ("sec", SCALE))


@dataclass(frozen=True, slots=True)
class Limit(ExtensionMatch):
    """`-m limit`: at most one packet per `avg` (in 1/10000 s, as iptables stores the rate)
    on average, `burst` at once."""

    avg: int = DEFAULT_AVG
    burst: int = DEFAULT_BURST

    def __post_init__(self) -> None:
        check_uint(self.avg, 32, "limit avg")
        check_uint(self.burst, 32, "limit burst")

    @property
    def rate(self) -> str:
        """The rate as iptables prints it (`10/sec`)."""
        return print_rate(self.avg)


class XtRateinfo(ctypes.Structure):
    _fields_ = [
        ("avg", ctypes.c_uint32),
        ("burst", ctypes.c_uint32),
        ("prev", ctypes.c_ulong),
        ("credit", ctypes.c_uint32),
        ("credit_cap", ctypes.c_uint32),
        ("cost", ctypes.c_uint32),
        ("master", ctypes.c_void_p),
    ]


# ---------------------------------------------------------------------------------------------
# Text


def _atoi(text: str) -> int:
    """glibc's atoi as an unsigned 32-bit value: (int)strtol(text, NULL, 10), cut to its low
    32 bits."""
    return strtol_clamped(text) & UINT32


def rate_and_unit(text: str, read_number: Callable[[str], int]) -> tuple[int, int] | None:
    """`N[/UNIT]` as libxt_limit and libxt_hashlimit read it: the count (`read_number`, their
    atoi or atoll) and the unit's seconds (UNIT any prefix of second, minute, hour or day, in
    any case; none: a second); None for an unknown unit or a count of 0."""
    number, slash, unit = text.partition("/")
    multiplier = 1
    if slash:
        folded = unit.translate(_ASCII_LOWER)
        found = [m for name, m in _UNITS if unit and name.startswith(folded)]
        if not found:
            return None
        multiplier = found[0]
    rate = read_number(number)
    return None if rate == 0 else (rate, multiplier)


def parse_rate(text: str) -> int | str:
    """libxt_limit's parse_rate: the period (avg) of `text`, or why iptables refuses it
    ("bad rate", "Rate too fast")."""
    parsed = rate_and_unit(text, _atoi)
    if parsed is None:
        return f'bad rate "{text}"'
    rate, multiplier = parsed
    avg = SCALE * multiplier // rate
    if avg == 0:
        return f'Rate too fast "{text}"'
    return avg


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def print_rate(avg: int) -> str:
    """libxt_limit's print_rate: `N/unit` in the coarsest unit for which N is not rounded more
    than in the next finer one; `inf` for a period of 0 (which iptables cannot write)."""
    if avg == 0:
        return "inf"
    index = 1
    while index < len(_PRINTED):
        period = _PRINTED[index][1]
        if avg > period or period // avg < period % avg:
            break
        index += 1
    name, period = _PRINTED[index - 1]
    return f"{period // avg}/{name}"


class LimitParser(SingleMatchParser):
    name = "limit"
    options = {"limit": ("limit", True), "limit-burst": ("burst", True)}
    invertible = frozenset()

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.avg = DEFAULT_AVG
        self.burst = DEFAULT_BURST
        self.burst_token: Token | None = None

    def option(self, key: str, ctx: OptionContext) -> None:
        if ctx.negated:
            raise ctx.error(f'limit: option "{ctx.option.text}" cannot be inverted')
        super().option(key, ctx)

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error(f'limit: option "{ctx.option.text}" can only be used once')
        assert ctx.value is not None
        text = ctx.value.text
        if key == "limit":
            avg = parse_rate(text)
            if isinstance(avg, str):
                raise ctx.error(f"limit: {avg} (N/sec, /minute, /hour or /day)", at_value=True)
            self.avg = avg
        else:
            burst = strtoui(text, BURST_MAX)
            if burst is None:
                raise ctx.error(
                    f'limit: bad value for option "{ctx.option.text}", or out of range '
                    f"(0-{BURST_MAX})",
                    at_value=True,
                )
            self.burst = burst
            self.burst_token = ctx.value

    def finish(self, line: Line) -> Limit:
        match = Limit(self.avg, self.burst)
        problem = kernel_refusal(match)
        if problem is not None:
            token = self.burst_token or self.token
            raise ParseError(problem, line.source(token.column))
        return match


# ---------------------------------------------------------------------------------------------
# xt_limit's arithmetic


def _pow2_below32(value: int) -> int:
    for shift in (1, 2, 4, 8, 16):
        value |= value >> shift
    return (value >> 1) + 1


def credits_per_jiffy(hz: int) -> int:
    """CREDITS_PER_JIFFY: the largest power of two whose day of jiffies fits in 32 bits."""
    return _pow2_below32(UINT32 // (hz * 86400))


def user2credits(user: int, hz: int) -> int:
    """xt_limit's user2credits: a period in 1/10000 s as credits, dividing first when the
    product would overflow 32 bits (u32 arithmetic throughout)."""
    user &= UINT32
    per_second = hz * credits_per_jiffy(hz)
    if user > UINT32 // per_second:
        return ((user // SCALE) * per_second) & UINT32
    return ((user * per_second) & UINT32) // SCALE


def cost(match: Limit, hz: int) -> int:
    return user2credits(match.avg, hz)


def credit_cap(match: Limit, hz: int) -> int:
    return user2credits(match.avg * match.burst, hz)


def refused_at(match: Limit, hz: int) -> bool:
    """Whether limit_mt_check refuses the match (ERANGE) on a kernel of this HZ."""
    return match.burst == 0 or credit_cap(match, hz) < cost(match, hz)


def kernel_refusal(match: Limit) -> str | None:
    """Why the kernel refuses `match` (at some HZ), None if every kernel takes it."""
    if match.burst == 0:
        return "limit: the kernel refuses --limit-burst 0 (Numerical result out of range)"
    refusing = [hz for hz in KERNEL_HZ if refused_at(match, hz)]
    if refusing:
        at = ", ".join(str(hz) for hz in refusing)
        return (
            f"limit: --limit {match.rate} --limit-burst {match.burst} overflows xt_limit's "
            f"credits: the kernel refuses it at HZ {at} (Numerical result out of range)"
        )
    return None


def seconds_to_jiffies(seconds: float, hz: int) -> int:
    """A time in seconds on some clock as jiffies on it (whole ticks elapsed): the one
    conversion the reference and the test runs share."""
    return math.floor(round(seconds * hz, 6))


@dataclass
class Bucket:
    """One limit match's state: xt_limit_priv (`prev` in jiffies, a u32 `credit`), full when
    made. `take` is limit_mt for a packet at jiffies `now`."""

    cost: int
    cap: int
    prev: int
    credit: int

    @classmethod
    def full(cls, match: Limit, hz: int, now: int) -> Bucket:
        cap = credit_cap(match, hz)
        return cls(cost(match, hz), cap, now, cap)

    def take(self, now: int, hz: int) -> bool:
        if now < self.prev:
            raise ValueError(f"the clock went back from jiffy {self.prev} to {now}")
        credit = (self.credit + (now - self.prev) * credits_per_jiffy(hz)) & UINT32
        self.prev = now
        credit = min(credit, self.cap)
        matched = credit >= self.cost
        self.credit = credit - self.cost if matched else credit
        return matched


class LimitExtension(MatchExtension):
    name = "limit"
    revision = 0
    model = Limit
    data = XtRateinfo
    parser = LimitParser
    stateful = True
    examples = (
        "-m limit --limit 3/hour",
        "-m limit --limit 10/sec",
        "-m limit --limit 3/min --limit-burst 10",
        "-m limit --limit 25/sec --limit-burst 50",
        "-m limit --limit 1/day --limit-burst 1",
        "-m limit --limit 10000/sec --limit-burst 10000",
    )

    def save(self, match: Limit) -> list[str]:
        burst = [] if match.burst == DEFAULT_BURST else ["--limit-burst", str(match.burst)]
        return ["-m", "limit", "--limit", match.rate, *burst]

    def describe(self, match: Limit) -> str:
        return f" limit: avg {match.rate} burst {match.burst}"

    def as_saved(self, match: Limit) -> Limit:
        avg = parse_rate(match.rate)
        return Limit(avg if isinstance(avg, int) else match.avg, match.burst)

    def check(self, match: Limit, rule: Rule, chain: str) -> None:
        problem = kernel_refusal(match)
        if problem is not None:
            raise RuleError(problem)

    def encode(self, match: Limit) -> XtRateinfo:
        # Zeros past burst, as libxt_limit sends them: a nonzero cost would be kept as given.
        return XtRateinfo(avg=match.avg, burst=match.burst)

    def decode(self, data: XtRateinfo) -> Limit:
        if data.avg == 0:
            raise BlobError("limit match: a period of 0 (a rate iptables cannot write)")
        return Limit(data.avg, data.burst)

    def matches(self, match: Limit, packet: Packet) -> bool:
        # A fresh full bucket: the first packet after a table load. The reference evaluator
        # keeps buckets between packets instead (matches_with).
        return True

    def matches_with(self, match: Limit, packet: Packet, memory: Memory) -> bool:
        """limit_mt on the match's bucket (made full at the load, or at its first packet)."""
        now = seconds_to_jiffies(memory.time, memory.hz)
        if memory.value is None:
            loaded = memory.loaded_at
            start = now if loaded is None else seconds_to_jiffies(loaded, memory.hz)
            memory.value = Bucket.full(match, memory.hz, start)
        assert isinstance(memory.value, Bucket)
        return memory.value.take(now, memory.hz)


EXTENSION = LimitExtension()
