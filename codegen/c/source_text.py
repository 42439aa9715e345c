"""The C text as the writers build it: lines, markers of where each rule's code starts and
ends, and the few rules of layout (four-space indents, labels in column 0, safe comments).

Writers return `Code` (lists of lines and SpanMarks) and nest it with `indented`; SourceText is
the one place that turns it into the unit's lines and notes each rule's span of them, so that a
compile or verifier error in the C can be traced back to the rule whose code it is in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# A `goto` in a line of C, and a line that is a label (labels stay in column 0).
GOTO = re.compile(r"\bgoto (\w+);")
_LABEL = re.compile(r"^\w+:;?$")


@dataclass(frozen=True)
class RuleSpan:
    """The lines of the C source that hold one rule's code (1-based, inclusive)."""

    first_line: int
    last_line: int
    chain: str
    index: int
    text: str
    source: str | None = None

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}"


@dataclass(frozen=True)
class SpanMark:
    """Not a line: where a rule's code starts or ends, for RuleSpan."""

    start: bool
    chain: str
    index: int
    text: str
    source: str | None


Code = list[str | SpanMark]


def text_of(code: Iterable[str | SpanMark]) -> str:
    """The lines of `code` as one string, to look for a label or a statement in."""
    return "\n".join(line for line in code if isinstance(line, str))


def indented(code: Iterable[str | SpanMark], depth: int = 1) -> Code:
    """`code` one line per element (a string may hold several), `depth` levels in; labels
    stay in column 0, as kernel style has them."""
    pad = "    " * depth
    lines: Code = []
    for line in code:
        if isinstance(line, SpanMark):
            lines.append(line)
            continue
        for part in line.split("\n"):
            if _LABEL.match(part):
                lines.append(part)
            else:
                lines.append(f"{pad}{part}" if part else "")
    return lines


def comment(text: str) -> str:
    """`text` as one `//` comment line: control characters shown as `\\xNN` (a carriage return
    would end the comment) and a trailing backslash kept from splicing the next line."""
    shown = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    if shown.endswith("\\"):
        shown += " //"
    return f"// {shown}"


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SourceText:
    """The unit's lines so far, and the span of every rule's code in them."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.spans: list[RuleSpan] = []
        self._spans_done: set[tuple[str, int]] = set()
        self._open: dict[tuple[str, int], int] = {}

    def write(self, code: Iterable[str | SpanMark]) -> None:
        for line in indented(code, 0):
            if isinstance(line, SpanMark):
                self._mark(line)
            else:
                self.lines.append(line)

    def _mark(self, mark: SpanMark) -> None:
        """Note where a rule's code starts and ends. A user chain's code is written once
        however often clang inlines it, so every rule has one span."""
        key = (mark.chain, mark.index)
        if mark.start:
            self._open[key] = len(self.lines) + 1
            return
        first = self._open.pop(key)
        if key not in self._spans_done:
            self._spans_done.add(key)
            self.spans.append(
                RuleSpan(first, len(self.lines), mark.chain, mark.index, mark.text, mark.source)
            )

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
