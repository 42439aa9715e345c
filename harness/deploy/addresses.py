"""What apply reads from a namespace for the programs: the destinations it delivers locally (its
addresses, broadcasts and joined groups), which the ingress program compares inline to tell
traffic for INPUT from traffic for FORWARD (codegen.tc.local), and each device's address and MAC
(REJECT's `interface_addresses` map).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from codegen.bpf.maps import Map
from codegen.tc.layout import Local
from netns.namespace import Namespace

RT_TABLE_LOCAL, RTN_LOCAL, RTN_BROADCAST = 255, 2, 3


def local_addresses(namespace: Namespace) -> dict[int, int]:
    """What the namespace delivers locally, as the `local_addresses` map holds it: address
    (host order) -> Local kind. Its devices' addresses and subnet broadcasts (the /32 local and
    broadcast routes of its local routing table), the limited broadcast (which ip_route_input
    treats as broadcast without a route), and the multicast groups its devices joined."""
    found = {int(ipaddress.IPv4Address("255.255.255.255")): Local.BROADCAST}
    with namespace.ipr() as ipr:
        for route in ipr.get_routes(family=socket.AF_INET, table=RT_TABLE_LOCAL):
            if route["type"] in (RTN_LOCAL, RTN_BROADCAST) and route["dst_len"] == 32:
                address = int(ipaddress.IPv4Address(route.get_attr("RTA_DST")))
                kind = Local.ADDRESS if route["type"] == RTN_LOCAL else Local.BROADCAST
                found[address] = min(kind, found.get(address, kind))  # an address above all
    with namespace.enter(), open("/proc/thread-self/net/igmp") as igmp:
        groups = igmp.read()
    for group in joined_groups(groups):
        found.setdefault(group, Local.GROUP)
    return found


def joined_groups(igmp: str) -> set[int]:
    """The groups (host order) in the text of /proc/net/igmp: indented lines under each device
    whose first field is the group, printed as the native-endian value of a __be32."""
    groups = set()
    for line in igmp.splitlines()[1:]:
        if line[:1].isspace() and line.split():
            raw = int(line.split()[0], 16).to_bytes(4, sys.byteorder)
            groups.add(int.from_bytes(raw, "big"))
    return groups


def interface_addresses(namespace: Namespace) -> dict[int, tuple[int, bytes]]:
    """Each device's first IPv4 address (host order, 0 if none) and MAC, by ifindex: what
    REJECT's answers come from (the router's address facing the sender of a forwarded packet;
    the device's MAC for a frame that came to a group MAC)."""
    found: dict[int, tuple[int, bytes]] = {}
    with namespace.ipr() as ipr:
        for link in ipr.get_links():
            mac = link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
            found[link["index"]] = (0, bytes.fromhex(mac.replace(":", ""))[:6].ljust(6, b"\0"))
        for address in ipr.get_addr(family=socket.AF_INET):
            local = address.get_attr("IFA_LOCAL") or address.get_attr("IFA_ADDRESS")
            index = address["index"]
            if local is not None and index in found and found[index][0] == 0:
                found[index] = (int(ipaddress.IPv4Address(local)), found[index][1])
    return found


def fill_interface_map(table: Map, devices: dict[int, tuple[int, bytes]]) -> None:
    for ifindex, (address, mac) in sorted(devices.items())[: table.max_entries]:
        table.update(struct.pack("<I", ifindex), struct.pack("<I6s2x", address, mac))
