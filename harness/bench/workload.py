"""The benchmark's workload: N rules of one shape, written for each filter, and the test packets.

Every rule is `-A INPUT -s <distinct /32> -p tcp --dport <distinct port> -j ACCEPT` under an
INPUT policy of DROP, so a packet matches at most one rule and which one is chosen by its source
address and port. The packets are 64-byte Ethernet frames (IPv4, TCP with the RST flag and 10
bytes of payload): a RST to a closed port is discarded by the receiving kernel without an answer,
so a stream of them costs the receiver one delivery each and sends nothing back.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Literal

# Rule sources live in 198.19.0.0/16, outside every subnet of the namespaces' address plan
# (198.18.0.0/24 and the like): a source that is one of the receiver's own addresses would be
# dropped as a martian before any filter saw it.
FIRST_SOURCE = IPv4Address("198.19.0.1")
FIRST_PORT = 1000
SOURCE_PORT = 40000
MAX_RULES = 65535 - FIRST_PORT  # the ports run out before the addresses
FRAME_BYTES = 64
PAYLOAD_BYTES = FRAME_BYTES - 14 - 20 - 20
NFT_TABLE = "bpflab_bench"

# Where the test packet matches: the first rule, only the last rule (every rule is tried), or no
# rule at all (every rule is tried and the policy drops it).
Position = Literal["first", "last", "none"]
POSITIONS: tuple[Position, ...] = ("first", "last", "none")


class WorkloadError(ValueError):
    """A rule count the workload cannot express."""


def _check(count: int) -> None:
    if not 1 <= count <= MAX_RULES:
        raise WorkloadError(f"rule count {count} is outside 1..{MAX_RULES}")


def source(index: int) -> IPv4Address:
    """The source address of rule `index` (0-based)."""
    return FIRST_SOURCE + index


def port(index: int) -> int:
    return FIRST_PORT + index


def iptables_rules(count: int, *, protocol: str = "tcp", first: str | None = None) -> str:
    """The rule set as iptables-save text, which both `bpflab apply` and iptables-legacy-restore
    read; `first` is a rule before the N (the stateful workload's)."""
    _check(count)
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [first] if first else []
    lines += [
        f"-A INPUT -s {source(i)}/32 -p {protocol} -m {protocol} --dport {port(i)} -j ACCEPT"
        for i in range(count)
    ]
    return "\n".join([*lines, "COMMIT", ""])


EMPTY_IPTABLES = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
)


def nft_rules(
    count: int, *, replace: bool = False, protocol: str = "tcp", first: str | None = None
) -> str:
    """The same rule set as an nftables input chain, for `nft -f`.

    With `replace`, the file first flushes the table, so that `nft -f` swaps the old rules for
    the new ones in one transaction (nftables' atomic update).
    """
    _check(count)
    lines = [f"flush table ip {NFT_TABLE}"] if replace else []
    lines += [
        f"table ip {NFT_TABLE} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
    ]
    lines += [f"\t\t{first}"] if first else []
    lines += [f"\t\tip saddr {source(i)} {protocol} dport {port(i)} accept" for i in range(count)]
    lines += ["\t}", "}", ""]
    return "\n".join(lines)


def matched_rule(count: int, position: Position) -> int | None:
    """The 1-based number of the rule the packet for `position` matches (None: no rule)."""
    return {"first": 1, "last": count, "none": None}[position]


def ip_packet(count: int, position: Position, destination: IPv4Address) -> bytes:
    """The IPv4 packet (TCP RST, 10 bytes of payload) for `position` in a set of `count` rules."""
    from scapy.layers.inet import IP, TCP

    _check(count)
    rule = matched_rule(count, position)
    index = count if rule is None else rule - 1  # one past the last rule matches nothing
    packet = IP(src=str(source(index)), dst=str(destination)) / TCP(
        sport=SOURCE_PORT, dport=port(index), flags="R"
    )
    return bytes(packet / bytes(PAYLOAD_BYTES))


def ethernet_frame(ip: bytes, *, source_mac: str, destination_mac: str) -> bytes:
    frame = (
        bytes.fromhex(destination_mac.replace(":", ""))
        + bytes.fromhex(source_mac.replace(":", ""))
        + b"\x08\x00"
        + ip
    )
    if len(frame) != FRAME_BYTES:
        raise AssertionError(f"frame of {len(frame)} bytes, want {FRAME_BYTES}")
    return frame


# The stateful workload: the same N rules, for UDP, behind netfilter's line one. Its packets
# are UDP datagrams of 64-byte frames: an established flow's (the host wrote to the client
# first, so they are replies: ESTABLISHED, decided by the first rule) or a new flow's to the
# last rule's source and port (never answered, so every one of them is NEW and goes down the
# whole chain).
STATEFUL_FIRST_RULE = "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
StatefulPosition = Literal["established", "new"]
STATEFUL_POSITIONS: tuple[StatefulPosition, ...] = ("established", "new")
HOST_PORT, CLIENT_PORT = 5000, 40000  # the established flow: host:5000 wrote to client:40000


def stateful_iptables_rules(count: int) -> str:
    return iptables_rules(count, protocol="udp", first=STATEFUL_FIRST_RULE)


def stateful_nft_rules(count: int, *, replace: bool = False) -> str:
    return nft_rules(
        count, replace=replace, protocol="udp", first="ct state established,related accept"
    )


def stateful_matched_rule(count: int, position: StatefulPosition) -> int:
    """The 1-based rule that accepts the packet for `position`."""
    return 1 if position == "established" else count + 1


def udp_packet(source_address: IPv4Address, destination: IPv4Address, sport: int, dport: int):
    """An IPv4 UDP packet whose frame is FRAME_BYTES long."""
    from scapy.layers.inet import IP, UDP

    payload = bytes(FRAME_BYTES - 14 - 20 - 8)
    packet = IP(src=str(source_address), dst=str(destination)) / UDP(sport=sport, dport=dport)
    return bytes(packet / payload)


def stateful_packet(
    count: int, position: StatefulPosition, client: IPv4Address, host: IPv4Address
) -> bytes:
    """The packet the host receives for `position`."""
    _check(count)
    if position == "established":
        return udp_packet(client, host, CLIENT_PORT, HOST_PORT)
    return udp_packet(source(count - 1), host, SOURCE_PORT, port(count - 1))


def priming_packet(client: IPv4Address, host: IPv4Address) -> bytes:
    """What the host writes first, which makes the client's datagrams replies."""
    return udp_packet(host, client, HOST_PORT, CLIENT_PORT)
