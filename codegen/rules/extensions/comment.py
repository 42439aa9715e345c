"""`-m comment --comment TEXT` (libxt_comment.c, xt_comment.c): always matches."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import cstring, field_bytes, name_bytes
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, RuleError
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser, quote

XT_MAX_COMMENT_LEN = 256
COMMENT_MAX = XT_MAX_COMMENT_LEN - 1  # bytes of text, the NUL aside


@dataclass(frozen=True, slots=True)
class Comment(ExtensionMatch):
    """`-m comment --comment TEXT`: always matches."""

    text: str


class XtCommentInfo(ctypes.Structure):
    _fields_ = [("comment", ctypes.c_char * XT_MAX_COMMENT_LEN)]


class CommentParser(SingleMatchParser):
    name = "comment"
    options = {"comment": ("comment", True)}
    value_may_be_bang = True
    required = "--comment"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--comment")
        assert ctx.value is not None
        size = len(ctx.value.text.encode())
        if size > COMMENT_MAX:
            # iptables would cut it to 255 bytes without a word; refuse instead.
            raise ctx.error(f"comment is {size} bytes long, {COMMENT_MAX} max", at_value=True)
        self.match = Comment(ctx.value.text)


class CommentExtension(MatchExtension):
    name = "comment"
    revision = 0
    model = Comment
    data = XtCommentInfo
    parser = CommentParser
    examples = (
        "-m comment --comment ssh",
        '-m comment --comment "allow \\"web\\" traffic"',
        '-m comment --comment "!"',
    )

    def save(self, match: Comment) -> list[str]:
        return ["-m", "comment", "--comment", quote(match.text)]

    def describe(self, match: Comment) -> str:
        return f" /* {match.text} */"

    def check(self, match: Comment, rule: Rule, chain: str) -> None:
        encoded = match.text.encode()
        if len(encoded) > COMMENT_MAX:
            raise RuleError(f"comment is {len(encoded)} bytes long, {COMMENT_MAX} max")
        if "\n" in match.text or "\0" in match.text:
            raise RuleError("comment cannot contain a newline or NUL")

    def encode(self, match: Comment) -> XtCommentInfo:
        return XtCommentInfo(name_bytes(match.text, XT_MAX_COMMENT_LEN, "comment"))

    def decode(self, data: XtCommentInfo) -> Comment:
        return Comment(cstring(field_bytes(data, "comment")))

    def matches(self, match: Comment, packet: Packet) -> bool:
        return True


EXTENSION = CommentExtension()
