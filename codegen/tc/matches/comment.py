"""`-m comment` (xt_comment): matches every packet, so it costs nothing and does not keep its
rule out of an exact run."""

from __future__ import annotations

from codegen.bpf.asm import Item
from codegen.rules.extensions.comment import Comment

from .base import ALWAYS, Context, Emitter, Pins


def comment(match: Comment, ctx: Context) -> list[Item]:
    return []


def pins(match: Comment) -> Pins:
    return Pins()


EMITTER = Emitter(Comment, comment, pins, ranges=lambda match: ALWAYS)
