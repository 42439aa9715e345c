"""The reference evaluator: what the kernel's ipt_do_table does with one IPv4 packet.

It is the oracle generated programs are checked against, so it follows the kernel rather than
intuition: a rule's counter moves when all its matches match, jump and RETURN rules included;
jumps push a return position and gotos do not; RETURN (or the end of a user chain) with nothing
to return to applies the built-in chain's policy; the tcp, udp, icmp and multiport matches never
match a non-first fragment, and when the transport header they need is cut short they drop the
packet on the spot ("hotdrop"), as does the tcp match for a fragment at offset 1.
"""

from dataclasses import dataclass, field
from typing import Literal

from codegen.rules.model import (
    Accept,
    Address,
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
    Protocol,
    Return,
    Rule,
    Ruleset,
    TcpMatch,
    Ttl,
    UdpMatch,
)
from codegen.rules.names import BUILTIN_CHAINS, PKT_TYPES

# skb->pkt_type values a caller may give (PACKET_* in linux/if_packet.h).
PACKET_TYPES = {
    "host": 0,
    "unicast": 0,
    "broadcast": 1,
    "multicast": 2,
    "otherhost": 3,
    "outgoing": 4,
    "loopback": 5,
}
_PACKET_BROADCAST = 1
_PACKET_MULTICAST = 2
_PACKET_LOOPBACK = 5


class PacketError(ValueError):
    """The bytes are not an IPv4 packet the kernel would hand to netfilter."""


Position = tuple[str, int | Literal["policy"]]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome for one packet.

    `deciding` is the rule that gave the verdict as (chain, 1-based index), or
    (built-in chain, "policy"); for a hotdrop it is the rule whose match dropped the packet.
    `counters` maps each rule (and policy) whose counter moved to (packets, bytes) added."""

    verdict: Literal["ACCEPT", "DROP"]
    deciding: Position
    counters: dict[Position, tuple[int, int]] = field(default_factory=dict)
    hotdrop: bool = False


@dataclass(frozen=True, slots=True)
class _Packet:
    data: bytes  # trimmed to the IP total length, as ip_rcv leaves the skb
    saddr: int
    daddr: int
    protocol: int
    ttl: int
    total_length: int
    fragment_offset: int  # in 8-byte units, as par->fragoff
    transport: int  # offset of the transport header (ihl * 4)
    in_device: str
    out_device: str
    mark: int
    pkt_type: int


class _HotDrop(Exception):
    pass


def _read_packet(
    packet: bytes, in_iface: str | None, out_iface: str | None, mark: int, pkt_type: str
) -> _Packet:
    if len(packet) < 20:
        raise PacketError(f"packet is {len(packet)} bytes, shorter than an IPv4 header")
    version, ihl = packet[0] >> 4, packet[0] & 0x0F
    if version != 4:
        raise PacketError(f"IP version {version}, not 4")
    if ihl < 5:
        raise PacketError(f"IP header length {ihl * 4} is below 20")
    total_length = int.from_bytes(packet[2:4], "big")
    if total_length > len(packet):
        raise PacketError(f"IP total length {total_length} exceeds the {len(packet)} bytes given")
    if total_length < ihl * 4:
        raise PacketError(f"IP total length {total_length} is shorter than its header")
    for name, device in (("in_iface", in_iface), ("out_iface", out_iface)):
        if device is not None and len(device) > 15:
            raise ValueError(f"{name} {device!r} is longer than 15 characters")
    if not 0 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark {mark} is not a 32-bit value")
    if pkt_type not in PACKET_TYPES:
        raise ValueError(f"pkt_type must be one of {', '.join(PACKET_TYPES)}, not {pkt_type!r}")
    return _Packet(
        data=bytes(packet[:total_length]),
        saddr=int.from_bytes(packet[12:16], "big"),
        daddr=int.from_bytes(packet[16:20], "big"),
        protocol=packet[9],
        ttl=packet[8],
        total_length=total_length,
        fragment_offset=int.from_bytes(packet[6:8], "big") & 0x1FFF,
        transport=ihl * 4,
        in_device=in_iface or "",
        out_device=out_iface or "",
        mark=mark,
        pkt_type=PACKET_TYPES[pkt_type],
    )


def _transport(packet: _Packet, size: int) -> bytes:
    """skb_header_pointer for the first `size` transport bytes; a short packet is hotdropped."""
    header = packet.data[packet.transport : packet.transport + size]
    if len(header) < size:
        raise _HotDrop
    return header


def _ports(header: bytes) -> tuple[int, int]:
    return int.from_bytes(header[0:2], "big"), int.from_bytes(header[2:4], "big")


def _match(match: Match, packet: _Packet) -> bool:
    if isinstance(match, Address):
        return match.matches(packet.saddr if match.direction == "src" else packet.daddr)
    if isinstance(match, Interface):
        return match.matches(packet.in_device if match.direction == "in" else packet.out_device)
    if isinstance(match, Protocol):
        if match.number == 0:
            return True
        return (packet.protocol == match.number) != match.negated
    if isinstance(match, Fragment):
        return (packet.fragment_offset != 0) != match.negated
    if isinstance(match, TcpMatch):
        if packet.fragment_offset != 0:
            # xt_tcpudp: an offset-1 fragment could rewrite the flags of the first one.
            if packet.fragment_offset == 1:
                raise _HotDrop
            return False
        header = _transport(packet, 20)
        sport, dport = _ports(header)
        flags = match.flags
        return (
            match.sport.matches(sport)
            and match.dport.matches(dport)
            and ((header[13] & flags.mask) == flags.compare) != flags.negated
        )
    if isinstance(match, UdpMatch):
        if packet.fragment_offset != 0:
            return False
        sport, dport = _ports(_transport(packet, 8))
        return match.sport.matches(sport) and match.dport.matches(dport)
    if isinstance(match, IcmpMatch):
        if packet.fragment_offset != 0:
            return False
        header = _transport(packet, 8)  # sizeof(struct icmphdr)
        hit = match.type == 0xFF or (
            header[0] == match.type and match.code_min <= header[1] <= match.code_max
        )
        return hit != match.negated
    if isinstance(match, Multiport):
        if packet.fragment_offset != 0:
            return False
        sport, dport = _ports(_transport(packet, 4))
        return match.matches(sport, dport)
    if isinstance(match, IpRange):
        return (match.src is None or match.src.matches(packet.saddr)) and (
            match.dst is None or match.dst.matches(packet.daddr)
        )
    if isinstance(match, Length):
        return match.matches(packet.total_length)
    if isinstance(match, Ttl):
        return match.matches(packet.ttl)
    if isinstance(match, PktType):
        kind = packet.pkt_type
        if kind == _PACKET_LOOPBACK:
            # xt_pkttype reclassifies looped-back packets by destination address.
            kind = _PACKET_MULTICAST if packet.daddr >> 28 == 0xE else _PACKET_BROADCAST
        return (kind == PKT_TYPES[match.type]) != match.negated
    if isinstance(match, Mark):
        return match.matches(packet.mark)
    if isinstance(match, Comment):
        return True
    raise TypeError(f"cannot evaluate match {match!r}")


def _rule_matches(rule: Rule, packet: _Packet) -> bool:
    # The kernel checks the IP header part (ip_packet_match) before the extension matches,
    # whatever order the model lists them in; the order matters for hotdrops.
    ip_part = [m for m in rule.matches if isinstance(m, Address | Interface | Protocol | Fragment)]
    extensions = [m for m in rule.matches if not isinstance(m, Address | Interface | Protocol)]
    extensions = [m for m in extensions if not isinstance(m, Fragment)]
    return all(_match(m, packet) for m in ip_part) and all(_match(m, packet) for m in extensions)


def evaluate(
    ruleset: Ruleset,
    packet: bytes,
    chain: str,
    in_iface: str | None,
    out_iface: str | None,
    *,
    mark: int = 0,
    pkt_type: str = "host",
) -> Evaluation:
    """Run `packet` (IPv4, from the IP header on) through built-in `chain` as ipt_do_table
    would. The rule set is not changed; the counters that moved are in the result."""
    if chain not in BUILTIN_CHAINS or chain not in ruleset.chains:
        raise ValueError(f"chain must be one of {', '.join(BUILTIN_CHAINS)}, not {chain!r}")
    parsed = _read_packet(packet, in_iface, out_iface, mark, pkt_type)
    counters: dict[Position, tuple[int, int]] = {}

    def count(position: Position) -> None:
        packets, size = counters.get(position, (0, 0))
        counters[position] = (packets + 1, size + parsed.total_length)

    def policy() -> Evaluation:
        position: Position = (chain, "policy")
        count(position)
        verdict = ruleset.chains[chain].policy
        assert verdict in ("ACCEPT", "DROP")
        return Evaluation(verdict, position, counters)

    stack: list[tuple[str, int]] = []
    current, index = chain, 0
    # Every step moves forward in a chain or enters a chain; loops are refused by validation,
    # and this bound keeps a malformed model from hanging the caller.
    budget = 1 + sum(len(c.rules) + 1 for c in ruleset.chains.values()) * (len(ruleset.chains) + 1)
    for _ in range(budget):
        rules = ruleset.chains[current].rules
        if index >= len(rules):
            if current == chain and not stack:
                return policy()
            # The end of a user chain is an unconditional RETURN.
            if not stack:
                return policy()
            current, index = stack.pop()
            index += 1
            continue
        rule = rules[index]
        position: Position = (current, index + 1)
        try:
            matched = _rule_matches(rule, parsed)
        except _HotDrop:
            return Evaluation("DROP", position, counters, hotdrop=True)
        if not matched:
            index += 1
            continue
        count(position)
        target = rule.target
        if target is None:
            index += 1
        elif isinstance(target, Accept):
            return Evaluation("ACCEPT", position, counters)
        elif isinstance(target, Drop):
            return Evaluation("DROP", position, counters)
        elif isinstance(target, Return):
            if not stack:
                return policy()
            current, index = stack.pop()
            index += 1
        elif isinstance(target, Jump):
            stack.append((current, index))
            current, index = target.chain, 0
        elif isinstance(target, Goto):
            current, index = target.chain, 0
        else:
            raise TypeError(f"cannot evaluate target {target!r}")
    raise RuntimeError("evaluation did not end: the rule set has a loop (run validate first)")
