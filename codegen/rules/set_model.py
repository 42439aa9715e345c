"""ipset sets as `-m set` sees them (the kernel's ip_set core and its hash:ip, hash:net,
hash:ip,port, hash:net,port, hash:net,iface, bitmap:port and list:set types, family inet), read
from `ipset save` text (codegen.rules.sets_text).

`ipset save` prints `create NAME TYPE OPTIONS` and then one `add NAME MEMBER [nomatch]` per
member (ranges and CIDRs of hash:ip and bitmap:port already expanded); `parse_sets` reads that
and the hand-written forms ipset restore also takes (a range `A-B` or a CIDR of hosts for
hash:ip, a port range for bitmap:port, `A-B` split into networks for hash:net). What cannot be
copied into BPF maps faithfully is refused with one sentence at FILE:LINE:COL: IPv6 sets,
entries that time out, counters and skbinfo (which -m set's counter options and the SET target
read and write), hash:ip's netmask other than 32, and the types not listed.

What a set answers for a packet is ip_set_test's: fewer directions than the set's dimension
never match; the first direction picks the source or destination address (the port, for
bitmap:port), the second the source or destination port of hash:*,port (the packet's protocol
with it: ICMP's "port" is type << 8 | code; a protocol without ports has port 0); further
directions are ignored. hash:net, hash:net,port and hash:net,iface answer with the longest
prefix that holds the value, so that a `nomatch` entry inside a wider net makes an exception of
it; --return-nomatch turns that round for those types (a `nomatch` member matches, a plain one
does not). hash:net,iface's second direction names the device (src: the one the packet came
in on, dst: the one it goes out of; none, as OUTPUT's in-device, never matches), compared by
name, or by prefix for a member added `wildcard`, at the longest prefix any member holds the
address under: a member of another device there hides the shorter prefixes (the kernel's
`multi`); `physdev:` members (bridge ports, seen through br_netfilter) are refused. list:set
answers as the first of its member sets (in order) that holds the packet, each tested in the
match's directions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from codegen.rules.model import RuleError, Source

HASH_IP, HASH_NET, HASH_IP_PORT, HASH_NET_PORT, HASH_NET_IFACE, BITMAP_PORT, LIST_SET = (
    "hash:ip",
    "hash:net",
    "hash:ip,port",
    "hash:net,port",
    "hash:net,iface",
    "bitmap:port",
    "list:set",
)
TYPES = (HASH_IP, HASH_NET, HASH_IP_PORT, HASH_NET_PORT, HASH_NET_IFACE, BITMAP_PORT, LIST_SET)
DIMENSIONS = {
    HASH_IP: 1,
    HASH_NET: 1,
    HASH_IP_PORT: 2,
    HASH_NET_PORT: 2,
    HASH_NET_IFACE: 2,
    BITMAP_PORT: 1,
    LIST_SET: 1,
}
WITH_NOMATCH = frozenset({HASH_NET, HASH_NET_PORT, HASH_NET_IFACE})  # IPSET_TYPE_NOMATCH
LIST_SIZE = 8  # a list:set's default size
WITH_PORT = frozenset({HASH_IP_PORT, HASH_NET_PORT})
NAME_MAX = 31  # IPSET_MAXNAMELEN - 1
MEMBERS_MAX = 1 << 20  # what one set may hold here (an expanded range counts each value)
# The protocols whose port ip_set_get_ip4_port reads, and the header each needs.
PORT_HEADERS = {6: 20, 17: 8, 136: 8, 132: 12, 1: 8}  # TCP, UDP, UDPLITE, SCTP, ICMP
PORT_NAMES = {"tcp": 6, "udp": 17, "udplite": 136, "sctp": 132, "icmp": 1}
# The ICMP type/code names ipset 7.17 prints in `ipset save` (and reads), as found on this
# machine by adding every type/code 0-40/0-16 and saving it.
ICMP_NAMES = {
    "echo-reply": (0, 0),
    "network-unreachable": (3, 0),
    "host-unreachable": (3, 1),
    "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3),
    "fragmentation-needed": (3, 4),
    "source-route-failed": (3, 5),
    "network-unknown": (3, 6),
    "host-unknown": (3, 7),
    "network-prohibited": (3, 9),
    "host-prohibited": (3, 10),
    "TOS-network-unreachable": (3, 11),
    "TOS-host-unreachable": (3, 12),
    "communication-prohibited": (3, 13),
    "host-precedence-violation": (3, 14),
    "precedence-cutoff": (3, 15),
    "source-quench": (4, 0),
    "network-redirect": (5, 0),
    "host-redirect": (5, 1),
    "TOS-network-redirect": (5, 2),
    "TOS-host-redirect": (5, 3),
    "echo-request": (8, 0),
    "router-advertisement": (9, 0),
    "router-solicitation": (10, 0),
    "ttl-zero-during-transit": (11, 0),
    "ttl-zero-during-reassembly": (11, 1),
    "ip-header-bad": (12, 0),
    "required-option-missing": (12, 1),
    "timestamp-request": (13, 0),
    "timestamp-reply": (14, 0),
    "address-mask-request": (17, 0),
    "address-mask-reply": (18, 0),
}
MAXELEM = 65536  # ipset's default maxelem of a hash set
IGNORED_OPTIONS = {"hashsize": True, "bucketsize": True, "initval": True}
IGNORED_FLAGS = {"forceadd", "comment"}


class SetError(RuleError):
    """ipset text that cannot be read, or a set this project cannot model."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member: `network`/`prefix` (32 for an address; unused by bitmap:port), for the
    types with a port the protocol and port (host order; ICMP's type << 8 | code), for
    hash:net,iface the device's name (a prefix of names, `wildcard`), for list:set the name
    of the member set."""

    network: int = 0
    prefix: int = 32
    protocol: int = 0
    port: int = 0
    nomatch: bool = False
    iface: str = ""
    wildcard: bool = False
    member_set: str = ""


@dataclass(frozen=True)
class IpSet:
    """One set: its name, type, members, (bitmap:port) the range it was created with,
    (hash types) how many members it may hold and (list:set) how many sets and which."""

    name: str
    kind: str
    members: tuple[Member, ...] = ()
    port_range: tuple[int, int] = (0, 65535)
    source: Source | None = field(default=None, compare=False)
    maxelem: int = MAXELEM
    size: int = LIST_SIZE
    listed: tuple[IpSet, ...] = field(default=(), compare=False, repr=False)

    @property
    def dimension(self) -> int:
        return DIMENSIONS[self.kind]

    @property
    def capacity(self) -> int:
        """How many members the set may hold here: its maxelem (a bitmap:port its range),
        at most MEMBERS_MAX."""
        if self.kind == BITMAP_PORT:
            return self.port_range[1] - self.port_range[0] + 1
        if self.kind == LIST_SET:
            return self.size
        return min(self.maxelem, MEMBERS_MAX)

    def test(
        self,
        address: int,
        port: tuple[int, int] | None,
        return_nomatch: bool,
        iface: str = "",
    ) -> bool:
        """ip_set_test for the values a packet gives: `address` of the first direction (the
        port itself for bitmap:port), `port` (protocol, port) of the port direction, None when
        ip_set_get_ip4_port fails (no match), `iface` the device of hash:net,iface's second
        direction ("" when there is none: no match). A list:set is tested through its
        members (codegen.rules.extensions.set.set_answers)."""
        if self.kind == HASH_NET_IFACE:
            return bool(iface) and self._test_iface(address, iface, return_nomatch)
        if self.kind == BITMAP_PORT:
            if port is None or port[0] not in (6, 17):
                return False
            first, last = self.port_range
            return first <= port[1] <= last and port[1] in self._index[0]
        if self.kind == HASH_IP:
            return address != 0 and address in self._index[0]
        if self.kind == HASH_IP_PORT:
            return port is not None and (address, *port) in self._index[0]
        if self.kind == HASH_NET_PORT and port is None:
            return False
        for prefix, held in self._index.items():  # longest prefix first
            network = address & prefix_mask(prefix)
            key = network if self.kind == HASH_NET else (network, *(port or (0, 0)))
            nomatch = held.get(key)
            if nomatch is not None:
                return nomatch if return_nomatch else not nomatch
        return False

    def _test_iface(self, address: int, iface: str, return_nomatch: bool) -> bool:
        """The longest prefix any member holds the address under decides, whatever its
        device (mtype_test_cidrs stops at the first prefix with an element of that network,
        `multi`): a member there of the packet's device (exact name before a wildcard's
        prefix) answers, none is no match."""
        for prefix, held in self._index.items():  # longest prefix first
            there = held.get(address & prefix_mask(prefix))
            if not there:
                continue
            found = [
                member
                for member in there
                if member.iface == iface or (member.wildcard and iface.startswith(member.iface))
            ]
            if not found:
                return False
            nomatch = min(found, key=lambda member: member.wildcard).nomatch
            return nomatch if return_nomatch else not nomatch
        return False

    @property
    def _index(self) -> dict:
        index = self.__dict__.get("_built")
        if index is None:
            index = {}
            if self.kind == HASH_NET_IFACE:
                for member in sorted(self.members, key=lambda m: -m.prefix):
                    nets = index.setdefault(member.prefix, {})
                    nets.setdefault(member.network, []).append(member)
            elif self.kind in (HASH_NET, HASH_NET_PORT):
                for member in sorted(self.members, key=lambda m: -m.prefix):
                    key = (
                        member.network
                        if self.kind == HASH_NET
                        else (member.network, member.protocol, member.port)
                    )
                    index.setdefault(member.prefix, {})[key] = member.nomatch
            elif self.kind == HASH_IP_PORT:
                index[0] = {(m.network, m.protocol, m.port) for m in self.members}
            elif self.kind == BITMAP_PORT:
                index[0] = {m.port for m in self.members}
            else:
                index[0] = {m.network for m in self.members}
            self.__dict__["_built"] = index
        return index


@dataclass(frozen=True)
class SetTable:
    """The sets of a namespace (or of a file), by name."""

    sets: Mapping[str, IpSet] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.sets

    def __getitem__(self, name: str) -> IpSet:
        return self.sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sets)

    def __len__(self) -> int:
        return len(self.sets)


def prefix_mask(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


def looked_up(table: IpSet) -> tuple[IpSet, ...]:
    """The sets a match of `table` reads: a list:set's members, or the set itself."""
    return table.listed if table.kind == LIST_SET else (table,)
