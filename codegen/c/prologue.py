"""The start of a translation unit: includes, constants, the packet facts, the maps and the
helpers every entry function uses, declared once for all the unit's programs."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from codegen.conntrack import CT_TABLE, TABLE_ENTRIES
from codegen.rules.tracking.timeouts import Timeouts
from codegen.tc.layout import NOT_HANDLED, CounterLayout
from codegen.tc.local import (
    STANDIN,
    LocalAddresses,
    c_membership,
    joined_groups,
    own_addresses,
    unicast_destinations,
)

from .conntrack import tracker
from .entries import Entry
from .facts import HEADERS, PARSE, facts_struct
from .fragments import FRAGMENTS_DECLARATION
from .maps import (
    COUNT,
    COUNTERS_MAP,
    counters_map,
    replies_map,
)
from .source_text import c_string
from .targets import ACCEPT, CONTINUE, DROP


def prologue(
    layout: CounterLayout,
    entries: Sequence[Entry],
    pin_dir: str,
    map_entries: Mapping[str, int],
    tracking: Timeouts | None = None,
    rejects_here: bool = False,
    local: LocalAddresses | None = None,
    policy: bool = False,
) -> list[str]:
    """What precedes the unit's functions. `map_entries` gives the caller's maps'
    max_entries (default: the counter layout's size); only a unit with an ingress program
    has the tests of `local`, the namespace's local addresses (codegen.tc.local; None: its
    STANDIN), and only one with an ingress or egress program (where INPUT and OUTPUT run) the
    fragments map; with `tracking` (its settings), the connection tracker and its maps come
    before the facts, which hold its result; with `rejects_here`, REJECT's answer programs
    are declared; with `policy`, the facts hold the packet's IPsec states
    (codegen/c/policy.py)."""
    programs = ", ".join(entry.function for entry in entries)
    code = [
        f"// bpfilter-lab, C backend (codegen/c): {programs}.",
        "// TC programs (SCHED_CLS, direct action) for bcc; the licence is bcc's default, GPL",
        "// (bpf_fib_lookup is GPL-only). Same semantics as the bytecode backend (codegen/tc).",
        "#include <uapi/linux/bpf.h>",
        "#include <uapi/linux/pkt_cls.h>",
        "#include <uapi/linux/if_ether.h>",
        "#include <uapi/linux/ip.h>",
        "",
        "#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__",
        "#define BE16(x) __builtin_bswap16(x)",
        "#define BE32(x) __builtin_bswap32(x)",
        "#else",
        "#define BE16(x) (x)",
        "#define BE32(x) (x)",
        "#endif",
        "#define AF_INET 2",
        "#define PACKET_HOST 0",
        "#define PACKET_OTHERHOST 3",
        f"#define RAW_SOCKET {socket.SOCK_RAW}  // sock_type SOCK_RAW",
        f"#define PROTO_IGMP {socket.IPPROTO_IGMP}",
        f"#define RAW_PROTOCOL {socket.IPPROTO_RAW}  // IPPROTO_RAW (IP_HDRINCL)",
        f"#define HEADERS {HEADERS}  // Ethernet, IPv4 with options, TCP: all any match reads",
        f"#define NOT_HANDLED {layout.slot(NOT_HANDLED)}  // counter slot",
        f"#define PIN_DIR {c_string(pin_dir)}",
        "",
        "// What a user chain answers.",
        f"enum {{ CONTINUE = {CONTINUE}, ACCEPT = {ACCEPT}, DROP = {DROP} }};",
        "",
    ]
    if tracking:
        code += [*tracker(map_entries.get(CT_TABLE, TABLE_ENTRIES), tracking), ""]
    code += [
        *facts_struct(tracking is not None, policy),
        "",
        *counters_map(map_entries.get(COUNTERS_MAP, len(layout))),
    ]
    if any(entry.hook == "ingress" for entry in entries):
        local = STANDIN if local is None else local
        code += [
            "",
            "// What the namespace delivers locally, when the rule set was applied.",
            *c_membership("own_address", own_addresses(local)),
            *c_membership("local_unicast", unicast_destinations(local)),
            *c_membership("joined_group", joined_groups(local)),
        ]
    if any(entry.hook in ("ingress", "egress") for entry in entries):
        code += FRAGMENTS_DECLARATION
    if rejects_here:
        code += replies_map(len(entries))
    return [*code, "", *COUNT, "", *PARSE, ""]
