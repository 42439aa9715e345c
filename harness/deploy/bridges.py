"""A namespace's bridges, as the programs need them: which devices are bridge ports (they get
the port programs, not the routed ones: a port is no IP device of its own), and which ports
belong to a bridge whose IPv4 traffic br_netfilter hands to iptables (`bridge-nf-call-iptables`
on inside the namespace): there netfilter filters bridged packets in FORWARD and -m physdev
sees the ports (codegen.tc.bridges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.tc.generator import BRIDGE_PORTS, BRIDGE_PORTS_ENTRIES, PORT_STAMP, STAMP_VALUE_SIZE
from netns.namespace import Namespace

CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


class BridgeError(Exception):
    """The namespace's bridges cannot be given to the programs."""


@dataclass(frozen=True)
class Bridges:
    """`ports`: every bridge port's ifindex -> its bridge's; `calls_iptables`: whether
    br_netfilter hands the bridges' IPv4 traffic to iptables (the namespace's sysctl)."""

    ports: dict[int, int] = field(default_factory=dict)
    calls_iptables: bool = False

    @property
    def filtering(self) -> dict[int, int]:
        """The ports whose bridge hands its traffic to iptables, as `ports`."""
        return self.ports if self.calls_iptables else {}


def _kind(link) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _calls_iptables(namespace: Namespace) -> bool:
    with namespace.enter():  # /proc/sys/net shows the namespace of the thread reading it
        try:
            return CALL_IPTABLES.read_text().strip() != "0"
        except FileNotFoundError:  # no br_netfilter in this kernel
            return False


def namespace_bridges(namespace: Namespace) -> Bridges:
    """The bridges of `namespace` as they are now."""
    with namespace.ipr() as ipr:
        links = ipr.get_links()
    bridges = {link["index"] for link in links if _kind(link) == "bridge"}
    ports = {
        link["index"]: link.get_attr("IFLA_MASTER")
        for link in links
        if link.get_attr("IFLA_MASTER") in bridges
    }
    if not bridges or not _calls_iptables(namespace):
        return Bridges(ports)
    if len(ports) > BRIDGE_PORTS_ENTRIES:
        raise BridgeError(
            f"namespace {namespace.name} has {len(ports)} bridge ports; the programs know at"
            f" most {BRIDGE_PORTS_ENTRIES}"
        )
    return Bridges(ports, calls_iptables=True)


def bridge_maps(filtering: dict[int, int]) -> dict[str, Map]:
    """The `bridge_ports` map holding `filtering`, and an empty `port_stamp` slot."""
    made: dict[str, Map] = {}
    try:
        shape = (MapType.HASH, 4, 4, BRIDGE_PORTS_ENTRIES)
        made[BRIDGE_PORTS] = ports = Map(*shape, name=BRIDGE_PORTS)
        for port, bridge in filtering.items():
            ports.update(port.to_bytes(4, "little"), bridge.to_bytes(4, "little"))
        made[PORT_STAMP] = Map(MapType.PERCPU_ARRAY, 4, STAMP_VALUE_SIZE, 1, name=PORT_STAMP)
    except BaseException:
        for table in made.values():
            table.close()
        raise
    return made
