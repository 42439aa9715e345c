"""`-m recent` (xt_recent revision 1): one map per table name, `recent:NAME`, an LRU hash
shared by every rule (and both programs) naming it, and one array `recent_clock` for all.

A table's map: key the masked address (4 bytes, host order, as the facts hold it); value an
entry as recent_entry keeps it: the TTL (u32 at 0), `index` (u32 at 4, the next place in the
ring, 1-based as the kernel keeps it), `nstamps` (u32 at 8), then the ring of 64-bit jiffies
stamps at 16, its size the table's (codegen.rules.extensions.recent.table_settings: the power
of two at or above the largest --hitcount of its rules, 32 if none). Its max_entries is
xt_recent's ip_list_tot (100 here): when it is full, the kernel evicts the least recently
*updated* entry, the BPF LRU hash an entry least recently *looked up*, about: a table of more
addresses than that forgets others than netfilter's. `--reap`, which removes the table's
least recently updated entry, needs that order too, and is refused here.

`recent_clock`: word 0 a fixed clock (0: the real one, `bpf_jiffies64()`; a test run sets it,
as -m limit's), then zeros: the template a new entry is made from (map_update_elem reads a
whole value from it), sized for the largest table.

The code is recent_mt's: the address masked by the table's mask, the TTL (one more in
FORWARD: in and out devices both set), a lookup (with --rttl, an entry whose TTL is neither
the packet's nor 0, nor the packet's 0, is no entry); no entry: --set makes one (a failed
update hotdrops, as a failed allocation does) and matches, the rest miss; --remove deletes
it; --rcheck and --update count the stamps within --seconds (branch-free, `(time - stamp -
1) >> 63`, over the ring, so that the verifier walks the loop once per place) against
--hitcount; --set, and --update when the answer (after `!`) holds, write the stamp and the
TTL. Entries are updated without a lock (the map value carries no BTF here): two CPUs
updating one address at the same moment may lose one stamp of the two.
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R5, R10, AluOp, JmpOp, MapType, Size
from codegen.bpf.maps import Map
from codegen.jiffies import HzUnknown, kernel_hz
from codegen.rules.extensions.recent import Recent, table_settings
from codegen.rules.extensions.recent_tables import IP_LIST_TOT
from codegen.rules.model import Ruleset

from ..layout import FACTS, Facts
from ..program import CompileError
from .base import Context, Emitter, load

CLOCK_MAP = "recent_clock"
WORD = 8
HEADER = 16  # ttl, index, nstamps, padding
TTL, INDEX, NSTAMPS = 0, 4, 8
MAX_RING = 256  # stamps per entry this backend keeps at most (--hitcount up to 256)
ANY = 0  # BPF_ANY


def map_name(table: str) -> str:
    """The name the programs reference table `table`'s map by."""
    return f"recent:{table}"


def uses_recent(ruleset: Ruleset) -> bool:
    return bool(table_settings(ruleset))


def value_size(ring: int) -> int:
    return HEADER + WORD * ring


def clock_size(ruleset: Ruleset) -> int:
    """The clock word and a zero template as large as the largest table's value."""
    rings = [size for _mask, size in table_settings(ruleset).values()]
    return WORD + value_size(max(rings, default=1))


def ip_list_tot() -> int:
    """xt_recent's entries per table on this machine (its module parameter), else its
    default."""
    try:
        with open("/sys/module/xt_recent/parameters/ip_list_tot") as file:
            return int(file.read()) or IP_LIST_TOT
    except (OSError, ValueError):
        return IP_LIST_TOT


def create_maps(ruleset: Ruleset) -> dict[str, Map]:
    """New, empty maps for `ruleset`'s recent tables and the clock, by the names the programs
    use; the caller closes them."""
    maps: dict[str, Map] = {}
    try:
        maps[CLOCK_MAP] = Map(MapType.ARRAY, 4, clock_size(ruleset), 1, name="bpflab_rclock")
        for name, (_mask, ring) in table_settings(ruleset).items():
            maps[map_name(name)] = Map(
                MapType.LRU_HASH, 4, value_size(ring), ip_list_tot(), name="bpflab_recent"
            )
    except BaseException:
        for held in maps.values():
            held.close()
        raise
    return maps


def set_clock(clock: Map, jiffies: int | None) -> None:
    """Fix the programs' clock at `jiffies` (None: the real one), keeping the template."""
    if jiffies is not None and jiffies <= 0:
        raise ValueError(f"a fixed clock must be past jiffy 0, not {jiffies}")
    value = clock.lookup(0)
    assert value is not None
    clock.update(0, (jiffies or 0).to_bytes(WORD, "little") + value[WORD:])


def refusal(match: Recent) -> str | None:
    if match.reap:
        return (
            "-m recent --reap removes the table's least recently updated entry, which a BPF "
            "LRU hash does not tell"
        )
    if match.hitcount > MAX_RING:
        return (
            f"-m recent --hitcount {match.hitcount} would keep more than {MAX_RING} stamps "
            "per address"
        )
    return None


def _hz() -> int:
    try:
        return kernel_hz()
    except HzUnknown as error:
        raise CompileError(f"-m recent counts in the kernel's jiffies, but {error}") from error


def recent(match: Recent, ctx: Context) -> list[Item]:
    problem = refusal(match)
    if problem is not None:
        raise CompileError(problem)
    settings = {} if ctx.ruleset is None else table_settings(ctx.ruleset)
    mask, ring = settings.get(match.name, (match.mask, match.nstamps))
    table = map_name(match.name)
    key, ttl_at, now_at, time_at = (ctx.key_offset + n for n in (0, 4, 8, 16))
    label = ctx.new_label
    have_now, local, found, absent, matched = (
        label(f"recent_{n}") for n in ("now", "local", "found", "absent", "matched")
    )
    # The answers, `!` applied: what a found "yes" and "no" jump to.
    yes, no = (ctx.miss, matched) if match.negated else (matched, ctx.miss)
    code: list[Item] = [
        I.ld_map_value(R1, CLOCK_MAP, 0),
        I.ldx(Size.DW, R0, R1, 0),
        I.jmp(JmpOp.JNE, R0, 0, have_now),
        I.call("jiffies64"),
        Label(have_now),
        I.stx(Size.DW, R10, now_at, R0),
        # The TTL as seen before forwarding: one more in FORWARD.
        load(Facts.TTL),
        I.ldx(Size.W, R2, FACTS, Facts.IN_IFINDEX.offset),
        I.jmp32(JmpOp.JEQ, R2, 0, local),
        I.ldx(Size.W, R2, FACTS, Facts.OUT_IFINDEX.offset),
        I.jmp32(JmpOp.JEQ, R2, 0, local),
        I.alu32(AluOp.ADD, R1, 1),
        I.alu32(AluOp.AND, R1, 0xFF),
        Label(local),
        I.stx(Size.W, R10, ttl_at, R1),
        load(Facts.DADDR if match.dest else Facts.SADDR),
    ]
    if mask != 0xFFFF_FFFF:
        code.append(I.alu32(AluOp.AND, R1, mask))
    code += [
        I.stx(Size.W, R10, key, R1),
        I.ld_map_fd(R1, table),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, key),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, absent),
    ]
    if match.rttl:  # recent_entry_lookup's TTL test
        code += [
            I.ldx(Size.W, R1, R0, TTL),
            I.ldx(Size.W, R2, R10, ttl_at),
            I.jmp32(JmpOp.JEQ, R1, R2, found),
            I.jmp32(JmpOp.JEQ, R1, 0, found),
            I.jmp32(JmpOp.JEQ, R2, 0, found),
            I.ja(absent),
        ]
    code.append(Label(found))
    if match.command == "set":
        code += [*_update(ring, now_at, ttl_at, ctx), I.ja(yes)]
    elif match.command == "remove":
        code += [
            I.ld_map_fd(R1, table),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, key),
            I.call("map_delete_elem"),
            I.ja(yes),
        ]
    else:
        code += _count(match, ring, now_at, time_at, ctx)
        threshold = max(match.hitcount, 1)
        if match.command == "rcheck":
            code += [I.jmp(JmpOp.JGE, R2, threshold, yes), I.ja(no)]
        else:
            # --update writes the stamp when the answer, after `!`, is yes.
            held, refresh = label("recent_held"), label("recent_refresh")
            code += [I.jmp(JmpOp.JGE, R2, threshold, held)]
            if match.negated:  # not held: the answer is yes
                code += [I.ja(refresh), Label(held), I.ja(ctx.miss)]
            else:
                code += [I.ja(ctx.miss), Label(held)]
            code += [Label(refresh), *_update(ring, now_at, ttl_at, ctx), I.ja(matched)]
    code.append(Label(absent))
    if match.command == "set":
        code += _make(table, key, now_at, ttl_at, ctx)
        code.append(I.ja(yes))
    else:
        code.append(I.ja(no))
    return [*code, Label(matched)]


def _count(match: Recent, ring: int, now_at: int, time_at: int, ctx: Context) -> list[Item]:
    """r2 = how many of the entry's (r0's) stamps are within --seconds (all of them without
    --seconds): `time = now - seconds * HZ`, and a stamp counts unless time_after(time,
    stamp), that is when `time - stamp - 1` is negative as a signed 64-bit number. The loop
    has no branch but its exits, so the verifier walks it once per place of the ring."""
    if not match.seconds:
        return [I.ldx(Size.W, R2, R0, NSTAMPS)]
    loop, done = ctx.new_label("recent_loop"), ctx.new_label("recent_counted")
    return [
        I.ldx(Size.DW, R1, R10, now_at),
        I.ld_imm64(R2, match.seconds * _hz()),
        I.alu64(AluOp.SUB, R1, R2),
        I.stx(Size.DW, R10, time_at, R1),
        I.mov64(R2, 0),  # hits
        I.mov64(R3, R0),  # the stamp's place, less HEADER
        I.mov64(R4, 0),  # its number
        Label(loop),
        I.ldx(Size.W, R1, R0, NSTAMPS),
        I.jmp(JmpOp.JGE, R4, R1, done),
        I.ldx(Size.DW, R1, R10, time_at),
        I.ldx(Size.DW, R5, R3, HEADER),
        I.alu64(AluOp.SUB, R1, R5),
        I.alu64(AluOp.SUB, R1, 1),
        I.alu64(AluOp.RSH, R1, 63),
        I.alu64(AluOp.ADD, R2, R1),
        I.alu64(AluOp.ADD, R3, WORD),
        I.alu64(AluOp.ADD, R4, 1),
        I.jmp(JmpOp.JLT, R4, ring, loop),
        Label(done),
    ]


def _update(ring: int, now_at: int, ttl_at: int, ctx: Context) -> list[Item]:
    """recent_entry_update on the entry at r0, then its TTL: the stamp at index & (ring - 1),
    index one on, nstamps the larger of itself and index."""
    counted = ctx.new_label("recent_stamped")
    return [
        I.ldx(Size.W, R1, R0, INDEX),
        I.alu32(AluOp.AND, R1, ring - 1),
        I.mov64(R3, R1),
        I.alu64(AluOp.LSH, R3, 3),
        I.alu64(AluOp.ADD, R3, R0),
        I.ldx(Size.DW, R2, R10, now_at),
        I.stx(Size.DW, R3, HEADER, R2),
        I.alu32(AluOp.ADD, R1, 1),
        I.stx(Size.W, R0, INDEX, R1),
        I.ldx(Size.W, R2, R0, NSTAMPS),
        I.jmp32(JmpOp.JGE, R2, R1, counted),
        I.stx(Size.W, R0, NSTAMPS, R1),
        Label(counted),
        I.ldx(Size.W, R1, R10, ttl_at),
        I.stx(Size.W, R0, TTL, R1),
    ]


def _make(table: str, key: int, now_at: int, ttl_at: int, ctx: Context) -> list[Item]:
    """recent_entry_init: a zero entry from the clock map's template, then its TTL, its
    first stamp, index and nstamps 1. An update or a lookup that fails hotdrops."""
    return [
        I.ld_map_fd(R1, table),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, key),
        I.ld_map_value(R3, CLOCK_MAP, WORD),
        I.mov64(R4, ANY),
        I.call("map_update_elem"),
        I.jmp(JmpOp.JNE, R0, 0, ctx.hotdrop),
        I.ld_map_fd(R1, table),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, key),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, ctx.hotdrop),
        I.ldx(Size.W, R1, R10, ttl_at),
        I.stx(Size.W, R0, TTL, R1),
        I.mov32(R1, 1),
        I.stx(Size.W, R0, INDEX, R1),
        I.stx(Size.W, R0, NSTAMPS, R1),
        I.ldx(Size.DW, R1, R10, now_at),
        I.stx(Size.DW, R0, HEADER, R1),
    ]


EMITTER = Emitter(Recent, recent, refusal=refusal)
