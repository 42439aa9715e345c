"""Programs run by the kernel with BPF_PROG_TEST_RUN on packets built by scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from codegen.bpf import insn as I
from codegen.bpf.asm import Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R10, AluOp, JmpOp, MapType, Size, TcAction
from codegen.bpf.loader import load
from codegen.bpf.maps import Map, RingBuffer, sum_percpu
from codegen.bpf.testrun import SKB_OFFSETS, prog_test_run
from harness.demo import VERDICT_SLOTS, udp_port_filter

pytestmark = pytest.mark.privileged

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
A, B = "198.18.0.1", "198.18.0.2"

PACKETS = [
    ("udp to 53", ETH / IP(src=A, dst=B) / UDP(sport=1234, dport=53) / Raw(b"x"), TcAction.SHOT),
    ("udp to 54", ETH / IP(src=A, dst=B) / UDP(sport=1234, dport=54), TcAction.OK),
    ("udp from 53", ETH / IP(src=A, dst=B) / UDP(sport=53, dport=1234), TcAction.OK),
    ("udp to 13568 (53 byte-swapped)", ETH / IP(src=A, dst=B) / UDP(dport=13568), TcAction.OK),
    ("tcp to 53", ETH / IP(src=A, dst=B) / TCP(dport=53), TcAction.OK),
    ("icmp", ETH / IP(src=A, dst=B) / ICMP(), TcAction.OK),
    (
        "ip options push udp further",
        ETH / IP(src=A, dst=B, options=b"\x01" * 4) / UDP(dport=53),
        TcAction.OK,
    ),
    ("arp-sized frame", Ether(type=0x0806) / Raw(bytes(28)), TcAction.OK),
]


@pytest.fixture
def udp53():
    with Map(MapType.PERCPU_ARRAY, 4, 8, 2, name="verdicts") as verdicts:
        with load(udp_port_filter(53), name="udp53", maps={"verdicts": verdicts}) as program:
            yield program, verdicts


def test_udp_port_filter_verdicts_and_counter_subprogram(udp53):
    program, verdicts = udp53
    for description, packet, expected in PACKETS:
        result = prog_test_run(program.fd, bytes(packet))
        assert result.retval == expected, description
        assert result.data == bytes(packet)  # the filter never rewrites
    counts = {
        name: sum_percpu(verdicts.percpu_values(verdicts.lookup(slot)), "<Q")[0]
        for name, slot in VERDICT_SLOTS.items()
    }
    drops = sum(expected == TcAction.SHOT for _, _, expected in PACKETS)
    assert counts == {"drop": drops, "pass": len(PACKETS) - drops}


def test_repeat_counts_every_run_and_measures_time(udp53):
    program, verdicts = udp53
    result = prog_test_run(program.fd, bytes(PACKETS[0][1]), repeat=1000)
    assert result.retval == TcAction.SHOT
    assert result.duration_ns > 0
    assert sum_percpu(verdicts.percpu_values(verdicts.lookup(1)), "<Q")[0] == 1000


def test_context_in_and_out():
    # Copy ingress_ifindex into mark, so the context round trip is visible in ctx_out.
    program = [
        I.ldx(Size.W, R2, R1, SKB_OFFSETS["ingress_ifindex"]),
        I.alu64(AluOp.ADD, R2, 1000),
        I.stx(Size.W, R1, SKB_OFFSETS["mark"], R2),
        I.ldx(Size.W, R0, R1, SKB_OFFSETS["ifindex"]),
        I.exit_(),
    ]
    with load(program, name="ctx") as loaded:
        result = prog_test_run(
            loaded.fd, bytes(PACKETS[1][1]), ingress_ifindex=7, ifindex=1, mark=5
        )
    assert result.context is not None
    assert result.context.mark == 1007
    assert result.retval == 1  # lo's ifindex, in this namespace


def test_ringbuf_output():
    program = [
        I.ldx(Size.W, R2, R1, SKB_OFFSETS["len"]),
        I.stx(Size.DW, R10, -8, R2),
        I.ld_map_fd(R1, "events"),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, -8),
        I.mov64(R3, 8),
        I.mov64(R4, 0),
        I.call("ringbuf_output"),
        I.mov64(R0, TcAction.OK),
        I.exit_(),
    ]
    with RingBuffer(4096, name="events") as events:
        with load(program, name="ringbuf", maps={"events": events}) as loaded:
            for packet in (PACKETS[0][1], PACKETS[5][1]):
                prog_test_run(loaded.fd, bytes(packet))
        records = events.records()
    assert [int.from_bytes(r, "little") for r in records] == [
        len(PACKETS[0][1]),
        len(PACKETS[5][1]),
    ]


def test_kfunc_call_resolved_through_vmlinux_btf():
    program = [
        I.call_kfunc("bpf_cast_to_kern_ctx"),
        I.jmp(JmpOp.JEQ, R0, 0, "null"),
        I.mov64(R0, 1),
        I.exit_(),
        Label("null"),
        I.mov64(R0, 0),
        I.exit_(),
    ]
    with load(program, name="kfunc") as loaded:
        assert loaded.assembly.insns[0].kfunc == "bpf_cast_to_kern_ctx"
        assert prog_test_run(loaded.fd, bytes(PACKETS[1][1])).retval == 1
