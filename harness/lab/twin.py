"""The twin topologies' plan, shared by the netfilter oracle (`harness.lab.netfilter`) and the
twin labs of packet scripts (`harness.lab.traffic`): the address plan, which packets can reach
each chain as given (`prepare`), and the raw-table rules that keep the kernel's own traffic out
of the filter table.

The oracle's INPUT and OUTPUT run in a HostTopology's host, its FORWARD in a RouterTopology's
router. Test data (tests/strategies.py) is built from the plan without building any namespace.

Kernel facts a caller must know (the oracle refuses what would not reach the chain as given):
- INPUT never sees fragments: ip_local_deliver reassembles them before the LOCAL_IN hook.
- FORWARD sees the TTL already decremented (ip_forward decrements before NF_INET_FORWARD), and a
  packet with TTL <= 1 never reaches it. `Observation.packet` is the packet as the chain saw it:
  evaluate that, not what was injected.
- The kernel drops malformed IPv4 (version, header length, total length) before netfilter; the
  oracle fixes the header checksum and refuses the rest with `PacketRefused`.
- Only OUTPUT packets can carry a mark (the sending socket's SO_MARK): crossing from the
  client's namespace clears skb->mark.
- INPUT's pkt_type follows the destination (`DESTINATIONS`): the subnet or limited broadcast
  goes to the broadcast MAC, 224.0.0.1 to its multicast MAC.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Literal

ChainName = Literal["INPUT", "FORWARD", "OUTPUT"]
Position = tuple[str, int | Literal["policy"]]
Counters = dict[Position, tuple[int, int]]

CHAINS: tuple[ChainName, ...] = ("INPUT", "FORWARD", "OUTPUT")

# The address plan of netns.topology, checked against the built topologies on entry.
HOST_CLIENT = IPv4Address("198.18.0.1")
HOST = IPv4Address("198.18.0.2")
ROUTER_CLIENT = IPv4Address("198.18.1.1")
ROUTER_CLIENT_SIDE = IPv4Address("198.18.1.254")
ROUTER_SERVER_SIDE = IPv4Address("198.18.2.254")
SERVER = IPv4Address("198.18.2.1")
HOST_BROADCAST = IPv4Address("198.18.0.255")
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
ALL_HOSTS = IPv4Address("224.0.0.1")  # every multicast-capable interface is a member
TEST_NETWORK = IPv4Network("198.18.0.0/15")
SUBNETS = tuple(
    IPv4Network(network) for network in ("198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24")
)

# (in_iface, out_iface) as each chain sees them: eth0 in the host; eth0 (client side) and eth1
# (server side) in the router.
INTERFACES: dict[str, tuple[str | None, str | None]] = {
    "INPUT": ("eth0", None),
    "FORWARD": ("eth0", "eth1"),
    "OUTPUT": (None, "eth0"),
}
# Where a packet may go for each chain, and the skb->pkt_type it then has (the name `evaluate`
# takes). INPUT takes broadcast and multicast too: the frame then goes to the matching MAC.
DESTINATIONS: dict[str, dict[IPv4Address, str]] = {
    "INPUT": {
        HOST: "host",
        HOST_BROADCAST: "broadcast",
        LIMITED_BROADCAST: "broadcast",
        ALL_HOSTS: "multicast",
    },
    "FORWARD": {SERVER: "host"},
    "OUTPUT": {HOST_CLIENT: "host"},
}
# The natural (source, destination) for each chain.
ADDRESSES: dict[str, tuple[IPv4Address, IPv4Address]] = {
    "INPUT": (HOST_CLIENT, HOST),
    "FORWARD": (ROUTER_CLIENT, SERVER),
    "OUTPUT": (HOST, HOST_CLIENT),
}
# A packet claiming to come from an address of the receiving namespace is a martian there.
LOCAL_ADDRESSES: dict[str, frozenset[IPv4Address]] = {
    "INPUT": frozenset({HOST}),
    "FORWARD": frozenset({ROUTER_CLIENT_SIDE, ROUTER_SERVER_SIDE}),
    "OUTPUT": frozenset(),
}

IPPROTO_ICMP = 1
IPPROTO_RAW = 255
MTU = 1500  # veth default; larger packets would be fragmented or refused on the way


class OracleError(Exception):
    """The netfilter oracle could not do or observe what it was asked to."""


class PacketRefused(OracleError, ValueError):
    """A packet that would not reach the chain as given: the kernel would drop or change it
    before netfilter, so a verdict for it would say nothing about the rule set."""


def ip_checksum(header: bytes) -> int:
    """The Internet checksum of `header` (RFC 1071)."""
    if len(header) % 2:
        header += b"\0"
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def with_checksum(packet: bytes) -> bytes:
    """`packet` with its IPv4 header checksum recomputed; everything else unchanged."""
    ihl = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:ihl])
    header[10:12] = b"\0\0"
    header[10:12] = ip_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[ihl:]


def with_addresses(packet: bytes, source: IPv4Address, destination: IPv4Address) -> bytes:
    """`packet` with new source and destination addresses and a fixed header checksum.

    Transport checksums are left alone: netfilter's filter table never reads them.
    """
    return with_checksum(packet[:12] + source.packed + destination.packed + packet[20:])


def prepare(packet: bytes, chain: str) -> bytes:
    """The packet the oracle would inject into `chain`: checked, trimmed to its IP total length
    (as ip_rcv trims the skb) and with its header checksum fixed.

    Raises PacketRefused for anything the kernel would drop or change before the chain: a
    malformed header, an address the chain cannot receive, IP options other than NOP and EOL,
    a fragment for INPUT, a TTL below 2 for FORWARD, a packet larger than the MTU.
    """
    if chain not in CHAINS:
        raise ValueError(f"chain must be one of {', '.join(CHAINS)}, not {chain!r}")
    if len(packet) < 20:
        raise PacketRefused(f"packet is {len(packet)} bytes, shorter than an IPv4 header")
    version, ihl = packet[0] >> 4, (packet[0] & 0x0F) * 4
    if version != 4:
        raise PacketRefused(f"IP version {version}: the kernel drops it before netfilter")
    if ihl < 20:
        raise PacketRefused(f"IP header length {ihl} is below 20: dropped before netfilter")
    total_length = int.from_bytes(packet[2:4], "big")
    if total_length > len(packet):
        raise PacketRefused(
            f"IP total length {total_length} exceeds the {len(packet)} bytes given: "
            "ip_rcv drops it before netfilter"
        )
    if total_length < ihl:
        raise PacketRefused(
            f"IP total length {total_length} is shorter than the {ihl}-byte header: "
            "ip_rcv drops it before netfilter"
        )
    if total_length > MTU:
        raise PacketRefused(f"IP total length {total_length} exceeds the {MTU}-byte MTU")
    options = packet[20:ihl]
    if any(byte not in (0, 1) for byte in options):
        raise PacketRefused(
            "IP options other than NOP (1) and EOL (0) may be refused or rewritten by the "
            f"kernel before netfilter: {options.hex()}"
        )
    if b"\0\1" in options:
        # ip_options_compile overwrites everything after the first EOL with EOL.
        raise PacketRefused(f"IP options with a NOP after EOL are rewritten: {options.hex()}")
    source = IPv4Address(packet[12:16])
    destination = IPv4Address(packet[16:20])
    _check_source(source, chain)
    if destination not in DESTINATIONS[chain]:
        allowed = ", ".join(str(address) for address in DESTINATIONS[chain])
        raise PacketRefused(f"{chain} packets must go to one of {allowed}, not {destination}")
    fragment = int.from_bytes(packet[6:8], "big") & 0x3FFF  # MF and the offset
    if chain == "INPUT" and fragment:
        raise PacketRefused(
            "INPUT never sees fragments: ip_local_deliver reassembles them before LOCAL_IN; "
            "send fragments through FORWARD or OUTPUT"
        )
    if chain == "FORWARD" and packet[8] <= 1:
        raise PacketRefused(
            f"TTL {packet[8]}: ip_forward answers time-exceeded before the FORWARD chain"
        )
    if chain == "INPUT" and packet[9] in (0, IPPROTO_RAW):
        raise PacketRefused(f"protocol {packet[9]}: no raw socket can observe its local delivery")
    return with_checksum(packet[:total_length])


def _check_source(source: IPv4Address, chain: str) -> None:
    if source not in TEST_NETWORK:
        raise PacketRefused(f"source {source} is outside {TEST_NETWORK}, the test addresses")
    for subnet in SUBNETS:
        if source in (subnet.network_address, subnet.broadcast_address):
            raise PacketRefused(f"source {source} is the network or broadcast address of {subnet}")
    if source in LOCAL_ADDRESSES[chain]:
        raise PacketRefused(
            f"source {source} is an address of the namespace receiving it: a martian there"
        )


def seen_by_chain(packet: bytes, chain: str) -> bytes:
    """The prepared `packet` as `chain` sees it: FORWARD sees the TTL already decremented."""
    if chain != "FORWARD":
        return packet
    return with_checksum(packet[:8] + bytes([packet[8] - 1]) + packet[9:])


# Raw-table rules that keep every packet the test did not send out of the filter table's
# counters. The raw table hooks before the filter table (NF_IP_PRI_RAW < NF_IP_PRI_FILTER).
QUIET_RECEIVER = "*raw\n:PREROUTING DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
QUIET_ROUTER = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT DROP [0:0]\nCOMMIT\n"


def quiet_host(uid: int) -> str:
    # Replies the kernel makes on its own (TCP RST, ICMP errors, echo replies) leave through
    # sockets without a file; the oracle's own raw socket has one, owned by `uid`.
    return (
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT -m owner ! --uid-owner {uid} -j DROP\nCOMMIT\n"
    )
