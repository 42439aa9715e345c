"""The packet facts: what the rules compare, parsed once per packet into a struct (host order)
by `parse`, which also answers "not handled" for what ip_rcv would drop before netfilter and
for anything that is not IPv4.

The struct lives in a one-slot per-CPU map of the unit's own rather than on the stack: see the
comment written above its map for why (it keeps verification linear in the rule count).
"""

from __future__ import annotations

from . import policy as c_policy

FACTS_MAP = "facts"  # the C programs' own scratch map
HEADERS = 14 + 60 + 20  # the most any match looks at: Ethernet, IPv4 with options, TCP


def facts_struct(tracking: bool, policy: bool = False) -> list[str]:
    """The facts' declaration; with `tracking`, the packet's connection is one of them, with
    `policy` its IPsec states (codegen/c/policy.py)."""
    at = FACTS.index("};")
    more = []
    if tracking:
        more.append("    struct ct_result ct;  // what ct_classify found (codegen/conntrack)")
    if policy:
        more += c_policy.FACTS
    code = [*FACTS[:at], *more, *FACTS[at:]]
    return [*c_policy.STATE_STRUCT, *code] if policy else code


FACTS = [
    "// The packet as the rules see it: parsed once, host order.",
    "struct facts {",
    "    u32 saddr;",
    "    u32 daddr;",
    "    u32 in_ifindex;",
    "    u32 out_ifindex;",
    "    u32 mark;",
    "    u32 decided;  // counter slot of the rule or policy that gave the verdict",
    "    u16 tot_len;",
    "    u16 fragment;  // fragment offset in 8-byte units",
    "    u16 l4_len;  // bytes after the IP header, within the IP total length",
    "    u16 sport;",
    "    u16 dport;",
    "    u8 protocol;",
    "    u8 ttl;",
    "    u8 pkt_type;",
    "    u8 tcp_flags;",
    "    u8 icmp_type;",
    "    u8 icmp_code;",
    "    u8 tos;",
    "    u16 id;  // the IP identification",
    "    u8 more_fragments;  // the MF flag",
    "    u8 reject;  // 0, or 1 + the ipt_reject_with of the REJECT that dropped it",
    "    u8 src_address_type;  // -m addrtype's answers, found at the first rule that asks",
    "    u8 dst_address_type;  // (0: not yet; see codegen/c/matches/addrtype.py)",
    "    u8 log_hook;  // the hook LOG records name (codegen/c/log.py)",
    "    u8 table_result;  // what the scan of a run in the rule table found (codegen/c/table.py)",
    "    u32 table_at;  // the scan's next entry",
    "    u8 owner_state;  // -m owner's socket, its file's fsuid and fsgid (codegen/c/owner.py)",
    "    u32 owner_uid;",
    "    u32 owner_gid;",
    "    u64 owner_groups;  // with --suppl-groups: the address of the cred's group_info",
    "    u32 physin;  // -m physdev's bridge ports (0: none; codegen/c/bridges.py)",
    "    u32 physout;",
    "};",
    "// Kept in a one-slot per-CPU array rather than on the stack, and read through a",
    "// volatile pointer: every rule loads what it compares afresh, from memory whose",
    "// contents the verifier does not track. On the stack (it tracks spilled values) or",
    "// in registers, what one rule's comparisons learn would ride along into every later",
    "// rule and split the verifier's states: verification would grow with the square of",
    "// the rule count. TC programs do not nest on one CPU, so one slot per CPU suffices.",
    "typedef volatile struct facts facts_t;",
    f"BPF_PERCPU_ARRAY({FACTS_MAP}, struct facts, 1);",
]

PARSE = [
    "// Fill the facts, or answer -1 for what the kernel drops before netfilter sees it",
    "// (ip_rcv_core's checks) and for anything that is not IPv4.",
    "static __always_inline int parse(struct __sk_buff *skb, facts_t *f, u32 pkt_type)",
    "{",
    "    // A VLAN tag taken off by offload: the IP stack sees it on the VLAN device, if any.",
    "    if (skb->vlan_present)",
    "        return -1;",
    "    u32 pull = skb->len < HEADERS ? skb->len : HEADERS;",
    "",
    "    // Make the headers linear if they are not.",
    "    if ((void *)(long)skb->data + pull > (void *)(long)skb->data_end)",
    "        bpf_skb_pull_data(skb, pull);",
    "    void *data = (void *)(long)skb->data;",
    "    void *data_end = (void *)(long)skb->data_end;",
    "    struct ethhdr *eth = data;",
    "    struct iphdr *ip = data + ETH_HLEN;",
    "",
    "    if ((void *)(ip + 1) > data_end)",
    "        return -1;",
    "    if (eth->h_proto != BE16(ETH_P_IP) || ip->version != 4 || ip->ihl < 5)",
    "        return -1;",
    "    u32 header_length = ip->ihl * 4;",
    "    u32 total_length = BE16(ip->tot_len);",
    "",
    "    // A total length below the header, or beyond what arrived: ip_rcv drops it.",
    "    if (total_length < header_length || total_length + ETH_HLEN > skb->len)",
    "        return -1;",
    "    f->tot_len = total_length;",
    "    f->l4_len = total_length - header_length;",
    "    f->fragment = BE16(ip->frag_off) & 0x1fff;",
    "    f->more_fragments = (BE16(ip->frag_off) >> 13) & 1;",
    "    f->id = BE16(ip->id);",
    "    f->tos = ip->tos;",
    "    f->ttl = ip->ttl;",
    "    f->protocol = ip->protocol;",
    "    f->saddr = BE32(ip->saddr);",
    "    f->daddr = BE32(ip->daddr);",
    "    f->mark = skb->mark;",
    "    f->pkt_type = pkt_type;",
    "    if (f->fragment != 0)",
    "        return 0;",
    "    // The transport header of a first fragment, as far as it is there.",
    "    u8 *l4 = (u8 *)ip + header_length;",
    "",
    "    if (f->l4_len < 2 || (void *)(l4 + 2) > data_end)",
    "        return 0;",
    "    f->icmp_type = l4[0];",
    "    f->icmp_code = l4[1];",
    "    if (f->l4_len < 4 || (void *)(l4 + 4) > data_end)",
    "        return 0;",
    "    f->sport = (l4[0] << 8) | l4[1];",
    "    f->dport = (l4[2] << 8) | l4[3];",
    "    if (f->l4_len < 14 || (void *)(l4 + 14) > data_end)",
    "        return 0;",
    "    f->tcp_flags = l4[13];",
    "    return 0;",
    "}",
]
