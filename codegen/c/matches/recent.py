"""`-m recent` (xt_recent.c): its function's answer (codegen/c/recent.py), -1 a hotdrop.
A --hitcount above C_MAX_HITCOUNT is refused: clang writes the count over a longer ring as a
loop the verifier walks at a cost that grows with its square (measured: 16,000 instructions
processed for a ring of 32, 60,000 for 64, 233,000 for 128, 485,000 for 256, against the
bytecode's 1,700 to 6,300), and two such matches would not load."""

from __future__ import annotations

from codegen.rules.extensions.recent import Recent
from codegen.tc.matches.recent import refusal

from ..recent import function_name
from .common import Labels

MODEL = Recent
C_MAX_HITCOUNT = 64


def write(match: Recent, labels: Labels) -> list[str]:
    problem = refusal(match)
    if problem is None and match.hitcount > C_MAX_HITCOUNT:
        problem = (
            f"--hitcount {match.hitcount} keeps more than {C_MAX_HITCOUNT} stamps per address, "
            "whose count the verifier walks at too great a cost in C; the bytecode backend "
            "generates it"
        )
    if problem is not None:
        from . import UnsupportedMatch

        raise UnsupportedMatch(f"the C backend refuses the '-m recent' match because {problem}")
    return [
        "{",
        f"    int recent = {function_name(match)}(f);",
        "    if (recent < 0)",
        f"        goto {labels.hotdrop};",
        "    if (!recent)",
        f"        goto {labels.miss};",
        "}",
    ]
