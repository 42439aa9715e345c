"""Fragmented datagrams on INPUT and OUTPUT: judged once, by their first fragment, and counted
once with their whole length, as netfilter judges and counts them there.

INPUT sees a datagram after reassembly (ip_local_deliver) and OUTPUT before the kernel fragments
it (ip_finish_output). Here the first fragment is judged and leaves its verdict and the rule
(or policy) that gave it in a map of the unit's own (FRAGMENTS_MAP, an LRU hash); a later
fragment adds its payload's bytes to that counter and shares the verdict (a dropped first
fragment keeps the rest from ever being reassembled). FORWARD and the test-run flavour judge
each fragment on its own.
"""

from __future__ import annotations

from .maps import COUNTERS_MAP

FRAGMENTS_MAP, FRAGMENTS_TRACKED = "fragments", 4096  # the program's own: an LRU hash
FIRST_DROPPED = 1 << 30  # in a FRAGMENTS_MAP value: the first fragment was dropped

FRAGMENTS_DECLARATION = [
    "// Datagrams whose first fragment INPUT or OUTPUT judged -> the counter slot",
    "// that did, with FIRST_DROPPED if it dropped it.",
    "struct fragment_key {",
    "    u32 saddr;",
    "    u32 daddr;",
    "    u16 id;",
    "    u8 protocol;",
    "    u8 pad;",
    "};",
    f'BPF_TABLE("lru_hash", struct fragment_key, u32, {FRAGMENTS_MAP}, {FRAGMENTS_TRACKED});',
    f"#define FIRST_DROPPED {FIRST_DROPPED}",
    "",
    "static __always_inline void add_bytes(u32 slot, u32 bytes)",
    "{",
    f"    struct counter *counter = {COUNTERS_MAP}.lookup(&slot);",
    "",
    "    if (counter)",
    "        counter->bytes += bytes;",
    "}",
]

_FRAGMENT_KEY = [
    "    struct fragment_key key = {",
    "        .saddr = f->saddr, .daddr = f->daddr, .id = f->id, .protocol = f->protocol,",
    "    };  // .pad is zero",
]


def remember_first_fragment(dropped: bool) -> list[str]:
    """After INPUT or OUTPUT judged a first fragment: its slot (and whether it dropped it) for
    the fragments that follow."""
    slot = "f->decided | FIRST_DROPPED" if dropped else "f->decided"
    return [
        "if (f->more_fragments) {  // a first fragment: later ones share its verdict and rule",
        *_FRAGMENT_KEY,
        f"    u32 slot = {slot};",
        "",
        f"    {FRAGMENTS_MAP}.update(&key, &slot);",
        "}",
    ]


_LATER_FRAGMENT = [
    *_FRAGMENT_KEY,
    f"    u32 *slot = {FRAGMENTS_MAP}.lookup(&key);",
    "",
    "    if (!slot)",
    "        goto not_handled;  // its first fragment was not seen",
    "    u32 first = *slot;",
    "",
    "    add_bytes(first & ~FIRST_DROPPED, f->l4_len);",
    "    if (!f->more_fragments)",
    f"        {FRAGMENTS_MAP}.delete(&key);",
    "    if (first & FIRST_DROPPED)",
    "        goto drop;",
    "    return TC_ACT_OK;",
    "}",
]
# Before INPUT: a later fragment takes its first fragment's verdict.
LATER_FRAGMENTS = [
    "// Netfilter's INPUT sees a fragmented datagram once, reassembled, with its whole length.",
    "if (f->fragment != 0) {",
    *_LATER_FRAGMENT,
]
# Before OUTPUT the same, except for a packet from an IPPROTO_RAW socket (IP_HDRINCL): its
# sender wrote it whole, fragment fields and all; the kernel never fragments those (it refuses
# them over the MTU), so OUTPUT judged it as it is, and so does this program.
LATER_FRAGMENTS_EGRESS = [
    "// Netfilter's OUTPUT sees a datagram once, before the kernel fragments it. A packet",
    "// written whole by an IPPROTO_RAW socket was judged as it is, fragment or not.",
    "if (f->fragment != 0) {",
    "    struct bpf_sock *sk = skb->sk;",
    "",
    "    if (sk)",
    "        sk = bpf_sk_fullsock(sk);",
    "    if (sk && sk->type == RAW_SOCKET && sk->protocol == RAW_PROTOCOL)",
    "        goto whole_datagram;",
    *_LATER_FRAGMENT,
    "whole_datagram:",
]
