"""`-m connmark [!] --mark VALUE[/MASK]` (libxt_connmark.c, xt_connmark.c revision 1): the
mark of the packet's connection under a mask. A packet without a connection (INVALID) never
matches, negated or not (connmark_mt returns false before looking at the inversion).

Checked against iptables-legacy 1.8.9: save prints `--mark 0xV` or `--mark 0xV/0xM` (a mask of
0xffffffff is left out), `! --mark` when negated; `-L` prints `connmark match  0xV` (two
spaces: the `!` goes between them) or `connmark match ! 0xV/0xM`.
"""

from __future__ import annotations

from dataclasses import dataclass

from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.mark import MarkParser, XtMarkMtinfo1, mark_text
from codegen.rules.model import UINT32_MAX, ExtensionMatch, check_uint
from codegen.rules.packet import Packet


@dataclass(frozen=True, slots=True)
class Connmark(ExtensionMatch):
    """`-m connmark --mark VALUE[/MASK]`: `ct->mark & mask == value` (the value not masked)."""

    value: int
    mask: int = UINT32_MAX
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.value, 32, "connmark")
        check_uint(self.mask, 32, "connmark mask")


class ConnmarkParser(MarkParser):
    name = "connmark"
    model = Connmark


class ConnmarkExtension(MatchExtension):
    name = "connmark"
    revision = 1
    model = Connmark
    data = XtMarkMtinfo1  # struct xt_connmark_mtinfo1 has xt_mark_mtinfo1's layout
    parser = ConnmarkParser
    examples = (
        "-m connmark --mark 0x1",
        "-m connmark ! --mark 0x10/0xf0",
        "-m connmark --mark 0x0/0xff00",
    )

    def save(self, match: Connmark) -> list[str]:
        return ["-m", "connmark", *(["!"] if match.negated else []), "--mark", mark_text(match)]

    def describe(self, match: Connmark) -> str:
        return f" connmark match {'!' if match.negated else ''} {mark_text(match)}"

    def encode(self, match: Connmark) -> XtMarkMtinfo1:
        return XtMarkMtinfo1(match.value, match.mask, match.negated)

    def decode(self, data: XtMarkMtinfo1) -> Connmark:
        return Connmark(data.mark, data.mask, bool(data.invert))

    def matches(self, match: Connmark, packet: Packet) -> bool:
        connection = packet.tracked_connection
        if connection is None:
            return False
        return ((connection.mark & match.mask) == match.value) != match.negated


EXTENSION = ConnmarkExtension()
