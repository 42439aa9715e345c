"""One IPv4 packet as netfilter's matches see it: what the reference evaluator hands to each
match's semantics (codegen.rules.extensions), with skb_header_pointer's rule for short headers,
and the connection conntrack attached to it, if any.
"""

from dataclasses import dataclass, field
from typing import Literal

from codegen.rules.model import check_uint
from codegen.rules.routes import RouteTable
from codegen.rules.sets import SetTable

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


class PacketError(ValueError):
    """The bytes are not an IPv4 packet the kernel would hand to netfilter."""


class HotDrop(Exception):
    """A match drops the packet on the spot (par->hotdrop), whatever the rule's target."""


# ct->status bits (enum ip_conntrack_status in linux/netfilter/nf_conntrack_common.h).
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
# What conntrack says of a packet: its ctinfo without the direction, or no entry at all
# (INVALID: the tracker refused it; UNTRACKED: `-j CT --notrack` in the raw table).
ConnectionState = Literal["INVALID", "NEW", "ESTABLISHED", "RELATED", "UNTRACKED"]
CONNECTION_STATES: tuple[ConnectionState, ...] = (
    "INVALID",
    "NEW",
    "ESTABLISHED",
    "RELATED",
    "UNTRACKED",
)
Direction = Literal["ORIGINAL", "REPLY"]


@dataclass(frozen=True, slots=True)
class ConnectionTuple:
    """One direction of a connection (struct nf_conntrack_tuple): its addresses and the two
    16-bit values xt_conntrack reads as ports (`u.all`, host order here): the ports of TCP, UDP,
    SCTP and DCCP; for ICMP the id and `type << 8 | code`; 0 for protocols without them."""

    src: int = 0
    dst: int = 0
    sport: int = 0
    dport: int = 0

    def __post_init__(self) -> None:
        for name, bits in (("src", 32), ("dst", 32), ("sport", 16), ("dport", 16)):
            check_uint(getattr(self, name), bits, f"connection tuple {name}")


@dataclass(frozen=True, slots=True)
class Connection:
    """The conntrack entry a packet carries (skb->_nfct) as xt_conntrack reads it. `state` is
    its ctinfo without the direction; INVALID and UNTRACKED mean no entry (the kernel's ct is
    NULL), so that nothing else here is looked at. `direction` is the packet's (REPLY: it
    travels as the reply tuple says; NEW only exists in the original direction), `status` the
    entry's IPS_* bits (IPS_SRC_NAT and IPS_DST_NAT are what --ctstate SNAT and DNAT see),
    `protocol` its layer-4 protocol, `expires` the seconds left before it times out and
    `mark` its ct->mark (-m connmark, -j CONNMARK)."""

    state: ConnectionState = "NEW"
    direction: Direction = "ORIGINAL"
    protocol: int = 0
    original: ConnectionTuple = field(default_factory=ConnectionTuple)
    reply: ConnectionTuple = field(default_factory=ConnectionTuple)
    status: int = 0
    expires: int = 0
    mark: int = 0

    def __post_init__(self) -> None:
        if self.state not in CONNECTION_STATES:
            raise ValueError(f"state must be one of {', '.join(CONNECTION_STATES)}: {self.state!r}")
        if self.direction not in ("ORIGINAL", "REPLY"):
            raise ValueError(f"direction must be ORIGINAL or REPLY: {self.direction!r}")
        if self.state == "NEW" and self.direction == "REPLY":
            raise ValueError("a NEW packet travels in the original direction (no IP_CT_NEW_REPLY)")
        check_uint(self.protocol, 8, "protocol")
        check_uint(self.status, 32, "status")
        check_uint(self.expires, 64, "expires")
        check_uint(self.mark, 32, "connection mark")

    @property
    def tracked(self) -> bool:
        """Whether there is an entry (the kernel's ct is not NULL)."""
        return self.state not in ("INVALID", "UNTRACKED")


@dataclass(frozen=True, slots=True)
class SocketOwner:
    """The socket a locally generated packet carries, as `-m owner` (xt_owner) sees it: `file`
    False for a socket no file holds (the kernel's own, which send echo replies, ICMP errors
    and RSTs for no connection), else the credentials the socket's file was opened with
    (f_cred: fsuid, fsgid and the supplementary groups). A packet without one (owner None)
    has no socket, or one without a struct socket (sk_socket NULL)."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    file: bool = True

    def __post_init__(self) -> None:
        check_uint(self.uid, 32, "owner uid")
        check_uint(self.gid, 32, "owner gid")
        for group in self.groups:
            check_uint(group, 32, "owner supplementary group")


@dataclass(frozen=True, slots=True)
class XfrmState:
    """One IPsec transform as `-m policy` compares it (struct xfrm_state's id and props):
    the protocol (50 ESP, 51 AH, 108 IPComp), the mode (0 transport, 1 tunnel, ...), the SPI
    as `ip xfrm` shows it, the reqid, and the tunnel's source and destination addresses."""

    proto: int = 50
    mode: int = 1
    spi: int = 0
    reqid: int = 0
    saddr: int = 0
    daddr: int = 0

    def __post_init__(self) -> None:
        check_uint(self.proto, 8, "xfrm protocol")
        check_uint(self.mode, 8, "xfrm mode")
        for name in ("spi", "reqid", "saddr", "daddr"):
            check_uint(getattr(self, name), 32, f"xfrm {name}")


XFRM_MAX_DEPTH = 6  # the most transforms a security path holds


@dataclass(frozen=True, slots=True)
class Packet:
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
    connection: Connection | None = None  # None: no conntrack entry, which matches see as INVALID
    routes: RouteTable | None = None  # what -m addrtype looks addresses up in (None: stand-in)
    owner: SocketOwner | None = None  # the socket -m owner asks about (None: none)
    sets: SetTable | None = None  # what -m set looks up (None: its bound sets or stand-ins)
    # -m policy: the states that decapsulated the packet (the skb's security path, first
    # applied first), and those its route will encapsulate it with; None: none.
    secpath: tuple[XfrmState, ...] | None = None
    bundle: tuple[XfrmState, ...] | None = None
    # -m physdev: the bridge ports br_netfilter recorded (nf_bridge's physindev, physoutdev);
    # physin None: the packet crossed no bridge that hands its traffic to iptables.
    physin: str | None = None
    physout: str | None = None

    @property
    def tracked_connection(self) -> Connection | None:
        """The packet's conntrack entry when it has one (nf_ct_get's ct), else None."""
        connection = self.connection
        return connection if connection is not None and connection.tracked else None

    def transport_header(self, size: int) -> bytes:
        """skb_header_pointer for the first `size` transport bytes; a short packet is
        hotdropped, as every match that needs a transport header does."""
        header = self.data[self.transport : self.transport + size]
        if len(header) < size:
            raise HotDrop
        return header


def read_packet(
    packet: bytes,
    in_iface: str | None,
    out_iface: str | None,
    mark: int,
    pkt_type: str,
    *,
    connection: Connection | None = None,
    routes: RouteTable | None = None,
    owner: SocketOwner | None = None,
    sets: SetTable | None = None,
    secpath: tuple[XfrmState, ...] | None = None,
    bridge_ports: tuple[str, str | None] | None = None,
) -> Packet:
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
    physin, physout = (None, None) if bridge_ports is None else bridge_ports
    for name, device in (
        ("in_iface", in_iface),
        ("out_iface", out_iface),
        ("physin", physin),
        ("physout", physout),
    ):
        if device is not None and len(device) > 15:
            raise ValueError(f"{name} {device!r} is longer than 15 characters")
    if not 0 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark {mark} is not a 32-bit value")
    if secpath is not None and len(secpath) > XFRM_MAX_DEPTH:
        raise ValueError(f"a security path holds at most {XFRM_MAX_DEPTH} states")
    if pkt_type not in PACKET_TYPES:
        raise ValueError(f"pkt_type must be one of {', '.join(PACKET_TYPES)}, not {pkt_type!r}")
    return Packet(
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
        connection=connection,
        routes=routes,
        owner=owner,
        sets=sets,
        secpath=secpath,
        physin=physin,
        physout=physout,
    )
