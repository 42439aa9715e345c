"""A stateful rule set attached in a namespace: real connections through the programs'
connection table, as a user has them (ingress and egress share it), and an atomic re-apply in
the middle of an established TCP connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest
from scapy.layers.inet import ICMP

from harness.deploy.lifecycle import apply, connection_table, connections, flush
from netns import HostTopology
from tests.net.test_cli_lifecycle import bpflab
from tests.net.test_tc_attached import rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

OPEN_PORT, CLOSED_PORT = 8080, 8081
CONNECT_TIMEOUT = 1.0  # seconds: a SYN the host drops leaves connect() waiting this long
ECHO_WAIT = 10.0  # seconds an echo that will come may take on a busy machine (only a bound)


def stateful(*new: str) -> str:
    """A host firewall: replies to what the host started, and the NEW connections `new`."""
    return rules(
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -m conntrack --ctstate INVALID -j DROP",
        *new,
        policies="DROP ACCEPT ACCEPT",
    )


@contextmanager
def echo_server(node, port: int) -> Iterator[None]:
    """A TCP server on `node` that echoes what each connection sends, until it closes."""
    listener = node.namespace.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((str(node.ipv4.ip), port))
    listener.listen(4)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                # Generous: a connection stays idle while a re-apply compiles, which with the
                # C backend on a busy machine takes several seconds; its client closes it.
                connection.settimeout(60)
                try:
                    while data := connection.recv(1024):
                        connection.sendall(data)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def connect(node, target, port: int) -> socket.socket:
    client = node.namespace.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(CONNECT_TIMEOUT)
    try:
        client.connect((str(target.ipv4.ip), port))
    except BaseException:
        client.close()
        raise
    return client


def echoes(client: socket.socket, data: bytes) -> bool:
    client.sendall(data)
    before = client.gettimeout()
    client.settimeout(ECHO_WAIT)
    try:
        return client.recv(1024) == data
    except TimeoutError:
        return False
    finally:
        client.settimeout(before)


@pytest.fixture(params=["bytecode", "c"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def test_a_stateful_host_lets_replies_in_and_nothing_else(backend: str) -> None:
    with HostTopology(ipv6=False) as lab:
        host, client = lab.host, lab.client
        netns = host.namespace.name
        try:
            opening = f"-A INPUT -p tcp --dport {OPEN_PORT} -m conntrack --ctstate NEW -j ACCEPT"
            apply(stateful(opening), "stateful.rules", netns, backend=backend)
            with echo_server(host, OPEN_PORT), echo_server(host, CLOSED_PORT):
                with closing(connect(client, host, OPEN_PORT)) as opened:
                    assert echoes(opened, b"hello")
                with pytest.raises(TimeoutError):
                    connect(client, host, CLOSED_PORT).close()
            # The host's own UDP query gets its answer (ESTABLISHED on the way in); the same
            # datagram unasked-for is dropped.
            assert udp_exchange(host, client, [5353], source_port=40000) == {5353: 1}
            assert udp_exchange(client, host, [40000], source_port=5353) == {40000: 1}
            assert udp_exchange(client, host, [40001], source_port=5353) == {40001: 0}
            tracker = connection_table(netns)
            assert tracker is not None
            with tracker:
                ports = {(entry.proto, entry.orig.dport) for entry in tracker.entries()}
            assert (socket.IPPROTO_TCP, OPEN_PORT) in ports
            assert (socket.IPPROTO_UDP, 5353) in ports
            assert (socket.IPPROTO_TCP, CLOSED_PORT) not in ports  # its SYN was dropped
        finally:
            flush(netns)


def test_a_re_apply_keeps_established_connections(backend: str) -> None:
    with HostTopology(ipv6=False) as lab:
        host, client = lab.host, lab.client
        netns = host.namespace.name
        opening = f"-A INPUT -p tcp --dport {OPEN_PORT} -m conntrack --ctstate NEW -j ACCEPT"
        try:
            apply(stateful(opening), "first.rules", netns, backend=backend)
            with echo_server(host, OPEN_PORT), closing(connect(client, host, OPEN_PORT)) as kept:
                assert echoes(kept, b"before")
                # The port closes to new connections; the one open goes on, its entry kept.
                applied = apply(stateful(), "second.rules", netns, backend=backend)
                assert applied.replaced
                assert echoes(kept, b"after")
                with pytest.raises(TimeoutError):
                    connect(client, host, OPEN_PORT).close()
        finally:
            flush(netns)


def _without_timeout(line: str) -> tuple[str, int]:
    """A conntrack -L line without its seconds-left field (the third), and that field."""
    name, number, seconds, rest = line.split(maxsplit=3)
    return f"{name} {number} {rest}", int(seconds)


def test_the_table_lists_as_the_kernels_conntrack_does(backend: str) -> None:
    """The same traffic tracked by the kernel (a ct rule turns its conntrack on) and by the
    programs: `conntrack -L` and bpflab's listing give the same lines, the seconds left aside
    (they may differ by the time between the two reads)."""
    with HostTopology(ipv6=False) as lab:
        host, client = lab.host, lab.client
        netns = host.namespace.name
        host.namespace.run(
            [
                "iptables-legacy",
                "-A",
                "INPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "ACCEPT",
            ]
        )
        try:
            apply(
                rules("-A INPUT -m conntrack --ctstate INVALID -j ACCEPT"),
                "t.rules",
                netns,
                backend=backend,
            )
            assert udp_exchange(client, host, [5353], source_port=40000) == {5353: 1}
            assert udp_exchange(host, client, [5354], source_port=40001) == {5354: 1}
            assert udp_exchange(client, host, [40001], source_port=5354) == {40001: 1}
            ping = client.namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            with closing(ping):
                ping.settimeout(1)
                ping.sendto(bytes(ICMP(type=8, id=1, seq=1)), (str(host.ipv4.ip), 0))
                ping.recv(64)  # the host's echo reply
            with echo_server(host, OPEN_PORT), closing(connect(client, host, OPEN_PORT)) as kept:
                assert echoes(kept, b"tracked")
                kernel = host.namespace.run(["conntrack", "-L"]).stdout.splitlines()
                ours = connections(netns)
            theirs = dict(_without_timeout(line) for line in kernel)
            mine = dict(_without_timeout(line) for line in ours)
            assert sorted(mine) == sorted(theirs)
            for line, seconds in mine.items():
                assert abs(seconds - theirs[line]) <= 2, line
        finally:
            flush(netns)


def test_bpflab_conntrack_lists_and_flushes(tmp_path) -> None:
    stateless, stateful_rules = tmp_path / "stateless.rules", tmp_path / "stateful.rules"
    stateless.write_text(rules())
    stateful_rules.write_text(stateful("-A INPUT -p udp --dport 5353 -j ACCEPT"))
    with HostTopology(ipv6=False) as lab:
        netns = lab.host.namespace.name
        try:
            assert bpflab("apply", str(stateless), "--netns", netns).returncode == 0
            refused = bpflab("conntrack", "--netns", netns)
            assert (refused.returncode, refused.stderr) == (
                2,
                f"bpflab: error: namespace {netns} has no connection table: no rule set with "
                "-m conntrack or -m state was applied there\n",
            )
            assert bpflab("apply", str(stateful_rules), "--netns", netns).returncode == 0
            assert udp_exchange(lab.client, lab.host, [5353], source_port=40000) == {5353: 1}
            listed = bpflab("conntrack", "--netns", netns)
            assert listed.returncode == 0, listed.stderr
            (line,) = listed.stdout.splitlines()
            assert line.startswith("udp      17 ") and "sport=40000 dport=5353 [UNREPLIED]" in line
            assert listed.stderr == "bpflab: 1 flow entries have been shown.\n"
            flushed = bpflab("conntrack", "-F", "--netns", netns)
            assert flushed.returncode == 0, flushed.stderr
            assert bpflab("conntrack", "--netns", netns).stdout == ""
        finally:
            flush(netns)
