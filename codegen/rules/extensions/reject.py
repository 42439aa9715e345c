"""`-j REJECT [--reject-with TYPE]` (libipt_REJECT.c, ipt_REJECT.c and nf_reject_ipv4.c): drop
the packet and answer it with an ICMP destination unreachable of some code, or a TCP RST.

The answer is recorded, not built: `act` says what the kernel would send for a packet, rate
limits aside (icmp_ratelimit allows one error a second per peer), with the packet's
checksums taken as given (CHECKSUM_NONE, as for a frame injected with scapy; a local socket's
CHECKSUM_PARTIAL traffic is not verified by the kernel). A destination that routes as a
subnet broadcast is not known here; only 255.255.255.255 and multicast are.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import Memory, require_protocol
from codegen.rules.extensions.limit import seconds_to_jiffies
from codegen.rules.extensions.target_base import TargetAction, TargetExtension
from codegen.rules.icmp_rate import IcmpRateLimiter
from codegen.rules.model import ExtensionTarget, Rule
from codegen.rules.names import (
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
)
from codegen.rules.packet import PACKET_TYPES, Packet
from codegen.rules.routes import BROADCAST, STANDIN_ROUTES
from codegen.rules.syntax import Line, OptionContext, TargetParser, Token

RejectType = Literal[
    "icmp-net-unreachable",
    "icmp-host-unreachable",
    "icmp-proto-unreachable",
    "icmp-port-unreachable",
    "icmp-net-prohibited",
    "icmp-host-prohibited",
    "tcp-reset",
    "icmp-admin-prohibited",
]
# libipt_REJECT's reject_table, in its order (the order its prefix search goes in): name,
# alias, enum ipt_reject_with, and the ICMP destination unreachable code sent (None: a RST).
REJECT_TYPES: tuple[tuple[RejectType, str, int, int | None], ...] = (
    ("icmp-net-unreachable", "net-unreach", 0, 0),
    ("icmp-host-unreachable", "host-unreach", 1, 1),
    ("icmp-proto-unreachable", "proto-unreach", 2, 2),
    ("icmp-port-unreachable", "port-unreach", 3, 3),
    ("icmp-net-prohibited", "net-prohib", 5, 9),
    ("icmp-host-prohibited", "host-prohib", 6, 10),
    ("tcp-reset", "tcp-rst", 7, None),
    ("icmp-admin-prohibited", "admin-prohib", 8, 13),
)
_VALUES = {name: value for name, _, value, _ in REJECT_TYPES}
REJECT_WITH: dict[str, int] = dict(_VALUES)  # the ipt_reject_with value of each type
_NAMES = {value: name for name, _, value, _ in REJECT_TYPES}
DEFAULT: RejectType = "icmp-port-unreachable"

# ICMP types icmp_send takes for errors (icmp_pointers[].error, and every type past
# NR_ICMP_TYPES): it never answers an error with an error.
_ICMP_ERRORS = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12})
NR_ICMP_TYPES = 18
IPPROTO_GRE, IPPROTO_ESP, IPPROTO_AH = 47, 50, 51
# nf_reject_verify_csum: protocols whose checksum the kernel does not check before answering.
_UNVERIFIED = frozenset(
    {IPPROTO_GRE, IPPROTO_AH, IPPROTO_ESP, IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_DCCP}
)


@dataclass(frozen=True, slots=True)
class Reject(ExtensionTarget):
    """`-j REJECT --reject-with TYPE`: DROP, answering with `reply` where the kernel can."""

    reply: RejectType = DEFAULT

    def __post_init__(self) -> None:
        if self.reply not in _VALUES:
            raise ValueError(f"reject type must be one of {', '.join(_VALUES)}: {self.reply!r}")


class IptRejectInfo(ctypes.Structure):
    _fields_ = [("with_", ctypes.c_uint)]  # enum ipt_reject_with


class RejectParser(TargetParser):
    name = "REJECT"
    options = {"reject-with": ("with", True)}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.reply: RejectType = DEFAULT

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error('REJECT: option "--reject-with" can only be used once')
        assert ctx.value is not None
        self.reply = reject_type(ctx)

    def finish(self, line: Line) -> Reject:
        return Reject(self.reply)


def reject_type(ctx: OptionContext) -> RejectType:
    """REJECT_parse: a name or alias, any case, or a prefix of one (iptables takes the first of
    the table a prefix fits; we refuse a prefix that fits two, and the empty word, which
    iptables reads as icmp-net-unreachable)."""
    assert ctx.value is not None
    text = ctx.value.text.lower()
    known = ", ".join(f"{name} ({alias})" for name, alias, _, _ in REJECT_TYPES)
    if not text:
        raise ctx.error(f"empty reject type (one of {known})", at_value=True)
    exact = [name for name, alias, _, _ in REJECT_TYPES if text in (name, alias)]
    fits = [
        name
        for name, alias, _, _ in REJECT_TYPES
        if name.startswith(text) or alias.startswith(text)
    ]
    found = exact or fits
    if len(found) == 1:
        return found[0]
    if found:
        raise ctx.error(
            f"reject type '{ctx.value.text}' is ambiguous ({', '.join(found)})", at_value=True
        )
    gone = " (echo-reply is no longer supported)" if "echo-reply".startswith(text) else ""
    raise ctx.error(f"unknown reject type '{ctx.value.text}'{gone} (one of {known})", True)


def _sum16(data: bytes, start: int = 0) -> int:
    """The ones' complement sum of `data` (padded to even length), folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum_ok(packet: Packet) -> bool:
    """nf_ip_checksum on a CHECKSUM_NONE skb: TCP and UDP with their pseudo header, any other
    protocol over its payload alone; good when the sum folds to all ones."""
    payload = packet.data[packet.transport :]
    start = 0
    if packet.protocol in (IPPROTO_TCP, IPPROTO_UDP):
        start = (packet.saddr >> 16) + (packet.saddr & 0xFFFF) + (packet.daddr >> 16)
        start += (packet.daddr & 0xFFFF) + packet.protocol + len(payload)
    return _sum16(payload, start) == 0xFFFF


def _broadcast_route(packet: Packet) -> bool:
    """RTCF_BROADCAST | RTCF_MULTICAST: the limited broadcast, a group, or a broadcast
    address of the namespace's (a subnet's: its routes, or the stand-in's)."""
    address = packet.daddr
    if address == 0xFFFFFFFF or address >> 28 == 0xE:
        return True
    routes = STANDIN_ROUTES if packet.routes is None else packet.routes
    found = routes.lookup(address)
    return found is not None and found.length == 32 and found.type == BROADCAST


def reset_sent(packet: Packet) -> bool:
    """nf_send_reset: a RST for the first fragment of a whole TCP header, not a RST itself,
    with a good checksum, to a unicast route."""
    header = packet.data[packet.transport : packet.transport + 20]
    return (
        packet.fragment_offset == 0
        and packet.protocol == IPPROTO_TCP
        and len(header) == 20
        and not header[13] & 0x04
        and _checksum_ok(packet)
        and not _broadcast_route(packet)
    )


def unreachable_sent(packet: Packet) -> bool:
    """nf_send_unreach and icmp_send: an ICMP error for the first fragment of a packet with a
    good checksum (where the protocol has one the kernel checks), sent to this host
    (PACKET_HOST) on a unicast route, unless it is itself an ICMP error."""
    if packet.fragment_offset or packet.pkt_type != PACKET_TYPES["host"]:
        return False
    if _broadcast_route(packet):
        return False
    transport = packet.data[packet.transport :]
    verify = packet.protocol not in _UNVERIFIED
    if packet.protocol == IPPROTO_UDP and len(transport) >= 8 and transport[6:8] == b"\0\0":
        verify = False  # no UDP checksum
    if verify and not _checksum_ok(packet):
        return False
    if packet.protocol == IPPROTO_ICMP:
        if not transport:
            return False
        kind = transport[0]
        if kind > NR_ICMP_TYPES or kind in _ICMP_ERRORS:
            return False
    return True


ICMP_RATE = "icmp_rate"  # the namespace's ICMP buckets, in Memory.shared


class RejectExtension(TargetExtension):
    name = "REJECT"
    revision = 0
    model = Reject
    data = IptRejectInfo
    parser = RejectParser
    terminal = True
    stateful = True  # its ICMP errors are rate limited
    examples = (
        "-j REJECT --reject-with icmp-port-unreachable",
        "-j REJECT --reject-with icmp-net-unreachable",
        "-j REJECT --reject-with icmp-host-unreachable",
        "-j REJECT --reject-with icmp-proto-unreachable",
        "-j REJECT --reject-with icmp-net-prohibited",
        "-j REJECT --reject-with icmp-host-prohibited",
        "-j REJECT --reject-with icmp-admin-prohibited",
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset",
    )

    def save(self, target: Reject) -> list[str]:
        return ["-j", "REJECT", "--reject-with", target.reply]

    def describe(self, target: Reject) -> str:
        return f" reject-with {target.reply}"

    def check(self, target: Reject, rule: Rule, chain: str) -> None:
        if target.reply == "tcp-reset":
            # reject_tg_check: "TCP_RESET invalid for non-tcp".
            require_protocol(
                rule,
                frozenset({IPPROTO_TCP}),
                "REJECT --reject-with tcp-reset needs '-p tcp' (not negated)",
            )

    def encode(self, target: Reject) -> IptRejectInfo:
        return IptRejectInfo(_VALUES[target.reply])

    def decode(self, data: IptRejectInfo) -> Reject:
        name = _NAMES.get(data.with_)
        if name is None:
            what = "echo-reply, no longer supported" if data.with_ == 4 else "not a reject type"
            raise BlobError(f"REJECT target: --reject-with value {data.with_} is {what}")
        return Reject(name)

    def act(self, target: Reject, packet: Packet) -> TargetAction:
        sent = reset_sent if target.reply == "tcp-reset" else unreachable_sent
        return TargetAction("DROP", target.reply if sent(packet) else None)

    def act_with(self, target: Reject, packet: Packet, memory: Memory) -> TargetAction:
        """`act`, with an ICMP error sent only as the namespace's ICMP rate limits allow
        (codegen.rules.icmp_rate; the buckets in `memory.shared`, made at the first error)."""
        action = self.act(target, packet)
        if action.reply is None or action.reply == "tcp-reset":
            return action
        limiter = memory.shared.get(ICMP_RATE)
        if not isinstance(limiter, IcmpRateLimiter):
            limiter = memory.shared[ICMP_RATE] = IcmpRateLimiter(memory.hz)
        now = seconds_to_jiffies(memory.time, memory.hz)
        # An OUTPUT packet (no in-device) is answered to our own socket, over loopback.
        if limiter.allows(packet.saddr, now, local=not packet.in_device):
            return action
        return TargetAction("DROP")


EXTENSION = RejectExtension()
