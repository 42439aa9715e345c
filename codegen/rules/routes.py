"""What a namespace's routing says an IPv4 address is: the kernel's inet_dev_addr_type
(fib_frontend.c), which `-m addrtype` asks for each address it looks at.

The kernel answers BROADCAST for 0.0.0.0/8 and 255.255.255.255 and MULTICAST for 224.0.0.0/4
without a lookup; otherwise it looks the address up in the LOCAL table, which, while no policy
routing rule was ever added, shares its trie with MAIN, so that main's routes answer too. The
longest prefix decides: a route of a type fib_table_lookup treats as an error (blackhole,
unreachable, prohibit, throw, and the obsolete nat and xresolve) makes the lookup fail, and the
answer is then UNICAST, as it is with no route at all (checked against the kernel: a source
under a blackhole route matches `--src-type UNICAST`, never `BLACKHOLE`). With a device given
(`--limit-iface-in`/`-out`) a route whose first next hop is another device answers UNICAST.

A `RouteTable` is that model: its routes in the order the kernel would try routes of one
prefix (local table first, then by metric). The reference evaluator consults one; the
bytecode programs consult the same table put in an LPM trie (codegen.tc.matches.addrtype).
`STANDIN_ROUTES` is the table of tests and test runs; harness.deploy.routes reads a real one.
"""

from __future__ import annotations

from dataclasses import dataclass

from codegen.rules.model import check_uint

# enum rtn_type (linux/rtnetlink.h): iptables' names, in number order.
ROUTE_TYPES = (
    "UNSPEC",
    "UNICAST",
    "LOCAL",
    "BROADCAST",
    "ANYCAST",
    "MULTICAST",
    "BLACKHOLE",
    "UNREACHABLE",
    "PROHIBIT",
    "THROW",
    "NAT",
    "XRESOLVE",
)
RTN = {name: number for number, name in enumerate(ROUTE_TYPES)}
UNICAST, LOCAL, BROADCAST, MULTICAST = (RTN[name] for name in ROUTE_TYPES[1:4] + ("MULTICAST",))
# fib_props[type].error < 0: fib_table_lookup fails on a route of these types.
FAILING_TYPES = frozenset(RTN[name] for name in ROUTE_TYPES[6:])


def _mask(length: int) -> int:
    return (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Route:
    """One route: `network`/`length` (host order), its type (an RTN number) and the device of
    its first next hop ("" for a route without one, such as a blackhole)."""

    network: int
    length: int
    type: int
    device: str = ""

    def __post_init__(self) -> None:
        check_uint(self.network, 32, "route network")
        if not 0 <= self.length <= 32:
            raise ValueError(f"route prefix length must be 0-32, not {self.length}")
        if self.network & ~_mask(self.length) & 0xFFFFFFFF:
            raise ValueError(f"route network {self.network:#x} has bits past /{self.length}")
        if not 0 <= self.type < len(ROUTE_TYPES):
            raise ValueError(f"route type must be 0-{len(ROUTE_TYPES) - 1}, not {self.type}")

    def contains(self, address: int) -> bool:
        return address & _mask(self.length) == self.network

    @property
    def answer(self) -> int:
        """The type a lookup ending at this route gives (UNICAST where the lookup fails)."""
        return UNICAST if self.type in FAILING_TYPES else self.type


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The routes inet_dev_addr_type sees, first ones first among routes of one prefix."""

    routes: tuple[Route, ...] = ()

    def lookup(self, address: int) -> Route | None:
        """The route the kernel's longest-prefix lookup ends at, None if none covers it."""
        best: Route | None = None
        for route in self.routes:
            if route.contains(address) and (best is None or route.length > best.length):
                best = route
        return best

    def address_type(self, address: int, device: str | None = None) -> int:
        """inet_dev_addr_type: the RTN type of `address`; `device` limits it to routes
        through that device (None: any)."""
        if address >> 24 == 0 or address == 0xFFFFFFFF:
            return BROADCAST
        if address >> 28 == 0xE:
            return MULTICAST
        route = self.lookup(address)
        if route is None or route.type in FAILING_TYPES:
            return UNICAST
        if device is not None and route.device != device:
            return UNICAST
        return route.type

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(route.device for route in self.routes if route.device)

    def entries(self) -> dict[tuple[int, int], tuple[int, str]]:
        """(length, network) -> (answer, device): one entry per prefix, the first route's,
        as an LPM trie holds them."""
        found: dict[tuple[int, int], tuple[int, str]] = {}
        for route in self.routes:
            found.setdefault((route.length, route.network), (route.answer, route.device))
        return found


def _route(text: str, kind: str, device: str = "") -> Route:
    address, _, length = text.partition("/")
    octets = [int(part) for part in address.split(".")]
    network = int.from_bytes(bytes(octets), "big")
    return Route(network, int(length or 32), RTN[kind], device)


# The stand-in namespace of tests and test runs: the twin host's eth0 (198.18.0.2/24), a
# second device eth1 (198.18.1.254/24), lo, a default route, a range delivered locally as
# Kubernetes adds them, an anycast address, and one prefix of each failing type, one of them
# nested in the local range.
STANDIN_ROUTES = RouteTable(
    (
        _route("127.0.0.0/8", "LOCAL", "lo"),
        _route("127.0.0.1", "LOCAL", "lo"),
        _route("127.255.255.255", "BROADCAST", "lo"),
        _route("198.18.0.2", "LOCAL", "eth0"),
        _route("198.18.0.255", "BROADCAST", "eth0"),
        _route("198.18.1.254", "LOCAL", "eth1"),
        _route("198.18.1.255", "BROADCAST", "eth1"),
        _route("198.19.14.1", "ANYCAST", "eth0"),
        _route("198.19.17.0/24", "LOCAL", "lo"),
        _route("0.0.0.0/0", "UNICAST", "eth0"),
        _route("198.18.0.0/24", "UNICAST", "eth0"),
        _route("198.18.1.0/24", "UNICAST", "eth1"),
        _route("198.19.10.0/24", "BLACKHOLE"),
        _route("198.19.11.0/24", "UNREACHABLE"),
        _route("198.19.12.0/24", "PROHIBIT"),
        _route("198.19.13.0/24", "THROW"),
        _route("198.19.17.128/25", "BLACKHOLE"),
    )
)
