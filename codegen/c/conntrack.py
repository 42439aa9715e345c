"""The connection tracker (codegen/conntrack/tracker.bpf.c) in this backend's unit: the same C
the bytecode backend links from clang's object, compiled here by bcc with everything else.

bcc cannot call a function it did not inline (it does not relocate calls), and its rewriter
turns `map.lookup(key)` into map access only where those words are in the source, not in a
macro's expansion: so the tracker's functions are `static __always_inline` here (and read the
packet through the helper only, which keeps the inlined paths few enough to verify), its map
macros are written out as bcc's calls, and its maps are declared as the caller's, from their
pins (like the counters). Entry functions call ct_classify before the chains and ct_confirm on
a final ACCEPT, with the facts' `ct` as the result.
"""

from __future__ import annotations

import re

from codegen import conntrack
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts

# bcc's spelling of the tracker's map operations: CT_OP(map, rest -> map.op(rest
_OPERATIONS = {"CT_LOOKUP": "lookup", "CT_INSERT": "insert", "CT_DELETE": "delete"}
_CALL = re.compile(r"\b(CT_LOOKUP|CT_INSERT|CT_DELETE)\((\w+), ")
RESULT = "(struct ct_result *)&f->ct"


def declarations(table_entries: int) -> list[str]:
    """The tracker's maps, as bcc opens the caller's from PIN_DIR."""
    shapes = (
        ("lru_hash", "struct ct_key", "struct ct_entry", conntrack.CT_TABLE, table_entries),
        ("percpu_array", "u32", "struct ct_pending", conntrack.CT_PENDING, 1),
        ("array", "u32", "u64", conntrack.CT_CLOCK, conntrack.CLOCK_ENTRIES),
    )
    return [
        f'BPF_TABLE_PINNED("{kind}", {key}, {value}, {name}, {entries}, PIN_DIR "/{name}");'
        for kind, key, value, name, entries in shapes
    ]


def tracker(table_entries: int, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> list[str]:
    """The tracker's C for bcc: its types, maps and (inlined) functions, with `timeouts`'
    settings."""
    prelude = ["#define CT_GLOBAL static __always_inline", "#define CT_LOAD_BY_HELPER"]
    text = conntrack.source(prelude, timeouts=timeouts, line_marker=False)
    text = _CALL.sub(lambda m: f"{m.group(2)}.{_OPERATIONS[m.group(1)]}(", text)
    lines = []
    for line in text.splitlines():
        lines += declarations(table_entries) if line == "CT_DECLARE_MAPS" else [line]
    return lines


CLASSIFY = [f"ct_classify(skb, {RESULT});  // nf_conntrack_in: the connection into f->ct"]
CONFIRM = ["if (f->ct.pending)  // nf_confirm", f"    ct_confirm({RESULT});"]
