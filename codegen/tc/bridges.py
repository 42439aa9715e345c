"""Bridges whose traffic br_netfilter hands to iptables (`bridge-nf-call-iptables` on): what the
programs on their ports do, and how the facts learn the ports -m physdev asks about.

- A bridged packet (in by one port, out by another of the same bridge) goes through FORWARD
  once per port it leaves by, with the bridge as in- and out-interface and the two ports as
  physdev's (br_nf_forward_ip). The `bridged` program, on each port's egress, judges it there:
  the kernel keeps the in-port in skb->skb_iif (the `ingress_ifindex` the program reads) and
  the out-port is the device. A frame the bridge floods is judged on every port, as netfilter
  judges every copy.
- A packet that goes up to the bridge device (INPUT, or routed on: FORWARD) carries its in-port
  in nf_bridge's physindev. The `port_ingress` program stamps each frame arriving at a port
  with the port and the frame's length in a per-CPU slot; the ingress program on the bridge
  device, which the kernel runs for that frame on the same CPU before any other frame, takes
  the stamp when its length and bridge agree and clears it.

The `bridge_ports` map (port ifindex -> bridge ifindex) holds the ports of such bridges only,
taken at apply: a port added later is seen at the next apply, as -i's names are.
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R6, R10, JmpOp, Size, TcAction
from codegen.bpf.testrun import SKB_OFFSETS

from .layout import FACTS, SCRATCH_OFFSET, Facts, map_and_key
from .parser import PACKET_HOST, PACKET_OTHERHOST

BRIDGE_PORTS = "bridge_ports"
PORT_STAMP = "port_stamp"
BRIDGE_PORTS_ENTRIES = 1024
STAMP_VALUE_SIZE = 8  # u32 port ifindex (0: none), u32 frame length
KEY = SCRATCH_OFFSET  # the lookups' u32 key
BRIDGE = SCRATCH_OFFSET + 4  # the bridged packet's bridge, kept across the parser


def _lookup(map_name: str, source: int, missing: str) -> list[Item]:
    """r0 = the value for the u32 at `source` of the context, or to `missing`."""
    return [
        I.ldx(Size.W, R1, R6, source),
        I.stx(Size.W, R10, KEY, R1),
        *map_and_key(map_name, KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, missing),
    ]


def stamp_program() -> list[Item]:
    """The whole `port_ingress` program: stamp the frame with its port, pass it on."""
    return [
        I.mov64(R6, R1),
        I.st(Size.W, R10, KEY, 0),
        *map_and_key(PORT_STAMP, KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, "stamped"),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["ifindex"]),
        I.stx(Size.W, R0, 0, R1),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["len"]),
        I.stx(Size.W, R0, 4, R1),
        Label("stamped"),
        I.mov64(R0, TcAction.OK),
        I.exit_(),
    ]


def bridged_prologue() -> list[Item]:
    """Before the parser, on a port's egress: on unless the packet came in by another port of
    the same bridge; what is not bridged passes untouched (OUTPUT and routed FORWARD judged it
    on the bridge device), and so does what leaves by the port it came in on (a bridge sends
    nothing back that way: it is a REJECT's answer, codegen.tc.replies)."""
    return [
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["ifindex"]),
        I.ldx(Size.W, R2, R6, SKB_OFFSETS["ingress_ifindex"]),
        I.jmp32(JmpOp.JEQ, R1, R2, "not_bridged"),
        *_lookup(BRIDGE_PORTS, SKB_OFFSETS["ifindex"], "not_bridged"),
        I.ldx(Size.W, R1, R0, 0),
        I.stx(Size.W, R10, BRIDGE, R1),
        *_lookup(BRIDGE_PORTS, SKB_OFFSETS["ingress_ifindex"], "not_bridged"),
        I.ldx(Size.W, R1, R0, 0),
        I.ldx(Size.W, R2, R10, BRIDGE),
        I.jmp32(JmpOp.JEQ, R1, R2, "bridged"),
        Label("not_bridged"),
        I.mov64(R0, TcAction.OK),
        I.exit_(),
        Label("bridged"),
    ]


def bridged_facts() -> list[Item]:
    """After the parser: the bridge is in- and out-interface, the ports are physdev's; a frame
    for another host is PACKET_HOST to FORWARD's matches (br_nf_forward_ip)."""
    return [
        I.ldx(Size.W, R1, R10, BRIDGE),
        I.stx(Size.W, FACTS, Facts.IN_IFINDEX.offset, R1),
        I.stx(Size.W, FACTS, Facts.OUT_IFINDEX.offset, R1),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["ingress_ifindex"]),
        I.stx(Size.W, FACTS, Facts.PHYS_IN.offset, R1),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["ifindex"]),
        I.stx(Size.W, FACTS, Facts.PHYS_OUT.offset, R1),
        I.ldx(Size.B, R1, FACTS, Facts.PKT_TYPE.offset),
        I.jmp32(JmpOp.JNE, R1, PACKET_OTHERHOST, "host_type"),
        I.st(Size.B, FACTS, Facts.PKT_TYPE.offset, PACKET_HOST),
        Label("host_type"),
    ]


def no_ports() -> list[Item]:
    """PHYS_IN and PHYS_OUT zero (the parser zeroes them only for rule sets that track)."""
    return [
        I.st(Size.W, FACTS, Facts.PHYS_IN.offset, 0),
        I.st(Size.W, FACTS, Facts.PHYS_OUT.offset, 0),
    ]


def tested_ports() -> list[Item]:
    """The chain program's ports, for INPUT and FORWARD (harness.runner): PHYS_IN from cb[3],
    PHYS_OUT from cb[4]."""
    return [
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["cb"] + 12),
        I.stx(Size.W, FACTS, Facts.PHYS_IN.offset, R1),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["cb"] + 16),
        I.stx(Size.W, FACTS, Facts.PHYS_OUT.offset, R1),
    ]


def stamped_port(done: str) -> list[Item]:
    """On an ingress device: PHYS_IN = the port of the stamp, taken, when its frame length
    matches and its bridge is this device; else it stays 0 and the stamp stays."""
    return [
        I.st(Size.W, R10, KEY, 0),
        *map_and_key(PORT_STAMP, KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        I.ldx(Size.W, R1, R0, 0),
        I.jmp32(JmpOp.JEQ, R1, 0, done),
        I.ldx(Size.W, R2, R0, 4),
        I.ldx(Size.W, R0, R6, SKB_OFFSETS["len"]),
        I.jmp32(JmpOp.JNE, R2, R0, done),
        I.stx(Size.W, R10, KEY, R1),
        I.stx(Size.W, FACTS, Facts.PHYS_IN.offset, R1),  # undone below unless it is ours
        *map_and_key(BRIDGE_PORTS, KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, f"{done}_not_ours"),
        I.ldx(Size.W, R1, R0, 0),
        I.ldx(Size.W, R2, R6, SKB_OFFSETS["ifindex"]),
        I.jmp32(JmpOp.JEQ, R1, R2, f"{done}_take"),
        Label(f"{done}_not_ours"),
        I.st(Size.W, FACTS, Facts.PHYS_IN.offset, 0),
        I.ja(done),
        Label(f"{done}_take"),
        I.st(Size.W, R10, KEY, 0),
        *map_and_key(PORT_STAMP, KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, done),
        I.st(Size.W, R0, 0, 0),
        Label(done),
    ]
