"""`-j NFLOG [--nflog-group N] [--nflog-prefix P] [--nflog-size N | --nflog-range N]
[--nflog-threshold N]` (libxt_NFLOG.c, xt_NFLOG.c): hand the packet to nfnetlink_log's group N
(for ulogd, tcpdump -i nflog:N, ...) and go on with the next rule (XT_CONTINUE).

The payload is `struct xt_nflog_info { u32 len; u16 group; u16 threshold; u16 flags; u16 pad;
char prefix[64]; }` (76 bytes), flags XT_NFLOG_F_COPY_LEN (0x1) when `--nflog-size` gave the
length; `--nflog-range` sets the length without the flag (iptables warns that it never
worked). Checked against iptables-legacy 1.8.9: save prints the prefix, the group when not 0,
the size or range, the threshold when not 0 (the default; `--nflog-threshold 0` is taken);
`-L` prints the same words without the dashes. Refused where iptables would cut the text
short: a prefix past 63 bytes.

The generated programs write an NFLOG rule's packet into the rule set's log ring buffer, as
they do for LOG (codegen.tc.log), and `bpflab log --pcap FILE` writes those packets out;
nothing is sent to nfnetlink_log.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError, cstring, field_bytes, name_bytes
from codegen.rules.extensions.target_base import TargetAction, TargetExtension
from codegen.rules.model import ExtensionTarget, Rule, RuleError
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, OptionContext, TargetParser, Token, quote, strtoui

PREFIX_SIZE = 64
PREFIX_MAX = PREFIX_SIZE - 1
DEFAULT_THRESHOLD = 0  # XT_NFLOG_DEFAULT_THRESHOLD
COPY_LENGTH = 0x1  # XT_NFLOG_F_COPY_LEN
U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class NfLog(ExtensionTarget):
    """`-j NFLOG`: the packet to nfnetlink_log `group` with `prefix`; `length` bytes of it
    copied when `copy_length` (`--nflog-size`; `--nflog-range` sets `length` alone)."""

    group: int = 0
    prefix: str = ""
    length: int = 0
    copy_length: bool = False
    threshold: int = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not 0 <= self.group <= 0xFFFF or not 0 <= self.threshold <= 0xFFFF:
            raise ValueError(
                f"NFLOG group and threshold are 16 bits: {self.group}, {self.threshold}"
            )
        if not 0 <= self.length <= U32_MAX:
            raise ValueError(f"NFLOG length is 32 bits: {self.length}")

    @property
    def snapshot_length(self) -> int | None:
        """The bytes of the packet nfnetlink_log copies (None: all of it)."""
        return self.length if self.copy_length else None


class XtNflogInfo(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("group", ctypes.c_uint16),
        ("threshold", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("prefix", ctypes.c_char * PREFIX_SIZE),
    ]


def prefix_problem(prefix: str) -> str | None:
    """Why iptables (or we, where it would cut the text short) refuse `prefix`; None if fine."""
    size = len(prefix.encode("utf-8", "surrogateescape"))
    if not prefix:
        return "--nflog-prefix must not be empty"
    if "\0" in prefix:
        return "--nflog-prefix cannot contain a NUL"
    if size > PREFIX_MAX:
        # iptables-legacy would cut it to 63 bytes without a word; refuse instead.
        return f"--nflog-prefix is {size} bytes long, {PREFIX_MAX} max"
    return None


class NfLogParser(TargetParser):
    name = "NFLOG"
    options = {
        "nflog-group": ("group", True),
        "nflog-prefix": ("prefix", True),
        "nflog-range": ("range", True),
        "nflog-size": ("size", True),
        "nflog-threshold": ("threshold", True),
    }

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.values: dict[str, int | str] = {}

    def parse(self, key: str, ctx: OptionContext) -> None:
        assert ctx.value is not None
        if key in self.given:
            raise ctx.error(f'NFLOG: option "{ctx.option.text}" can only be used once')
        if {key, *self.given} >= {"range", "size"}:
            raise ctx.error("NFLOG: --nflog-range and --nflog-size cannot be given together")
        text = ctx.value.text
        if key == "prefix":
            problem = prefix_problem(text)
            if problem is not None:
                raise ctx.error(problem, at_value=True)
            self.values[key] = text
            return
        bounds = {"group": (0, 0xFFFF), "threshold": (0, 0xFFFF)}.get(key, (0, U32_MAX))
        value = strtoui(text, bounds[1], bounds[0])
        if value is None:
            raise ctx.error(
                f"NFLOG: bad value for --nflog-{key} '{text}' ({bounds[0]} to {bounds[1]})",
                at_value=True,
            )
        self.values[key] = value

    def finish(self, line: Line) -> NfLog:
        values = self.values
        length = values.get("size", values.get("range", 0))
        return NfLog(
            int(values.get("group", 0)),
            str(values.get("prefix", "")),
            int(length),
            "size" in values,
            int(values.get("threshold", DEFAULT_THRESHOLD)),
        )


class NfLogExtension(TargetExtension):
    name = "NFLOG"
    revision = 0
    model = NfLog
    data = XtNflogInfo
    parser = NfLogParser
    terminal = False
    examples = (
        "-j NFLOG",
        "-j NFLOG --nflog-group 65535",
        '-j NFLOG --nflog-prefix "a b" --nflog-group 2 --nflog-size 96 --nflog-threshold 3',
        "-j NFLOG --nflog-size 0",
        "-j NFLOG --nflog-range 128",
        f"-j NFLOG --nflog-prefix {'x' * PREFIX_MAX}",
    )

    def save(self, target: NfLog) -> list[str]:
        return ["-j", "NFLOG", *self._words(target, "--nflog-")]

    def describe(self, target: NfLog) -> str:
        words = self._words(target, "nflog-")
        return "".join(f" {word}" for word in words)

    def _words(self, target: NfLog, lead: str) -> list[str]:
        words = []
        if target.prefix:
            words += [f"{lead}prefix", quote(target.prefix)]
        if target.group:
            words += [f"{lead}group", str(target.group)]
        if target.copy_length:
            words += [f"{lead}size", str(target.length)]
        elif target.length:
            words += [f"{lead}range", str(target.length)]
        if target.threshold != DEFAULT_THRESHOLD:
            words += [f"{lead}threshold", str(target.threshold)]
        return words

    def check(self, target: NfLog, rule: Rule, chain: str) -> None:
        problem = prefix_problem(target.prefix) if target.prefix else None
        if problem is not None:
            raise RuleError(problem)

    def encode(self, target: NfLog) -> XtNflogInfo:
        prefix = name_bytes(target.prefix, PREFIX_SIZE, "NFLOG --nflog-prefix")
        flags = COPY_LENGTH if target.copy_length else 0
        return XtNflogInfo(target.length, target.group, target.threshold, flags, 0, prefix)

    def decode(self, data: XtNflogInfo) -> NfLog:
        # nflog_tg_check: EINVAL for unknown flags or a prefix without its NUL.
        if data.flags & ~COPY_LENGTH:
            raise BlobError(f"NFLOG target: unknown flags {data.flags & ~COPY_LENGTH:#x}")
        raw = field_bytes(data, "prefix")
        if raw[-1] != 0:
            raise BlobError("NFLOG target: the prefix has no terminating NUL")
        return NfLog(
            data.group, cstring(raw), data.len, bool(data.flags & COPY_LENGTH), data.threshold
        )

    def act(self, target: NfLog, packet: Packet) -> TargetAction:
        return TargetAction(None, logged=True)  # to nfnetlink_log, and on


EXTENSION = NfLogExtension()
