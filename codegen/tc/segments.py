"""A chain's rules as segments, and the segments packed into functions.

A segment is a stretch of rules the chain's code handles one way: scanned rule by rule, an
exact run (codegen.tc.exact: one lookup, weighing one rule) or a classified run
(codegen.tc.classifier: one call). Packing keeps each function's weight at most CHUNK_RULES.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from codegen.rules.model import Chain, Rule

from . import classifier, exact

# Rules per function: a function's pending branch states stay far below the verifier's 8,192
# (BPF_COMPLEXITY_LIMIT_JMP_SEQ) whatever the rules hold, and each chunk, being a global
# function, is verified once on its own.
CHUNK_RULES = 256
INLINE_SCAN = CHUNK_RULES  # a longer exact run has its fallback scan in functions of its own


@dataclass(frozen=True)
class Segment:
    """Rules first..last (1-based) of a chain: scanned, an exact run (with its shape), or a
    classified run (codegen.tc.classifier)."""

    first: int
    last: int
    shape: exact.Shape | None = None
    classified: bool = False

    @property
    def weight(self) -> int:
        # An exact run costs its function one lookup; its scan, if long, lives elsewhere. A
        # classified run is one call.
        if self.classified:
            return 1
        if self.shape is not None:
            return 1 if self.last - self.first + 1 > INLINE_SCAN else self.last - self.first + 1
        return self.last - self.first + 1

    @property
    def scanned(self) -> bool:
        return self.shape is None and not self.classified


# pieces() of the last chains asked about, by the identity of their rules (held here, so no
# other rule can take a cached one's id) and the sizes that shape runs: one compilation asks
# about each chain several times, and finding its runs looks at every rule.
_PIECES: OrderedDict[tuple[int, ...], tuple[list[Rule], list[list[Segment]]]] = OrderedDict()
PIECES_CACHED = 8


def pieces(chain: Chain) -> list[list[Segment]]:
    """The chain's rules as segments, packed into functions of at most CHUNK_RULES weight."""
    sizes = (exact.MIN_RUN, exact.SCANNED_FIRST, classifier.MIN_RUN, classifier.SCANNED_FIRST)
    key = (*sizes, CHUNK_RULES, *map(id, chain.rules))
    cached = _PIECES.get(key)
    if cached is not None:
        _PIECES.move_to_end(key)
        return cached[1]
    made = _pieces(chain)
    _PIECES[key] = (list(chain.rules), made)
    if len(_PIECES) > PIECES_CACHED:
        _PIECES.popitem(last=False)
    return made


def _pieces(chain: Chain) -> list[list[Segment]]:
    found = [
        (start, end, Segment(start + 1, end + 1, shape))
        for start, end, shape in exact.runs(chain.rules)
    ]
    taken = {i for start, end, _ in found for i in range(start - exact.SCANNED_FIRST, end + 1)}
    found += [
        (start, end, Segment(start + 1, end + 1, classified=True))
        for start, end in classifier.runs(chain.rules, taken)
    ]
    segments: list[Segment] = []
    next_rule = 1
    for start, end, run in sorted(found, key=lambda run: run[0]):
        if start + 1 > next_rule:
            segments.append(Segment(next_rule, start))
        segments.append(run)
        next_rule = end + 2
    if next_rule <= len(chain.rules):
        segments.append(Segment(next_rule, len(chain.rules)))
    packed: list[list[Segment]] = [[]]
    room = CHUNK_RULES
    for segment in segments:
        while segment.scanned and segment.weight > room:
            if room:
                packed[-1].append(Segment(segment.first, segment.first + room - 1))
                segment = Segment(segment.first + room, segment.last)
            packed.append([])
            room = CHUNK_RULES
        if segment.weight > room:
            packed.append([])
            room = CHUNK_RULES
        packed[-1].append(segment)
        room -= segment.weight
    return packed
