"""Rule sets of the shapes people bring, for the benchmark and the large differential tests.

Each shape is N rules of the INPUT chain: a first rule and a last rule the benchmark's packets
are aimed at, and N - 2 rules drawn at random (a fixed seed: the same N gives the same rules)
between them. The drawn rules never match the benchmark's packets, whose sources are in
198.19.0.0/16 (the drawn sources are outside 198.18.0.0/15), so the packet for "last" is decided
by rule N and the one for "none" by the policy; but a classifier still has to tell that from the
drawn rules, which cover the rest of the address space.

- cidr: a deny list, `-s NET -j DROP` with prefix lengths drawn from /8 to /32 (policy ACCEPT);
- acl: a mixed ACL, `-s NET [-d NET] [-i IF] [-p tcp|udp --dport P or P:Q] -j ACCEPT|DROP`
  (policy DROP);
- ranges: port ranges, `-p tcp --dport A:B -j DROP` (policy ACCEPT), widths from 1 to 1,024;
- set: the CIDR deny list as people who have one write it, one rule `-m set --match-set
  bench_deny src -j DROP` over an ipset hash:net of N networks (`sets`; policy ACCEPT).

`nft_rules` writes the same rule set for nftables: the ACL rule for rule, and each list shape
(every rule DROP on one field, so their order does not matter) as one rule over an interval
set, as people who have such lists write them for nftables.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

SEED = 20261202
RESERVED = IPv4Network("198.18.0.0/15")  # the lab's own addresses: no drawn rule names them
FIRST_NET = IPv4Network("198.19.0.0/24")
LAST_NET = IPv4Network("198.19.1.0/24")
NONE_SOURCE = IPv4Address("198.19.2.1")
DESTINATION = IPv4Address("198.18.0.2")
# The ranges shape keeps its first, last and none ports out of the drawn ranges.
FIRST_PORT, LAST_PORT, NONE_PORT = 61000, 61001, 61002
DRAWN_PORTS = (1, 60999)
INTERFACES = ("eth1", "eth2", "veth0", "veth1")
MAX_SHAPE_RULES = 1_000_000


@dataclass(frozen=True)
class Shape:
    name: str
    policy: str  # the INPUT policy
    summary: str


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("cidr", "ACCEPT", "-s NET -j DROP, prefixes /8-/32"),
        Shape("acl", "DROP", "-s NET [-d NET] [-i IF] [-p tcp|udp --dport P|P:Q]"),
        Shape("ranges", "ACCEPT", "-p tcp --dport A:B -j DROP"),
        Shape("set", "ACCEPT", "-m set --match-set NAME src -j DROP, hash:net /8-/32"),
    )
}
SET_NAME = "bench_deny"
SET_SHAPES = frozenset({"set"})  # the shapes whose N are a set's members, not rules


def _network(draw: random.Random, shortest: int = 8) -> str:
    while True:
        length = draw.randint(shortest, 32)
        address = draw.getrandbits(32) & (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
        network = IPv4Network((address, length))
        if not network.overlaps(RESERVED) and not network.is_multicast:
            return str(network) if length < 32 else f"{network.network_address}/32"


def _ports(draw: random.Random) -> str:
    width = 1 << draw.randint(0, 10)
    low = draw.randint(DRAWN_PORTS[0], DRAWN_PORTS[1] - width + 1)
    return str(low) if width == 1 else f"{low}:{low + width - 1}"


def _drawn(shape: str, draw: random.Random) -> str:
    if shape == "cidr":
        return f"-s {_network(draw)} -j DROP"
    if shape == "ranges":
        return f"-p tcp -m tcp --dport {_ports(draw)} -j DROP"
    parts = [f"-s {_network(draw)}"]
    if draw.random() < 0.5:
        parts.append(f"-d {_network(draw)}")
    if draw.random() < 0.25:
        parts.append(f"-i {draw.choice(INTERFACES)}")
    if draw.random() < 0.8:
        protocol = draw.choice(("tcp", "udp"))
        parts.append(f"-p {protocol} -m {protocol} --dport {_ports(draw)}")
    parts.append(f"-j {draw.choice(('ACCEPT', 'DROP'))}")
    return " ".join(parts)


def _aimed(shape: str, network: IPv4Network, port: int) -> str:
    """The first or last rule: the one a benchmark packet is decided by."""
    if shape == "cidr":
        return f"-s {network} -j DROP"
    if shape == "ranges":
        return f"-p tcp -m tcp --dport {port} -j DROP"
    return f"-s {network} -d {DESTINATION}/32 -p tcp -m tcp --dport {port} -j ACCEPT"


def rules(shape: str, count: int, *, seed: int = SEED) -> str:
    """`count` rules of `shape` as iptables-save text."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if not 2 <= count <= MAX_SHAPE_RULES:
        raise ValueError(f"a shape holds 2 (the first and the last) to {MAX_SHAPE_RULES:,} rules")
    draw = random.Random(f"{seed}:{shape}:{count}")
    if shape in SET_SHAPES:
        body = [f"-A INPUT -m set --match-set {SET_NAME} src -j DROP"]
    else:
        body = [
            f"-A INPUT {_aimed(shape, FIRST_NET, FIRST_PORT)}",
            *(f"-A INPUT {_drawn(shape, draw)}" for _ in range(count - 2)),
            f"-A INPUT {_aimed(shape, LAST_NET, LAST_PORT)}",
        ]
    lines = [
        "*filter",
        f":INPUT {SHAPES[shape].policy} [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        *body,
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


def _members(shape: str, count: int, seed: int) -> list[str]:
    """The set shape's `count` distinct networks: the first and last ones the benchmark's
    packets are aimed at around the drawn ones, drawn as the CIDR deny list draws them."""
    rules(shape, count)  # the same checks of the shape and the count
    draw = random.Random(f"{seed}:{shape}:{count}")
    members = {str(FIRST_NET): None}
    while len(members) < count - 1:
        members.setdefault(_network(draw), None)
    members[str(LAST_NET)] = None
    return list(members)


def sets(shape: str, count: int, *, seed: int = SEED) -> str | None:
    """The ipsets of `rules(shape, count)` as `ipset save` prints them (None: it uses none)."""
    if shape not in SET_SHAPES:
        return None
    size = max(65536, count)
    lines = [f"create {SET_NAME} hash:net family inet hashsize 1024 maxelem {size}"]
    lines += [f"add {SET_NAME} {member}" for member in _members(shape, count, seed)]
    return "\n".join([*lines, ""])


def packet(shape: str, position: str) -> bytes:
    """The IPv4 packet (a TCP RST with 10 bytes of payload) aimed at the first rule, the last,
    or none of them."""
    from scapy.layers.inet import IP, TCP

    source, port = {
        "first": (FIRST_NET.network_address + 1, FIRST_PORT),
        "last": (LAST_NET.network_address + 1, LAST_PORT),
        "none": (NONE_SOURCE, NONE_PORT),
    }[position]
    built = IP(src=str(source), dst=str(DESTINATION)) / TCP(sport=40000, dport=port, flags="R")
    return bytes(built / bytes(10))


def decided_by(shape: str, count: int, position: str) -> tuple[str, int | str]:
    """The verdict and the rule (1-based, or "policy") that decides the packet for `position`."""
    verdict = "ACCEPT" if shape == "acl" else "DROP"
    if position == "none":
        return SHAPES[shape].policy, "policy"
    if shape in SET_SHAPES:  # one rule, whichever member the packet is in
        return verdict, 1
    return verdict, 1 if position == "first" else count


NFT_TABLE = "bpflab_bench"
NFT_SET = "listed"
# The list shapes' field, as an nftables set type and a rule's selector.
NFT_LISTS = {
    "cidr": ("ipv4_addr", "ip saddr"),
    "ranges": ("inet_service", "tcp dport"),
    "set": ("ipv4_addr", "ip saddr"),
}


def _nft_rule(line: str) -> str:
    """One rule of a shape's text (`-A INPUT ...`, the options the shapes write) for nft."""
    words = line.split()[2:]
    parts = []
    verdict = None
    at = 0
    while at < len(words):
        option, value = words[at], words[at + 1] if at + 1 < len(words) else ""
        at += 2
        if option == "-s":
            parts.append(f"ip saddr {value}")
        elif option == "-d":
            parts.append(f"ip daddr {value}")
        elif option == "-i":
            parts.append(f'iifname "{value}"')
        elif option == "-p":
            protocol = value
        elif option == "-m":
            continue
        elif option == "--dport":
            parts.append(f"{protocol} dport {value.replace(':', '-')}")
        elif option == "-j":
            verdict = value.lower()
        else:
            raise ValueError(f"the shapes write no {option}: {line}")
    if verdict is None:
        raise ValueError(f"no verdict in {line}")
    if "-p" in words and not any(part.startswith(("tcp ", "udp ")) for part in parts):
        parts.append(f"ip protocol {protocol}")
    return " ".join([*parts, verdict])


def nft_rules(shape: str, count: int, *, replace: bool = False) -> str:
    """The rule set of `rules(shape, count)` for `nft -f`; with `replace`, flushed first, so
    that one transaction swaps the old rules and elements for the new."""
    lines = [line for line in rules(shape, count).splitlines() if line.startswith("-A INPUT ")]
    out = [f"flush table ip {NFT_TABLE}"] if replace else []
    out += [f"table ip {NFT_TABLE} {{"]
    policy = SHAPES[shape].policy.lower()
    if shape in NFT_LISTS:
        kind, selector = NFT_LISTS[shape]
        if shape in SET_SHAPES:  # the set's members
            values = _members(shape, count, SEED)
        else:  # the value each rule drops
            values = [line.split()[-3].replace(":", "-") for line in lines]
        out += [
            f"\tset {NFT_SET} {{",
            f"\t\ttype {kind}; flags interval; auto-merge;",
            f"\t\telements = {{ {', '.join(values)} }}",
            "\t}",
        ]
        body = [f"{selector} @{NFT_SET} drop"]
    else:
        body = [_nft_rule(line) for line in lines]
    out += ["\tchain input {", f"\t\ttype filter hook input priority filter; policy {policy};"]
    out += [f"\t\t{rule}" for rule in body]
    out += ["\t}", "}", ""]
    return "\n".join(out)
