"""`-m owner [!] --uid-owner USER[-USER] [!] --gid-owner GROUP[-GROUP] [--suppl-groups]
[!] --socket-exists` (libxt_owner.c, xt_owner.c revision 1): who owns the socket a locally
generated packet carries.

A name is looked up first (getpwnam, getgrnam), as libxt_owner does, else the value is a
number or a range of two (`A-B` or `A:B`, strtoul base 0, at most 4294967294: -1 is no id);
the model keeps numbers, which is what iptables-save prints. The uid and gid are those of the
socket's file (f_cred's fsuid and fsgid), `--suppl-groups` also takes the file's
supplementary groups. A packet without a socket, or with one no struct socket holds, matches
only when every option given is negated; one whose socket no file holds (the kernel's own)
fails --uid-owner and --gid-owner unless negated. The kernel lets the match run only in
OUTPUT (and POSTROUTING, outside the filter table).
"""

from __future__ import annotations

import ctypes
import grp
import pwd
import re
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, MatchParser, OptionContext, Token

OWNER_UID, OWNER_GID, OWNER_SOCKET, OWNER_SUPPL_GROUPS = 1, 2, 4, 8
OWNER_MASK = OWNER_UID | OWNER_GID | OWNER_SOCKET | OWNER_SUPPL_GROUPS
ID_MAX = 0xFFFF_FFFE  # (uid_t)-1 is no id: libxt_owner refuses it, and so does checkentry
HOOKS = frozenset({"OUTPUT"})  # the filter table's part of LOCAL_OUT | POST_ROUTING


@dataclass(frozen=True, slots=True)
class IdRange:
    """`--uid-owner` or `--gid-owner`: ids first..last (one id: first == last), maybe negated."""

    first: int
    last: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.first, 32, "owner id")
        check_uint(self.last, 32, "owner id")

    def holds(self, value: int) -> bool:
        return self.first <= value <= self.last

    @property
    def text(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Owner(ExtensionMatch):
    """`-m owner`: the uid range, the gid range (with the supplementary groups if
    `supplementary`), and whether the packet must have a socket (`socket` True: it must,
    False: it must not, None: not asked). At least one of the three is given."""

    uid: IdRange | None = None
    gid: IdRange | None = None
    socket: bool | None = None
    supplementary: bool = False

    @property
    def flags(self) -> tuple[int, int]:
        """The blob's `match` and `invert` bits."""
        match = invert = 0
        if self.uid is not None:
            match |= OWNER_UID
            invert |= OWNER_UID if self.uid.negated else 0
        if self.gid is not None:
            match |= OWNER_GID
            invert |= OWNER_GID if self.gid.negated else 0
        if self.socket is not None:
            match |= OWNER_SOCKET
            invert |= 0 if self.socket else OWNER_SOCKET
        if self.supplementary:
            match |= OWNER_SUPPL_GROUPS
        return match, invert


class XtOwnerMatchInfo(ctypes.Structure):
    _fields_ = [
        ("uid_min", ctypes.c_uint32),
        ("uid_max", ctypes.c_uint32),
        ("gid_min", ctypes.c_uint32),
        ("gid_max", ctypes.c_uint32),
        ("match", ctypes.c_uint8),
        ("invert", ctypes.c_uint8),
    ]


# strtoul with base 0: leading white space, a sign, then 0x hex, 0 octal or decimal digits.
_NUMBER = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _strtoul(text: str) -> tuple[int, str] | None:
    """The value strtoul reads at the start of `text` and what it leaves; None if it reads no
    digits or the value is outside 0..ID_MAX (a negative one wraps far past it)."""
    found = _NUMBER.match(text)
    if found is None:
        return None
    sign, digits = found.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    else:
        value = int(digits, 8 if digits.startswith("0") else 10)
    if sign == "-" and value:
        return None
    if value > ID_MAX:
        return None
    return value, text[found.end() :]


def parse_ids(text: str) -> tuple[int, int] | None:
    """libxt_owner's owner_parse_range: a number, or two joined by `-` or `:`; None if not."""
    first = _strtoul(text)
    if first is None:
        return None
    low, rest = first
    high = low
    if rest[:1] in ("-", ":"):
        second = _strtoul(rest[1:])
        if second is None:
            return None
        high, rest = second
    if rest:
        return None
    return low, high


def _lookup(text: str, group: bool) -> int | None:
    try:
        return grp.getgrnam(text).gr_gid if group else pwd.getpwnam(text).pw_uid
    except (KeyError, ValueError):  # ValueError: a name with a NUL
        return None


class OwnerParser(MatchParser):
    name = "owner"
    options = {
        "uid-owner": ("uid", True),
        "gid-owner": ("gid", True),
        "socket-exists": ("socket", False),
        "suppl-groups": ("suppl", False),
    }
    invertible = frozenset({"uid", "gid", "socket"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.ranges: dict[str, IdRange] = {}
        self.socket: bool | None = None
        self.supplementary = False

    def option(self, key: str, ctx: OptionContext) -> None:
        if ctx.negated and key not in self.invertible:
            raise ctx.error(f'owner: option "{ctx.option.text}" cannot be inverted')
        super().option(key, ctx)

    def parse(self, key: str, ctx: OptionContext) -> None:
        label = {"uid": "--uid-owner", "gid": "--gid-owner"}.get(
            key, "--socket-exists" if key == "socket" else "--suppl-groups"
        )
        if key in self.given:
            raise ctx.error(f'owner: option "{label}" can only be used once')
        if key == "socket":
            self.socket = not ctx.negated
            return
        if key == "suppl":
            if "gid" not in self.given:
                raise ctx.error("owner: --suppl-groups needs --gid-owner before it")
            self.supplementary = True
            return
        assert ctx.value is not None
        text = ctx.value.text
        number = _lookup(text, key == "gid")
        ids = (number, number) if number is not None else parse_ids(text)
        if ids is None:
            what = "group" if key == "gid" else "user"
            raise ctx.error(
                f"owner: bad value for {label} '{text}' (a {what} name, an id up to {ID_MAX}"
                " or a range FIRST-LAST)",
                at_value=True,
            )
        self.ranges[key] = IdRange(ids[0], ids[1], ctx.negated)

    def finish(self, line: Line) -> Owner:
        if not self.ranges and self.socket is None:
            raise self.missing(line, "--uid-owner, --gid-owner or --socket-exists")
        return Owner(
            self.ranges.get("uid"), self.ranges.get("gid"), self.socket, self.supplementary
        )


def _items(match: Owner, labels: tuple[str, str, str, str]) -> list[str]:
    """owner_mt_print_item's words for the socket, uid, gid and supplementary-groups parts."""
    words: list[str] = []
    if match.socket is not None:
        words += [*([] if match.socket else ["!"]), labels[0]]
    for label, ids in ((labels[1], match.uid), (labels[2], match.gid)):
        if ids is not None:
            words += [*(["!"] if ids.negated else []), label, ids.text]
    if match.supplementary:
        words.append(labels[3])
    return words


class OwnerExtension(MatchExtension):
    name = "owner"
    revision = 1
    model = Owner
    data = XtOwnerMatchInfo
    parser = OwnerParser
    examples = (
        "-m owner --uid-owner 0",
        "-m owner ! --uid-owner 1000-1999",
        "-m owner --gid-owner 15000",
        "-m owner ! --gid-owner 100-200 --suppl-groups",
        "-m owner --socket-exists",
        "-m owner ! --socket-exists",
        "-m owner --socket-exists ! --uid-owner 65534 --gid-owner 0-10 --suppl-groups",
    )

    def save(self, match: Owner) -> list[str]:
        labels = ("--socket-exists", "--uid-owner", "--gid-owner", "--suppl-groups")
        return ["-m", "owner", *_items(match, labels)]

    def describe(self, match: Owner) -> str:
        labels = ("owner socket exists", "owner UID match", "owner GID match")
        return "".join(f" {word}" for word in _items(match, (*labels, "incl. suppl. groups")))

    def check(self, match: Owner, rule: Rule, chain: str) -> None:
        if match.uid is None and match.gid is None and match.socket is None:
            raise RuleError(
                "owner: at least one of --uid-owner, --gid-owner or --socket-exists is required"
            )
        if match.supplementary and match.gid is None:
            raise RuleError("owner: --suppl-groups needs --gid-owner")
        for option, ids in (("--uid-owner", match.uid), ("--gid-owner", match.gid)):
            if ids is None:
                continue
            if ids.last > ID_MAX:
                raise RuleError(f"owner: {option} {ids.last} is no id (the kernel refuses -1)")
            if ids.first > ids.last:
                raise RuleError(
                    f"owner: {option} {ids.first}-{ids.last} is an empty range, which the"
                    " kernel refuses"
                )

    def hooks(self, match: Owner) -> frozenset[str]:
        return HOOKS

    def hook_refusal(self, match: Owner, hook: str) -> str:
        return (
            f"owner: the owner match is valid only in OUTPUT, where packets are locally"
            f" generated, not in {hook}"
        )

    def encode(self, match: Owner) -> XtOwnerMatchInfo:
        data = XtOwnerMatchInfo()
        if match.uid is not None:
            data.uid_min, data.uid_max = match.uid.first, match.uid.last
        if match.gid is not None:
            data.gid_min, data.gid_max = match.gid.first, match.gid.last
        data.match, data.invert = match.flags
        return data

    def decode(self, data: XtOwnerMatchInfo) -> Owner:
        if data.match & ~OWNER_MASK:
            raise BlobError(f"owner match: unknown flags {data.match & ~OWNER_MASK:#x}")
        stray = data.invert & ~(data.match & (OWNER_UID | OWNER_GID | OWNER_SOCKET))
        if stray:
            raise BlobError(f"owner match: invert flags {stray:#x} of options it does not use")
        if data.match & OWNER_SUPPL_GROUPS and not data.match & OWNER_GID:
            raise BlobError("owner match asks for supplementary groups without a gid")
        if not data.match & (OWNER_UID | OWNER_GID | OWNER_SOCKET):
            raise BlobError("owner match has no uid, gid or socket to match")

        def ids(flag: int, first: int, last: int) -> IdRange | None:
            return IdRange(first, last, bool(data.invert & flag)) if data.match & flag else None

        return Owner(
            ids(OWNER_UID, data.uid_min, data.uid_max),
            ids(OWNER_GID, data.gid_min, data.gid_max),
            not data.invert & OWNER_SOCKET if data.match & OWNER_SOCKET else None,
            bool(data.match & OWNER_SUPPL_GROUPS),
        )

    def matches(self, match: Owner, packet: Packet) -> bool:
        flags, invert = match.flags
        owner = packet.owner
        if owner is None:  # no socket, or none a struct socket holds
            return flags ^ invert == 0
        if flags & invert & OWNER_SOCKET:  # ! --socket-exists, and there is one
            return False
        if not owner.file:
            return (flags ^ invert) & (OWNER_UID | OWNER_GID) == 0
        if match.uid is not None and match.uid.holds(owner.uid) == match.uid.negated:
            return False
        if match.gid is not None:
            held = match.gid.holds(owner.gid) or (
                match.supplementary and any(match.gid.holds(group) for group in owner.groups)
            )
            if held == match.gid.negated:
                return False
        return True


EXTENSION = OwnerExtension()
