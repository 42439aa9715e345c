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
codegen.rules.extensions.hashlimit_bytes says, rate matching (--hashlimit-rate-match,
--hashlimit-rate-interval) as codegen.rules.extensions.hashlimit_rate says; the parser is
codegen.rules.extensions.hashlimit_text's. `--hashlimit-burst` is a number in base 0 (any
text after it ignored, but `k` and `m` multiply by 1024 and 1024^2, as libxt_hashlimit's
parse_burst does), 1 to 1000000 (a byte rate's burst, a byte count, may be more when `k` or
`m` follows); default 5.
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
from codegen.rules.extensions.hashlimit_bytes import burst_refills, print_bytes
from codegen.rules.extensions.hashlimit_rate import save_words, stored, window_burst
from codegen.rules.extensions.hashlimit_table import (
    BYTES,
    DEFAULT_GC_INTERVAL,
    DEFAULT_MASK,
    INVERT,
    MODE_BITS,
    NAME_MAX,
    RATE_MATCH,
    UINT64,
    Hashlimit,
    Table,
    kernel_refusal,
    packet_key,
    print_rate,
)
from codegen.rules.extensions.hashlimit_text import (
    HashlimitParser,
    mode_names,
    parse_burst,
    parse_rate,
)
from codegen.rules.extensions.limit import seconds_to_jiffies
from codegen.rules.model import Rule, RuleError, Ruleset
from codegen.rules.packet import Packet

__all__ = ["EXTENSION", "HashlimitExtension", "parse_rate"]


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
        "-m hashlimit --hashlimit-upto 40/sec --hashlimit-burst 20 --hashlimit-mode srcip"
        " --hashlimit-name window --hashlimit-rate-match",
        "-m hashlimit --hashlimit-upto 3/sec --hashlimit-burst 5 --hashlimit-name minutes"
        " --hashlimit-htable-expire 60000 --hashlimit-rate-match --hashlimit-rate-interval 60",
        "-m hashlimit --hashlimit-above 5/sec --hashlimit-burst 5 --hashlimit-mode"
        " srcip,dstport --hashlimit-name windows --hashlimit-srcmask 24 --hashlimit-rate-match"
        " --hashlimit-rate-interval 10",
        "-m hashlimit --hashlimit-upto 40mb/s --hashlimit-burst 120mb --hashlimit-name bytewin"
        " --hashlimit-rate-match --hashlimit-rate-interval 3",
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
        return words + save_words(match, "--hashlimit-")

    def describe(self, match: Hashlimit) -> str:
        limit, quantum = _limit_words(match, "", listing=True)
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
        return " ".join([text, *save_words(match, "")])

    def as_saved(self, match: Hashlimit) -> Hashlimit:
        # Save prints no interval without rate matching, and none of 1 with it (which then
        # reads back as the printed rate's default).
        fields = _fields(match)
        given = match.interval if match.rate_match and match.interval != 1 else 0
        fields["interval"] = given
        if match.bytes:  # the rate reads back as itself; the burst as its printed bytes
            words, _ = _limit_words(match, "--hashlimit-")
            if match.burst:
                refills = burst_refills(parse_burst(words[2]) or 0, match.avg)
                fields["burst"] = refills if isinstance(refills, int) else match.burst
            if match.rate_match:
                fields["interval"] = stored(match.avg, 1, given, True)[1]
            return Hashlimit(**fields)  # type: ignore[arg-type]
        parsed = parse_rate(match.rate)
        if isinstance(parsed, str):
            return Hashlimit(**fields)  # type: ignore[arg-type]
        fields["avg"] = parsed[0]
        if match.rate_match:
            fields["avg"], fields["interval"] = stored(*parsed, given, False)
        return Hashlimit(**fields)  # type: ignore[arg-type]

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
        cfg.mode |= RATE_MATCH if match.rate_match else 0
        cfg.interval = match.interval
        cfg.size, cfg.max = match.size, match.max
        cfg.gc_interval, cfg.expire = match.gc_interval, match.expire
        cfg.srcmask, cfg.dstmask = match.srcmask, match.dstmask
        return data

    def decode(self, data: XtHashlimitMtinfo3) -> Hashlimit:
        cfg = data.cfg
        if cfg.mode & ~(MODE_BITS | INVERT | BYTES | RATE_MATCH):
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
                rate_match=bool(cfg.mode & RATE_MATCH),
                interval=cfg.interval,
            )
        except (UnicodeDecodeError, ValueError) as error:
            raise BlobError(f"hashlimit match: {error}") from None

    def matches(self, match: Hashlimit, packet: Packet) -> bool:
        # A fresh table, the first packet after a load: its key's bucket is full (a window
        # counts it: a byte rate's first datagram may be over its burst already).
        packet_key(match, packet)
        under = not (match.rate_match and match.bytes) or packet.total_length <= window_burst(match)
        return under != match.above

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
                    " rate, burst, mode, masks, htable options and rate matching for both",
                    rule.source,
                    match,
                )


def _limit_words(match: Hashlimit, prefix: str, listing: bool = False) -> tuple[list[str], int]:
    """The rate and burst as save (`prefix` "--hashlimit-") or -L (`listing`, prefix "")
    print them, and the expire (ms) they leave unprinted. -L prints a packet rate's period
    times the interval, if any."""
    if match.bytes:
        return print_bytes(match.avg, match.burst, prefix)
    period = match.avg * match.interval & UINT64 if listing and match.interval else match.avg
    rate, quantum = print_rate(period)
    return [rate, f"{prefix}burst", str(match.burst)], quantum


def _fields(match: Hashlimit) -> dict[str, object]:
    return {name: getattr(match, name) for name in Hashlimit.__dataclass_fields__}


EXTENSION = HashlimitExtension()
