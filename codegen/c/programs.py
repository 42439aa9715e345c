"""The entry functions, one flavour per hook, each a SCHED_CLS program in direct-action mode:

- every flavour parses the packet facts first; what ip_rcv would drop before netfilter, and
  whatever is not IPv4, is "not handled": counted (skb->len bytes) and passed.
- ingress: a local destination (codegen.tc.local), or a joined group, goes through INPUT;
  otherwise bpf_fib_lookup decides: SUCCESS or NO_NEIGH, addressed to us at layer 2 and TTL > 1
  goes through FORWARD (TTL as ip_forward leaves it, out-interface from the lookup; with the
  fast path an ACCEPT forwards the packet here); anything else is not handled.
- egress: OUTPUT for packets made here (ingress_ifindex 0) and for REJECT's answers to packets
  that came in (marked, codegen.reject); forwarded ones pass untouched.
- bridged: on a bridge port's egress, FORWARD for a packet bridged from another port of the
  same bridge; port_ingress: the stamp of each frame a port receives (codegen/c/bridges.py).
- chain: one built-in chain for BPF_PROG_TEST_RUN: in-interface from ingress_ifindex,
  out-interface from cb[0], packet type from cb[2]; the deciding counter slot goes to cb[1].

INPUT and OUTPUT go through codegen/c/fragments.py's handling of later fragments first.
Verdicts end in tails (labels at the end of the function); only the tails a body reaches are
written, so that clang sees no unused label.
"""

from __future__ import annotations

from codegen import reject
from codegen.conntrack import uses_conntrack
from codegen.rules.extensions.physdev import reads_ports
from codegen.tc.matches.owner import uses_owner
from codegen.tc.matches.policy import uses_policy
from codegen.tc.replies import (
    REPLY_CB_DADDR,
    REPLY_CB_DEVICE,
    REPLY_CB_FIELDS,
    REPLY_CB_NO_CONNECTION,
    rejects,
)

from . import bridges
from .chains import ChainWriter
from .conntrack import CLASSIFY, CONFIRM, RESULT
from .entries import Entry
from .facts import FACTS_MAP
from .fragments import LATER_FRAGMENTS, LATER_FRAGMENTS_EGRESS, remember_first_fragment
from .log import hook_statement, logs
from .maps import REPLIES_MAP
from .source_text import GOTO, Code, indented, text_of

# A tail: its label and its statements.
Tail = tuple[str, list[str]]


def entry_function(entry: Entry, chains: ChainWriter, fastpath: bool, slot: int) -> Code:
    """The C function of `entry`, named as its program; `slot` is its answer program's in
    REPLIES_MAP, where its rule set REJECTs."""
    if entry.hook == "port_ingress":
        return bridges.port_ingress_function(entry.function)
    logging = []
    if logs(chains.ruleset):  # which hook its LOG records name (codegen/c/log.py)
        builtin = entry.builtins[0] if entry.hook in ("chain", "bridged") else None
        logging = hook_statement(entry.hook, builtin)
    own_answers = OWN_ANSWER if entry.hook == "ingress" and rejects(chains.ruleset) else []
    facts = _facts(entry, reads_ports(chains.ruleset) and chains.bridges, rejects(chains.ruleset))
    body = [*own_answers, *facts, *_read_once(entry, chains), *logging, ""]
    body += _judgement(entry, chains, fastpath)
    answer = _reply(slot, uses_conntrack(chains.ruleset)) if rejects(chains.ruleset) else []
    tails = _tails(entry, fastpath, uses_conntrack(chains.ruleset), answer)
    used = _tails_used(body, tails)
    code: Code = [f"int {entry.function}(struct __sk_buff *skb)", "{"]
    code += indented([*_declarations(entry, body), ""])
    code += indented(body)
    for label, lines in tails:
        if label in used:
            code += indented([f"{label}:", *lines])
    return [*code, "}", ""]


def _facts(entry: Entry, physdev: bool, answering: bool) -> Code:
    """Parse the packet, and set what the hook knows of its devices (with `physdev`, the
    bridge port a frame the ingress program sees came in by; `answering`: the rule set
    REJECTs, and egress judges the answers to what came in)."""
    hook = entry.hook
    code: Code = []
    if hook == "egress":
        ours = f" && {NOT_ROUTED_ANSWER}" if answering else ""
        code += [
            "// Forwarded packets had their FORWARD verdict on ingress; OUTPUT is for ours, and",
            "// for our answers to what came in.",
            f"if (skb->ingress_ifindex != 0{ours})",
            "    return TC_ACT_OK;",
        ]
    if hook == "bridged":
        code += bridges.BRIDGED_CHECK
    pkt_type = "skb->cb[2]" if hook == "chain" else "skb->pkt_type"
    code += [
        f"f = {FACTS_MAP}.lookup(&zero);",
        "if (!f)",
        "    return TC_ACT_OK;  // never: a one-slot array",
        "__builtin_memset((void *)f, 0, sizeof(*f));",
        f"if (parse(skb, f, {pkt_type}) != 0)",
        "    goto not_handled;",
    ]
    if hook == "ingress":
        code += [
            "if (f->pkt_type == PACKET_OTHERHOST)  // ip_rcv drops it before any hook",
            "    goto not_handled;",
            "f->in_ifindex = skb->ifindex;",
        ]
        if physdev:
            code += bridges.STAMPED_PORT
    elif hook == "bridged":
        code += bridges.BRIDGED_FACTS
    elif hook == "egress":
        code.append("f->out_ifindex = skb->ifindex;")
    else:
        code += [
            "// Test-run: the devices and the packet type come in the context.",
            "f->in_ifindex = skb->ingress_ifindex;",
            "f->out_ifindex = skb->cb[0];",
        ]
        if physdev and entry.builtins != ("OUTPUT",):  # INPUT and FORWARD's bridge ports
            code += ["f->physin = skb->cb[3];", "f->physout = skb->cb[4];"]
    return code


def _read_once(entry: Entry, chains: ChainWriter) -> Code:
    """-m owner's socket, read once where OUTPUT runs (codegen/c/owner.py), and -m policy's
    IPsec states, read once where packets come in (codegen/c/policy.py)."""
    test = int(entry.hook == "chain")
    code = []
    runs_output = entry.hook == "egress" or entry.builtins == ("OUTPUT",)
    if runs_output and uses_owner(chains.ruleset):
        code.append(f"owner_of(skb, f, {test});")
        if entry.hook == "egress" and rejects(chains.ruleset):
            code += ANSWER_SOCKET
    if entry.hook != "egress" and uses_policy(chains.ruleset):
        code.append(f"policy_of(skb, f, {test});")
    return code


def _judgement(entry: Entry, chains: ChainWriter, fastpath: bool) -> Code:
    """The chains the hook's packets go through."""
    track = CLASSIFY if uses_conntrack(chains.ruleset) else []
    if entry.hook == "ingress":
        return _ingress(chains, fastpath, track)
    if entry.hook == "egress":
        if rejects(chains.ruleset):
            track = _answer_tracked(track)
        output = chains.builtin_chain("OUTPUT", "whole_accept", "whole_drop")
        return [*LATER_FRAGMENTS_EGRESS, *track, *output]
    return [*track, *chains.builtin_chain(entry.builtins[0], "accept")]


def _ingress(chains: ChainWriter, fastpath: bool, track: Code) -> Code:
    forward_accept = "forward_accept" if fastpath else "accept"
    return [
        "// What ip_route_input drops as martian before any hook (rp_filter, accept_local",
        "// and route_localnet off, as in a new namespace): not handled.",
        "if ((f->saddr >> 28) == 0xe || f->saddr == 0xffffffff)",
        "    goto not_handled;",
        "if ((f->daddr >> 28) == 0xe) {",
        "    if ((f->saddr >> 24) == 127)",
        "        goto not_handled;",
        "    if (f->saddr == 0 && (f->daddr >> 8) != 0xe00000 &&",
        "        f->protocol != PROTO_IGMP)",
        "        goto not_handled;",
        "} else if (f->daddr != 0xffffffff) {",
        "    // ipv4_is_zeronet: 0.0.0.0 alone since Linux 5.3",
        "    if (f->saddr == 0 || (f->saddr >> 24) == 127 ||",
        "        f->daddr == 0 || (f->daddr >> 24) == 127)",
        "        goto not_handled;",
        "}",
        "if (own_address(f->saddr))  // one of our own addresses as the source",
        "    goto not_handled;",
        *track,  # before routing, as PREROUTING's conntrack
        "",
        "// A local destination (an address, a broadcast, a group joined here): INPUT.",
        "if ((f->daddr >> 28) == 0xe) {",
        "    if (!joined_group(f->daddr))",
        "        goto not_handled;",
        "    goto input;",
        "}",
        "if (local_unicast(f->daddr))",
        "    goto input;",
        "// Otherwise the FIB says whether the kernel would forward it.",
        "fib.family = AF_INET;",
        "fib.tos = f->tos;",
        "fib.ifindex = f->in_ifindex;",
        "fib.ipv4_src = BE32(f->saddr);",
        "fib.ipv4_dst = BE32(f->daddr);",
        "fib_result = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);",
        "if (fib_result != BPF_FIB_LKUP_RET_SUCCESS &&",
        "    fib_result != BPF_FIB_LKUP_RET_NO_NEIGH)",
        "    goto not_handled;",
        "// ip_forward drops these before the FORWARD hook, and decrements the TTL before it.",
        "if (f->pkt_type != PACKET_HOST || f->ttl <= 1)",
        "    goto not_handled;",
        "f->ttl -= 1;",
        "f->out_ifindex = fib.ifindex;",
        "",
        *chains.builtin_chain("FORWARD", forward_accept),
        "",
        "input:",
        *LATER_FRAGMENTS,
        *chains.builtin_chain("INPUT", "whole_accept", "whole_drop"),
    ]


def _declarations(entry: Entry, body: Code) -> list[str]:
    declarations = ["facts_t *f;", "u32 zero = 0;"]
    if entry.hook == "ingress":
        declarations += [
            "struct bpf_fib_lookup fib = {};",
            "long fib_result = -1;",
        ]
    if "answer = " in text_of(body):
        declarations.append("int answer;")
    return declarations


# An OUTPUT REJECT's answer, delivered to our own stack (codegen.reject): unjudged, as
# netfilter's reaches the socket over lo.
OWN_ANSWER = [
    f"if (skb->tc_index == {reject.OWN_ANSWER:#x}) {{",
    "    skb->tc_index = 0;",
    "    return TC_ACT_OK;",
    "}",
]


# The answer to a packet that came in, with its connection (ROUTED_ANSWER) or without
# (BARE_ANSWER), or not.
ROUTED_ANSWER = f"skb->tc_index == {reject.ROUTED_ANSWER:#x}"
IS_ROUTED_ANSWER = f"(skb->tc_index | {reject.BARE_BIT}) == {reject.BARE_ANSWER:#x}"
NOT_ROUTED_ANSWER = f"(skb->tc_index | {reject.BARE_BIT}) != {reject.BARE_ANSWER:#x}"
# -m owner of an answer to what came in: an ICMP error's socket is the namespace's ICMP socket,
# which no file holds (icmp_send's); a RST has none (nf_send_reset), as owner_of found.
ANSWER_SOCKET = [
    f"if ({IS_ROUTED_ANSWER} && f->protocol == 1)  // ICMP",
    "    f->owner_state = OWNER_NO_FILE;",
]


def _answer_tracked(track: Code) -> Code:
    """At egress, an answer to what came in has the connection nf_ct_attach gave it (the
    tracker's ct_answer), or, where its packet had none, is tracked as any packet of ours; it
    loses its tc_index mark once what OUTPUT reads of it is read; its packet mark is 0, as the
    kernel's answers' (IP4_REPLY_MARK, net.ipv4.fwmark_reflect off)."""
    code: Code = []
    if track:
        code += [
            f"if ({ROUTED_ANSWER})",
            f"    ct_answer(skb, {RESULT});  // nf_ct_attach: its packet's, RELATED",
            "else",
            *indented(track),
        ]
    return [
        *code,
        f"if ({IS_ROUTED_ANSWER}) {{",
        "    skb->tc_index = 0;",
        "    skb->mark = f->mark = 0;",
        "}",
    ]


def _reply(slot: int, tracking: bool) -> Code:
    """REJECT's answer, at the drop tail: the program in REPLIES_MAP's `slot` (codegen.tc.replies'
    reply_program, with the answer builder that bcc's inlining cannot verify) turns the packet
    into the answer and sends it; it reads what it needs from the control block. A tail call
    does not come back unless it fails: then the packet is dropped without an answer."""
    fields = f"skb->cb[{REPLY_CB_FIELDS}]"
    invalid = []
    if tracking:  # a packet of no connection: its answer has none attached (codegen.reject)
        invalid = [
            f"    if (({RESULT})->state == CT_STATE_INVALID)",
            f"        {fields} |= 1 << {REPLY_CB_NO_CONNECTION};",
        ]
    return [
        "if (f->reject) {",
        f"    {fields} = f->reject | (f->pkt_type << 8) | ((f->out_ifindex != 0) << 16);",
        *invalid,
        f"    skb->cb[{REPLY_CB_DADDR}] = f->daddr;",
        f"    skb->cb[{REPLY_CB_DEVICE}] = f->in_ifindex;",
        f"    {REPLIES_MAP}.call(skb, {slot});",
        "}",
    ]


def _tails(entry: Entry, fastpath: bool, tracking: bool, answer: Code) -> list[Tail]:
    """The ends verdicts go to; with `tracking`, an ACCEPT confirms the connection; `answer`
    comes before a drop (REJECT's)."""
    confirm = CONFIRM if tracking else []
    report = ["skb->cb[1] = f->decided;"] if entry.hook == "chain" else []
    counted = "count(f->decided, f->tot_len);  // the rule or policy in f->decided"
    tails = [
        ("counted_accept", [counted, "goto accept;"]),
        ("counted_drop", [counted, "goto drop;"]),
        ("counted_forward_accept", [counted, "goto forward_accept;"]),
        ("counted_whole_accept", [counted, "goto whole_accept;"]),
        ("counted_whole_drop", [counted, "goto whole_drop;"]),
        ("whole_accept", [*remember_first_fragment(dropped=False), "goto accept;"]),
        ("whole_drop", [*remember_first_fragment(dropped=True), "goto drop;"]),
        ("accept", [*confirm, *report, "return TC_ACT_OK;"]),
        ("drop", [*report, *answer, "return TC_ACT_SHOT;"]),
        (
            "not_handled",
            [
                "// Not IPv4, or dropped by the kernel before netfilter: passed, counted.",
                "f->decided = NOT_HANDLED;",
                "count(NOT_HANDLED, skb->len);",
                *report,
                "return TC_ACT_OK;",
            ],
        ),
    ]
    if entry.hook == "ingress" and fastpath:
        tails.append(("forward_accept", [*confirm, *FAST_FORWARD]))
    return tails


def _tails_used(body: Code, tails: list[Tail]) -> set[str]:
    """The tails the body goes to, and the tails those tails go to."""
    used = set(GOTO.findall(text_of(body)))
    while True:
        more = {
            target
            for label, lines in tails
            if label in used
            for target in GOTO.findall("\n".join(lines))
        }
        if more <= used:
            return used
        used |= more


FAST_FORWARD = [
    "// ACCEPT in FORWARD with a complete lookup: forward here as ip_forward would, TTL",
    "// decremented with the checksum fixed up (ip_decrease_ttl), MACs from the lookup.",
    "if (fib_result != BPF_FIB_LKUP_RET_SUCCESS)",
    "    goto accept;  // no neighbour yet: the kernel resolves it",
    "{",
    "    void *data = (void *)(long)skb->data;",
    "    void *data_end = (void *)(long)skb->data_end;",
    "    struct ethhdr *eth = data;",
    "    struct iphdr *ip = data + ETH_HLEN;",
    "",
    "    if ((void *)(ip + 1) > data_end)",
    "        goto accept;",
    "    u32 check = ip->check;",
    "",
    "    check += BE16(0x0100);",
    "    ip->check = (u16)(check + (check >= 0xffff));",
    "    ip->ttl -= 1;",
    "    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);",
    "    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);",
    "    return bpf_redirect(fib.ifindex, 0);",
    "}",
]
