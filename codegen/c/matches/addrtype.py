"""`-m addrtype` (xt_addrtype.c revision 1, and inet_dev_addr_type in fib_frontend.c): each
side's address type, in its mask (not in it, negated).

Each address is looked up once per packet, at the first rule that asks, by `address_answer`
(declared once per unit, `declarations`): 0.0.0.0/8 and 255.255.255.255 are BROADCAST and
224.0.0.0/4 MULTICAST before any lookup; else the caller's `address_types` LPM trie (the
namespace's routes, filled at apply time by harness.deploy.routes, failing routes held as
UNICAST) answers, UNICAST when nothing covers the address. The answer, kept in the facts,
says on which of the packet's devices the route lies: limited to another, the type is
UNICAST.
"""

from __future__ import annotations

from codegen.rules.extensions.addrtype import AddressTypes, AddrType
from codegen.rules.routes import BROADCAST, MULTICAST, UNICAST
from codegen.tc.matches.addrtype import (
    ADDRESS_TYPES,
    ADDRESS_TYPES_ENTRIES,
    ON_IN_DEVICE,
    ON_OUT_DEVICE,
    TYPE_BITS,
)

from .common import Labels, hex_literal, require

MODEL = AddrType


def declarations(entries: int = ADDRESS_TYPES_ENTRIES) -> list[str]:
    """The trie (the caller's, from its pin) and the functions the writer calls, for a unit
    with addrtype."""
    return [
        "// -m addrtype: the namespace's routes by prefix (codegen.tc.matches.addrtype).",
        "struct address_type_key {",
        "    u32 prefixlen;",
        "    u32 address;  // network order",
        "};",
        "struct address_type_value {",
        "    u32 type;  // RTN_*, UNICAST for a route the kernel's lookup fails on",
        "    u32 ifindex;  // the route's first next hop's device",
        "};",
        'BPF_TABLE_PINNED("lpm_trie", struct address_type_key, struct address_type_value,',
        f'                 {ADDRESS_TYPES}, {entries}, PIN_DIR "/{ADDRESS_TYPES}");',
        "",
        "// inet_dev_addr_type as the facts keep it: 1 + the type, | ON_IN (ON_OUT) when it",
        "// holds on the packet's in (out) device: a type decided without a route, or no route,",
        "// holds on any; a route's, on the devices it goes through (and on a device the packet",
        "// has not: nothing to limit to).",
        f"#define TYPE_BITS {hex_literal(TYPE_BITS)}",
        f"#define ON_IN {hex_literal(ON_IN_DEVICE)}",
        f"#define ON_OUT {hex_literal(ON_OUT_DEVICE)}",
        "static __always_inline u32 address_answer(u32 address, u32 in, u32 out)",
        "{",
        "    struct address_type_key key = { .prefixlen = 32, .address = BE32(address) };",
        "    struct address_type_value *route;",
        "    u32 answer;",
        "",
        "    if ((address >> 24) == 0 || address == 0xffffffffu)",
        f"        return {BROADCAST + 1} | ON_IN | ON_OUT;",
        "    if ((address >> 28) == 0xe)",
        f"        return {MULTICAST + 1} | ON_IN | ON_OUT;",
        f"    route = {ADDRESS_TYPES}.lookup(&key);",
        "    if (!route)",
        f"        return {UNICAST + 1} | ON_IN | ON_OUT;",
        "    answer = (route->type + 1) & TYPE_BITS;",
        "    if (!in || route->ifindex == in)",
        "        answer |= ON_IN;",
        "    if (!out || route->ifindex == out)",
        "        answer |= ON_OUT;",
        "    return answer;",
        "}",
        "",
        "// The type an answer gives, limited to a device (`on`: ON_IN, ON_OUT) or not (0).",
        "static __always_inline u32 address_type(u32 answer, u32 on)",
        "{",
        "    if (on && !(answer & on))",
        f"        return {UNICAST};",
        "    return (answer & TYPE_BITS) - 1;",
        "}",
    ]


def _side(side_name: str, side: AddressTypes, on: str, labels: Labels) -> list[str]:
    kept = f"f->{side_name}_address_type"
    address = f"f->{side_name[0]}addr"  # saddr, daddr
    find = f"if (!{kept}) {kept} = address_answer({address}, f->in_ifindex, f->out_ifindex);"
    hit = f"(({hex_literal(side.mask)} >> address_type({kept}, {on})) & 1) != 0"
    return [find, *require(hit, side.negated, labels)]


def write(match: AddrType, labels: Labels) -> list[str]:
    on = {None: "0", "in": "ON_IN", "out": "ON_OUT"}[match.limit]
    code: list[str] = []
    if match.src is not None:
        code += _side("src", match.src, on, labels)
    if match.dst is not None:
        code += _side("dst", match.dst, on, labels)
    return code
