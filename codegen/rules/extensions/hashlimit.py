"""`-m hashlimit` (libxt_hashlimit.c, xt_hashlimit.c, revision 3): a token bucket per key, the
key being the packet's fields the mode names (srcip, srcport, dstip, dstport; none: one bucket
for every packet), addresses cut to --hashlimit-srcmask/--hashlimit-dstmask bits.

Text, as iptables-legacy 1.8.9 takes it (tried in a namespace): `--hashlimit-upto RATE` (or its
old name `--hashlimit`) or `--hashlimit-above RATE` (`! --hashlimit-upto` is `--hashlimit-above`
and the other way round), one of them and `--hashlimit-name` required. RATE is `N[/UNIT]`, UNIT
a prefix of second, minute, hour or day in any case (seconds without `/`), N as atoll reads it
(`5abc/s` is 5/s); iptables stores the period `avg = 1000000 * seconds_per_unit / N`
(XT_HASHLIMIT_SCALE_v2) and refuses N = 0 and a period of 0 ("Rate too fast": more than
1000000/sec). A byte rate (`512kb/s`, XT_HASHLIMIT_BYTES) is read, written and counted as
codegen.rules.extensions.hashlimit_bytes says; --hashlimit-rate-match is refused here, in one
sentence. `--hashlimit-burst` is a number in base 0 (any text after it ignored, but `k` and `m`
multiply by 1024 and 1024^2, as libxt_hashlimit's parse_burst does), 1 to 1000000 (a byte
rate's burst, a byte count, may be more when `k` or `m` follows); default 5.
`--hashlimit-mode` is names split at `,` or `|`; the masks 0-32 (the kernel refuses more,
EINVAL), default 32; `--hashlimit-htable-size/-max/-gcinterval/-expire` u32 in base 0,
defaults 0 (sized by the machine's memory), 0 (8 * size), 1000 ms and the rate's unit in ms
(1000 for /sec, 60000 for /min, ...); the kernel refuses a gcinterval or expire of 0 and a name
with `/`, `.` or `..` (EINVAL), and a burst whose credits overflow (ERANGE, at any HZ here, as
-m limit's check). Refused here though iptables takes them: a name of 255 bytes or more
(iptables-legacy cuts it to 254 silently) and one with a blank or quote (iptables-save prints
it bare, so that it does not read back). No option twice; only upto and above can be negated.
Save prints rate and burst always, the mode when there is one, the name, the htable options
that are not 0 (not 1000 for gcinterval; expire unless it is the printed unit's), masks other
than 32; `-L` prints `limit: up to 5/sec burst 5 mode srcip-dstport htable-expire 2000 srcmask
24`.

Blob: revision 3, struct xt_hashlimit_mtinfo3: name[255], then struct hashlimit_cfg3 (u64 avg,
u64 burst, u32 mode, size, max, gc_interval, expire, interval, u8 srcmask, dstmask), then the
kernel's htable pointer (usersize 304 of 312 bytes).

Meaning: codegen.rules.extensions.hashlimit_table (the model, xt_hashlimit's arithmetic and
tables).
"""

from __future__ import annotations

import ctypes

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension, Memory
from codegen.rules.extensions.hashlimit_bytes import (
    EXPIRE_BURST_S,
    EXPIRE_S,
    burst_refills,
    is_byte_rate,
    parse_bytes,
    print_bytes,
)
from codegen.rules.extensions.hashlimit_table import (
    _MODE_NAMES,
    _MODE_ORDER,
    BURST_MAX,
    BYTES,
    DEFAULT_GC_INTERVAL,
    DEFAULT_MASK,
    INVERT,
    MODE_BITS,
    NAME_MAX,
    RATE_MATCH,
    SCALE,
    UINT32,
    UINT64,
    Hashlimit,
    Table,
    kernel_refusal,
    name_refusal,
    packet_key,
    print_rate,
)
from codegen.rules.extensions.limit import rate_and_unit, seconds_to_jiffies
from codegen.rules.model import Rule, RuleError, Ruleset
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


class HashlimitCfg3(ctypes.Structure):
    _fields_ = [
        ("avg", ctypes.c_uint64),
        ("burst", ctypes.c_uint64),
        ("mode", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("max", ctypes.c_uint32),
        ("gc_interval", ctypes.c_uint32),
        ("expire", ctypes.c_uint32),
        ("interval", ctypes.c_uint32),
        ("srcmask", ctypes.c_uint8),
        ("dstmask", ctypes.c_uint8),
    ]


class XtHashlimitMtinfo3(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * NAME_MAX),
        ("cfg", HashlimitCfg3),
        ("hinfo", ctypes.c_void_p),
    ]


assert ctypes.sizeof(XtHashlimitMtinfo3) == 312 and XtHashlimitMtinfo3.hinfo.offset == 304


# ---------------------------------------------------------------------------------------------
# Text


def _atoll(text: str) -> int:
    """glibc's atoll as libxt_hashlimit's u64 takes it: strtoll, then as an unsigned 64-bit
    value."""
    return strtol_clamped(text) & UINT64


def parse_rate(text: str) -> tuple[int, int] | str:
    """libxt_hashlimit's parse_rate (revision 2 and 3): the period (avg, microseconds) and the
    unit's seconds, or why iptables refuses it."""
    parsed = rate_and_unit(text, _atoll)
    if parsed is None:
        return f'Bad value for "--hashlimit-upto" option: "{text}"'
    rate, multiplier = parsed
    avg = (SCALE * multiplier) // rate
    if avg == 0:
        return f'Rate too fast "{text}"'
    return avg, multiplier


def parse_burst(text: str) -> int | None:
    """parse_burst (revision 2+): a base-0 number of at least 1 at the start (anything after
    it ignored; at most 1000000 when nothing follows), times 1024 or 1024^2 if `k` or `m`
    follows it (in 64 bits); None when refused. A packet rate's burst is checked against
    BURST_MAX again at the end (hashlimit_mt_check)."""
    body = text.lstrip(" \t\n\v\f\r")
    if body.startswith("+"):
        body = body[1:]
    if body[:2] in ("0x", "0X") and len(body) > 2 and body[2] in "0123456789abcdefABCDEF":
        digits = "0123456789abcdefABCDEF"
        start, base = 2, 16
    elif body.startswith("0"):
        digits, start, base = "01234567", 0, 8
    else:
        digits, start, base = "0123456789", 0, 10
    end = start
    while end < len(body) and body[end] in digits:
        end += 1
    if end == start:
        return None
    value = int(body[start:end], base)
    rest = body[end:]
    if value < 1 or value > UINT64 or (not rest and value > BURST_MAX):
        return None
    return value * {"m": 1024 * 1024, "k": 1024}.get(rest[:1], 1) & UINT64


def mode_names(mode: int, separator: str) -> str:
    return separator.join(name for name, bit in _MODE_ORDER if mode & bit)


class HashlimitParser(SingleMatchParser):
    name = "hashlimit"
    options = {
        "hashlimit-upto": ("upto", True),
        "hashlimit-above": ("above", True),
        "hashlimit": ("upto", True),
        "hashlimit-srcmask": ("srcmask", True),
        "hashlimit-dstmask": ("dstmask", True),
        "hashlimit-burst": ("burst", True),
        "hashlimit-htable-size": ("size", True),
        "hashlimit-htable-max": ("max", True),
        "hashlimit-htable-gcinterval": ("gc_interval", True),
        "hashlimit-htable-expire": ("expire", True),
        "hashlimit-mode": ("mode", True),
        "hashlimit-name": ("name", True),
        "hashlimit-rate-match": ("rate-match", False),
        "hashlimit-rate-interval": ("rate-interval", True),
    }
    invertible = frozenset({"upto", "above"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.values: dict[str, object] = {}
        self.multiplier = 1
        self.tokens: dict[str, Token] = {}

    def option(self, key: str, ctx: OptionContext) -> None:
        if ctx.negated and key not in self.invertible:
            raise ctx.error(f'hashlimit: option "{ctx.option.text}" cannot be inverted')
        super().option(key, ctx)

    def parse(self, key: str, ctx: OptionContext) -> None:
        option = ctx.option.text
        if key in self.given:
            raise ctx.error(f'hashlimit: option "{option}" can only be used once')
        other = {"upto": "above", "above": "upto"}.get(key)
        if other in self.given:
            raise ctx.error(
                f'hashlimit: option "{option}" cannot be used together with '
                f'"{self.given[other].text}"'
            )
        if key in ("rate-match", "rate-interval"):
            raise ctx.error(f"hashlimit: {option} is not supported (rate matching)")
        assert ctx.value is not None
        text = ctx.value.text
        self.tokens[key] = ctx.value
        if key in ("upto", "above"):
            cost = parse_bytes(text, _atoll) if is_byte_rate(text) else None
            parsed = parse_rate(text) if cost is None else cost
            if isinstance(parsed, str):
                raise ctx.error(f"hashlimit: {parsed.replace('upto', key)}", at_value=True)
            if isinstance(parsed, int):  # a byte rate's cost
                self.values["avg"], self.values["bytes"] = parsed, True
                self.multiplier = EXPIRE_S
            else:
                self.values["avg"], self.multiplier = parsed
            self.values["above"] = (key == "above") != ctx.negated
        elif key == "burst":
            burst = parse_burst(text)
            if burst is None:
                raise ctx.error(
                    f'hashlimit: bad value for option "{option}", or out of range (1-{BURST_MAX})',
                    at_value=True,
                )
            self.values["burst"] = burst
        elif key in ("srcmask", "dstmask"):
            length = strtoui(text, 128)
            if length is None:
                raise ctx.error(
                    f'hashlimit: bad value for option "{option}", or out of range (0-128)',
                    at_value=True,
                )
            if length > 32:
                raise ctx.error(
                    f"hashlimit: the kernel refuses {option} {length}, more than an IPv4"
                    " address's 32 bits (Invalid argument)",
                    at_value=True,
                )
            self.values[key] = length
        elif key in ("size", "max", "gc_interval", "expire"):
            number = strtoui(text, UINT32)
            if number is None:
                raise ctx.error(
                    f'hashlimit: bad value for option "{option}", or out of range (0-{UINT32})',
                    at_value=True,
                )
            if number == 0 and key in ("gc_interval", "expire"):
                raise ctx.error(
                    f"hashlimit: the kernel refuses {option} 0 (Invalid argument)",
                    at_value=True,
                )
            self.values[key] = number
        elif key == "mode":
            mode = 0
            for word in text.replace("|", ",").split(","):
                if not word:
                    continue
                if word not in _MODE_NAMES:
                    raise ctx.error(
                        f'hashlimit: Bad value for "{option}" option: "{text}" (srcip, '
                        "srcport, dstip, dstport, separated by commas)",
                        at_value=True,
                    )
                mode |= _MODE_NAMES[word]
            self.values["mode"] = mode
        else:
            problem = name_refusal(text)
            if problem is not None:
                raise ctx.error(f"hashlimit: {problem}", at_value=True)
            self.values["name"] = text

    def finish(self, line: Line) -> Hashlimit:
        if "avg" not in self.values:
            raise line.error("hashlimit: You have to specify --hashlimit", self.token.column)
        if "name" not in self.values:
            raise self.missing(line, 'option "--hashlimit-name"')
        values = dict(self.values)
        burst = self.tokens.get("burst")
        if values.get("bytes"):  # the burst in bytes: how many seconds' worth it refills
            refills = 0
            if burst is not None:
                refills = burst_refills(values["burst"], values["avg"])  # type: ignore[arg-type]
                if isinstance(refills, str):
                    raise ParseError(f"hashlimit: {refills}", line.source(burst.column))
                self.multiplier = EXPIRE_BURST_S
            values["burst"] = refills
        elif values.get("burst", 0) > BURST_MAX:  # type: ignore[operator]
            assert burst is not None
            raise ParseError(
                f'hashlimit: bad value for option "--hashlimit-burst", or out of range'
                f" (1-{BURST_MAX})",
                line.source(burst.column),
            )
        values.setdefault("expire", self.multiplier * 1000)
        match = Hashlimit(**values)  # type: ignore[arg-type]
        problem = kernel_refusal(match)
        if problem is not None:
            rate = self.tokens.get("upto") or self.tokens.get("above")
            token = self.tokens.get("burst") or rate or self.token
            raise ParseError(problem, line.source(token.column))
        return match


class HashlimitExtension(MatchExtension):
    name = "hashlimit"
    revision = 3
    model = Hashlimit
    data = XtHashlimitMtinfo3
    parser = HashlimitParser
    stateful = True
    can_hotdrop = True
    examples = (  # canonical: as iptables-legacy-save 1.8.9 printed them
        "-m hashlimit --hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-mode srcip"
        " --hashlimit-name icmp-echo-drop",
        "-m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 10 --hashlimit-mode srcip"
        " --hashlimit-name lograte",
        "-m hashlimit --hashlimit-above 3/min --hashlimit-burst 5 --hashlimit-mode"
        " srcip,dstip,dstport --hashlimit-name a --hashlimit-srcmask 24 --hashlimit-dstmask 0",
        "-m hashlimit --hashlimit-upto 1/sec --hashlimit-burst 5 --hashlimit-name minute"
        " --hashlimit-htable-expire 60000",
        "-m hashlimit --hashlimit-upto 3/hour --hashlimit-burst 5 --hashlimit-name b"
        " --hashlimit-htable-size 100 --hashlimit-htable-max 10"
        " --hashlimit-htable-gcinterval 200 --hashlimit-htable-expire 5000",
        "-m hashlimit --hashlimit-upto 7/day --hashlimit-burst 1000000 --hashlimit-name e",
        "-m hashlimit --hashlimit-above 1000000/sec --hashlimit-burst 5 --hashlimit-mode"
        " srcport,dstport --hashlimit-name ports",
        "-m hashlimit --hashlimit-upto 512kb/s --hashlimit-mode srcip --hashlimit-name bytes",
        "-m hashlimit --hashlimit-above 1mb/s --hashlimit-burst 2mb --hashlimit-mode dstip"
        " --hashlimit-name bulk",
        "-m hashlimit --hashlimit-upto 96b/s --hashlimit-burst 192b --hashlimit-name slow"
        " --hashlimit-htable-expire 1000",
    )

    def save(self, match: Hashlimit) -> list[str]:
        limit, quantum = _limit_words(match, "--hashlimit-")
        words = [
            "-m",
            "hashlimit",
            "--hashlimit-above" if match.above else "--hashlimit-upto",
            *limit,
        ]
        if match.mode:
            words += ["--hashlimit-mode", mode_names(match.mode, ",")]
        words += ["--hashlimit-name", match.name]
        for option, value, default in (
            ("size", match.size, 0),
            ("max", match.max, 0),
            ("gcinterval", match.gc_interval, DEFAULT_GC_INTERVAL),
            ("expire", match.expire, quantum),
        ):
            if value != default:
                words += [f"--hashlimit-htable-{option}", str(value)]
        for option, value in (("srcmask", match.srcmask), ("dstmask", match.dstmask)):
            if value != DEFAULT_MASK:
                words += [f"--hashlimit-{option}", str(value)]
        return words

    def describe(self, match: Hashlimit) -> str:
        limit, quantum = _limit_words(match, "")
        text = f" limit: {'above' if match.above else 'up to'} {' '.join(limit)}"
        if match.mode:
            text += f" mode {mode_names(match.mode, '-')}"
        for option, value, default in (
            ("htable-size", match.size, 0),
            ("htable-max", match.max, 0),
            ("htable-gcinterval", match.gc_interval, DEFAULT_GC_INTERVAL),
            ("htable-expire", match.expire, quantum),
            ("srcmask", match.srcmask, DEFAULT_MASK),
            ("dstmask", match.dstmask, DEFAULT_MASK),
        ):
            if value != default:
                text += f" {option} {value}"
        return text

    def as_saved(self, match: Hashlimit) -> Hashlimit:
        if match.bytes:  # the rate reads back as itself; the burst as its printed bytes
            words, _ = _limit_words(match, "--hashlimit-")
            if match.burst == 0:
                return match
            refills = burst_refills(parse_burst(words[2]) or 0, match.avg)
            burst = refills if isinstance(refills, int) else match.burst
            return Hashlimit(**{**_fields(match), "burst": burst})
        parsed = parse_rate(match.rate)
        if isinstance(parsed, str):
            return match
        return Hashlimit(**{**_fields(match), "avg": parsed[0]})

    def check(self, match: Hashlimit, rule: Rule, chain: str) -> None:
        problem = kernel_refusal(match)
        if problem is not None:
            raise RuleError(problem)

    def encode(self, match: Hashlimit) -> XtHashlimitMtinfo3:
        data = XtHashlimitMtinfo3()
        data.name = match.name.encode()
        cfg = data.cfg
        cfg.avg, cfg.burst = match.avg, match.burst
        cfg.mode = match.mode | (INVERT if match.above else 0) | (BYTES if match.bytes else 0)
        cfg.size, cfg.max = match.size, match.max
        cfg.gc_interval, cfg.expire = match.gc_interval, match.expire
        cfg.srcmask, cfg.dstmask = match.srcmask, match.dstmask
        return data

    def decode(self, data: XtHashlimitMtinfo3) -> Hashlimit:
        cfg = data.cfg
        if cfg.mode & RATE_MATCH:
            raise BlobError("hashlimit match: rate matching (not supported)")
        if cfg.mode & ~(MODE_BITS | INVERT | BYTES):
            raise BlobError(f"hashlimit match: unknown mode bits 0x{cfg.mode:x}")
        try:
            name = bytes(data.name).decode()
            return Hashlimit(
                name=name,
                avg=cfg.avg,
                burst=cfg.burst,
                above=bool(cfg.mode & INVERT),
                mode=cfg.mode & MODE_BITS,
                srcmask=cfg.srcmask,
                dstmask=cfg.dstmask,
                size=cfg.size,
                max=cfg.max,
                gc_interval=cfg.gc_interval,
                expire=cfg.expire,
                bytes=bool(cfg.mode & BYTES),
            )
        except (UnicodeDecodeError, ValueError) as error:
            raise BlobError(f"hashlimit match: {error}") from None

    def matches(self, match: Hashlimit, packet: Packet) -> bool:
        # A fresh table, the first packet after a load: its key's bucket is full.
        packet_key(match, packet)
        return not match.above

    def matches_with(self, match: Hashlimit, packet: Packet, memory: Memory) -> bool:
        """hashlimit_mt on the table of the match's name, shared by every match of the name
        (kept in the memory's `shared`, made at the first packet of any of them)."""
        key = packet_key(match, packet)
        tables = memory.shared.setdefault("hashlimit", {})
        assert isinstance(tables, dict)
        table = tables.get(match.name)
        if table is None:
            table = tables[match.name] = Table(match, memory.hz)
        now = seconds_to_jiffies(memory.time, memory.hz)
        return table.take(key, now, packet.total_length) != match.above

    def check_ruleset(self, ruleset: Ruleset) -> None:
        """Two matches of one name must agree on the table's settings: netfilter would take
        them from one of the two (the first to load, possibly from the table before)."""
        first: dict[str, tuple[Hashlimit, Rule]] = {}
        for _, _, rule, _, match in ruleset.matches_of(Hashlimit):
            seen = first.setdefault(match.name, (match, rule))
            if seen[0].table != match.table:
                where = seen[1].source
                at = f" at line {where.line}" if where is not None else ""
                raise RuleError(
                    f"hashlimit: --hashlimit-name {match.name} is used{at} with other"
                    " settings; netfilter keeps one table per name, with one rule's"
                    " rate, burst, mode, masks and htable options for both",
                    rule.source,
                    match,
                )


def _limit_words(match: Hashlimit, prefix: str) -> tuple[list[str], int]:
    """The rate and burst as save (`prefix` "--hashlimit-") or -L ("") print them, and the
    expire (ms) they leave unprinted."""
    if match.bytes:
        return print_bytes(match.avg, match.burst, prefix)
    rate, quantum = print_rate(match.avg)
    return [rate, f"{prefix}burst", str(match.burst)], quantum


def _fields(match: Hashlimit) -> dict[str, object]:
    return {name: getattr(match, name) for name in Hashlimit.__dataclass_fields__}


EXTENSION = HashlimitExtension()
