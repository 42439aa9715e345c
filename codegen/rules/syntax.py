"""The syntax iptables-restore reads and iptables-save writes, shared by the core parser and the
extensions: words (add_param_to_argv's quoting), libxtables' numbers, addresses, ports and
protocol names, the option context an extension's parser gets, and xtables_save_string.
"""

import re
import socket
import string
from collections.abc import Callable
from dataclasses import dataclass

from codegen.rules.model import Match, RuleError, Source, Target
from codegen.rules.names import PROTOCOL_NUMBERS


class ParseError(RuleError):
    """Text iptables-restore would refuse, or that uses something we do not support."""


# Lexing


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    column: int  # 1-based, of the token's first character (or its opening quote)


class Line:
    """One line of input and how to point into it."""

    def __init__(self, filename: str, number: int, text: str) -> None:
        self.filename = filename
        self.number = number
        self.text = text

    def source(self, column: int) -> Source:
        return Source(self.filename, self.number, column, self.text)

    def error(self, message: str, column: int) -> ParseError:
        return ParseError(message, self.source(column))


_WORD = re.compile(r"[^ \t]+")


def tokenize(line: Line, start: int) -> list[Token]:
    """Split like iptables-restore's add_param_to_argv: blanks separate words, `"` quotes,
    `\\` escapes only inside quotes, and a closing quote always ends the word (`"a"b` is two
    words)."""
    if '"' not in line.text:  # no quotes: blanks alone separate the words
        return [Token(word.group(), word.start() + 1) for word in _WORD.finditer(line.text, start)]
    return tokenize_quoted(line, start)


def tokenize_quoted(line: Line, start: int) -> list[Token]:
    """tokenize(), character by character: what a line with quotes takes."""
    text = line.text
    tokens: list[Token] = []
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
                tokens.append(Token("".join(buf), column))
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
                tokens.append(Token("".join(buf), column))
                buf, quoted = [], False
        else:
            if not buf:
                column = i + 1
            buf.append(ch)
        i += 1
    if in_quote:
        raise line.error("unterminated quoted string", quote_column)
    if buf or quoted:
        tokens.append(Token("".join(buf), column))
    return tokens


# ---------------------------------------------------------------------------------------------
# Numbers, addresses, ports: libxtables' syntax


_DIGITS = {8: frozenset("01234567"), 10: frozenset("0123456789"), 16: frozenset(string.hexdigits)}


def strtol_clamped(text: str) -> int:
    """glibc's strtol/strtoll with base 10 and no end check (atoi, atoll): blanks skipped, a
    sign, the digits after it (0 if none), clamped to the 64-bit long range. Callers cut the
    result to the width the C stores it in."""
    body = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    digits = ""
    for character in body:
        if not "0" <= character <= "9":
            break
        digits += character
    value = sign * int(digits) if digits else 0
    return max(-(1 << 63), min((1 << 63) - 1, value))


def strtoui(text: str, maximum: int, minimum: int = 0) -> int | None:
    """xtables_strtoui with base 0: decimal, 0x hex or 0 octal, an optional leading `+`, the
    whole string consumed; None when it is not such a number in [minimum, maximum]."""
    if text.isdigit() and text.isascii() and (text[0] != "0" or len(text) == 1):
        value = int(text)  # plain decimal, the common case
        return value if minimum <= value <= maximum else None
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


def numeric_to_ipaddr(text: str, is_mask: bool = False) -> int | None:
    """libxtables __numeric_to_ipaddr: dotted quad of base-0 bytes; an address (not a mask)
    may stop early and is completed with zeros (`10.1` is 10.1.0.0)."""
    text = text[:19]  # iptables copies into a 20-byte buffer
    parts = text.split(".", 3)
    octets: list[int] = []
    for index in range(4):
        if index == len(parts) - 1 and index < 3:
            if is_mask:
                return None
            value = strtoui(parts[index], 255)
            if value is None:
                return None
            octets.append(value)
            octets.extend([0] * (3 - index))
            break
        value = strtoui(parts[index], 255)
        if value is None:
            return None
        octets.append(value)
    return int.from_bytes(bytes(octets), "big")


def format_ip(value: int) -> str:
    return ".".join(str(b) for b in value.to_bytes(4, "big"))


def parse_mask(text: str) -> int | None:
    dotted = numeric_to_ipaddr(text, is_mask=True)
    if dotted is not None:
        return dotted
    bits = strtoui(text, 32)
    if bits is None:
        return None
    return (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF


def parse_addresses(line: Line, token: Token) -> list[tuple[int, int]]:
    """xtables_ipparse_multiple: `a[/m][,b[/m]...]`, each address masked."""
    result: list[tuple[int, int]] = []
    for item in token.text.split(","):
        item = item.lstrip(" \t\n\v\f\r")
        address_text, slash, mask_text = item.rpartition("/")
        if not slash:
            address_text, mask_text = item, ""
        if slash:
            mask = parse_mask(mask_text)
            if mask is None:
                raise line.error(f"invalid mask '{mask_text}' in '{token.text}'", token.column)
        else:
            mask = 0xFFFFFFFF
        if mask == 0:
            # iptables ignores the address of a /0 ("any/0"), whatever it is.
            address_text = "0.0.0.0"
        address = numeric_to_ipaddr(address_text)
        if address is None:
            raise line.error(
                f"host/network '{address_text}' is not an IPv4 address"
                " (host names are not supported)",
                token.column,
            )
        result.append((address & mask, mask))
    return result


def parse_port(text: str, protocol: str) -> int | None:
    value = strtoui(text, 0xFFFF)
    if value is not None:
        return value
    if not text or not text.isprintable() or not text.isascii():
        return None
    try:
        # iptables asks getservbyname, i.e. /etc/services, for names like `ssh`.
        return socket.getservbyname(text, protocol)
    except (OSError, ValueError, UnicodeError):
        return None


def parse_protocol(text: str) -> int | None:
    text = text.lower()
    value = strtoui(text, 255)
    if value is not None:
        return value
    return PROTOCOL_NUMBERS.get(text)


# ---------------------------------------------------------------------------------------------
# Match extensions: each collects its options and builds one model match at the end of the rule.


@dataclass
class OptionContext:
    """One option of an extension as the rule's command line gave it."""

    line: Line
    option: Token  # the option word, e.g. `--dport`
    value: Token | None  # its argument
    negated: bool
    next_word: Callable[[], Token | None]  # take one more argument (--tcp-flags)
    protocol: int | None  # the rule's -p so far

    def error(self, message: str, at_value: bool = False) -> ParseError:
        token = self.value if at_value and self.value is not None else self.option
        return self.line.error(message, token.column)


def inet_aton(text: str) -> int | None:
    """An IPv4 address as getaddrinfo reads a numeric one (glibc's inet_aton: `10.1` is
    10.0.0.1, `0x0a.1` and `012.1` too); None for anything else, host names included."""
    if not text or not text.isascii() or any(c.isspace() for c in text):
        return None
    try:
        return int.from_bytes(socket.inet_aton(text), "big")
    except OSError:
        return None


def parse_hostmask(ctx: OptionContext) -> tuple[int, int]:
    """libxtables' XTTYPE_HOSTMASK, `ADDRESS[/MASK]` split at the first `/`: the address as
    given (not masked) and a mask from a prefix length or a contiguous dotted mask."""
    assert ctx.value is not None
    text = ctx.value.text
    address_text, slash, mask_text = text.partition("/")
    address = inet_aton(address_text)
    if address is None:
        raise ctx.error(
            f"'{address_text}' is not an IPv4 address (host names are not supported)", True
        )
    if not slash:
        return address, 0xFFFFFFFF
    length = strtoui(mask_text, 32)
    if length is not None:
        return address, (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
    mask = inet_aton(mask_text)
    inverse = ~(mask or 0) & 0xFFFFFFFF
    if mask is None or inverse & (inverse + 1):
        # iptables-legacy 1.8.9 silently reads a length over 32, or a non-contiguous mask,
        # as /32.
        raise ctx.error(
            f"bad mask '{mask_text}' in '{text}' (a prefix length 0-32 or a contiguous"
            " dotted mask)",
            True,
        )
    return address, mask


def ipmask_to_numeric(mask: int) -> str:
    """xtables_ipmask_to_numeric: nothing for /32, `/N` for a prefix, else the dotted mask."""
    if mask == 0xFFFFFFFF:
        return ""
    inverse = ~mask & 0xFFFFFFFF
    if inverse & (inverse + 1) == 0:
        return f"/{32 - inverse.bit_length()}"
    return f"/{format_ip(mask)}"


def getportbyname(text: str) -> int | None:
    """xtables_getportbyname, through getaddrinfo: a decimal number (no other base) or a
    service name, tcp's before udp's; None otherwise, and for numbers above 65535, which
    getaddrinfo would wrap to 16 bits."""
    if re.fullmatch(r"\+?[0-9]+", text):
        number = int(text)
        return number if number <= 0xFFFF else None
    if text.isascii() and text.isprintable():
        for protocol in ("tcp", "udp"):  # the order getaddrinfo tries socket types in
            try:
                return socket.getservbyname(text, protocol)
            except OSError:
                continue
    return None


class MatchParser:
    """The options of one `-m NAME` (one instance per `-m`, as libxtables keeps one match
    object per use): `option` takes each option given, `finish` builds the model match at the
    end of the rule. Subclasses say which long options they have (getopt_long's table) and
    which may be negated; `!` in the value's place is refused as old syntax unless
    `value_may_be_bang` (a comment may be the text "!")."""

    name = ""
    # long option name -> (key, takes an argument)
    options: dict[str, tuple[str, bool]] = {}
    invertible: frozenset[str] = frozenset()
    value_may_be_bang = False

    def __init__(self, token: Token, implicit: bool) -> None:
        self.token = token
        self.implicit = implicit
        self.given: dict[str, Token] = {}

    def option(self, key: str, ctx: OptionContext) -> None:
        if ctx.negated and key not in self.invertible:
            raise ctx.error(f"{self.name}: option '{ctx.option.text}' cannot be negated")
        if ctx.value is not None and ctx.value.text == "!" and not self.value_may_be_bang:
            raise ctx.error(
                f"'!' after the option is old syntax: write '! {ctx.option.text} VALUE'",
                at_value=True,
            )
        self.parse(key, ctx)
        self.given[key] = ctx.option

    def parse(self, key: str, ctx: OptionContext) -> None:
        raise NotImplementedError

    def finish(self, line: Line) -> Match:
        raise NotImplementedError

    def once(self, key: str, ctx: OptionContext, label: str) -> None:
        if key in self.given:
            raise ctx.error(f"{self.name}: only one {label} allowed")

    def missing(self, line: Line, what: str) -> ParseError:
        return line.error(f"{self.name}: {what} must be specified", self.token.column)

    def check_exclusions(
        self, line: Line, table: tuple[tuple[str, int], ...], excludes: dict[str, frozenset[int]]
    ) -> None:
        """xtables_options_fcheck, once every option is read: the first option of `table`
        ((name, xtables id) in the extension's table order) given with one it excludes is
        refused, named with the excluded option of the lowest id."""
        names = {number: name for name, number in table}
        given = {number for name, number in table if name in self.given}
        for name, number in table:
            clash = sorted(excludes.get(name, frozenset()) & given - {number})
            if name in self.given and clash:
                raise line.error(
                    f'{self.name}: option "--{name}" cannot be used together with '
                    f'"--{names[clash[0]]}"',
                    self.given[name].column,
                )


class TargetParser(MatchParser):
    """The options of one `-j NAME` of a target extension, read by the same getopt rules as a
    match's (unique prefixes, `--opt=value`, `!` only where allowed): `finish` builds the
    model target, its defaults filled in for options not given."""

    def finish(self, line: Line) -> Target:  # type: ignore[override]
        raise NotImplementedError


class SingleMatchParser(MatchParser):
    """A match whose options build one model object, `self.match`, which must be given:
    `required` names what the error asks for."""

    required = ""

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.match: Match | None = None

    def finish(self, line: Line) -> Match:
        if self.match is None:
            raise self.missing(line, self.required)
        return self.match


_SAFE_CHARACTERS = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def quote(text: str) -> str:
    """xtables_save_string: bare when only [A-Za-z0-9_-], else double quotes with `"`, `\\`
    and `'` escaped."""
    if text and all(c in _SAFE_CHARACTERS for c in text):
        return text
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in text)
    return f'"{escaped}"'
