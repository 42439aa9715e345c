"""`ipset save` text in, sets (codegen.rules.sets) out: `create NAME TYPE OPTIONS` and one
`add NAME MEMBER [FLAGS]` per member, as ipset save prints them (ranges and CIDRs of hash:ip and
bitmap:port already expanded), and the hand-written forms ipset restore also takes (a range
`A-B` or a CIDR of hosts for hash:ip, a port range for bitmap:port, `A-B` split into networks
for hash:net and hash:net,iface). A list:set's `add` names a set created before it (never
another list:set), at the end or `before`/`after` a member. What cannot be copied into BPF maps
faithfully is refused with one sentence at FILE:LINE:COL.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
from dataclasses import replace

from codegen.rules.model import Source
from codegen.rules.names import PROTOCOL_NUMBERS
from codegen.rules.set_model import (
    BITMAP_PORT,
    HASH_IP,
    HASH_IP_PORT,
    HASH_NET,
    HASH_NET_IFACE,
    ICMP_NAMES,
    IGNORED_FLAGS,
    IGNORED_OPTIONS,
    LIST_SET,
    LIST_SIZE,
    MAXELEM,
    MEMBERS_MAX,
    NAME_MAX,
    PORT_HEADERS,
    PORT_NAMES,
    TYPES,
    WITH_NOMATCH,
    IpSet,
    Member,
    SetError,
    SetTable,
    prefix_mask,
)

IFNAME_MAX = 15  # IFNAMSIZ - 1


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


def _network(
    text: str, reader: LineReader, *, hosts: bool, whole: bool = False
) -> list[tuple[int, int]]:
    """(network, prefix) pairs of `A`, `A/N` or `A-B`; `hosts`: as single addresses; `whole`:
    /0 may be a member (hash:net,iface)."""
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
    if prefix == 0 and not hosts and not whole:
        raise reader.error(f"'{text}': a network of prefix length 0 cannot be a member", text)
    network = address & prefix_mask(prefix)
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


def _device(text: str, reader: LineReader) -> str:
    if text.startswith("physdev:"):
        raise reader.error(
            f"member device '{text}': physdev members match bridge ports through br_netfilter,"
            " which TC programs do not see",
            text,
        )
    if not text or len(text) > IFNAME_MAX:
        raise reader.error(f"device name '{text}' must be 1-{IFNAME_MAX} characters", text)
    return text


def _members(
    kind: str, text: str, nomatch: bool, reader: LineReader, wildcard: bool = False
) -> list[Member]:
    if kind == BITMAP_PORT:
        return [Member(port=port) for port in _ports(text, reader)]
    if kind == HASH_NET_IFACE:
        address_text, comma, device_text = text.partition(",")
        if not comma:
            raise reader.error(f"member '{text}' of a {kind} set is not NET,DEVICE", text)
        device = _device(device_text, reader)
        pairs = _network(address_text, reader, hosts=False, whole=True)
        return [
            Member(network, prefix, nomatch=nomatch, iface=device, wildcard=wildcard)
            for network, prefix in pairs
        ]
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
    size = LIST_SIZE
    options = words[3:]
    index = 0
    ranged = False
    while index < len(options):
        option = options[index]
        value = options[index + 1] if index + 1 < len(options) else None
        if option in IGNORED_FLAGS:
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
        elif option == "size" and kind == LIST_SET:
            if not value.isdigit() or not 1 <= int(value) <= 0xFFFFFFFF:
                raise reader.error(f"size of set '{name}' must be 1-4294967295", value)
            size = int(value)
        elif option == "maxelem" and kind not in (BITMAP_PORT, LIST_SET):
            if not value.isdigit() or not 1 <= int(value) <= 0xFFFFFFFF:
                raise reader.error(f"maxelem of set '{name}' must be 1-4294967295", value)
            maxelem = int(value)
        elif option not in IGNORED_OPTIONS:
            raise reader.error(f"option '{option}' of a {kind} set is not supported", option)
        index += 2
    if kind == BITMAP_PORT and not ranged:
        raise reader.error(f"bitmap:port set '{name}' needs 'range FROM-TO'")
    source = Source(reader.filename, reader.number, 1, reader.text)
    return IpSet(name, kind, (), port_range, source, maxelem, size)


def added_members(table: IpSet, words: list[str], reader: LineReader) -> list[Member]:
    """The members `MEMBER [nomatch] [comment TEXT]` (the words after the set's name of an
    `add`) puts into `table`."""
    member, extra = words[0], words[1:]
    nomatch = wildcard = False
    while extra:
        word = extra.pop(0)
        if word == "nomatch" and table.kind in WITH_NOMATCH:
            nomatch = True
        elif word == "wildcard" and table.kind == HASH_NET_IFACE:
            wildcard = True
        elif word == "comment" and extra:
            extra.pop(0)
        else:
            raise reader.error(
                f"'{word}' after a member of a {table.kind} set is not supported", word
            )
    added = _members(table.kind, member, nomatch, reader, wildcard)
    if table.kind == BITMAP_PORT:
        first, last = table.port_range
        outside = [m.port for m in added if not first <= m.port <= last]
        if outside:
            raise reader.error(
                f"port {outside[0]} is outside set '{table.name}''s range {first}-{last}", member
            )
    return added


def member_identity(member: Member) -> tuple:
    """What tells members apart (ipset's element: not its nomatch flag)."""
    return (
        member.network,
        member.prefix,
        member.protocol,
        member.port,
        member.iface,
        member.wildcard,
        member.member_set,
    )


def _listed(
    table: IpSet, words: list[str], held: list[Member], found: dict, reader: LineReader
) -> list[Member]:
    """A list:set's members after `add NAME SET [before|after OTHER]`."""
    name, where = words[0], words[1:]
    if name not in found:
        raise reader.error(f"set '{name}' is not created before list:set '{table.name}'", name)
    if found[name][0].kind == LIST_SET:
        raise reader.error(f"list:set '{name}' cannot be a member of list:set '{table.name}'", name)
    names = [member.member_set for member in held]
    if name in names:
        raise reader.error(f"set '{name}' is already in list:set '{table.name}'", name)
    at = len(names)
    if where:
        if len(where) != 2 or where[0] not in ("before", "after"):
            raise reader.error(
                f"'{' '.join(where)}' after a list:set member is not before|after SET", where[0]
            )
        if where[1] not in names:
            raise reader.error(f"set '{where[1]}' is not in list:set '{table.name}'", where[1])
        at = names.index(where[1]) + (where[0] == "after")
    if len(names) >= table.capacity:
        raise reader.error(f"list:set '{table.name}' is full: its size is {table.size}", name)
    return [*held[:at], Member(member_set=name), *held[at:]]


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
            if table.kind == LIST_SET:
                listed = _listed(table, words[2:], list(members.values()), found, reader)
                members.clear()
                members.update((member_identity(m), m) for m in listed)
                continue
            # A member added again replaces the earlier one (`ipset -exist add`).
            members.update((member_identity(m), m) for m in added_members(table, words[2:], reader))
            if len(members) > table.capacity:
                raise reader.error(full_message(table), words[2])
        else:
            raise reader.error(
                f"'{command}' is not an ipset save command (only create and add)", command
            )
    sets = {
        name: replace(table, members=tuple(members.values()))
        for name, (table, members) in found.items()
    }
    for name, table in sets.items():  # each list:set holds its member sets, as parsed
        if table.kind == LIST_SET:
            sets[name] = replace(table, listed=tuple(sets[m.member_set] for m in table.members))
    return SetTable(sets)


def split_words(line: str, reader: LineReader) -> list[str]:
    try:  # quotes only around comments: most lines split on blanks
        return shlex.split(line) if '"' in line or "'" in line else line.split()
    except ValueError as error:
        raise reader.error(f"cannot split the line into words: {error}") from None


def full_message(table: IpSet) -> str:
    if table.kind == BITMAP_PORT or table.capacity < table.maxelem:
        return f"set '{table.name}' cannot hold more than {table.capacity} members here"
    return f"set '{table.name}' is full: its maxelem is {table.maxelem}"
