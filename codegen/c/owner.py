"""`-m owner`'s socket for the C programs: who owns the socket a locally made packet carries,
read once per packet before OUTPUT (`owner_of`, called from the entry function).

Written from xt_owner.c's owner_mt and sk_to_full_sk, not from the bytecode backend's walk:
bcc cannot call the kfuncs that one uses (bpf_cast_to_kern_ctx, bpf_rdonly_cast), so this
one reads the kernel's structures with bpf_probe_read_kernel, which a TC program loaded with
CAP_PERFMON may call. The context pointer is the kernel's struct sk_buff; from it the walk
follows skb->sk (a request socket's listener stands for it, a TIME_WAIT one is none), checks
that the socket is in the namespace of skb->dev (the hook's), then sk_socket -> file ->
f_cred, whose fsuid and fsgid are the owner. The members' offsets come from the running
kernel's BTF as #defines: the headers bcc compiles with may be another kernel's (see
scripts/bootstrap), so their struct layouts are not trusted.

The chain program (BPF_PROG_TEST_RUN, whose packets carry a dummy socket no struct socket
holds) takes the owner a test gives from the control block, as harness.runner.ChainRunner
puts it there (codegen.tc.matches.owner.cb_owner's words: byte 1 of cb[2] is 0, walk the
socket, or 1 + the state; cb[3] the uid, cb[4] the gid).

`--suppl-groups`: the cred's group_info address goes in the facts with the ids, and a rule
asks `owner_in_groups` when the fsgid is outside its range: a binary search of the sorted
gid array (setgroups sorts it) for the first group at or above the range's start, at most 17
probes for NGROUPS_MAX groups, read with bpf_probe_read_kernel. The search is the rule's own,
where the bytecode backend answers every range once per packet. A test gives the chain
program its groups in the `owner_groups` map, laid out as a group_info
(codegen.tc.matches.owner.groups_value); the facts then hold the map value's address.
"""

from __future__ import annotations

from functools import cache

from codegen.bpf.btf import vmlinux
from codegen.tc.matches.owner import (
    CB_OWNER_GID_WORD,
    CB_OWNER_STATE_SHIFT,
    CB_OWNER_STATE_WORD,
    CB_OWNER_UID_WORD,
    GROUPS_MAP,
    SEARCH_STEPS,
    groups_value,
)

# What the facts' owner_state says: no socket (or none a struct socket holds), a socket no
# file holds (the kernel's own), a file's.
NONE, NO_FILE, FILE = 0, 1, 2
TCP_TIME_WAIT, TCP_NEW_SYN_RECV = 6, 12

@cache
def _offsets() -> dict[str, int]:
    """The byte offsets of what the walk reads, from the running kernel's BTF."""
    members = {
        "SKB_SK": ("sk_buff", "sk"),
        "SKB_DEV": ("sk_buff", "dev"),
        "DEV_NET": ("net_device", "nd_net.net"),
        "SK_STATE": ("sock", "__sk_common.skc_state"),
        "SK_NET": ("sock", "__sk_common.skc_net.net"),
        "SK_LISTENER": ("sock", "__sk_common.skc_listener"),
        "SK_SOCKET": ("sock", "sk_socket"),
        "SOCKET_FILE": ("socket", "file"),
        "FILE_CRED": ("file", "f_cred"),
        "CRED_FSUID": ("cred", "fsuid"),
        "CRED_FSGID": ("cred", "fsgid"),
        "CRED_GROUP_INFO": ("cred", "group_info"),
        "GI_NGROUPS": ("group_info", "ngroups"),
        "GI_GID": ("group_info", "gid"),
    }
    return {name: vmlinux().member_offset(*where)[0] for name, where in members.items()}


def groups_value_size() -> int:
    """The bytes of the chain program's test groups map's value (a group_info's)."""
    return len(groups_value(()))


def declarations(groups: bool, test_map: bool) -> list[str]:
    """The offsets and `owner_of`, for a unit whose rule set has -m owner; with `groups`
    (--suppl-groups) the group_info's address in the facts and `owner_in_groups`, and with
    `test_map` too the chain program's map of a test's groups."""
    defines = [f"#define OWNER_{name} {offset}" for name, offset in _offsets().items()]
    test_groups = groups and test_map
    code = [
        "// -m owner: the packet's socket and its file's credentials (codegen/c/owner.py).",
        *defines,
        f"#define OWNER_NONE {NONE}",
        f"#define OWNER_NO_FILE {NO_FILE}",
        f"#define OWNER_FILE {FILE}",
        "// A kernel pointer read at `base + offset`; 0 if it cannot be read.",
        "static __always_inline u64 owner_pointer(u64 base, u32 offset)",
        "{",
        "    u64 value = 0;",
        "",
        "    if (bpf_probe_read_kernel(&value, sizeof(value), (void *)(base + offset)) != 0)",
        "        return 0;",
        "    return value;",
        "}",
        "// owner_mt's view of the packet's socket, into f->owner_*; `test`: the chain program,",
        "// which takes a test's owner from the control block when it gives one.",
        "static __always_inline void owner_of(struct __sk_buff *skb, facts_t *f, int test)",
        "{",
        "    f->owner_state = OWNER_NONE;",
        "    if (test) {",
        f"        u32 given = (skb->cb[{CB_OWNER_STATE_WORD}] >> {CB_OWNER_STATE_SHIFT}) & 0xff;",
        "",
        "        if (given != 0) {",
        "            f->owner_state = given - 1;",
        f"            f->owner_uid = skb->cb[{CB_OWNER_UID_WORD}];",
        f"            f->owner_gid = skb->cb[{CB_OWNER_GID_WORD}];",
        *(_TEST_GROUPS if test_groups else []),
        "            return;",
        "        }",
        "    }",
        "    u64 kernel_skb = (u64)(long)skb;  // the context is the kernel's sk_buff",
        "    u64 sk = owner_pointer(kernel_skb, OWNER_SKB_SK);",
        "    u8 state = 0;",
        "",
        "    if (sk == 0)",
        "        return;",
        "    bpf_probe_read_kernel(&state, sizeof(state), (void *)(sk + OWNER_SK_STATE));",
        f"    if (state == {TCP_NEW_SYN_RECV}) {{  // a request socket: its listener's owner",
        "        sk = owner_pointer(sk, OWNER_SK_LISTENER);",
        "        if (sk == 0)",
        "            return;",
        "        bpf_probe_read_kernel(&state, sizeof(state), (void *)(sk + OWNER_SK_STATE));",
        "    }",
        f"    if (state == {TCP_TIME_WAIT})  // sk_to_full_sk: no full socket",
        "        return;",
        "    // A socket of another namespace than the hook's (skb->dev's) is none to owner_mt.",
        "    u64 dev = owner_pointer(kernel_skb, OWNER_SKB_DEV);",
        "",
        "    if (dev == 0 || owner_pointer(sk, OWNER_SK_NET) != owner_pointer(dev, OWNER_DEV_NET))",
        "        return;",
        "    u64 sock = owner_pointer(sk, OWNER_SK_SOCKET);",
        "",
        "    if (sock == 0)",
        "        return;",
        "    f->owner_state = OWNER_NO_FILE;",
        "    u64 file = owner_pointer(sock, OWNER_SOCKET_FILE);",
        "    u64 cred = file == 0 ? 0 : owner_pointer(file, OWNER_FILE_CRED);",
        "    u32 id = 0;",
        "",
        "    if (cred == 0)",
        "        return;",
        "    bpf_probe_read_kernel(&id, sizeof(id), (void *)(cred + OWNER_CRED_FSUID));",
        "    f->owner_uid = id;",
        "    id = 0;",
        "    bpf_probe_read_kernel(&id, sizeof(id), (void *)(cred + OWNER_CRED_FSGID));",
        "    f->owner_gid = id;",
        "    f->owner_state = OWNER_FILE;",
        *(["    f->owner_groups = owner_pointer(cred, OWNER_CRED_GROUP_INFO);"] if groups else []),
        "}",
        "",
    ]
    if test_groups:
        code[:0] = [
            f"struct owner_groups_value {{ u8 bytes[{groups_value_size()}]; }};",
            f'BPF_TABLE_PINNED("array", u32, struct owner_groups_value, {GROUPS_MAP}, 1,',
            f'                 PIN_DIR "/{GROUPS_MAP}");',
        ]
    return [*code, *(_search() if groups else [])]


# The chain program: a test's groups are the map's value, whose address the facts keep as a
# number (the facts are a map value: a pointer stored there reads back as one).
_TEST_GROUPS = [
    "            if (f->owner_state == OWNER_FILE) {",
    "                u32 zero = 0;",
    "",
    f"                f->owner_groups = (u64)(long){GROUPS_MAP}.lookup(&zero);",
    "            }",
]


def _search() -> list[str]:
    """`owner_in_groups`."""
    return [
        "// Whether one of the sorted groups of the group_info at `groups` lies in [first, last]:",
        "// a binary search for the first group >= first that answers when a probe is inside.",
        "static __always_inline int owner_in_groups(u64 groups, u32 first, u32 last)",
        "{",
        "    u32 count = 0;",
        "    u64 counted = groups + OWNER_GI_NGROUPS;",
        "",
        "    if (groups == 0 || bpf_probe_read_kernel(&count, sizeof(count), (void *)counted))",
        "        return 0;",
        "    u64 lo = 0, hi = count;",
        "",
        f"    for (int step = 0; step < {SEARCH_STEPS} && lo < hi; step++) {{",
        "        u64 mid = (lo + hi) / 2;",
        "        u32 gid = 0;",
        "        u64 at = groups + OWNER_GI_GID + 4 * mid;",
        "",
        "        if (bpf_probe_read_kernel(&gid, sizeof(gid), (void *)at))",
        "            return 0;",
        "        if (gid < first)",
        "            lo = mid + 1;",
        "        else if (gid <= last)",
        "            return 1;",
        "        else",
        "            hi = mid;",
        "    }",
        "    return 0;",
        "}",
        "",
    ]
