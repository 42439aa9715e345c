"""The kernel side of the toolchain in throwaway namespaces: bpf_fib_lookup answers from the
namespace's own routes and neighbours, and a program attached to a veth decides what arrives, then
is replaced atomically (tcx link update, or cls_bpf filter replace)."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R6, R7, R10, AluOp, FibResult, JmpOp, MapType, Size
from codegen.bpf.links import attach_tc
from codegen.bpf.loader import load
from codegen.bpf.maps import Map
from codegen.bpf.testrun import prog_test_run
from harness.demo import udp_port_filter
from netns import HostTopology, RouterTopology

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

AF_INET = 2
PARAMS = 64  # sizeof(struct bpf_fib_lookup)


def _le32(address: IPv4Address) -> int:
    """A network-order address as the 32-bit immediate a little-endian store writes."""
    return int.from_bytes(address.packed, "little")


def fib_program(ifindex: int, source: IPv4Address, destination: IPv4Address) -> list:
    """Look up source -> destination arriving on ifindex; copy the parameters block to map
    `result` and return the lookup's result code."""
    frame = -PARAMS
    return [
        I.mov64(R6, R1),
        *[I.st(Size.DW, R10, frame + 8 * i, 0) for i in range(PARAMS // 8)],
        I.st(Size.B, R10, frame + 0, AF_INET),
        I.st(Size.W, R10, frame + 8, ifindex),
        I.st(Size.W, R10, frame + 16, _le32(source)),
        I.st(Size.W, R10, frame + 32, _le32(destination)),
        I.mov64(R1, R6),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, frame),
        I.mov64(R3, PARAMS),
        I.mov64(R4, 0),
        I.call("fib_lookup"),
        I.mov64(R7, R0),
        I.st(Size.W, R10, frame - 4, 0),
        I.ld_map_fd(R1, "result"),
        I.mov64(R2, R10),
        I.alu64(AluOp.ADD, R2, frame - 4),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, "out"),
        *[
            insn
            for i in range(PARAMS // 8)
            for insn in (I.ldx(Size.DW, R1, R10, frame + 8 * i), I.stx(Size.DW, R0, 8 * i, R1))
        ],
        Label("out"),
        I.mov64(R0, R7),
        I.exit_(),
    ]


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@pytest.fixture(scope="module")
def router():
    with RouterTopology(ipv6=False) as topology:
        yield topology


def _lookup(router, source, destination) -> tuple[int, int, str, str]:
    ns = router.router.namespace
    with Map(MapType.ARRAY, 4, PARAMS, 1, name="result") as result:
        program = fib_program(router.router.client_side.ifindex, source, destination)
        with load(program, name="fib", maps={"result": result}) as loaded, ns.enter():
            # bpf_fib_lookup resolves in the namespace of the skb's device: test-run takes it
            # from the calling thread, so the run happens inside the router's namespace.
            code = prog_test_run(loaded.fd, bytes(64)).retval
        params = result.lookup(0)
    ifindex = struct.unpack_from("<I", params, 8)[0]
    return code, ifindex, _mac(params[52:58]), _mac(params[58:64])


def test_fib_lookup_forwards_to_the_server(router):
    code, ifindex, smac, dmac = _lookup(router, router.client.ipv4.ip, router.server.ipv4.ip)
    assert code == FibResult.SUCCESS
    assert ifindex == router.router.server_side.ifindex
    assert smac == router.router.server_side.mac
    assert dmac == router.server.mac


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("198.18.2.77", FibResult.NO_NEIGH),  # on the server's subnet, no neighbour entry
        ("198.19.200.1", FibResult.NOT_FWDED),  # no route at all
        ("router-self", FibResult.NOT_FWDED),  # local: for INPUT, not FORWARD
    ],
)
def test_fib_lookup_result_codes(router, destination, expected):
    if destination == "router-self":
        destination = str(router.router.client_side.ipv4.ip)
    code, _, _, _ = _lookup(router, router.client.ipv4.ip, IPv4Address(destination))
    assert code == expected


def drop_port(port: int) -> list:
    return udp_port_filter(port)


def _delivered(topology: HostTopology, ports: list[int]) -> set[int]:
    """Send one datagram from client to host for each port; which ones arrived?"""
    host, client = topology.host, topology.client
    receivers = {}
    for port in ports:
        receiver = host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((str(host.ipv4.ip), port))
        receiver.settimeout(0.5)
        receivers[port] = receiver
    sender = client.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrived = set()
    try:
        for port in ports:
            sender.sendto(b"probe", (str(host.ipv4.ip), port))
        for port, receiver in receivers.items():
            try:
                if receiver.recv(64) == b"probe":
                    arrived.add(port)
            except TimeoutError:
                pass
    finally:
        sender.close()
        for receiver in receivers.values():
            receiver.close()
    return arrived


@pytest.mark.parametrize("mode", ["tcx", "cls_bpf"])
def test_attach_then_replace_changes_verdicts(mode):
    with (
        HostTopology(ipv6=False) as topology,
        Map(MapType.PERCPU_ARRAY, 4, 8, 2, name="verdicts") as verdicts,
    ):
        maps = {"verdicts": verdicts}
        host = topology.host
        assert _delivered(topology, [53, 54]) == {53, 54}
        with (
            load(drop_port(53), name="drop53", maps=maps) as first,
            load(drop_port(54), name="drop54", maps=maps) as second,
        ):
            with host.namespace.enter():
                attachment = attach_tc(first.fd, host.ifindex, "ingress", mode=mode)
            assert attachment.mode == mode
            try:
                assert _delivered(topology, [53, 54]) == {54}
                with host.namespace.enter():
                    attachment.replace(second.fd, name="drop54")
                assert _delivered(topology, [53, 54]) == {53}
            finally:
                with host.namespace.enter():
                    attachment.detach()
        assert _delivered(topology, [53, 54]) == {53, 54}
