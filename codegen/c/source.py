"""Rule set -> C source for bcc: the same TC programs as codegen.tc, written as C.

A translation unit holds one or more entry functions (`bpflab_ingress`, `bpflab_egress`,
`bpflab_INPUT`, ...), each a SCHED_CLS program in direct-action mode; bcc compiles the unit once
and each entry loads on its own. What every entry does:

- parse: the packet facts (host-order addresses and ports, fragment offset, transport bytes
  within the IP total length, ...) go into a struct; what ip_rcv would drop before
  netfilter, and whatever is not IPv4, is "not handled": counted (skb->len bytes) and passed.
- ingress: a destination in the `local_addresses` map, or multicast, goes through INPUT;
  otherwise bpf_fib_lookup decides: SUCCESS or NO_NEIGH, addressed to us at layer 2 and TTL > 1
  goes through FORWARD (TTL as ip_forward leaves it, out-interface from the lookup; with the
  fast path an ACCEPT forwards the packet here); anything else is not handled.
- egress: OUTPUT for packets made here (ingress_ifindex 0); forwarded ones pass untouched.
- INPUT (on ingress) and OUTPUT (on egress) judge a fragmented datagram by its first fragment,
  as netfilter judges the whole datagram there; later fragments share its verdict and add
  their bytes to the counter that judged it (map `fragments`), so a datagram is counted once
  with its whole length. On egress, packets an IPPROTO_RAW socket wrote whole are judged as
  they are, as OUTPUT did.
- chain: one built-in chain for BPF_PROG_TEST_RUN: in-interface from ingress_ifindex,
  out-interface from cb[0], packet type from cb[2]; the deciding counter slot goes to cb[1].

Chains: built-in chains are inline in the entry function. User chains are `static
__always_inline` functions answering CONTINUE, ACCEPT or DROP, so C's own call and return give
`-j` and `-g` their iptables meaning: a jump continues after its rule on CONTINUE, a goto hands
its callee's answer up (a RETURN after a goto resumes after the jump that entered the goto's
chain), RETURN or the end of a chain answers CONTINUE, and in a built-in chain RETURN, or a goto
that came back, applies the policy. They are inlined, not BPF-to-BPF calls, because bcc loads
one ELF section per program and does not relocate calls (a `__noinline` callee loads as "call
to invalid destination"). Inlining costs code size, one copy of a chain per path of calls to it
(refused beyond MAX_EXPANDED_RULES), and removes the 8-frame limit of BPF calls; the whole
program shares one 512-byte stack, of which the FIB lookup takes 64 bytes.

Facts live in a one-slot per-CPU array (the units' own map, `facts`) and are read through a
volatile pointer, so that verification stays linear in the rule count (see the C's comment).
Size: about 20 instructions per rule of the shape `-s ADDR -p tcp --dport PORT -j ACCEPT`, so
a chain stops loading at about 1,600 such rules: clang as bcc drives it emits no `gotol`, and a
jump across more than 32,767 instructions is refused ("jump out of range").

Counters: the same per-CPU array and slot layout as codegen.tc (codegen.tc.layout.CounterLayout),
so every reader of counters works with either backend.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from codegen.rules.iptables_save import write_rule
from codegen.rules.model import Accept, Chain, Drop, Goto, Jump, Return, Rule, Ruleset
from codegen.rules.names import BUILTIN_CHAINS
from codegen.tc.generator import CompileError
from codegen.tc.layout import NOT_HANDLED, CounterLayout, Local

from . import matches

Hook = Literal["ingress", "egress", "chain"]
COUNTERS_MAP, LOCAL_MAP = "counters", "local_addresses"
FRAGMENTS_MAP, FRAGMENTS_TRACKED = "fragments", 4096  # the program's own: an LRU hash
FIRST_DROPPED = 1 << 30  # in a FRAGMENTS_MAP value: the first fragment was dropped
FACTS_MAP = "facts"  # the C programs' own scratch map
# Where load_c_program pins the caller's maps for bcc to open them (a fresh directory per
# compile); `c_source` prints this placeholder.
DEFAULT_PIN_DIR = "/sys/fs/bpf/bpflab/c_backend"
LOCAL_MAP_ENTRIES = 1024
# Rules after inlining every user chain at each of its call sites: past this, the C would be
# too big for clang and the verifier to be worth trying.
MAX_EXPANDED_RULES = 100_000
CONTINUE, ACCEPT, DROP = 0, 1, 2
HEADERS = 14 + 60 + 20  # the most any match looks at: Ethernet, IPv4 with options, TCP


class CCompileError(CompileError):
    """The C backend cannot make a program: a rule set it cannot express, bcc missing, or bcc's
    compiler refusing the C. One sentence; names the rule when the fault is in a rule's code."""


@dataclass(frozen=True)
class Entry:
    """One program of a translation unit: a hook, and for `chain` the built-in chain."""

    hook: Hook
    chain: str | None = None

    def __post_init__(self) -> None:
        if self.hook == "chain":
            if self.chain not in BUILTIN_CHAINS:
                raise CCompileError(f"only a built-in chain can run on its own, not {self.chain!r}")
        elif self.hook in ("ingress", "egress"):
            if self.chain is not None:
                raise CCompileError(f"the {self.hook} program takes no chain ({self.chain!r})")
        else:
            raise CCompileError(f"unknown hook {self.hook!r}: ingress, egress or chain")

    @property
    def function(self) -> str:
        """The C function, which is also the program's name (at most 15 characters)."""
        if self.hook == "chain":
            return f"bpflab_{self.chain}"
        return f"bpflab_{self.hook}"

    @property
    def builtins(self) -> tuple[str, ...]:
        if self.hook == "ingress":
            return ("INPUT", "FORWARD")
        if self.hook == "egress":
            return ("OUTPUT",)
        assert self.chain is not None
        return (self.chain,)


@dataclass(frozen=True)
class RuleSpan:
    """The lines of the C source that hold one rule's code (1-based, inclusive)."""

    first_line: int
    last_line: int
    chain: str
    index: int
    text: str
    source: str | None = None

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.text}{where}"


@dataclass(frozen=True)
class CSource:
    text: str
    entries: tuple[Entry, ...]
    spans: tuple[RuleSpan, ...]
    layout: CounterLayout

    def rule_at(self, line: int) -> RuleSpan | None:
        """The rule whose code holds `line` of the source, if any (every copy of an inlined
        chain is the same source lines, so this is exact)."""
        for span in self.spans:
            if span.first_line <= line <= span.last_line:
                return span
        return None


def generate(
    ruleset: Ruleset,
    entries: Sequence[Entry],
    *,
    interfaces: Mapping[str, int],
    fastpath: bool = False,
    pin_dir: str = DEFAULT_PIN_DIR,
    map_entries: Mapping[str, int] | None = None,
) -> CSource:
    """The C translation unit for `entries`. `map_entries` gives the maps' max_entries as
    declared to bcc (default: the counter layout's size, and 1024 local addresses)."""
    if not entries:
        raise CCompileError("no program to generate")
    names = [entry.function for entry in entries]
    if len(set(names)) != len(names):
        raise CCompileError(f"the same program twice in one unit: {', '.join(names)}")
    return _Writer(ruleset, interfaces, fastpath).unit(tuple(entries), pin_dir, map_entries or {})


def c_identifier(chain: str, number: int) -> str:
    """A C function name for a user chain (chain names may hold `-` or other characters)."""
    return f"chain_{number}_{re.sub(r'[^A-Za-z0-9_]', '_', chain)}"


def comment(text: str) -> str:
    """`text` as one `//` comment line: control characters shown as `\\xNN` (a carriage return
    would end the comment) and a trailing backslash kept from splicing the next line."""
    shown = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)
    if shown.endswith("\\"):
        shown += " //"
    return f"// {shown}"


def user_chains_reached(ruleset: Ruleset, roots: Iterable[str]) -> list[str]:
    """User chains reachable from `roots`, in rule-set order; refuses a rule set whose chains,
    inlined at every call site, would hold more than MAX_EXPANDED_RULES rules."""
    expanded: dict[str, int] = {}
    reached: set[str] = set()

    def size(name: str) -> int:
        if name not in expanded:
            total = 0
            for rule in ruleset.chains[name].rules:
                total += 1
                if isinstance(rule.target, Jump | Goto):
                    reached.add(rule.target.chain)
                    total += size(rule.target.chain)
            expanded[name] = total
        return expanded[name]

    for root in roots:
        try:
            size(root)
        except RecursionError:
            raise CCompileError(f"user chains called from {root} nest too deep to inline") from None
        if size(root) > MAX_EXPANDED_RULES:
            raise CCompileError(
                f"chain {root} would hold {size(root):,} rules with every user chain inlined "
                f"where it is called (the C backend's limit is {MAX_EXPANDED_RULES:,}): "
                "call user chains from fewer places"
            )
    return [name for name in ruleset.chains if name in reached]


_GOTO = re.compile(r"\bgoto (\w+);")


class _Writer:
    def __init__(self, ruleset: Ruleset, interfaces: Mapping[str, int], fastpath: bool):
        self.ruleset = ruleset
        self.interfaces = interfaces
        self.fastpath = fastpath
        self.layout = CounterLayout.of(ruleset)
        self.lines: list[str] = []
        self.spans: list[RuleSpan] = []
        self._spans_done: set[tuple[str, int]] = set()
        self._open: dict[tuple[str, int], int] = {}
        self.functions: dict[str, str] = {}

    def emit(self, lines: Iterable[str | _Mark], depth: int = 0) -> None:
        pad = "    " * depth
        for line in lines:
            if isinstance(line, _Mark):
                self.mark(line)
                continue
            for part in line.split("\n"):
                if _LABEL.match(part):
                    self.lines.append(part)  # labels stay in column 0, as kernel style has them
                else:
                    self.lines.append(f"{pad}{part}" if part else "")

    def mark(self, mark: _Mark) -> None:
        """Note where a rule's code starts and ends. A user chain's code is written once
        however often clang inlines it, so every rule has one span."""
        key = (mark.chain, mark.index)
        if mark.start:
            self._open[key] = len(self.lines) + 1
            return
        first = self._open.pop(key)
        if key not in self._spans_done:
            self._spans_done.add(key)
            self.spans.append(
                RuleSpan(first, len(self.lines), mark.chain, mark.index, mark.text, mark.source)
            )

    # The unit ---------------------------------------------------------------------------

    def unit(
        self, entries: tuple[Entry, ...], pin_dir: str, map_entries: Mapping[str, int]
    ) -> CSource:
        roots = sorted({name for entry in entries for name in entry.builtins})
        user_chains = user_chains_reached(self.ruleset, roots)
        ingress = any(entry.hook == "ingress" for entry in entries)
        fragments = any(entry.hook in ("ingress", "egress") for entry in entries)
        self.emit(self.prologue(entries, pin_dir, map_entries, ingress, fragments))
        numbers = {name: number for number, name in enumerate(self.ruleset.chains)}
        self.functions = {name: c_identifier(name, numbers[name]) for name in user_chains}
        if user_chains:
            self.emit(["// User chains, inlined wherever they are called.", ""])
            self.emit(
                f"static __always_inline int {self.functions[name]}(facts_t *f);"
                for name in user_chains
            )
            self.emit([""])
            for name in user_chains:
                self.user_chain(self.ruleset.chains[name])
        for entry in entries:
            self.entry(entry)
        return CSource("\n".join(self.lines) + "\n", entries, tuple(self.spans), self.layout)

    def prologue(
        self,
        entries: tuple[Entry, ...],
        pin_dir: str,
        map_entries: Mapping[str, int],
        ingress: bool,
        fragments: bool,
    ) -> list[str]:
        programs = ", ".join(entry.function for entry in entries)
        counters = map_entries.get(COUNTERS_MAP, len(self.layout))
        local = map_entries.get(LOCAL_MAP, LOCAL_MAP_ENTRIES)
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
            f"#define LOCAL_ADDRESS {Local.ADDRESS}  // {LOCAL_MAP} values",
            f"#define LOCAL_GROUP {Local.GROUP}",
            f"#define RAW_PROTOCOL {socket.IPPROTO_RAW}  // IPPROTO_RAW (IP_HDRINCL)",
            f"#define HEADERS {HEADERS}  // Ethernet, IPv4 with options, TCP: all any match reads",
            f"#define NOT_HANDLED {self.layout.slot(NOT_HANDLED)}  // counter slot",
            f"#define PIN_DIR {_c_string(pin_dir)}",
            "",
            "// What a user chain answers.",
            f"enum {{ CONTINUE = {CONTINUE}, ACCEPT = {ACCEPT}, DROP = {DROP} }};",
            "",
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
            "};",
            "// Kept in a one-slot per-CPU array rather than on the stack, and read through a",
            "// volatile pointer: every rule loads what it compares afresh, from memory whose",
            "// contents the verifier does not track. On the stack (it tracks spilled values) or",
            "// in registers, what one rule's comparisons learn would ride along into every later",
            "// rule and split the verifier's states: verification would grow with the square of",
            "// the rule count. TC programs do not nest on one CPU, so one slot per CPU suffices.",
            "typedef volatile struct facts facts_t;",
            f"BPF_PERCPU_ARRAY({FACTS_MAP}, struct facts, 1);",
            "",
            "// One {packets, bytes} slot per rule, per built-in chain's policy and for packets",
            "// not handled (codegen.tc.layout.CounterLayout): the caller's map, from its pin.",
            "struct counter {",
            "    u64 packets;",
            "    u64 bytes;",
            "};",
            f'BPF_TABLE_PINNED("percpu_array", u32, struct counter, {COUNTERS_MAP}, {counters},',
            f'                 PIN_DIR "/{COUNTERS_MAP}");',
        ]
        if ingress:
            code += [
                "// The namespace's addresses (host order): their packets go through INPUT.",
                f'BPF_TABLE_PINNED("hash", u32, u8, {LOCAL_MAP}, {local}, PIN_DIR "/{LOCAL_MAP}");',
            ]
        if fragments:
            code += [
                "// Datagrams whose first fragment INPUT or OUTPUT judged -> the counter slot",
                "// that did, with FIRST_DROPPED if it dropped it.",
                "struct fragment_key {",
                "    u32 saddr;",
                "    u32 daddr;",
                "    u16 id;",
                "    u8 protocol;",
                "    u8 pad;",
                "};",
                f'BPF_TABLE("lru_hash", struct fragment_key, u32, {FRAGMENTS_MAP}, '
                f"{FRAGMENTS_TRACKED});",
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
        code += [
            "",
            "// Per CPU, and TC programs do not nest on one CPU: no atomics needed.",
            "static __always_inline void count(u32 slot, u32 bytes)",
            "{",
            f"    struct counter *counter = {COUNTERS_MAP}.lookup(&slot);",
            "",
            "    if (counter) {",
            "        counter->packets += 1;",
            "        counter->bytes += bytes;",
            "    }",
            "}",
            "",
            *PARSE,
            "",
        ]
        return code

    # Entry functions --------------------------------------------------------------------

    def entry(self, entry: Entry) -> None:
        hook = entry.hook
        body: list[str | _Mark] = []
        if hook == "egress":
            body += [
                "// Forwarded packets had their FORWARD verdict on ingress; OUTPUT is for ours.",
                "if (skb->ingress_ifindex != 0)",
                "    return TC_ACT_OK;",
            ]
        pkt_type = "skb->cb[2]" if hook == "chain" else "skb->pkt_type"
        body += [
            f"f = {FACTS_MAP}.lookup(&zero);",
            "if (!f)",
            "    return TC_ACT_OK;  // never: a one-slot array",
            "__builtin_memset((void *)f, 0, sizeof(*f));",
            f"if (parse(skb, f, {pkt_type}) != 0)",
            "    goto not_handled;",
        ]
        if hook == "ingress":
            body += [
                "if (f->pkt_type == PACKET_OTHERHOST)  // ip_rcv drops it before any hook",
                "    goto not_handled;",
                "f->in_ifindex = skb->ifindex;",
            ]
        elif hook == "egress":
            body.append("f->out_ifindex = skb->ifindex;")
        else:
            body += [
                "// Test-run: the devices and the packet type come in the context.",
                "f->in_ifindex = skb->ingress_ifindex;",
                "f->out_ifindex = skb->cb[0];",
            ]
        body.append("")
        if hook == "ingress":
            body += self.ingress()
        else:
            if hook == "egress":
                body += LATER_FRAGMENTS_EGRESS
                body += self.builtin_chain("OUTPUT", "whole_accept", "whole_drop")
            else:
                body += self.builtin_chain(entry.builtins[0], "accept")
        tails = self.tails(entry)
        used = set(_GOTO.findall(_text(body)))
        while True:  # tails used by the body, and the tails those tails go to
            more = {
                target
                for label, lines in tails
                if label in used
                for target in _GOTO.findall("\n".join(lines))
            }
            if more <= used:
                break
            used |= more
        declarations = ["facts_t *f;", "u32 zero = 0;"]
        if hook == "ingress":
            declarations += [
                "struct bpf_fib_lookup fib = {};",
                "long fib_result = -1;",
                "u32 key;",
                "u8 *kind;",
            ]
        if "answer = " in _text(body):
            declarations.append("int answer;")
        self.emit([f"int {entry.function}(struct __sk_buff *skb)", "{"])
        self.emit([*declarations, ""], 1)
        self.emit(body, 1)
        for label, lines in tails:
            if label in used:
                self.emit([f"{label}:", *lines], 1)
        self.emit(["}", ""])

    def ingress(self) -> list[str | _Mark]:
        forward_accept = "forward_accept" if self.fastpath else "accept"
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
            "key = f->saddr;  // one of our own addresses as the source",
            f"kind = {LOCAL_MAP}.lookup(&key);",
            "if (kind && *kind == LOCAL_ADDRESS)",
            "    goto not_handled;",
            "",
            "// A local destination (an address, a broadcast, a group joined here): INPUT.",
            "key = f->daddr;",
            f"kind = {LOCAL_MAP}.lookup(&key);",
            "if ((f->daddr >> 28) == 0xe) {",
            "    if (!kind || *kind != LOCAL_GROUP)",
            "        goto not_handled;",
            "    goto input;",
            "}",
            "if (kind)",
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
            *self.builtin_chain("FORWARD", forward_accept),
            "",
            "input:",
            *LATER_FRAGMENTS,
            *self.builtin_chain("INPUT", "whole_accept", "whole_drop"),
        ]

    def tails(self, entry: Entry) -> list[tuple[str, list[str]]]:
        """The ends verdicts go to, as (label, statements)."""
        report = ["skb->cb[1] = f->decided;"] if entry.hook == "chain" else []
        counted = "count(f->decided, f->tot_len);  // the rule or policy in f->decided"
        tails = [
            ("counted_accept", [counted, "goto accept;"]),
            ("counted_drop", [counted, "goto drop;"]),
            ("counted_forward_accept", [counted, "goto forward_accept;"]),
            ("counted_whole_accept", [counted, "goto whole_accept;"]),
            ("counted_whole_drop", [counted, "goto whole_drop;"]),
            ("whole_accept", [*_remember_first_fragment(dropped=False), "goto accept;"]),
            ("whole_drop", [*_remember_first_fragment(dropped=True), "goto drop;"]),
            ("accept", [*report, "return TC_ACT_OK;"]),
            ("drop", [*report, "return TC_ACT_SHOT;"]),
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
        if entry.hook == "ingress" and self.fastpath:
            tails.append(("forward_accept", FAST_FORWARD))
        return tails

    # Chains -----------------------------------------------------------------------------

    def builtin_chain(self, name: str, accept: str, drop: str = "drop") -> list[str | _Mark]:
        chain = self.ruleset.chains[name]
        policy = f"policy_{name}"
        code: list[str | _Mark] = [f"// Chain {name}, policy {chain.policy}."]
        for index, rule in enumerate(chain.rules, start=1):
            code += self.rule(chain, index, rule, _Builtin(accept, policy, drop))
        slot = self.layout.slot((name, "policy"))
        verdict = accept if chain.policy == "ACCEPT" else drop
        if f"goto {policy};" in _text(code):
            code.append(f"{policy}:")
        else:
            code.append(f"// Policy of {name}.")
        return [*code, f"f->decided = {slot};", f"goto counted_{verdict};"]

    def user_chain(self, chain: Chain) -> None:
        body: list[str | _Mark] = []
        for index, rule in enumerate(chain.rules, start=1):
            body += self.rule(chain, index, rule, _Function())
        function = self.functions[chain.name]
        self.emit(
            [
                comment(f"Chain {chain.name}: answers CONTINUE (returned), ACCEPT or DROP."),
                f"static __always_inline int {function}(facts_t *f)",
                "{",
            ]
        )
        if "answer = " in _text(body):
            self.emit(["int answer;", ""], 1)
        self.emit([*body, "return CONTINUE;"], 1)
        for verdict in ("accept", "drop"):
            if f"goto counted_{verdict};" in _text(body):
                self.emit(
                    [
                        f"counted_{verdict}:",
                        "count(f->decided, f->tot_len);",
                        f"return {verdict.upper()};",
                    ],
                    1,
                )
        self.emit(["}", ""])

    def rule(self, chain: Chain, index: int, rule: Rule, targets: _Targets) -> list[str | _Mark]:
        slot = self.layout.slot((chain.name, index))
        miss, hotdrop = f"rule_{slot}_next", f"rule_{slot}_hotdrop"
        text = write_rule(chain.name, rule)
        labels = matches.Labels(miss, hotdrop, self.interfaces)
        try:
            code = matches.write_matches(rule.matches, labels)
        except matches.UnsupportedMatch as error:
            where = f"{rule.source}: " if rule.source is not None else ""
            raise CCompileError(f"{where}{error}: {text}") from None
        decided = f"f->decided = {slot};"
        target = rule.target
        if not isinstance(target, Accept | Drop):  # verdicts count in a shared tail
            code.append(f"count({slot}, f->tot_len);")
        if isinstance(target, Accept):
            code += [decided, *targets.accept()]
        elif isinstance(target, Drop):
            code += [decided, *targets.drop()]
        elif isinstance(target, Return):
            code += targets.return_()
        elif isinstance(target, Jump):
            code += targets.jump(self.functions[target.chain])
        elif isinstance(target, Goto):
            code += targets.goto(self.functions[target.chain])
        hotdrops = any(f"goto {hotdrop};" in line for line in code)
        if hotdrops:
            if target is None or isinstance(target, Jump):
                code.append(f"goto {miss};")  # past the hotdrop
            code += [f"{hotdrop}:", decided, *targets.hotdrop()]
        if any(f"goto {miss};" in line for line in code):
            code.append(f"{miss}:;")
        source = str(rule.source) if rule.source is not None else None
        return [
            _Mark(True, chain.name, index, text, source),
            comment(text),
            *code,
            _Mark(False, chain.name, index, text, source),
        ]


@dataclass(frozen=True)
class _Mark:
    """Not a line: where a rule's code starts or ends, for RuleSpan."""

    start: bool
    chain: str
    index: int
    text: str
    source: str | None


_LABEL = re.compile(r"^\w+:;?$")


def _text(lines: Iterable[str | _Mark]) -> str:
    return "\n".join(line for line in lines if isinstance(line, str))


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Targets:
    """What a rule's target becomes. ACCEPT and DROP leave the slot in f->decided and go to a
    tail that counts it: one counter update per function rather than one per rule."""

    def accept(self) -> list[str]:
        raise NotImplementedError

    def drop(self) -> list[str]:
        raise NotImplementedError

    def hotdrop(self) -> list[str]:
        """Dropped by a match: not counted."""
        raise NotImplementedError

    def return_(self) -> list[str]:
        raise NotImplementedError

    def jump(self, function: str) -> list[str]:
        raise NotImplementedError

    def goto(self, function: str) -> list[str]:
        raise NotImplementedError


@dataclass
class _Builtin(_Targets):
    """A built-in chain, inline in the entry: verdicts go to the entry's tails."""

    accept_label: str
    policy_label: str
    drop_label: str = "drop"

    def accept(self) -> list[str]:
        return [f"goto counted_{self.accept_label};"]

    def drop(self) -> list[str]:
        return [f"goto counted_{self.drop_label};"]

    def hotdrop(self) -> list[str]:
        return ["goto drop;"]

    def return_(self) -> list[str]:
        return [f"goto {self.policy_label};"]  # RETURN in a built-in chain: the policy

    def _verdicts(self) -> list[str]:
        return [
            f"if (answer == ACCEPT)\n    goto {self.accept_label};",
            f"if (answer == DROP)\n    goto {self.drop_label};",
        ]

    def jump(self, function: str) -> list[str]:
        return [f"answer = {function}(f);", *self._verdicts()]

    def goto(self, function: str) -> list[str]:
        # Its answer is the chain's; if it came back, the built-in chain returns: its policy.
        return [f"answer = {function}(f);", *self._verdicts(), f"goto {self.policy_label};"]


class _Function(_Targets):
    """A user chain's function: verdicts are answered to the caller."""

    def accept(self) -> list[str]:
        return ["goto counted_accept;"]

    def drop(self) -> list[str]:
        return ["goto counted_drop;"]

    def hotdrop(self) -> list[str]:
        return ["return DROP;"]

    def return_(self) -> list[str]:
        return ["return CONTINUE;"]

    def jump(self, function: str) -> list[str]:
        return [f"answer = {function}(f);", "if (answer != CONTINUE)\n    return answer;"]

    def goto(self, function: str) -> list[str]:
        return [f"return {function}(f);"]


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

# INPUT sees a datagram after reassembly (ip_local_deliver) and OUTPUT before fragmentation
# (ip_finish_output): netfilter judges it once, by its first part. Here the first fragment is
# judged and later ones pass untouched (a dropped first fragment keeps the rest from ever being
# reassembled).
# INPUT sees a datagram after reassembly and OUTPUT before the kernel fragments it: netfilter
# judges and counts it once, with its whole length. Here the first fragment is judged and
# leaves its verdict and the rule (or policy) that gave it; a later fragment adds its payload's
# bytes to that counter and shares the verdict.
FRAGMENT_KEY = [
    "    struct fragment_key key = {",
    "        .saddr = f->saddr, .daddr = f->daddr, .id = f->id, .protocol = f->protocol,",
    "    };  // .pad is zero",
]


def _remember_first_fragment(dropped: bool) -> list[str]:
    slot = "f->decided | FIRST_DROPPED" if dropped else "f->decided"
    return [
        "if (f->more_fragments) {  // a first fragment: later ones share its verdict and rule",
        *FRAGMENT_KEY,
        f"    u32 slot = {slot};",
        "",
        f"    {FRAGMENTS_MAP}.update(&key, &slot);",
        "}",
    ]


LATER_FRAGMENT = [
    *FRAGMENT_KEY,
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
LATER_FRAGMENTS = [
    "// Netfilter's INPUT sees a fragmented datagram once, reassembled, with its whole length.",
    "if (f->fragment != 0) {",
    *LATER_FRAGMENT,
]
# On egress, a packet from an IPPROTO_RAW socket (IP_HDRINCL) was written whole by its sender,
# fragment fields and all; the kernel never fragments those (it refuses them over the MTU), so
# OUTPUT judged it as it is, and so does this program.
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
    *LATER_FRAGMENT,
    "whole_datagram:",
]

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
