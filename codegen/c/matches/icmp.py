"""`-m icmp` (ip_tables.c, icmp_match): type and code range, after the header check that can
drop a packet."""

from __future__ import annotations

from codegen.rules.extensions.icmp import ICMP_HEADER, IcmpMatch

from .common import UINT8_MAX, Labels, always_miss, in_range, require, transport_header

MODEL = IcmpMatch
ANY_TYPE = 0xFF  # `--icmp-type any`


def write(match: IcmpMatch, labels: Labels) -> list[str]:
    code = transport_header(ICMP_HEADER, labels)
    if match.type == ANY_TYPE:  # the codes do not matter
        return code + (always_miss(labels) if match.negated else [])
    codes = in_range("f->icmp_code", match.code_min, match.code_max, UINT8_MAX)
    hit = f"f->icmp_type == {match.type}" + ("" if codes == "1" else f" && ({codes})")
    return code + require(hit, match.negated, labels)
