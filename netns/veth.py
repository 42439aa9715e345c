"""veth pairs between two namespaces, quiet and fully resolved.

"Quiet" means an interface sends nothing the test did not ask for: no IPv6 duplicate address
detection or router solicitations, and no ARP or neighbour discovery, because every address on
the link has a permanent neighbour entry. "Fully resolved" keeps tests deterministic: a first
packet is never queued behind address resolution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Interface

from pyroute2.netlink.rtnl.ndmsg import NUD_PERMANENT

from netns.namespace import Namespace, NamespaceError

# Turned off so that TC programs and AF_PACKET sockets see frames as they would be on a wire:
# veth otherwise leaves checksums to a later stage (CHECKSUM_PARTIAL) and merges or keeps
# segments larger than the MTU.
OFFLOADS = ("rx", "tx", "tso", "gso", "gro")
LINK_UP_TIMEOUT = 30.0  # seconds; the kernel usually takes well under 10 ms, but linkwatch
# waits for the rtnl lock, which other work creating or deleting namespaces may hold for long


@dataclass(frozen=True)
class VethEnd:
    """One end of a veth pair to build: where it lives and which addresses it gets."""

    namespace: Namespace
    ifname: str
    ipv4: IPv4Interface
    ipv6: IPv6Interface | None = None


@dataclass(frozen=True)
class Endpoint:
    """One end of a built veth pair, up and addressed."""

    namespace: Namespace
    ifname: str
    ifindex: int
    mac: str
    ipv4: IPv4Interface
    ipv6: IPv6Interface | None


def mac_for(address: IPv4Address) -> str:
    """The MAC of the interface holding `address`: 02:00 (locally administered) + the address.

    198.18.1.1 gets 02:00:c6:12:01:01, so a MAC in a capture names its interface.
    """
    return "02:00:" + ":".join(f"{byte:02x}" for byte in address.packed)


def prepare_namespace(namespace: Namespace, *, ipv6: bool, forwarding: bool = False) -> None:
    """Set the sysctls that make interfaces created afterwards quiet, and bring lo up.

    Must run before the namespace's links exist: new interfaces copy the `default` settings.
    With `ipv6` false, IPv6 is disabled on new interfaces so that they send no link-local
    traffic at all. `forwarding` turns on IPv4 and IPv6 routing between interfaces.
    """
    # Traffic in tests often comes from addresses with no route back: never drop it for that.
    namespace.sysctl("net.ipv4.conf.all.rp_filter", 0)
    namespace.sysctl("net.ipv4.conf.default.rp_filter", 0)
    namespace.sysctl("net.ipv4.ip_forward", int(forwarding))
    if ipv6:
        # The kernel skips DAD only when both `all` and the interface say so.
        namespace.sysctl("net.ipv6.conf.all.accept_dad", 0)
        namespace.sysctl("net.ipv6.conf.default.accept_dad", 0)
        namespace.sysctl("net.ipv6.conf.default.dad_transmits", 0)
        namespace.sysctl("net.ipv6.conf.default.router_solicitations", 0)
        namespace.sysctl("net.ipv6.conf.all.forwarding", int(forwarding))
    else:
        namespace.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    with namespace.ipr() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def create_veth_pair(a: VethEnd, b: VethEnd) -> tuple[Endpoint, Endpoint]:
    """Create a veth pair from `a` to `b`, addressed, up, offloads off, neighbours permanent.

    The pair is created inside `a`'s namespace with its peer born directly in `b`'s, so no
    interface ever appears in the root namespace. Call prepare_namespace() on both first.
    """
    with a.namespace.ipr() as ipr:
        ipr.link(
            "add",
            ifname=a.ifname,
            kind="veth",
            address=mac_for(a.ipv4.ip),
            peer={
                "ifname": b.ifname,
                "address": mac_for(b.ipv4.ip),
                "net_ns_fd": b.namespace.name,
            },
        )
    ends = _configure(a, peer=b), _configure(b, peer=a)
    for end in ends:
        _wait_until_up(end)
    return ends


def _configure(end: VethEnd, peer: VethEnd) -> Endpoint:
    switches = [word for feature in OFFLOADS for word in (feature, "off")]
    # ethtool exits 0 when some features are fixed and cannot change; that is fine here.
    end.namespace.run(["ethtool", "-K", end.ifname, *switches])
    own = [address for address in (end.ipv4, end.ipv6) if address is not None]
    neighbours = [address for address in (peer.ipv4, peer.ipv6) if address is not None]
    with end.namespace.ipr() as ipr:
        ifindex = ipr.link_lookup(ifname=end.ifname)[0]
        for address in own:
            ipr.addr(
                "add", index=ifindex, address=str(address.ip), prefixlen=address.network.prefixlen
            )
        ipr.link("set", index=ifindex, state="up")
        # Added after the link is up: taking a link down flushes even permanent entries.
        for address in neighbours:
            ipr.neigh(
                "add",
                ifindex=ifindex,
                dst=str(address.ip),
                lladdr=mac_for(peer.ipv4.ip),
                state=NUD_PERMANENT,
            )
    return Endpoint(
        namespace=end.namespace,
        ifname=end.ifname,
        ifindex=ifindex,
        mac=mac_for(end.ipv4.ip),
        ipv4=end.ipv4,
        ipv6=end.ipv6,
    )


def _wait_until_up(end: Endpoint) -> None:
    # The kernel reports carrier changes asynchronously (linkwatch), and IPv6 configures an
    # interface only once it sees them: wait, so that a built pair is in its steady state.
    deadline = time.monotonic() + LINK_UP_TIMEOUT
    with end.namespace.ipr() as ipr:
        while ipr.link("get", index=end.ifindex)[0].get("operstate") != "UP":
            if time.monotonic() > deadline:
                raise NamespaceError(
                    f"{end.ifname} in namespace {end.namespace.name} is not up after "
                    f"{LINK_UP_TIMEOUT} s"
                )
            time.sleep(0.005)
