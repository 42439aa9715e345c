"""A bridge lab: two clients on the ports of a bridge whose host also routes to a server.

```
client1 eth0 198.18.4.2/24 <--> port1 ┐
                                      ├ br0 198.18.4.1/24   (the bridge host)
client2 eth0 198.18.4.3/24 <--> port2 ┘
                                        eth1 198.18.5.1/24 <--> server eth0 198.18.5.2/24
```
The clients' default route is the bridge's address, the server's the host's eth1. Ports carry
no address; the bridge's MAC is its address's (netns.veth.mac_for), the ports' 02:01 and the
same bytes as their client's. Neighbours and the bridge's forwarding entries are permanent,
so no ARP and no flooding move frames the tests do not send. With `call_iptables` (the
default) br_netfilter hands the bridge's IPv4 traffic to iptables in the host's namespace.
IPv4 only.
"""

from __future__ import annotations

from contextlib import ExitStack
from ipaddress import IPv4Interface

from netns.namespace import Namespace
from netns.topology import Topology
from netns.veth import Endpoint, VethEnd, create_veth_pair, mac_for

BRIDGE = IPv4Interface("198.18.4.1/24")
CLIENTS = (IPv4Interface("198.18.4.2/24"), IPv4Interface("198.18.4.3/24"))
UPLINK = IPv4Interface("198.18.5.1/24")
SERVER = IPv4Interface("198.18.5.2/24")


def port_mac(client: IPv4Interface) -> str:
    return "02:01:" + mac_for(client.ip)[6:]


class BridgeTopology(Topology):
    """See the module doc. `host`: the bridge host's namespace; `clients`: the two clients'
    ends; `ports`: the port names, in the clients' order; `bridge_side`: the bridge device as
    the clients see the host; `uplink`, `server`: the routed link."""

    host: Namespace
    clients: tuple[Endpoint, Endpoint]
    bridge_side: Endpoint
    ports: tuple[str, str] = ("port1", "port2")
    bridge: str = "br0"
    uplink: Endpoint
    server: Endpoint

    def __init__(self, *, call_iptables: bool = True) -> None:
        super().__init__(ipv6=False)
        self.call_iptables = call_iptables

    def _build(self, stack: ExitStack) -> None:
        host = self.host = self._namespace(stack, forwarding=True)
        run = host.run
        run(["ip", "link", "add", self.bridge, "address", mac_for(BRIDGE.ip), "type", "bridge"])
        run(["ip", "link", "set", self.bridge, "type", "bridge", "stp_state", "0"])
        run(["ip", "address", "add", str(BRIDGE), "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        self.bridge_side = _endpoint(host, self.bridge, BRIDGE)
        clients = []
        for port, address in zip(self.ports, CLIENTS, strict=True):
            client = self._namespace(stack)
            mac = mac_for(address.ip)
            run(
                ["ip", "link", "add", port, "address", port_mac(address), "type", "veth"]
                + ["peer", "name", "eth0", "address", mac, "netns", client.name]
            )
            run(["ip", "link", "set", port, "master", self.bridge, "up"])
            for feature in ("rx", "tx", "tso", "gso", "gro"):
                run(["ethtool", "-K", port, feature, "off"])
                client.run(["ethtool", "-K", "eth0", feature, "off"])
            client.run(["ip", "address", "add", str(address), "dev", "eth0"])
            client.run(["ip", "link", "set", "eth0", "up"])
            run(["bridge", "fdb", "replace", mac, "dev", port, "master", "static"])
            run(
                ["ip", "neigh", "replace", str(address.ip), "lladdr", mac, "dev", self.bridge]
                + ["nud", "permanent"]
            )
            client.run(["ip", "route", "add", "default", "via", str(BRIDGE.ip)])
            clients.append(client)
        for client, address in zip(clients, CLIENTS, strict=True):
            others = [(BRIDGE, mac_for(BRIDGE.ip))] + [
                (other, mac_for(other.ip)) for other in CLIENTS if other != address
            ]
            for other, mac in others:
                client.run(
                    ["ip", "neigh", "replace", str(other.ip), "lladdr", mac, "dev", "eth0"]
                    + ["nud", "permanent"]
                )
        self.clients = tuple(  # type: ignore[assignment]
            _endpoint(client, "eth0", address)
            for client, address in zip(clients, CLIENTS, strict=True)
        )
        server = self._namespace(stack)
        self.uplink, self.server = create_veth_pair(
            VethEnd(host, "eth1", UPLINK), VethEnd(server, "eth0", SERVER)
        )
        server.run(["ip", "route", "add", "default", "via", str(UPLINK.ip)])
        host.sysctl("net.bridge.bridge-nf-call-iptables", int(self.call_iptables))


def _endpoint(namespace: Namespace, ifname: str, address: IPv4Interface) -> Endpoint:
    with namespace.ipr() as ipr:
        ifindex = ipr.link_lookup(ifname=ifname)[0]
    return Endpoint(namespace, ifname, ifindex, mac_for(address.ip), address, None)
