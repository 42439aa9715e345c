"""`-m recent` (libxt_recent.c, xt_recent.c): lists of recently seen addresses, one list (a
"table") per `--name`, shared by every rule naming it.

Text, as iptables-legacy 1.8.9 takes it (tried in a namespace): exactly one of `--set`,
`--rcheck`, `--update`, `--remove`, any of them negated (`! --rcheck`); `--seconds N` (1 to
2^32-1, base 0), `--reap` (which needs `--seconds`), `--hitcount N` (0 to 2^32-1), `--rttl`
(not with `--set` or `--remove`), `--name NAME` (default DEFAULT; iptables cuts a name past
199 characters silently, which this parser refuses), `--rsource` (the default) or `--rdest`
(the last given wins), `--mask ADDRESS` (default 255.255.255.255). Only the operation can be
negated, and no option can be given twice. Save prints `! --rcheck --seconds 60 --reap
--hitcount 4 --rttl --name SSH --mask 255.255.0.0 --rdest` in that order, always with name,
mask and side; `-L` prints `! recent: CHECK seconds: 60 reap hit_count: 4 TTL-Match name: SSH
side: dest mask: 255.255.0.0`. Seconds and hitcount print with `%d`: 4294967295 as -1.

The kernel (recent_mt_check) refuses `--seconds`, `--hitcount`, `--rttl` and `--reap` with
`--set` or `--remove`, a hitcount of 65536 or more (XT_RECENT_MAX_NSTAMPS on this kernel: 65535
is taken), and a name that is empty, `.`, `..` or holds a `/` (xt_check_proc_name).

Blob: revision 1, struct xt_recent_mtinfo_v1 (seconds, hit_count, check_set, invert,
name[200], side, then the mask as a union nf_inet_addr: 228 bytes).

Meaning (recent_mt, parameters as found here: ip_list_tot 100 entries per table,
ip_pkt_list_tot 0): the packet's source (or destination) address, masked by the *table's*
mask (that of the first rule naming it), is looked up; with `--rttl` an entry matches only if
its TTL is the packet's (or either is 0). The TTL is the packet's, plus one in FORWARD (the
TTL before forwarding; in OUTPUT packets are taken to have a socket, as locally sent ones do).
No entry: `--set` makes one (evicting the least recently updated entry of a full table) and
matches; the rest do not match. An entry: `--set` adds the packet's time to it; `--remove`
deletes it; `--rcheck` and `--update` match if `--hitcount` (at least one if 0) of its
timestamps are within `--seconds` (any, if 0); `--reap` then removes the table's least
recently updated entry if its newest stamp is older than `--seconds` (unless it is the entry
an update is about to refresh); `--update` adds the time when the match (after `!`) holds. A
matching `!` inverts each answer. An entry keeps the last N stamps, N the power of two at or
above the largest `--hitcount` of its table's rules (32 if none), in a ring.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension, Memory
from codegen.rules.extensions.limit import seconds_to_jiffies
from codegen.rules.extensions.recent_tables import Entry, Table, time_after
from codegen.rules.model import ExtensionMatch, Rule, RuleError, Ruleset, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import (
    Line,
    MatchParser,
    OptionContext,
    ParseError,
    Token,
    format_ip,
    inet_aton,
    strtoui,
)

NAME_LEN = 200  # XT_RECENT_NAME_LEN, the terminating NUL included
MAX_NSTAMPS = 65536  # XT_RECENT_MAX_NSTAMPS: a hitcount must be below it
DEFAULT_NSTAMPS = 32  # a table whose rules give no hitcount keeps 32 stamps per entry
UINT32 = 0xFFFF_FFFF
FULL_MASK = UINT32

COMMANDS = ("set", "rcheck", "update", "remove")
# check_set's bits (XT_RECENT_*)
CHECK, SET, UPDATE, REMOVE, TTL, REAP = 1, 2, 4, 8, 16, 32
_COMMAND_BITS = {"rcheck": CHECK, "set": SET, "update": UPDATE, "remove": REMOVE}
_LISTED = {"set": "SET", "rcheck": "CHECK", "update": "UPDATE", "remove": "REMOVE"}
SOURCE, DEST = 0, 1


@dataclass(frozen=True, slots=True)
class Recent(ExtensionMatch):
    """`-m recent`: `command` one of set, rcheck, update, remove, on table `name`."""

    command: str = "set"
    name: str = "DEFAULT"
    seconds: int = 0
    hitcount: int = 0
    rttl: bool = False
    reap: bool = False
    dest: bool = False  # --rdest: the destination address, else the source
    mask: int = FULL_MASK
    negated: bool = False
    # No --mask given: iptables leaves its default, all 16 bytes of the union 0xff, where a
    # given mask has zeros after its 4 (the same match to the kernel, other bytes in the blob).
    mask_given: bool = field(default=True, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"recent command must be one of {', '.join(COMMANDS)}")
        check_uint(self.seconds, 32, "recent seconds")
        check_uint(self.hitcount, 32, "recent hitcount")
        check_uint(self.mask, 32, "recent mask")

    @property
    def nstamps(self) -> int:
        """The stamps per entry this rule asks its table for (recent_mt_check's mask + 1)."""
        if self.hitcount:
            return 1 << (self.hitcount - 1).bit_length()
        return DEFAULT_NSTAMPS


class XtRecentMtinfoV1(ctypes.Structure):
    _fields_ = [
        ("seconds", ctypes.c_uint32),
        ("hit_count", ctypes.c_uint32),
        ("check_set", ctypes.c_uint8),
        ("invert", ctypes.c_uint8),
        ("name", ctypes.c_char * NAME_LEN),
        ("side", ctypes.c_uint8),
        ("mask", ctypes.c_uint32 * 4),
    ]


assert ctypes.sizeof(XtRecentMtinfoV1) == 228


def _signed(value: int) -> int:
    """A u32 as printf's %d shows it."""
    return value - (1 << 32) if value & 0x8000_0000 else value


def kernel_refusal(match: Recent) -> str | None:
    """Why recent_mt_check refuses `match`, None if it takes it."""
    if match.command in ("set", "remove") and (
        match.seconds or match.hitcount or match.rttl or match.reap
    ):
        return (
            f"recent: the kernel refuses --seconds, --hitcount, --rttl and --reap with "
            f"--{match.command} (Invalid argument)"
        )
    if match.reap and not match.seconds:
        return "recent: --reap needs --seconds (the kernel refuses it: Invalid argument)"
    if match.hitcount >= MAX_NSTAMPS:
        return (
            f"recent: --hitcount {match.hitcount} is above the kernel's maximum of "
            f"{MAX_NSTAMPS - 1} (Invalid argument)"
        )
    name = match.name
    if not name or name in (".", "..") or "/" in name:
        return f"recent: the kernel refuses the table name '{name}' (Invalid argument)"
    if len(name.encode()) >= NAME_LEN:
        return f"recent: --name is at most {NAME_LEN - 1} bytes (iptables cuts it silently)"
    return None


# ---------------------------------------------------------------------------------------------
# Text

# libxt_recent's option table, in its order (the order exclusions are reported in).
_OPTIONS = ("set rcheck update remove seconds reap hitcount rttl name rsource rdest mask").split()


class RecentParser(MatchParser):
    name = "recent"
    options = {
        "set": ("set", False),
        "rcheck": ("rcheck", False),
        "update": ("update", False),
        "remove": ("remove", False),
        "seconds": ("seconds", True),
        "reap": ("reap", False),
        "hitcount": ("hitcount", True),
        "rttl": ("rttl", False),
        "name": ("name", True),
        "rsource": ("rsource", False),
        "rdest": ("rdest", False),
        "mask": ("mask", True),
    }
    invertible = frozenset(COMMANDS)

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.command: str | None = None
        self.negated = False
        self.values: dict[str, object] = {}
        self.dest = False
        self.tokens: dict[str, OptionContext] = {}

    def option(self, key: str, ctx: OptionContext) -> None:
        if ctx.negated and key not in self.invertible:
            raise ctx.error(f'recent: option "{ctx.option.text}" cannot be inverted')
        super().option(key, ctx)

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error(f'recent: option "--{key}" can only be used once')
        self.tokens[key] = ctx
        if key in COMMANDS:
            self.command = key if self.command is None else self.command
            self.negated = self.negated or ctx.negated
            return
        if key in ("reap", "rttl"):
            self.values[key] = True
            return
        if key in ("rsource", "rdest"):
            self.dest = key == "rdest"
            return
        assert ctx.value is not None
        text = ctx.value.text
        if key in ("seconds", "hitcount"):
            low = 1 if key == "seconds" else 0
            value = strtoui(text, UINT32, low)
            if value is None:
                raise ctx.error(
                    f'recent: bad value for option "--{key}", or out of range ({low}-{UINT32})',
                    at_value=True,
                )
            self.values[key] = value
        elif key == "name":
            self.values[key] = text
        else:
            mask = inet_aton(text)
            if mask is None:
                raise ctx.error(
                    f"recent: '--mask {text}' is not an IPv4 address (host names are not "
                    "supported)",
                    at_value=True,
                )
            self.values[key] = mask

    def finish(self, line: Line) -> Recent:
        given = [key for key in _OPTIONS if key in self.given]
        # xtables_options_fcheck: each option's exclusions, then what it also needs.
        excluded = {key: [c for c in COMMANDS if c != key] for key in COMMANDS}
        excluded["rttl"] = ["set", "remove"]
        for key in given:
            clash = [other for other in excluded.get(key, ()) if other in self.given]
            if clash:
                raise line.error(
                    f'recent: option "--{key}" cannot be used together with "--{clash[0]}"',
                    self.given[key].column,
                )
        if "reap" in self.given and "seconds" not in self.given:
            raise line.error(
                'recent: option "--reap" also requires "--seconds"', self.given["reap"].column
            )
        if self.command is None:
            raise line.error(
                "recent: you must specify one of `--set', `--rcheck' `--update' or `--remove'",
                self.token.column,
            )
        values = self.values
        match = Recent(
            self.command,
            str(values.get("name", "DEFAULT")),
            int(values.get("seconds", 0)),  # type: ignore[call-overload]
            int(values.get("hitcount", 0)),  # type: ignore[call-overload]
            bool(values.get("rttl", False)),
            bool(values.get("reap", False)),
            self.dest,
            int(values.get("mask", FULL_MASK)),  # type: ignore[call-overload]
            self.negated,
            "mask" in values,
        )
        problem = kernel_refusal(match)
        if problem is not None:
            at = next(
                (self.given[k] for k in ("name", "hitcount", "seconds") if k in self.given),
                self.token,
            )
            raise ParseError(problem, line.source(at.column))
        return match


# ---------------------------------------------------------------------------------------------
# Meaning


def table_settings(ruleset: Ruleset) -> dict[str, tuple[int, int]]:
    """Each table name's (mask, stamps per entry) as a fresh load makes them: the mask of the
    first match naming it, in rule-set order, and the largest ring any of them asks for."""
    found: dict[str, tuple[int, int]] = {}
    for *_, match in ruleset.matches_of(Recent):
        mask, size = found.get(match.name, (match.mask, 0))
        found[match.name] = (mask, max(size, match.nstamps))
    return found


def hit(match: Recent, entry: Entry, now: int, hz: int) -> bool:
    """Whether `--hitcount` of the entry's stamps are within `--seconds` (the check of
    --rcheck and --update)."""
    time = now - match.seconds * hz
    hits = 0
    for stamp in entry.stamps[: entry.nstamps]:
        if match.seconds and time_after(time, stamp):
            continue
        hits += 1
        if hits >= max(match.hitcount, 1):
            return True
    return False


def packet_ttl(packet: Packet) -> int:
    """The TTL recent_mt records: one more in FORWARD, the TTL before forwarding."""
    if packet.in_device and packet.out_device:
        return (packet.ttl + 1) & 0xFF
    return packet.ttl


def recent_mt(match: Recent, packet: Packet, tables: dict[str, Table], now: int, hz: int) -> bool:
    """recent_mt on `tables` (by name, made by the caller) at jiffies `now`."""
    table = tables[match.name]
    address = (packet.daddr if match.dest else packet.saddr) & table.mask
    ttl = packet_ttl(packet)
    result = match.negated
    entry = table.lookup(address, ttl if match.rttl else 0)
    if entry is None:
        if match.command != "set":
            return result
        table.init(address, ttl, now)
        return not result
    if match.command == "set":
        result = not result
    elif match.command == "remove":
        del table.entries[address]
        return not result
    else:
        if hit(match, entry, now, hz):
            result = not result
        if match.reap:
            time = now - match.seconds * hz
            table.reap(time, address, match.command == "update" and result)
            if address not in table.entries:  # reaped: nothing left to update
                return result
    if match.command == "set" or (match.command == "update" and result):
        table.update(address, entry, now)
        entry.ttl = ttl
    return result


class RecentExtension(MatchExtension):
    name = "recent"
    revision = 1
    model = Recent
    data = XtRecentMtinfoV1
    parser = RecentParser
    stateful = True
    can_hotdrop = True  # an entry it cannot allocate drops the packet
    # --reap is in no example: both backends refuse it (tests/unit/test_recent.py holds it to
    # the rule layer, tests/net/test_recent_vs_netfilter.py to the kernel's blob).
    examples = (
        "-m recent --set --name DEFAULT --mask 255.255.255.255 --rsource",
        "-m recent --set --name SSH --mask 255.255.255.255 --rsource",
        "-m recent --update --seconds 60 --hitcount 4 --name SSH --mask 255.255.255.255 --rsource",
        "-m recent ! --rcheck --seconds 60 --hitcount 4 --rttl --name SSH --mask 255.255.0.0 "
        "--rdest",
        "-m recent --rcheck --name %CURRENTTIME --mask 255.255.255.255 --rsource",
        "-m recent --remove --name csbad --mask 255.255.255.0 --rsource",
    )

    def save(self, match: Recent) -> list[str]:
        words = ["-m", "recent", *(["!"] if match.negated else []), f"--{match.command}"]
        if match.seconds:
            words += ["--seconds", str(_signed(match.seconds))]
        if match.reap:
            words.append("--reap")
        if match.hitcount:
            words += ["--hitcount", str(_signed(match.hitcount))]
        if match.rttl:
            words.append("--rttl")
        words += ["--name", match.name, "--mask", format_ip(match.mask)]
        return [*words, "--rdest" if match.dest else "--rsource"]

    def describe(self, match: Recent) -> str:
        text = f"{' !' if match.negated else ''} recent: {_LISTED[match.command]}"
        if match.seconds:
            text += f" seconds: {_signed(match.seconds)}"
        if match.reap:
            text += " reap"
        if match.hitcount:
            text += f" hit_count: {_signed(match.hitcount)}"
        if match.rttl:
            text += " TTL-Match"
        side = "dest" if match.dest else "source"
        return f"{text} name: {match.name} side: {side} mask: {format_ip(match.mask)}"

    def check(self, match: Recent, rule: Rule, chain: str) -> None:
        problem = kernel_refusal(match)
        if problem is not None:
            raise RuleError(problem)

    def encode(self, match: Recent) -> XtRecentMtinfoV1:
        check_set = _COMMAND_BITS[match.command] | (TTL if match.rttl else 0)
        check_set |= REAP if match.reap else 0
        data = XtRecentMtinfoV1(
            seconds=match.seconds,
            hit_count=match.hitcount,
            check_set=check_set,
            invert=match.negated,
            side=DEST if match.dest else SOURCE,
        )
        # libxt_recent's init writes DEFAULT and --name copies the name over it with its NUL,
        # leaving the rest of DEFAULT behind (`SSH\0ULT`): the kernel reads up to the NUL.
        name = match.name.encode() + b"\0"
        ctypes.memmove(ctypes.addressof(data) + XtRecentMtinfoV1.name.offset, b"DEFAULT", 7)
        ctypes.memmove(ctypes.addressof(data) + XtRecentMtinfoV1.name.offset, name, len(name))
        data.mask[0] = int.from_bytes(match.mask.to_bytes(4, "big"), "little")
        if not match.mask_given:
            data.mask[1] = data.mask[2] = data.mask[3] = UINT32
        return data

    def decode(self, data: XtRecentMtinfoV1) -> Recent:
        bits = data.check_set
        commands = [c for c, bit in _COMMAND_BITS.items() if bits & bit]
        if len(commands) != 1 or bits & ~(CHECK | SET | UPDATE | REMOVE | TTL | REAP):
            raise BlobError(f"recent match: check_set {bits:#x} is not one operation")
        if data.side not in (SOURCE, DEST):
            raise BlobError(f"recent match: side {data.side} is neither source nor dest")
        mask = int.from_bytes(int(data.mask[0]).to_bytes(4, "little"), "big")
        return Recent(
            commands[0],
            data.name.decode(errors="replace"),
            data.seconds,
            data.hit_count,
            bool(bits & TTL),
            bool(bits & REAP),
            data.side == DEST,
            mask,
            bool(data.invert),
            list(data.mask[1:]) != [UINT32] * 3,
        )

    def matches(self, match: Recent, packet: Packet) -> bool:
        # Empty tables: the first packet after they were made.
        tables = {match.name: Table(match.mask, match.nstamps)}
        return recent_mt(match, packet, tables, 1 << 32, 250)

    def matches_with(self, match: Recent, packet: Packet, memory: Memory) -> bool:
        """recent_mt on the table of the match's name, shared by every match of the name (kept
        in the memory's `shared`), with the settings a load of the memory's rule set gives it
        (table_settings; without a rule set, the match's own)."""
        tables = memory.shared.setdefault("recent", {})
        assert isinstance(tables, dict)
        if match.name not in tables:
            settings = {} if memory.ruleset is None else table_settings(memory.ruleset)
            mask, size = settings.get(match.name, (match.mask, match.nstamps))
            tables[match.name] = Table(mask, size)
        now = seconds_to_jiffies(memory.time, memory.hz)
        return recent_mt(match, packet, tables, now, memory.hz)


EXTENSION = RecentExtension()

__all__ = ["Recent", "RecentExtension", "Table", "recent_mt", "table_settings"]
