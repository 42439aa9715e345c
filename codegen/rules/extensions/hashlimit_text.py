"""`-m hashlimit`'s text as iptables-legacy 1.8.9 reads it (codegen.rules.extensions.hashlimit
says what it takes and refuses; hashlimit_bytes and hashlimit_rate the byte rates' and rate
matching's part): the rate, the burst and the parser that makes the model."""

from __future__ import annotations

from codegen.rules.extensions.hashlimit_bytes import (
    EXPIRE_BURST_S,
    EXPIRE_S,
    burst_refills,
    is_byte_rate,
    parse_bytes,
)
from codegen.rules.extensions.hashlimit_rate import parse_interval, stored
from codegen.rules.extensions.hashlimit_table import (
    _MODE_NAMES,
    _MODE_ORDER,
    BURST_MAX,
    SCALE,
    UINT32,
    UINT64,
    Hashlimit,
    kernel_refusal,
    name_refusal,
)
from codegen.rules.extensions.limit import rate_and_unit
from codegen.rules.syntax import (
    Line,
    OptionContext,
    ParseError,
    SingleMatchParser,
    Token,
    strtol_clamped,
    strtoui,
)


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
        self.multiplier = 1  # udata->mult: the default expire's seconds
        self.unit_seconds = 1  # a packet rate's unit
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
        if key == "rate-match":
            self.values["rate_match"] = True
            return
        assert ctx.value is not None
        text = ctx.value.text
        self.tokens[key] = ctx.value
        if key == "rate-interval":
            interval = parse_interval(text)
            if interval is None:
                raise ctx.error(
                    f'hashlimit: Bad value for "{option}" option: "{text}"', at_value=True
                )
            self.values["interval"] = interval
            return
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
                self.unit_seconds = self.multiplier
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
        if values.get("rate_match"):  # hashlimit_mt_check's last step
            values["avg"], values["interval"] = stored(
                values["avg"],  # type: ignore[arg-type]
                self.unit_seconds,
                values.get("interval", 0),  # type: ignore[arg-type]
                bool(values.get("bytes")),
            )
        match = Hashlimit(**values)  # type: ignore[arg-type]
        problem = kernel_refusal(match)
        if problem is not None:
            rate = self.tokens.get("upto") or self.tokens.get("above")
            token = self.tokens.get("burst") or rate or self.token
            raise ParseError(problem, line.source(token.column))
        return match
