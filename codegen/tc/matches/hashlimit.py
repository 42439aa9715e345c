"""`-m hashlimit` (xt_hashlimit revision 3, packet and byte rates): a token bucket per key, in one
LRU hash every program of a rule set shares, updated with xt_hashlimit's arithmetic exactly.

The map (`hashlimit`) holds every table of the rule set: its key is the table (the first 32 bits
of the SHA-256 of its name, checked to differ between the rule set's names) and the masked
fields the mode names (source and destination address, source and destination port, host
order, 0 where the mode leaves a field out); its value the entry's `last` (the jiffy of its
last packet: 0 for an entry just made, all ones while a CPU updates it) and its 64-bit credit.
An entry idle for htable-expire or longer is a new one: full. The clock is -m limit's, word 0 of
`limit_buckets` (0: bpf_jiffies64(); a test run fixes it, see harness.runner), so that a rule
set with hashlimit matches has that map too.

A packet's key is looked up, else inserted (BPF_NOEXIST: a CPU that lost the race finds the
winner's) and looked up again; no entry then (the map could not take one) drops the packet, as
the kernel does when it cannot allocate one. The entry is locked by a compare-and-exchange of
`last` with all ones (tried TRIES times; a packet that never gets it is over the limit, no
credit taken), refilled by `(now - last) * CPJ` (CPJ a power of two: a shift) wrapping in 64
bits as rateinfo_recalc does, capped, charged the cost if it holds that much, and released by
an exchange that writes `now` into `last`.

A byte rate's entry (codegen.rules.extensions.hashlimit_bytes) keeps the credit in the low half
of the second word (a second's credit is below 2^32) and the refills its burst has left in the
high half; its table number differs from a packet rate's of the same name (`table_id`). A rate
matching entry's second word is its window (`_window`): a count that stops at UINT32_MAX (the
kernel's is 64 bits: a burst above that is never reached here), and windows shorter than 2^31
jiffies (a longer --hashlimit-rate-interval is refused).

Costs, caps, CPJ and the expiry in jiffies are constants of the program, at the running kernel's
HZ when it is built. An apply keeps the map the namespace's rule set had (pinned), without the
entries of names the new rule set lacks: netfilter keeps a name's table across a table
replace when the new table has a rule of that name (tried: the same rules restored twice
let nothing more through), and destroys it with its last rule. Where the programs differ from
netfilter: the kept table takes the new rules' settings (netfilter keeps the old ones: a new
burst for an old name changes nothing there until the name goes); a map of another size (the
htable-max of the tables changed) starts empty; an LRU map evicts the least recently used
entry when full instead of refusing (and hotdropping) a new key beyond htable-max; an idle
entry is gone exactly at htable-expire (netfilter's gc removes it up to gcinterval later);
AH's SPI, which xt_hashlimit takes as the ports, and a later fragment's payload bytes where
its ports would be, are ports 0 here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R5, R10, AluOp, AtomicOp, JmpOp, MapType, Size
from codegen.bpf.maps import Map
from codegen.rules.extensions import hashlimit_bytes as byte_arithmetic
from codegen.rules.extensions.hashlimit_rate import interval_jiffies, window_burst, window_rate
from codegen.rules.extensions.hashlimit_table import (
    HASH_DIP,
    HASH_DPT,
    HASH_SIP,
    HASH_SPT,
    PORT_OFFSETS,
    Hashlimit,
    cost,
    credit_cap,
    credits_per_jiffy,
    msecs_to_jiffies,
    table_max,
    tables,
)
from codegen.rules.model import Ruleset

from ..layout import FACTS, Facts, map_and_key
from ..program import CompileError
from .base import Context, Emitter, load
from .limit import CLOCK_OFFSET, LIMIT_MAP, _hz

HASHLIMIT_MAP = "hashlimit"
HASHLIMIT_PIN = "hashlimit"  # the pin an apply keeps the map under (harness.deploy.lifecycle)
KEY = struct.Struct("<IIIHH")  # table, source, destination, source port, destination port
VALUE = struct.Struct("<QQ")  # last (jiffies; 0 new, all ones locked), credit
LOCKED = (1 << 64) - 1
# Rate matching's window word (the value's second word; codegen/c/hashlimit.py reads it too).
WINDOW_START_BITS, WINDOW_START_SHIFT, WINDOW_OVER = 31, 33, 1 << 32
UINT32 = 0xFFFF_FFFF
TRIES = 16
MAX_ENTRIES = 1 << 20  # the most entries the map holds, whatever the tables' htable-max
BPF_NOEXIST = 1
_PORTED = sorted(protocol for protocol, offset in PORT_OFFSETS.items() if offset == 0)
_AH = next(protocol for protocol, offset in PORT_OFFSETS.items() if offset == 4)


def table_id(match: Hashlimit) -> int:
    """The number of the match's table in the key: of its name, and of its mode (a byte
    rate's entries hold another bucket, so a name that changes mode starts afresh)."""
    name = match.name + ("\0bytes" if match.bytes else "") + ("\0rate" if match.rate_match else "")
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def table_ids(ruleset: Ruleset) -> dict[str, int]:
    """Each table name's number in the key; CompileError if two names share one."""
    found = {name: table_id(match) for name, match in tables(ruleset).items()}
    if len(set(found.values())) != len(found):
        raise CompileError("two --hashlimit-name values share a table number: rename one")
    return found


def uses_hashlimit(ruleset: Ruleset) -> bool:
    return bool(tables(ruleset))


def map_entries(ruleset: Ruleset) -> int:
    total = sum(table_max(match) for match in tables(ruleset).values())
    return max(1, min(MAX_ENTRIES, total))


def create_map(ruleset: Ruleset) -> Map:
    """A new map for `ruleset`'s hashlimit tables, every key fresh."""
    table_ids(ruleset)
    return Map(MapType.LRU_HASH, KEY.size, VALUE.size, map_entries(ruleset), name=HASHLIMIT_MAP)


def _address(fact: object, bits: int, offset: int) -> list[Item]:
    code = [load(fact)]  # type: ignore[arg-type]
    if bits == 0:
        code = [I.mov32(R1, 0)]
    elif bits < 32:
        code.append(I.alu32(AluOp.AND, R1, (0xFFFF_FFFF << (32 - bits)) & 0xFFFF_FFFF))
    return [*code, I.stx(Size.W, R10, offset, R1)]


def key_code(match: Hashlimit, key: int, ctx: Context) -> list[Item]:
    """The packet's key at `key` on the stack (KEY.size bytes); hotdrop for a packet whose
    ports the mode needs but whose transport header is too short to hold them."""
    mode = match.mode
    code: list[Item] = [I.st(Size.W, R10, key, table_id(match))]
    for bit, fact, bits, offset in (
        (HASH_SIP, Facts.SADDR, match.srcmask, 4),
        (HASH_DIP, Facts.DADDR, match.dstmask, 8),
    ):
        if mode & bit:
            code += _address(fact, bits, key + offset)
        else:
            code.append(I.st(Size.W, R10, key + offset, 0))
    if not mode & (HASH_SPT | HASH_DPT):
        return [*code, I.st(Size.W, R10, key + 12, 0)]
    ported, ah, store = (ctx.new_label(f"hashlimit_{name}") for name in ("ports", "ah", "key"))
    code += [I.mov32(R2, 0), I.mov32(R3, 0), load(Facts.PROTOCOL)]
    code += [I.jmp32(JmpOp.JEQ, R1, protocol, ported) for protocol in _PORTED]
    code += [
        I.jmp32(JmpOp.JEQ, R1, _AH, ah),
        I.ja(store),
        Label(ah),  # the SPI is not read: ports 0 (see the module's docstring)
        load(Facts.L4_LEN),
        I.jmp32(JmpOp.JLT, R1, 8, ctx.hotdrop),
        I.ja(store),
        Label(ported),
        load(Facts.L4_LEN),
        I.jmp32(JmpOp.JLT, R1, 4, ctx.hotdrop),
    ]
    if mode & HASH_SPT:
        code.append(I.ldx(Facts.SPORT.size, R2, FACTS, Facts.SPORT.offset))
    if mode & HASH_DPT:
        code.append(I.ldx(Facts.DPORT.size, R3, FACTS, Facts.DPORT.offset))
    return [
        *code,
        Label(store),
        I.stx(Size.H, R10, key + 12, R2),
        I.stx(Size.H, R10, key + 14, R3),
    ]


def _shift(per_jiffy: int) -> int:
    shift = per_jiffy.bit_length() - 1
    assert per_jiffy == 1 << shift, f"credits per jiffy {per_jiffy}"
    return shift


def hashlimit(match: Hashlimit, ctx: Context) -> list[Item]:
    hz = _hz()
    expire = msecs_to_jiffies(match.expire, hz)
    # 32 bytes of the frame: the key slot and the 8 bytes below it (free while matches run).
    key = ctx.key_offset - 8
    value = key + KEY.size
    names = ("found", "now", "retry", "busy", "locked", "fresh", "short", "over", "done")
    found, have_now, retry, busy, locked, fresh, short, over, done = (
        ctx.new_label(f"hashlimit_{name}") for name in names
    )
    code = key_code(match, key, ctx)
    code += [
        *map_and_key(HASHLIMIT_MAP, key),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JNE, R0, 0, found),
        # A new key: an entry with last 0 (full), unless another CPU made it first.
        I.st(Size.DW, R10, value, 0),
        I.st(Size.DW, R10, value + 8, 0),
        *map_and_key(HASHLIMIT_MAP, key),
        I.mov64(R3, R10),
        I.alu64(AluOp.ADD, R3, value),
        I.mov64(R4, BPF_NOEXIST),
        I.call("map_update_elem"),
        *map_and_key(HASHLIMIT_MAP, key),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, ctx.hotdrop),
        Label(found),
        I.stx(Size.DW, R10, key, R0),  # the entry, kept across the clock's call
        I.ld_map_value(R1, LIMIT_MAP, CLOCK_OFFSET),
        I.ldx(Size.DW, R0, R1, 0),
        I.jmp(JmpOp.JNE, R0, 0, have_now),
        I.call("jiffies64"),
        Label(have_now),
        I.mov64(R4, R0),  # r4: now
        I.ldx(Size.DW, R3, R10, key),  # r3: the entry
        I.mov64(R5, TRIES),
        Label(retry),
        I.ldx(Size.DW, R0, R3, 0),
        I.jmp(JmpOp.JEQ, R0, -1, busy),
        I.mov64(R1, R0),
        I.mov64(R2, -1),
        I.atomic(Size.DW, AtomicOp.CMPXCHG, R3, 0, R2),
        I.jmp(JmpOp.JEQ, R0, R1, locked),
        Label(busy),
        I.alu64(AluOp.SUB, R5, 1),
        I.jmp(JmpOp.JNE, R5, 0, retry),
        I.ja(over),  # never got the entry: over the limit, nothing taken
        Label(locked),  # r1: last, r3: the entry, locked; r4: now
        I.jmp(JmpOp.JEQ, R1, 0, fresh),
        I.mov64(R2, R4),
        I.alu64(AluOp.SUB, R2, R1),
        I.ld_imm64(R0, expire),
        I.jmp(JmpOp.JGE, R2, R0, fresh),  # idle for htable-expire: gone, a new entry
        *_bucket(match)(match, hz, fresh, short, ctx),
        I.atomic(Size.DW, AtomicOp.XCHG, R3, 0, R4),  # unlock, last = now
        I.ja(ctx.miss if match.above else done),
        Label(short),
        I.atomic(Size.DW, AtomicOp.XCHG, R3, 0, R4),
        Label(over),
    ]
    if not match.above:
        code.append(I.ja(ctx.miss))
    return [*code, Label(done)]


def _bucket(match: Hashlimit) -> Callable[[Hashlimit, int, str, str, Context], list[Item]]:
    if match.rate_match:
        return _window
    return _byte_bucket if match.bytes else _packet_bucket


def _window(match: Hashlimit, hz: int, fresh: str, short: str, ctx: Context) -> list[Item]:
    """Rate matching (codegen.rules.extensions.hashlimit_rate), the entry's second word
    holding the window: its count in the low 32 bits (stopping at UINT32_MAX), whether the
    window before was over in bit 32, the low 31 bits of the jiffy it started at above (a
    window lasts less than 2^31 jiffies, so that they and the last packet's jiffy give its
    age). r2: the jiffies since the last packet, r3: the locked entry, r4: now."""
    length = interval_jiffies(match, hz)
    if length >= 1 << WINDOW_START_BITS:
        raise CompileError(
            f"hashlimit: a --hashlimit-rate-interval of {match.interval} s is {length} jiffies,"
            f" more than the programs' windows keep (2^{WINDOW_START_BITS} - 1)"
        )
    count, calm = ctx.new_label("hashlimit_count"), ctx.new_label("hashlimit_calm")
    mask = (1 << WINDOW_START_BITS) - 1
    cost = (
        [load(Facts.TOT_LEN), I.alu64(AluOp.ADD, R2, R1)]
        if match.bytes
        else [I.alu64(AluOp.ADD, R2, 1)]
    )
    return [
        I.mov64(R1, R4),
        I.alu64(AluOp.SUB, R1, R2),  # r1: the last packet's jiffy
        I.ldx(Size.DW, R0, R3, 8),  # r0: the window word
        I.mov64(R5, R0),
        I.alu64(AluOp.RSH, R5, WINDOW_START_SHIFT),
        I.alu64(AluOp.SUB, R1, R5),
        I.alu64(AluOp.AND, R1, mask),  # the last packet's age in the window
        I.alu64(AluOp.ADD, R2, R1),  # r2: the window's age now
        I.jmp(JmpOp.JEQ, R2, 0, count),
        I.ld_imm64(R5, length),
        I.jmp(JmpOp.JLT, R2, R5, count),
        # A new window from now; the one that ended was over if count * length > age * rate.
        I.mov32(R1, R0),
        I.alu64(AluOp.MUL, R1, R5),
        I.ld_imm64(R5, window_rate(match)),
        I.alu64(AluOp.MUL, R2, R5),
        I.mov64(R0, R4),
        I.alu64(AluOp.LSH, R0, WINDOW_START_SHIFT),
        I.jmp(JmpOp.JLE, R1, R2, count),
        I.ld_imm64(R1, WINDOW_OVER),
        I.alu64(AluOp.OR, R0, R1),
        I.ja(count),
        Label(fresh),
        I.mov64(R0, R4),
        I.alu64(AluOp.LSH, R0, WINDOW_START_SHIFT),
        Label(count),  # r0: the window word; the packet's cost added to its count
        I.mov32(R2, R0),
        *cost,
        I.ld_imm64(R1, UINT32),
        I.jmp(JmpOp.JLE, R2, R1, calm),
        I.mov64(R2, R1),
        Label(calm),
        I.alu64(AluOp.RSH, R0, 32),
        I.alu64(AluOp.LSH, R0, 32),
        I.alu64(AluOp.OR, R0, R2),
        I.stx(Size.DW, R3, 8, R0),
        I.alu64(AluOp.RSH, R0, 32),
        I.alu64(AluOp.AND, R0, 1),
        I.jmp(JmpOp.JNE, R0, 0, short),  # the window before was over
        I.ld_imm64(R1, window_burst(match)),
        I.jmp(JmpOp.JGT, R2, R1, short),
    ]


def _packet_bucket(match: Hashlimit, hz: int, fresh: str, short: str, ctx: Context) -> list[Item]:
    """rateinfo_recalc and the charge in packet mode (r2: the jiffies since the last packet,
    r3: the locked entry): the credit refilled, capped, the cost taken if it holds that much,
    written back; `short` (the credit written) if it does not."""
    price, cap = cost(match, hz), credit_cap(match, hz)
    capped, enough = ctx.new_label("hashlimit_capped"), ctx.new_label("hashlimit_enough")
    return [
        I.ldx(Size.DW, R0, R3, 8),
        I.alu64(AluOp.LSH, R2, _shift(credits_per_jiffy(hz))),
        I.alu64(AluOp.ADD, R0, R2),
        I.ld_imm64(R2, cap),
        I.jmp(JmpOp.JLE, R0, R2, capped),
        Label(fresh),
        I.ld_imm64(R0, cap),
        Label(capped),  # r0: the credit
        I.ld_imm64(R2, price),
        I.jmp(JmpOp.JGE, R0, R2, enough),
        I.stx(Size.DW, R3, 8, R0),
        I.ja(short),
        Label(enough),
        I.alu64(AluOp.SUB, R0, R2),
        I.stx(Size.DW, R3, 8, R0),
    ]


def _byte_bucket(match: Hashlimit, hz: int, fresh: str, short: str, ctx: Context) -> list[Item]:
    """The same in byte mode (codegen.rules.extensions.hashlimit_bytes): the entry's second
    word holds the credit in its low half and the refills left in its high half; the price
    is the datagram's 16-byte chunks, at most a second's credit; a short credit takes a refill
    if one is left."""
    full = byte_arithmetic.full(hz)
    chunk = byte_arithmetic.chunk_cost(match.avg, hz)
    names = ("refilled", "priced", "refill", "enough")
    refilled, priced, refill, enough = (ctx.new_label(f"hashlimit_{name}") for name in names)
    return [
        I.ldx(Size.DW, R0, R3, 8),
        I.mov64(R5, R0),
        I.alu64(AluOp.RSH, R5, 32),  # r5: the refills left
        I.mov32(R0, R0),  # r0: the credit
        I.alu64(AluOp.LSH, R2, _shift(byte_arithmetic.credits_per_jiffy(hz))),
        I.alu64(AluOp.ADD, R0, R2),
        I.ld_imm64(R2, full),
        I.jmp(JmpOp.JLE, R0, R2, refilled),
        I.mov64(R0, R2),
        I.ja(refilled),
        Label(fresh),
        I.ld_imm64(R0, full),
        I.ld_imm64(R5, match.burst),
        Label(refilled),  # the price: ((len >> 4) + 1) chunks, at most a second's credit
        load(Facts.TOT_LEN),
        I.alu64(AluOp.RSH, R1, byte_arithmetic.BYTE_SHIFT),
        I.alu64(AluOp.ADD, R1, 1),
        I.ld_imm64(R2, chunk),
        I.alu64(AluOp.MUL, R1, R2),
        I.ld_imm64(R2, full),
        I.jmp(JmpOp.JLE, R1, R2, priced),
        I.mov64(R1, R2),
        Label(priced),
        I.jmp(JmpOp.JGE, R0, R1, enough),
        I.jmp(JmpOp.JNE, R5, 0, refill),
        I.alu64(AluOp.LSH, R5, 32),  # short, no refill left: written back as it is
        I.alu64(AluOp.OR, R0, R5),
        I.stx(Size.DW, R3, 8, R0),
        I.ja(short),
        Label(refill),  # a second's credit again, which covers any price
        I.alu64(AluOp.SUB, R5, 1),
        I.ld_imm64(R0, full),
        Label(enough),
        I.alu64(AluOp.SUB, R0, R1),
        I.alu64(AluOp.LSH, R5, 32),
        I.alu64(AluOp.OR, R0, R5),
        I.stx(Size.DW, R3, 8, R0),
    ]


EMITTER = Emitter(Hashlimit, hashlimit)


def reusable(table: Map, ruleset: Ruleset) -> bool:
    """Whether `table` (the map a rule set applied before used) can serve `ruleset`: the same
    key, value and size. netfilter keeps a name's table across a table replace when the new
    table has a rule of that name, its entries' credits included; an apply does too."""
    return (table.map_type, table.key_size, table.value_size, table.max_entries) == (
        MapType.LRU_HASH,
        KEY.size,
        VALUE.size,
        map_entries(ruleset),
    )


def prune(table: Map, ruleset: Ruleset) -> int:
    """Delete the entries of tables `ruleset` has no rule for (netfilter destroys a table
    whose last rule went); how many."""
    kept = set(table_ids(ruleset).values())
    stale = [key for key in table.keys() if KEY.unpack(key)[0] not in kept]
    return sum(table.delete(key) for key in stale)
