"""`-m owner` against the kernel: a host whose processes, running as different users and
groups (forked, setgroups/setgid/setuid in the child), send datagrams to a client; a raw
IPPROTO_RAW packet; processes with supplementary groups, up to the most a cred holds
(--suppl-groups); a socket made by root and then used by a process that dropped to another
user; a socket fchown'd to another user (its sk_uid changes, the file's credentials do not:
what bpf_get_socket_uid answers is not what xt_owner reads); the kernel's own packets (an echo
reply and a RST, sent from its control sockets, which no file holds); and a SYN-ACK, which
carries a request socket that stands for its listener's owner. The same traffic goes through
iptables-legacy and through our attached programs (lifecycle apply, both backends), and every
rule's counters are what the reference evaluator says for the owners the test knows it gave.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from codegen.rules import evaluate, parse
from codegen.rules.extensions.owner import EXTENSION as OWNER
from codegen.rules.model import RuleError
from codegen.rules.packet import SocketOwner
from codegen.rules.validation import validate
from harness.deploy.lifecycle import apply, current, flush
from harness.lab.waiting import until
from netns import HostTopology
from netns.namespace import CommandError, Namespace
from tests.net.test_ipt_blob import assert_iptables_own, counters, restore, save

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:owned - [0:0]
-A OUTPUT -m owner --uid-owner 0
-A OUTPUT -m owner ! --uid-owner 0
-A OUTPUT -m owner --uid-owner 1000-1999
-A OUTPUT -m owner --gid-owner 2000
-A OUTPUT -m owner ! --gid-owner 2000-2999
-A OUTPUT -m owner --socket-exists
-A OUTPUT -m owner ! --socket-exists
-A OUTPUT -m owner --socket-exists --uid-owner 1500 --gid-owner 2500
-A OUTPUT -m owner ! --uid-owner 0 ! --gid-owner 0
-A OUTPUT -m owner --uid-owner 65534
-A OUTPUT -p icmp -m owner --socket-exists
-A OUTPUT -m owner --gid-owner 2000 --suppl-groups
-A OUTPUT -m owner ! --gid-owner 4000-4999 --suppl-groups
-A OUTPUT -m owner --gid-owner 70000 --suppl-groups
-A OUTPUT -m owner --uid-owner 1500 --gid-owner 9 --suppl-groups
-A OUTPUT -p tcp -j owned
-A OUTPUT -p udp -m owner --uid-owner 3000 -j DROP
-A owned -m owner --uid-owner 1500 -j RETURN
-A owned -m owner ! --uid-owner 0
COMMIT
"""
CLIENT, HOST = "198.18.0.1", "198.18.0.2"
LISTEN_PORT, CLOSED_PORT, ORPHAN_PORT = 7000, 7001, 7002
CHILD_TIMEOUT = 5.0  # seconds a forked sender may take
GAP = 0.02


@dataclass(frozen=True)
class Sent:
    """One packet the host's OUTPUT sees, as the reference is given it: its bytes (what the
    rules look at: the protocol and the length) and the socket it carries."""

    packet: bytes
    owner: SocketOwner | None


def _run_as(namespace: Namespace, uid: int, gid: int, groups: list[int], action: Callable) -> int:
    """Run `action(before)` in a forked child inside `namespace` as uid/gid/groups, where
    `before` is what `action.prepare()` made as root first (if it has one); bounded. Returns
    the errno its send failed with (netfilter's DROP in OUTPUT is EPERM), 0 if none."""
    prepare = getattr(action, "prepare", None)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            with namespace.enter():
                before = prepare() if prepare is not None else None
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
                try:
                    action(before)
                    code = 0
                except OSError as error:
                    code = 100 + (error.errno or 0)
                os._exit(code)  # inside the block: a dropped user cannot setns back
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the sender running as {uid}:{gid} did not finish")
        time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status)
    assert code == 0 or code >= 100, f"the sender as {uid}:{gid} failed"
    return max(code - 100, 0)


def _datagram(port: int, size: int) -> bytes:
    return bytes(IP(src=HOST, dst=CLIENT) / UDP(sport=port, dport=port) / (b"o" * size))


def _udp_sender(port: int, size: int) -> Callable:
    def send(_: object) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, port))
            sock.sendto(b"o" * size, (CLIENT, port))

    return send


def _made_by_root_then_used(port: int, size: int, chown: tuple[int, int] | None) -> Callable:
    """A UDP socket created by root (and maybe fchown'd), used after the drop to a user."""

    def prepare() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, port))
        if chown is not None:
            os.fchown(sock.fileno(), *chown)
        return sock

    def send(sock: socket.socket) -> None:
        sock.sendto(b"o" * size, (CLIENT, port))
        sock.close()

    send.prepare = prepare  # type: ignore[attr-defined]
    return send


def _raw_sender(port: int, size: int) -> Callable:
    def send(_: object) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            sock.sendto(_datagram(port, size), (CLIENT, 0))

    return send


class Lab:
    def __init__(self, topology: HostTopology):
        self.topology = topology
        self.host = topology.host.namespace
        client = topology.client.namespace
        self.client_socket = client.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.client_socket.bind((topology.client.ifname, 0))
        self.errors: dict[int, int] = {}  # uid -> the errno its datagram's send failed with

    def close(self) -> None:
        self.client_socket.close()

    def _frame(self, packet: IP) -> bytes:
        ether = Ether(src=self.topology.client.mac, dst=self.topology.host.mac, type=0x0800)
        return bytes(ether / packet)

    def send(self) -> list[Sent]:
        """All the traffic, in order; what the host's OUTPUT sees, with its owner."""
        sent: list[Sent] = []
        senders = (  # (uid, gid, groups, port, payload size)
            (0, 0, [], 5000, 10),
            (1500, 2500, [], 5001, 11),
            (1500, 2000, [], 5002, 12),
            (3000, 3000, [2000], 5003, 13),  # a supplementary group is not the fsgid
            (65534, 65534, [], 5004, 14),
            (999, 2999, [], 5005, 15),
            # --suppl-groups: the kernel sorts the list; the longest a cred may hold
            # (NGROUPS_MAX), with 70000 deep inside, and every even id up to 131070.
            (1500, 2500, [9], 5006, 16),
            (1600, 1600, [4500, 20, 10], 5007, 17),
            (1700, 1700, list(range(5000, 5000 + 65536)), 5008, 18),
            (1800, 1800, list(range(0, 2 * 65536, 2)), 5009, 19),
        )
        for uid, gid, groups, port, size in senders:
            failed = _run_as(self.host, uid, gid, groups, _udp_sender(port, size))
            self.errors[uid] = failed
            sent.append(Sent(_datagram(port, size), SocketOwner(uid, gid, tuple(groups))))
        # Made by root, used as 1500:2500: the file keeps root's credentials.
        _run_as(self.host, 1500, 2500, [], _made_by_root_then_used(5010, 20, None))
        sent.append(Sent(_datagram(5010, 20), SocketOwner(0, 0)))
        # fchown'd to 1500:2500 (sk_uid follows the inode, f_cred does not).
        _run_as(self.host, 0, 0, [], _made_by_root_then_used(5011, 21, (1500, 2500)))
        sent.append(Sent(_datagram(5011, 21), SocketOwner(0, 0)))
        _run_as(self.host, 0, 0, [], _raw_sender(5012, 22))
        sent.append(Sent(_datagram(5012, 22), SocketOwner(0, 0)))
        # The kernel's own packets: an echo reply, and a RST for a closed port.
        echo = IP(src=CLIENT, dst=HOST) / ICMP(type=8, id=77, seq=1) / (b"e" * 24)
        self.client_socket.send(self._frame(echo))
        reply = IP(src=HOST, dst=CLIENT) / ICMP(type=0, id=77, seq=1) / (b"e" * 24)
        sent.append(Sent(bytes(reply), SocketOwner(file=False)))
        time.sleep(GAP)
        syn = IP(src=CLIENT, dst=HOST) / TCP(sport=40000, dport=CLOSED_PORT, flags="S", seq=1)
        self.client_socket.send(self._frame(syn))
        rst = IP(src=HOST, dst=CLIENT) / TCP(sport=CLOSED_PORT, dport=40000, flags="RA")
        sent.append(Sent(bytes(rst), SocketOwner(file=False)))
        time.sleep(GAP)
        sent.append(self._syn_ack())
        sent += self._orphaned()
        time.sleep(0.2)
        return sent

    def _orphaned(self) -> list[Sent]:
        """A connection a process of 1500:2500 opens, writes to and closes first: what it
        sends carries its file's owner; the ACK of the client's FIN comes from the socket
        after close() orphaned it (sk_socket NULL), which owner_mt sees as no socket. The
        host's segments are taken from the client's capture (their options and lengths are
        the kernel's), in order: all but the last are the process's."""
        client = self.topology.client.namespace
        with client.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((CLIENT, ORPHAN_PORT))
            listener.listen(1)
            listener.settimeout(CHILD_TIMEOUT)
            self._drain()

            def talk(_: object) -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.settimeout(CHILD_TIMEOUT)
                    sock.connect((CLIENT, ORPHAN_PORT))
                    sock.sendall(b"x")

            assert _run_as(self.host, 1500, 2500, [], talk) == 0
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(CHILD_TIMEOUT)
                while connection.recv(64):
                    pass
            time.sleep(0.2)
        segments = [
            packet
            for packet in self._drain()
            if packet.haslayer(TCP)
            and packet[IP].src == HOST
            and packet[TCP].sport > 1024
            and packet[TCP].dport == ORPHAN_PORT
        ]
        flags = [str(packet[TCP].flags) for packet in segments]
        assert flags[0] == "S" and "F" in flags[-2] and flags[-1] == "A", flags
        owners = [SocketOwner(1500, 2500)] * (len(segments) - 1) + [None]
        return [
            Sent(bytes(packet[IP]), owner) for packet, owner in zip(segments, owners, strict=True)
        ]

    def _drain(self) -> list[Ether]:
        """The frames the client's capture holds (the host's, whole), emptying it."""
        frames: list[Ether] = []
        self.client_socket.setblocking(False)
        try:
            while True:
                try:
                    frame = self.client_socket.recv(65535)
                except BlockingIOError:
                    break
                frames.append(Ether(frame))
        finally:
            self.client_socket.setblocking(True)
        return [frame for frame in frames if frame.haslayer(IP)]

    def _syn_ack(self) -> Sent:
        """A SYN to a port a process of 1500:2500 listens on: the SYN-ACK carries the request
        socket, which stands for the listener. The client's kernel, which sent no SYN,
        answers it with a RST (host INPUT), which ends the request."""
        ready_read, ready_write = os.pipe()
        done_read, done_write = os.pipe()

        def listen(_: object) -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind((HOST, LISTEN_PORT))
                server.listen(4)
                os.write(ready_write, b"r")
                os.read(done_read, 1)  # until the SYN-ACK went out

        pid_holder: list[int] = []

        def fork_listener() -> None:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    with self.host.enter():
                        os.setgroups([])
                        os.setgid(2500)
                        os.setuid(1500)
                        listen(None)
                        code = 0
                        os._exit(code)
                finally:
                    os._exit(code)
            pid_holder.append(pid)

        fork_listener()
        try:
            os.close(ready_write)
            assert os.read(ready_read, 1) == b"r", "the listener did not start"
            syn = IP(src=CLIENT, dst=HOST) / TCP(sport=40001, dport=LISTEN_PORT, flags="S", seq=9)
            self.client_socket.send(self._frame(syn))
            time.sleep(0.2)
        finally:
            os.write(done_write, b"d")
            deadline = time.monotonic() + CHILD_TIMEOUT
            while not os.waitpid(pid_holder[0], os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(pid_holder[0], signal.SIGKILL)
                    os.waitpid(pid_holder[0], 0)
                    break
                time.sleep(0.01)
            for fd in (ready_read, done_read, done_write):
                os.close(fd)
        syn_ack = IP(src=HOST, dst=CLIENT) / TCP(
            sport=LISTEN_PORT, dport=40001, flags="SA", options=[("MSS", 1460)]
        )
        return Sent(bytes(syn_ack), SocketOwner(1500, 2500))


def expected(sent: list[Sent]) -> dict:
    """Every rule's counters as the reference adds them up (OUTPUT's policy is left out: it
    is not what this test is about)."""
    ruleset = parse(RULES, "owner")
    total = {key: (0, 0) for key in counters(ruleset) if key[1] != "policy"}
    for one in sent:
        result = evaluate(ruleset, one.packet, "OUTPUT", None, "eth0", owner=one.owner)
        for key, (packets, size) in result.counters.items():
            if key in total:
                total[key] = (total[key][0] + packets, total[key][1] + size)
    return total


@pytest.fixture
def lab():  # type: ignore[no-untyped-def]
    with HostTopology(ipv6=False) as topology:
        built = Lab(topology)
        try:
            yield built
        finally:
            built.close()


def test_iptables_counts_what_the_reference_says(lab: Lab, tmp_path: Path) -> None:
    restore(lab.host, RULES, tmp_path)
    sent = lab.send()
    want = expected(sent)
    kernel = until(
        lambda: counters(parse("\n".join(save(lab.host, counters=True)) + "\n", "kernel")),
        lambda kernel: {key: kernel[key] for key in want} == want,
    )
    assert {key: kernel[key] for key in want} == want
    # netfilter's DROP in OUTPUT fails the send (our TC programs drop after it returned).
    assert lab.errors == {
        **{0: 0, 1500: 0, 3000: errno.EPERM, 65534: 0, 999: 0},
        **{1600: 0, 1700: 0, 1800: 0},
    }
    # The traffic told the owners apart: root, a user range, a socket no file holds.
    assert kernel["OUTPUT", 1][0] == 4  # root's datagram, the used, fchown'd and raw ones
    assert kernel["OUTPUT", 7][0] == 1  # ! --socket-exists: the orphaned socket's ACK
    assert kernel["OUTPUT", 11][0] == 1  # the echo reply: a socket, but no file
    # --suppl-groups: 2000 is 1500:2000's fsgid and in 3000's and 1800's groups; 70000 in
    # 1700's and 1800's; 9 in the groups of one of the sockets of 1500 (as 1500:2500).
    assert kernel["OUTPUT", 12][0] == 3
    assert kernel["OUTPUT", 14][0] == 2
    assert kernel["OUTPUT", 15][0] == 1


@pytest.mark.parametrize(
    "backend", [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]
)
def test_our_programs_count_what_iptables_counts(lab: Lab, backend: str) -> None:
    apply(RULES, "owner", lab.host.name, backend=backend)
    try:
        sent = lab.send()
        want = expected(sent)
        ours = until(
            lambda: current(lab.host.name)[1], lambda ours: {key: ours[key] for key in want} == want
        )
    finally:
        flush(lab.host.name)
    assert {key: ours[key] for key in want} == want


# Every example, in OUTPUT and in a user chain OUTPUT reaches, and names as iptables takes
# them (libxt_owner looks a name up first; save and -L -n print numbers).
BLOB_RULES = (
    "*filter\n:owned - [0:0]\n-A OUTPUT -j owned\n"
    + "".join(f"-A OUTPUT {example} -j ACCEPT\n-A owned {example}\n" for example in OWNER.examples)
    + "-A OUTPUT -m owner --uid-owner root -m owner --gid-owner nogroup -j DROP\n"
    + "-A owned -m owner ! --uid-owner 0x10:020 ! --socket-exists\n"
    + "COMMIT\n"
)


def test_the_blob_save_and_listing_are_iptables_own(tmp_path: Path) -> None:
    saved = assert_iptables_own(BLOB_RULES, tmp_path)
    assert parse("\n".join(saved) + "\n", "saved") == parse(BLOB_RULES, "owner")


@pytest.mark.parametrize(
    ("rules", "kernel_says"),  # "line N failed": the kernel refused the table at COMMIT
    [
        ("-A INPUT -m owner --uid-owner 0", "failed"),
        ("-A FORWARD -m owner ! --socket-exists", "failed"),
        ("-A owned -m owner --gid-owner 0\n-A INPUT -j owned", "failed"),
        ("-A OUTPUT -m owner --uid-owner 20-10", "failed"),
        ("-A OUTPUT -m owner --uid-owner 4294967295", "Bad value"),
        ("-A OUTPUT -m owner --suppl-groups --gid-owner 3", "--gid-owner first"),
        ("-A OUTPUT -m owner ! --suppl-groups --gid-owner 3", "cannot be inverted"),
        ("-A OUTPUT -m owner", "At least one of"),
    ],
)
def test_what_iptables_refuses_we_refuse(rules: str, kernel_says: str, tmp_path: Path) -> None:
    text = f"*filter\n:owned - [0:0]\n{rules}\nCOMMIT\n"
    with Namespace() as ns:
        with pytest.raises(CommandError) as caught:
            restore(ns, text, tmp_path)
    assert kernel_says in caught.value.stderr
    with pytest.raises(RuleError):
        validate(parse(text, "refused"))
