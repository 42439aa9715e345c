"""Bridges whose traffic br_netfilter hands to iptables, in C (the bytecode's design:
codegen.tc.bridges): `bridge_ports` (port ifindex -> bridge ifindex) and the per-CPU
`port_stamp` are the caller's maps; the `port_ingress` program stamps each frame arriving at a
port; the `bridged` program, on a port's egress, judges what came in by another port of the
same bridge in FORWARD; the ingress program takes the stamp for a frame the bridge device
receives, when its length and bridge agree, as -m physdev's input port."""

from __future__ import annotations

from collections.abc import Sequence

from codegen.bpf.isa import MapType
from codegen.rules.extensions.physdev import reads_ports
from codegen.rules.model import Ruleset
from codegen.tc.generator import BRIDGE_PORTS, BRIDGE_PORTS_ENTRIES, PORT_STAMP, STAMP_VALUE_SIZE

from .entries import Entry
from .source_text import Code

MAP_SHAPES = {
    BRIDGE_PORTS: (MapType.HASH, 4, 4),
    PORT_STAMP: (MapType.PERCPU_ARRAY, 4, STAMP_VALUE_SIZE),
}


def needed(ruleset: Ruleset, entries: Sequence[Entry], bridges: bool) -> bool:
    """Whether a unit of `entries` reads the bridge maps (`bridges`: whether a bridge may hand
    packets to iptables)."""
    hooks = {entry.hook for entry in entries}
    return bool(hooks & {"bridged", "port_ingress"}) or (
        "ingress" in hooks and reads_ports(ruleset) and bridges
    )


def declarations(ports_entries: int = BRIDGE_PORTS_ENTRIES) -> Code:
    return [
        "// Bridge ports (codegen/c/bridges.py): the caller's maps, from their pins.",
        "struct port_stamp {",
        "    u32 port;  // 0: none",
        "    u32 len;  // the frame's skb->len",
        "};",
        f'BPF_TABLE_PINNED("hash", u32, u32, {BRIDGE_PORTS}, {ports_entries},',
        f'                 PIN_DIR "/{BRIDGE_PORTS}");',
        f'BPF_TABLE_PINNED("percpu_array", u32, struct port_stamp, {PORT_STAMP}, 1,',
        f'                 PIN_DIR "/{PORT_STAMP}");',
        "",
    ]


def port_ingress_function(name: str) -> Code:
    return [
        f"int {name}(struct __sk_buff *skb)",
        "{",
        "    u32 zero = 0;",
        f"    struct port_stamp *stamp = {PORT_STAMP}.lookup(&zero);",
        "",
        "    if (stamp) {",
        "        stamp->port = skb->ifindex;",
        "        stamp->len = skb->len;",
        "    }",
        "    return TC_ACT_OK;",
        "}",
        "",
    ]


# Before the facts: on unless the packet came in by another port of the same bridge.
BRIDGED_CHECK = [
    "// Bridged from another port of this port's bridge, or passed: OUTPUT and routed",
    "// FORWARD judged it on the bridge device, and what leaves by the port it came in on",
    "// is no bridged packet (a bridge sends none back; a REJECT answer of ours).",
    "if (skb->ingress_ifindex == skb->ifindex)",
    "    return TC_ACT_OK;",
    "u32 port = skb->ifindex;",
    f"u32 *bridge = {BRIDGE_PORTS}.lookup(&port);",
    "if (!bridge)",
    "    return TC_ACT_OK;",
    "u32 bridge_ifindex = *bridge;",
    "port = skb->ingress_ifindex;",
    f"bridge = {BRIDGE_PORTS}.lookup(&port);",
    "if (!bridge || *bridge != bridge_ifindex)",
    "    return TC_ACT_OK;",
]

# After the parser: br_nf_forward_ip's devices and packet type.
BRIDGED_FACTS = [
    "f->in_ifindex = bridge_ifindex;",
    "f->out_ifindex = bridge_ifindex;",
    "f->physin = skb->ingress_ifindex;",
    "f->physout = skb->ifindex;",
    "if (f->pkt_type == PACKET_OTHERHOST)",
    "    f->pkt_type = PACKET_HOST;",
]

STAMPED_PORT = [
    "// -m physdev: the port the bridge device's frame came in by, from its stamp.",
    "{",
    f"    struct port_stamp *stamp = {PORT_STAMP}.lookup(&zero);",
    "",
    "    if (stamp && stamp->port != 0 && stamp->len == skb->len) {",
    "        u32 port = stamp->port;",
    f"        u32 *bridge = {BRIDGE_PORTS}.lookup(&port);",
    "",
    "        if (bridge && *bridge == skb->ifindex) {",
    "            f->physin = port;",
    "            stamp->port = 0;",
    "        }",
    "    }",
    "}",
]
