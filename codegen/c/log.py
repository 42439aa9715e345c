"""`-j LOG` and `-j NFLOG` in the C backend: the record the bytecode backend writes
(codegen.tc.log has its layout and why), into the same two maps, so that one reader
(harness.log_reader) serves both.

The ring buffer is the caller's, opened from its pin as bcc's BPF_RINGBUF_OUTPUT declares one
(a struct with the ringbuf methods in section `maps/ringbuf`, here with the pin's path after a
colon, as BPF_TABLE_PINNED does for other types). User chains take the context as their first
argument so that a LOG rule anywhere can read the packet; `f->log_hook`, set by each entry,
says which hook the record is from.
"""

from __future__ import annotations

from codegen.bpf.isa import MapType
from codegen.tc.log import (
    CAPTURE,
    HEADER,
    HOOK_IDS,
    LOG_DROPS,
    LOG_EVENTS,
    RECEIVED,
    RECORD_SIZE,
    TTL_PENDING,
    logs,
)

__all__ = ["LOG_DROPS", "LOG_EVENTS", "MAP_SHAPES", "declarations", "hook_statement", "logs"]

MAP_SHAPES = {
    LOG_EVENTS: (MapType.RINGBUF, 0, 0),
    LOG_DROPS: (MapType.PERCPU_ARRAY, 4, 8),
}


def hook_statement(hook: str, builtin: str | None) -> list[str]:
    """What an entry sets in the facts for its records' hook field (0, INPUT, is the
    zeroed facts' own): the ingress program's INPUT or FORWARD is told apart at the record
    by the out-device."""
    if hook == "ingress":
        return [f"f->log_hook = {RECEIVED};  // LOG records: received (INPUT or FORWARD)"]
    chain = "OUTPUT" if hook == "egress" else builtin
    assert chain is not None
    if HOOK_IDS[chain] == 0:
        return []
    return [f"f->log_hook = {HOOK_IDS[chain]};  // LOG records: {chain}"]


def declarations(ring_size: int) -> list[str]:
    """The maps and log_event(skb, f, slot), after the facts' declaration."""
    return [
        "// LOG: records into the caller's ring buffer (codegen/tc/log.py has their layout),",
        "// and the events a full ring lost, per CPU.",
        f"struct {LOG_EVENTS}_table_t {{",
        "    int key;",
        "    u32 leaf;",
        "    int (*ringbuf_output)(void *, u64, u64);",
        "    void *(*ringbuf_reserve)(u64);",
        "    void (*ringbuf_discard)(void *, u64);",
        "    void (*ringbuf_submit)(void *, u64);",
        "    u32 max_entries;",
        "};",
        f'__attribute__((section("maps/ringbuf:" PIN_DIR "/{LOG_EVENTS}")))',
        f"struct {LOG_EVENTS}_table_t {LOG_EVENTS} = {{ .max_entries = {ring_size} }};",
        f'BPF_TABLE_PINNED("percpu_array", u32, u64, {LOG_DROPS}, 1, PIN_DIR "/{LOG_DROPS}");',
        "",
        "struct log_record {",
        "    u32 slot;",
        "    u8 hook;",
        "    u8 reserved;",
        "    u16 captured;",
        "    u32 in_ifindex;",
        "    u32 out_ifindex;",
        "    u32 mark;",
        "    u32 skb_len;",
        "    u64 time;",
        "    u32 phys_in;",
        "    u32 phys_out;",
        f"    u8 data[{CAPTURE}];",
        "};",
        f'_Static_assert(sizeof(struct log_record) == {RECORD_SIZE}, "the record\'s layout");',
        f'_Static_assert(__builtin_offsetof(struct log_record, data) == {HEADER.size}, "");',
        "",
        "// A LOG rule: one record, or one more lost event when the ring is full.",
        "static __always_inline void log_event(struct __sk_buff *skb, facts_t *f, u32 slot)",
        "{",
        f"    struct log_record *record = {LOG_EVENTS}.ringbuf_reserve(sizeof(*record));",
        "",
        "    if (!record) {",
        "        u32 zero = 0;",
        f"        u64 *lost = {LOG_DROPS}.lookup(&zero);",
        "",
        "        if (lost)",
        "            *lost += 1;",
        "        return;",
        "    }",
        "    u8 hook = f->log_hook;",
        "",
        f"    if ((hook & {RECEIVED}) && f->out_ifindex)",
        f"        hook = {HOOK_IDS['FORWARD'] | RECEIVED | TTL_PENDING};",
        "    record->slot = slot;",
        "    record->hook = hook;",
        "    record->reserved = 0;",
        "    record->captured = 0;",
        "    record->in_ifindex = f->in_ifindex;",
        "    record->out_ifindex = f->out_ifindex;",
        "    record->mark = f->mark;",
        "    record->skb_len = skb->len;",
        "    record->time = bpf_ktime_get_ns();",
        "    record->phys_in = f->physin;",
        "    record->phys_out = f->physout;",
        "    u32 length = skb->len;",
        "",
        f"    if (length > {CAPTURE})",
        f"        length = {CAPTURE};",
        "    if (length > 0 && bpf_skb_load_bytes(skb, 0, record->data, length) == 0)",
        "        record->captured = length;",
        f"    {LOG_EVENTS}.ringbuf_submit(record, 0);",
        "}",
        "",
    ]
