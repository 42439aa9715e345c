"""Generated programs attached in throwaway namespaces: INPUT and OUTPUT on a host, FORWARD on a
router through the kernel and through the program's own fast path, counters read back, an
atomic swap under a stream of packets, and failed updates that leave the old rules running."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from codegen.bpf.maps import Map
from codegen.rules import evaluate, parse
from codegen.tc import generator
from codegen.tc.generator import CompileError
from harness import backends
from harness.deploy import lifecycle
from netns import HostTopology, RouterTopology

pytestmark = [pytest.mark.netns, pytest.mark.privileged]
# The programs of both code generators are attached; the C one needs bcc.
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

PAYLOAD = b"probe-0123456789"
UDP_IP_LENGTH = 20 + 8 + len(PAYLOAD)


def rules(*lines: str, policies: str = "ACCEPT ACCEPT ACCEPT") -> str:
    inp, fwd, out = policies.split()
    return "\n".join(
        [
            "*filter",
            f":INPUT {inp} [0:0]",
            f":FORWARD {fwd} [0:0]",
            f":OUTPUT {out} [0:0]",
            *lines,
            "COMMIT",
            "",
        ]
    )


def udp_exchange(sender, receiver, ports, *, count=1, source_port=0) -> dict[int, int]:
    """Send `count` datagrams to each port from `sender` to `receiver`; how many arrived."""
    receivers = {}
    for port in ports:
        sock = receiver.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((str(receiver.ipv4.ip), port))
        sock.settimeout(0.3)
        receivers[port] = sock
    out = sender.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if source_port:
        out.bind((str(sender.ipv4.ip), source_port))
    arrived = dict.fromkeys(ports, 0)
    try:
        for port in ports:
            for _ in range(count):
                out.sendto(PAYLOAD, (str(receiver.ipv4.ip), port))
        for port, sock in receivers.items():
            for _ in range(count):
                try:
                    sock.recv(2048)
                except TimeoutError:
                    break
                arrived[port] += 1
    finally:
        out.close()
        for sock in receivers.values():
            sock.close()
    return arrived


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def host():
    with HostTopology(ipv6=False) as topology:
        yield topology
        if lifecycle.read_state(topology.host.namespace.name) is not None:
            lifecycle.flush(topology.host.namespace.name)


@pytest.fixture
def router():
    with RouterTopology(ipv6=False) as topology:
        yield topology
        if lifecycle.read_state(topology.router.namespace.name) is not None:
            lifecycle.flush(topology.router.namespace.name)


def test_input_and_output_on_a_host(host, backend):
    ns = host.host.namespace.name
    text = rules(
        "-A INPUT -p udp -m udp --dport 5001 -j ACCEPT",
        "-A INPUT -p udp -m udp --dport 5002 -j DROP",
        "-A OUTPUT -p udp -m udp --dport 6002 -j DROP",
    )
    lifecycle.apply(text, "host.rules", ns, backend=backend)
    assert udp_exchange(host.client, host.host, [5001, 5002, 5003], count=3) == {
        5001: 3,
        5002: 0,
        5003: 3,
    }
    assert udp_exchange(host.host, host.client, [6001, 6002], count=2) == {6001: 2, 6002: 0}
    _, counters = lifecycle.current(ns)
    assert counters[("INPUT", 1)] == (3, 3 * UDP_IP_LENGTH)
    assert counters[("INPUT", 2)] == (3, 3 * UDP_IP_LENGTH)
    assert counters[("INPUT", "policy")] == (3, 3 * UDP_IP_LENGTH)
    assert counters[("OUTPUT", 1)] == (2, 2 * UDP_IP_LENGTH)
    assert counters[("OUTPUT", "policy")] == (2, 2 * UDP_IP_LENGTH)


def _expected_counters(text: str, chain: str, packets: list[bytes], ins: str, outs: str | None):
    ruleset = parse(text, "expected.rules")
    total: dict = {}
    for packet in packets:
        for position, (p, b) in evaluate(ruleset, packet, chain, ins, outs).counters.items():
            total[position] = (
                total.get(position, (0, 0))[0] + p,
                total.get(position, (0, 0))[1] + b,
            )
    return total


CAPTURE_WAIT = 10.0  # seconds a frame that will come may take, on a busy machine


class Capture:
    """IPv4 frames arriving at `endpoint` from the moment this opens (an AF_PACKET socket keeps
    them queued), read back with `until`: no thread to start, no window to guess."""

    def __init__(self, endpoint) -> None:
        self.sock = endpoint.namespace.socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)
        )
        self.sock.bind((endpoint.ifname, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.frames: list[Ether] = []

    def until(self, done, timeout: float = CAPTURE_WAIT) -> list[Ether]:
        """Every frame so far, read until `done(frames)` holds (then whatever is already
        queued too) or `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.05)
        while not done(self.frames) and time.monotonic() < deadline:
            self._read()
        self.sock.setblocking(False)
        while self._read():
            pass
        return self.frames

    def _read(self) -> bool:
        try:
            data, address = self.sock.recvfrom(4096)
        except (TimeoutError, BlockingIOError):
            return False
        if address[2] != socket.PACKET_OUTGOING:
            self.frames.append(Ether(data))
        return True

    def close(self) -> None:
        self.sock.close()


def _forward(router, ports: list[int], count: int = 2) -> tuple[dict[int, int], list[Ether]]:
    capture = Capture(router.server)
    try:
        arrived = udp_exchange(router.client, router.server, ports, count=count)

        def forwarded(frames: list[Ether]) -> list[Ether]:
            return [f for f in frames if UDP in f and f[UDP].dport in ports]

        # A datagram the server's socket got went past the capture first.
        frames = capture.until(lambda frames: len(forwarded(frames)) >= sum(arrived.values()))
    finally:
        capture.close()
    return arrived, forwarded(frames)


@pytest.mark.parametrize("fastpath", [False, True], ids=["kernel-path", "fast-path"])
def test_forward_through_a_router(router, backend, fastpath):
    ns = router.router.namespace.name
    text = rules(
        "-A FORWARD -i eth0 -o eth1 -p udp -m udp --dport 7001 -j ACCEPT",
        "-A FORWARD -p udp -m udp --dport 7002 -j DROP",
        # Sent with TTL 64: FORWARD sees 63, as ip_forward decrements first.
        "-A FORWARD -p udp -m udp --dport 7004 -m ttl --ttl-eq 63 -j DROP",
        policies="ACCEPT ACCEPT ACCEPT",
    )
    lifecycle.apply(text, "router.rules", ns, fastpath=fastpath, backend=backend)
    arrived, frames = _forward(router, [7001, 7002, 7003, 7004])
    assert arrived == {7001: 2, 7002: 0, 7003: 2, 7004: 0}
    for frame in frames:
        assert frame[IP].ttl == 63  # decremented once, by the kernel or by the program
        assert frame.src == router.router.server_side.mac
        assert frame.dst == router.server.mac
        assert IP(bytes(frame[IP])).chksum == frame[IP].chksum  # checksum still right
    _, counters = lifecycle.current(ns)
    packet = bytes(
        IP(src=str(router.client.ipv4.ip), dst=str(router.server.ipv4.ip), ttl=64)
        / UDP(sport=1, dport=7001)
        / PAYLOAD
    )
    assert counters[("FORWARD", 1)] == (2, 2 * len(packet))
    assert counters[("FORWARD", 2)] == (2, 2 * len(packet))
    assert counters[("FORWARD", 3)] == (2, 2 * len(packet))
    assert counters[("FORWARD", "policy")] == (2, 2 * len(packet))


def test_fast_path_forwards_when_the_kernel_would_not(router, backend):
    """netfilter's own FORWARD chain drops everything in the router: only packets the program
    redirects itself can reach the server. (Turning forwarding off with the sysctl would not do:
    bpf_fib_lookup answers FWD_DISABLED for a device that does not forward.)"""
    namespace = router.router.namespace
    namespace.run(["iptables-legacy", "-P", "FORWARD", "DROP"])
    text = rules("-A FORWARD -p udp -m udp --dport 7001 -j ACCEPT", policies="ACCEPT DROP ACCEPT")
    lifecycle.apply(text, "router.rules", namespace.name, fastpath=False, backend=backend)
    assert _forward(router, [7001])[0] == {7001: 0}  # the kernel path is blocked
    lifecycle.apply(text, "router.rules", namespace.name, fastpath=True, backend=backend)
    arrived, frames = _forward(router, [7001, 7002])
    assert arrived == {7001: 2, 7002: 0}
    assert frames and all(frame[IP].ttl == 63 for frame in frames)
    kernel = namespace.run(["iptables-legacy", "-L", "FORWARD", "-v", "-n", "-x"]).stdout
    assert "policy DROP 2 packets" in kernel  # only the two kernel-path attempts reached it


SO_RCVBUFFORCE = 33  # root may size a receive buffer past the host-wide net.core.rmem_max


def test_atomic_swap_under_a_stream(host, backend):
    """Every packet gets one rule set's verdict or the other's, none is lost otherwise, and the
    two rule sets' counters add up to what was sent. The swap comes once the stream runs and the
    stream goes on past it, however long the swap takes (bcc compiles for seconds)."""
    ns = host.host.namespace.name
    accept = rules("-A INPUT -p udp -m udp --dport 5100 -j ACCEPT")
    drop = rules("-A INPUT -p udp -m udp --dport 5100 -j DROP")
    lifecycle.apply(accept, "accept.rules", ns, backend=backend)
    old_counters = Map.from_pin(str(lifecycle.PIN_ROOT / ns / "counters"))
    receiver = host.host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((str(host.host.ipv4.ip), 5100))
    receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 25)
    sender = host.client.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, limit, after_swap = 0, 40_000, 500
    deadline = time.monotonic() + 60
    running, swapped = threading.Event(), threading.Event()
    swapped_at: list[int] = []

    def stream() -> None:
        nonlocal sent
        while sent < limit and time.monotonic() < deadline:
            sender.sendto(PAYLOAD, (str(host.host.ipv4.ip), 5100))
            sent += 1
            if sent == after_swap:
                running.set()
            if swapped.is_set() and not swapped_at:
                swapped_at.append(sent)
            if swapped_at and sent >= swapped_at[0] + after_swap:
                return
            if sent % 50 == 0:
                time.sleep(0.02)  # about 2,500 a second, well within the receive buffer

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert running.wait(30), "the stream did not start"
        lifecycle.apply(drop, "drop.rules", ns, backend=backend)  # mid-stream
    finally:
        swapped.set()
        thread.join()
    from codegen.tc.layout import CounterLayout
    from harness.counters import CounterMap

    counted = time.monotonic() + CAPTURE_WAIT  # a packet still on its way is counted soon
    while True:
        with CounterMap(CounterLayout.of(parse(accept)), fd=old_counters.fd) as first:
            accepted = first.read()[("INPUT", 1)][0]
        dropped = lifecycle.current(ns)[1][("INPUT", 1)][0]
        if accepted + dropped >= sent or time.monotonic() > counted:
            break
        time.sleep(0.02)
    received = 0
    receiver.settimeout(CAPTURE_WAIT)
    try:
        while received < accepted:
            receiver.recv(2048)
            received += 1
        receiver.setblocking(False)
        while True:  # and any that should not be there
            receiver.recv(2048)
            received += 1
    except (TimeoutError, BlockingIOError):
        pass
    receiver.close()
    sender.close()
    assert swapped_at and sent == swapped_at[0] + after_swap  # the stream outlived the swap
    assert 0 < accepted < sent and dropped > 0  # the swap happened mid-stream
    assert received == accepted
    assert accepted + dropped == sent


def test_failed_updates_leave_the_old_rules_and_counters(host, monkeypatch):
    ns = host.host.namespace.name
    text = rules("-A INPUT -p udp -m udp --dport 5200 -j DROP")
    lifecycle.apply(text, "first.rules", ns)
    assert udp_exchange(host.client, host.host, [5200, 5201]) == {5200: 0, 5201: 1}
    before = lifecycle.current(ns)[1]

    deep = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    deep += [f":c{i} - [0:0]" for i in range(9)] + ["-A INPUT -j c0"]
    deep += [f"-A c{i} -j c{i + 1}" for i in range(8)] + ["COMMIT", ""]
    with pytest.raises(CompileError):
        lifecycle.apply("\n".join(deep), "deep.rules", ns)

    real = generator.compile_program

    def broken(*args, **kwargs):
        from codegen.bpf import insn as I
        from codegen.bpf.isa import R0, R2, Size

        compiled = real(*args, **kwargs)
        compiled.items[:0] = [
            I.ldx(Size.W, R0, R2, 0).annotate("an instruction the verifier refuses")
        ]
        return compiled

    monkeypatch.setattr(backends, "compile_program", broken)
    from codegen.bpf.loader import VerifierError

    with pytest.raises(VerifierError, match="the verifier refuses"):
        lifecycle.apply(rules(), "broken.rules", ns)
    assert lifecycle.current(ns)[1] == before
    assert udp_exchange(host.client, host.host, [5200, 5201]) == {5200: 0, 5201: 1}
    assert lifecycle.read_state(ns)["file"] == "first.rules"


@pytest.mark.bcc
def test_failed_c_updates_leave_the_old_rules_and_counters(host, monkeypatch):
    """The same with the C backend: bcc refusing the C, then the verifier refusing what bcc
    compiled, leave the applied rules running."""
    from codegen.bpf.loader import VerifierError
    from codegen.c import CCompileError
    from codegen.c import matches as c_matches
    from codegen.rules.extensions.length import Length

    ns = host.host.namespace.name
    first = rules("-A INPUT -p udp -m udp --dport 5200 -j DROP")
    lifecycle.apply(first, "first.rules", ns, backend="c")
    assert udp_exchange(host.client, host.host, [5200, 5201]) == {5200: 0, 5201: 1}
    before = lifecycle.current(ns)[1]
    broken = rules("-A INPUT -m length --length 0:40 -j ACCEPT")
    monkeypatch.setitem(c_matches.WRITERS, Length, lambda match, labels: ["not C;"])
    with pytest.raises(CCompileError, match="--length 0:40"):
        lifecycle.apply(broken, "broken.rules", ns, backend="c")

    def wild_read(match, labels):
        return [f"if (*(u32 *)(long)f->saddr == 1) goto {labels.miss};"]

    monkeypatch.setitem(c_matches.WRITERS, Length, wild_read)
    with pytest.raises(VerifierError, match="invalid mem access"):
        lifecycle.apply(broken, "broken.rules", ns, backend="c")
    assert lifecycle.current(ns)[1] == before
    assert udp_exchange(host.client, host.host, [5200, 5201]) == {5200: 0, 5201: 1}
    assert lifecycle.read_state(ns)["file"] == "first.rules"


def test_fragmented_datagrams_are_judged_by_their_first_fragment(host, backend):
    """netfilter's INPUT sees a datagram once, reassembled; here the first fragment decides and
    later ones pass, so an accepted datagram reassembles and a dropped one never does; later
    fragments add their bytes to the counter of the rule that judged the first."""
    ns = host.host.namespace.name
    text = rules("-A INPUT -p udp -m udp --dport 5353 -j ACCEPT", policies="DROP ACCEPT ACCEPT")
    lifecycle.apply(text, "fragments.rules", ns, backend=backend)
    big = b"z" * 4000  # over the 1500-byte MTU: three fragments
    arrived = {}
    for port in (5353, 5354):
        receiver = host.host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((str(host.host.ipv4.ip), port))
        receiver.settimeout(0.5)
        sender = host.client.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.sendto(big, (str(host.host.ipv4.ip), port))
        try:
            arrived[port] = len(receiver.recv(65535))
        except TimeoutError:
            arrived[port] = 0
        receiver.close()
        sender.close()
    assert arrived == {5353: len(big), 5354: 0}
    _, counters = lifecycle.current(ns)
    # Each datagram counted once, with its whole length, as INPUT counts it reassembled.
    whole = 20 + 8 + len(big)
    assert counters[("INPUT", 1)] == (1, whole)
    assert counters[("INPUT", "policy")] == (1, whole)


def test_output_judges_datagrams_the_kernel_fragments_once_and_raw_fragments_each(host, backend):
    """OUTPUT sees a datagram before ip_finish_output fragments it: its first fragment decides,
    the later ones follow and add their bytes to the rule's counter. A fragment an IPPROTO_RAW
    socket writes itself is what OUTPUT saw, so it is judged as it is: a later fragment
    matches no port and meets the policy."""
    ns = host.host.namespace.name
    text = rules("-A OUTPUT -p udp -m udp --dport 5353 -j ACCEPT", policies="ACCEPT ACCEPT DROP")
    lifecycle.apply(text, "fragments.rules", ns, backend=backend)
    receiver = host.client.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((str(host.client.ipv4.ip), 5353))
    receiver.settimeout(0.5)
    sender = host.host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
    big = b"z" * 4000  # over the 1500-byte MTU: three fragments
    try:
        sender.sendto(big, (str(host.client.ipv4.ip), 5353))
        assert len(receiver.recv(65535)) == len(big)
    finally:
        receiver.close()
        sender.close()
    _, counters = lifecycle.current(ns)
    assert counters[("OUTPUT", 1)] == (1, 20 + 8 + len(big))  # once, with its whole length
    later = IP(src=str(host.host.ipv4.ip), dst=str(host.client.ipv4.ip), id=0x4242, frag=64)
    later = later / UDP(sport=1, dport=5353) / (b"y" * 16)  # a port match never sees these
    # "Not sent" is decided by a probe the rules pass, sent after it: once the probe is in,
    # the fragment would be too.
    probe = IP(src=str(host.host.ipv4.ip), dst=str(host.client.ipv4.ip), id=0x4343)
    probe = probe / UDP(sport=2, dport=5353) / b"probe"
    capture = Capture(host.client)
    try:
        with host.host.namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            raw.sendto(bytes(later), (str(host.client.ipv4.ip), 0))
            raw.sendto(bytes(probe), (str(host.client.ipv4.ip), 0))
        frames = capture.until(lambda frames: any(f[IP].id == 0x4343 for f in frames if IP in f))
    finally:
        capture.close()
    assert any(IP in f and f[IP].id == 0x4343 for f in frames), "the probe did not arrive"
    assert not [f for f in frames if IP in f and f[IP].id == 0x4242]
    _, after = lifecycle.current(ns)
    assert after[("OUTPUT", "policy")][0] == counters.get(("OUTPUT", "policy"), (0, 0))[0] + 1
