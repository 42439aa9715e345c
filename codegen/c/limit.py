"""`-m limit`'s buckets in C: the bytecode backend's map (codegen.tc.matches.limit: word 0 a
fixed clock, word 1 + N limit match N's bucket, its u32 credit and stamped | 31 bits of prev),
declared for bcc, and the one function every limit match calls: xt_limit's arithmetic, written
anew from the kernel's limit_mt, and a compare-and-exchange of the whole word, tried again when
another CPU wrote first."""

from __future__ import annotations

from codegen.jiffies import HzUnknown, kernel_hz
from codegen.rules.extensions.limit import credits_per_jiffy
from codegen.rules.model import Ruleset
from codegen.tc.matches.limit import LIMIT_MAP, PREV_MASK, STAMPED, TRIES, slots

from .entries import CCompileError


def hz() -> int:
    try:
        return kernel_hz()
    except HzUnknown as error:
        raise CCompileError(f"-m limit counts in the kernel's jiffies, but {error}") from error


def declarations(ruleset: Ruleset) -> list[str]:
    per_jiffy = credits_per_jiffy(hz())
    shift = per_jiffy.bit_length() - 1
    words = 1 + len(slots(ruleset))
    return [
        "// -m limit's buckets (codegen.tc.matches.limit), the caller's map: word 0 a fixed",
        "// clock (0: jiffies), word 1 + N limit match N's: its u32 credit, then stamped | prev.",
        f"struct limit_words {{ u64 word[{words}]; }};",
        f'BPF_TABLE_PINNED("array", u32, struct limit_words, {LIMIT_MAP}, 1,',
        f'                 PIN_DIR "/{LIMIT_MAP}");',
        f"#define LIMIT_SHIFT {shift}  // credits per jiffy: {per_jiffy}",
        f"#define LIMIT_STAMPED 0x{STAMPED:x}u",
        f"#define LIMIT_PREV 0x{PREV_MASK:x}u",
        f"#define LIMIT_TRIES {TRIES}",
        "",
        "// limit_mt: refill the bucket for the jiffies since its last packet, cap it, and take",
        "// `cost` if it holds that much. A bucket no packet used yet (0) is full.",
        "static __always_inline int limit_take(u32 slot, u32 cost, u32 cap)",
        "{",
        "    u32 zero = 0;",
        f"    struct limit_words *words = {LIMIT_MAP}.lookup(&zero);",
        "",
        "    if (!words)",
        "        return 0;",
        "    u64 now = words->word[0];",
        "    if (!now)",
        "        now = bpf_jiffies64();",
        "    u32 stamp = ((u32)now & LIMIT_PREV) | LIMIT_STAMPED;",
        "    u64 *bucket = &words->word[1 + slot];",
        "    for (int attempt = 0; attempt < LIMIT_TRIES; attempt++) {",
        "        u64 old = *(volatile u64 *)bucket;",
        "        u32 credit = cap;",
        "        if (old) {",
        "            u32 elapsed = (stamp - (u32)old) & LIMIT_PREV;  // jiffies, mod 2^31",
        "            credit = (u32)(old >> 32) + (elapsed << LIMIT_SHIFT);",
        "        }",
        "        if (credit > cap)",
        "            credit = cap;",
        "        int taken = credit >= cost;",
        "        if (taken)",
        "            credit -= cost;",
        "        u64 word = ((u64)credit << 32) | stamp;",
        "        if (!taken && word == old)",
        "            return 0;  // nothing to write, as limit_mt's fast path",
        "        if (__sync_val_compare_and_swap(bucket, old, word) == old)",
        "            return taken;",
        "    }",
        "    return 0;  // lost every race: over the limit",
        "}",
        "",
    ]
