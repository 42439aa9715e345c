"""The iptables-save / iptables-restore text format of the filter table: `parse` and `write`.

`parse` follows iptables-restore 1.8 (legacy and nft print the same text): its quoting, its
getopt_long option handling (unique prefixes such as `--dp`, `--opt=value`, the newest `-m`
taking an option first), its number syntax (`0x16`, `026`, `10.1` for 10.1.0.0), implicit
protocol matches, comma-separated addresses expanded into several rules, and the checks its
userspace and the kernel make. Where iptables would silently change a value (`--dport 99999`,
an over-long comment) or needs the network (host names), we refuse instead. Anything outside
the supported matches and targets is refused, never ignored.

`write` prints what iptables-legacy-save prints, header comments aside.
"""

import socket
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from codegen.rules.model import (
    CHAIN_NAME_MAX,
    COMMENT_MAX,
    INTERFACE_NAME_MAX,
    MULTIPORT_SLOTS,
    Accept,
    Address,
    AddressRange,
    Chain,
    Comment,
    Drop,
    Fragment,
    Goto,
    IcmpMatch,
    Interface,
    IpRange,
    Jump,
    Length,
    Mark,
    Match,
    Multiport,
    PktType,
    PortRange,
    Protocol,
    Return,
    Rule,
    RuleError,
    Ruleset,
    Source,
    Target,
    TcpFlags,
    TcpMatch,
    Ttl,
    UdpMatch,
    find_loop,
    validate_rule,
)
from codegen.rules.names import (
    BUILTIN_CHAINS,
    EXTENSION_TARGETS,
    ICMP_TYPES,
    MULTIPORT_PROTOCOLS,
    PKT_TYPE_ALIASES,
    PKT_TYPES,
    PROTOCOL_NAMES,
    PROTOCOL_NUMBERS,
    STANDARD_TARGETS,
    SUPPORTED_MATCHES,
    TCP_FLAG_BITS,
    TCP_FLAG_NAMES,
)


class ParseError(RuleError):
    """Text iptables-restore would refuse, or that uses something we do not support."""


SUPPORTED_TARGETS = "ACCEPT, DROP, RETURN, or a user-defined chain"
SUPPORTED_COMMANDS = "-A, -I, -N, -P, -F, -X, -Z"
# Match extensions iptables has that we refuse by name, so the message says "not supported"
# rather than "unknown".
_PROTOCOL_MATCHES = frozenset({"sctp", "dccp", "esp", "ah", "icmp6", "mh"})


# ---------------------------------------------------------------------------------------------
# Lexing


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    column: int  # 1-based, of the token's first character (or its opening quote)


class _Line:
    """One line of input and how to point into it."""

    def __init__(self, filename: str, number: int, text: str) -> None:
        self.filename = filename
        self.number = number
        self.text = text

    def source(self, column: int) -> Source:
        return Source(self.filename, self.number, column, self.text)

    def error(self, message: str, column: int) -> ParseError:
        return ParseError(message, self.source(column))


def _tokenize(line: _Line, start: int) -> list[_Token]:
    """Split like iptables-restore's add_param_to_argv: blanks separate words, `"` quotes,
    `\\` escapes only inside quotes, and a closing quote always ends the word (`"a"b` is two
    words)."""
    text = line.text
    tokens: list[_Token] = []
    buf: list[str] = []
    column = 0
    in_quote = escaped = quoted = False
    quote_column = 0
    i = start
    while i < len(text):
        ch = text[i]
        if in_quote:
            if escaped:
                buf.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
                tokens.append(_Token("".join(buf), column))
                buf, quoted = [], False
            else:
                buf.append(ch)
        elif ch == '"':
            if not buf:
                column = i + 1
            in_quote = quoted = True
            quote_column = i + 1
        elif ch in " \t":
            if buf or quoted:
                tokens.append(_Token("".join(buf), column))
                buf, quoted = [], False
        else:
            if not buf:
                column = i + 1
            buf.append(ch)
        i += 1
    if in_quote:
        raise line.error("unterminated quoted string", quote_column)
    if buf or quoted:
        tokens.append(_Token("".join(buf), column))
    return tokens


# ---------------------------------------------------------------------------------------------
# Numbers, addresses, ports: libxtables' syntax


_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: frozenset(string.hexdigits)}


def _strtoui(text: str, maximum: int, minimum: int = 0) -> int | None:
    """xtables_strtoui with base 0: decimal, 0x hex or 0 octal, an optional leading `+`, the
    whole string consumed; None when it is not such a number in [minimum, maximum]."""
    body = text.lstrip(" \t\n\v\f\r")
    if body.startswith("+"):
        body = body[1:]
    if body[:2] in ("0x", "0X") and len(body) > 2:
        digits, base = body[2:], 16
    elif body.startswith("0"):
        digits, base = body, 8
    else:
        digits, base = body, 10
    allowed = _DIGITS[base]
    if not digits or any(c not in allowed for c in digits):
        return None
    value = int(digits, base)
    if not minimum <= value <= maximum:
        return None
    return value


def _numeric_to_ipaddr(text: str, is_mask: bool = False) -> int | None:
    """libxtables __numeric_to_ipaddr: dotted quad of base-0 bytes; an address (not a mask)
    may stop early and is completed with zeros (`10.1` is 10.1.0.0)."""
    text = text[:19]  # iptables copies into a 20-byte buffer
    parts = text.split(".", 3)
    octets: list[int] = []
    for index in range(4):
        if index == len(parts) - 1 and index < 3:
            if is_mask:
                return None
            value = _strtoui(parts[index], 255)
            if value is None:
                return None
            octets.append(value)
            octets.extend([0] * (3 - index))
            break
        value = _strtoui(parts[index], 255)
        if value is None:
            return None
        octets.append(value)
    return int.from_bytes(bytes(octets), "big")


def _format_ip(value: int) -> str:
    return ".".join(str(b) for b in value.to_bytes(4, "big"))


def _parse_mask(text: str) -> int | None:
    dotted = _numeric_to_ipaddr(text, is_mask=True)
    if dotted is not None:
        return dotted
    bits = _strtoui(text, 32)
    if bits is None:
        return None
    return (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF


def _parse_addresses(line: _Line, token: _Token) -> list[tuple[int, int]]:
    """xtables_ipparse_multiple: `a[/m][,b[/m]...]`, each address masked."""
    result: list[tuple[int, int]] = []
    for item in token.text.split(","):
        item = item.lstrip(" \t\n\v\f\r")
        address_text, slash, mask_text = item.rpartition("/")
        if not slash:
            address_text, mask_text = item, ""
        if slash:
            mask = _parse_mask(mask_text)
            if mask is None:
                raise line.error(f"invalid mask '{mask_text}' in '{token.text}'", token.column)
        else:
            mask = 0xFFFFFFFF
        if mask == 0:
            # iptables ignores the address of a /0 ("any/0"), whatever it is.
            address_text = "0.0.0.0"
        address = _numeric_to_ipaddr(address_text)
        if address is None:
            raise line.error(
                f"host/network '{address_text}' is not an IPv4 address"
                " (host names are not supported)",
                token.column,
            )
        result.append((address & mask, mask))
    return result


def _parse_port(text: str, protocol: str) -> int | None:
    value = _strtoui(text, 0xFFFF)
    if value is not None:
        return value
    if not text or not text.isprintable() or not text.isascii():
        return None
    try:
        # iptables asks getservbyname, i.e. /etc/services, for names like `ssh`.
        return socket.getservbyname(text, protocol)
    except (OSError, ValueError, UnicodeError):
        return None


def _parse_protocol(text: str) -> int | None:
    text = text.lower()
    value = _strtoui(text, 255)
    if value is not None:
        return value
    return PROTOCOL_NUMBERS.get(text)


# ---------------------------------------------------------------------------------------------
# Match extensions: each collects its options and builds one model match at the end of the rule.


@dataclass
class _OptionContext:
    line: _Line
    option: _Token  # the option word, e.g. `--dport`
    value: _Token | None  # its argument
    negated: bool
    next_word: Callable[[], _Token | None]  # take one more argument (--tcp-flags)
    protocol: int | None  # the rule's -p so far

    def error(self, message: str, at_value: bool = False) -> ParseError:
        token = self.value if at_value and self.value is not None else self.option
        return self.line.error(message, token.column)


class _MatchParser:
    name = ""
    # long option name -> (key, takes an argument)
    options: dict[str, tuple[str, bool]] = {}
    invertible: frozenset[str] = frozenset()

    def __init__(self, token: _Token, implicit: bool) -> None:
        self.token = token
        self.implicit = implicit
        self.given: dict[str, _Token] = {}

    def option(self, key: str, ctx: _OptionContext) -> None:
        if ctx.negated and key not in self.invertible:
            raise ctx.error(f"{self.name}: option '{ctx.option.text}' cannot be negated")
        if ctx.value is not None and ctx.value.text == "!" and self.name != "comment":
            raise ctx.error(
                f"'!' after the option is old syntax: write '! {ctx.option.text} VALUE'",
                at_value=True,
            )
        self.parse(key, ctx)
        self.given[key] = ctx.option

    def parse(self, key: str, ctx: _OptionContext) -> None:
        raise NotImplementedError

    def finish(self, line: _Line) -> Match:
        raise NotImplementedError

    def once(self, key: str, ctx: _OptionContext, label: str) -> None:
        if key in self.given:
            raise ctx.error(f"{self.name}: only one {label} allowed")

    def missing(self, line: _Line, what: str) -> ParseError:
        return line.error(f"{self.name}: {what} must be specified", self.token.column)


def _port_range(text: str, protocol: str, ctx: _OptionContext, negated: bool) -> PortRange:
    low_text, colon, high_text = text.partition(":")
    if colon:
        low = _parse_port(low_text, protocol) if low_text else 0
        high = _parse_port(high_text, protocol) if high_text else 0xFFFF
        bad = low_text if low is None else high_text
    else:
        low = high = _parse_port(text, protocol)
        bad = text
    if low is None or high is None:
        raise ctx.error(f"invalid port/service '{bad}' (ports are 0-65535)", at_value=True)
    if low > high:
        raise ctx.error(f"invalid port range '{text}' (min > max)", at_value=True)
    return PortRange(low, high, negated)


class _TcpUdpParser(_MatchParser):
    invertible = frozenset({"sport", "dport", "syn", "flags"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.sport = PortRange()
        self.dport = PortRange()
        self.flags = TcpFlags()

    def parse(self, key: str, ctx: _OptionContext) -> None:
        if key in ("sport", "dport"):
            label = "--source-port" if key == "sport" else "--destination-port"
            self.once(key, ctx, label)
            assert ctx.value is not None
            ports = _port_range(ctx.value.text, self.name, ctx, ctx.negated)
            if key == "sport":
                self.sport = ports
            else:
                self.dport = ports
            return
        if "syn" in self.given or "flags" in self.given:
            raise ctx.error("tcp: only one of --syn or --tcp-flags allowed")
        if key == "syn":
            self.flags = TcpFlags.syn(ctx.negated)
            return
        if key == "option":
            raise ctx.error(
                "tcp: --tcp-option is not supported (supported: --sport, --dport, --syn,"
                " --tcp-flags)"
            )
        assert ctx.value is not None
        compare = ctx.next_word()
        if compare is None:
            raise ctx.error("--tcp-flags needs two arguments: MASK COMP, e.g. SYN,ACK SYN")
        mask = self._flags(ctx.value, ctx)
        self.flags = TcpFlags(mask, self._flags(compare, ctx), ctx.negated)

    @staticmethod
    def _flags(token: _Token, ctx: _OptionContext) -> int:
        value = 0
        for name in token.text.split(","):
            if not name:
                continue  # strtok skips empty fields: `SYN,` is SYN
            bit = TCP_FLAG_NAMES.get(name.upper())
            if bit is None:
                raise ctx.line.error(
                    f"unknown TCP flag '{name}' (flags: FIN SYN RST PSH ACK URG ALL NONE)",
                    token.column,
                )
            value |= bit
        return value


class _TcpParser(_TcpUdpParser):
    name = "tcp"
    options = {
        "source-port": ("sport", True),
        "sport": ("sport", True),
        "destination-port": ("dport", True),
        "dport": ("dport", True),
        "syn": ("syn", False),
        "tcp-flags": ("flags", True),
        "tcp-option": ("option", True),
    }

    def finish(self, line: _Line) -> Match:
        return TcpMatch(self.sport, self.dport, self.flags)


class _UdpParser(_TcpUdpParser):
    name = "udp"
    options = {
        "source-port": ("sport", True),
        "sport": ("sport", True),
        "destination-port": ("dport", True),
        "dport": ("dport", True),
    }

    def finish(self, line: _Line) -> Match:
        return UdpMatch(self.sport, self.dport)


def _parse_icmp_type(text: str, ctx: _OptionContext) -> IcmpMatch:
    found: tuple[str, int, int, int] | None = None
    for entry in ICMP_TYPES:
        # libxt_icmp accepts any unambiguous, case-insensitive prefix of a name.
        if entry[0].lower().startswith(text.lower()):
            if found is not None:
                raise ctx.error(
                    f"ambiguous ICMP type '{text}': '{found[0]}' or '{entry[0]}'?", at_value=True
                )
            found = entry
    if found is not None:
        _, icmp_type, code_min, code_max = found
        return IcmpMatch(icmp_type, code_min, code_max, ctx.negated)
    type_text, slash, code_text = text.partition("/")
    icmp_type = _strtoui(type_text, 255)
    if icmp_type is None:
        raise ctx.error(f"unknown ICMP type '{text}'", at_value=True)
    if not slash:
        return IcmpMatch(icmp_type, 0, 0xFF, ctx.negated)
    code = _strtoui(code_text, 255)
    if code is None:
        raise ctx.error(f"unknown ICMP code '{text}'", at_value=True)
    return IcmpMatch(icmp_type, code, code, ctx.negated)


class _IcmpParser(_MatchParser):
    name = "icmp"
    options = {"icmp-type": ("type", True)}
    invertible = frozenset({"type"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: IcmpMatch | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, "--icmp-type")
        assert ctx.value is not None
        self.match = _parse_icmp_type(ctx.value.text, ctx)

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "--icmp-type")
        return self.match


class _MultiportParser(_MatchParser):
    name = "multiport"
    options = {
        "source-ports": ("src", True),
        "sports": ("src", True),
        "destination-ports": ("dst", True),
        "dports": ("dst", True),
        "ports": ("any", True),
    }
    invertible = frozenset({"src", "dst", "any"})
    labels = {"src": "--sports", "dst": "--dports", "any": "--ports"}

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Multiport | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        if self.given:
            (other,) = self.given
            if other == key:
                raise ctx.error(f"multiport: {self.labels[key]} can only be used once")
            raise ctx.error(
                f"multiport: {self.labels[key]} cannot be used together with {self.labels[other]}"
            )
        if ctx.protocol not in MULTIPORT_PROTOCOLS:
            raise ctx.error(
                "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' or '-p dccp' before it"
            )
        assert ctx.value is not None
        protocol = PROTOCOL_NAMES[ctx.protocol]
        ports: list[tuple[int, int]] = []
        slots = 0
        for item in ctx.value.text.split(","):
            low_text, colon, high_text = item.partition(":")
            low = _parse_port(low_text, protocol)
            high = _parse_port(high_text, protocol) if colon else low
            if low is None or high is None:
                bad = low_text if low is None else high_text
                raise ctx.error(f"invalid port/service '{bad}' (ports are 0-65535)", True)
            if colon and low >= high:
                raise ctx.error(f"invalid port range '{item}' (min >= max)", True)
            slots += 2 if colon else 1
            if slots > MULTIPORT_SLOTS:
                raise ctx.error(
                    f"too many ports: {MULTIPORT_SLOTS} max, a range counts as two", True
                )
            ports.append((low, high))
        self.match = Multiport(key, tuple(ports), ctx.negated)  # type: ignore[arg-type]

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "one of --sports, --dports or --ports")
        return self.match


class _IpRangeParser(_MatchParser):
    name = "iprange"
    options = {"src-range": ("src", True), "dst-range": ("dst", True)}
    invertible = frozenset({"src", "dst"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.ranges: dict[str, AddressRange] = {}

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, f"--{key}-range")
        assert ctx.value is not None
        first_text, dash, last_text = ctx.value.text.partition("-")
        first = _numeric_to_ipaddr(first_text)
        last = _numeric_to_ipaddr(last_text) if dash else first
        if first is None or last is None:
            bad = first_text if first is None else last_text
            raise ctx.error(f"iprange: bad IP address '{bad}'", at_value=True)
        self.ranges[key] = AddressRange(first, last, ctx.negated)

    def finish(self, line: _Line) -> Match:
        if not self.ranges:
            raise self.missing(line, "--src-range or --dst-range")
        return IpRange(self.ranges.get("src"), self.ranges.get("dst"))


class _LengthParser(_MatchParser):
    name = "length"
    options = {"length": ("length", True)}
    invertible = frozenset({"length"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Length | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, "--length")
        assert ctx.value is not None
        text = ctx.value.text
        low_text, colon, high_text = text.partition(":")
        low = _strtoui(low_text, 0xFFFF) if low_text else 0
        high = (_strtoui(high_text, 0xFFFF) if high_text else 0xFFFF) if colon else low
        if low is None or high is None or (colon and ":" in high_text):
            raise ctx.error(f"length: bad value '{text}' (0-65535 or MIN:MAX)", at_value=True)
        self.match = Length(low, high, ctx.negated)

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "--length")
        return self.match


class _TtlParser(_MatchParser):
    name = "ttl"
    options = {"ttl-eq": ("eq", True), "ttl-lt": ("lt", True), "ttl-gt": ("gt", True)}
    invertible = frozenset({"eq"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Ttl | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        if self.given:
            (other,) = self.given
            if other == key:
                raise ctx.error(f"ttl: --ttl-{key} can only be used once")
            raise ctx.error(f"ttl: --ttl-{key} cannot be used together with --ttl-{other}")
        assert ctx.value is not None
        value = _strtoui(ctx.value.text, 255)
        if value is None:
            raise ctx.error(f"ttl: bad value '{ctx.value.text}' (0-255)", at_value=True)
        self.match = Ttl(key, value, ctx.negated)  # type: ignore[arg-type]

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "one of --ttl-eq, --ttl-lt or --ttl-gt")
        return self.match


class _PktTypeParser(_MatchParser):
    name = "pkttype"
    options = {"pkt-type": ("type", True)}
    invertible = frozenset({"type"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: PktType | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, "--pkt-type")
        assert ctx.value is not None
        name = ctx.value.text.lower()
        name = PKT_TYPE_ALIASES.get(name, name)
        if name not in PKT_TYPES:
            raise ctx.error(
                f"bad packet type '{ctx.value.text}' (unicast, broadcast, multicast, otherhost)",
                at_value=True,
            )
        self.match = PktType(name, ctx.negated)  # type: ignore[arg-type]

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "--pkt-type")
        return self.match


class _MarkParser(_MatchParser):
    name = "mark"
    options = {"mark": ("mark", True)}
    invertible = frozenset({"mark"})

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Mark | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, "--mark")
        assert ctx.value is not None
        value_text, slash, mask_text = ctx.value.text.partition("/")
        value = _strtoui(value_text, 0xFFFFFFFF)
        mask = _strtoui(mask_text, 0xFFFFFFFF) if slash else 0xFFFFFFFF
        if value is None or mask is None:
            raise ctx.error(
                f"mark: bad value '{ctx.value.text}' (VALUE[/MASK], 32-bit)", at_value=True
            )
        self.match = Mark(value, mask, ctx.negated)

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "--mark")
        return self.match


class _CommentParser(_MatchParser):
    name = "comment"
    options = {"comment": ("comment", True)}

    def __init__(self, token: _Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Comment | None = None

    def parse(self, key: str, ctx: _OptionContext) -> None:
        self.once(key, ctx, "--comment")
        assert ctx.value is not None
        size = len(ctx.value.text.encode())
        if size > COMMENT_MAX:
            # iptables would cut it to 255 bytes without a word; refuse instead.
            raise ctx.error(f"comment is {size} bytes long, {COMMENT_MAX} max", at_value=True)
        self.match = Comment(ctx.value.text)

    def finish(self, line: _Line) -> Match:
        if self.match is None:
            raise self.missing(line, "--comment")
        return self.match


_MATCH_PARSERS: dict[str, type[_MatchParser]] = {
    cls.name: cls
    for cls in (
        _TcpParser,
        _UdpParser,
        _IcmpParser,
        _MultiportParser,
        _IpRangeParser,
        _LengthParser,
        _TtlParser,
        _PktTypeParser,
        _MarkParser,
        _CommentParser,
    )
}
assert tuple(_MATCH_PARSERS) == SUPPORTED_MATCHES


# ---------------------------------------------------------------------------------------------
# The command line of one rule: iptables' own options, read as getopt_long reads them.

# long name -> short letter; `src`/`dst` are synonyms, as in iptables.
_LONG_OPTIONS: tuple[tuple[str, str], ...] = (
    ("append", "A"),
    ("delete", "D"),
    ("check", "C"),
    ("insert", "I"),
    ("replace", "R"),
    ("list", "L"),
    ("list-rules", "S"),
    ("flush", "F"),
    ("zero", "Z"),
    ("new-chain", "N"),
    ("delete-chain", "X"),
    ("rename-chain", "E"),
    ("policy", "P"),
    ("source", "s"),
    ("destination", "d"),
    ("src", "s"),
    ("dst", "d"),
    ("protocol", "p"),
    ("in-interface", "i"),
    ("jump", "j"),
    ("table", "t"),
    ("match", "m"),
    ("numeric", "n"),
    ("out-interface", "o"),
    ("verbose", "v"),
    ("wait", "w"),
    ("wait-interval", "W"),
    ("exact", "x"),
    ("fragments", "f"),
    ("version", "V"),
    ("help", "h"),
    ("line-numbers", "0"),
    ("modprobe", "M"),
    ("set-counters", "c"),
    ("goto", "g"),
    ("ipv4", "4"),
    ("ipv6", "6"),
)
# Letters whose option takes a required argument (getopt "A:C:..."); F, X, Z, L, S take an
# optional one that iptables reads from the next word itself.
_WITH_ARGUMENT = frozenset("ACDRIENPMospdjitmcg")
_KNOWN_LETTERS = frozenset("ACDRILSMFZNXEPVhopsdjifbvwWntmxcg046")
_COMMANDS = frozenset("ADCRILSFZNXEP")
_RULE_OPTIONS = frozenset("sdiopfjgmc")
_NEGATABLE = frozenset("sdiopf")
_UNSUPPORTED_OPTIONS = {
    "t": "the -t option cannot be used in a rule file: the table is set by '*filter'",
    "M": "--modprobe is not supported in rule files",
    "6": "this is IPv4 (iptables), not IPv6",
}


@dataclass
class _RuleLine:
    """What one `-A ...` style line said."""

    command: str = ""
    command_token: _Token | None = None
    chain: str = ""
    chain_token: _Token | None = None
    argument: _Token | None = None  # -I rule number, -P policy
    sources: list[tuple[int, int]] | None = None
    source_token: _Token | None = None
    destinations: list[tuple[int, int]] | None = None
    destination_token: _Token | None = None
    negated: dict[str, bool] = field(default_factory=dict)
    interfaces: dict[str, str] = field(default_factory=dict)
    protocol: int | None = None
    protocol_text: str = ""
    fragment: bool = False
    matches: list[_MatchParser] = field(default_factory=list)
    implicit_loaded: bool = False
    target: Target | None = None
    target_token: _Token | None = None
    counters: tuple[int, int] | None = None
    seen: dict[str, _Token] = field(default_factory=dict)


class _RuleParser:
    def __init__(self, line: _Line, tokens: list[_Token], ruleset: Ruleset) -> None:
        self.line = line
        self.tokens = tokens
        self.ruleset = ruleset
        self.index = 0
        self.state = _RuleLine()

    # getopt helpers

    def _next_word(self) -> _Token | None:
        """The next word if it can be an argument iptables reads on its own (xs_has_arg)."""
        if self.index < len(self.tokens):
            token = self.tokens[self.index]
            if not token.text.startswith(("-", "!")):
                self.index += 1
                return token
        return None

    def _required(self, option: _Token, attached: str | None, column: int) -> _Token:
        if attached is not None:
            return _Token(attached, column)
        if self.index >= len(self.tokens):
            raise self.line.error(f"option '{option.text}' requires an argument", option.column)
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _lookup_long(self, name: str, token: _Token) -> tuple[str, _MatchParser | None, bool]:
        """getopt_long: an exact name wins, else a unique prefix; iptables' options come
        first, then those of the newest match."""
        table: list[tuple[str, str, _MatchParser | None, bool]] = [
            (long, letter, None, letter in _WITH_ARGUMENT) for long, letter in _LONG_OPTIONS
        ]
        for parser in reversed(self.state.matches):
            for long, (key, takes) in parser.options.items():
                table.append((long, key, parser, takes))
        for long, key, parser, takes in table:
            if long == name:
                return key, parser, takes
        found = [entry for entry in table if entry[0].startswith(name)]
        if not found:
            raise KeyError(name)
        first = found[0]
        for entry in found[1:]:
            if (entry[1], id(entry[2])) != (first[1], id(first[2])):
                names = ", ".join(f"--{e[0]}" for e in found)
                raise self.line.error(
                    f"option '--{name}' is ambiguous (could be {names})", token.column
                )
        return first[1], first[2], first[3]

    def _load_implicit(self, token: _Token) -> bool:
        """iptables loads the match named after `-p` when it meets an option it does not
        know, once per rule (`-p tcp --dport 22`)."""
        state = self.state
        if state.protocol_text == "" or state.implicit_loaded:
            return False
        name = state.protocol_text
        number = _strtoui(name, 255)
        if number is not None:
            name = PROTOCOL_NAMES.get(number, "")
        if name in _PROTOCOL_MATCHES:
            raise self.line.error(
                f"option '{token.text}' needs the {name} match, which is not supported"
                f" (supported matches: {', '.join(SUPPORTED_MATCHES)})",
                token.column,
            )
        parser = _MATCH_PARSERS.get(name)
        if parser is None or name not in ("tcp", "udp", "icmp"):
            return False
        state.matches.append(parser(token, implicit=True))
        state.implicit_loaded = True
        return True

    # the main loop

    def parse(self) -> _RuleLine:
        negate_token: _Token | None = None
        while self.index < len(self.tokens):
            token = self.tokens[self.index]
            self.index += 1
            text = token.text
            if text == "!":
                if negate_token is not None:
                    raise self.line.error("multiple consecutive '!' not allowed", token.column)
                negate_token = token
                continue
            if text.startswith("--") and len(text) > 2:
                self._long_option(token, negate_token)
            elif text.startswith("-") and len(text) == 2 and text != "--":
                self._short_option(token, text[1], None, negate_token)
            elif text.startswith("-") and len(text) > 2 and text[1] in _WITH_ARGUMENT:
                raise self.line.error(
                    f"write the option and its argument as two words: '{text[:2]} {text[2:]}'",
                    token.column,
                )
            elif text.startswith("-") and len(text) > 2:
                raise self.line.error(f"unknown option '{text}'", token.column)
            else:
                raise self.line.error(f"bad argument '{text}'", token.column)
            negate_token = None
        if negate_token is not None:
            raise self.line.error("nothing appropriate following '!'", negate_token.column)
        return self.state

    def _long_option(self, token: _Token, negate: _Token | None) -> None:
        name, equals, attached_text = token.text[2:].partition("=")
        attached = attached_text if equals else None
        column = token.column + 3 + len(name)
        while True:
            try:
                key, parser, takes = self._lookup_long(name, token)
            except KeyError:
                if self._load_implicit(token):
                    continue
                raise self.line.error(
                    f"unknown option '--{name}'" + self._option_hint(), token.column
                ) from None
            break
        if parser is None:
            self._short_option(token, key, attached, negate, column)
            return
        if not takes and attached is not None:
            raise self.line.error(f"option '--{name}' takes no argument", token.column)
        value = self._required(token, attached, column) if takes else None
        ctx = _OptionContext(
            self.line, token, value, negate is not None, self._next_word, self.state.protocol
        )
        parser.option(key, ctx)

    def _option_hint(self) -> str:
        if self.state.protocol_text == "":
            return " (options like --dport need '-p tcp' or '-p udp' before them)"
        return ""

    def _short_option(
        self,
        token: _Token,
        letter: str,
        attached: str | None,
        negate: _Token | None,
        column: int = 0,
    ) -> None:
        line, state = self.line, self.state
        if letter not in _KNOWN_LETTERS:
            raise line.error(f"unknown option '{token.text}'" + self._option_hint(), token.column)
        if letter in _UNSUPPORTED_OPTIONS:
            raise line.error(_UNSUPPORTED_OPTIONS[letter], token.column)
        if letter in "VhLS0nvxwWb4":
            raise line.error(
                f"option '{token.text}' has no place in a rule file"
                f" (supported commands: {SUPPORTED_COMMANDS})",
                token.column,
            )
        if negate is not None and letter not in _NEGATABLE:
            if letter == "m":
                raise line.error(
                    "unexpected '!' before -m (negate the match's options)", negate.column
                )
            raise line.error(f"cannot have '!' before {token.text}", negate.column)
        negated = negate is not None
        if letter in _COMMANDS:
            self._command(token, letter, attached, column)
            return
        if letter not in _WITH_ARGUMENT:
            if attached is not None:
                raise line.error(f"option '{token.text}' takes no argument", token.column)
            value = _Token("", token.column)
        else:
            value = self._required(token, attached, column)
        if value.text == "!" and letter in "sdiop":
            raise line.error(
                f"'!' after the option is old syntax: write '! {token.text} VALUE'", value.column
            )
        if letter == "m":
            self._match(token, value)
            return
        if letter in state.seen and letter != "m":
            raise line.error(f"multiple {token.text} options not allowed", token.column)
        if letter == "g" and "j" in state.seen or letter == "j" and "g" in state.seen:
            raise line.error("only one of -j and -g allowed", token.column)
        state.seen[letter] = token
        if letter in "sd":
            addresses = _parse_addresses(line, value)
            state.negated[letter] = negated
            if letter == "s":
                state.sources, state.source_token = addresses, value
            else:
                state.destinations, state.destination_token = addresses, value
        elif letter in "io":
            name = value.text
            if name == "":
                raise line.error(f"empty interface name after {token.text}", value.column)
            if len(name) > INTERFACE_NAME_MAX:
                raise line.error(
                    f"interface name '{name}' must be shorter than IFNAMSIZ"
                    f" ({INTERFACE_NAME_MAX} characters max)",
                    value.column,
                )
            state.interfaces[letter] = name
            state.negated[letter] = negated
        elif letter == "p":
            number = _parse_protocol(value.text)
            if number is None:
                raise line.error(f"unknown protocol '{value.text}'", value.column)
            if number == 0 and negate is not None:
                raise line.error("'! -p all' would never match", negate.column)
            state.protocol = number
            state.protocol_text = value.text.lower()
            state.negated["p"] = negated
        elif letter == "f":
            state.fragment = True
            state.negated["f"] = negated
        elif letter in "jg":
            state.target = self._target(letter, value)
            state.target_token = token
        elif letter == "c":
            packets = value.text
            count = self._required(token, None, column)
            if not packets.isdigit() or not count.text.isdigit():
                raise line.error("-c needs two decimal numbers: packets and bytes", token.column)
            state.counters = (int(packets), int(count.text))

    def _command(self, token: _Token, letter: str, attached: str | None, column: int) -> None:
        line, state = self.line, self.state
        if state.command:
            raise line.error(
                f"only one command per line: -{letter} and -{state.command}", token.column
            )
        if letter not in "AINPFXZ":
            raise line.error(
                f"command '{token.text}' is not supported in rule files"
                f" (supported: {SUPPORTED_COMMANDS})",
                token.column,
            )
        state.command, state.command_token = letter, token
        if letter in "AINP":
            chain = self._required(token, attached, column)
        else:
            chain = _Token(attached, column) if attached is not None else self._next_word()
        if chain is not None:
            state.chain, state.chain_token = chain.text, chain
        if letter == "I":
            state.argument = self._next_word()
        elif letter == "P":
            state.argument = self._next_word()
            if state.argument is None:
                raise line.error("-P needs a chain and a policy", token.column)

    def _match(self, token: _Token, value: _Token) -> None:
        parser = _MATCH_PARSERS.get(value.text)
        if parser is None:
            raise self.line.error(
                f"match '-m {value.text}' is not supported"
                f" (supported matches: {', '.join(SUPPORTED_MATCHES)})",
                token.column,
            )
        self.state.matches.append(parser(token, implicit=False))

    def _target(self, letter: str, value: _Token) -> Target:
        name = value.text
        line = self.line
        chain = self.ruleset.chains.get(name)
        if chain is not None and not chain.builtin:
            return Jump(name) if letter == "j" else Goto(name)
        if name in BUILTIN_CHAINS:
            verb = "jump to" if letter == "j" else "goto"
            raise line.error(f"cannot {verb} built-in chain '{name}'", value.column)
        if letter == "g":
            raise line.error(f"goto '{name}' is not a user-defined chain", value.column)
        if name == "ACCEPT":
            return Accept()
        if name == "DROP":
            return Drop()
        if name == "RETURN":
            return Return()
        if name == "":
            raise line.error("empty target name after -j", value.column)
        if name in STANDARD_TARGETS or name in EXTENSION_TARGETS:
            raise line.error(
                f"target '{name}' is not supported (supported targets: {SUPPORTED_TARGETS})",
                value.column,
            )
        raise line.error(
            f"chain or target '{name}' does not exist (chains must be declared before use;"
            f" supported targets: {SUPPORTED_TARGETS})",
            value.column,
        )


# ---------------------------------------------------------------------------------------------
# Whole files


class _Parser:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.committed: Ruleset | None = None
        self.staging: Ruleset | None = None
        self.table_line: _Line | None = None

    def parse(self, text: str) -> Ruleset:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for number, raw in enumerate(lines, 1):
            self._line(_Line(self.filename, number, raw))
        if self.staging is not None:
            end = _Line(self.filename, len(lines) + 1, "")
            raise end.error("COMMIT expected at end of input (the *filter table is open)", 1)
        return self.committed if self.committed is not None else Ruleset()

    def _line(self, line: _Line) -> None:
        raw = line.text
        for bad, what in (("\r", "a carriage return (DOS line end?)"), ("\0", "a NUL byte")):
            if bad in raw:
                raise line.error(f"line contains {what}", raw.index(bad) + 1)
        if raw == "" or raw.startswith("#"):
            return
        if self.staging is None:
            if raw.startswith("*"):
                self._table(line)
                return
            if raw == "COMMIT" or raw.startswith(":"):
                raise line.error(f"'{raw.split()[0]}' outside a table: '*filter' expected", 1)
            raise line.error("rule outside a table: '*filter' expected first", 1)
        if raw == "COMMIT":
            self._commit(line)
        elif raw.startswith(":"):
            self._chain_line(line)
        else:
            self._rule_line(line)

    def _table(self, line: _Line) -> None:
        name = line.text[1:].split()[0] if line.text[1:].split() else ""
        if name != "filter":
            raise line.error(f"table '{name}': only the filter table is supported", 1)
        fresh = Ruleset()
        if self.committed is not None:
            # iptables-restore flushes the table but keeps the built-in policies.
            for builtin in BUILTIN_CHAINS:
                old = self.committed.chains[builtin]
                chain = fresh.chains[builtin]
                chain.policy, chain.packets, chain.bytes = old.policy, old.packets, old.bytes
        for chain in fresh.chains.values():
            chain.source = line.source(1)
        self.staging = fresh
        self.table_line = line

    def _commit(self, line: _Line) -> None:
        assert self.staging is not None
        loop = find_loop(self.staging)
        if loop is not None:
            path, rule = loop
            source = rule.source or line.source(1)
            raise ParseError(f"loop in the chain graph: {' -> '.join(path)}", source)
        self.committed = self.staging
        self.staging = None

    def _chain_line(self, line: _Line) -> None:
        assert self.staging is not None
        raw = line.text
        words: list[_Token] = []
        i = 1
        while i < len(raw):
            if raw[i] in " \t":
                i += 1
                continue
            start = i
            while i < len(raw) and raw[i] not in " \t":
                i += 1
            words.append(_Token(raw[start:i], start + 1))
        if not words:
            raise line.error("chain name missing after ':'", 1)
        name_token = words[0]
        name = name_token.text
        if len(name) > CHAIN_NAME_MAX:
            raise line.error(
                f"invalid chain name '{name}' ({CHAIN_NAME_MAX} characters max)",
                name_token.column,
            )
        ruleset = self.staging
        builtin = name in BUILTIN_CHAINS
        if not builtin:
            if name in STANDARD_TARGETS:
                raise line.error(
                    f"chain name '{name}' is reserved for the verdict {name}", name_token.column
                )
            if name in ruleset.chains:
                raise line.error(f"chain '{name}' already exists", name_token.column)
            ruleset.add_chain(name, line.source(1))
        if len(words) < 2:
            raise line.error(f"policy missing for chain '{name}' (ACCEPT, DROP or -)", len(raw) + 1)
        policy = words[1]
        if policy.text == "-":
            return
        if not builtin:
            raise line.error(
                f"user-defined chain '{name}' cannot have a policy (write '-')", policy.column
            )
        if policy.text not in ("ACCEPT", "DROP"):
            raise line.error(
                f"bad policy '{policy.text}' for {name} (ACCEPT or DROP)", policy.column
            )
        chain = ruleset.chains[name]
        chain.policy = policy.text  # type: ignore[assignment]
        chain.source = line.source(1)
        if len(words) > 2:
            counters = _parse_counters(words[2].text)
            if counters is None:
                raise line.error(
                    f"invalid policy counters '{words[2].text}' ([PACKETS:BYTES] expected)",
                    words[2].column,
                )
            chain.packets, chain.bytes = counters
        if len(words) > 3:
            raise line.error(f"unexpected '{words[3].text}' after the counters", words[3].column)

    def _rule_line(self, line: _Line) -> None:
        assert self.staging is not None
        raw = line.text
        start = 0
        counters: tuple[int, int] | None = None
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise line.error("counters '[' without ']'", 1)
            counters = _parse_counters(raw[: end + 1])
            if counters is None:
                raise line.error(
                    f"invalid counters '{raw[: end + 1]}' ([PACKETS:BYTES] expected)", 1
                )
            start = end + 1
        tokens = _tokenize(line, start)
        if not tokens:
            raise line.error("no command on this line", 1)
        if raw.lstrip().startswith("*"):
            raise line.error("new table inside the open one: COMMIT expected first", 1)
        state = _RuleParser(line, tokens, self.staging).parse()
        if state.counters is not None:
            counters = state.counters
        _apply(line, tokens[0].column, state, self.staging, counters or (0, 0))


def _parse_counters(text: str) -> tuple[int, int] | None:
    if not (text.startswith("[") and text.endswith("]")):
        return None
    packets, colon, count = text[1:-1].partition(":")
    if not colon or not packets.isdigit() or not count.isdigit():
        return None
    if not packets.isascii() or not count.isascii():
        return None
    values = int(packets), int(count)
    if max(values) >= 1 << 64:
        return None
    return values


def _apply(
    line: _Line, column: int, state: _RuleLine, ruleset: Ruleset, counters: tuple[int, int]
) -> None:
    command = state.command
    if not command:
        raise line.error(f"no command specified (supported: {SUPPORTED_COMMANDS})", column)
    assert state.command_token is not None
    command_token = state.command_token
    if command not in "AI":
        for token in state.seen.values():
            raise line.error(f"option {token.text} cannot be used with -{command}", token.column)
        if state.matches:
            token = state.matches[0].token
            raise line.error(f"option {token.text} cannot be used with -{command}", token.column)
    chain_token = state.chain_token
    chain_column = chain_token.column if chain_token else command_token.column
    name = state.chain
    if command == "N":
        if name.startswith("-"):
            raise line.error("chain name not allowed to start with '-'", chain_column)
        if name in EXTENSION_TARGETS or name in STANDARD_TARGETS:
            raise line.error(f"chain name '{name}' may not clash with a target name", chain_column)
        if len(name) > CHAIN_NAME_MAX:
            raise line.error(
                f"chain name '{name}' too long ({CHAIN_NAME_MAX} characters max)", chain_column
            )
        if name in ruleset.chains:
            raise line.error(f"chain '{name}' already exists", chain_column)
        try:
            ruleset.add_chain(name, line.source(command_token.column))
        except RuleError as error:
            raise line.error(error.message, chain_column) from None
        return
    if name and name not in ruleset.chains:
        raise line.error(f"chain '{name}' does not exist", chain_column)
    if command == "P":
        assert state.argument is not None
        chain = ruleset.chains[name]
        if not chain.builtin:
            raise line.error(f"-P works only on built-in chains, not '{name}'", chain_column)
        if state.argument.text not in ("ACCEPT", "DROP"):
            raise line.error(
                f"bad policy '{state.argument.text}' (ACCEPT or DROP)", state.argument.column
            )
        chain.policy = state.argument.text  # type: ignore[assignment]
        return
    targets = [ruleset.chains[name]] if name else list(ruleset.chains.values())
    if command == "F":
        for chain in targets:
            chain.rules.clear()
        return
    if command == "Z":
        for chain in targets:
            chain.packets = chain.bytes = 0
            for rule in chain.rules:
                rule.packets = rule.bytes = 0
        return
    if command == "X":
        _delete_chains(line, ruleset, [c for c in targets if not c.builtin], name, chain_column)
        return
    _add_rules(line, column, state, ruleset, counters)


def _delete_chains(
    line: _Line, ruleset: Ruleset, chains: list[Chain], name: str, column: int
) -> None:
    if name and name in BUILTIN_CHAINS:
        raise line.error(f"cannot delete built-in chain '{name}'", column)
    doomed = {chain.name for chain in chains}
    for chain in chains:
        if chain.rules:
            raise line.error(f"cannot delete chain '{chain.name}': it is not empty", column)
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            target = rule.target
            if isinstance(target, Jump | Goto) and target.chain in doomed:
                raise line.error(
                    f"cannot delete chain '{target.chain}': '{chain.name}' refers to it", column
                )
    for chain in chains:
        del ruleset.chains[chain.name]


def _add_rules(
    line: _Line, column: int, state: _RuleLine, ruleset: Ruleset, counters: tuple[int, int]
) -> None:
    chain = ruleset.chains[state.chain]
    sources = state.sources or [(0, 0)]
    destinations = state.destinations or [(0, 0)]
    if (len(sources) > 1 or len(destinations) > 1) and (
        state.negated.get("s") or state.negated.get("d")
    ):
        token = state.source_token if len(sources) > 1 else state.destination_token
        assert token is not None
        raise line.error(
            "'!' not allowed with multiple source or destination addresses", token.column
        )
    extensions: list[Match] = []
    for parser in state.matches:
        extensions.append(parser.finish(line))
    position = len(chain.rules)
    if state.command == "I":
        position = 0
        if state.argument is not None:
            number = _strtoui(state.argument.text, 2**31 - 1, minimum=1)
            if number is None:
                raise line.error(
                    f"invalid rule number '{state.argument.text}'", state.argument.column
                )
            if number > len(chain.rules) + 1:
                raise line.error(
                    f"cannot insert at {number}: chain '{chain.name}' has {len(chain.rules)} rules",
                    state.argument.column,
                )
            position = number - 1
    new_rules: list[Rule] = []
    for src_address, src_mask in sources:
        for dst_address, dst_mask in destinations:
            matches: list[Match] = []
            if src_mask or state.negated.get("s"):
                matches.append(Address("src", src_address, src_mask, state.negated.get("s", False)))
            if dst_mask or state.negated.get("d"):
                matches.append(Address("dst", dst_address, dst_mask, state.negated.get("d", False)))
            for letter, direction in (("i", "in"), ("o", "out")):
                name = state.interfaces.get(letter)
                negated = state.negated.get(letter, False)
                # `-i +` matches any device: the kernel sees no match, so the model has none.
                if name is not None and (name != "+" or negated):
                    matches.append(Interface(direction, name, negated))  # type: ignore[arg-type]
            if state.protocol:
                matches.append(Protocol(state.protocol, state.negated.get("p", False)))
            if state.fragment:
                matches.append(Fragment(state.negated.get("f", False)))
            matches.extend(extensions)
            rule = Rule(tuple(matches), state.target, counters[0], counters[1], line.source(column))
            try:
                validate_rule(rule, chain.name, ruleset)
            except RuleError as error:
                raise _located(line, error, state) from None
            new_rules.append(rule)
    if state.command == "I":
        # iptables inserts each expanded rule at the same position: they end up reversed.
        for rule in new_rules:
            chain.rules.insert(position, rule)
    else:
        chain.rules.extend(new_rules)


def _located(line: _Line, error: RuleError, state: _RuleLine) -> ParseError:
    """Point a model-level complaint at the word that caused it."""
    message = error.message
    token: _Token | None = None
    if message.startswith(("tcp match", "udp match", "icmp match", "multiport")):
        wanted = message.split()[0]
        for parser in state.matches:
            if parser.name == wanted:
                token = parser.token
                break
    elif "-i with" in message:
        token = state.seen.get("i")
    elif "-o with" in message:
        token = state.seen.get("o")
    column = token.column if token is not None else (error.source.column if error.source else 1)
    return line.error(message, column)


def parse(text: str, filename: str = "<stdin>") -> Ruleset:
    """Read iptables-save text (the filter table) into a Ruleset; raises ParseError."""
    return _Parser(filename).parse(text)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_ip(option: str, match: Address) -> str:
    text = f"{'! ' if match.negated else ''}{option} {_format_ip(match.address)}"
    mask = match.mask
    if mask == 0xFFFFFFFF:
        return text + "/32"
    inverted = ~mask & 0xFFFFFFFF
    if inverted & (inverted + 1) == 0:
        return f"{text}/{32 - inverted.bit_length()}"
    return f"{text}/{_format_ip(mask)}"


def _tcp_flags(value: int) -> str:
    names = [name for name, bit in TCP_FLAG_BITS if value & bit]
    return ",".join(names) if names else "NONE"


def _ports(option: str, ports: PortRange) -> list[str]:
    # iptables-save leaves out a full range even when negated (and so loses `! --dport
    # 0:65535`, which never matches); we print it so the round trip keeps it.
    if ports.is_default:
        return []
    text = f"{ports.first}" if ports.first == ports.last else f"{ports.first}:{ports.last}"
    return (["!"] if ports.negated else []) + [option, text]


_SAFE_CHARACTERS = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _quote(text: str) -> str:
    """xtables_save_string: bare when only [A-Za-z0-9_-], else double quotes with `"`, `\\`
    and `'` escaped."""
    if text and all(c in _SAFE_CHARACTERS for c in text):
        return text
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in text)
    return f'"{escaped}"'


def _write_match(match: Match) -> list[str]:
    words: list[str] = []
    neg = ["!"] if getattr(match, "negated", False) else []
    if isinstance(match, TcpMatch):
        words = ["-m", "tcp", *_ports("--sport", match.sport), *_ports("--dport", match.dport)]
        if not match.flags.is_default:
            words += ["!"] if match.flags.negated else []
            words += ["--tcp-flags", _tcp_flags(match.flags.mask), _tcp_flags(match.flags.compare)]
    elif isinstance(match, UdpMatch):
        words = ["-m", "udp", *_ports("--sport", match.sport), *_ports("--dport", match.dport)]
    elif isinstance(match, IcmpMatch):
        if match.type == 0xFF:
            value = "any"
        elif (match.code_min, match.code_max) == (0, 0xFF):
            value = str(match.type)
        else:
            value = f"{match.type}/{match.code_min}"
        words = ["-m", "icmp", *neg, "--icmp-type", value]
    elif isinstance(match, Multiport):
        option = {"src": "--sports", "dst": "--dports", "any": "--ports"}[match.direction]
        ports = ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in match.ports)
        words = ["-m", "multiport", *neg, option, ports]
    elif isinstance(match, IpRange):
        words = ["-m", "iprange"]
        for option, side in (("--src-range", match.src), ("--dst-range", match.dst)):
            if side is not None:
                words += ["!"] if side.negated else []
                words += [option, f"{_format_ip(side.first)}-{_format_ip(side.last)}"]
    elif isinstance(match, Length):
        value = str(match.min) if match.min == match.max else f"{match.min}:{match.max}"
        words = ["-m", "length", *neg, "--length", value]
    elif isinstance(match, Ttl):
        words = ["-m", "ttl", *neg, f"--ttl-{match.op}", str(match.value)]
    elif isinstance(match, PktType):
        words = ["-m", "pkttype", *neg, "--pkt-type", match.type]
    elif isinstance(match, Mark):
        value = f"0x{match.value:x}"
        if match.mask != 0xFFFFFFFF:
            value += f"/0x{match.mask:x}"
        words = ["-m", "mark", *neg, "--mark", value]
    elif isinstance(match, Comment):
        words = ["-m", "comment", "--comment", _quote(match.text)]
    else:
        raise TypeError(f"cannot write match {match!r}")
    return words


def write_rule(chain: str, rule: Rule) -> str:
    """One `-A CHAIN ...` line, without counters, as iptables-legacy-save prints it."""
    words = ["-A", chain]
    ip_part: dict[str, Match] = {}
    for match in rule.matches:
        if isinstance(match, Address):
            ip_part.setdefault(match.direction, match)
        elif isinstance(match, Interface):
            ip_part.setdefault(match.direction, match)
        elif isinstance(match, Protocol):
            ip_part.setdefault("p", match)
        elif isinstance(match, Fragment):
            ip_part.setdefault("f", match)
    for key, option in (("src", "-s"), ("dst", "-d")):
        address = ip_part.get(key)
        if isinstance(address, Address) and (address.mask or address.negated):
            words.append(_write_ip(option, address))
    for key, option in (("in", "-i"), ("out", "-o")):
        interface = ip_part.get(key)
        if isinstance(interface, Interface):
            words += (["!"] if interface.negated else []) + [option, interface.name]
    protocol = ip_part.get("p")
    if isinstance(protocol, Protocol) and protocol.number:
        name = PROTOCOL_NAMES.get(protocol.number, str(protocol.number))
        words += (["!"] if protocol.negated else []) + ["-p", name]
    fragment = ip_part.get("f")
    if isinstance(fragment, Fragment):
        words += (["!"] if fragment.negated else []) + ["-f"]
    for match in rule.matches:
        if not isinstance(match, Address | Interface | Protocol | Fragment):
            words += _write_match(match)
    target = rule.target
    if isinstance(target, Accept):
        words += ["-j", "ACCEPT"]
    elif isinstance(target, Drop):
        words += ["-j", "DROP"]
    elif isinstance(target, Return):
        words += ["-j", "RETURN"]
    elif isinstance(target, Jump):
        words += ["-j", target.chain]
    elif isinstance(target, Goto):
        words += ["-g", target.chain]
    return " ".join(words)


def write(ruleset: Ruleset, counters: bool = False) -> str:
    """The filter table as iptables-legacy-save prints it (without its `#` header lines):
    built-in chains first, then user chains sorted by name (bytewise, as libiptc keeps them).
    Policy counters are always printed, rule counters only with `counters=True` (`-c`)."""
    lines = ["*filter"]
    builtins = [ruleset.chains[name] for name in BUILTIN_CHAINS if name in ruleset.chains]
    users = sorted(ruleset.user_chains, key=lambda chain: chain.name.encode())
    for chain in builtins:
        lines.append(f":{chain.name} {chain.policy} [{chain.packets}:{chain.bytes}]")
    for chain in users:
        lines.append(f":{chain.name} - [0:0]")
    for chain in builtins + users:
        for rule in chain.rules:
            text = write_rule(chain.name, rule)
            lines.append(f"[{rule.packets}:{rule.bytes}] {text}" if counters else text)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
