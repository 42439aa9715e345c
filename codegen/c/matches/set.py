"""`-m set` (xt_set.c revision 4, ip_set_core.c ip_set_test, ip_set_getport.c, and the
hash:ip, hash:net, hash:ip,port, hash:net,port, hash:net,iface, bitmap:port and list:set
types' kadt and ktest): whether the
packet's values in the match's directions are in the set, read from the caller's copy of
the set (one map per set, filled at apply time by harness.deploy.sets as
codegen.tc.matches.set lays its keys out: the maps are shared, the code is this module's).

Each set's map is declared once per unit (`declarations`) under a C name made from the set's
name (`c_name`: bytes in hex, since ipset names may hold any character), pinned there for bcc
to open. The port of a packet is ip_set_get_ip4_port's (`set_port`): protocol 0 has none, a
later fragment of TCP, UDP, UDPLITE, SCTP or ICMP none, another protocol port 0, ICMP
type << 8 | code, and TCP needs 20 header bytes, SCTP 12, the others 8. bitmap:port takes TCP
and UDP ports only; hash:ip never holds the address 0 (hash_ip4_kadt refuses it);
hash:net,iface reads the device of its second direction (src: in, dst: out; none there: no);
a list:set has no map: its member sets are tested in turn; a match with fewer directions than
its set's dimension never holds (ip_set_test).
"""

from __future__ import annotations

from codegen.bpf.isa import MapType
from codegen.rules.extensions.set import SetMatch, uses_sets
from codegen.rules.model import Ruleset
from codegen.rules.sets import (
    BITMAP_PORT,
    HASH_IP,
    HASH_IP_PORT,
    HASH_NET,
    HASH_NET_IFACE,
    HASH_NET_PORT,
    LIST_SET,
    STANDIN_SETS,
    IpSet,
    looked_up,
)
from codegen.tc.matches.set import IFINDEX_LIMIT

from .common import Labels

MODEL = SetMatch
MEMBER, NOMATCH = 1, 2  # the values in the tries (codegen.tc.matches.set)
_KINDS = {
    HASH_IP: ("hash", "u32", MapType.HASH, 4),
    HASH_IP_PORT: ("hash", "struct set_ip_port_key", MapType.HASH, 8),
    HASH_NET: ("lpm_trie", "struct set_net_key", MapType.LPM_TRIE, 8),
    HASH_NET_PORT: ("lpm_trie", "struct set_net_port_key", MapType.LPM_TRIE, 12),
    HASH_NET_IFACE: ("lpm_trie", "struct set_net_iface_key", MapType.LPM_TRIE, 12),
    BITMAP_PORT: ("array", "u32", MapType.ARRAY, 4),
}


def c_name(set_name: str) -> str:
    """The C identifier (and pin name) of set `set_name`'s map."""
    return "set_" + set_name.encode().hex()


def _set_of(match: SetMatch) -> IpSet:
    table = match.bound or STANDIN_SETS.sets.get(match.name)
    if table is None:
        raise ValueError(f"set '{match.name}' is not bound to a set (bind_sets first)")
    return table


def sets_used(ruleset: Ruleset) -> dict[str, IpSet]:
    """The sets whose maps `ruleset`'s matches read (a list:set's members), by name, in the
    order first used."""
    found: dict[str, IpSet] = {}
    names = set(uses_sets(ruleset))
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            for match in rule.matches:
                if isinstance(match, SetMatch) and match.name in names:
                    found.update((t.name, t) for t in looked_up(_set_of(match)))
    return found


def map_shapes(ruleset: Ruleset) -> dict[str, tuple[str, tuple[MapType, int, int]]]:
    """C name -> (the name the caller's maps give it, its shape) for each set used."""
    return {
        c_name(name): (f"set:{name}", (_KINDS[table.kind][2], _KINDS[table.kind][3], 1))
        for name, table in sets_used(ruleset).items()
    }


def declarations(ruleset: Ruleset, entries: dict[str, int]) -> list[str]:
    """The key structs, the port reader and one pinned map per set, for a unit with -m set."""
    lines = [
        "// -m set: each set the rules read, copied into a map at apply time.",
        "struct set_ip_port_key {",
        "    u32 address;  // network order",
        "    u8 protocol;",
        "    u8 zero;",
        "    u16 port;  // network order",
        "};",
        "struct set_net_key {",
        "    u32 prefixlen;",
        "    u32 address;  // network order",
        "};",
        "struct set_net_iface_key {",
        "    u32 prefixlen;  // 32 (the word) + the network's prefix length",
        "    u32 word;  // 0: the longest prefix held; ifindex * 64 + that prefix + 1: a member",
        "    u32 address;  // network order",
        "};",
        "struct set_net_port_key {",
        "    u32 prefixlen;  // 32 (protocol, zero, port) + the network's prefix length",
        "    u8 protocol;",
        "    u8 zero;",
        "    u16 port;  // network order",
        "    u32 address;  // network order",
        "};",
        "",
        "// ip_set_get_ip4_port: 1 and the protocol and port (host order), or 0 where it fails.",
        "static __always_inline int set_port(facts_t *f, int source, u32 *protocol, u32 *port)",
        "{",
        "    u32 p = f->protocol;",
        "    int ported = p == 6 || p == 17 || p == 136 || p == 132 || p == 1;",
        "    u32 needed = p == 6 ? 20 : p == 132 ? 12 : 8;",
        "",
        "    *protocol = p;",
        "    *port = 0;",
        "    if (p == 0)",
        "        return 0;",
        "    if (f->fragment != 0)",
        "        return !ported;",
        "    if (!ported)",
        "        return 1;",
        "    if (f->l4_len < needed)",
        "        return 0;",
        "    if (p == 1)",
        "        *port = ((u32)f->icmp_type << 8) | f->icmp_code;",
        "    else",
        "        *port = source ? f->sport : f->dport;",
        "    return 1;",
        "}",
    ]
    for name, table in sets_used(ruleset).items():
        kind, key, _, _ = _KINDS[table.kind]
        identifier = c_name(name)
        size = entries.get(identifier, 1)
        lines += [
            f"// set {name!r} ({table.kind})",
            f'BPF_TABLE_PINNED("{kind}", {key}, u8, {identifier}, {size},',
            f'                 PIN_DIR "/{identifier}");',
        ]
    return lines


def _hit(table: IpSet, match: SetMatch) -> list[str]:
    """Statements that set `hit` when `table` (not a list:set) holds the packet."""
    if len(match.directions) < table.dimension:  # ip_set_test: no
        return []
    identifier = c_name(table.name)
    first = 1 if match.directions[0] == "src" else 0
    address = "f->saddr" if first else "f->daddr"
    wanted = NOMATCH if match.return_nomatch else MEMBER
    if table.kind == BITMAP_PORT:
        return [
            f"int ported = set_port(f, {first}, &protocol, &port);",
            "if (ported && (protocol == 6 || protocol == 17)) {",
            "    u32 key = port;",
            f"    u8 *held = {identifier}.lookup(&key);",
            "    hit = held && *held;",
            "}",
        ]
    if table.kind == HASH_IP:
        return [
            f"u32 key = BE32({address});",
            f"hit = {address} != 0 && {identifier}.lookup(&key) != 0;",
        ]
    if table.kind == HASH_NET:
        return [
            f"struct set_net_key key = {{ .prefixlen = 32, .address = BE32({address}) }};",
            f"u8 *held = {identifier}.lookup(&key);",
            f"hit = held && *held == {wanted};",
        ]
    if table.kind == HASH_NET_IFACE:  # the longest prefix held, then its member's device
        device = "f->in_ifindex" if match.directions[1] == "src" else "f->out_ifindex"
        return [
            f"u32 device = {device};",
            f"if (device != 0 && device < {IFINDEX_LIMIT}u) {{",
            "    struct set_net_iface_key key = {",
            f"        .prefixlen = 64, .word = 0, .address = BE32({address})",
            "    };",
            f"    u8 *prefix = {identifier}.lookup(&key);",
            "",
            "    if (prefix) {",
            "        key.word = device * 64 + *prefix + 1;",
            f"        u8 *held = {identifier}.lookup(&key);",
            f"        hit = held && *held == {wanted};",
            "    }",
            "}",
        ]
    source = 1 if match.directions[1] == "src" else 0
    code = [f"if (set_port(f, {source}, &protocol, &port)) {{"]
    if table.kind == HASH_IP_PORT:
        code += [
            "    struct set_ip_port_key key = {",
            f"        .address = BE32({address}), .protocol = protocol, .port = BE16(port)",
            "    };",
            f"    hit = {identifier}.lookup(&key) != 0;",
        ]
    else:
        code += [
            "    struct set_net_port_key key = {",
            "        .prefixlen = 64, .protocol = protocol, .port = BE16(port),",
            f"        .address = BE32({address})",
            "    };",
            f"    u8 *held = {identifier}.lookup(&key);",
            f"    hit = held && *held == {wanted};",
        ]
    return [*code, "}"]


def write(match: SetMatch, labels: Labels) -> list[str]:
    table = _set_of(match)
    if len(match.directions) < table.dimension:  # ip_set_test: no
        return [] if match.negated else [f"goto {labels.miss};"]
    code = [f"{{  // -m set {match.name} {','.join(match.directions)} ({table.kind})"]
    code += ["    int hit = 0;", "    u32 protocol, port;"]
    for member in looked_up(table):  # a list:set's members in turn, up to one that holds it
        lines = _hit(member, match)
        if table.kind == LIST_SET:
            code += [f"    if (!hit) {{  // member set {member.name}"]
            code += [f"        {line}" for line in lines]
            code.append("    }")
        else:
            code += [f"    {line}" for line in lines]
    code += [f"    if ({'hit' if match.negated else '!hit'}) goto {labels.miss};", "}"]
    return code
