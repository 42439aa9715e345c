"""`-m hashlimit` (xt_hashlimit.c revision 3, packet and byte rates): the packet's key as the
mode and the masks make it, then its bucket (codegen/c/hashlimit.py); a packet whose ports the
mode needs but that is too short to hold them, or for which no entry can be made, is dropped
on the spot.
Cost, cap and the expiry in jiffies at the kernel's HZ; AH's SPI and a later fragment's
payload are ports 0, as in the bytecode backend (codegen.tc.matches.hashlimit)."""

from __future__ import annotations

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
    msecs_to_jiffies,
)
from codegen.tc.matches.hashlimit import WINDOW_START_BITS, table_id

from ..limit import hz
from .common import Labels, UnsupportedMatch

MODEL = Hashlimit
_PORTED = sorted(protocol for protocol, offset in PORT_OFFSETS.items() if offset == 0)
_AH = next(protocol for protocol, offset in PORT_OFFSETS.items() if offset == 4)


def _address(field: str, bits: int) -> str:
    if bits == 0:
        return "0"
    if bits == 32:
        return field
    return f"({field} & 0x{(0xFFFF_FFFF << (32 - bits)) & 0xFFFF_FFFF:x}u)"


def write(match: Hashlimit, labels: Labels) -> list[str]:
    ticks = hz()
    mode = match.mode
    code = [
        "{",
        "    struct hashlimit_key key = {};",
        f"    key.table = 0x{table_id(match):x}u;",
    ]
    if mode & HASH_SIP:
        code.append(f"    key.saddr = {_address('f->saddr', match.srcmask)};")
    if mode & HASH_DIP:
        code.append(f"    key.daddr = {_address('f->daddr', match.dstmask)};")
    if mode & (HASH_SPT | HASH_DPT):
        ported = " || ".join(f"f->protocol == {protocol}" for protocol in _PORTED)
        code += [f"    if ({ported}) {{", f"        if (f->l4_len < 4) goto {labels.hotdrop};"]
        if mode & HASH_SPT:
            code.append("        key.sport = f->sport;")
        if mode & HASH_DPT:
            code.append("        key.dport = f->dport;")
        code += [
            f"    }} else if (f->protocol == {_AH} && f->l4_len < 8) {{",
            f"        goto {labels.hotdrop};",
            "    }",
        ]
    expire = msecs_to_jiffies(match.expire, ticks)
    if match.rate_match:  # windows (codegen.rules.extensions.hashlimit_rate)
        length = interval_jiffies(match, ticks)
        if length >> WINDOW_START_BITS:
            raise UnsupportedMatch(
                f"the C backend refuses --hashlimit-rate-interval {match.interval} because"
                f" its {length} jiffies are more than its windows keep (2^{WINDOW_START_BITS} - 1)"
            )
        counted = "f->tot_len" if match.bytes else "1"
        taken = (
            f"hashlimit_window(&key, {expire}ull, {length}ull, {window_rate(match)}ull,"
            f" {window_burst(match)}ull, {counted})"
        )
    elif match.bytes:  # a byte rate: the datagram's chunks, a second's credit, the refills
        chunk = byte_arithmetic.chunk_cost(match.avg, ticks)
        taken = (
            f"hashlimit_take_bytes(&key, {expire}ull, f->tot_len, {chunk}ull,"
            f" {byte_arithmetic.full(ticks)}ull, {match.burst}ull)"
        )
    else:
        price, cap = cost(match, ticks), credit_cap(match, ticks)
        taken = f"hashlimit_take(&key, {expire}ull, {price}ull, {cap}ull)"
    code += [
        f"    int taken = {taken};",
        f"    if (taken < 0) goto {labels.hotdrop};",
        f"    if ({'taken' if match.above else '!taken'}) goto {labels.miss};",
        "}",
    ]
    return code
