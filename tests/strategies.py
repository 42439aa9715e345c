"""Hypothesis strategies for differential tests: random filter tables and random IPv4 packets.

`packets(chain)` builds packets the netfilter oracle (harness.lab.netfilter) injects into `chain`
unchanged: addresses that chain can receive, valid header checksums, TCP/UDP/ICMP and other
protocols, first and later fragments (not for INPUT: the kernel reassembles those before INPUT),
transport headers cut short, NOP options, bytes beyond the IP total length.

`rulesets()` builds `Ruleset`s that iptables-legacy-restore accepts and that survive the round
trip through iptables-save text unchanged (matches in the order iptables-save prints them), with
every match kind and target of the model. User chains only jump or go to chains created after
them, so there are no loops.

A random rule seldom matches a random packet, and a differential test where every packet falls
through to the policy proves little. So rules can be aimed at traffic (`Traffic`): a rule aimed
at a packet takes most of its values from that packet (its addresses, protocol, ports, TTL,
length, ICMP type, TCP flags, devices), so it matches it, or misses it by one value.
`scenarios()` draws packets for the three chains and a rule set aimed at them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from ipaddress import IPv4Address
from typing import TypeVar

from hypothesis import strategies as st

from codegen.rules import (
    Accept,
    Address,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    Ruleset,
    Target,
)
from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.iprange import AddressRange, IpRange
from codegen.rules.extensions.length import Length
from codegen.rules.extensions.mark import Mark
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.physdev import Physdev, PortName
from codegen.rules.extensions.pkttype import PktType
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.reject import REJECT_TYPES, Reject
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.ttl import Ttl
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.validation import validate
from harness.lab.twin import (
    ALL_HOSTS,
    DESTINATIONS,
    HOST,
    HOST_BROADCAST,
    HOST_CLIENT,
    INTERFACES,
    LIMITED_BROADCAST,
    ROUTER_CLIENT,
    ROUTER_CLIENT_SIDE,
    ROUTER_SERVER_SIDE,
    SERVER,
    with_checksum,
)

CHAINS = ("INPUT", "FORWARD", "OUTPUT")
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
IPPROTO_DCCP, IPPROTO_GRE, IPPROTO_ESP, IPPROTO_SCTP, IPPROTO_UDPLITE = 33, 47, 50, 132, 136
# Protocols whose first four bytes are ports for xt_multiport.
PORTED_PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP)
PROTOCOLS = (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_GRE, IPPROTO_ESP, IPPROTO_SCTP,
             IPPROTO_UDPLITE, IPPROTO_DCCP)  # fmt: skip
# Mostly TCP, UDP and ICMP, as in real rule sets and traffic.
WEIGHTED_PROTOCOLS = (IPPROTO_TCP,) * 4 + (IPPROTO_UDP,) * 3 + (IPPROTO_ICMP,) * 2 + PROTOCOLS
PORTS = (0, 22, 53, 80, 443, 1023, 1024, 65535)
ICMP_TYPES = (0, 3, 5, 8, 11, 13)
ICMP_CODES = (0, 1, 3)
TTLS = (0, 1, 2, 63, 64, 65, 128, 254, 255)
LENGTHS = (0, 20, 28, 40, 44, 48, 60, 64, 100, 1500, 65535)
MARKS = (0, 1, 0x10, 0xFF, 0x80000000, 0xFFFFFFFF)
CHAIN_NAMES = ("alpha", "beta", "gamma_3", "d-4", "LONG_CHAIN_NAME_twenty8_char")
INTERFACE_NAMES = ("eth0", "eth1", "eth+", "e+", "lo", "eth10", "eth0.5")
COMMENTS = ("web", "two words", "it's", 'say "hi"', "back\\slash", "x" * 255)
PKT_TYPES = ("unicast", "broadcast", "multicast", "otherhost")

# Addresses that packets use, and a few neighbours so that masks and ranges cut between them.
ADDRESSES = (
    HOST_CLIENT,
    HOST,
    ROUTER_CLIENT,
    ROUTER_CLIENT_SIDE,
    ROUTER_SERVER_SIDE,
    SERVER,
    HOST_BROADCAST,
    ALL_HOSTS,
    LIMITED_BROADCAST,
    IPv4Address("198.18.0.77"),
    IPv4Address("198.18.1.77"),
    IPv4Address("198.19.255.1"),
    IPv4Address("10.0.0.1"),
)
PREFIXES = (32, 31, 30, 24, 23, 16, 15, 8, 1)
ODD_MASKS = (0xFFFF00FF, 0xFF00FF00)  # iptables accepts any mask, not only prefixes

# Where each chain's packets come from and go to (what harness.lab.twin.prepare accepts).
PACKET_SOURCES = {
    "INPUT": (HOST_CLIENT, ROUTER_CLIENT, SERVER, IPv4Address("198.18.0.77")),
    "FORWARD": (ROUTER_CLIENT, HOST_CLIENT, HOST, IPv4Address("198.19.255.1")),
    "OUTPUT": (HOST, ROUTER_CLIENT, IPv4Address("198.18.0.77")),
}
PACKET_DESTINATIONS = {
    "INPUT": (HOST, HOST, HOST, HOST_BROADCAST, LIMITED_BROADCAST, ALL_HOSTS),
    "FORWARD": (SERVER,),
    "OUTPUT": (HOST_CLIENT,),
}

T = TypeVar("T")


# Strategies are built once and cached: building them anew for every draw costs more than the
# drawing itself.
@cache
def _sampled(values: tuple[T, ...]) -> st.SearchStrategy[T]:
    return st.sampled_from(values)


@cache
def _binary(low: int, high: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=low, max_size=high)


@cache
def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


_BOOLEANS = st.booleans()
_ONE_IN = {n: st.integers(0, n - 1) for n in (2, 3, 4, 5, 6, 8)}


def _one_in(draw: st.DrawFn, n: int) -> bool:
    """True one time in `n`. Hypothesis draws 0 far more often than its share (and shrinks
    towards it), so 0 stands for the common, simpler branch."""
    return draw(_ONE_IN[n]) == n - 1


def _negated(draw: st.DrawFn) -> bool:
    # One in five: a negation mostly turns a match aimed at a packet into a miss.
    return _one_in(draw, 5)


# ---------------------------------------------------------------------------------------------
# Traffic to aim rules at


@dataclass(frozen=True)
class Aim:
    """The values of one packet as the chain it is sent through sees them."""

    chain: str
    source: int
    destination: int
    protocol: int
    ttl: int
    length: int
    fragment: bool  # fragment offset != 0
    in_iface: str | None
    out_iface: str | None
    pkt_type: str
    sport: int | None = None  # None when the first four transport bytes are not there
    dport: int | None = None
    icmp: tuple[int, int] | None = None  # (type, code)
    tcp_flags: int | None = None
    mark: int = 0

    @classmethod
    def of(cls, packet: bytes, chain: str, mark: int = 0) -> Aim:
        header_length = (packet[0] & 0x0F) * 4
        total_length = int.from_bytes(packet[2:4], "big")
        transport = packet[header_length:total_length]
        destination = IPv4Address(packet[16:20])
        kind = DESTINATIONS[chain].get(destination, "host")
        in_iface, out_iface = INTERFACES[chain]
        fragment = int.from_bytes(packet[6:8], "big") & 0x1FFF != 0
        ported = not fragment and len(transport) >= 4
        protocol = packet[9]
        return cls(
            chain=chain,
            source=int.from_bytes(packet[12:16], "big"),
            destination=int(destination),
            protocol=protocol,
            ttl=packet[8] - 1 if chain == "FORWARD" else packet[8],  # FORWARD sees it decremented
            length=total_length,
            fragment=fragment,
            in_iface=in_iface,
            out_iface=out_iface,
            pkt_type="unicast" if kind == "host" else kind,
            sport=int.from_bytes(transport[0:2], "big") if ported else None,
            dport=int.from_bytes(transport[2:4], "big") if ported else None,
            icmp=(
                (transport[0], transport[1])
                if protocol == IPPROTO_ICMP and not fragment and len(transport) >= 2
                else None
            ),
            tcp_flags=(
                transport[13] & 0x3F
                if protocol == IPPROTO_TCP and not fragment and len(transport) >= 14
                else None
            ),
            mark=mark,
        )


@dataclass(frozen=True)
class Traffic:
    """Packets to aim rules at, each with the chain it goes through."""

    aims: tuple[Aim, ...] = ()

    @classmethod
    def of(
        cls, packets: dict[str, Iterable[bytes]], marks: dict[str, Iterable[int]] | None = None
    ) -> Traffic:
        """Aims at `packets` of each chain, whose marks are `marks` (parallel lists; 0 when
        not given)."""
        aims = []
        for chain, batch in packets.items():
            chain_marks = list((marks or {}).get(chain, ()))
            for index, packet in enumerate(batch):
                mark = chain_marks[index] if index < len(chain_marks) else 0
                aims.append(Aim.of(packet, chain, mark))
        return cls(tuple(aims))

    def for_chain(self, chain: str) -> tuple[Aim, ...]:
        """Aims for a rule in `chain`: its own packets for a built-in chain, any for a user
        chain (it may be reached from any built-in)."""
        if chain in CHAINS:
            return tuple(aim for aim in self.aims if aim.chain == chain)
        return self.aims


NO_TRAFFIC = Traffic()


def _aimed(draw: st.DrawFn, pool: st.SearchStrategy[T], value: T | None) -> T:
    """Mostly the aimed-at `value` when there is one, else a value from `pool`."""
    if value is not None and not _one_in(draw, 6):
        return value
    return draw(pool)


def _near(draw: st.DrawFn, value: int, spread: tuple[int, ...], bits: int) -> int:
    return (value + draw(_sampled(spread))) % (1 << bits)


# ---------------------------------------------------------------------------------------------
# Matches. Each takes the Aim of the rule (None: not aimed) and draws its values.


_ADDRESS_VALUES = st.sampled_from(
    sorted({(int(address) + step) % (1 << 32) for address in ADDRESSES for step in (-1, 0, 1)})
)
_MASKS = st.one_of(
    st.sampled_from(PREFIXES).map(lambda bits: (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF),
    st.sampled_from(ODD_MASKS),
)


def _address(draw: st.DrawFn, direction: str, aim: Aim | None) -> Address:
    # The mask is never 0: `-s 0/0` is no match at all to the kernel and to the model.
    target = None if aim is None else aim.source if direction == "src" else aim.destination
    value = _aimed(draw, _ADDRESS_VALUES, target)
    return Address(direction, value, draw(_MASKS), _negated(draw))  # type: ignore[arg-type]


_INTERFACE_NAMES = st.sampled_from(INTERFACE_NAMES)


def _interface(draw: st.DrawFn, direction: str, aim: Aim | None) -> Interface:
    device = None if aim is None else aim.in_iface if direction == "in" else aim.out_iface
    name = _aimed(draw, _INTERFACE_NAMES, device)
    if device is not None and name == device and _one_in(draw, 3):
        name = name[:-1] + "+"  # a wildcard that still matches
    return Interface(direction, name, _negated(draw))  # type: ignore[arg-type]


_PORTS = st.sampled_from(PORTS)
_PORT_SPREAD = (1, 10, 1000)


def _port_range(draw: st.DrawFn, port: int | None) -> PortRange:
    first = _aimed(draw, _PORTS, port)
    last = first
    if _one_in(draw, 2):
        last = draw(_sampled(tuple(value for value in (*PORTS, first) if value >= first)))
        if _one_in(draw, 2):
            first = max(first - draw(_sampled(_PORT_SPREAD)), 0)
    # iptables-save drops a negated full range (`! --dport 0:65535`): the round trip would not
    # keep it, so it is never generated.
    negated = _negated(draw) and (first, last) != (0, 0xFFFF)
    return PortRange(first, last, negated)


def _optional_ports(draw: st.DrawFn, port: int | None) -> PortRange:
    return _port_range(draw, port) if _one_in(draw, 2) else PortRange()


_FLAG_BITS = st.integers(0, 0x3F)


def _tcp_flags(draw: st.DrawFn, aim: Aim | None) -> TcpFlags:
    kind = draw(_ONE_IN[4])
    if kind == 0:
        return TcpFlags()
    if kind == 1:
        return TcpFlags.syn(_negated(draw))
    mask = draw(_FLAG_BITS)
    flags = _aimed(draw, _FLAG_BITS, None if aim is None else aim.tcp_flags)
    # Usually a comparison the flags can meet (inside the mask); sometimes one they cannot.
    compare = flags & mask if not _one_in(draw, 4) else flags
    return TcpFlags(mask, compare, _negated(draw))


def _tcp(draw: st.DrawFn, aim: Aim | None) -> TcpMatch:
    sport = _optional_ports(draw, None if aim is None else aim.sport)
    dport = _optional_ports(draw, None if aim is None else aim.dport)
    return TcpMatch(sport, dport, _tcp_flags(draw, aim))


def _udp(draw: st.DrawFn, aim: Aim | None) -> UdpMatch:
    sport = _optional_ports(draw, None if aim is None else aim.sport)
    dport = _optional_ports(draw, None if aim is None else aim.dport)
    return UdpMatch(sport, dport)


_ICMP_TYPE_CODES = st.tuples(st.sampled_from((*ICMP_TYPES, 0xFF)), st.sampled_from(ICMP_CODES))


def _icmp(draw: st.DrawFn, aim: Aim | None) -> IcmpMatch:
    kind, code = _aimed(draw, _ICMP_TYPE_CODES, None if aim is None else aim.icmp)
    if kind == 0xFF or _one_in(draw, 2):
        return IcmpMatch(kind, 0, 0xFF, _negated(draw))
    return IcmpMatch(kind, code, code, _negated(draw))


_MULTIPORT_DIRECTIONS = st.sampled_from(("src", "dst", "any"))
_MULTIPORT_ENTRIES = st.integers(1, 4)


def _multiport(draw: st.DrawFn, aim: Aim | None) -> Multiport:
    direction = draw(_MULTIPORT_DIRECTIONS)
    port = None
    if aim is not None:
        port = aim.sport if direction == "src" else aim.dport
    entries = [_port_range(draw, port) for _ in range(draw(_MULTIPORT_ENTRIES))]
    ports = tuple((entry.first, entry.last) for entry in entries)
    return Multiport(direction, ports, _negated(draw))  # type: ignore[arg-type]


_ADDRESS_SPREAD = (0, 0, 1, 2, 255, -1, -2, -256)


def _address_range(draw: st.DrawFn, address: int | None) -> AddressRange:
    # first > last is allowed by iptables and matches nothing (or everything, negated).
    middle = _aimed(draw, _ADDRESS_VALUES, address)
    first = _near(draw, middle, _ADDRESS_SPREAD, 32)
    last = _near(draw, middle, _ADDRESS_SPREAD, 32)
    return AddressRange(first, last, _negated(draw))


_IPRANGE_SIDES = st.sampled_from(("src", "dst", "both"))


def _iprange(draw: st.DrawFn, aim: Aim | None) -> IpRange:
    side = draw(_IPRANGE_SIDES)
    src = dst = None
    if side in ("src", "both"):
        src = _address_range(draw, None if aim is None else aim.source)
    if side in ("dst", "both"):
        dst = _address_range(draw, None if aim is None else aim.destination)
    return IpRange(src, dst)


_LENGTHS = st.sampled_from(LENGTHS)
_SMALL_SPREAD = (0, 0, 0, 1, -1, 4)


def _length(draw: st.DrawFn, aim: Aim | None) -> Length:
    target = None if aim is None else aim.length
    low = _near(draw, _aimed(draw, _LENGTHS, target), _SMALL_SPREAD, 16)
    high = _near(draw, _aimed(draw, _LENGTHS, target), _SMALL_SPREAD, 16)
    return Length(min(low, high), max(low, high), _negated(draw))


_TTL_OPS = st.sampled_from(("eq", "lt", "gt"))
_TTLS = st.sampled_from(TTLS)
_TTL_SPREAD = {"eq": (0, 0, 0, 1, -1), "lt": (1, 1, 0, 2), "gt": (-1, -1, 0, -2)}


def _ttl(draw: st.DrawFn, aim: Aim | None) -> Ttl:
    op = draw(_TTL_OPS)
    value = _near(draw, _aimed(draw, _TTLS, None if aim is None else aim.ttl), _TTL_SPREAD[op], 8)
    return Ttl(op, value, op == "eq" and _negated(draw))  # type: ignore[arg-type]


_PKT_TYPES = st.sampled_from(PKT_TYPES)


def _pkttype(draw: st.DrawFn, aim: Aim | None) -> PktType:
    kind = _aimed(draw, _PKT_TYPES, None if aim is None else aim.pkt_type)
    return PktType(kind, _negated(draw))  # type: ignore[arg-type]


_MARKS = st.sampled_from(MARKS)
_MARK_MASKS = st.sampled_from((0xFFFFFFFF, 0xFF, 1, 0x80000001, 0))


def _mark(draw: st.DrawFn, aim: Aim | None) -> Mark:
    mask = draw(_MARK_MASKS)
    value = _aimed(draw, _MARKS, None if aim is None else aim.mark & mask)
    return Mark(value, mask, _negated(draw))


_COMMENTS = st.sampled_from(COMMENTS)


def _comment(draw: st.DrawFn, aim: Aim | None) -> Comment:
    return Comment(draw(_COMMENTS))


_BRIDGE_PORTS = st.none() | st.builds(
    PortName, st.sampled_from(("eth0", "veth+", "br0", "+")), st.booleans()
)
_PHYSDEV_FLAG = st.sampled_from((None, True, False))


def _physdev(draw: st.DrawFn, aim: Aim | None) -> Physdev:
    """Any -m physdev valid in every chain: an output port or --physdev-is-out only beside
    --physdev-is-bridged, as the kernel insists for OUTPUT. None of the labs bridges, so it
    matches when every option is negated."""
    bridged = draw(_PHYSDEV_FLAG)
    out_port, is_out = (draw(_BRIDGE_PORTS), draw(_PHYSDEV_FLAG)) if bridged else (None, None)
    match = Physdev(draw(_BRIDGE_PORTS), out_port, draw(_PHYSDEV_FLAG), is_out, bridged)
    return match if match.flags[0] else Physdev(is_bridged=False)


Extension = Callable[[st.DrawFn, Aim | None], Match]
# Not conntrack or state: both generators refuse them until the programs track connections.
_ANY_PROTOCOL: tuple[Extension, ...] = (
    _iprange,
    _length,
    _ttl,
    _pkttype,
    _mark,
    _comment,
    _physdev,
)


@cache
def _extensions(protocol: int | None) -> st.SearchStrategy[Extension]:
    """Which extension match to add to a rule with `-p protocol` (None: none, or negated); the
    protocol's own match weighs more, as it is what most rules use."""
    own: tuple[Extension, ...] = ()
    if protocol == IPPROTO_TCP:
        own = (_tcp,) * 4
    elif protocol == IPPROTO_UDP:
        own = (_udp,) * 4
    elif protocol == IPPROTO_ICMP:
        own = (_icmp,) * 4
    if protocol in PORTED_PROTOCOLS:
        own += (_multiport,) * 2
    return st.sampled_from(own + _ANY_PROTOCOL)


_PROTOCOLS = st.sampled_from(WEIGHTED_PROTOCOLS)
_EXTENSION_COUNTS = st.sampled_from((0, 1, 1, 1, 2))


# ---------------------------------------------------------------------------------------------
# Rules and rule sets


@cache
def targets(callees: tuple[str, ...]) -> st.SearchStrategy[Target | None]:
    """Any target: ACCEPT, DROP, RETURN, none (count and go on), or a jump or goto to one of
    `callees`."""
    simple: st.SearchStrategy[Target | None] = st.sampled_from((Accept(), Drop(), Return(), None))
    if not callees:
        return simple
    names = st.sampled_from(callees)
    return st.one_of(simple, st.builds(Jump, names), st.builds(Goto, names))


def _rule(draw: st.DrawFn, chain: str, callees: tuple[str, ...], traffic: Traffic) -> Rule:
    aims = traffic.for_chain(chain)
    aim = draw(_sampled(aims)) if aims and not _one_in(draw, 6) else None
    matches: list[Match] = []
    if _one_in(draw, 4):
        matches.append(_address(draw, "src", aim))
    if _one_in(draw, 4):
        matches.append(_address(draw, "dst", aim))
    if chain != "OUTPUT" and _one_in(draw, 5):
        matches.append(_interface(draw, "in", aim))
    if chain != "INPUT" and _one_in(draw, 5):
        matches.append(_interface(draw, "out", aim))
    protocol = None
    if not _one_in(draw, 3):
        protocol = _aimed(draw, _PROTOCOLS, None if aim is None else aim.protocol)
    protocol_negated = protocol is not None and _one_in(draw, 6)
    if protocol is not None:
        matches.append(Protocol(protocol, protocol_negated))
    if _one_in(draw, 6):
        fragment = _aimed(draw, _BOOLEANS, None if aim is None else aim.fragment)
        # `-f` for a fragment, `! -f` for the others; a negation turns it into a miss.
        matches.append(Fragment(negated=(not fragment) != _negated(draw)))
    choices = _extensions(None if protocol_negated else protocol)
    for _ in range(draw(_EXTENSION_COUNTS)):
        matches.append(draw(choices)(draw, aim))
    if _one_in(draw, 6):  # REJECT: a drop, with the answer the kernel sends
        tcp = protocol == IPPROTO_TCP and not protocol_negated
        return Rule(tuple(matches), Reject(draw(_REJECT_TYPES if tcp else _ICMP_REJECT_TYPES)))
    if _one_in(draw, 8):  # MARK: a new mark, which later `-m mark` rules see, then on
        return Rule(tuple(matches), MarkTarget(draw(_MARKS), draw(_MARK_MASKS)))
    return Rule(tuple(matches), draw(targets(callees)))


_REJECT_TYPES = st.sampled_from([name for name, *_ in REJECT_TYPES])
# tcp-reset is for `-p tcp` rules only (ipt_REJECT's checkentry)
_ICMP_REJECT_TYPES = st.sampled_from([name for name, *_, code in REJECT_TYPES if code is not None])


@st.composite
def rules(
    draw: st.DrawFn, chain: str, callees: tuple[str, ...] = (), traffic: Traffic = NO_TRAFFIC
) -> Rule:
    """One rule for `chain` that may jump or go to `callees`, usually aimed at one of the
    packets of `traffic` that `chain` sees. Matches come in the order iptables-save prints
    them: addresses, interfaces, protocol, fragment, then extensions."""
    return _rule(draw, chain, callees, traffic)


_POLICIES = st.sampled_from(("ACCEPT", "DROP"))


@cache
def _chain_names(most: int) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(CHAIN_NAMES), max_size=most, unique=True)


@cache
def _rule_counts(most: int) -> st.SearchStrategy[int]:
    # Hypothesis favours the first value: a few rules, rather than an empty chain.
    return st.sampled_from((min(3, most), *range(most + 1)))


@st.composite
def rulesets(
    draw: st.DrawFn,
    max_user_chains: int = 3,
    max_rules: int = 5,
    traffic: Traffic = NO_TRAFFIC,
) -> Ruleset:
    """A valid filter table: policies ACCEPT or DROP, up to `max_user_chains` user chains and up
    to `max_rules` rules per chain, aimed at `traffic` when given. A chain only jumps or goes
    to user chains created after it, so there are no loops."""
    ruleset = Ruleset()
    names = draw(_chain_names(max_user_chains))
    for name in names:
        ruleset.add_chain(name)
    for builtin in CHAINS:
        ruleset.chains[builtin].policy = draw(_POLICIES)  # type: ignore[assignment]
    for position, name in enumerate((*CHAINS, *names)):
        callees = tuple(names) if name in CHAINS else tuple(names[position - len(CHAINS) + 1 :])
        count = draw(_rule_counts(max_rules))
        ruleset.chains[name].rules = [_rule(draw, name, callees, traffic) for _ in range(count)]
    validate(ruleset)
    return ruleset


# ---------------------------------------------------------------------------------------------
# Packets


_TCP_FLAGS = st.one_of(st.sampled_from((0x02, 0x12, 0x10, 0x11, 0x04, 0x18)), st.integers(0, 0xFF))
_ICMP_TYPES = st.sampled_from(ICMP_TYPES)
_ICMP_CODES = st.sampled_from(ICMP_CODES)
_PAYLOADS = st.binary(max_size=24)
_TOS = st.sampled_from((0, 0x10, 0xB8))
_IDS = st.integers(1, 0xFFFF)  # not 0: the kernel fills a zero id in on OUTPUT
_OPTION_WORDS = st.sampled_from((0, 0, 0, 0, 1, 2))
_TRAILERS = st.binary(min_size=1, max_size=6)
# (fragment offset, more fragments): mostly whole datagrams, then first, second (offset 1:
# the "evil" TCP case), later and last fragments.
_FRAGMENTS = st.sampled_from(
    ((0, False),) * 18 + ((0, True), (1, True), (1, False), (2, False), (3, True), (185, False))
)


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
    protocol = draw(_sampled(WEIGHTED_PROTOCOLS))
    source = draw(_sampled(PACKET_SOURCES[chain]))
    destination = draw(_sampled(PACKET_DESTINATIONS[chain]))
    low_ttl = 2 if chain == "FORWARD" else 0  # ip_forward never lets TTL <= 1 reach FORWARD
    ttl = draw(_sampled(tuple(ttl for ttl in (*TTLS, 3, 66) if ttl >= low_ttl)))
    offset, more = (0, False) if chain == "INPUT" else draw(_FRAGMENTS)
    if offset:
        # A later fragment carries the middle of a datagram: bytes that look like ports.
        transport = draw(_binary(0, 24))
    else:
        transport = _transport(draw, protocol, draw(_PAYLOADS))
        if _one_in(draw, 6):
            transport = transport[: draw(_integers(0, min(len(transport), 20)))]
    words = draw(_OPTION_WORDS)
    # NOPs, then EOL last: the kernel rewrites anything after an EOL.
    options = (b"\x01" * (4 * words - 1) + b"\x00") if words else b""
    header_length = 20 + len(options)
    flags = (0x2000 if more else 0) | offset
    if not (more or offset) and _one_in(draw, 4):
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
    if chain != "OUTPUT" and _one_in(draw, 6):
        trailer = draw(_TRAILERS)
    return with_checksum(header + transport) + trailer


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """A filter table, the packets to send through each built-in chain, and their marks
    (skb->mark; always 0 but for OUTPUT, where the sending socket can set one)."""

    ruleset: Ruleset
    packets: dict[str, list[bytes]]
    marks: dict[str, list[int]]

    def cases(self) -> Iterator[tuple[str, bytes, int]]:
        """(chain, packet, mark) for every packet."""
        for chain, batch in self.packets.items():
            for packet, mark in zip(batch, self.marks[chain], strict=True):
                yield chain, packet, mark


_OUTPUT_MARKS = st.one_of(st.sampled_from(MARKS), st.integers(0, 0xFFFFFFFF))


@st.composite
def scenarios(draw: st.DrawFn, packets_per_chain: int = 2, max_user_chains: int = 3) -> Scenario:
    """`packets_per_chain` packets for each of INPUT, FORWARD and OUTPUT, OUTPUT ones with
    random marks, and a filter table aimed at them: a built-in chain's rules at its own
    packets, user chains' at any."""
    traffic = {chain: [draw(packets(chain)) for _ in range(packets_per_chain)] for chain in CHAINS}
    marks = {chain: [0] * packets_per_chain for chain in CHAINS}
    marks["OUTPUT"] = [draw(_OUTPUT_MARKS) for _ in range(packets_per_chain)]
    ruleset = draw(rulesets(max_user_chains=max_user_chains, traffic=Traffic.of(traffic, marks)))
    return Scenario(ruleset, traffic, marks)
