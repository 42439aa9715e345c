"""The maps a unit shares with its caller, as the C declares them: the per-CPU counters (one
{packets, bytes} slot per rule, per built-in chain's policy and for packets not handled, in
codegen.tc.layout.CounterLayout's order, so that every reader of counters works with either
backend). The namespace's local addresses are constants in the ingress program
(codegen.tc.local).

The counters are the caller's map: BPF_TABLE_PINNED opens it from PIN_DIR, where
load_c_program pins the caller's maps for the length of one compile (codegen/c/compiler.py).
"""

from __future__ import annotations

COUNTERS_MAP = "counters"
REPLIES_MAP = "replies"  # a program array: REJECT's answer programs, one per entry of a unit
# Where load_c_program pins the caller's maps for bcc to open them (a fresh directory per
# compile); `c_source` prints this placeholder.
DEFAULT_PIN_DIR = "/sys/fs/bpf/bpflab/c_backend"


def counters_map(entries: int) -> list[str]:
    return [
        "// One {packets, bytes} slot per rule, per built-in chain's policy and for packets",
        "// not handled (codegen.tc.layout.CounterLayout): the caller's map, from its pin.",
        "struct counter {",
        "    u64 packets;",
        "    u64 bytes;",
        "};",
        f'BPF_TABLE_PINNED("percpu_array", u32, struct counter, {COUNTERS_MAP}, {entries},',
        f'                 PIN_DIR "/{COUNTERS_MAP}");',
    ]


COUNT = [
    "// Per CPU, and TC programs do not nest on one CPU: no atomics needed.",
    "static __always_inline void count(u32 slot, u32 bytes)",
    "{",
    f"    struct counter *counter = {COUNTERS_MAP}.lookup(&slot);",
    "",
    "    if (counter) {",
    "        counter->packets += 1;",
    "        counter->bytes += bytes;",
    "    }",
    "}",
]


def replies_map(entries: int) -> list[str]:
    return [
        "// REJECT's answer programs (codegen.tc.replies.reply_program), one per entry.",
        f'BPF_TABLE_PINNED("prog", u32, u32, {REPLIES_MAP}, {entries}, PIN_DIR "/{REPLIES_MAP}");',
    ]
