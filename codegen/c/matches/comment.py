"""`-m comment` (xt_comment.c): matches every packet; the rule's text above its code shows it."""

from __future__ import annotations

from codegen.rules.extensions.comment import Comment

from .common import Labels

MODEL = Comment


def write(match: Comment, labels: Labels) -> list[str]:
    return []
