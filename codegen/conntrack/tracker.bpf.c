/* Connection tracking for the TC programs: nf_conntrack for IPv4 as the reference tracker
 * (codegen/rules/tracking) follows it, over one table every program of a namespace shares.
 *
 * Two functions, called by the generated programs of both backends:
 * - ct_classify(skb, res) is nf_conntrack_in: it finds the packet's connection, moves a known
 *   entry's state at once (TCP state, SEEN_REPLY, ASSURED, timeout), as the kernel does before
 *   any chain runs, and writes what the chains' conntrack matches read into *res. A packet with
 *   no entry gets a new one in the per-CPU slot `ct_pending`, not yet in the table.
 * - ct_confirm(res) is nf_confirm: called when the chains finally accept the packet, it puts
 *   the pending entry in the table. A dropped first packet leaves nothing behind.
 * - ct_answer(skb, res) stands for ct_classify where OUTPUT judges REJECT's answer to a packet
 *   that came in: nf_ct_attach gave it that packet's connection.
 *
 * The includer provides the types (__u8 ... __u64), the helper declarations, the maps
 * `ct_table` (LRU hash: struct ct_key -> struct ct_entry), `ct_pending` (per-CPU array of one
 * struct ct_pending) and `ct_clock` (array of two __u64: a fixed time in ns, or 0 for the
 * monotonic clock, and the kernel's jiffies at that fixed time), declared by the macro
 * CT_DECLARE_MAPS once the structs are, used through CT_LOOKUP, CT_INSERT (BPF_NOEXIST) and
 * CT_DELETE; and the timeouts (CT_TIMEOUT_*, seconds), CT_TCP_MAX_RETRANS_COUNT, CT_TCP_LOOSE,
 * CT_TCP_BE_LIBERAL and the kernel's HZ (CT_HZ) as defines. Multi-byte values are in host order.
 *
 * TCP follows nf_conntrack_proto_tcp.c, window tracking included: with CT_TCP_BE_LIBERAL 0 (the
 * kernel's default nf_conntrack_tcp_be_liberal) a segment out of window is INVALID or ignored
 * (it passes with its entry unmoved) as tcp_in_window decides; with 1 it is accepted.
 */

/* The functions the verifier checks once each, whatever calls them (BTF-described global
 * functions: their pointer arguments may be NULL for all it knows, so each checks). Inlining
 * them instead multiplies the TCP paths past what the verifier explores. */
#ifndef CT_GLOBAL
#define CT_GLOBAL __attribute__((noinline))
#endif

#define CT_ETH_HLEN 14
#define CT_NS 1000000000ULL

#define IPS_EXPECTED 0x1
#define IPS_SEEN_REPLY 0x2
#define IPS_ASSURED 0x4
#define IPS_CONFIRMED 0x8

/* The state bits xt_conntrack tests (codegen/rules/extensions/ctinfo.py). */
#define CT_STATE_INVALID 0x1
#define CT_STATE_ESTABLISHED 0x2
#define CT_STATE_RELATED 0x4
#define CT_STATE_NEW 0x8

#define CT_ICMP 1
#define CT_TCP 6
#define CT_UDP 17
#define CT_UDP_STREAM_AFTER 2 /* seconds of replied traffic before UDP is a stream */

/* TCP conntrack states, tcp_bit_set rows, header flags and ip_ct_tcp flags. */
enum { sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2, sIV, sIG };
enum { SYN_SET, SYNACK_SET, FIN_SET, ACK_SET, RST_SET, NONE_SET };
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10
#define TH_URG 0x20
#define TH_ECE 0x40
#define TH_CWR 0x80
#define F_WINDOW_SCALE 0x01
#define F_SACK_PERM 0x02
#define F_CLOSE_INIT 0x04
#define F_BE_LIBERAL 0x08
#define F_DATA_UNACKNOWLEDGED 0x10
#define F_MAXACK_SET 0x20
#define F_EXP_CHALLENGE_ACK 0x40
#define F_SIMULTANEOUS_OPEN 0x80
#define MAX_WSCALE 14
#define MAXACKWINCONST 66000
#define CT_OPTION_WORDS 5 /* TCP options: at most 40 bytes */

struct ct_tuple {
    __u32 src, dst;
    __u16 sport, dport; /* ICMP: the id, and type << 8 | code */
};

struct ct_key {
    struct ct_tuple tuple; /* the lesser of the original tuple and its inverse */
    __u32 proto;
};

struct ct_side { /* ip_ct_tcp_state */
    __u32 td_end, td_maxend, td_maxwin, td_maxack;
    __u8 td_scale, flags, pad[2];
};

struct ct_entry {
    struct ct_tuple orig, reply;
    __u64 deadline;         /* ns on the tracker's clock */
    __u64 udp_stream_after; /* ns */
    __u32 status;           /* IPS_* */
    __u8 proto, tcp_state, last_index, last_dir;
    __u32 last_seq, last_ack, last_end, last_win;
    __u8 last_wscale, last_flags, retrans, pad;
    __u32 mark; /* ct->mark: -j CONNMARK writes it, -m connmark reads it */
    struct ct_side seen[2];
};

struct ct_segment { /* a TCP header as conntrack reads it, options digested */
    __u32 seq, ack, end, window;
    __u8 flags, index, optlen;
    __u8 wscale;       /* the last window scale option's shift (at most 14), 0 if none */
    __u8 option_flags; /* F_WINDOW_SCALE and F_SACK_PERM, as the options have them */
    __u8 edges;        /* right edges of the first SACK option's blocks, at most 4 */
    __u8 sack_at, sack_size; /* where that option is in the options, and its length */
    __u32 position;          /* read_options' cursor */
    __u32 edge[4];
};

struct ct_pending {
    struct ct_key key;
    struct ct_entry entry;
    struct ct_segment segment; /* scratch: the segment being tracked, off the small stack */
};

/* What the chains read (codegen/conntrack/__init__.py describes the same layout). */
struct ct_result {
    __u16 state; /* CT_STATE_* */
    __u8 dir, l4proto;
    __u32 status;
    __u32 expires; /* whole seconds left, as xt_conntrack reads them */
    struct ct_tuple orig, reply;
    __u32 pending; /* 1: ct_confirm has an entry to put in the table */
    __u32 mark;    /* the connection's mark (ct_set_mark keeps it equal to the entry's) */
};

CT_DECLARE_MAPS


static __always_inline int before(__u32 a, __u32 b) { return (__s32)(a - b) < 0; }
static __always_inline int after(__u32 a, __u32 b) { return before(b, a); }

static __always_inline __u32 be32(const __u8 *p)
{
    return (__u32)p[0] << 24 | (__u32)p[1] << 16 | (__u32)p[2] << 8 | p[3];
}

static __always_inline __u16 be16(const __u8 *p) { return (__u16)(p[0] << 8 | p[1]); }

/* tcp_conntracks[dir][index][old]: each row packs ten 4-bit states, old state NONE first. */
#define ROW(a, b, c, d, e, f, g, h, i, j)                                                         \
    ((__u64)(a) | (__u64)(b) << 4 | (__u64)(c) << 8 | (__u64)(d) << 12 | (__u64)(e) << 16 |        \
     (__u64)(f) << 20 | (__u64)(g) << 24 | (__u64)(h) << 28 | (__u64)(i) << 32 | (__u64)(j) << 36)

static __always_inline __u32 transition(__u32 dir, __u32 index, __u32 old)
{
    __u64 row;

    if (dir == 0) {
        if (index == SYN_SET)
            row = ROW(sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2);
        else if (index == SYNACK_SET)
            row = ROW(sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR);
        else if (index == FIN_SET)
            row = ROW(sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV);
        else if (index == ACK_SET)
            row = ROW(sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV);
        else if (index == RST_SET)
            row = ROW(sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL);
        else
            return sIV;
    } else {
        if (index == SYN_SET)
            row = ROW(sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2);
        else if (index == SYNACK_SET)
            row = ROW(sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR);
        else if (index == FIN_SET)
            row = ROW(sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV);
        else if (index == ACK_SET)
            row = ROW(sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG);
        else if (index == RST_SET)
            row = ROW(sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL);
        else
            return sIV;
    }
    return (row >> ((old & 0xF) * 4)) & 0xF;
}

static __always_inline __u64 tcp_timeout(__u32 state)
{
    switch (state) {
    case sNO:
    case sSS: return CT_TIMEOUT_TCP_SYN_SENT;
    case sSR: return CT_TIMEOUT_TCP_SYN_RECV;
    case sES: return CT_TIMEOUT_TCP_ESTABLISHED;
    case sFW: return CT_TIMEOUT_TCP_FIN_WAIT;
    case sCW: return CT_TIMEOUT_TCP_CLOSE_WAIT;
    case sLA: return CT_TIMEOUT_TCP_LAST_ACK;
    case sTW: return CT_TIMEOUT_TCP_TIME_WAIT;
    case sCL: return CT_TIMEOUT_TCP_CLOSE;
    default: return CT_TIMEOUT_TCP_SYN_SENT2;
    }
}

/* `size` bytes of the packet at `offset` into `to`: straight from the linear data where they
 * are there (most packets: a helper call costs more than the copy), else through the helper.
 * CT_LOAD_BY_HELPER keeps to the helper: where the tracker is inlined (bcc), the two ways of
 * every load would double the verifier's paths after it (650,000 processed instead of 240,000). */
static __always_inline int load(struct __sk_buff *skb, __u32 offset, void *to, __u32 size)
{
#ifndef CT_LOAD_BY_HELPER
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;

    if (offset <= 256 && data + offset + size <= end) {
        __builtin_memcpy(to, data + offset, size);
        return 0;
    }
#endif
    return bpf_skb_load_bytes(skb, offset, to, size);
}

/* One byte of the packet, 0 if it cannot be read. */
static __always_inline __u32 byte_at(struct __sk_buff *skb, __u32 offset)
{
    __u8 value = 0;

    load(skb, offset, &value, 1);
    return value;
}

#define OPTIONS_DONE 0xFFFF

/* One option at `pos` of the options at `start`, as tcp_options and tcp_sack read them: the
 * next option's position, or OPTIONS_DONE at the end of the options or a malformed one. Window
 * scale and SACK permitted may come anywhere; the SACK blocks are the first well-formed SACK
 * option's. A function of its own so that the verifier sees each step's result as any number:
 * with the loop inline, every distinct position would be a path of its own. */
CT_GLOBAL int ct_tcp_option(struct __sk_buff *skb, __u32 start, __u32 pos, struct ct_segment *seg)
{
    __u32 kind, size;

    if (!skb || !seg || pos >= seg->optlen)
        return OPTIONS_DONE;
    kind = byte_at(skb, start + pos);
    if (kind == 0)
        return OPTIONS_DONE;
    if (kind == 1)
        return pos + 1;
    if (seg->optlen - pos < 2)
        return OPTIONS_DONE;
    size = byte_at(skb, start + pos + 1);
    if (size < 2 || size > seg->optlen - pos)
        return OPTIONS_DONE;
    if (kind == 4 && size == 2) {
        seg->option_flags |= F_SACK_PERM;
    } else if (kind == 3 && size == 3) {
        __u32 scale = byte_at(skb, start + pos + 2);

        seg->wscale = scale > MAX_WSCALE ? MAX_WSCALE : scale;
        seg->option_flags |= F_WINDOW_SCALE;
    } else if (kind == 5 && !seg->sack_size && size >= 10 && (size - 2) % 8 == 0) {
        seg->sack_at = pos;
        seg->sack_size = size;
    }
    return pos + size;
}

static __always_inline void read_options(struct __sk_buff *skb, __u32 start,
                                         struct ct_segment *seg)
{
    /* The position lives in the segment (map memory, whose contents the verifier does not
     * track), so that every pass of the loop starts from the same state for it. */
    volatile struct ct_segment *cursor = seg;

    seg->wscale = seg->option_flags = seg->edges = seg->sack_at = seg->sack_size = 0;
    cursor->position = 0;
    for (int i = 0; i < 40; i++) {
        __u32 next = ct_tcp_option(skb, start, cursor->position, seg);

        if (next == OPTIONS_DONE)
            break;
        cursor->position = next;
    }
    for (int b = 0; b < 4; b++) {
        __u8 edge[4];

        if (2 + 8 * b >= seg->sack_size)
            break;
        if (load(skb, start + seg->sack_at + 2 + 8 * b + 4, edge, 4))
            break;
        seg->edge[b] = be32(edge);
        seg->edges = b + 1;
    }
}

/* tcp_error's checks and the fields conntrack reads; -1 for a segment that is INVALID. */
CT_GLOBAL int ct_tcp_segment(struct __sk_buff *skb, __u32 transport, __u32 tot_len,
                             struct ct_segment *seg)
{
    /* The flag combinations tcp_valid_flags lets through, PSH, ECE and CWR taken off. */
    const __u64 valid = 1ULL << TH_SYN | 1ULL << (TH_SYN | TH_URG) | 1ULL << (TH_SYN | TH_ACK) |
                        1ULL << TH_RST | 1ULL << (TH_RST | TH_ACK) | 1ULL << (TH_FIN | TH_ACK) |
                        1ULL << (TH_FIN | TH_ACK | TH_URG) | 1ULL << TH_ACK |
                        1ULL << (TH_ACK | TH_URG);
    __u8 h[20];
    __u32 doff, flags;

    if (!skb || !seg || transport + 20 > tot_len)
        return -1;
    if (load(skb, CT_ETH_HLEN + transport, h, 20))
        return -1;
    doff = (h[12] >> 4) * 4;
    if (doff < 20 || tot_len - transport < doff)
        return -1;
    flags = h[13];
    if (!((valid >> (flags & ~(TH_ECE | TH_CWR | TH_PSH) & 0x3F)) & 1))
        return -1;
    seg->seq = be32(h + 4);
    seg->ack = be32(h + 8);
    seg->window = be16(h + 14);
    seg->flags = flags;
    seg->end = seg->seq + (tot_len - transport - doff) + !!(flags & TH_SYN) + !!(flags & TH_FIN);
    if (flags & TH_RST)
        seg->index = RST_SET;
    else if (flags & TH_SYN)
        seg->index = flags & TH_ACK ? SYNACK_SET : SYN_SET;
    else if (flags & TH_FIN)
        seg->index = FIN_SET;
    else
        seg->index = flags & TH_ACK ? ACK_SET : NONE_SET;
    seg->optlen = doff - 20;
    read_options(skb, CT_ETH_HLEN + transport + 20, seg);
    return 0;
}

/* tcp_options for one side: its window scale and SACK permitted. */
static __always_inline void take_options(const struct ct_segment *seg, struct ct_side *side)
{
    side->td_scale = seg->wscale;
    side->flags = (side->flags & F_BE_LIBERAL) | seg->option_flags;
}

/* tcp_sack: the highest right edge of the SACK blocks, if after the ack. */
static __always_inline __u32 sack_of(const struct ct_segment *seg, __u32 sack)
{
    for (int b = 0; b < 4; b++) {
        if (b >= seg->edges)
            break;
        if (after(seg->edge[b], sack))
            sack = seg->edge[b];
    }
    return sack;
}

static __always_inline struct ct_side *side_of(struct ct_entry *e, __u32 dir)
{
    return dir ? &e->seen[1] : &e->seen[0];
}

static __always_inline void init_sender(struct ct_side *sender, struct ct_side *receiver,
                                        const struct ct_segment *seg, __u32 dir)
{
    sender->td_end = sender->td_maxend = seg->end;
    sender->td_maxwin = seg->window ? seg->window : 1;
    take_options(seg, sender);
    if (dir == 1 && !(sender->flags & F_WINDOW_SCALE && receiver->flags & F_WINDOW_SCALE))
        sender->td_scale = receiver->td_scale = 0;
}

/* What tcp_in_window decides: W_ACCEPT, W_IGNORE (the packet passes with its entry, which does
 * not move) or W_INVALID (it carries none). */
enum { W_ACCEPT, W_IGNORE, W_INVALID };

/* tcp_in_window: W_ACCEPT and the window data moved for a segment in window; for one out of
 * window, W_IGNORE or W_INVALID as the kernel would have it where it is not liberal (the
 * caller's liberal_window). */
CT_GLOBAL int ct_tcp_window(struct ct_entry *e, __u32 dir, const struct ct_segment *seg)
{
    struct ct_side *sender, *receiver;
    __u32 seq, ack, window, end, sack, swin, maxackwindow;

    if (!e || !seg)
        return W_ACCEPT;
    sender = side_of(e, dir);
    receiver = side_of(e, !dir);
    seq = seg->seq;
    ack = seg->ack;
    window = seg->window;
    end = seg->end;
    sack = receiver->flags & F_SACK_PERM ? sack_of(seg, ack) : ack;
    if (sender->td_maxwin == 0) {
        if (seg->flags & TH_SYN) {
            init_sender(sender, receiver, seg, dir);
            if (!(seg->flags & TH_ACK))
                return W_ACCEPT;
        } else {
            __u32 scaled = window << (sender->td_scale & 0x1F);

            sender->td_end = end;
            sender->td_maxwin = scaled ? scaled : 1;
            sender->td_maxend = end + sender->td_maxwin;
            if (receiver->td_maxwin == 0)
                receiver->td_end = receiver->td_maxend = sack;
            else if (sack == receiver->td_end + 1)
                receiver->td_end += 1;
        }
    } else if (seg->flags & TH_SYN && after(end, sender->td_end) &&
               (e->tcp_state == sSS || e->tcp_state == sSR)) {
        init_sender(sender, receiver, seg, dir);
        if (dir == 1 && !(seg->flags & TH_ACK))
            return W_ACCEPT;
    }
    if (!(seg->flags & TH_ACK) || ((seg->flags & (TH_ACK | TH_RST)) == (TH_ACK | TH_RST) && ack == 0))
        ack = sack = receiver->td_end;
    if (seg->flags & TH_RST && seq == 0 && e->tcp_state == sSS)
        seq = end = sender->td_end;
    maxackwindow = sender->td_maxwin > MAXACKWINCONST ? sender->td_maxwin : MAXACKWINCONST;
    if (!before(seq, sender->td_maxend + 1)) {
        __u32 overshot = end - sender->td_maxend + 1;

        if (receiver->td_maxwin && after(end, sender->td_end - receiver->td_maxwin - 1) &&
            after(sack, receiver->td_end - maxackwindow - 1) && overshot <= receiver->td_maxwin &&
            before(sack, receiver->td_end + 1)) {
            sender->td_end = end;
            sender->flags |= F_DATA_UNACKNOWLEDGED;
            return W_IGNORE; /* more bytes than the window */
        }
        return W_INVALID; /* SEQ over the upper bound */
    }
    if (!before(sack, receiver->td_end + 1))
        return W_INVALID; /* ACK over the upper bound */
    if (receiver->td_maxwin && !after(end, sender->td_end - receiver->td_maxwin - 1))
        return W_IGNORE; /* SEQ under the lower bound */
    if (!after(sack, receiver->td_end - maxackwindow - 1))
        return W_IGNORE; /* ACK under the lower bound */
    if (!(seg->flags & TH_SYN))
        window <<= sender->td_scale & 0x1F;
    swin = window + (sack - ack);
    if (swin > sender->td_maxwin)
        sender->td_maxwin = swin;
    if (after(end, sender->td_end)) {
        sender->td_end = end;
        sender->flags |= F_DATA_UNACKNOWLEDGED;
    }
    if (seg->flags & TH_ACK) {
        if (!(sender->flags & F_MAXACK_SET)) {
            sender->td_maxack = ack;
            sender->flags |= F_MAXACK_SET;
        } else if (after(ack, sender->td_maxack)) {
            sender->td_maxack = ack;
        }
    }
    if (receiver->td_maxwin && after(end, sender->td_maxend))
        receiver->td_maxwin += end - sender->td_maxend;
    if (after(sack + window, receiver->td_maxend - 1))
        receiver->td_maxend = sack + window + (window == 0);
    if (ack == receiver->td_end)
        receiver->flags &= ~F_DATA_UNACKNOWLEDGED;
    if (seg->index == ACK_SET) {
        if (e->last_dir == dir && e->last_seq == seq && e->last_ack == ack && e->last_end == end &&
            e->last_win == seg->window) {
            e->retrans += 1;
        } else {
            e->last_dir = dir;
            e->last_seq = seq;
            e->last_ack = ack;
            e->last_end = end;
            e->last_win = seg->window;
            e->retrans = 0;
        }
    }
    return W_ACCEPT;
}

/* tcp_new: a new entry's TCP state for a segment without one; -1 if it may not create one. */
static __always_inline int tcp_new(struct ct_entry *e, const struct ct_segment *seg)
{
    __u32 state = transition(0, seg->index, sNO);

    if (state == sIV || (state != sSS && !CT_TCP_LOOSE))
        return -1;
    e->seen[0].td_end = seg->end;
    e->seen[0].td_maxwin = seg->window ? seg->window : 1;
    if (state == sSS) {
        e->seen[0].td_maxend = e->seen[0].td_end;
        take_options(seg, &e->seen[0]);
    } else {
        e->seen[0].td_maxend = e->seen[0].td_end + e->seen[0].td_maxwin;
        e->seen[0].flags = e->seen[1].flags = F_SACK_PERM | F_BE_LIBERAL;
    }
    e->last_index = NONE_SET;
    return 0;
}

/* What tcp_packet decides (T_WINDOW: INVALID, out of window; ct_tcp makes it T_INVALID). */
enum { T_ACCEPT, T_INVALID, T_REPEAT, T_KILL, T_WINDOW };

/* tcp_packet's RST checks: -1 for an invalid RST, else the new state; *skip: no window check. */
static __always_inline int check_rst(struct ct_entry *e, __u32 dir, const struct ct_segment *seg,
                                     __u32 old, int *skip)
{
    struct ct_side *other = side_of(e, !dir);
    int seen_reply = !!(e->status & IPS_SEEN_REPLY), assured = !!(e->status & IPS_ASSURED);
    int established = old == sES && assured;
    __u32 state = sCL;

    *skip = 0;
    if (old == sFW || old == sCW || old == sLA || old == sTW || old == sCL) {
        *skip = 1;
        return sCL;
    }
    if (other->flags & F_MAXACK_SET && e->last_index != SYN_SET) {
        __u32 seq = seg->seq;

        if (seq == 0 && !established)
            return sCL;
        if (before(seq, other->td_maxack))
            return -1;
        if (!established || seq == other->td_maxack)
            return sCL;
        if (e->last_index == ACK_SET && e->last_dir == dir && seq == e->last_end)
            return sCL;
        state = old;
    }
    if (((seen_reply && e->last_index == SYN_SET) || (!assured && e->last_index == ACK_SET)) &&
        seg->ack == e->last_end) {
        *skip = 1;
        return state;
    }
    if (old == sSS && e->last_index == ACK_SET && e->last_dir == 1 && seg->seq == e->last_ack)
        *skip = 1;
    return state;
}

static __always_inline int tcp_ignore(struct ct_entry *e, __u32 dir, const struct ct_segment *seg,
                                      __u32 old)
{
    __u32 index = seg->index;

    e->last_index = index;
    e->last_dir = dir;
    e->last_seq = seg->seq;
    e->last_end = seg->end;
    e->last_win = seg->window;
    if (index == SYN_SET && dir == 0) {
        struct ct_side seen = {};

        take_options(seg, &seen);
        e->last_flags = e->last_wscale = 0;
        if (seen.flags & F_WINDOW_SCALE) {
            e->last_flags |= F_WINDOW_SCALE;
            e->last_wscale = seen.td_scale;
        }
        e->last_flags |= seen.flags & F_SACK_PERM;
        if (old == sLA)
            e->last_flags |= F_EXP_CHALLENGE_ACK;
    }
    if (old == sSS && index == ACK_SET && dir == 1)
        e->last_ack = seg->ack;
    return T_ACCEPT;
}

/* nf_tcp_log_invalid: a segment out of window is accepted (its bookkeeping skipped) where the
 * namespace is liberal (CT_TCP_BE_LIBERAL) or its sender is (a picked-up connection). */
static __always_inline int liberal_window(const struct ct_entry *e, __u32 dir, int window)
{
    if (CT_TCP_BE_LIBERAL || side_of((struct ct_entry *)e, dir)->flags & F_BE_LIBERAL)
        return W_ACCEPT;
    return window;
}

/* nf_tcp_handle_invalid, for a segment out of window: an assured connection whose FIN or RST
 * answers the other side's (out of sync with conntrack, likely dead) keeps at most the
 * unacknowledged timeout, when it had 120 s or more; any other FIN or RST is remembered. */
static __always_inline void tcp_invalid(struct ct_entry *e, __u32 dir, __u32 index, __u64 now)
{
    __u64 expires = e->deadline > now ? e->deadline - now : 0;

    if (!(e->status & IPS_ASSURED) || (index != RST_SET && index != FIN_SET))
        return;
    if (e->last_dir != dir && (e->last_index == FIN_SET || e->last_index == RST_SET)) {
        if (expires >= 120 * CT_NS && expires > CT_TIMEOUT_TCP_UNACKNOWLEDGED * CT_NS)
            e->deadline = now + CT_TIMEOUT_TCP_UNACKNOWLEDGED * CT_NS;
    } else {
        e->last_index = index;
        e->last_dir = dir;
    }
}

/* tcp_packet: moves the entry; *timeout gets the refresh in seconds (0: none). */
static __always_inline int tcp_packet(struct ct_entry *e, __u32 dir, const struct ct_segment *seg,
                                      __u64 *timeout, int *assure)
{
    __u32 old = e->tcp_state, index = seg->index, state = transition(dir, index, old);
    int seen_reply = !!(e->status & IPS_SEEN_REPLY), assured = !!(e->status & IPS_ASSURED);
    int skip = 0;
    __u64 state_timeout, t;

    *timeout = 0;
    *assure = 0;
    if (state == sSS && old >= sTW) {
        if ((e->seen[0].flags | e->seen[1].flags) & F_CLOSE_INIT ||
            (e->last_dir == dir && e->last_index == RST_SET))
            return T_REPEAT;
        state = sIG;
    }
    if (state == sIG) {
        if (index == SYNACK_SET && e->last_index == SYN_SET && e->last_dir != dir &&
            seg->ack == e->last_end) {
            /* This SYN/ACK answers a SYN that was ignored: resynchronise from it. */
            struct ct_side *side = side_of(e, e->last_dir), *own = side_of(e, dir);

            old = sSS;
            state = sSR;
            side->td_end = side->td_maxend = e->last_end;
            side->td_maxwin = e->last_win ? e->last_win : 1;
            side->td_scale = e->last_wscale;
            e->last_flags &= ~F_EXP_CHALLENGE_ACK;
            side->flags = e->last_flags;
            own->td_end = own->td_maxend = own->td_maxwin = own->td_maxack = 0;
            own->td_scale = 0;
            own->flags &= F_BE_LIBERAL;
        } else {
            return tcp_ignore(e, dir, seg, old);
        }
    } else if (state == sIV) {
        return T_INVALID;
    } else if (state == sTW && old == sLA && index == ACK_SET && e->last_dir != dir &&
               e->last_index == SYN_SET && e->last_flags & F_EXP_CHALLENGE_ACK) {
        e->last_flags &= ~F_EXP_CHALLENGE_ACK;
        return T_ACCEPT; /* an RFC 5961 challenge ACK, not the last ACK */
    }
    if (state == sS2)
        e->last_flags |= F_SIMULTANEOUS_OPEN;
    else if (state == sSR && dir == 1 && index == ACK_SET && e->last_flags & F_SIMULTANEOUS_OPEN)
        state = sES;
    if (state == sCL && index == RST_SET) {
        int checked = check_rst(e, dir, seg, old, &skip);

        if (checked < 0)
            return T_INVALID;
        state = checked;
    }
    if (!skip) {
        int window = liberal_window(e, dir, ct_tcp_window(e, dir, seg));

        if (window == W_IGNORE)
            return T_ACCEPT; /* passes with its entry, which does not move */
        if (window == W_INVALID)
            return T_WINDOW;
    }

    e->last_index = index;
    e->last_dir = dir;
    e->tcp_state = state;
    if (old != state && state == sFW)
        side_of(e, dir)->flags |= F_CLOSE_INIT;
    state_timeout = tcp_timeout(state);
    if (e->retrans >= CT_TCP_MAX_RETRANS_COUNT && state_timeout > CT_TIMEOUT_TCP_MAX_RETRANS)
        t = CT_TIMEOUT_TCP_MAX_RETRANS;
    else if (index == RST_SET)
        t = CT_TIMEOUT_TCP_CLOSE;
    else if ((e->seen[0].flags | e->seen[1].flags) & F_DATA_UNACKNOWLEDGED &&
             state_timeout > CT_TIMEOUT_TCP_UNACKNOWLEDGED)
        t = CT_TIMEOUT_TCP_UNACKNOWLEDGED;
    else if (e->last_win == 0 && state_timeout > CT_TIMEOUT_TCP_MAX_RETRANS)
        t = CT_TIMEOUT_TCP_MAX_RETRANS;
    else
        t = state_timeout;
    if (!seen_reply) {
        if (seg->flags & TH_RST)
            return T_KILL; /* only a RST came back: no connection */
        if (index == SYN_SET && old == sSS)
            return T_ACCEPT; /* a retransmitted SYN does not renew the timeout */
        if (state == sES && t > CT_TIMEOUT_TCP_UNACKNOWLEDGED)
            t = CT_TIMEOUT_TCP_UNACKNOWLEDGED; /* a picked-up connection */
        *timeout = t;
        return T_ACCEPT;
    }
    *timeout = t;
    *assure = !assured && (old == sSR || old == sES) && state == sES;
    return T_ACCEPT;
}

/* The TCP tracker for a segment of entry `e` (new if not confirmed): T_ACCEPT, T_INVALID,
 * T_REPEAT or T_KILL, with the entry's timeout and ASSURED bit moved. */
CT_GLOBAL int ct_tcp(struct ct_entry *e, __u32 dir, const struct ct_segment *seg, __u64 now)
{
    __u64 timeout;
    int assure, verdict;

    if (!e || !seg)
        return T_INVALID;
    if (!(e->status & IPS_CONFIRMED) && tcp_new(e, seg))
        return T_INVALID;
    verdict = tcp_packet(e, dir, seg, &timeout, &assure);
    if (verdict == T_WINDOW) {
        tcp_invalid(e, dir, seg->index, now);
        return T_INVALID;
    }
    if (verdict == T_INVALID || verdict == T_REPEAT)
        return verdict;
    if (timeout)
        e->deadline = now + timeout * CT_NS;
    if (assure)
        e->status |= IPS_ASSURED;
    return verdict;
}

static __always_inline __u64 ct_now(void)
{
    __u32 zero = 0;
    __u64 *fixed = CT_LOOKUP(ct_clock, &zero);

    if (fixed && *fixed)
        return *fixed;
    return bpf_ktime_get_coarse_ns();
}

static __always_inline int tuple_eq(const struct ct_tuple *a, const struct ct_tuple *b)
{
    return a->src == b->src && a->dst == b->dst && a->sport == b->sport && a->dport == b->dport;
}

/* icmp_invert_tuple's type map; -1 for a type with no inverse. */
static __always_inline int icmp_inverse(__u32 type)
{
    switch (type) {
    case 8: return 0;
    case 0: return 8;
    case 13: return 14;
    case 14: return 13;
    case 15: return 16;
    case 16: return 15;
    case 17: return 18;
    case 18: return 17;
    default: return -1;
    }
}

/* The inverse tuple (nf_ct_invert_tuple); -1 if there is none. */
static __always_inline int invert(__u32 proto, const struct ct_tuple *t, struct ct_tuple *inv)
{
    inv->src = t->dst;
    inv->dst = t->src;
    if (proto == CT_ICMP) {
        int type = icmp_inverse(t->dport >> 8);

        if (type < 0)
            return -1;
        inv->sport = t->sport;
        inv->dport = (__u16)(type << 8 | (t->dport & 0xFF));
    } else {
        inv->sport = t->dport;
        inv->dport = t->sport;
    }
    return 0;
}

static __always_inline int tuple_less(const struct ct_tuple *a, const struct ct_tuple *b)
{
    if (a->src != b->src)
        return a->src < b->src;
    if (a->dst != b->dst)
        return a->dst < b->dst;
    if (a->sport != b->sport)
        return a->sport < b->sport;
    return a->dport < b->dport;
}

/* The key of the connection holding `t` as either of its tuples; -1 if `t` has no inverse. */
static __always_inline int make_key(__u32 proto, const struct ct_tuple *t, struct ct_tuple *inv,
                                    struct ct_key *key)
{
    if (invert(proto, t, inv))
        return -1;
    key->tuple = tuple_less(inv, t) ? *inv : *t;
    key->proto = proto;
    return 0;
}

/* nf_ct_get_tuple: ports for TCP and UDP, (id; type << 8 | code) for ICMP, none otherwise. */
static __always_inline int read_tuple(struct __sk_buff *skb, __u32 proto, __u32 at, __u32 limit,
                                      __u32 src, __u32 dst, struct ct_tuple *t)
{
    __u8 l4[8];

    t->src = src;
    t->dst = dst;
    t->sport = t->dport = 0;
    if (proto == CT_TCP || proto == CT_UDP) {
        if (at + 4 > limit || load(skb, CT_ETH_HLEN + at, l4, 4))
            return -1;
        t->sport = be16(l4);
        t->dport = be16(l4 + 2);
    } else if (proto == CT_ICMP) {
        if (at + 8 > limit || load(skb, CT_ETH_HLEN + at, l4, 8))
            return -1;
        t->sport = be16(l4 + 4);
        t->dport = (__u16)(l4[0] << 8 | l4[1]);
    }
    return 0;
}

/* A live entry of the table under `key` (an expired one is removed, as lookups skip it). */
static __always_inline struct ct_entry *find(struct ct_key *key, __u64 now)
{
    struct ct_entry *e = CT_LOOKUP(ct_table, key);

    if (e && e->deadline <= now) {
        CT_DELETE(ct_table, key);
        return 0;
    }
    return e;
}

/* The kernel's jiffies, low 32 bits (nfct_time_stamp): the fixed clock's, or the real ones. */
static __always_inline __u32 ct_jiffies(void)
{
    __u32 key = 0;
    __u64 *fixed = CT_LOOKUP(ct_clock, &key);

    if (!fixed || !*fixed)
        return (__u32)bpf_jiffies64();
    key = 1;
    fixed = CT_LOOKUP(ct_clock, &key);
    return fixed ? (__u32)*fixed : (__u32)bpf_jiffies64();
}

/* --ctexpire of an entry not yet confirmed (res->pending), from the whole seconds report() left
 * in res->expires: nf_ct_expires reads the timeout such an entry holds relative, in jiffies,
 * against the clock all the same, max(0, (s32)(timeout - jiffies)) / HZ. That is 0 unless the
 * u32 jiffies are at most the timeout (within 300 s + the timeout of boot: jiffies start 300 s
 * before they wrap) or past 2^31 + the timeout (the later half of each wrap: from about 24.9
 * days up at HZ 1000, 99 days at HZ 250). A function of its own, called last: its frame is not
 * in ct_classify's, under the TCP tracker's calls. */
CT_GLOBAL int ct_pending_expiry(struct ct_result *res)
{
    __s32 ahead;

    if (!res)
        return 0;
    ahead = (__s32)(res->expires * CT_HZ - ct_jiffies());
    res->expires = ahead > 0 ? (__u32)ahead / CT_HZ : 0;
    return 0;
}

/* Whole seconds left (a confirmed entry's, as xt_conntrack reads them; one not yet confirmed
 * holds the timeout this packet set, read by ct_pending_expiry). */
static __always_inline void report(struct ct_result *res, const struct ct_entry *e, __u32 state,
                                   __u32 dir, __u64 now)
{
    res->state = state;
    res->dir = dir;
    res->l4proto = e->proto;
    res->status = e->status;
    res->expires = 0;
    if (e->deadline > now)
        res->expires = e->status & IPS_CONFIRMED ? (e->deadline - now) / CT_NS
                                                 : (e->deadline - now + CT_NS - 1) / CT_NS;
    res->orig = e->orig;
    res->reply = e->reply;
    res->mark = e->mark;
}

/* The tuple of the datagram an ICMP error quotes at `inner` (its IP header), and its protocol;
 * -1 if the quote is short or of a fragment that is not the first. */
static __always_inline int quoted_tuple(struct __sk_buff *skb, __u32 inner, __u32 tot_len,
                                        __u32 *proto, struct ct_tuple *quoted)
{
    __u8 ip[20];
    __u32 transport;

    if (inner + 20 > tot_len || load(skb, CT_ETH_HLEN + inner, ip, 20))
        return -1;
    transport = inner + (ip[0] & 0x0F) * 4;
    if (be16(ip + 6) & 0x1FFF || transport > tot_len)
        return -1;
    *proto = ip[9];
    return read_tuple(skb, ip[9], transport, tot_len, be32(ip + 12), be32(ip + 16), quoted);
}

/* nf_conntrack_inet_error: an ICMP error is RELATED to the connection whose packet it quotes,
 * if that connection's packet in that direction went to the error's target. A function of its
 * own: its frame would otherwise sit under the TCP tracker's calls, past the stack's 512. */
CT_GLOBAL int ct_related(struct __sk_buff *skb, __u32 inner, __u32 tot_len, __u32 outer_daddr,
                         struct ct_result *res)
{
    __u64 now = ct_now();
    struct ct_tuple quoted, inverted, inv;
    struct ct_key key = {};
    struct ct_entry *e;
    __u32 proto = 0, dir;

    if (!res || quoted_tuple(skb, inner, tot_len, &proto, &quoted))
        return 0;
    if (invert(proto, &quoted, &inverted) || make_key(proto, &inverted, &inv, &key))
        return 0;
    e = find(&key, now);
    if (!e)
        return 0;
    dir = tuple_eq(&inverted, &e->reply);
    if ((dir ? e->reply.dst : e->orig.dst) != outer_daddr)
        return 0;
    report(res, e, CT_STATE_RELATED, dir, now);
    return 0;
}

/* nf_ct_attach, for REJECT's answer to a packet that came in (codegen/reject), judged by OUTPUT
 * as the kernel's is: it carries the connection of the packet it answers, RELATED, in the other
 * direction, and conntrack leaves a packet that has a connection alone (no state moves, nothing
 * to confirm). That packet's tuple is read back from the answer: an ICMP error quotes it, a RST
 * swaps its addresses and ports. A packet that had no entry had a new one, which REJECT's drop
 * left unconfirmed: the per-CPU pending slot still holds it if it is that tuple's (the answer
 * leaves at once, on the CPU that judged the packet), or it is made again, as a new one. The
 * answer to a packet that had no connection (INVALID) is not given here: nothing was attached
 * to it, and ct_classify tracks it as any packet of ours (codegen/reject's BARE_ANSWER). */
CT_GLOBAL int ct_answer(struct __sk_buff *skb, struct ct_result *res)
{
    __u8 ip[20];
    __u32 tot_len, transport, proto, zero = 0;
    struct ct_tuple answer, tuple, inv;
    struct ct_key key = {};
    struct ct_pending *pending;
    struct ct_entry *e;
    __u64 now = ct_now();

    if (!res)
        return 0;
    __builtin_memset(res, 0, sizeof(*res));
    res->state = CT_STATE_INVALID;
    if (load(skb, CT_ETH_HLEN, ip, 20) || ip[0] >> 4 != 4 || (ip[0] & 0x0F) < 5)
        return 0;
    tot_len = be16(ip + 2);
    transport = (ip[0] & 0x0F) * 4;
    if (tot_len < transport || CT_ETH_HLEN + tot_len > skb->len)
        return 0;
    proto = ip[9];
    if (proto == CT_ICMP) {
        if (quoted_tuple(skb, transport + 8, tot_len, &proto, &tuple))
            return 0;
    } else if (read_tuple(skb, proto, transport, tot_len, be32(ip + 12), be32(ip + 16), &answer) ||
               invert(proto, &answer, &tuple)) {
        return 0;
    }
    if (make_key(proto, &tuple, &inv, &key))
        return 0;
    e = find(&key, now);
    if (e) {
        report(res, e, CT_STATE_RELATED, !tuple_eq(&tuple, &e->reply), now);
        return 0;
    }
    pending = CT_LOOKUP(ct_pending, &zero);
    if (!pending)
        return 0;
    e = &pending->entry;
    if (pending->key.proto == key.proto && tuple_eq(&pending->key.tuple, &key.tuple) &&
        tuple_eq(&e->orig, &tuple) && !(e->status & IPS_CONFIRMED)) {
        report(res, e, CT_STATE_RELATED, 1, now);
        ct_pending_expiry(res);
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->orig = tuple;
    e->reply = inv;
    e->proto = proto;
    pending->key = key;
    report(res, e, CT_STATE_RELATED, 1, now);
    return 0;
}

/* The l4 tracker's packet() for an entry: T_ACCEPT, T_INVALID, T_REPEAT or T_KILL. */
static __always_inline int l4_packet(struct __sk_buff *skb, struct ct_entry *e, __u32 dir,
                                     __u32 transport, __u32 tot_len, __u64 now)
{
    int confirmed = !!(e->status & IPS_CONFIRMED);

    if (e->proto == CT_TCP) {
        __u32 zero = 0;
        struct ct_pending *scratch = CT_LOOKUP(ct_pending, &zero);

        if (!scratch || ct_tcp_segment(skb, transport, tot_len, &scratch->segment))
            return T_INVALID;
        return ct_tcp(e, dir, &scratch->segment, now);
    }
    if (e->proto == CT_UDP) {
        __u8 udp[8];
        __u32 length;
        __u64 timeout = CT_TIMEOUT_UDP;

        if (transport + 8 > tot_len || load(skb, CT_ETH_HLEN + transport, udp, 8))
            return T_INVALID;
        length = be16(udp + 4);
        if (length > tot_len - transport || length < 8)
            return T_INVALID;
        if (!confirmed)
            e->udp_stream_after = now + CT_UDP_STREAM_AFTER * CT_NS;
        if (e->status & IPS_SEEN_REPLY && now > e->udp_stream_after) {
            timeout = CT_TIMEOUT_UDP_STREAM;
            e->status |= IPS_ASSURED;
        }
        e->deadline = now + timeout * CT_NS;
        return T_ACCEPT;
    }
    if (e->proto == CT_ICMP) {
        __u32 type = e->orig.dport >> 8;

        if (type != 8 && type != 13 && type != 15 && type != 17)
            return T_INVALID; /* only requests make ICMP connections */
        e->deadline = now + CT_TIMEOUT_ICMP * CT_NS;
        return T_ACCEPT;
    }
    e->deadline = now + CT_TIMEOUT_GENERIC * CT_NS;
    return T_ACCEPT;
}

CT_GLOBAL int ct_classify(struct __sk_buff *skb, struct ct_result *res)
{
    __u8 ip[20];
    __u32 tot_len, transport, proto, saddr, daddr, zero = 0, dir;
    struct ct_tuple tuple, inv;
    struct ct_key key = {};
    struct ct_pending *pending;
    struct ct_entry *e;
    __u64 now;
    int verdict;

    if (!res)
        return 0;
    __builtin_memset(res, 0, sizeof(*res));
    res->state = CT_STATE_INVALID;
    if (load(skb, CT_ETH_HLEN, ip, 20) || ip[0] >> 4 != 4 || (ip[0] & 0x0F) < 5)
        return 0;
    tot_len = be16(ip + 2);
    transport = (ip[0] & 0x0F) * 4;
    if (tot_len < transport || CT_ETH_HLEN + tot_len > skb->len)
        return 0;
    if (be16(ip + 6) & 0x3FFF)
        return 0; /* a fragment: conntrack sees datagrams whole, this tracker none */
    proto = ip[9];
    saddr = be32(ip + 12);
    daddr = be32(ip + 16);
    now = ct_now();
    if (proto == CT_ICMP) {
        __u8 icmp[8];

        if (transport + 8 > tot_len || load(skb, CT_ETH_HLEN + transport, icmp, 8) ||
            icmp[0] > 18)
            return 0;
        if (icmp[0] == 3 || icmp[0] == 4 || icmp[0] == 5 || icmp[0] == 11 || icmp[0] == 12) {
            ct_related(skb, transport + 8, tot_len, daddr, res);
            return 0;
        }
    }
    if (read_tuple(skb, proto, transport, tot_len, saddr, daddr, &tuple))
        return 0;
    if (make_key(proto, &tuple, &inv, &key))
        return 0; /* init_conntrack: no inverse tuple */
    e = find(&key, now);
    for (int attempt = 0; attempt < 2; attempt++) {
        if (e) {
            dir = tuple_eq(&tuple, &e->reply);
        } else {
            pending = CT_LOOKUP(ct_pending, &zero);
            if (!pending)
                return 0;
            e = &pending->entry;
            __builtin_memset(e, 0, sizeof(*e));
            e->orig = tuple;
            e->reply = inv;
            e->proto = proto;
            pending->key = key;
            dir = 0;
        }
        verdict = l4_packet(skb, e, dir, transport, tot_len, now);
        if (verdict != T_REPEAT)
            break;
        CT_DELETE(ct_table, &key); /* a TCP reopen: the old entry dies, look up once more */
        e = 0;
    }
    if (!e || verdict == T_INVALID || verdict == T_REPEAT)
        return 0;
    if (dir == 1)
        e->status |= IPS_SEEN_REPLY;
    report(res, e,
           dir == 1 || e->status & IPS_SEEN_REPLY ? CT_STATE_ESTABLISHED
           : e->status & IPS_EXPECTED             ? CT_STATE_RELATED
                                                  : CT_STATE_NEW,
           dir, now);
    res->pending = !(e->status & IPS_CONFIRMED);
    if (verdict == T_KILL)
        CT_DELETE(ct_table, &key);
    if (res->pending)
        ct_pending_expiry(res);
    return 0;
}

CT_GLOBAL int ct_confirm(struct ct_result *res)
{
    __u32 zero = 0;
    struct ct_pending *pending;

    if (!res || !res->pending)
        return 0;
    res->pending = 0;
    pending = CT_LOOKUP(ct_pending, &zero);
    if (!pending)
        return 0;
    pending->entry.status |= IPS_CONFIRMED;
    CT_INSERT(ct_table, &pending->key, &pending->entry);
    return 0;
}

/* -j CONNMARK: the packet's connection's mark becomes `mark`: at once in the table for a known
 * connection (whatever the verdict), in the entry the packet would create for a new one (kept
 * only if ct_confirm puts it in the table). A packet without a connection has nothing to mark;
 * one whose connection has that mark already writes nothing (xt_CONNMARK does not either). */
CT_GLOBAL int ct_set_mark(struct ct_result *res, __u32 mark)
{
    __u32 zero = 0;
    struct ct_tuple inv;
    struct ct_key key = {};
    struct ct_pending *pending;
    struct ct_entry *e;

    if (!res || res->state == CT_STATE_INVALID || res->mark == mark)
        return 0;
    res->mark = mark;
    if (res->pending) {
        pending = CT_LOOKUP(ct_pending, &zero);
        if (pending)
            pending->entry.mark = mark;
        return 0;
    }
    if (make_key(res->l4proto, &res->orig, &inv, &key))
        return 0;
    e = CT_LOOKUP(ct_table, &key);
    if (e)
        e->mark = mark;
    return 0;
}
