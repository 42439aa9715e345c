"""The records `-j LOG` rules write into a rule set's ring buffer (codegen.tc.log), as the lines
the kernel's LOG target would print for the same packets (codegen.rules.extensions.log_line).

Used by ChainRunner (each test run's lines in its Outcome) and by `bpflab log`, which reads the
ring pinned for a namespace by `apply`. Reading consumes: each record is shown once. `bpflab
log` prints the text alone, as `dmesg` shows it (no level, no timestamp); `--levels` puts the
syslog level in front as `<N>`, as `dmesg -r` and /dev/kmsg do. The count of events a full ring
lost goes to stderr at the end.

Where a line can differ from the kernel's, because TC sees the packet elsewhere than netfilter:
the kernel reassembles fragments before INPUT (TC ingress logs each fragment) and fragments
after OUTPUT (TC egress logs the first fragment, not the datagram); a Timestamp option is
printed as received, not stamped as ip_rcv_options stamps it (Record Route is filled in here).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map, RingBuffer, sum_percpu
from codegen.rules.extensions.log import Log
from codegen.rules.extensions.log_line import LoggedPacket, log_line
from codegen.rules.extensions.nflog import NfLog
from codegen.rules.model import Ruleset
from codegen.tc.layout import CounterLayout
from codegen.tc.log import HEADER, LOG_DROPS, LOG_EVENTS, RECEIVED, RING_SIZE, TTL_PENDING

ETH_HLEN = 14
HOOK_NAMES = ("INPUT", "FORWARD", "OUTPUT")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record as the program wrote it."""

    slot: int  # the LOG rule's counter slot
    hook: str  # INPUT, FORWARD or OUTPUT
    ttl_pending: bool  # FORWARD seen before the kernel's TTL decrement (TC ingress)
    received: bool  # seen before ip_rcv_options (TC ingress)
    in_ifindex: int
    out_ifindex: int
    mark: int
    skb_len: int  # the frame's length, Ethernet header included
    time_ns: int  # CLOCK_MONOTONIC
    data: bytes  # the frame's first bytes
    phys_in: int = 0  # the bridge ports br_netfilter knows (0: none)
    phys_out: int = 0

    @classmethod
    def decode(cls, raw: bytes) -> LogRecord:
        slot, hook, _, captured, in_ifindex, out_ifindex, mark, skb_len, time_ns, *ports = (
            HEADER.unpack_from(raw)
        )
        data = raw[HEADER.size : HEADER.size + captured]
        name = HOOK_NAMES[hook & 0x3]
        return cls(
            slot,
            name,
            bool(hook & TTL_PENDING),
            bool(hook & RECEIVED),
            in_ifindex,
            out_ifindex,
            mark,
            skb_len,
            time_ns,
            data,
            *ports,
        )

    def packet(
        self,
        names: Mapping[int, str],
        ethernet: Mapping[int, bool],
        addresses: Mapping[int, bytes] | None = None,
    ) -> LoggedPacket:
        """The packet as LOG sees it at the hook: from the IP header, as long as the kernel's
        skb there (the frame's length less the Ethernet header, at most the total length);
        bytes past the capture read as zeros, which the line never needs. A received packet
        gets what the kernel does to it before INPUT and FORWARD: its Record Route option
        filled in (with the destination at INPUT, the in-device's address from `addresses`
        at FORWARD), and at FORWARD its TTL decremented."""
        ip = self.data[ETH_HLEN:]
        length = self.skb_len - ETH_HLEN
        if len(ip) >= 4:
            length = min(length, int.from_bytes(ip[2:4], "big"))
        ip = ip[:length].ljust(max(length, 0), b"\0")
        if self.ttl_pending and len(ip) >= 12:
            # ip_decrease_ttl: the TTL one less, the checksum updated to match.
            check = int.from_bytes(ip[10:12], "big") + 0x0100
            check = (check + (check >> 16)) & 0xFFFF
            ip = (
                ip[:8] + bytes([(ip[8] - 1) & 0xFF]) + ip[9:10] + check.to_bytes(2, "big") + ip[12:]
            )
        if self.received and len(ip) > 20:
            own = ip[16:20] if self.hook == "INPUT" else (addresses or {}).get(self.in_ifindex)
            ip = _record_route(ip, own or bytes(4))
        in_device, out_device, phys_in, phys_out = (
            names.get(index, "") if index else ""
            for index in (self.in_ifindex, self.out_ifindex, self.phys_in, self.phys_out)
        )
        return LoggedPacket(
            ip,
            in_device,
            out_device,
            mac=self.data[:ETH_HLEN] if len(self.data) >= ETH_HLEN else None,
            ethernet=ethernet.get(self.in_ifindex, True),
            mark=self.mark,
            phys_in=phys_in,
            phys_out=phys_out,
        )


class LogMaps:
    """A rule set's LOG maps: the ring buffer of records and the count of events it lost."""

    def __init__(self, ring_size: int = RING_SIZE):
        """New maps: a ring of `ring_size` bytes (a power of two, a page at least)."""
        self.drops = Map(MapType.PERCPU_ARRAY, 4, 8, 1, name=LOG_DROPS)
        try:
            self.ring = RingBuffer(ring_size, name=LOG_EVENTS)
        except BaseException:
            self.drops.close()
            raise

    @classmethod
    def from_pins(cls, ring: str, drops: str) -> LogMaps:
        """The maps pinned at `ring` and `drops` (lifecycle.log_maps)."""
        maps = cls.__new__(cls)
        maps.ring = RingBuffer.from_pin(ring)
        try:
            maps.drops = Map.from_pin(drops)
        except BaseException:
            maps.ring.close()
            raise
        return maps

    @property
    def maps(self) -> dict[str, Map]:
        """By the names the generated programs use."""
        return {LOG_EVENTS: self.ring, LOG_DROPS: self.drops}

    def dropped(self) -> int:
        return dropped_events(self.drops)

    def close(self) -> None:
        self.ring.close()
        self.drops.close()

    def __enter__(self) -> LogMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_route(ip: bytes, address: bytes) -> bytes:
    """ip_options_compile on receive: a Record Route option with room gets `address` at its
    pointer, and the pointer moves on by 4."""
    data = bytearray(ip)
    end = min(len(data), (data[0] & 0x0F) * 4)
    at = 20
    while at < end:
        kind = data[at]
        if kind == 0:  # end of options
            break
        if kind == 1:  # no-op
            at += 1
            continue
        if at + 1 >= end or data[at + 1] < 2:
            break
        length = data[at + 1]
        if kind == 7 and length >= 3 and at + length <= end:
            pointer = data[at + 2]
            if pointer + 3 <= length:
                data[at + pointer - 1 : at + pointer + 3] = address
                data[at + 2] = pointer + 4
        at += length
    return bytes(data)


def logging_target(ruleset: Ruleset, layout: CounterLayout, slot: int) -> Log | NfLog:
    """The LOG or NFLOG target of the rule at counter slot `slot`."""
    chain, index = layout.positions[slot]
    assert isinstance(index, int)
    target = ruleset.chains[chain].rules[index - 1].target
    if not isinstance(target, Log | NfLog):
        raise ValueError(f"counter slot {slot} ({chain} rule {index}) is not a LOG or NFLOG rule")
    return target


@dataclass(frozen=True, slots=True)
class LogEvent:
    """What one record stands for: a LOG rule's line, or the packet an NFLOG rule passes on."""

    target: Log | NfLog
    packet: LoggedPacket
    time_ns: int

    @property
    def line(self) -> str | None:
        """The kernel's line for a LOG rule; None for NFLOG."""
        return log_line(self.target, self.packet) if isinstance(self.target, Log) else None

    @property
    def level(self) -> int:
        return self.target.level if isinstance(self.target, Log) else 0

    @property
    def nflog_packet(self) -> bytes:
        """The IP packet as nfnetlink_log copies it (cut at `--nflog-size`)."""
        snapshot = self.target.snapshot_length if isinstance(self.target, NfLog) else None
        return self.packet.ip if snapshot is None else self.packet.ip[:snapshot]


def record_event(
    record: LogRecord,
    ruleset: Ruleset,
    layout: CounterLayout,
    names: Mapping[int, str],
    ethernet: Mapping[int, bool] | None = None,
    addresses: Mapping[int, bytes] | None = None,
) -> LogEvent:
    """The event of one record (`ethernet`: whether each device is an Ethernet one, all if
    None; `addresses`: each device's first IPv4 address)."""
    target = logging_target(ruleset, layout, record.slot)
    return LogEvent(target, record.packet(names, ethernet or {}, addresses), record.time_ns)


# pcap: the classic file format, microsecond stamps, LINKTYPE_IPV4 (packets from the IP header).
PCAP_HEADER = struct.Struct("<IHHiIII")
PCAP_RECORD = struct.Struct("<IIII")
PCAP_MAGIC, LINKTYPE_IPV4, PCAP_SNAPLEN = 0xA1B2C3D4, 228, 65535


def pcap_header() -> bytes:
    return PCAP_HEADER.pack(PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN, LINKTYPE_IPV4)


def pcap_record(event: LogEvent, wall_offset_ns: int) -> bytes:
    """One NFLOG packet as a pcap record; `wall_offset_ns` turns the record's monotonic time
    into the wall clock. The packet's own length is its IP total length; what the capture
    holds is cut at --nflog-size and at what the program captured (codegen.tc.log.CAPTURE)."""
    data = event.nflog_packet
    seconds, nanoseconds = divmod(event.time_ns + wall_offset_ns, 1_000_000_000)
    original = len(event.packet.ip)
    return PCAP_RECORD.pack(seconds, nanoseconds // 1000, len(data), original) + data


def dropped_events(drops: Map) -> int:
    """How many events the full ring lost, summed over CPUs."""
    raw = drops.lookup(0)
    return 0 if raw is None else sum_percpu(drops.percpu_values(raw), "<Q")[0]


POLL_SECONDS = 0.1


def devices_of(netns: str) -> tuple[dict[int, str], dict[int, bool], dict[int, bytes]]:
    """The devices of namespace `netns`: ifindex -> name, whether each is Ethernet, and the
    first IPv4 address of each that has one."""
    from netns.namespace import Namespace

    with Namespace.existing(netns).ipr() as ipr:
        links = list(ipr.get_links())
        found = list(ipr.get_addr(family=socket.AF_INET))
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
    ethernet = {link["index"]: link["ifi_type"] == 1 for link in links}  # ARPHRD_ETHER
    addresses: dict[int, bytes] = {}
    for address in found:
        addresses.setdefault(address["index"], socket.inet_aton(address.get_attr("IFA_ADDRESS")))
    return names, ethernet, addresses


def namespace_log(
    netns: str,
    maps: LogMaps,
    *,
    follow: bool = False,
    timeout: float | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[LogEvent]:
    """The event of each record the LOG and NFLOG rules applied in `netns` wrote into `maps`
    (lifecycle.log_maps) and no reader took yet; with `follow`, waits for more until `timeout`
    seconds passed (None: until `stop()` says so, or the caller stops iterating)."""
    from codegen.rules import parse

    from .deploy import lifecycle

    state = lifecycle.read_state(netns)
    if state is None:
        raise lifecycle.LifecycleError(f"no rule set is applied in namespace {netns}")
    ruleset = parse(state["rules"], state["file"])
    layout = CounterLayout.of(ruleset)
    names, ethernet, addresses = devices_of(netns)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for raw in maps.ring.records():
            record = LogRecord.decode(raw)
            if {record.in_ifindex, record.out_ifindex, record.phys_in} - {0} - names.keys():
                names, ethernet, addresses = devices_of(netns)  # a device added since
            yield record_event(record, ruleset, layout, names, ethernet, addresses)
        if not follow or stop() or (deadline is not None and time.monotonic() >= deadline):
            return
        # Woken as soon as a program commits a record; the timeout only bounds how late stop()
        # and the deadline are seen.
        left = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
        maps.ring.wait(left)
