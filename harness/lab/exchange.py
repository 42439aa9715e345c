"""Real connections between two nodes of a lab, made by the kernels' own stacks.

A packet script entry with `exchange = "tcp" | "udp" | "ping"` asks for one (see "Real
connections" in docs/packet-scripts.md). The outcome is what the initiator (`from`) sees:
- "connects": the echo came back (TCP, UDP) or the echo reply did (ping);
- "refused": an answer saying no: a TCP RST, or an ICMP error about the flow;
- "times out": nothing within the time allowed (1.5 s for TCP, time for
  one retransmitted SYN; half a second for UDP and ping).

The lab's nodes are quiet (their kernels' answers to crafted packets are dropped in the raw
table). For the length of one exchange, every node's raw-table chain `bl_exchange`, which
PREROUTING and OUTPUT jump to ahead of the quiet rules, accepts exactly that exchange's packets:
its 5-tuple both ways (the initiator's source port comes from the lab's reserved range, so the
tuple is known in advance), and ICMP to the initiator from anyone. It is emptied afterwards.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

from scapy.layers.inet import ICMP, IP, ICMPerror, IPerror
from scapy.packet import Raw

from .traffic import Lab, Node

CONNECT_TIMEOUT = 1.5  # TCP: connect (a dropped SYN is sent again at 1 s), each read of the echo
ANSWER_TIMEOUT = 0.5  # UDP and ping: a veth round trip between namespaces takes well under 1 ms
RESPONDER_LIFETIME = 10.0  # a responder thread never outlives this, whatever happens
SETTLE = 0.1  # after the exchange: the last packets (a TCP close) cross before the chain empties
PAYLOAD = b"bpflab exchange"
# errnos an ICMP error (or a RST) turns into on a socket: the flow was refused
REFUSED_ERRNOS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EACCES,
    errno.EPERM,
    errno.ECONNRESET,
}
ICMP_ERRORS = (3, 4, 5, 11, 12)  # unreachable, source quench, redirect, time exceeded, parameter
PROTOCOLS = {"tcp": "tcp", "udp": "udp", "ping": "icmp"}


@dataclass
class Outcome:
    outcome: str  # "connects", "refused" or "times out"
    detail: str  # what was seen, for a mismatch report


def run_exchange(
    lab: Lab, source: str, destination: str, kind: str, port: int | None, listen: bool = True
) -> Outcome:
    """One real `kind` exchange ("tcp", "udp", "ping") from `source` to `destination`'s `port`;
    with `listen`, a responder runs on `destination` (ping: its kernel answers)."""
    initiator, responder = lab.node(source, destination), lab.node(destination, source)
    sport = lab.next_port()  # the source port, or the ping id
    with _opened(lab, kind, initiator, responder, sport, port):
        if kind == "ping":
            return _ping(initiator, responder, sport)
        assert port is not None
        serve = _tcp_echo if kind == "tcp" else _udp_echo
        with _responder(responder, kind, port, serve) if listen else _nothing():
            if kind == "tcp":
                outcome = _tcp(initiator, responder, sport, port)
            else:
                outcome = _udp(initiator, responder, sport, port)
        time.sleep(SETTLE)
        return outcome


def exchange_rules(
    kind: str, initiator: str, sport: int, responder: str, dport: int | None
) -> list[str]:
    """The raw-table rules (for the exchange chain) that let one exchange through the quiet
    nodes: its tuple both ways, and ICMP to the initiator (errors about the flow, from any
    node; echo replies)."""
    protocol = PROTOCOLS[kind]
    if kind == "ping":
        forward = [f"-p icmp -s {initiator} -d {responder} -j ACCEPT"]
    else:
        forward = [
            f"-p {protocol} -s {initiator} -d {responder} -m {protocol} --sport {sport} "
            f"--dport {dport} -j ACCEPT",
            f"-p {protocol} -s {responder} -d {initiator} -m {protocol} --sport {dport} "
            f"--dport {sport} -j ACCEPT",
        ]
    return [*forward, f"-p icmp -d {initiator} -j ACCEPT"]


@contextmanager
def _opened(lab: Lab, kind: str, initiator: Node, responder: Node, sport: int, dport):
    try:
        lab.set_exchange_rules(exchange_rules(kind, initiator.ipv4, sport, responder.ipv4, dport))
        yield
    finally:
        lab.set_exchange_rules([])


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _responder(node: Node, kind: str, port: int, serve: Callable) -> Iterator[None]:
    """A listener (tcp) or responder (udp) bound on `node`'s address and `port`, serving in a
    thread until the block ends (at most RESPONDER_LIFETIME seconds)."""
    family_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    sock = node.namespace.socket(socket.AF_INET, family_type)
    with closing(sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((node.ipv4, port))
        if kind == "tcp":
            sock.listen(4)
        sock.settimeout(0.05)
        stop = threading.Event()
        thread = threading.Thread(target=serve, args=(sock, stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=CONNECT_TIMEOUT + 1)


def _tcp_echo(listener: socket.socket, stop: threading.Event) -> None:
    deadline = time.monotonic() + RESPONDER_LIFETIME
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with closing(connection):
            connection.settimeout(0.05)
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    data = connection.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break  # the initiator closed: close too (a clean FIN both ways)
                try:
                    connection.sendall(data)
                except OSError:
                    break


def _udp_echo(sock: socket.socket, stop: threading.Event) -> None:
    deadline = time.monotonic() + RESPONDER_LIFETIME
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            data, peer = sock.recvfrom(4096)
            sock.sendto(data, peer)
        except TimeoutError:
            continue
        except OSError:
            return


def _client(node: Node, kind: str, sport: int) -> socket.socket:
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    sock = node.namespace.socket(socket.AF_INET, sock_type)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((node.ipv4, sport))
    return sock


def _refusal(error: OSError) -> Outcome:
    if error.errno in REFUSED_ERRNOS:
        return Outcome("refused", f"{errno.errorcode.get(error.errno, error.errno)}")
    raise error


def _tcp(initiator: Node, responder: Node, sport: int, port: int) -> Outcome:
    with closing(_client(initiator, "tcp", sport)) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((responder.ipv4, port))
        except TimeoutError:
            return Outcome("times out", f"no answer to connect within {CONNECT_TIMEOUT} s")
        except OSError as error:
            return _refusal(error)
        try:
            sock.sendall(PAYLOAD)
            echo = b""
            while len(echo) < len(PAYLOAD):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                echo += chunk
            if echo != PAYLOAD:
                _abort(sock)
                return Outcome("refused", f"connected, but the peer closed after {echo!r}")
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):  # until the responder's FIN
                pass
        except TimeoutError:
            _abort(sock)
            return Outcome("times out", f"connected, but no echo within {CONNECT_TIMEOUT} s")
        except OSError as error:
            return _refusal(error)
        return Outcome("connects", f"connected, {len(PAYLOAD)} bytes echoed")


def _abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): nothing is retransmitted after the exchange ends."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")


def _udp(initiator: Node, responder: Node, sport: int, port: int) -> Outcome:
    with closing(_client(initiator, "udp", sport)) as sock:
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.connect((responder.ipv4, port))
            sock.send(PAYLOAD)
            answer = sock.recv(4096)  # an ICMP error shows here, on the next recv
        except TimeoutError:
            return Outcome("times out", f"no answer within {ANSWER_TIMEOUT} s")
        except OSError as error:
            return _refusal(error)
        if answer != PAYLOAD:
            return Outcome("refused", f"an answer that is not the echo: {answer!r}")
        return Outcome("connects", "the datagram was echoed")


def _ping(initiator: Node, responder: Node, ident: int) -> Outcome:
    ident &= 0xFFFF
    request = bytes(ICMP(type=8, id=ident, seq=1) / Raw(PAYLOAD))
    raw = initiator.namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with closing(raw) as sock:
        sock.settimeout(0.05)
        try:
            sock.sendto(request, (responder.ipv4, 0))
        except OSError as error:  # netfilter's OUTPUT dropped or rejected it (a twin lab)
            return _refusal(error)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            packet = IP(data)
            if ICMP not in packet:
                continue
            icmp = packet[ICMP]
            if icmp.type == 0 and icmp.id == ident and packet.src == responder.ipv4:
                return Outcome("connects", "echo reply")
            if (
                icmp.type in ICMP_ERRORS
                and IPerror in packet
                and ICMPerror in packet
                and packet[IPerror].dst == responder.ipv4
                and packet[ICMPerror].id == ident
            ):
                return Outcome(
                    "refused", f"ICMP type {icmp.type} code {icmp.code} from {packet.src}"
                )
        return Outcome("times out", f"no echo reply within {ANSWER_TIMEOUT} s")
