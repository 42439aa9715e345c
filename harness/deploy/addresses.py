"""The ingress program's `local_addresses` map: the destinations a namespace delivers locally
(its addresses, broadcasts and joined groups), read from the namespace at apply time, so that the
program can tell traffic for INPUT from traffic for FORWARD.
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


def fill_local_map(local: Map, addresses: dict[int, int]) -> None:
    """Put `addresses` (local_addresses' answer, or a stand-in) into a `local_addresses` map."""
    for address, kind in sorted(addresses.items())[: local.max_entries]:
        local.update(struct.pack("<I", address), bytes([kind]))
