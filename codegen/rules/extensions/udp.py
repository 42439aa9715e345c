"""`-m udp` (libxt_udp.c, xt_tcpudp.c): source and destination ports; loaded by `-p udp`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions import ports
from codegen.rules.extensions.base import MatchExtension, require_protocol
from codegen.rules.extensions.ports import PortRange
from codegen.rules.model import ExtensionMatch, Rule
from codegen.rules.names import IPPROTO_UDP
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line

UDP_HEADER = 8  # sizeof(struct udphdr)
XT_UDP_INV_SRCPT = 0x01
XT_UDP_INV_DSTPT = 0x02
XT_UDP_INV_MASK = 0x03


@dataclass(frozen=True, slots=True)
class UdpMatch(ExtensionMatch):
    """`-m udp`."""

    sport: PortRange = PortRange()
    dport: PortRange = PortRange()


class XtUdp(ctypes.Structure):
    _fields_ = [
        ("spts", ctypes.c_uint16 * 2),
        ("dpts", ctypes.c_uint16 * 2),
        ("invflags", ctypes.c_uint8),
    ]


class UdpParser(ports.PortsParser):
    name = "udp"

    def finish(self, line: Line) -> UdpMatch:
        return UdpMatch(self.sport, self.dport)


class Udp(MatchExtension):
    name = "udp"
    revision = 0
    model = UdpMatch
    data = XtUdp
    parser = UdpParser
    implicit = True
    can_hotdrop = True
    examples = (
        "-p udp -m udp --sport 53 --dport 1024:65535",
        "-p udp -m udp ! --sport 0:1023 ! --dport 53",
        "-p udp -m udp",
    )

    def save(self, match: UdpMatch) -> list[str]:
        return [
            "-m",
            "udp",
            *ports.save_ports("--sport", match.sport),
            *ports.save_ports("--dport", match.dport),
        ]

    def describe(self, match: UdpMatch) -> str:
        sport = ports.describe_ports("spt", match.sport)
        return f" udp{sport}{ports.describe_ports('dpt', match.dport)}"

    def as_saved(self, match: UdpMatch) -> UdpMatch:
        return UdpMatch(ports.as_saved(match.sport), ports.as_saved(match.dport))

    def check(self, match: UdpMatch, rule: Rule, chain: str) -> None:
        require_protocol(rule, frozenset({IPPROTO_UDP}), "udp match needs '-p udp' (not negated)")
        ports.check_ports(match.sport, "--sport")
        ports.check_ports(match.dport, "--dport")

    def encode(self, match: UdpMatch) -> XtUdp:
        inverted = (XT_UDP_INV_SRCPT if match.sport.negated else 0) | (
            XT_UDP_INV_DSTPT if match.dport.negated else 0
        )
        return XtUdp(ports.pair(match.sport), ports.pair(match.dport), inverted)

    def decode(self, data: XtUdp) -> UdpMatch:
        if data.invflags & ~XT_UDP_INV_MASK:
            raise BlobError(f"udp match: unknown invflags 0x{data.invflags:02x}")
        return UdpMatch(
            ports.from_pair(data.spts, bool(data.invflags & XT_UDP_INV_SRCPT)),
            ports.from_pair(data.dpts, bool(data.invflags & XT_UDP_INV_DSTPT)),
        )

    def matches(self, match: UdpMatch, packet: Packet) -> bool:
        if packet.fragment_offset != 0:
            return False
        sport, dport = ports.ports_of(packet.transport_header(UDP_HEADER))
        return match.sport.matches(sport) and match.dport.matches(dport)


EXTENSION = Udp()
