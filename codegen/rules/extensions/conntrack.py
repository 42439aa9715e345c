"""`-m conntrack` (libxt_conntrack.c, xt_conntrack.c revision 3): the packet's connection,
its state, protocol, tuples, status, time left and direction. Also what `-m state` (state.py,
written to the kernel as this match) shares with it: the payload, the state names and bits,
and the state test.

What iptables-legacy 1.8.9 writes, checked byte for byte: a 168-byte xt_conntrack_mtinfo3 whose
addresses and masks are network order (a mask given as /N has zeros past its first four bytes,
no mask at all is sixteen 0xff bytes), whose ports, expiry bounds and flags are host order,
and where `--ctdir REPLY` is the DIRECTION bit in both match_flags and invert_flags. Where
1.8.9 is lax, newer iptables (and its test vectors) refuse, and so do we: `--ctproto 0`, ranges
whose first value is above their last, and masks it would silently read as /32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Literal

from codegen.rules.blob.structs import BlobError, ipv4_of, set_ipv4
from codegen.rules.extensions import ports
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.ctinfo import (
    ALL_STATES,
    ALL_STATUSES,
    CTSTATE_NAMES,
    KNOWN_FLAGS,
    STATE_PRINT_ORDER,
    STATUS_NAMES,
    UINT32_MAX,
    XT_CONNTRACK_DIRECTION,
    XT_CONNTRACK_EXPIRES,
    XT_CONNTRACK_ORIGDST,
    XT_CONNTRACK_ORIGDST_PORT,
    XT_CONNTRACK_ORIGSRC,
    XT_CONNTRACK_ORIGSRC_PORT,
    XT_CONNTRACK_PROTO,
    XT_CONNTRACK_REPLDST,
    XT_CONNTRACK_REPLDST_PORT,
    XT_CONNTRACK_REPLSRC,
    XT_CONNTRACK_REPLSRC_PORT,
    XT_CONNTRACK_STATE,
    XT_CONNTRACK_STATE_ALIAS,
    XT_CONNTRACK_STATUS,
    AnyOf,
    XtConntrackMtinfo3,
    check_states,
    describe_words,
    format_names,
    parse_names,
    save_words,
    state_bits,
)
from codegen.rules.extensions.ports import PortRange
from codegen.rules.model import ExtensionMatch, Protocol, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import (
    Line,
    MatchParser,
    OptionContext,
    Token,
    format_ip,
    getportbyname,
    ipmask_to_numeric,
    parse_hostmask,
    parse_protocol,
    strtoui,
)

# The tuple addresses and ports: (model field, flag, tuple, tuple field), in save order. The
# option is `--ct` and the field without its underscore (`--ctorigsrc`, `--ctorigsrcport`).
_ADDRESSES = (
    ("origsrc", XT_CONNTRACK_ORIGSRC, "original", "src"),
    ("origdst", XT_CONNTRACK_ORIGDST, "original", "dst"),
    ("replsrc", XT_CONNTRACK_REPLSRC, "reply", "src"),
    ("repldst", XT_CONNTRACK_REPLDST, "reply", "dst"),
)
_PORTS = (
    ("origsrc_port", XT_CONNTRACK_ORIGSRC_PORT, "original", "sport"),
    ("origdst_port", XT_CONNTRACK_ORIGDST_PORT, "original", "dport"),
    ("replsrc_port", XT_CONNTRACK_REPLSRC_PORT, "reply", "sport"),
    ("repldst_port", XT_CONNTRACK_REPLDST_PORT, "reply", "dport"),
)


def _option(field: str) -> str:
    return "ct" + field.replace("_", "")


@dataclass(frozen=True, slots=True)
class MaskedAddress:
    """`--ctorigsrc ADDRESS[/MASK]` and its like. Unlike `-s`, iptables keeps the address as
    given (198.18.1.2/16 saves as such); the kernel compares `(ip ^ address) & mask`."""

    address: int
    mask: int = UINT32_MAX
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.address, 32, "address")
        check_uint(self.mask, 32, "mask")

    def matches(self, ip: int) -> bool:
        return (((ip ^ self.address) & self.mask) == 0) != self.negated


@dataclass(frozen=True, slots=True)
class Expiry:
    """`--ctexpire MIN[:MAX]`: the seconds the entry has left, inclusive."""

    min: int
    max: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.min, 32, "expiry")
        check_uint(self.max, 32, "expiry")

    def matches(self, seconds: int) -> bool:
        return (self.min <= seconds <= self.max) != self.negated


@dataclass(frozen=True, slots=True)
class Conntrack(ExtensionMatch):
    """`-m conntrack`: each option given (at least one) must hold; None is an option not
    given. The fields are named as xt_conntrack_mtinfo3's."""

    state: AnyOf | None = None
    protocol: Protocol | None = None  # the connection's layer-4 protocol, never 0
    origsrc: MaskedAddress | None = None
    origdst: MaskedAddress | None = None
    replsrc: MaskedAddress | None = None
    repldst: MaskedAddress | None = None
    origsrc_port: PortRange | None = None
    origdst_port: PortRange | None = None
    replsrc_port: PortRange | None = None
    repldst_port: PortRange | None = None
    status: AnyOf | None = None
    expires: Expiry | None = None
    direction: Literal["ORIGINAL", "REPLY"] | None = None

    def __post_init__(self) -> None:
        if self.direction not in (None, "ORIGINAL", "REPLY"):
            raise ValueError(f"direction must be ORIGINAL, REPLY or None: {self.direction!r}")

    @property
    def empty(self) -> bool:
        return all(getattr(self, field.name) is None for field in fields(self))


# ---------------------------------------------------------------------------------------------
# Option syntax


def _parse_range(
    ctx: OptionContext, bound: Callable[[str], int | None], maximum: int, what: str
) -> tuple[int, int]:
    """XTTYPE_PORTRC and XTTYPE_UINT32RC: `MIN`, `MIN:MAX`, `:MAX`, `MIN:` or `:`, where an
    empty bound is 0 or the maximum."""
    assert ctx.value is not None
    text, option = ctx.value.text, ctx.option.text
    parts = text.split(":")
    if len(parts) > 2 or parts == [""]:
        raise ctx.error(f"conntrack: bad value '{text}' for {option} (MIN[:MAX])", True)
    values = [bound(part) if part else (0, maximum)[index] for index, part in enumerate(parts)]
    for part, value in zip(parts, values, strict=True):
        if value is None:
            raise ctx.error(f"conntrack: bad {what} '{part}' for {option}", True)
    first, last = values[0], values[-1]
    assert first is not None and last is not None
    if first > last:
        raise ctx.error(f"conntrack: invalid range '{text}' for {option} (min > max)", True)
    return first, last


def _parse_protocol(ctx: OptionContext) -> Protocol:
    assert ctx.value is not None
    number = parse_protocol(ctx.value.text)
    if number is None:
        raise ctx.error(f"conntrack: unknown protocol '{ctx.value.text}'", True)
    if number == 0:
        always = "condition would always match" if ctx.negated else "rule would never match"
        raise ctx.error(f"conntrack: {always} protocol", True)
    return Protocol(number, ctx.negated)


def _parse_direction(ctx: OptionContext) -> str:
    assert ctx.value is not None
    word = ctx.value.text.upper() if ctx.value.text.isascii() else ""
    if word not in ("ORIGINAL", "REPLY"):
        raise ctx.error(f"conntrack: bad --ctdir '{ctx.value.text}' (ORIGINAL or REPLY)", True)
    return word


class ConntrackParser(MatchParser):
    name = "conntrack"
    options = {
        "ctstate": ("state", True),
        "ctproto": ("protocol", True),
        **{_option(field): (field, True) for field, *_ in _ADDRESSES},
        **{_option(field): (field, True) for field, *_ in _PORTS},
        "ctstatus": ("status", True),
        "ctexpire": ("expires", True),
        "ctdir": ("direction", True),
    }
    invertible = frozenset(key for key, _ in options.values()) - {"direction"}
    labels = {key: f"--{option}" for option, (key, _) in options.items()}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.fields: dict[str, object] = {}

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, self.labels[key])
        if key == "state":
            value: object = AnyOf(parse_names(CTSTATE_NAMES, ctx, "conntrack: state"), ctx.negated)
        elif key == "status":
            value = AnyOf(parse_names(STATUS_NAMES, ctx, "conntrack: status"), ctx.negated)
        elif key == "protocol":
            value = _parse_protocol(ctx)
        elif key == "expires":
            seconds = _parse_range(ctx, lambda t: strtoui(t, UINT32_MAX), UINT32_MAX, "seconds")
            value = Expiry(*seconds, ctx.negated)
        elif key == "direction":
            value = _parse_direction(ctx)
        elif key.endswith("_port"):
            port_range = _parse_range(ctx, getportbyname, 0xFFFF, "port (0-65535 or a name)")
            value = PortRange(*port_range, ctx.negated)
        else:
            value = MaskedAddress(*parse_hostmask(ctx), ctx.negated)
        self.fields[key] = value

    def finish(self, line: Line) -> Conntrack:
        if not self.fields:
            raise line.error("conntrack: at least one option is required", self.token.column)
        return Conntrack(**self.fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The family


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}:{last}"


def _port_span(ports: PortRange) -> str:
    # conntrack_dump_ports: a high port of 0 prints as the low port alone.
    return str(ports.first) if ports.last == 0 else _span(ports.first, ports.last)


def _options(match: Conntrack) -> list[tuple[bool, str, str]]:
    """(negated, option, value) in the order iptables-save writes them."""
    found: list[tuple[bool, str, str]] = []
    if match.state is not None:
        found.append(
            (match.state.negated, "ctstate", format_names(match.state.bits, STATE_PRINT_ORDER))
        )
    if match.protocol is not None:
        found.append((match.protocol.negated, "ctproto", str(match.protocol.number)))
    for field, *_ in _ADDRESSES:
        address: MaskedAddress | None = getattr(match, field)
        if address is not None:
            text = format_ip(address.address) + ipmask_to_numeric(address.mask)
            found.append((address.negated, _option(field), text))
    for field, *_ in _PORTS:
        port_range: PortRange | None = getattr(match, field)
        if port_range is not None:
            found.append((port_range.negated, _option(field), _port_span(port_range)))
    if match.status is not None:
        names = format_names(match.status.bits, STATUS_NAMES[1:], "NONE")
        found.append((match.status.negated, "ctstatus", names))
    if match.expires is not None:
        found.append(
            (match.expires.negated, "ctexpire", _span(match.expires.min, match.expires.max))
        )
    if match.direction is not None:
        found.append((False, "ctdir", match.direction))
    return found


class ConntrackExtension(MatchExtension):
    name = "conntrack"
    revision = 3
    model = Conntrack
    data = XtConntrackMtinfo3
    parser = ConntrackParser
    examples = (
        "-m conntrack --ctstate RELATED,ESTABLISHED",
        "-m conntrack ! --ctstate INVALID --ctproto 6 --ctorigsrc 198.18.0.0/16 --ctorigdstport 22"
        " --ctstatus SEEN_REPLY,ASSURED --ctexpire 5:10 --ctdir REPLY",
        "-m conntrack --ctstate INVALID,NEW,UNTRACKED,SNAT,DNAT ! --ctproto 17"
        " ! --ctorigdst 198.18.1.1 --ctreplsrc 198.19.0.7/15 ! --ctrepldst 198.18.0.9/0",
        "-m conntrack ! --ctorigsrcport 1024:65535 --ctreplsrcport 53 ! --ctrepldstport 0:1023"
        " ! --ctstatus EXPECTED,CONFIRMED ! --ctexpire 30 --ctdir ORIGINAL",
        "-m conntrack --ctstatus NONE --ctexpire 0:4294967295",
    )

    def claims(self, data: XtConntrackMtinfo3) -> bool:
        return not data.match_flags & XT_CONNTRACK_STATE_ALIAS

    def save(self, match: Conntrack) -> list[str]:
        return save_words("conntrack", _options(match))

    def describe(self, match: Conntrack) -> str:
        return describe_words(_options(match))

    def as_saved(self, match: Conntrack) -> Conntrack:
        # A high port of 0 prints as the low port alone, which reads back as that one port.
        changes = {}
        for field, *_ in _PORTS:
            port_range: PortRange | None = getattr(match, field)
            if port_range is not None and port_range.last == 0:
                changes[field] = PortRange(port_range.first, port_range.first, port_range.negated)
        return replace(match, **changes)

    def check(self, match: Conntrack, rule: Rule, chain: str) -> None:
        if match.empty:
            raise RuleError("conntrack: at least one option is required")
        if match.state is not None:
            check_states(match.state.bits, ALL_STATES, "--ctstate")
        if match.status is not None and match.status.bits & ~ALL_STATUSES:
            raise RuleError(f"--ctstatus: unknown status bits 0x{match.status.bits:x}")
        if match.protocol is not None and match.protocol.number == 0:
            raise RuleError("conntrack: --ctproto 0 (all) would never match")
        for field, *_ in _PORTS:
            port_range: PortRange | None = getattr(match, field)
            if port_range is not None:
                ports.check_ports(port_range, f"--{_option(field)}")
        if match.expires is not None and match.expires.min > match.expires.max:
            raise RuleError(f"--ctexpire {match.expires.min}:{match.expires.max}: min > max")

    def encode(self, match: Conntrack) -> XtConntrackMtinfo3:
        data = XtConntrackMtinfo3()
        flags = inverted = 0

        def given(flag: int, negated: bool) -> None:
            nonlocal flags, inverted
            flags |= flag
            inverted |= flag if negated else 0

        if match.state is not None:
            given(XT_CONNTRACK_STATE, match.state.negated)
            data.state_mask = match.state.bits
        if match.protocol is not None:
            given(XT_CONNTRACK_PROTO, match.protocol.negated)
            data.l4proto = match.protocol.number
        for field, flag, *_ in _ADDRESSES:
            address: MaskedAddress | None = getattr(match, field)
            if address is not None:
                given(flag, address.negated)
                set_ipv4(getattr(data, f"{field}_addr"), address.address)
                mask = getattr(data, f"{field}_mask")
                if address.mask == UINT32_MAX:
                    mask.bytes[:] = [0xFF] * 16  # what libxtables writes for no mask
                else:
                    set_ipv4(mask, address.mask)
        for field, flag, *_ in _PORTS:
            port_range: PortRange | None = getattr(match, field)
            if port_range is not None:
                given(flag, port_range.negated)
                setattr(data, field, port_range.first)
                setattr(data, f"{field}_high", port_range.last)
        if match.status is not None:
            given(XT_CONNTRACK_STATUS, match.status.negated)
            data.status_mask = match.status.bits
        if match.expires is not None:
            given(XT_CONNTRACK_EXPIRES, match.expires.negated)
            data.expires_min, data.expires_max = match.expires.min, match.expires.max
        if match.direction is not None:
            given(XT_CONNTRACK_DIRECTION, match.direction == "REPLY")
        data.match_flags, data.invert_flags = flags, inverted
        return data

    def decode(self, data: XtConntrackMtinfo3) -> Conntrack:
        flags, inverted = data.match_flags, data.invert_flags
        if flags & ~KNOWN_FLAGS or inverted & ~flags:
            raise BlobError(f"conntrack match: bad flags 0x{flags:x}, inverted 0x{inverted:x}")
        if flags & XT_CONNTRACK_STATE and data.state_mask & ~ALL_STATES:
            raise BlobError(f"conntrack match: unknown state bits 0x{data.state_mask:x}")
        if flags & XT_CONNTRACK_STATUS and data.status_mask & ~ALL_STATUSES:
            raise BlobError(f"conntrack match: unknown status bits 0x{data.status_mask:x}")
        if flags & XT_CONNTRACK_PROTO and data.l4proto > 0xFF:
            raise BlobError(f"conntrack match: {data.l4proto} is not an IP protocol number")

        def negated(flag: int) -> bool:
            return bool(inverted & flag)

        found: dict[str, object] = {}
        if flags & XT_CONNTRACK_STATE:
            found["state"] = AnyOf(data.state_mask, negated(XT_CONNTRACK_STATE))
        if flags & XT_CONNTRACK_PROTO:
            found["protocol"] = Protocol(data.l4proto, negated(XT_CONNTRACK_PROTO))
        for field, flag, *_ in _ADDRESSES:
            if flags & flag:
                address = ipv4_of(getattr(data, f"{field}_addr"))
                mask = ipv4_of(getattr(data, f"{field}_mask"))
                found[field] = MaskedAddress(address, mask, negated(flag))
        for field, flag, *_ in _PORTS:
            if flags & flag:
                first, last = getattr(data, field), getattr(data, f"{field}_high")
                found[field] = PortRange(first, last, negated(flag))
        if flags & XT_CONNTRACK_STATUS:
            found["status"] = AnyOf(data.status_mask, negated(XT_CONNTRACK_STATUS))
        if flags & XT_CONNTRACK_EXPIRES:
            expiry = Expiry(data.expires_min, data.expires_max, negated(XT_CONNTRACK_EXPIRES))
            found["expires"] = expiry
        if flags & XT_CONNTRACK_DIRECTION:
            found["direction"] = "REPLY" if negated(XT_CONNTRACK_DIRECTION) else "ORIGINAL"
        if not found:
            raise BlobError("conntrack match with no option")
        return Conntrack(**found)  # type: ignore[arg-type]

    def matches(self, match: Conntrack, packet: Packet) -> bool:
        """conntrack_mt: with no entry only --ctstate is looked at, and the match holds only
        if it was given (and held)."""
        if match.state is not None and not match.state.matches(state_bits(packet.connection)):
            return False
        connection = packet.tracked_connection
        if connection is None:
            return match.state is not None
        if match.direction is not None and connection.direction != match.direction:
            return False
        for field, _, side, part in (*_ADDRESSES, *_PORTS):
            option = getattr(match, field)
            if option is not None and not option.matches(getattr(getattr(connection, side), part)):
                return False
        protocol = match.protocol
        if protocol is not None and (connection.protocol == protocol.number) == protocol.negated:
            return False
        if match.status is not None and not match.status.matches(connection.status):
            return False
        return match.expires is None or match.expires.matches(connection.expires)


EXTENSION = ConntrackExtension()
