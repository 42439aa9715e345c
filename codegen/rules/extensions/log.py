"""`-j LOG [--log-level L] [--log-prefix P] [--log-tcp-sequence] [--log-tcp-options]
[--log-ip-options] [--log-uid] [--log-macdecode]` (libxt_LOG.c, xt_LOG.c and nf_log_syslog.c):
write a line about the packet to the kernel log and go on with the next rule (XT_CONTINUE).

The evaluator lists the LOG rules a packet fired, in order (Evaluation.logged); log_line.py
writes the line the kernel prints for each. Checked against iptables-legacy 1.8.9: the payload is
`struct ipt_log_info { u8 level; u8 logflags; char prefix[30]; }` (32 bytes), save prints
`--log-prefix` first, `--log-level` only when not 4, then the flags in bit order; `-L` prints
`LOG flags N level N` and ` prefix "P"` (P as is) when there is one.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError, cstring, field_bytes, name_bytes
from codegen.rules.extensions.target_base import TargetAction, TargetExtension
from codegen.rules.model import ExtensionTarget, Rule, RuleError
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, OptionContext, TargetParser, Token, quote

PREFIX_SIZE = 30
PREFIX_MAX = PREFIX_SIZE - 1  # bytes of text, the NUL aside
DEFAULT_LEVEL = 4  # LOG_WARNING
# libxt_LOG's log_names: exact, case-sensitive words ("panic" and "error" are its deprecated
# aliases; "err", "warn" and prefixes are refused, as iptables 1.8.9 does).
LEVEL_NAMES = {
    "alert": 1,
    "crit": 2,
    "debug": 7,
    "emerg": 0,
    "error": 3,
    "info": 6,
    "notice": 5,
    "panic": 0,
    "warning": 4,
}
# The flag options in their bit order (XT_LOG_*), the order iptables-legacy-save prints them.
FLAGS: tuple[tuple[str, int], ...] = (
    ("tcp-sequence", 0x01),
    ("tcp-options", 0x02),
    ("ip-options", 0x04),
    ("uid", 0x08),
    ("macdecode", 0x20),
)
_FLAG_BITS = dict(FLAGS)
_ALL_FLAGS = sum(_FLAG_BITS.values())


@dataclass(frozen=True, slots=True)
class Log(ExtensionTarget):
    """`-j LOG`: log the packet at syslog `level` with `prefix` and the details `flags` asks
    for (XT_LOG_* bits), then continue."""

    level: int = DEFAULT_LEVEL
    prefix: str = ""
    flags: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 7:
            raise ValueError(f"log level must be 0 to 7: {self.level}")
        if self.flags & ~_ALL_FLAGS:
            raise ValueError(f"unknown LOG flags: {self.flags:#x}")


class IptLogInfo(ctypes.Structure):
    _fields_ = [
        ("level", ctypes.c_ubyte),
        ("logflags", ctypes.c_ubyte),
        ("prefix", ctypes.c_char * PREFIX_SIZE),
    ]


def log_level(ctx: OptionContext) -> int:
    """parse_log_level: a number 0-7 as strtoul reads it with base 0 (`0x3`, `07`), or a name
    of LEVEL_NAMES."""
    assert ctx.value is not None
    text = ctx.value.text
    if text in LEVEL_NAMES:
        return LEVEL_NAMES[text]
    level = -1
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        level = int(text, 16)
    elif re.fullmatch(r"0[0-7]*", text):
        level = int(text, 8)
    elif re.fullmatch(r"[1-9][0-9]*", text):
        level = int(text)
    if not 0 <= level <= 7:
        names = ", ".join(LEVEL_NAMES)
        raise ctx.error(f"log level '{text}' unknown (0 to 7, or one of {names})", True)
    return level


def prefix_problem(prefix: str) -> str | None:
    """Why iptables (or we, where it would cut the text short) refuse `prefix`; None if fine."""
    size = len(prefix.encode("utf-8", "surrogateescape"))
    if not prefix:
        return "--log-prefix must not be empty"
    if "\n" in prefix:
        return "newlines not allowed in --log-prefix"
    if "\0" in prefix:
        return "--log-prefix cannot contain a NUL"
    if size > PREFIX_MAX:
        # iptables would cut it to 29 bytes without a word; refuse instead.
        return f"--log-prefix is {size} bytes long, {PREFIX_MAX} max"
    return None


class LogParser(TargetParser):
    name = "LOG"
    options = {
        "log-level": ("level", True),
        "log-prefix": ("prefix", True),
        **{f"log-{flag}": (flag, False) for flag, _ in FLAGS},
    }

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.level = DEFAULT_LEVEL
        self.prefix = ""
        self.flags = 0

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error(f'LOG: option "{ctx.option.text}" can only be used once')
        if key == "level":
            self.level = log_level(ctx)
        elif key == "prefix":
            assert ctx.value is not None
            problem = prefix_problem(ctx.value.text)
            if problem is not None:
                raise ctx.error(problem, at_value=True)
            self.prefix = ctx.value.text
        else:
            self.flags |= _FLAG_BITS[key]

    def finish(self, line: Line) -> Log:
        return Log(self.level, self.prefix, self.flags)


class LogExtension(TargetExtension):
    name = "LOG"
    revision = 0
    model = Log
    data = IptLogInfo
    parser = LogParser
    terminal = False
    examples = (
        "-j LOG",
        "-j LOG --log-level 0",
        '-j LOG --log-prefix "test: " --log-level 1',
        "-j LOG --log-prefix 12345678901234567890123456789 --log-level 7",
        '-j LOG --log-prefix "a b\\"c\\\'" --log-tcp-sequence',
        "-p tcp -j LOG --log-prefix tcp --log-tcp-sequence --log-tcp-options",
        "-j LOG --log-level 6 --log-ip-options",
        "-j LOG --log-uid",
        "-j LOG --log-macdecode",
        "-j LOG --log-prefix all --log-level 3 --log-tcp-sequence --log-tcp-options"
        " --log-ip-options --log-uid --log-macdecode",
    )

    def save(self, target: Log) -> list[str]:
        words = ["-j", "LOG"]
        if target.prefix:
            words += ["--log-prefix", quote(target.prefix)]
        if target.level != DEFAULT_LEVEL:
            words += ["--log-level", str(target.level)]
        return words + [f"--log-{flag}" for flag, bit in FLAGS if target.flags & bit]

    def describe(self, target: Log) -> str:
        text = f" LOG flags {target.flags} level {target.level}"
        return text + (f' prefix "{target.prefix}"' if target.prefix else "")

    def check(self, target: Log, rule: Rule, chain: str) -> None:
        problem = prefix_problem(target.prefix) if target.prefix else None
        if problem is not None:
            raise RuleError(problem)

    def encode(self, target: Log) -> IptLogInfo:
        prefix = name_bytes(target.prefix, PREFIX_SIZE, "LOG --log-prefix")
        return IptLogInfo(target.level, target.flags, prefix)

    def decode(self, data: IptLogInfo) -> Log:
        # log_tg_check: EINVAL for a level past 7 or a prefix without its NUL.
        if data.level > 7:
            raise BlobError(f"LOG target: level {data.level} is past 7")
        raw = field_bytes(data, "prefix")
        if raw[-1] != 0:
            raise BlobError("LOG target: the prefix has no terminating NUL")
        if data.logflags & ~_ALL_FLAGS:
            raise BlobError(f"LOG target: unknown flags {data.logflags & ~_ALL_FLAGS:#x}")
        return Log(data.level, cstring(raw), data.logflags)

    def act(self, target: Log, packet: Packet) -> TargetAction:
        return TargetAction(None, logged=True)  # logs (log_line.py) and continues


EXTENSION = LogExtension()
