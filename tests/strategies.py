"""Hypothesis strategies for differential tests: random filter tables and random IPv4 packets.

Values come from small pools around the addresses of the netfilter oracle's topologies
(harness.netfilter), so that random rules actually hit random packets: a rule matching on
`--dport 80` is only interesting when some packets go to port 80.

`rulesets()` builds `Ruleset`s that iptables-legacy-restore accepts and that survive the round
trip through iptables-save text unchanged (matches in the order iptables-save prints them); user
chains only jump or go to chains created after them, so there are no loops. `packets(chain)`
builds packets the oracle injects into that chain unchanged: addresses it can receive, valid
header checksums, and for INPUT no fragments (the kernel reassembles those before INPUT).
"""

from __future__ import annotations

from functools import cache
from ipaddress import IPv4Address
from typing import TypeVar

from hypothesis import strategies as st

from codegen.rules import (
    Accept,
    Address,
    AddressRange,
    Chain,
    Comment,
    Drop,
    Fragment,
    Goto,
    IcmpMatch,
    Interface,
    IpRange,
    Jump,
    Length,
    Mark,
    Match,
    Multiport,
    PktType,
    PortRange,
    Protocol,
    Return,
    Rule,
    Ruleset,
    Target,
    TcpFlags,
    TcpMatch,
    Ttl,
    UdpMatch,
)
from harness.netfilter import (
    ALL_HOSTS,
    HOST,
    HOST_BROADCAST,
    HOST_CLIENT,
    LIMITED_BROADCAST,
    ROUTER_CLIENT,
    ROUTER_CLIENT_SIDE,
    ROUTER_SERVER_SIDE,
    SERVER,
    with_checksum,
)

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
IPPROTO_DCCP, IPPROTO_GRE, IPPROTO_ESP, IPPROTO_SCTP, IPPROTO_UDPLITE = 33, 47, 50, 132, 136
# Protocols whose first four bytes are ports for xt_multiport.
PORTED_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP)
PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_GRE, IPPROTO_ESP, IPPROTO_SCTP,
             IPPROTO_UDPLITE, IPPROTO_DCCP)  # fmt: skip
PORTS = (0, 22, 53, 80, 443, 1023, 1024, 65535)
ICMP_TYPES = (0, 3, 5, 8, 11, 13)
ICMP_CODES = (0, 1, 3)
TTLS = (0, 1, 2, 63, 64, 65, 128, 254, 255)
LENGTHS = (0, 20, 28, 40, 44, 48, 60, 64, 100, 1500, 65535)
MARKS = (0, 1, 0xFF, 0xFFFFFFFF)
CHAIN_NAMES = ("alpha", "beta", "gamma_3", "d-4", "LONG_CHAIN_NAME_twenty8_char")
INTERFACE_NAMES = ("eth0", "eth1", "eth+", "e+", "lo", "eth10", "eth0.5")
COMMENTS = ("web", "two words", "it's", 'say "hi"', "back\\slash", "x" * 255)
PKT_TYPES = ("unicast", "broadcast", "multicast", "otherhost")

# Addresses that packets use, and a few neighbours so that masks and ranges cut between them.
ADDRESSES = tuple(
    IPv4Address(text)
    for text in (
        str(HOST_CLIENT),
        str(HOST),
        str(ROUTER_CLIENT),
        str(ROUTER_CLIENT_SIDE),
        str(ROUTER_SERVER_SIDE),
        str(SERVER),
        str(HOST_BROADCAST),
        str(ALL_HOSTS),
        str(LIMITED_BROADCAST),
        "198.18.0.77",
        "198.18.1.77",
        "198.19.255.1",
        "10.0.0.1",
    )
)
PREFIXES = (32, 31, 30, 24, 23, 16, 15, 8, 1)
ODD_MASKS = (0xFFFF00FF, 0xFF00FF00)  # iptables accepts any mask, not only prefixes

# Where each chain's packets may come from and go to (harness.netfilter.prepare's rules).
SOURCES = {
    "INPUT": (HOST_CLIENT, ROUTER_CLIENT, SERVER, IPv4Address("198.18.0.77")),
    "FORWARD": (ROUTER_CLIENT, HOST_CLIENT, HOST, IPv4Address("198.19.255.1")),
    "OUTPUT": (HOST, ROUTER_CLIENT, IPv4Address("198.18.0.77")),
}
DESTINATIONS = {
    "INPUT": (HOST, HOST, HOST, HOST_BROADCAST, LIMITED_BROADCAST, ALL_HOSTS),
    "FORWARD": (SERVER,),
    "OUTPUT": (HOST_CLIENT,),
}


# ---------------------------------------------------------------------------------------------
# Rules


@cache
def _address_value() -> st.SearchStrategy[int]:
    near = st.sampled_from(ADDRESSES).flatmap(
        lambda address: st.sampled_from((int(address), int(address) - 1, int(address) + 1))
    )
    return near.map(lambda value: value & 0xFFFFFFFF)


@cache
def addresses(direction: str) -> st.SearchStrategy[Address]:
    """`-s` / `-d` around the topologies' addresses; never the mask-0 `-s 0/0`, which the
    kernel cannot tell from no match."""
    prefix_masks = st.sampled_from(PREFIXES).map(
        lambda bits: (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    )
    masks = st.one_of(prefix_masks, st.sampled_from(ODD_MASKS))
    return st.builds(Address, st.just(direction), _address_value(), masks, st.booleans())


@cache
def interfaces(direction: str) -> st.SearchStrategy[Interface]:
    return st.builds(Interface, st.just(direction), st.sampled_from(INTERFACE_NAMES), st.booleans())


@cache
@st.composite
def port_ranges(draw: st.DrawFn) -> PortRange:
    first = draw(st.sampled_from(PORTS))
    last = draw(st.sampled_from([first, *(port for port in PORTS if port > first)]))
    # iptables-save drops a negated full range (`! --dport 0:65535`): the round trip would not
    # keep it, so it is never generated.
    negated = draw(st.booleans()) and (first, last) != (0, 0xFFFF)
    return PortRange(first, last, negated)


@cache
def _optional_ports() -> st.SearchStrategy[PortRange]:
    return st.one_of(st.just(PortRange()), port_ranges())


@cache
def tcp_flags() -> st.SearchStrategy[TcpFlags]:
    given = st.builds(TcpFlags, st.integers(0, 0x3F), st.integers(0, 0x3F), st.booleans())
    return st.one_of(st.just(TcpFlags()), st.builds(TcpFlags.syn, st.booleans()), given)


@cache
def tcp_matches() -> st.SearchStrategy[TcpMatch]:
    return st.builds(TcpMatch, _optional_ports(), _optional_ports(), tcp_flags())


@cache
def udp_matches() -> st.SearchStrategy[UdpMatch]:
    return st.builds(UdpMatch, _optional_ports(), _optional_ports())


@cache
@st.composite
def icmp_matches(draw: st.DrawFn) -> IcmpMatch:
    kind = draw(st.sampled_from((*ICMP_TYPES, 0xFF)))
    if draw(st.booleans()):
        code_min, code_max = 0, 0xFF
    else:
        code_min = code_max = draw(st.sampled_from(ICMP_CODES))
    return IcmpMatch(kind, code_min, code_max, draw(st.booleans()))


@cache
@st.composite
def multiports(draw: st.DrawFn) -> Multiport:
    entries = draw(st.lists(port_ranges(), min_size=1, max_size=4))
    ports = tuple((entry.first, entry.last) for entry in entries)
    direction = draw(st.sampled_from(("src", "dst", "any")))
    return Multiport(direction, ports, draw(st.booleans()))


@cache
def address_ranges() -> st.SearchStrategy[AddressRange]:
    # first > last is allowed by iptables and matches nothing (or everything, negated).
    return st.builds(AddressRange, _address_value(), _address_value(), st.booleans())


@cache
def ipranges() -> st.SearchStrategy[IpRange]:
    optional = st.one_of(st.none(), address_ranges())
    return st.builds(IpRange, optional, optional).filter(
        lambda match: match.src is not None or match.dst is not None
    )


@cache
@st.composite
def lengths(draw: st.DrawFn) -> Length:
    low = draw(st.sampled_from(LENGTHS))
    high = draw(st.sampled_from([low, *(value for value in LENGTHS if value > low)]))
    return Length(low, high, draw(st.booleans()))


@cache
@st.composite
def ttls(draw: st.DrawFn) -> Ttl:
    op = draw(st.sampled_from(("eq", "lt", "gt")))
    return Ttl(op, draw(st.sampled_from(TTLS)), op == "eq" and draw(st.booleans()))


@cache
def pkttypes() -> st.SearchStrategy[PktType]:
    return st.builds(PktType, st.sampled_from(PKT_TYPES), st.booleans())


@cache
def marks() -> st.SearchStrategy[Mark]:
    masks = st.sampled_from((0xFFFFFFFF, 0xFF, 1, 0))
    return st.builds(Mark, st.sampled_from(MARKS), masks, st.booleans())


@cache
def comments() -> st.SearchStrategy[Comment]:
    return st.builds(Comment, st.sampled_from(COMMENTS))


_ONE_IN = {n: st.integers(0, n - 1) for n in (4, 5, 6)}  # draw(_ONE_IN[4]) == 0: a 1 in 4 chance
_PROTOCOLS = st.one_of(st.none(), st.sampled_from(PROTOCOLS))
_BOOLEANS = st.booleans()


@st.composite
def rules(draw: st.DrawFn, chain: str, callees: tuple[str, ...]) -> Rule:
    """One rule for `chain` that may jump or go to `callees`. Matches come in the order
    iptables-save prints them: addresses, interfaces, protocol, fragment, then extensions."""
    matches: list[Match] = []
    if draw(_ONE_IN[4]) == 0:
        matches.append(draw(addresses("src")))
    if draw(_ONE_IN[4]) == 0:
        matches.append(draw(addresses("dst")))
    if chain != "OUTPUT" and draw(_ONE_IN[5]) == 0:
        matches.append(draw(interfaces("in")))
    if chain != "INPUT" and draw(_ONE_IN[5]) == 0:
        matches.append(draw(interfaces("out")))
    protocol = draw(_PROTOCOLS)
    protocol_negated = protocol is not None and draw(_ONE_IN[6]) == 0
    if protocol is not None:
        matches.append(Protocol(protocol, protocol_negated))
    if draw(_ONE_IN[6]) == 0:
        matches.append(Fragment(draw(_BOOLEANS)))
    matches += draw(_extension_lists(None if protocol_negated else protocol))
    return Rule(tuple(matches), draw(targets(callees)))


@cache
def _rule_lists(
    chain: str, callees: tuple[str, ...], max_rules: int
) -> st.SearchStrategy[list[Rule]]:
    return st.lists(rules(chain, callees), max_size=max_rules)


@cache
def _extension_lists(protocol: int | None) -> st.SearchStrategy[list[Match]]:
    """Up to two extension matches for a rule with `-p protocol` (None: none, or negated);
    the protocol's own match weighs more, as it is what most rules use."""
    extensions: list[st.SearchStrategy[Match]] = [
        ipranges(), lengths(), ttls(), pkttypes(), marks(), comments(),
    ]  # fmt: skip
    if protocol == IPPROTO_TCP:
        extensions += [tcp_matches()] * 4
    elif protocol == IPPROTO_UDP:
        extensions += [udp_matches()] * 4
    elif protocol == IPPROTO_ICMP:
        extensions += [icmp_matches()] * 4
    if protocol in PORTED_PROTOCOLS:
        extensions += [multiports()] * 2
    return st.lists(st.one_of(extensions), max_size=2)


@cache
def targets(callees: tuple[str, ...]) -> st.SearchStrategy[Target | None]:
    simple: st.SearchStrategy[Target | None] = st.sampled_from((Accept(), Drop(), Return(), None))
    if not callees:
        return simple
    names = st.sampled_from(callees)
    return st.one_of(simple, st.builds(Jump, names), st.builds(Goto, names))


_POLICIES = st.sampled_from(("ACCEPT", "DROP"))


@cache
def _chain_names(most: int) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(CHAIN_NAMES), max_size=most, unique=True)


@st.composite
def rulesets(draw: st.DrawFn, max_user_chains: int = 3, max_rules: int = 4) -> Ruleset:
    """A valid filter table: policies ACCEPT or DROP, up to `max_user_chains` user chains and up
    to `max_rules` rules per chain. A chain only jumps or goes to user chains created after it."""
    ruleset = Ruleset()
    names = draw(_chain_names(max_user_chains))
    for name in names:
        ruleset.add_chain(name)
    for builtin in ("INPUT", "FORWARD", "OUTPUT"):
        chain: Chain = ruleset.chains[builtin]
        chain.policy = draw(_POLICIES)
        chain.rules = draw(_rule_lists(builtin, tuple(names), max_rules))
    for position, name in enumerate(names):
        later = tuple(names[position + 1 :])
        ruleset.chains[name].rules = draw(_rule_lists(name, later, max_rules))
    ruleset.validate()
    return ruleset


# ---------------------------------------------------------------------------------------------
# Packets


_PORTS = st.sampled_from(PORTS)
_TCP_FLAGS = st.one_of(st.sampled_from((0x02, 0x12, 0x10, 0x11, 0x04, 0x18)), st.integers(0, 0xFF))
_ICMP_TYPES = st.sampled_from(ICMP_TYPES)
_ICMP_CODES = st.sampled_from(ICMP_CODES)
_PACKET_PROTOCOLS = st.sampled_from(PROTOCOLS)
_PAYLOADS = st.binary(max_size=24)
_TOS = st.sampled_from((0, 0x10, 0xB8))
_IDS = st.integers(1, 0xFFFF)  # not 0: the kernel fills a zero id in on OUTPUT
_OPTION_WORDS = st.sampled_from((0, 0, 0, 0, 1, 2))
_TRAILERS = st.binary(min_size=1, max_size=6)
# (fragment offset, more fragments): mostly whole datagrams, then first, second (offset 1:
# the "evil" TCP case), later and last fragments.
_FRAGMENTS = st.sampled_from(
    ((0, False),) * 6 + ((0, True), (1, True), (1, False), (2, False), (3, True), (185, False))
)


@cache
def _binary(low: int, high: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=low, max_size=high)


@cache
def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


T = TypeVar("T")


@cache
def _sampled(values: tuple[T, ...]) -> st.SearchStrategy[T]:
    return st.sampled_from(values)


def _ports(draw: st.DrawFn) -> bytes:
    return draw(_PORTS).to_bytes(2, "big") + draw(_PORTS).to_bytes(2, "big")


def _transport(draw: st.DrawFn, protocol: int, payload: bytes) -> bytes:
    """A complete transport header for `protocol` followed by `payload`."""
    if protocol == IPPROTO_TCP:
        header = (
            _ports(draw)
            + draw(_binary(8, 8))  # sequence and acknowledgment numbers
            + bytes([0x50, draw(_TCP_FLAGS)])  # data offset 5 words, flags
            + b"\xff\xff\x00\x00\x00\x00"  # window, checksum (never read), urgent pointer
        )
        return header + payload
    if protocol in (IPPROTO_UDP, IPPROTO_UDPLITE):
        return _ports(draw) + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    if protocol == IPPROTO_ICMP:
        kind, code = draw(_ICMP_TYPES), draw(_ICMP_CODES)
        return bytes([kind, code]) + b"\0\0" + draw(_binary(4, 4)) + payload
    if protocol in PORTED_PROTOCOLS:
        return _ports(draw) + draw(_binary(4, 8)) + payload
    return draw(_binary(4, 12)) + payload


@st.composite
def packets(draw: st.DrawFn, chain: str) -> bytes:
    """An IPv4 packet (from the IP header on, valid header checksum) for the netfilter
    oracle's `chain`: TCP, UDP, ICMP or another protocol, sometimes a first or a later
    fragment (not for INPUT), sometimes with its transport header cut short, sometimes with
    NOP options or bytes beyond the IP total length (as a frame's padding)."""
    protocol = draw(_PACKET_PROTOCOLS)
    source = draw(_sampled(SOURCES[chain]))
    destination = draw(_sampled(DESTINATIONS[chain]))
    low_ttl = 2 if chain == "FORWARD" else 0  # ip_forward never lets TTL <= 1 reach FORWARD
    ttl = draw(_sampled(tuple(ttl for ttl in (*TTLS, 3, 66) if ttl >= low_ttl)))
    offset, more = (0, False) if chain == "INPUT" else draw(_FRAGMENTS)
    if offset:
        # A later fragment carries the middle of a datagram: bytes that look like ports.
        transport = draw(_binary(0, 24))
    else:
        transport = _transport(draw, protocol, draw(_PAYLOADS))
        if draw(_ONE_IN[6]) == 0:
            transport = transport[: draw(_integers(0, min(len(transport), 20)))]
    words = draw(_OPTION_WORDS)
    # NOPs, then EOL last: the kernel rewrites anything after an EOL.
    options = (b"\x01" * (4 * words - 1) + b"\x00") if words else b""
    header_length = 20 + len(options)
    flags = (0x2000 if more else 0) | offset
    if not (more or offset) and draw(_ONE_IN[4]) == 0:
        flags |= 0x4000  # DF
    header = (
        bytes([0x40 | header_length // 4, draw(_TOS)])
        + (header_length + len(transport)).to_bytes(2, "big")
        + draw(_IDS).to_bytes(2, "big")
        + flags.to_bytes(2, "big")
        + bytes([ttl, protocol])
        + b"\0\0"
        + source.packed
        + destination.packed
        + options
    )
    trailer = b""
    if chain != "OUTPUT" and draw(_ONE_IN[6]) == 0:
        trailer = draw(_TRAILERS)
    return with_checksum(header + transport) + trailer
