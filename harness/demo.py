"""The built-in demonstration: assemble a small filter, let the verifier judge it, test-run it.

The filter drops UDP to one port and passes everything else; each packet's verdict is counted in
a per-CPU array by a BPF-to-BPF subprogram, so the demonstration shows the pieces the generators
stand on: packet parsing with bounds checks, a map, a subprogram call and the verifier's stats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram
from codegen.bpf.disasm import listing
from codegen.bpf.isa import R0, R1, R2, R3, R10, AluOp, JmpOp, MapType, Size, TcAction
from codegen.bpf.loader import load
from codegen.bpf.maps import Map, sum_percpu
from codegen.bpf.testrun import prog_test_run

ETH_P_IP = 0x0800
IPPROTO_UDP = 17
SKB_DATA, SKB_DATA_END = 76, 80  # offsets in struct __sk_buff
VERDICT_SLOTS = {"pass": 0, "drop": 1}


def udp_port_filter(port: int) -> list[Item]:
    """Drop IPv4 UDP to `port` (TC_ACT_SHOT), pass the rest; count verdicts in map `verdicts`."""
    return [
        I.ldx(Size.W, R2, R1, SKB_DATA).annotate("load data, data_end"),
        I.ldx(Size.W, R3, R1, SKB_DATA_END),
        # Ethernet (14) + minimal IPv4 header (20) + UDP ports (4) must be in the packet.
        I.mov64(R1, R2).annotate("bounds check for Ethernet, IPv4 and UDP ports"),
        I.alu64(AluOp.ADD, R1, 14 + 20 + 4),
        I.jmp(JmpOp.JGT, R1, R3, "pass"),
        I.ldx(Size.H, R1, R2, 12).annotate("EtherType is IPv4"),
        I.jmp(JmpOp.JNE, R1, _be16(ETH_P_IP), "pass"),
        I.ldx(Size.B, R1, R2, 14 + 9).annotate("protocol is UDP"),
        I.jmp(JmpOp.JNE, R1, IPPROTO_UDP, "pass"),
        I.ldx(Size.B, R1, R2, 14).annotate("header length is 20 (no options)"),
        I.jmp(JmpOp.JNE, R1, 0x45, "pass"),
        I.ldx(Size.H, R1, R2, 14 + 20 + 2).annotate(f"destination port is {port}"),
        I.jmp(JmpOp.JNE, R1, _be16(port), "pass"),
        I.mov64(R1, VERDICT_SLOTS["drop"]).annotate("count and drop"),
        I.call_local("count"),
        I.mov64(R0, TcAction.SHOT),
        I.exit_(),
        Label("pass"),
        I.mov64(R1, VERDICT_SLOTS["pass"]).annotate("count and pass"),
        I.call_local("count"),
        I.mov64(R0, TcAction.OK),
        I.exit_(),
        *count_subprogram("count", "verdicts"),
    ]


def count_subprogram(name: str, map_name: str) -> list[Item]:
    """Subprogram `name`(r1 = slot): add one packet to slot r1 of the per-CPU array `map_name`."""
    return [
        Subprogram(name),
        I.stx(Size.W, R10, -4, R1).annotate(f"subprogram {name}: look up the slot"),
        I.ld_map_fd(R1, map_name),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, -4),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, "count_done"),
        I.ldx(Size.DW, R1, R0, 0).annotate("add one (per-CPU value: no atomics needed)"),
        I.alu64(AluOp.ADD, R1, 1),
        I.stx(Size.DW, R0, 0, R1),
        Label("count_done"),
        I.mov64(R0, 0),
        I.exit_(),
    ]


def _be16(value: int) -> int:
    """A 16-bit constant as a little-endian load of big-endian packet bytes reads it."""
    return int.from_bytes(value.to_bytes(2, "big"), "little")


@dataclass
class DemoResult:
    description: str
    verdict: str


def demo_packets() -> list[tuple[str, bytes]]:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    base = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    src, dst = "198.18.0.1", "198.18.0.2"
    return [
        (
            "UDP 198.18.0.1:4000 -> 198.18.0.2:53 (DNS)",
            bytes(base / IP(src=src, dst=dst) / UDP(sport=4000, dport=53) / Raw(b"q")),
        ),
        (
            "UDP 198.18.0.1:4000 -> 198.18.0.2:123 (NTP)",
            bytes(base / IP(src=src, dst=dst) / UDP(sport=4000, dport=123)),
        ),
        (
            "TCP 198.18.0.1:4000 -> 198.18.0.2:53",
            bytes(base / IP(src=src, dst=dst) / TCP(sport=4000, dport=53, flags="S")),
        ),
        ("ICMP echo 198.18.0.1 -> 198.18.0.2", bytes(base / IP(src=src, dst=dst) / ICMP())),
        (
            "UDP to port 53 cut short inside the UDP header (36 bytes)",
            bytes(base / IP(src=src, dst=dst) / UDP(sport=4000, dport=53))[:36],
        ),
    ]


def run_demo(say: Callable[[str], None] = print) -> int:
    """Print the program, the verifier's statistics and each packet's verdict; 0 if all as meant."""
    program = udp_port_filter(53)
    with Map(MapType.PERCPU_ARRAY, 4, 8, 2, name="verdicts") as verdicts:
        with load(program, name="demo_udp53", maps={"verdicts": verdicts}) as loaded:
            say("Program: drop UDP to port 53, pass the rest (annotated disassembly)")
            say(listing(list(loaded.assembly.insns)))
            stats = loaded.stats
            if stats is not None:
                say(
                    f"\nVerifier: accepted {loaded.insn_count} instructions, processed "
                    f"{stats.insns_processed}, {stats.states_total} states, "
                    f"{stats.verification_usec} us\n"
                )
            expected = ["drop", "pass", "pass", "pass", "pass"]
            failures = 0
            for (description, frame), want in zip(demo_packets(), expected, strict=True):
                result = prog_test_run(loaded.fd, frame)
                verdict = {TcAction.OK: "pass", TcAction.SHOT: "drop"}.get(
                    result.retval, str(result.retval)
                )
                mark = "ok" if verdict == want else f"WRONG (expected {want})"
                failures += verdict != want
                say(f"  {verdict:5} {description}  [{mark}]")
        counts = {
            name: sum_percpu(verdicts.percpu_values(verdicts.lookup(slot) or b""), "<Q")[0]
            for name, slot in VERDICT_SLOTS.items()
        }
    say(f"\nCounters (per-CPU array, summed): pass={counts['pass']} drop={counts['drop']}")
    counted_right = counts == {"pass": expected.count("pass"), "drop": expected.count("drop")}
    if not counted_right:
        say("counters disagree with the verdicts")
    return 0 if failures == 0 and counted_right else 1
