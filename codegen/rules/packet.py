"""One IPv4 packet as netfilter's matches see it: what the reference evaluator hands to each
match's semantics (codegen.rules.extensions), with skb_header_pointer's rule for short headers.
"""

from dataclasses import dataclass

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

    def transport_header(self, size: int) -> bytes:
        """skb_header_pointer for the first `size` transport bytes; a short packet is
        hotdropped, as every match that needs a transport header does."""
        header = self.data[self.transport : self.transport + size]
        if len(header) < size:
            raise HotDrop
        return header


def read_packet(
    packet: bytes, in_iface: str | None, out_iface: str | None, mark: int, pkt_type: str
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
    for name, device in (("in_iface", in_iface), ("out_iface", out_iface)):
        if device is not None and len(device) > 15:
            raise ValueError(f"{name} {device!r} is longer than 15 characters")
    if not 0 <= mark <= 0xFFFFFFFF:
        raise ValueError(f"mark {mark} is not a 32-bit value")
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
    )
