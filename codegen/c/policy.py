"""`-m policy --dir in`'s IPsec states for the C programs: the security path of a packet
IPsec decapsulated, read once per packet into the facts (`policy_of`, from the entry function)
as struct sec_path holds it: how many states (-1: no path), and of each the fields
match_xfrm_state compares, as they lie in memory (the SPI and addresses in network order).

Written from xt_policy.c and skbuff.h's skb_ext_find, not from the bytecode backend's walk
(bcc cannot call the kfuncs it uses): bpf_probe_read_kernel from the context, the kernel's
struct sk_buff: its active_extensions bit for SKB_EXT_SEC_PATH, its extensions block, the
path offset[SKB_EXT_SEC_PATH] 8-byte chunks into it, then sp->len and sp->xvec's states.
Offsets come from the running kernel's BTF (bcc's headers may be another kernel's); a kernel
without XFRM has no path to read, and its programs see none.

The chain program (BPF_PROG_TEST_RUN, whose packets never carry a path) takes a test's path
as harness.runner.ChainRunner gives it (codegen.tc.matches.policy.cb_secpath): byte 2 of
cb[2] says 0 read the skb, 1 no path, 2 the `policy_secpath` map's value, laid out as
codegen.tc.matches.policy.SecpathValue.
"""

from __future__ import annotations

from functools import cache

from codegen.bpf.btf import BtfError, vmlinux
from codegen.rules.packet import XFRM_MAX_DEPTH
from codegen.tc.matches.policy import CB_MAP, CB_NONE, CB_SHIFT, CB_WORD, SECPATH_MAP

FIELDS = ("spi", "reqid", "saddr", "daddr")  # u32 each, then proto and mode (u8)
# The facts' part: the path's length and its states.
FACTS = [
    "    s32 sp_len;  // -m policy: how many states the security path holds, -1: no path",
    f"    struct xfrm_fields sp[{XFRM_MAX_DEPTH}];",
]


STATE_STRUCT = [
    "// A transform's fields as match_xfrm_state compares them, as they lie in memory.",
    "struct xfrm_fields {",
    *(f"    u32 {name};" for name in FIELDS),
    "    u8 proto;",
    "    u8 mode;",
    "    u16 pad;",
    "};",
]


@cache
def _offsets() -> dict[str, int] | None:
    """What the walk reads, from the running kernel's BTF; None if it has no XFRM."""
    btf = vmlinux()
    members = {
        "SKB_ACTIVE": ("sk_buff", "active_extensions"),
        "SKB_EXTENSIONS": ("sk_buff", "extensions"),
        "EXT_OFFSET": ("skb_ext", "offset"),
        "SP_LEN": ("sec_path", "len"),
        "SP_XVEC": ("sec_path", "xvec"),
        "X_SPI": ("xfrm_state", "id.spi"),
        "X_DADDR": ("xfrm_state", "id.daddr"),
        "X_PROTO": ("xfrm_state", "id.proto"),
        "X_REQID": ("xfrm_state", "props.reqid"),
        "X_MODE": ("xfrm_state", "props.mode"),
        "X_SADDR": ("xfrm_state", "props.saddr"),
    }
    try:
        found = {name: btf.member_offset(*where)[0] for name, where in members.items()}
        found["SEC_PATH_EXT"] = btf.enum("skb_ext_id")["SKB_EXT_SEC_PATH"]
    except (BtfError, KeyError):
        return None
    return found


def declarations(test_map: bool) -> list[str]:
    """`policy_of` (and, with `test_map`, the chain program's map of a test's path)."""
    offsets = _offsets()
    code = ["// -m policy: the packet's security path (codegen/c/policy.py)."]
    if offsets is not None:
        code += [f"#define POLICY_{name} {value}" for name, value in offsets.items()]
    if test_map:
        code += [
            "struct secpath_value {",
            "    u32 len;",
            "    u32 pad;",
            f"    struct xfrm_fields xvec[{XFRM_MAX_DEPTH}];",
            "};",
            f'BPF_TABLE_PINNED("array", u32, struct secpath_value, {SECPATH_MAP}, 1,',
            f'                 PIN_DIR "/{SECPATH_MAP}");',
        ]
    code += [
        "static __always_inline void policy_of(struct __sk_buff *skb, facts_t *f, int test)",
        "{",
        "    f->sp_len = -1;",
    ]
    if test_map:
        code += [
            "    if (test) {",
            f"        u32 given = (skb->cb[{CB_WORD}] >> {CB_SHIFT}) & 0xff;",
            "",
            f"        if (given == {CB_NONE})",
            "            return;",
            f"        if (given == {CB_MAP}) {{",
            "            u32 zero = 0;",
            f"            struct secpath_value *path = {SECPATH_MAP}.lookup(&zero);",
            "",
            f"            if (!path || path->len > {XFRM_MAX_DEPTH})",
            "                return;",
            "            f->sp_len = path->len;",
            "#pragma unroll",
            f"            for (int i = 0; i < {XFRM_MAX_DEPTH}; i++) {{",
            *(f"                f->sp[i].{name} = path->xvec[i].{name};" for name in FIELDS),
            "                f->sp[i].proto = path->xvec[i].proto;",
            "                f->sp[i].mode = path->xvec[i].mode;",
            "            }",
            "            return;",
            "        }",
            "    }",
        ]
    if offsets is not None:
        code += _kernel_walk()
    return [*code, "}", ""]


def _kernel_walk() -> list[str]:
    read = "bpf_probe_read_kernel"
    return [
        "    u64 kernel_skb = (u64)(long)skb;  // the context is the kernel's sk_buff",
        "    u8 active = 0, chunks = 0;",
        "    u64 extensions = 0, state = 0;",
        "    s32 len = 0;",
        "",
        f"    {read}(&active, sizeof(active), (void *)(kernel_skb + POLICY_SKB_ACTIVE));",
        "    if (!(active & (1 << POLICY_SEC_PATH_EXT)))",
        "        return;",
        f"    {read}(&extensions, sizeof(extensions),",
        "           (void *)(kernel_skb + POLICY_SKB_EXTENSIONS));",
        "    if (extensions == 0)",
        "        return;",
        "    // skb_ext_find: the path lies offset[SKB_EXT_SEC_PATH] 8-byte chunks in.",
        f"    {read}(&chunks, sizeof(chunks),",
        "           (void *)(extensions + POLICY_EXT_OFFSET + POLICY_SEC_PATH_EXT));",
        "    u64 path = extensions + 8 * (u64)chunks;",
        "",
        f"    if ({read}(&len, sizeof(len), (void *)(path + POLICY_SP_LEN)) != 0)",
        "        return;",
        f"    f->sp_len = len < 0 ? 0 : len > {XFRM_MAX_DEPTH} ? {XFRM_MAX_DEPTH} : len;",
        "#pragma unroll",
        f"    for (int i = 0; i < {XFRM_MAX_DEPTH}; i++) {{",
        "        if (i >= f->sp_len)",
        "            break;",
        "        state = 0;",
        f"        {read}(&state, sizeof(state), (void *)(path + POLICY_SP_XVEC + 8 * i));",
        "        if (state == 0) {  // never for a path the kernel built",
        "            f->sp_len = i;",
        "            break;",
        "        }",
        "        struct xfrm_fields x = {};",
        "",
        *(
            f"        {read}(&x.{name}, sizeof(x.{name}),"
            f" (void *)(state + POLICY_X_{name.upper()}));"
            for name in (*FIELDS, "proto", "mode")
        ),
        *(f"        f->sp[i].{name} = x.{name};" for name in (*FIELDS, "proto", "mode")),
        "    }",
    ]
