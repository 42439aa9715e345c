"""What a lab sees: a capture of every frame on an interface for the lab's life, a receiver of
what reaches one node, and what one delivery saw (harness.lab.traffic sends)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import wrpcap

from netns.namespace import Namespace

from .frames import PACKET_IGNORE_OUTGOING, PROBE_ETHERTYPE, SOL_PACKET, drain

ETH_P_ALL = 0x0003
DLT_EN10MB = 1  # pcap link type: Ethernet
MAX_CAPTURED = 20_000  # per interface: captures are bounded in count as well as in time
MAX_QUEUED = 10_000  # datagrams read off a receiver per delivery: bounded in count
PROBE_TYPE = PROBE_ETHERTYPE.to_bytes(2, "big")
Match = Callable[[Packet], bool]


@dataclass(frozen=True)
class Node:
    """A sender or receiver: a namespace, the interface it uses, its addresses."""

    name: str
    namespace: Namespace
    ifname: str
    mac: str
    ipv4: str
    holder: bool  # the node whose rules are under test (host or router)


class Capture:
    """Every frame seen on one interface (both directions), until stopped."""

    def __init__(self, namespace: Namespace, ifname: str):
        self.namespace, self.ifname = namespace, ifname
        self.frames: list[tuple[float, int, bytes]] = []  # time, packet type, bytes
        self._sock = namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._sock.bind((ifname, 0))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.frames) < MAX_CAPTURED:
            try:
                data, address = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames.append((time.time(), address[2], data))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def write_pcap(self, path: Path) -> None:
        packets = []
        for stamp, _, data in self.frames:
            packet = Ether(data)
            packet.time = stamp
            packets.append(packet)
        wrpcap(str(path), packets, linktype=DLT_EN10MB)  # an empty capture has no frame to tell


@dataclass
class Delivery:
    """What `Lab.deliver` saw: the copies that arrived, everything the receiver saw (probes
    aside), and how many probe frames crossed the rule holder's TC hooks (each moves its
    programs' "not handled" counter once, by PROBE_FRAME_BYTES)."""

    arrived: list[Packet]
    seen: list[Packet]
    probes: int


class Receiver:
    """What reaches a node: frames at a plain node's interface, or IP packets the rule holder's
    stack delivers (a raw socket for the protocol, which sees them after INPUT)."""

    def __init__(self, node: Node, protocol: int):
        self.node = node
        if node.holder:
            self._sock = node.namespace.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
        else:
            self._sock = node.namespace.socket(
                socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)
            )
            self._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)  # incoming frames only
            self._sock.bind((node.ifname, 0))
        self._sock.settimeout(0.05)
        self.seen: list[Packet] = []

    def collect(self, match: Match, wanted: int, timeout: float) -> list[Packet]:
        """Packets matching `match` until `wanted` of them or `timeout` seconds."""
        found: list[Packet] = []
        deadline = time.monotonic() + timeout
        while len(found) < wanted and time.monotonic() < deadline and len(self.seen) < 10_000:
            try:
                data = self._sock.recv(65535)
            except TimeoutError:
                continue
            self._take(data, match, found)
        return found

    def queued(self, match: Match, wanted: int) -> list[Packet]:
        """Packets matching `match` among those queued now (at most `wanted`): what
        `Lab.deliver` reads once its probes said every copy was handled."""
        found: list[Packet] = []
        self._sock.setblocking(False)
        for data in drain(self._sock, MAX_QUEUED):
            self._take(data, match, found)
        return found[:wanted]

    def _take(self, data: bytes, match: Match, found: list[Packet]) -> None:
        if not self.node.holder and data[12:14] == PROBE_TYPE:
            return
        packet = IP(data) if self.node.holder else Ether(data)
        self.seen.append(packet)
        if match(packet):
            found.append(packet)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
