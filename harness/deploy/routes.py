"""The `address_types` LPM trie of `-m addrtype` (codegen.tc.matches.addrtype): a namespace's
routes read at apply time as codegen.rules.routes models them, or a stand-in table for test
runs, put into a trie the programs share.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.rules.routes import Route, RouteTable
from codegen.tc.matches.addrtype import ADDRESS_TYPES, ADDRESS_TYPES_ENTRIES, KEY, VALUE, entries
from netns.namespace import Namespace

RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RTNH_F_DEAD = 1


def tables_merged(fib_trie: str) -> bool:
    """Whether the text of /proc/net/fib_trie shows LOCAL sharing MAIN's trie (both print
    the same): so it is until a policy routing rule is first added (fib_unmerge), and so it
    stays unmerged after the rule is deleted, which a look at the rules would not tell."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in fib_trie.splitlines():
        if line and not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line)
    return sections.get("Main:") == sections.get("Local:")


def _first_device(route: object) -> int:
    oif = route.get_attr("RTA_OIF")  # type: ignore[attr-defined]
    if oif is not None:
        return int(oif)
    multipath = route.get_attr("RTA_MULTIPATH")  # type: ignore[attr-defined]
    if multipath:
        return int(multipath[0]["oif"])
    return 0


def namespace_routes(namespace: Namespace) -> RouteTable:
    """The routes inet_dev_addr_type sees in `namespace`: its LOCAL table's, then (while
    LOCAL shares MAIN's trie) its MAIN table's, each table in the kernel's order. Routes with
    a TOS (a lookup without one skips them) or a dead next hop are left out."""
    with namespace.enter(), open("/proc/thread-self/net/fib_trie") as trie:
        merged = tables_merged(trie.read())
    tables = [RT_TABLE_LOCAL, RT_TABLE_MAIN] if merged else [RT_TABLE_LOCAL]
    found: list[Route] = []
    with namespace.ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for table in tables:
            for route in ipr.get_routes(family=socket.AF_INET, table=table):
                if route["tos"] or route["flags"] & RTNH_F_DEAD:
                    continue
                destination = route.get_attr("RTA_DST") or "0.0.0.0"
                network = int(ipaddress.IPv4Address(destination))
                device = names.get(_first_device(route)) or ""
                found.append(Route(network, route["dst_len"], route["type"], device))
    return RouteTable(tuple(found))


def fill_address_types(trie: Map, routes: RouteTable, interfaces: Mapping[str, int]) -> None:
    """Put `routes` into an `address_types` trie, devices by `interfaces`' ifindexes."""
    for key, value in list(entries(routes, dict(interfaces)).items())[: trie.max_entries]:
        trie.update(key, value)


def address_types_map(routes: RouteTable, interfaces: Mapping[str, int]) -> Map:
    """A new `address_types` trie holding `routes` (the caller closes it)."""
    trie = Map(MapType.LPM_TRIE, KEY.size, VALUE.size, ADDRESS_TYPES_ENTRIES, name=ADDRESS_TYPES)
    try:
        fill_address_types(trie, routes, interfaces)
    except BaseException:
        trie.close()
        raise
    return trie
