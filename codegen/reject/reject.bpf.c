/* REJECT for the TC programs: the answer ipt_REJECT sends (nf_reject_ipv4.c nf_send_reset, and
 * nf_send_unreach through icmp.c __icmp_send), built in the packet itself and redirected.
 *
 * One function, called by the generated programs of both backends:
 * - reject_reply(skb, with, hook, icmp_source): `with` is the enum ipt_reject_with value (0..3,
 *   5, 6, 8: an ICMP destination unreachable; 7: a TCP RST); `hook` 0 when the packet came in on
 *   skb->ifindex (TC ingress: the answer goes back out of it), RJ_HOOK_EGRESS (1) when it is
 *   leaving through it (TC egress: the answer is delivered to our own stack), RJ_HOOK_BRIDGED
 *   (2) when a bridge forwards it out of skb->ifindex, a port, from the port
 *   skb->ingress_ifindex (the answer goes back out of that); `icmp_source` the source address
 *   of an ICMP error, in host order; `pkt_type` the packet's, with RJ_BROADCAST_ROUTE (given by
 *   the includer) or'd in when the caller found its destination a broadcast address of the
 *   namespace (a subnet's), and RJ_FORWARDED when the kernel routed it (its error quotes it
 *   with the TTL ip_forward decremented), and RJ_NO_CONNECTION when conntrack found it INVALID
 *   (nf_ct_attach has nothing to give its answer). It returns the TC action: bpf_redirect's
 *   (TC_ACT_REDIRECT) when the packet was rewritten into the answer, TC_ACT_SHOT when no
 *   answer is due or none can be built (the packet is then dropped, as REJECT drops it).
 *
 * Whether an answer is due follows codegen/rules/extensions/reject.py (reset_sent,
 * unreachable_sent), with one addition: a TCP or UDP checksum that holds only the pseudo
 * header's sum (CHECKSUM_PARTIAL traffic of a local socket, which TC cannot tell) is good.
 *
 * An ICMP error is sent only as icmp.c's rate limits allow (rj_rate_allows): a global bucket
 * and one per peer, kept in the maps `reject_rate` (array of one struct rj_rate: the
 * namespace's icmp sysctls, the clock, the global bucket) and `reject_peers` (LRU hash: the
 * peer's address, host order -> struct rj_peer), which every program of a namespace shares.
 *
 * The includer provides the types (__u8 ... __u64, __s64), the helper declarations and the
 * uapi constants of <linux/bpf.h>. The frame is Ethernet with IPv4 at offset 14. Every packet
 * access goes through the helpers (no packet pointers are kept), so a paged skb is no matter.
 */

/* The function the verifier checks once, whatever calls it (a BTF-described global function). */
#ifndef RJ_GLOBAL
#define RJ_GLOBAL __attribute__((noinline))
#endif

#define RJ_ETH_HLEN 14
#define RJ_TC_ACT_SHOT 2
#define RJ_TCP_RESET 7
#define RJ_ICMP 1
#define RJ_TCP 6
#define RJ_UDP 17
#define RJ_TH_FIN 0x01
#define RJ_TH_SYN 0x02
#define RJ_TH_RST 0x04
#define RJ_TH_ACK 0x10
#define RJ_ANSWER_MAX 576 /* the ICMP error's IP total length at most (icmp.c) */
#define RJ_QUOTE_MAX (RJ_ANSWER_MAX - 20 - 8)
#define RJ_CHUNK 64                  /* bytes summed per bpf_csum_diff call (stack: 248 in all) */
#define RJ_CHUNKS (65536 / RJ_CHUNK) /* enough for any IP datagram */

static __always_inline __u32 rj_be32(const __u8 *p)
{
    return (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
}

static __always_inline __u16 rj_be16(const __u8 *p) { return (__u16)(p[0] << 8 | p[1]); }

static __always_inline void rj_put32(__u8 *p, __u32 value)
{
    p[0] = value >> 24;
    p[1] = value >> 16;
    p[2] = value >> 8;
    p[3] = value;
}

static __always_inline void rj_put16(__u8 *p, __u16 value)
{
    p[0] = value >> 8;
    p[1] = value;
}

/* A 32-bit partial sum folded to 16 bits (not complemented), as bpf_csum_diff's sums are: in
 * the byte order of memory, so that storing it as a native __u16 puts it right on the wire. */
static __always_inline __u16 rj_fold(__u64 sum)
{
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    return (__u16)sum;
}

/* The sum of `size` bytes of memory (a multiple of 4, at most 512) added to `seed`. */
static __always_inline __u32 rj_sum_mem(void *from, __u32 size, __u32 seed)
{
    __s64 sum = bpf_csum_diff(0, 0, from, size, seed);

    return sum < 0 ? seed : (__u32)sum;
}

/* The sum of `len` packet bytes at `offset` added to `seed`, in chunks (the last zero-padded,
 * which adds nothing), in the low 32 bits; RJ_SUM_FAILED if the bytes cannot be read. */
#define RJ_SUM_FAILED (1ULL << 32)

static __always_inline __u64 rj_sum(struct __sk_buff *skb, __u32 offset, __u32 len, __u32 seed)
{
    __u8 buf[RJ_CHUNK];
    __u32 total = seed, whole = len / RJ_CHUNK, tail = len % RJ_CHUNK;
    __s64 part;

    /* Whole chunks first, then the rest: one size a pass, so that the verifier's passes
     * through the loop do not fork on it. */
    for (__u32 i = 0; i < RJ_CHUNKS; i++) {
        if (i >= whole)
            break;
        if (bpf_skb_load_bytes(skb, offset + i * RJ_CHUNK, buf, RJ_CHUNK))
            return RJ_SUM_FAILED;
        part = bpf_csum_diff(0, 0, (void *)buf, RJ_CHUNK, total);
        if (part < 0)
            return RJ_SUM_FAILED;
        total = (__u32)part;
    }
    if (tail) {
        __builtin_memset(buf, 0, sizeof(buf));
        if (bpf_skb_load_bytes(skb, offset + whole * RJ_CHUNK, buf, tail))
            return RJ_SUM_FAILED;
        part = bpf_csum_diff(0, 0, (void *)buf, RJ_CHUNK, total);
        if (part < 0)
            return RJ_SUM_FAILED;
        total = (__u32)part;
    }
    return total;
}

static __always_inline int rj_sum_packet(struct __sk_buff *skb, __u32 offset, __u32 len,
                                         __u32 *sum)
{
    __u64 total = rj_sum(skb, offset, len, *sum);

    if (total & RJ_SUM_FAILED)
        return -1;
    *sum = (__u32)total;
    return 0;
}

/* nf_ip_checksum on the transport of `len` bytes at `offset`, whose own sum is `data_sum`: TCP
 * and UDP with their pseudo header, any other protocol over its bytes alone; good when the sum
 * folds to all ones. A TCP or UDP check field that holds just the folded pseudo-header sum is
 * good too: what a local socket's CHECKSUM_PARTIAL packet carries (the kernel does not verify
 * those; TC cannot tell them). */
static __always_inline int rj_checksum_ok(struct __sk_buff *skb, const __u8 *ip, __u32 proto,
                                          __u32 offset, __u32 len, __u32 data_sum)
{
    __u8 pseudo[12];
    __u8 check[2] = {};
    __u16 seed, field;

    if (proto != RJ_TCP && proto != RJ_UDP)
        return rj_fold(data_sum) == 0xFFFF;
    __builtin_memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = proto;
    rj_put16(pseudo + 10, len);
    seed = rj_fold(rj_sum_mem(pseudo, 12, 0));
    if (rj_fold((__u64)data_sum + seed) == 0xFFFF)
        return 1;
    if (bpf_skb_load_bytes(skb, offset + (proto == RJ_TCP ? 16 : 6), check, 2))
        return 0;
    __builtin_memcpy(&field, check, 2);
    return field == seed;
}

/* The ICMP code for an ipt_reject_with value, 0xFF for none (no table: no .rodata). */
static __always_inline __u32 rj_icmp_code(__u32 with)
{
    if (with <= 3)
        return with; /* net, host, proto, port unreachable */
    if (with == 5)
        return 9; /* net prohibited */
    if (with == 6)
        return 10; /* host prohibited */
    if (with == 8)
        return 13; /* administratively prohibited */
    return 0xFF;
}

/* ICMP types icmp_send never answers: the errors, and any type past NR_ICMP_TYPES (18). */
static __always_inline int rj_icmp_error(__u32 type)
{
    return type > 18 || (type >= 1 && type <= 7) || (type >= 9 && type <= 12);
}

/* Send the answer that replaced the packet: back out of its device, or (hook: it was leaving)
 * into our own stack through the device's ingress, marked in tc_index (RJ_OWN_ANSWER, given by
 * the includer) so that the ingress program lets it by unjudged, as netfilter's answer reaches
 * the local socket over lo, a device the rule sets we see let everything through. An answer
 * out of the device is marked `routed` (RJ_ROUTED_ANSWER, or RJ_BARE_ANSWER for the answer to
 * a packet of no connection): the egress program judges it with OUTPUT, as the kernel's passes
 * OUTPUT (ip_local_out). */
static __always_inline int rj_send(struct __sk_buff *skb, __u32 hook, __u32 routed)
{
    if (hook == RJ_HOOK_EGRESS) {
        skb->tc_index = RJ_OWN_ANSWER;
        return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
    }
    /* A bridged packet's answer goes back by the port it came in on, as br_netfilter's
     * nf_send_reset sends it (physindev) and the bridge sends an ICMP error to its sender.
     * Both fields are read whatever the hook, each fixed in a register (the empty asm) so that
     * clang does not fold the choice into the load: the verifier refuses a load from a chosen
     * context offset. */
    __u32 device = skb->ifindex, port = skb->ingress_ifindex;

    asm volatile("" : "+r"(device));
    asm volatile("" : "+r"(port));
    if (hook != RJ_HOOK_BRIDGED)
        skb->tc_index = routed;
    return bpf_redirect(hook == RJ_HOOK_BRIDGED ? port : device, 0);
}

/* ip_forward's ip_decrease_ttl, which came before FORWARD: the datagram an ICMP error about a
 * forwarded packet quotes has its TTL one less, and its header checksum with it. */
static __always_inline int rj_decrease_ttl(struct __sk_buff *skb, const __u8 *ip)
{
    __u8 was[2] = {ip[8], ip[9]}, now[2] = {(__u8)(ip[8] - 1), ip[9]};
    __u16 from, to;

    __builtin_memcpy(&from, was, 2);
    __builtin_memcpy(&to, now, 2);
    if (bpf_l3_csum_replace(skb, RJ_ETH_HLEN + 10, from, to, 2))
        return -1;
    return bpf_skb_store_bytes(skb, RJ_ETH_HLEN + 8, now, 1, 0);
}

/* The limits of icmp.c's __icmp_send (Linux 6.12 and later), with the namespace's sysctls as
 * apply read them. `clock` is a fixed time in jiffies (a test run's) or 0 for bpf_jiffies64();
 * `draw` is 0 to take the global credits each error costs at random (0, 1 or 2, as
 * icmp_global_consume draws them) or 1 + a fixed count (a test run's, so that a reference can
 * follow). `primed` is 0 until the global bucket first refills: the kernel's stamp is then 0,
 * long before any jiffies it meets. */
struct rj_rate {
    __u64 clock;
    __u32 ratelimit; /* icmp_ratelimit, in jiffies */
    __u32 ratemask;  /* icmp_ratemask */
    __u32 msgs_per_sec, msgs_burst, hz, draw;
    __s32 credit; /* the global bucket: net->ipv4.icmp_global_credit and _stamp */
    __u32 stamp, primed, pad;
};

struct rj_peer { /* inet_peer's rate_tokens and rate_last */
    __u64 tokens, last;
};

extern int reject_rate, reject_peers;

#define RJ_DEST_UNREACH 3
#define RJ_XRLIM_BURST_FACTOR 6

/* Whether an ICMP destination unreachable to `peer` may be sent now: icmpv4_global_allow, then
 * icmpv4_xrlim_allow (the per-peer bucket, skipped when `local`: the answer's route is then
 * loopback, as an OUTPUT REJECT's to our own socket is), then icmp_global_consume. */
static __always_inline int rj_rate_allows(__u32 peer, __u32 local)
{
    __u32 zero = 0, hz, delta, incr, credits;
    struct rj_rate *rate = bpf_map_lookup_elem(&reject_rate, &zero);
    struct rj_peer *known, fresh;
    __u64 now, token, cap;

    if (!rate || !rate->hz || !(rate->ratemask & (1 << RJ_DEST_UNREACH)))
        return 1; /* not configured; or icmpv4_mask_allow: type 3 is not limited */
    hz = rate->hz;
    now = rate->clock ? rate->clock : bpf_jiffies64();
    if (rate->credit <= 0) { /* icmp_global_allow */
        delta = rate->primed ? (__u32)now - rate->stamp : hz;
        if (delta > hz)
            delta = hz;
        if (delta < hz / 50)
            return 0;
        incr = (__u64)rate->msgs_per_sec * delta / hz;
        if (!incr)
            return 0;
        rate->stamp = (__u32)now;
        rate->primed = 1;
        rate->credit = rate->credit + (__s32)incr < (__s32)rate->msgs_burst
                           ? rate->credit + (__s32)incr
                           : (__s32)rate->msgs_burst;
    }
    if (!local) { /* inet_getpeer_v4, inet_peer_xrlim_allow */
        known = bpf_map_lookup_elem(&reject_peers, &peer);
        if (!known) {
            fresh.tokens = 0;
            fresh.last = now - 60 * (__u64)hz; /* a new peer's bucket starts full */
            bpf_map_update_elem(&reject_peers, &peer, &fresh, BPF_NOEXIST);
            known = bpf_map_lookup_elem(&reject_peers, &peer);
        }
        if (known) { /* none to be had: the kernel's !peer, allowed */
            token = known->tokens;
            if (now != known->last) {
                token += now - known->last;
                known->last = now;
                cap = (__u64)RJ_XRLIM_BURST_FACTOR * rate->ratelimit;
                if (token > cap)
                    token = cap;
            }
            if (token < rate->ratelimit) {
                known->tokens = token;
                return 0;
            }
            known->tokens = token - rate->ratelimit;
        }
    }
    credits = rate->draw ? rate->draw - 1 : bpf_get_prandom_u32() % 3;
    if (credits)
        __sync_fetch_and_sub(&rate->credit, (__s32)credits);
    return 1;
}

/* nf_send_reset's RST, in place of the packet: a 54-byte frame. */
static __always_inline int rj_reset(struct __sk_buff *skb, const __u8 *eth, const __u8 *ip,
                                    const __u8 *tcp, __u32 tot_len, __u32 ihl, __u32 hook,
                                    __u32 routed)
{
    __u8 frame[56] __attribute__((aligned(8))) = {};
    __u8 pseudo[12];
    __u8 *iph = frame + RJ_ETH_HLEN, *th = frame + RJ_ETH_HLEN + 20;
    __u32 flags = tcp[13], sum;
    __u16 check;

    __builtin_memcpy(frame, eth + 6, 6);
    __builtin_memcpy(frame + 6, eth, 6);
    frame[12] = 0x08;
    frame[13] = 0x00;
    iph[0] = 0x45;
    rj_put16(iph + 2, 40);
    iph[6] = 0x40; /* DF */
    iph[8] = 64;
    iph[9] = RJ_TCP;
    __builtin_memcpy(iph + 12, ip + 16, 4);
    __builtin_memcpy(iph + 16, ip + 12, 4);
    __builtin_memcpy(th, tcp + 2, 2);
    __builtin_memcpy(th + 2, tcp, 2);
    if (flags & RJ_TH_ACK) {
        __builtin_memcpy(th + 4, tcp + 8, 4); /* seq = its ack_seq */
        th[13] = RJ_TH_RST;
    } else {
        __u32 ack = rj_be32(tcp + 4) + !!(flags & RJ_TH_SYN) + !!(flags & RJ_TH_FIN) + tot_len -
                    ihl - (tcp[12] >> 4) * 4;

        rj_put32(th + 8, ack);
        th[13] = RJ_TH_RST | RJ_TH_ACK;
    }
    th[12] = 0x50;
    check = ~rj_fold(rj_sum_mem(iph, 20, 0));
    __builtin_memcpy(iph + 10, &check, 2);

    if (bpf_skb_change_tail(skb, RJ_ETH_HLEN + 40, 0))
        return RJ_TC_ACT_SHOT;
    if (bpf_skb_store_bytes(skb, 0, frame, RJ_ETH_HLEN + 40, BPF_F_RECOMPUTE_CSUM))
        return RJ_TC_ACT_SHOT;
    /* The TCP checksum in two steps, so that a CHECKSUM_PARTIAL skb (whose device or peer
     * completes the sum) gets only the pseudo header's part and any other the whole sum. */
    __builtin_memcpy(pseudo, iph + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = RJ_TCP;
    rj_put16(pseudo + 10, 20);
    sum = rj_sum_mem(pseudo, 12, 0);
    if (bpf_l4_csum_replace(skb, RJ_ETH_HLEN + 20 + 16, 0, sum, BPF_F_PSEUDO_HDR))
        return RJ_TC_ACT_SHOT;
    sum = rj_sum_mem(th, 20, 0);
    if (bpf_l4_csum_replace(skb, RJ_ETH_HLEN + 20 + 16, 0, sum, 0))
        return RJ_TC_ACT_SHOT;
    return rj_send(skb, hook, routed);
}

/* __icmp_send's destination unreachable, in place of the packet: new IP and ICMP headers
 * before the packet's own IP datagram, cut so that the answer is at most 576 bytes. */
static __always_inline int rj_unreach(struct __sk_buff *skb, const __u8 *eth, const __u8 *ip,
                                      __u32 tot_len, __u32 code, __u32 hook, __u32 source,
                                      __u32 forwarded, __u32 routed)
{
    __u8 frame[48] __attribute__((aligned(8))) = {};
    __u8 *iph = frame + RJ_ETH_HLEN, *icmp = frame + RJ_ETH_HLEN + 20;
    __u32 quote = tot_len < RJ_QUOTE_MAX ? tot_len : RJ_QUOTE_MAX, id, sum;
    __u16 check;

    __builtin_memcpy(frame, eth + 6, 6);
    __builtin_memcpy(frame + 6, eth, 6);
    frame[12] = 0x08;
    frame[13] = 0x00;
    iph[0] = 0x45;
    iph[1] = (ip[1] & 0x1E) | 0xC0; /* the TOS bits kept, precedence internetwork control */
    rj_put16(iph + 2, 20 + 8 + quote);
    id = bpf_get_prandom_u32() & 0xFFFF;
    rj_put16(iph + 4, id ? id : 1);
    iph[8] = 64;
    iph[9] = RJ_ICMP;
    rj_put32(iph + 12, source);
    __builtin_memcpy(iph + 16, ip + 12, 4);
    check = ~rj_fold(rj_sum_mem(iph, 20, 0));
    __builtin_memcpy(iph + 10, &check, 2);
    icmp[0] = 3; /* destination unreachable */
    icmp[1] = code;

    if (forwarded && rj_decrease_ttl(skb, ip))
        return RJ_TC_ACT_SHOT;
    /* The datagram alone (no Ethernet padding), cut to the quote; then room for 28 bytes. */
    if (bpf_skb_change_tail(skb, RJ_ETH_HLEN + quote, 0))
        return RJ_TC_ACT_SHOT;
    if (bpf_skb_adjust_room(skb, 28, BPF_ADJ_ROOM_MAC, 0))
        return RJ_TC_ACT_SHOT;
    sum = rj_sum_mem(icmp, 8, 0);
    if (rj_sum_packet(skb, RJ_ETH_HLEN + 28, quote, &sum))
        return RJ_TC_ACT_SHOT;
    check = ~rj_fold(sum);
    __builtin_memcpy(icmp + 2, &check, 2);
    if (bpf_skb_store_bytes(skb, 0, frame, RJ_ETH_HLEN + 28, BPF_F_RECOMPUTE_CSUM))
        return RJ_TC_ACT_SHOT;
    return rj_send(skb, hook, routed);
}

RJ_GLOBAL int reject_reply(struct __sk_buff *skb, __u32 with, __u32 hook, __u32 icmp_source,
                           __u32 pkt_type)
{
    __u8 eth[RJ_ETH_HLEN], ip[20], tcp[20] = {};
    __u32 tot_len, ihl, proto, daddr, code = 0, verify = 1, data_sum = 0;
    __u32 forwarded = pkt_type & RJ_FORWARDED, route = pkt_type & RJ_BROADCAST_ROUTE;
    __u32 routed = pkt_type & RJ_NO_CONNECTION ? RJ_BARE_ANSWER : RJ_ROUTED_ANSWER;

    pkt_type &= 0xFF;

    if (bpf_skb_load_bytes(skb, 0, eth, RJ_ETH_HLEN) ||
        bpf_skb_load_bytes(skb, RJ_ETH_HLEN, ip, 20))
        return RJ_TC_ACT_SHOT;
    if (ip[0] >> 4 != 4 || (ip[0] & 0x0F) < 5)
        return RJ_TC_ACT_SHOT;
    ihl = (ip[0] & 0x0F) * 4;
    tot_len = rj_be16(ip + 2);
    if (tot_len < ihl || RJ_ETH_HLEN + tot_len > skb->len)
        return RJ_TC_ACT_SHOT;
    if (rj_be16(ip + 6) & 0x1FFF)
        return RJ_TC_ACT_SHOT; /* not the first fragment */
    proto = ip[9];
    daddr = rj_be32(ip + 16);
    if (daddr == 0xFFFFFFFF || daddr >> 28 == 0xE || route)
        return RJ_TC_ACT_SHOT; /* a broadcast or multicast route */
    /* The transport's sum, whatever the protocol and whether it is checked: taken before the
     * paths part, the loop that sums is verified once where this function is inlined. */
    if (rj_sum_packet(skb, RJ_ETH_HLEN + ihl, tot_len - ihl, &data_sum))
        return RJ_TC_ACT_SHOT;
    if (with == RJ_TCP_RESET) {
        if (proto != RJ_TCP || tot_len < ihl + 20 ||
            bpf_skb_load_bytes(skb, RJ_ETH_HLEN + ihl, tcp, 20) || tcp[13] & RJ_TH_RST)
            return RJ_TC_ACT_SHOT;
    } else {
        code = rj_icmp_code(with);
        if (code == 0xFF || pkt_type != 0) /* PACKET_HOST only */
            return RJ_TC_ACT_SHOT;
        if (proto == 47 || proto == 50 || proto == 51 || proto == 132 || proto == 136 ||
            proto == 33)
            verify = 0; /* GRE, ESP, AH, SCTP, UDPLITE, DCCP: nf_reject_verify_csum */
        if (proto == RJ_UDP && tot_len >= ihl + 8) {
            __u8 check[2];

            if (bpf_skb_load_bytes(skb, RJ_ETH_HLEN + ihl + 6, check, 2))
                return RJ_TC_ACT_SHOT;
            if (!check[0] && !check[1])
                verify = 0; /* no UDP checksum */
        }
        if (proto == RJ_ICMP) {
            __u8 type;

            if (tot_len == ihl || bpf_skb_load_bytes(skb, RJ_ETH_HLEN + ihl, &type, 1) ||
                rj_icmp_error(type))
                return RJ_TC_ACT_SHOT; /* never an error about an error */
        }
    }
    if (verify && !rj_checksum_ok(skb, ip, proto, RJ_ETH_HLEN + ihl, tot_len - ihl, data_sum))
        return RJ_TC_ACT_SHOT;
    if (eth[0] & 1 && hook != RJ_HOOK_EGRESS)
        return RJ_TC_ACT_SHOT; /* a group MAC still in the frame: the caller puts its own */
    if (with == RJ_TCP_RESET)
        return rj_reset(skb, eth, ip, tcp, tot_len, ihl, hook, routed);
    if (!rj_rate_allows(rj_be32(ip + 12), hook == RJ_HOOK_EGRESS))
        return RJ_TC_ACT_SHOT;
    return rj_unreach(skb, eth, ip, tot_len, code, hook, icmp_source, forwarded, routed);
}
