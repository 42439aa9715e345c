"""Frames on the twin topologies' wires: AF_PACKET senders and captures, the probe frame that
tells a path is drained, and the IP packet inside a frame.

"Not seen" is decided without sleeping: after the packet, a probe frame of an EtherType nobody
handles follows the same path (`PROBE_ETHERTYPE`; netfilter never sees it). The sending thread
is pinned to one CPU (`pinned`), so both frames queue on the same per-CPU backlog and the packet
is fully processed before the probe is dequeued: once the probe is seen, a packet not seen was
dropped.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address
from typing import Protocol

from netns.namespace import Namespace

from .twin import HOST_BROADCAST, LIMITED_BROADCAST, OracleError

PROBE_ETHERTYPE = 0x88B5  # IEEE 802 local experimental: no protocol handler, no netfilter
PROBE_MAGIC = b"bpflab-netfilter-probe"
# A probe on the wire: Ethernet header, magic, an 8-byte sequence number (veth pads nothing).
PROBE_FRAME_BYTES = 14 + len(PROBE_MAGIC) + 8
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # <linux/if_packet.h>; Python's socket module does not name it
MAX_FRAMES = 256  # every receive loop is bounded in count as well as in time

_MULTICAST_MAC_PREFIX = bytes.fromhex("01005e")
_BROADCAST_MAC = b"\xff" * 6


class Port(Protocol):
    """Where frames go out and come in: a namespace's interface (a veth Endpoint, a lab Node)."""

    namespace: Namespace
    ifname: str


class ObservationError(OracleError):
    """The datapath behaved in a way the oracle cannot interpret: a probe was lost, or the
    signals of one verdict contradict each other."""


def mac(text: str) -> bytes:
    """A MAC address as `ip link` prints it, in bytes."""
    return bytes.fromhex(text.replace(":", ""))


def destination_mac(destination: IPv4Address, unicast: str) -> bytes:
    """The MAC a frame to `destination` goes to: its group's, the broadcast one, or `unicast`."""
    if destination.is_multicast:
        # RFC 1112: 01:00:5e followed by the low 23 bits of the group.
        return _MULTICAST_MAC_PREFIX + (int(destination) & 0x7FFFFF).to_bytes(3, "big")
    if destination in (HOST_BROADCAST, LIMITED_BROADCAST):
        return _BROADCAST_MAC
    return mac(unicast)


def _current_cpu() -> int:
    with open("/proc/thread-self/stat") as file:
        stat = file.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[36])  # field 39 of proc(5)


@contextmanager
def pinned() -> Iterator[None]:
    """Keep the calling thread on one CPU: frames it sends then queue on one per-CPU backlog,
    in order, which is what makes a probe mean "everything before me was processed"."""
    allowed = os.sched_getaffinity(0)
    cpu = _current_cpu()
    os.sched_setaffinity(0, {cpu if cpu in allowed else min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def ethernet(destination: bytes, source: bytes, ethertype: int) -> bytes:
    """An Ethernet header."""
    return destination + source + ethertype.to_bytes(2, "big")


def sender(endpoint: Port) -> socket.socket:
    """An AF_PACKET socket that sends whole frames out of `endpoint` and receives nothing."""
    sock = endpoint.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((endpoint.ifname, 0))
    return sock


def capture(endpoint: Port, ethertype: int) -> socket.socket:
    """A non-blocking AF_PACKET socket receiving incoming frames of `ethertype` on `endpoint`."""
    sock = endpoint.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind((endpoint.ifname, ethertype))
    sock.setblocking(False)
    return sock


def _receive(sock: socket.socket) -> bytes | None:
    """One datagram, or None when none is queued. A pending socket error (an ICMP error the
    host received for a raw socket's protocol) is consumed and skipped."""
    for _ in range(MAX_FRAMES):
        try:
            return sock.recv(65535)
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            continue  # sk_err is reported once and cleared by this recv: read again
    return None


def drain(sock: socket.socket, limit: int = MAX_FRAMES) -> list[bytes]:
    """Every datagram queued on `sock` now (at most `limit`); `sock` must not block."""
    queued = []
    for _ in range(limit):
        data = _receive(sock)
        if data is None:
            break
        queued.append(data)
    return queued


def probe_payload(number: int) -> bytes:
    """The payload of probe frame `number`: the magic and the number, which until_probe
    waits for."""
    return PROBE_MAGIC + number.to_bytes(8, "big")


def until_probe(sock: socket.socket, probe: bytes, timeout: float) -> list[bytes]:
    """Frames received on `sock` before the frame ending with `probe`; raises
    ObservationError when the probe does not come within `timeout` seconds."""
    before: list[bytes] = []
    deadline = time.monotonic() + timeout
    for _ in range(MAX_FRAMES):
        data = _receive(sock)
        if data is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            select.select([sock], [], [], remaining)
            continue
        if data.endswith(probe):
            return before
        before.append(data)
    raise ObservationError(
        f"probe frame {probe.hex()} did not arrive within {timeout} s "
        f"({len(before)} other frames seen): the topology is not forwarding frames"
    )


def ip_payload(frame: bytes) -> bytes | None:
    """The IP packet in an Ethernet frame, trimmed to its total length; None if not IPv4."""
    if len(frame) < 34 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
        return None
    packet = frame[14:]
    return packet[: int.from_bytes(packet[2:4], "big")]


def same_but_id(received: bytes | None, sent: bytes) -> bool:
    """`received` is the packet `sent`, but for the IP id when `sent` left it zero for the
    kernel to fill."""
    if received is None or len(received) != len(sent):
        return False
    if sent[4:6] != b"\0\0":
        return received == sent
    return received[:4] + received[6:10] + received[12:] == sent[:4] + sent[6:10] + sent[12:]
