"""`-m hashlimit`'s tables in C: the bytecode backend's map (codegen.tc.matches.hashlimit: key the
table number and the masked fields, value `last` and the 64-bit credit), declared for bcc, and
the one function every hashlimit match calls: xt_hashlimit's arithmetic written anew from the
kernel's hashlimit_mt_common, the entry locked by a compare-and-exchange of `last` with all ones
and released by an exchange that writes the packet's jiffy. The clock is -m limit's word 0
(codegen/c/limit.py declares that map for every rule set with a hashlimit match)."""

from __future__ import annotations

from codegen.rules.extensions.hashlimit_table import credits_per_jiffy
from codegen.tc.matches.hashlimit import HASHLIMIT_MAP, KEY, LOCKED, TRIES, VALUE
from codegen.tc.matches.limit import LIMIT_MAP

from .limit import hz


def declarations(entries: int) -> list[str]:
    per_jiffy = credits_per_jiffy(hz())
    shift = per_jiffy.bit_length() - 1
    assert KEY.size == 16 and VALUE.size == 16
    return [
        "// -m hashlimit's entries (codegen.tc.matches.hashlimit), the caller's map.",
        "struct hashlimit_key { u32 table; u32 saddr; u32 daddr; u16 sport; u16 dport; };",
        "struct hashlimit_value { u64 last; u64 credit; };",
        f'BPF_TABLE_PINNED("lru_hash", struct hashlimit_key, struct hashlimit_value, '
        f"{HASHLIMIT_MAP}, {entries},",
        f'                 PIN_DIR "/{HASHLIMIT_MAP}");',
        f"#define HASHLIMIT_SHIFT {shift}  // credits per jiffy: {per_jiffy}",
        f"#define HASHLIMIT_LOCKED 0x{LOCKED:x}ull",
        f"#define HASHLIMIT_TRIES {TRIES}",
        "",
        "// hashlimit_mt_common: the key's entry (made full when new: last 0), refilled for the",
        "// jiffies since its last packet, capped, charged `cost` if it holds that much. 1: under",
        "// the limit, 0: over, -1: no entry could be made (a hotdrop, as the kernel's).",
        "static __always_inline int hashlimit_take(struct hashlimit_key *key, u64 expire,",
        "                                          u64 cost, u64 cap)",
        "{",
        f"    struct hashlimit_value *entry = {HASHLIMIT_MAP}.lookup(key);",
        "    if (!entry) {",
        "        struct hashlimit_value fresh = {};",
        f"        {HASHLIMIT_MAP}.insert(key, &fresh);  // BPF_NOEXIST: a racing CPU's stays",
        f"        entry = {HASHLIMIT_MAP}.lookup(key);",
        "        if (!entry)",
        "            return -1;",
        "    }",
        "    u32 zero = 0;",
        f"    struct limit_words *words = {LIMIT_MAP}.lookup(&zero);",
        "    u64 now = words ? words->word[0] : 0;",
        "    if (!now)",
        "        now = bpf_jiffies64();",
        "#pragma clang loop unroll(disable)  // one copy per match: the verifier runs the loop",
        "    for (int attempt = 0; attempt < HASHLIMIT_TRIES; attempt++) {",
        "        u64 last = *(volatile u64 *)&entry->last;",
        "        if (last == HASHLIMIT_LOCKED)",
        "            continue;",
        "        if (__sync_val_compare_and_swap(&entry->last, last, HASHLIMIT_LOCKED) != last)",
        "            continue;",
        "        u64 credit = cap;",
        "        if (last && now - last < expire) {  // idle for expire or new: full",
        "            credit = entry->credit + ((now - last) << HASHLIMIT_SHIFT);",
        "            if (credit > cap)",
        "                credit = cap;",
        "        }",
        "        int taken = credit >= cost;",
        "        if (taken)",
        "            credit -= cost;",
        "        entry->credit = credit;",
        "        __sync_lock_test_and_set(&entry->last, now);  // unlock",
        "        return taken;",
        "    }",
        "    return 0;  // never got the entry: over the limit",
        "}",
        "",
    ]
