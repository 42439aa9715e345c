"""Whether a namespace hands bridged packets to iptables: a bridge device, and br_netfilter's
`bridge-nf-call-iptables` on inside it. There netfilter sees the bridge ports packets cross
(`-m physdev`) and filters bridged traffic in FORWARD; the programs here see neither, as they
run on the namespace's devices and judge routed packets only (codegen.rules.extensions.physdev).
"""

from __future__ import annotations

from pathlib import Path

from codegen.rules.extensions.physdev import uses_physdev
from codegen.rules.model import Ruleset
from netns.namespace import Namespace

CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def _bridge(link) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "bridge"


def filtering_bridges(namespace: Namespace) -> list[str]:
    """The namespace's bridge devices when br_netfilter passes their IPv4 traffic to
    iptables there, else none."""
    with namespace.ipr() as ipr:
        bridges = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if _bridge(link)]
    if not bridges:
        return []
    with namespace.enter():  # /proc/sys/net shows the namespace of the thread reading it
        try:
            enabled = CALL_IPTABLES.read_text().strip() != "0"
        except FileNotFoundError:  # no br_netfilter in this kernel
            enabled = False
    return sorted(bridges) if enabled else []


def physdev_refusal(ruleset: Ruleset, namespace: Namespace) -> str | None:
    """Why `ruleset` cannot be applied in `namespace` (None: it can): its -m physdev would
    need bridge ports the programs do not see."""
    if not uses_physdev(ruleset):
        return None
    bridges = filtering_bridges(namespace)
    if not bridges:
        return None
    return (
        f"-m physdev cannot be judged in namespace {namespace.name}: it bridges"
        f" ({', '.join(bridges)}) with bridge-nf-call-iptables on, and the programs do not see"
        " the bridge ports packets cross"
    )
