"""The netfilter oracle: twin topologies where the kernel's iptables-legacy decides.

`NetfilterOracle` owns a HostTopology (client -> host: the host's INPUT chain sees what the client
sends, its OUTPUT chain what the host sends) and a RouterTopology (client -> router -> server: the
router's FORWARD chain). It loads one filter table into the host and the router, injects one
packet at a time so that it traverses the chosen chain, and reports what netfilter did: the
verdict, seen on the far side of the chain, and every counter that moved.

How a verdict is observed:
- INPUT: a raw IP socket in the host for the packet's protocol. Raw delivery happens after
  LOCAL_IN, so the socket sees the packet exactly when INPUT accepted it. The host's Ip
  InDelivers counter (/proc/net/snmp) must agree; it alone decides for ICMP shorter than its
  8-byte header, which raw ICMP sockets never receive.
- FORWARD: an AF_PACKET socket on the server's interface sees the forwarded frame.
- OUTPUT: the host sends with a raw IP_HDRINCL socket; a drop in LOCAL_OUT makes sendto fail
  with EPERM, and an accepted packet reaches the client's AF_PACKET socket. Both must agree.

"Not seen" is decided without sleeping: after the packet, a probe frame of an EtherType nobody
handles follows the same path (`PROBE_ETHERTYPE`; netfilter never sees it). The sending thread
is pinned to one CPU, so both frames queue on the same per-CPU backlog and the packet is fully
processed before the probe is dequeued: once the probe is seen, a packet not seen was dropped.

Noise is kept out of the counters: IPv6 is off, neighbours are permanent, the raw table drops
everything the host or router kernels would send on their own (RSTs, ICMP errors, echo replies)
before the filter table sees it, and the client and server drop every incoming IP packet in
their raw PREROUTING so that they never answer. Only the `bl` namespaces the oracle creates are
touched, always through `Namespace.run`.

Kernel facts a caller must know (the oracle refuses what would not reach the chain as given):
- INPUT never sees fragments: ip_local_deliver reassembles them before the LOCAL_IN hook.
- FORWARD sees the TTL already decremented (ip_forward decrements before NF_INET_FORWARD), and a
  packet with TTL <= 1 never reaches it. `Observation.packet` is the packet as the chain saw it:
  evaluate that, not what was injected.
- The kernel drops malformed IPv4 (version, header length, total length) before netfilter; the
  oracle fixes the header checksum and refuses the rest with `PacketRefused`.
- Only OUTPUT packets can carry a mark (the sending socket's SO_MARK): crossing from the
  client's namespace clears skb->mark.
- INPUT's pkt_type follows the destination (`DESTINATIONS`): the subnet or limited broadcast
  goes to the broadcast MAC, 224.0.0.1 to its multicast MAC.

`load` checks that the kernel reads back the table it was given, except for what
iptables-legacy-save cannot print (`! --dport 0:65535`, `! -i +`, `--tcp-flags NONE X`: the
kernel holds them, and they never match).
"""

from __future__ import annotations

import copy
import errno
import itertools
import os
import select
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import TracebackType
from typing import Literal, Protocol, Self

from codegen.rules import Evaluation, Interface, Match, Ruleset, evaluate, parse, write
from codegen.rules.extensions import extension_of
from codegen.rules.model import IP_PART
from netns import Endpoint, HostTopology, Namespace, RouterTopology

ChainName = Literal["INPUT", "FORWARD", "OUTPUT"]
Position = tuple[str, int | Literal["policy"]]
Counters = dict[Position, tuple[int, int]]

CHAINS: tuple[ChainName, ...] = ("INPUT", "FORWARD", "OUTPUT")

# The address plan of netns.topology, checked against the built topologies on entry. Test data
# (tests/strategies.py) is built from these without building any namespace.
HOST_CLIENT = IPv4Address("198.18.0.1")
HOST = IPv4Address("198.18.0.2")
ROUTER_CLIENT = IPv4Address("198.18.1.1")
ROUTER_CLIENT_SIDE = IPv4Address("198.18.1.254")
ROUTER_SERVER_SIDE = IPv4Address("198.18.2.254")
SERVER = IPv4Address("198.18.2.1")
HOST_BROADCAST = IPv4Address("198.18.0.255")
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
ALL_HOSTS = IPv4Address("224.0.0.1")  # every multicast-capable interface is a member
TEST_NETWORK = IPv4Network("198.18.0.0/15")
SUBNETS = tuple(
    IPv4Network(network) for network in ("198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24")
)

# (in_iface, out_iface) as each chain sees them: eth0 in the host; eth0 (client side) and eth1
# (server side) in the router.
INTERFACES: dict[str, tuple[str | None, str | None]] = {
    "INPUT": ("eth0", None),
    "FORWARD": ("eth0", "eth1"),
    "OUTPUT": (None, "eth0"),
}
# Where a packet may go for each chain, and the skb->pkt_type it then has (the name `evaluate`
# takes). INPUT takes broadcast and multicast too: the frame then goes to the matching MAC.
DESTINATIONS: dict[str, dict[IPv4Address, str]] = {
    "INPUT": {
        HOST: "host",
        HOST_BROADCAST: "broadcast",
        LIMITED_BROADCAST: "broadcast",
        ALL_HOSTS: "multicast",
    },
    "FORWARD": {SERVER: "host"},
    "OUTPUT": {HOST_CLIENT: "host"},
}
# The natural (source, destination) for each chain.
ADDRESSES: dict[str, tuple[IPv4Address, IPv4Address]] = {
    "INPUT": (HOST_CLIENT, HOST),
    "FORWARD": (ROUTER_CLIENT, SERVER),
    "OUTPUT": (HOST, HOST_CLIENT),
}
# A packet claiming to come from an address of the receiving namespace is a martian there.
LOCAL_ADDRESSES: dict[str, frozenset[IPv4Address]] = {
    "INPUT": frozenset({HOST}),
    "FORWARD": frozenset({ROUTER_CLIENT_SIDE, ROUTER_SERVER_SIDE}),
    "OUTPUT": frozenset(),
}

IPPROTO_ICMP = 1
IPPROTO_RAW = 255
MTU = 1500  # veth default; larger packets would be fragmented or refused on the way
PROBE_ETHERTYPE = 0x88B5  # IEEE 802 local experimental: no protocol handler, no netfilter
PROBE_MAGIC = b"bpflab-netfilter-probe"
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23  # <linux/if_packet.h>; Python's socket module does not name it
# Seconds to wait for a probe. Probes arrive in microseconds; this is only reached when the
# topology is broken, and then the oracle raises rather than guessing.
ARRIVAL_TIMEOUT = 2.0
MAX_FRAMES = 256  # every receive loop is bounded in count as well as in time
IPTABLES_WAIT = "10"  # seconds to wait for the xtables lock (the oracle's own lock file)
COMMAND_TIMEOUT = 30.0

_MULTICAST_MAC_PREFIX = bytes.fromhex("01005e")
_BROADCAST_MAC = b"\xff" * 6


class OracleError(Exception):
    """The netfilter oracle could not do or observe what it was asked to."""


class PacketRefused(OracleError, ValueError):
    """A packet that would not reach the chain as given: the kernel would drop or change it
    before netfilter, so a verdict for it would say nothing about the rule set."""


class ObservationError(OracleError):
    """The datapath behaved in a way the oracle cannot interpret: a probe was lost, or the
    signals of one verdict contradict each other."""


class RulesetMismatch(OracleError):
    """The kernel holds a different filter table than the one loaded."""

    def __init__(self, namespace: str, loaded: str, kernel: str) -> None:
        self.namespace = namespace
        self.loaded = loaded
        self.kernel = kernel
        super().__init__(
            f"iptables-legacy-save in namespace {namespace} reads back a different filter "
            f"table than was loaded\n--- loaded\n{loaded}--- kernel\n{kernel}"
        )


# ---------------------------------------------------------------------------------------------
# Packets


def ip_checksum(header: bytes) -> int:
    """The Internet checksum of `header` (RFC 1071)."""
    if len(header) % 2:
        header += b"\0"
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def with_checksum(packet: bytes) -> bytes:
    """`packet` with its IPv4 header checksum recomputed; everything else unchanged."""
    ihl = (packet[0] & 0x0F) * 4
    header = bytearray(packet[:ihl])
    header[10:12] = b"\0\0"
    header[10:12] = ip_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + packet[ihl:]


def with_addresses(packet: bytes, source: IPv4Address, destination: IPv4Address) -> bytes:
    """`packet` with new source and destination addresses and a fixed header checksum.

    Transport checksums are left alone: netfilter's filter table never reads them.
    """
    return with_checksum(packet[:12] + source.packed + destination.packed + packet[20:])


def prepare(packet: bytes, chain: str) -> bytes:
    """The packet the oracle would inject into `chain`: checked, trimmed to its IP total length
    (as ip_rcv trims the skb) and with its header checksum fixed.

    Raises PacketRefused for anything the kernel would drop or change before the chain: a
    malformed header, an address the chain cannot receive, IP options other than NOP and EOL,
    a fragment for INPUT, a TTL below 2 for FORWARD, a packet larger than the MTU.
    """
    if chain not in CHAINS:
        raise ValueError(f"chain must be one of {', '.join(CHAINS)}, not {chain!r}")
    if len(packet) < 20:
        raise PacketRefused(f"packet is {len(packet)} bytes, shorter than an IPv4 header")
    version, ihl = packet[0] >> 4, (packet[0] & 0x0F) * 4
    if version != 4:
        raise PacketRefused(f"IP version {version}: the kernel drops it before netfilter")
    if ihl < 20:
        raise PacketRefused(f"IP header length {ihl} is below 20: dropped before netfilter")
    total_length = int.from_bytes(packet[2:4], "big")
    if total_length > len(packet):
        raise PacketRefused(
            f"IP total length {total_length} exceeds the {len(packet)} bytes given: "
            "ip_rcv drops it before netfilter"
        )
    if total_length < ihl:
        raise PacketRefused(
            f"IP total length {total_length} is shorter than the {ihl}-byte header: "
            "ip_rcv drops it before netfilter"
        )
    if total_length > MTU:
        raise PacketRefused(f"IP total length {total_length} exceeds the {MTU}-byte MTU")
    options = packet[20:ihl]
    if any(byte not in (0, 1) for byte in options):
        raise PacketRefused(
            "IP options other than NOP (1) and EOL (0) may be refused or rewritten by the "
            f"kernel before netfilter: {options.hex()}"
        )
    if b"\0\1" in options:
        # ip_options_compile overwrites everything after the first EOL with EOL.
        raise PacketRefused(f"IP options with a NOP after EOL are rewritten: {options.hex()}")
    source = IPv4Address(packet[12:16])
    destination = IPv4Address(packet[16:20])
    _check_source(source, chain)
    if destination not in DESTINATIONS[chain]:
        allowed = ", ".join(str(address) for address in DESTINATIONS[chain])
        raise PacketRefused(f"{chain} packets must go to one of {allowed}, not {destination}")
    fragment = int.from_bytes(packet[6:8], "big") & 0x3FFF  # MF and the offset
    if chain == "INPUT" and fragment:
        raise PacketRefused(
            "INPUT never sees fragments: ip_local_deliver reassembles them before LOCAL_IN; "
            "send fragments through FORWARD or OUTPUT"
        )
    if chain == "FORWARD" and packet[8] <= 1:
        raise PacketRefused(
            f"TTL {packet[8]}: ip_forward answers time-exceeded before the FORWARD chain"
        )
    if chain == "INPUT" and packet[9] in (0, IPPROTO_RAW):
        raise PacketRefused(f"protocol {packet[9]}: no raw socket can observe its local delivery")
    return with_checksum(packet[:total_length])


def _check_source(source: IPv4Address, chain: str) -> None:
    if source not in TEST_NETWORK:
        raise PacketRefused(f"source {source} is outside {TEST_NETWORK}, the test addresses")
    for subnet in SUBNETS:
        if source in (subnet.network_address, subnet.broadcast_address):
            raise PacketRefused(f"source {source} is the network or broadcast address of {subnet}")
    if source in LOCAL_ADDRESSES[chain]:
        raise PacketRefused(
            f"source {source} is an address of the namespace receiving it: a martian there"
        )


def seen_by_chain(packet: bytes, chain: str) -> bytes:
    """The prepared `packet` as `chain` sees it: FORWARD sees the TTL already decremented."""
    if chain != "FORWARD":
        return packet
    return with_checksum(packet[:8] + bytes([packet[8] - 1]) + packet[9:])


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _destination_mac(destination: IPv4Address, unicast: str) -> bytes:
    if destination.is_multicast:
        # RFC 1112: 01:00:5e followed by the low 23 bits of the group.
        return _MULTICAST_MAC_PREFIX + (int(destination) & 0x7FFFFF).to_bytes(3, "big")
    if destination in (HOST_BROADCAST, LIMITED_BROADCAST):
        return _BROADCAST_MAC
    return _mac(unicast)


# ---------------------------------------------------------------------------------------------
# Observations


@dataclass(frozen=True)
class Observation:
    """What netfilter did with one packet in one chain.

    `packet` is the packet as the chain saw it (checksum fixed, trimmed, TTL decremented for
    FORWARD); `in_iface`, `out_iface` and `pkt_type` are what the chain saw, ready to hand to
    the reference evaluator (`reference`). `counters` maps every rule or policy whose counter
    moved, as (chain, 1-based index) or (chain, "policy"), to (packets, bytes) added.
    """

    chain: str
    verdict: Literal["ACCEPT", "DROP"]
    counters: Counters
    packet: bytes
    in_iface: str | None
    out_iface: str | None
    pkt_type: str
    mark: int = 0
    sent: bytes = field(default=b"", repr=False)  # the bytes injected, before the chain

    def reference(self, ruleset: Ruleset) -> Evaluation:
        """The reference evaluator's verdict for the same packet, chain and devices."""
        return evaluate(
            ruleset,
            self.packet,
            self.chain,
            self.in_iface,
            self.out_iface,
            mark=self.mark,
            pkt_type=self.pkt_type,
        )


def moved_counters(ruleset: Ruleset) -> Counters:
    """The non-zero counters of `ruleset` (read after zeroing), keyed as `Observation.counters`."""
    moved: Counters = {}
    for chain in ruleset.chains.values():
        if chain.builtin and (chain.packets or chain.bytes):
            moved[(chain.name, "policy")] = (chain.packets, chain.bytes)
        for index, rule in enumerate(chain.rules, 1):
            if rule.packets or rule.bytes:
                moved[(chain.name, index)] = (rule.packets, rule.bytes)
    return moved


def _position_order(position: Position) -> tuple[int, str, int]:
    chain, index = position
    rank = CHAINS.index(chain) if chain in CHAINS else len(CHAINS)  # type: ignore[arg-type]
    return (rank, chain, 1 << 30 if index == "policy" else int(index))


def _format_position(position: Position) -> str:
    chain, index = position
    return f"{chain} policy" if index == "policy" else f"{chain} #{index}"


def _format_counter(counter: tuple[int, int] | None) -> str:
    return "-" if counter is None else f"{counter[0]} pkt {counter[1]} B"


def describe_packet(packet: bytes) -> str:
    """A readable rendering of an IPv4 packet: scapy's repr and the bytes in hex."""
    from scapy.layers.inet import IP  # scapy is slow to import: only when a report is needed

    return f"{IP(packet)!r}\n  hex: {packet.hex()}"


class Judgement(Protocol):
    """What another voice says about a packet: the reference evaluator's `Evaluation`, or a
    backend's outcome with the same fields (`hotdrop` is optional)."""

    @property
    def verdict(self) -> str: ...
    @property
    def deciding(self) -> Position: ...
    @property
    def counters(self) -> Mapping[Position, tuple[int, int]]: ...


def disagreement(
    ruleset_text: str, observation: Observation, evaluation: Judgement, label: str = "evaluator"
) -> str | None:
    """None when `evaluation` gives the verdict and the moved counters netfilter observed;
    otherwise a report with the rule set, the packet, the chain's devices and both sides'
    counters side by side (differing rows marked `!`)."""
    if evaluation.verdict == observation.verdict and evaluation.counters == observation.counters:
        return None
    positions = sorted(set(evaluation.counters) | set(observation.counters), key=_position_order)
    rows = [("counter", label, "netfilter")]
    for position in positions:
        mine, kernel = evaluation.counters.get(position), observation.counters.get(position)
        rows.append(
            (
                ("  " if mine == kernel else "! ") + _format_position(position),
                _format_counter(mine),
                _format_counter(kernel),
            )
        )
    rows.append(("verdict", evaluation.verdict, observation.verdict))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    table = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    deciding = _format_position(evaluation.deciding)
    return (
        f"{label} and netfilter disagree in {observation.chain} "
        f"(in {observation.in_iface or '-'}, out {observation.out_iface or '-'}, "
        f"pkt_type {observation.pkt_type})\n"
        f"rule set:\n{ruleset_text}"
        f"packet as the chain saw it:\n  {describe_packet(observation.packet)}\n"
        f"{label}: {evaluation.verdict} by {deciding}"
        f"{' (hotdrop)' if getattr(evaluation, 'hotdrop', False) else ''}"
        f"{f', mark {observation.mark:#x}' if observation.mark else ''}\n{table}"
    )


# ---------------------------------------------------------------------------------------------
# Sockets


def _current_cpu() -> int:
    with open("/proc/thread-self/stat") as file:
        stat = file.read()
    # The command name may contain spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(")") + 2 :].split()[36])  # field 39 of proc(5)


@contextmanager
def _pinned() -> Iterator[None]:
    """Keep the calling thread on one CPU: frames it sends then queue on one per-CPU backlog,
    in order, which is what makes a probe mean "everything before me was processed"."""
    allowed = os.sched_getaffinity(0)
    cpu = _current_cpu()
    os.sched_setaffinity(0, {cpu if cpu in allowed else min(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _ethernet(destination: bytes, source: bytes, ethertype: int) -> bytes:
    return destination + source + ethertype.to_bytes(2, "big")


def _sender(endpoint: Endpoint) -> socket.socket:
    """An AF_PACKET socket that sends whole frames out of `endpoint` and receives nothing."""
    sock = endpoint.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((endpoint.ifname, 0))
    return sock


def _capture(endpoint: Endpoint, ethertype: int) -> socket.socket:
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


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on `sock` now (at most MAX_FRAMES)."""
    queued = []
    for _ in range(MAX_FRAMES):
        data = _receive(sock)
        if data is None:
            break
        queued.append(data)
    return queued


def _until_probe(sock: socket.socket, probe: bytes, timeout: float) -> list[bytes]:
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


def _ip_payload(frame: bytes) -> bytes | None:
    """The IP packet in an Ethernet frame, trimmed to its total length; None if not IPv4."""
    if len(frame) < 34 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
        return None
    packet = frame[14:]
    return packet[: int.from_bytes(packet[2:4], "big")]


# ---------------------------------------------------------------------------------------------
# The oracle


def _blind_spot(match: Match) -> Match | None:
    """`match` as iptables-legacy-save prints it back: it cannot show `! -i +` or what an
    extension's `as_saved` says it cannot (`! --dport 0:65535`, `--tcp-flags NONE X`: the
    kernel holds them, and they never match), and prints them as no option at all. None for a
    match it does not print."""
    if isinstance(match, Interface) and match.name == "+":
        return None
    if isinstance(match, IP_PART):
        return match
    return extension_of(match).as_saved(match)


def _as_saved(ruleset: Ruleset) -> Ruleset:
    """`ruleset` as iptables-legacy-save would print it after a restore and a zeroing: no
    counters, and nothing it cannot show (`_blind_spot`)."""
    copied = copy.deepcopy(ruleset)
    for chain in copied.chains.values():
        chain.packets = chain.bytes = 0
        for rule in chain.rules:
            rule.packets = rule.bytes = 0
            shown = (_blind_spot(match) for match in rule.matches)
            rule.matches = tuple(match for match in shown if match is not None)
    return copied


# Raw-table rules that keep every packet the test did not send out of the filter table's
# counters. The raw table hooks before the filter table (NF_IP_PRI_RAW < NF_IP_PRI_FILTER).
_QUIET_RECEIVER = "*raw\n:PREROUTING DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
_QUIET_ROUTER = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT DROP [0:0]\nCOMMIT\n"


def _quiet_host(uid: int) -> str:
    # Replies the kernel makes on its own (TCP RST, ICMP errors, echo replies) leave through
    # sockets without a file; the oracle's own raw socket has one, owned by `uid`.
    return (
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT -m owner ! --uid-owner {uid} -j DROP\nCOMMIT\n"
    )


_SAVE = ["iptables-legacy-save", "-c", "-t", "filter"]
_ZERO = ["iptables-legacy", "-w", IPTABLES_WAIT, "-t", "filter", "-Z"]


class NetfilterOracle:
    """Twin topologies where iptables-legacy decides; a context manager.

    ```
    with NetfilterOracle() as oracle:
        oracle.load(ruleset)
        observation = oracle.run(packet, "FORWARD")
        observation.verdict, observation.counters
    ```
    Load a rule set once and run many packets against it: every run starts from zeroed
    counters (load leaves them zero, and each run zeroes them as it reads them).
    Not thread-safe: one oracle serves one thread.
    """

    def __init__(self, *, timeout: float = ARRIVAL_TIMEOUT) -> None:
        self.timeout = timeout
        self._stack = ExitStack()
        self._probes = itertools.count(1)
        self._raw_receivers: dict[int, socket.socket] = {}
        self._output_mark = 0
        self._zeroed: set[str] = set()  # namespaces whose filter counters are all zero now
        self._lock_file = ""
        self.ruleset: Ruleset | None = None
        self.host: HostTopology
        self.router: RouterTopology

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            lock = stack.enter_context(tempfile.NamedTemporaryFile(prefix="bpflab-xtables-"))
            self._lock_file = lock.name
            self.host = stack.enter_context(HostTopology(ipv6=False))
            self.router = stack.enter_context(RouterTopology(ipv6=False))
            self._check_plan()
            self._quiet()
            self._open_sockets(stack)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._raw_receivers.clear()
        self._stack.close()

    def _check_plan(self) -> None:
        plan = {
            "host client": (self.host.client, HOST_CLIENT),
            "host": (self.host.host, HOST),
            "router client": (self.router.client, ROUTER_CLIENT),
            "router client side": (self.router.router.client_side, ROUTER_CLIENT_SIDE),
            "router server side": (self.router.router.server_side, ROUTER_SERVER_SIDE),
            "server": (self.router.server, SERVER),
        }
        for name, (endpoint, expected) in plan.items():
            if endpoint.ipv4.ip != expected:
                raise OracleError(
                    f"the {name} has address {endpoint.ipv4.ip}, not {expected}: "
                    "netns.topology changed its address plan; update harness/netfilter.py"
                )
        sides = (self.host.host.ifname, self.router.router.server_side.ifname)
        if sides != ("eth0", "eth1"):
            raise OracleError(f"unexpected interface names {sides}: INTERFACES is out of date")

    def _quiet(self) -> None:
        host = self.host.host.namespace
        # Redirects would rewrite the host's routes; accept_redirects is OR-ed over `all` and
        # the interface on a non-forwarding host.
        for key in ("all", "default", self.host.host.ifname):
            host.sysctl(f"net.ipv4.conf.{key}.accept_redirects", 0)
        # No fragment queue: a stray fragment must never complete a datagram later.
        host.sysctl("net.ipv4.ipfrag_low_thresh", 0)
        host.sysctl("net.ipv4.ipfrag_high_thresh", 0)
        self._restore(host, _quiet_host(os.geteuid()))
        self._restore(self.router.router.namespace, _QUIET_ROUTER)
        for receiver in (self.host.client, self.router.client, self.router.server):
            self._restore(receiver.namespace, _QUIET_RECEIVER)

    def _open_sockets(self, stack: ExitStack) -> None:
        def keep(sock: socket.socket) -> socket.socket:
            return stack.enter_context(sock)

        host, router = self.host, self.router
        self._host_client_sender = keep(_sender(host.client))
        self._host_probes = keep(_capture(host.host, PROBE_ETHERTYPE))
        self._host_probe_sender = keep(_sender(host.host))
        self._host_client_capture = keep(_capture(host.client, ETH_P_ALL))
        self._host_raw_sender = keep(
            host.host.namespace.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_RAW)
        )
        self._router_client_sender = keep(_sender(router.client))
        self._router_probes = keep(_capture(router.router.client_side, PROBE_ETHERTYPE))
        self._router_probe_sender = keep(_sender(router.router.server_side))
        self._server_capture = keep(_capture(router.server, ETH_P_ALL))
        with host.host.namespace.enter():
            # A seq_file keeps the namespace it was opened in: reread it from offset 0.
            self._host_snmp = os.open("/proc/thread-self/net/snmp", os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, self._host_snmp)

    def _local_deliveries(self) -> int:
        """The host's Ip InDelivers: packets handed to a protocol or raw socket after INPUT."""
        os.lseek(self._host_snmp, 0, os.SEEK_SET)
        data = b""
        for _ in range(64):
            chunk = os.read(self._host_snmp, 65536)
            if not chunk:
                break
            data += chunk
        names, values = (line.split()[1:] for line in data.decode().splitlines()[:2])
        return int(dict(zip(names, values, strict=True))["InDelivers"])

    def _raw_receiver(self, protocol: int) -> socket.socket:
        sock = self._raw_receivers.get(protocol)
        if sock is None:
            sock = self.host.host.namespace.socket(socket.AF_INET, socket.SOCK_RAW, protocol)
            sock.setblocking(False)
            self._stack.enter_context(sock)
            self._raw_receivers[protocol] = sock
        return sock

    # -- iptables -------------------------------------------------------------------------

    def namespace(self, chain: str) -> Namespace:
        """The namespace whose filter table `chain` runs in: the host, or the router."""
        if chain == "FORWARD":
            return self.router.router.namespace
        if chain in ("INPUT", "OUTPUT"):
            return self.host.host.namespace
        raise ValueError(f"chain must be one of {', '.join(CHAINS)}, not {chain!r}")

    def _restore(self, namespace: Namespace, text: str) -> None:
        # Namespace.run has no stdin: iptables-legacy-restore reads the rules from a file.
        with tempfile.NamedTemporaryFile("w", prefix="bpflab-", suffix=".rules") as rules:
            rules.write(text)
            rules.flush()
            self._iptables(namespace, ["iptables-legacy-restore", "-w", IPTABLES_WAIT, rules.name])

    def _iptables(self, namespace: Namespace, *commands: list[str]) -> str:
        """Run `commands` one after the other in `namespace`, in one process tree, stopping at
        the first that fails (CommandError); their standard output."""
        # One `ip netns exec` for the batch: starting it is most of what a run costs.
        script = " && ".join(shlex.join(command) for command in commands)
        # Only this oracle changes its namespaces' tables, one command at a time: a lock file
        # of its own keeps whoever holds the machine-wide /run/xtables.lock (a big restore
        # elsewhere) from stalling every run.
        script = f"export XTABLES_LOCKFILE={shlex.quote(self._lock_file)} && {script}"
        return namespace.run(["sh", "-c", script], timeout=COMMAND_TIMEOUT).stdout

    def _parse_saved(self, namespace: Namespace, text: str) -> Ruleset:
        return parse(text, f"iptables-legacy-save -c in {namespace.name}")

    def saved(self, chain: str) -> Ruleset:
        """The filter table `chain` runs in, with counters, as iptables-legacy-save prints it."""
        namespace = self.namespace(chain)
        return self._parse_saved(namespace, self._iptables(namespace, _SAVE))

    def load(self, ruleset: Ruleset | str) -> Ruleset:
        """Load a filter table (a Ruleset or iptables-save text) into the host and the router
        with iptables-legacy-restore, zero its counters, and check that the kernel reads back
        the same table. Returns the table as loaded (text is parsed first).

        Raises ParseError for bad text, netns.CommandError when iptables-legacy-restore
        refuses the table, RulesetMismatch when the kernel holds something else.
        """
        if isinstance(ruleset, str):
            ruleset = parse(ruleset, "<NetfilterOracle.load>")
        text = write(ruleset)
        expected = _as_saved(parse(text, "<written>"))
        self.ruleset = None
        # Namespace.run has no stdin: iptables-legacy-restore reads the rules from a file.
        with tempfile.NamedTemporaryFile("w", prefix="bpflab-", suffix=".rules") as rules:
            rules.write(text)
            rules.flush()
            for namespace in (self.host.host.namespace, self.router.router.namespace):
                self._zeroed.discard(namespace.name)
                restore = ["iptables-legacy-restore", "-w", IPTABLES_WAIT, rules.name]
                output = self._iptables(namespace, restore, _ZERO, _SAVE)
                kernel = self._parse_saved(namespace, output)
                if _as_saved(kernel) != expected:
                    raise RulesetMismatch(namespace.name, text, write(kernel))
                if moved_counters(kernel):
                    raise ObservationError(
                        f"counters moved in namespace {namespace.name} right after loading: "
                        f"{moved_counters(kernel)}"
                    )
                self._zeroed.add(namespace.name)
        self.ruleset = ruleset
        return ruleset

    def counters(self, chain: str) -> Counters:
        """The non-zero counters of the table `chain` runs in: after a run, those that moved
        since it ended (it leaves the counters zeroed)."""
        return moved_counters(self.saved(chain))

    # -- traffic --------------------------------------------------------------------------

    def run(self, packet: bytes, chain: str, *, mark: int = 0) -> Observation:
        """Inject `packet` (IPv4, from the IP header on) so that it traverses `chain` once,
        and observe the verdict and the counters that moved.

        The addresses must suit the chain (see `ADDRESSES`, `DESTINATIONS`, `prepare`);
        raises PacketRefused otherwise, ObservationError when the datapath misbehaves.
        `mark` (skb->mark) can only be set for OUTPUT, where the host's socket gives it
        (SO_MARK): INPUT and FORWARD packets come from another namespace, and crossing into
        it clears the mark.
        """
        prepared = prepare(packet, chain)
        if isinstance(mark, bool) or not isinstance(mark, int) or not 0 <= mark <= 0xFFFFFFFF:
            raise ValueError(f"mark must be a 32-bit integer, not {mark!r}")
        if mark and chain != "OUTPUT":
            raise PacketRefused(
                f"{chain} packets arrive from another namespace, and crossing into it clears "
                f"skb->mark: mark {mark:#x} can only be given for OUTPUT"
            )
        destination = IPv4Address(prepared[16:20])
        pkt_type = DESTINATIONS[chain][destination]
        namespace = self.namespace(chain)
        # Counters are zeroed in the same process that reads them at the end of each run (and
        # by load): a run that failed half-way leaves them dirty, and the next zeroes first.
        if namespace.name not in self._zeroed:
            self._iptables(namespace, _ZERO)
        self._zeroed.discard(namespace.name)
        if chain == "INPUT":
            accepted = self._input(prepared, destination)
        elif chain == "FORWARD":
            accepted = self._forward(prepared)
        else:
            accepted = self._output(prepared, mark)
        table = self._parse_saved(namespace, self._iptables(namespace, _SAVE, _ZERO))
        self._zeroed.add(namespace.name)
        in_iface, out_iface = INTERFACES[chain]
        return Observation(
            chain=chain,
            verdict="ACCEPT" if accepted else "DROP",
            counters=moved_counters(table),
            packet=seen_by_chain(prepared, chain),
            in_iface=in_iface,
            out_iface=out_iface,
            pkt_type=pkt_type,
            mark=mark,
            sent=prepared,
        )

    def _probe(self) -> bytes:
        return PROBE_MAGIC + next(self._probes).to_bytes(8, "big")

    def _input(self, packet: bytes, destination: IPv4Address) -> bool:
        client, host = self.host.client, self.host.host
        receiver = self._raw_receiver(packet[9])
        _drain(receiver)
        _drain(self._host_probes)
        frame = _ethernet(_destination_mac(destination, host.mac), _mac(client.mac), ETH_P_IP)
        probe = self._probe()
        probe_frame = _ethernet(_mac(host.mac), _mac(client.mac), PROBE_ETHERTYPE) + probe
        before = self._local_deliveries()
        with _pinned():
            self._host_client_sender.send(frame + packet)
            self._host_client_sender.send(probe_frame)
            _until_probe(self._host_probes, probe, self.timeout)
        seen = any(received == packet for received in _drain(receiver))
        delivered = self._local_deliveries() - before
        # Two signals after LOCAL_IN: the raw socket, and the Ip InDelivers counter. Raw ICMP
        # sockets never see ICMP shorter than its 8-byte header (icmp_filter): only the counter
        # can tell for those.
        hidden = packet[9] == IPPROTO_ICMP and len(packet) - (packet[0] & 0x0F) * 4 < 8
        if (
            delivered not in (0, 1)
            or (seen and not delivered)
            or (delivered and not seen and not hidden)
        ):
            raise ObservationError(
                f"INPUT verdict signals disagree: the raw socket {'saw' if seen else 'missed'} "
                f"the packet, Ip InDelivers moved by {delivered}\n  {describe_packet(packet)}"
            )
        return bool(delivered)

    def _forward(self, packet: bytes) -> bool:
        client, router, server = self.router.client, self.router.router, self.router.server
        _drain(self._router_probes)
        _drain(self._server_capture)
        frame = _ethernet(_mac(router.client_side.mac), _mac(client.mac), ETH_P_IP)
        forwarded = seen_by_chain(packet, "FORWARD")
        first, second = self._probe(), self._probe()
        with _pinned():
            self._router_client_sender.send(frame + packet)
            self._router_client_sender.send(
                _ethernet(_mac(router.client_side.mac), _mac(client.mac), PROBE_ETHERTYPE) + first
            )
            # The first probe proves the router processed the packet, so a forwarded copy is
            # already queued towards the server; the second, sent now, queues behind it.
            _until_probe(self._router_probes, first, self.timeout)
            self._router_probe_sender.send(
                _ethernet(_mac(server.mac), _mac(router.server_side.mac), PROBE_ETHERTYPE) + second
            )
            frames = _until_probe(self._server_capture, second, self.timeout)
        return any(_ip_payload(frame) == forwarded for frame in frames)

    def _output(self, packet: bytes, mark: int) -> bool:
        client, host = self.host.client, self.host.host
        _drain(self._host_client_capture)
        if mark != self._output_mark:
            # raw_send_hdrinc gives the skb the socket's mark before LOCAL_OUT.
            # Packed by hand: setsockopt's int form is signed and refuses marks >= 2**31.
            self._host_raw_sender.setsockopt(
                socket.SOL_SOCKET, socket.SO_MARK, mark.to_bytes(4, sys.byteorder)
            )
            self._output_mark = mark
        probe = self._probe()
        with _pinned():
            try:
                self._host_raw_sender.sendto(packet, (str(HOST_CLIENT), 0))
                sent = True
            except PermissionError:
                sent = False  # NF_DROP in LOCAL_OUT: raw_send_hdrinc returns -EPERM
            except OSError as error:
                raise PacketRefused(f"the host's raw socket refused the packet: {error}") from error
            self._host_probe_sender.send(
                _ethernet(_mac(client.mac), _mac(host.mac), PROBE_ETHERTYPE) + probe
            )
            frames = _until_probe(self._host_client_capture, probe, self.timeout)
        # IP_HDRINCL lets the kernel fill a zero IP id: compare everything else.
        arrived = any(_same_but_id(_ip_payload(frame), packet) for frame in frames)
        if sent != arrived:
            raise ObservationError(
                "OUTPUT verdict signals disagree: sendto "
                + ("succeeded" if sent else "failed with EPERM")
                + " but the packet "
                + ("never reached" if sent else "reached")
                + f" the client\n  {describe_packet(packet)}"
            )
        return sent


def _same_but_id(received: bytes | None, sent: bytes) -> bool:
    if received is None or len(received) != len(sent):
        return False
    if sent[4:6] != b"\0\0":
        return received == sent
    return received[:4] + received[6:10] + received[12:] == sent[:4] + sent[6:10] + sent[12:]
