"""ipset sets as `-m set` sees them (the kernel's ip_set core and its hash:ip, hash:net,
hash:ip,port, hash:net,port and bitmap:port types, family inet), read from `ipset save` text.

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
directions are ignored. hash:net and hash:net,port answer with the longest prefix that holds the
value, so that a `nomatch` entry inside a wider net makes an exception of it; --return-nomatch
turns that round for those two types (a `nomatch` member matches, a plain one does not).
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from codegen.rules.model import RuleError, Source
from codegen.rules.names import PROTOCOL_NUMBERS

HASH_IP, HASH_NET, HASH_IP_PORT, HASH_NET_PORT, BITMAP_PORT = (
    "hash:ip",
    "hash:net",
    "hash:ip,port",
    "hash:net,port",
    "bitmap:port",
)
TYPES = (HASH_IP, HASH_NET, HASH_IP_PORT, HASH_NET_PORT, BITMAP_PORT)
DIMENSIONS = {HASH_IP: 1, HASH_NET: 1, HASH_IP_PORT: 2, HASH_NET_PORT: 2, BITMAP_PORT: 1}
WITH_NOMATCH = frozenset({HASH_NET, HASH_NET_PORT})  # IPSET_TYPE_NOMATCH
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
_IGNORED_OPTIONS = {"hashsize": True, "bucketsize": True, "initval": True}
_IGNORED_FLAGS = {"forceadd", "comment"}


class SetError(RuleError):
    """ipset text that cannot be read, or a set this project cannot model."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member: `network`/`prefix` (32 for an address; unused by bitmap:port), and for the
    types with a port the protocol and port (host order; ICMP's type << 8 | code)."""

    network: int = 0
    prefix: int = 32
    protocol: int = 0
    port: int = 0
    nomatch: bool = False


@dataclass(frozen=True)
class IpSet:
    """One set: its name, type, members, (bitmap:port) the range it was created with and
    (hash types) how many members it may hold."""

    name: str
    kind: str
    members: tuple[Member, ...] = ()
    port_range: tuple[int, int] = (0, 65535)
    source: Source | None = field(default=None, compare=False)
    maxelem: int = MAXELEM

    @property
    def dimension(self) -> int:
        return DIMENSIONS[self.kind]

    @property
    def capacity(self) -> int:
        """How many members the set may hold here: its maxelem (a bitmap:port its range),
        at most MEMBERS_MAX."""
        if self.kind == BITMAP_PORT:
            return self.port_range[1] - self.port_range[0] + 1
        return min(self.maxelem, MEMBERS_MAX)

    def test(self, address: int, port: tuple[int, int] | None, return_nomatch: bool) -> bool:
        """ip_set_test for the values a packet gives: `address` of the first direction (the
        port itself for bitmap:port), `port` (protocol, port) of the port direction, None when
        ip_set_get_ip4_port fails (no match)."""
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
            network = address & _mask(prefix)
            key = network if self.kind == HASH_NET else (network, *(port or (0, 0)))
            nomatch = held.get(key)
            if nomatch is not None:
                return nomatch if return_nomatch else not nomatch
        return False

    @property
    def _index(self) -> dict:
        index = self.__dict__.get("_built")
        if index is None:
            index = {}
            if self.kind in (HASH_NET, HASH_NET_PORT):
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


def _mask(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


class LineReader:
    def __init__(self, filename: str, number: int, text: str) -> None:
        self.filename, self.number, self.text = filename, number, text

    def error(self, message: str, word: str | None = None) -> SetError:
        column = 1
        if word is not None and word in self.text:
            column = self.text.index(word) + 1
        return SetError(message, Source(self.filename, self.number, column, self.text))


def _address(text: str, reader: LineReader) -> int:
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        raise reader.error(f"'{text}' is not an IPv4 address", text) from None


def _network(text: str, reader: LineReader, *, hosts: bool) -> list[tuple[int, int]]:
    """(network, prefix) pairs of `A`, `A/N` or `A-B`; `hosts`: as single addresses."""
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        first, last = _address(first_text, reader), _address(last_text, reader)
        if first > last:
            raise reader.error(f"range '{text}' ends before it starts", text)
        if hosts:
            if last - first >= MEMBERS_MAX:
                raise reader.error(f"range '{text}' holds more than {MEMBERS_MAX} addresses", text)
            return [(address, 32) for address in range(first, last + 1)]
        ranges = ipaddress.summarize_address_range(
            ipaddress.IPv4Address(first), ipaddress.IPv4Address(last)
        )
        return [(int(net.network_address), net.prefixlen) for net in ranges]
    address_text, slash, prefix_text = text.partition("/")
    address = _address(address_text, reader)
    prefix = 32
    if slash:
        if not prefix_text.isdigit() or not 0 <= int(prefix_text) <= 32:
            raise reader.error(f"'{text}' has a bad prefix length (0-32)", text)
        prefix = int(prefix_text)
    if prefix == 0 and not hosts:
        raise reader.error(f"'{text}': a network of prefix length 0 cannot be a member", text)
    network = address & _mask(prefix)
    if hosts:
        if 32 - prefix > 20:
            raise reader.error(f"'{text}' holds more than {MEMBERS_MAX} addresses", text)
        return [(network + offset, 32) for offset in range(1 << (32 - prefix))]
    return [(network, prefix)]


def _port_value(text: str, reader: LineReader) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise reader.error(f"'{text}' is not a port (0-65535)", text)
    return int(text)


def _ports(text: str, reader: LineReader) -> list[int]:
    first_text, dash, last_text = text.partition("-")
    first = _port_value(first_text, reader)
    last = _port_value(last_text, reader) if dash else first
    if first > last:
        raise reader.error(f"port range '{text}' ends before it starts", text)
    return list(range(first, last + 1))


def _protocol_ports(text: str, reader: LineReader) -> list[tuple[int, int]]:
    """(protocol, port) pairs of `PORT`, `PROTO:PORT[-PORT]` (TCP without a protocol); a
    protocol without ports takes port 0 only."""
    protocol_text, colon, port_text = text.rpartition(":")
    if not colon:
        return [(6, port) for port in _ports(text, reader)]
    name = protocol_text.lower()
    protocol = PORT_NAMES.get(name)
    if protocol is None:
        protocol = PROTOCOL_NUMBERS.get(name)
        if protocol is None and name.isdigit() and int(name) <= 255:
            protocol = int(name)
        if protocol is None:
            raise reader.error(f"'{protocol_text}' is not a protocol", protocol_text)
    if protocol == 1:
        named = ICMP_NAMES.get(port_text)
        type_text, slash, code_text = port_text.partition("/")
        if named is not None:
            icmp_type, code = named
        elif slash and type_text.isdigit() and code_text.isdigit():
            icmp_type, code = int(type_text), int(code_text)
        else:
            raise reader.error(
                f"ICMP member '{text}' is neither icmp:TYPE/CODE nor of a name ipset prints",
                text,
            )
        if icmp_type > 255 or code > 255:
            raise reader.error(f"ICMP type and code of '{text}' must be 0-255", text)
        return [(1, icmp_type << 8 | code)]
    if protocol not in PORT_HEADERS and port_text != "0":
        raise reader.error(
            f"protocol '{protocol_text}' has no ports: its member takes port 0", text
        )
    return [(protocol, port) for port in _ports(port_text, reader)]


def _members(kind: str, text: str, nomatch: bool, reader: LineReader) -> list[Member]:
    if kind == BITMAP_PORT:
        return [Member(port=port) for port in _ports(text, reader)]
    if kind in (HASH_IP, HASH_NET):
        pairs = _network(text, reader, hosts=kind == HASH_IP)
        return [Member(network, prefix, nomatch=nomatch) for network, prefix in pairs]
    address_text, comma, port_text = text.partition(",")
    if not comma or "," in port_text:
        raise reader.error(f"member '{text}' of a {kind} set is not ADDRESS,[PROTO:]PORT", text)
    pairs = _network(address_text, reader, hosts=kind == HASH_IP_PORT)
    ports = _protocol_ports(port_text, reader)
    if len(pairs) * len(ports) > MEMBERS_MAX:
        raise reader.error(f"member '{text}' expands to more than {MEMBERS_MAX} members", text)
    return [
        Member(network, prefix, protocol, port, nomatch)
        for network, prefix in pairs
        for protocol, port in ports
    ]


def _create(words: list[str], reader: LineReader) -> IpSet:
    """The empty set a `create NAME TYPE OPTIONS` line makes."""
    if len(words) < 3:
        raise reader.error("'create' needs a set name and a type")
    name, kind = words[1], words[2]
    if not name or len(name) > NAME_MAX:
        raise reader.error(f"set name '{name}' must be 1-{NAME_MAX} characters", name)
    if kind not in TYPES:
        raise reader.error(f"set type '{kind}' is not supported (only {', '.join(TYPES)})", kind)
    port_range = (0, 65535)
    maxelem = MAXELEM
    options = words[3:]
    index = 0
    ranged = False
    while index < len(options):
        option = options[index]
        value = options[index + 1] if index + 1 < len(options) else None
        if option in _IGNORED_FLAGS:
            index += 1
            continue
        if option in ("counters", "skbinfo"):
            raise reader.error(
                f"set '{name}' keeps {option}, which this project does not copy into BPF maps",
                option,
            )
        if value is None:
            raise reader.error(f"option '{option}' of set '{name}' needs a value", option)
        if option == "family":
            if value != "inet":
                raise reader.error(f"set '{name}' is of family {value}: only inet sets", value)
        elif option == "timeout":
            raise reader.error(
                f"set '{name}' has timeouts: entries that expire cannot be copied into BPF maps",
                option,
            )
        elif option == "netmask" and kind == HASH_IP:
            if value != "32":
                raise reader.error(f"set '{name}': only netmask 32 is supported", value)
        elif option == "range" and kind == BITMAP_PORT:
            ports = _ports(value, reader)
            port_range, ranged = (ports[0], ports[-1]), True
        elif option == "maxelem" and kind != BITMAP_PORT:
            if not value.isdigit() or not 1 <= int(value) <= 0xFFFFFFFF:
                raise reader.error(f"maxelem of set '{name}' must be 1-4294967295", value)
            maxelem = int(value)
        elif option not in _IGNORED_OPTIONS:
            raise reader.error(f"option '{option}' of a {kind} set is not supported", option)
        index += 2
    if kind == BITMAP_PORT and not ranged:
        raise reader.error(f"bitmap:port set '{name}' needs 'range FROM-TO'")
    source = Source(reader.filename, reader.number, 1, reader.text)
    return IpSet(name, kind, (), port_range, source, maxelem)


def added_members(table: IpSet, words: list[str], reader: LineReader) -> list[Member]:
    """The members `MEMBER [nomatch] [comment TEXT]` (the words after the set's name of an
    `add`) puts into `table`."""
    member, extra = words[0], words[1:]
    nomatch = False
    while extra:
        word = extra.pop(0)
        if word == "nomatch" and table.kind in WITH_NOMATCH:
            nomatch = True
        elif word == "comment" and extra:
            extra.pop(0)
        else:
            raise reader.error(
                f"'{word}' after a member of a {table.kind} set is not supported", word
            )
    added = _members(table.kind, member, nomatch, reader)
    if table.kind == BITMAP_PORT:
        first, last = table.port_range
        outside = [m.port for m in added if not first <= m.port <= last]
        if outside:
            raise reader.error(
                f"port {outside[0]} is outside set '{table.name}''s range {first}-{last}", member
            )
    return added


def member_identity(member: Member) -> tuple[int, int, int, int]:
    """What tells members apart (ipset's element: not its nomatch flag)."""
    return member.network, member.prefix, member.protocol, member.port


def parse_sets(text: str, filename: str = "<sets>") -> SetTable:
    """The sets of `ipset save` text; SetError at FILE:LINE:COL for what cannot be read."""
    found: dict[str, tuple[IpSet, dict[tuple[int, int, int, int], Member]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        reader = LineReader(filename, number, line)
        words = split_words(stripped, reader)
        command = words[0]
        if command in ("create", "-N", "n"):
            table = _create(words, reader)
            if table.name in found:
                raise reader.error(f"set '{table.name}' is created twice", table.name)
            found[table.name] = (table, {})
        elif command in ("add", "-A", "a"):
            if len(words) < 3:
                raise reader.error("'add' needs a set name and a member")
            name = words[1]
            if name not in found:
                raise reader.error(f"'add' to set '{name}', which is not created before", name)
            table, members = found[name]
            # A member added again replaces the earlier one (`ipset -exist add`).
            members.update((member_identity(m), m) for m in added_members(table, words[2:], reader))
            if len(members) > table.capacity:
                raise reader.error(full_message(table), words[2])
        else:
            raise reader.error(
                f"'{command}' is not an ipset save command (only create and add)", command
            )
    return SetTable(
        {
            name: replace(table, members=tuple(members.values()))
            for name, (table, members) in found.items()
        }
    )


def split_words(line: str, reader: LineReader) -> list[str]:
    try:  # quotes only around comments: most lines split on blanks
        return shlex.split(line) if '"' in line or "'" in line else line.split()
    except ValueError as error:
        raise reader.error(f"cannot split the line into words: {error}") from None


def full_message(table: IpSet) -> str:
    if table.kind == BITMAP_PORT or table.capacity < table.maxelem:
        return f"set '{table.name}' cannot hold more than {table.capacity} members here"
    return f"set '{table.name}' is full: its maxelem is {table.maxelem}"


# What -m set looks up when no sets are given (the reference evaluator, test runs, the
# extension's examples), as STANDIN_ROUTES is for -m addrtype.
STANDIN_SETS_TEXT = """\
create hosts hash:ip family inet
add hosts 198.18.0.5
add hosts 198.18.1.1
create nets hash:net family inet
add nets 198.18.0.0/16
add nets 198.18.1.0/24 nomatch
add nets 198.18.1.1
create ports bitmap:port range 0-1024
add ports 22
add ports 53
create services hash:ip,port family inet
add services 198.18.1.1,tcp:22
add services 198.18.0.5,udp:53
create netports hash:net,port family inet
add netports 198.18.0.0/24,tcp:22
add netports 198.18.0.0/28,tcp:22 nomatch
"""
STANDIN_SETS = parse_sets(STANDIN_SETS_TEXT, "<stand-in sets>")
