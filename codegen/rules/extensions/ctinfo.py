"""What `-m conntrack` and `-m state` share (libxt_conntrack.c holds both; iptables writes
`-m state` as a conntrack match): the xt_conntrack_mtinfo3 payload and its flags, the state and
status names and bits with their syntax, the words both print, and the state bits of a packet's
connection. Not a family of its own.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from codegen.rules.blob.structs import NfInetAddr
from codegen.rules.model import RuleError, check_uint
from codegen.rules.packet import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_EXPECTED,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    Connection,
)
from codegen.rules.syntax import OptionContext

# match_flags and invert_flags (linux/netfilter/xt_conntrack.h).
XT_CONNTRACK_STATE = 1 << 0
XT_CONNTRACK_PROTO = 1 << 1
XT_CONNTRACK_ORIGSRC = 1 << 2
XT_CONNTRACK_ORIGDST = 1 << 3
XT_CONNTRACK_REPLSRC = 1 << 4
XT_CONNTRACK_REPLDST = 1 << 5
XT_CONNTRACK_STATUS = 1 << 6
XT_CONNTRACK_EXPIRES = 1 << 7
XT_CONNTRACK_ORIGSRC_PORT = 1 << 8
XT_CONNTRACK_ORIGDST_PORT = 1 << 9
XT_CONNTRACK_REPLSRC_PORT = 1 << 10
XT_CONNTRACK_REPLDST_PORT = 1 << 11
XT_CONNTRACK_DIRECTION = 1 << 12
XT_CONNTRACK_STATE_ALIAS = 1 << 13  # written by `-m state`: print it as that
KNOWN_FLAGS = (1 << 14) - 1

# State bits: XT_CONNTRACK_STATE_BIT(ctinfo) = 1 << (ctinfo % IP_CT_IS_REPLY + 1) for
# ESTABLISHED (0), RELATED (1) and NEW (2); SNAT, DNAT and UNTRACKED follow IP_CT_NUMBER (5).
STATE_INVALID = 1 << 0
STATE_ESTABLISHED = 1 << 1
STATE_RELATED = 1 << 2
STATE_NEW = 1 << 3
STATE_SNAT = 1 << 6
STATE_DNAT = 1 << 7
STATE_UNTRACKED = 1 << 8
STATE_BITS = {
    "INVALID": STATE_INVALID,
    "ESTABLISHED": STATE_ESTABLISHED,
    "RELATED": STATE_RELATED,
    "NEW": STATE_NEW,
    "UNTRACKED": STATE_UNTRACKED,
}
Names = tuple[tuple[str, int], ...]
# The order libxt_conntrack tries names in (a prefix names the first that it starts), and the
# order it prints them in.
CTSTATE_NAMES: Names = (
    ("INVALID", STATE_INVALID),
    ("NEW", STATE_NEW),
    ("ESTABLISHED", STATE_ESTABLISHED),
    ("RELATED", STATE_RELATED),
    ("UNTRACKED", STATE_UNTRACKED),
    ("SNAT", STATE_SNAT),
    ("DNAT", STATE_DNAT),
)
STATE_PRINT_ORDER: Names = (
    ("INVALID", STATE_INVALID),
    ("NEW", STATE_NEW),
    ("RELATED", STATE_RELATED),
    ("ESTABLISHED", STATE_ESTABLISHED),
    ("UNTRACKED", STATE_UNTRACKED),
    ("SNAT", STATE_SNAT),
    ("DNAT", STATE_DNAT),
)
STATUS_NAMES: Names = (
    ("NONE", 0),
    ("EXPECTED", IPS_EXPECTED),
    ("SEEN_REPLY", IPS_SEEN_REPLY),
    ("ASSURED", IPS_ASSURED),
    ("CONFIRMED", IPS_CONFIRMED),
)
ALL_STATES = sum(bit for _, bit in CTSTATE_NAMES)
ALL_STATUSES = sum(bit for _, bit in STATUS_NAMES)
UINT32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class AnyOf:
    """`--ctstate` or `--ctstatus`: matches a value with any of `bits` (so that an empty
    `--ctstatus NONE` matches nothing), or with none of them when negated."""

    bits: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.bits, 16, "state or status bits")

    def matches(self, value: int) -> bool:
        return bool(self.bits & value) != self.negated


TUPLE_PARTS = ("origsrc", "origdst", "replsrc", "repldst")


class XtConntrackMtinfo3(ctypes.Structure):
    _fields_ = [
        *((f"{part}_{half}", NfInetAddr) for part in TUPLE_PARTS for half in ("addr", "mask")),
        ("expires_min", ctypes.c_uint32),
        ("expires_max", ctypes.c_uint32),
        ("l4proto", ctypes.c_uint16),
        *((f"{part}_port", ctypes.c_uint16) for part in TUPLE_PARTS),
        ("match_flags", ctypes.c_uint16),
        ("invert_flags", ctypes.c_uint16),
        ("state_mask", ctypes.c_uint16),
        ("status_mask", ctypes.c_uint16),
        *((f"{part}_port_high", ctypes.c_uint16) for part in TUPLE_PARTS),
    ]


def parse_names(names: Names, ctx: OptionContext, what: str) -> int:
    """A comma list of `names` as libxt_conntrack reads it: any case, and a prefix stands for
    the first name it starts (`E` is ESTABLISHED); no empty item."""
    assert ctx.value is not None
    text = ctx.value.text
    bits = 0
    for item in text.split(","):
        word = item.upper() if item.isascii() else ""
        found = [bit for name, bit in names if word and name.startswith(word)]
        if not found:
            choices = ", ".join(name for name, _ in names)
            raise ctx.error(f"{what} '{item}' in '{text}' is not one of {choices}", at_value=True)
        bits |= found[0]
    return bits


def format_names(bits: int, names: Names, none: str = "") -> str:
    return ",".join(name for name, bit in names if bits & bit) or none


def save_words(name: str, options: Sequence[tuple[bool, str, str]]) -> list[str]:
    """`-m NAME` and its (negated, option, value) triples as iptables-save writes them."""
    words = ["-m", name]
    for negated, option, value in options:
        words += [*(["!"] if negated else []), f"--{option}", value]
    return words


def describe_words(options: Sequence[tuple[bool, str, str]]) -> str:
    """The same triples as `iptables -L` prints them."""
    return "".join(f"{' !' * negated} {option} {value}" for negated, option, value in options)


def state_bits(connection: Connection | None) -> int:
    """The state bits xt_conntrack tests for a packet's connection (ctinfo's state, SNAT and
    DNAT from the entry's status; no entry is INVALID or UNTRACKED)."""
    if connection is None:
        return STATE_INVALID
    bits = STATE_BITS[connection.state]
    if connection.tracked:
        bits |= (STATE_SNAT if connection.status & IPS_SRC_NAT else 0) | (
            STATE_DNAT if connection.status & IPS_DST_NAT else 0
        )
    return bits


def check_states(bits: int, allowed: int, option: str) -> None:
    if bits == 0:
        raise RuleError(f"{option} needs at least one state")
    if bits & ~allowed:
        raise RuleError(f"{option}: unknown state bits 0x{bits & ~allowed:x}")
