"""Traffic in a lab: build frames from the topology, send them, and see what arrived.

scapy builds and dissects bytes only: its interface and route caches do not follow us across
namespaces, so every socket here is opened inside the namespace it belongs to (AF_PACKET for
frames on the wire, raw IP sockets for what a node's stack delivers or sends).

A `Lab` is one topology with quiet nodes (the kernel's own replies are kept out of the way) and
a capture on every interface, running for the lab's life. Expectations name a node:
- `expect_received(node, match)`: the frame arrived at a plain node (client, server), or the
  rule holder's stack (host, router) delivered it, which is after INPUT;
- `expect_not_received(node, match)`: the same, not arrived.
"Not arrived" is decided without waiting (`Lab.deliver`): after the copies of a frame, a probe
frame follows each link of their path (harness.lab.frames), and once the last probe is in, a
copy not seen was dropped. The rule holder's programs pass the probes as "not handled", and the
delivery says how many of them crossed its hooks. When one fails, every interface's capture is
written as pcap under the artefacts folder and the message shows the closest frame field by
field against what was expected.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import tempfile
from contextlib import ExitStack, closing
from pathlib import Path

from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from netns import HostTopology, RouterTopology
from netns.bridge import BridgeTopology
from netns.namespace import Namespace

from .frames import (
    PROBE_ETHERTYPE,
    capture,
    drain,
    ethernet,
    mac,
    pinned,
    probe_payload,
    sender,
    until_probe,
)
from .twin import QUIET_RECEIVER, quiet_host
from .watching import Capture, Delivery, Match, Node, Receiver

LAB_NETWORKS = tuple(
    ipaddress.IPv4Network(n)
    for n in ("198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24", "198.18.4.0/24", "198.18.5.0/24")
)
TOPOLOGIES = ("host", "router", "bridge")
ARTEFACTS = Path(os.environ.get("BPFLAB_ARTEFACTS", "artefacts"))
# The raw-table chain every node jumps to first from PREROUTING and OUTPUT: empty (no effect)
# except during a real exchange (harness.lab.exchange), when it accepts that exchange's packets
# ahead of the quiet rules.
EXCHANGE_CHAIN = "bl_exchange"
QUIET_NODE = "*raw\n:PREROUTING DROP [0:0]\n:OUTPUT DROP [0:0]\nCOMMIT\n"
EXCHANGE_PORTS = 49152  # first source port (and ping id) of the lab's exchanges
# Seconds to wait for one probe: they arrive in microseconds, so this is only reached when the
# topology stopped moving frames (an ObservationError then says so).
PROBE_TIMEOUT = 5.0


class ExpectationFailed(AssertionError):
    """A packet did (or did not) arrive, against the expectation; says where the pcaps are."""


class Lab:
    """A topology ("host", "router" or "bridge": netns.bridge, its host the rule holder) ready
    for traffic; a context manager."""

    def __init__(self, topology: str, *, timeout: float = 0.5):
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, not {topology!r}")
        self.kind = topology
        self.timeout = timeout
        self._stack = ExitStack()
        self._ids = itertools.count(0x1000)
        self._probes = itertools.count(1)
        self._probe_sockets: dict[tuple[str, str, str], socket.socket] = {}
        self._ports = itertools.count(EXCHANGE_PORTS)
        self.captures: list[Capture] = []

    def __enter__(self) -> Lab:
        try:
            if self.kind == "host":
                self.topology = self._stack.enter_context(HostTopology(ipv6=False))
                self.holder_namespace = self.topology.host.namespace
            elif self.kind == "bridge":
                self.topology = self._stack.enter_context(BridgeTopology())
                self.holder_namespace = self.topology.host
            else:
                self.topology = self._stack.enter_context(RouterTopology(ipv6=False))
                self.holder_namespace = self.topology.router.namespace
            self._quiet()
            for endpoint in self._endpoints():
                capture = Capture(endpoint.namespace, endpoint.ifname)
                self._stack.callback(capture.stop)
                self.captures.append(capture)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _endpoints(self):
        t = self.topology
        if self.kind == "host":
            return [t.client, t.host]
        if self.kind == "bridge":
            return [*t.clients, t.bridge_side, t.uplink, t.server]
        return [t.client, t.router.client_side, t.router.server_side, t.server]

    def _quiet(self) -> None:
        """Keep the kernel's own answers (RSTs, ICMP errors, echo replies) out of the traffic
        and the counters: plain nodes never answer, the rule holder sends only what our
        sockets send. The raw table runs before anything else in netfilter. On a bridge the
        plain nodes send nothing of their own either (the IGMP reports of their new devices
        would cross the bridge's FORWARD): their frames are sent on the wire, their exchanges
        let through by the exchange chain."""
        for endpoint in self._endpoints():
            namespace = endpoint.namespace
            quiet = namespace is self.holder_namespace
            plain = QUIET_NODE if self.kind == "bridge" else QUIET_RECEIVER
            text = quiet_host(os.geteuid()) if quiet else plain
            restore(namespace, with_exchange_chain(text))

    def namespaces(self) -> list[Namespace]:
        """Every namespace of the lab, once each (the router has two sides)."""
        found: list[Namespace] = []
        for endpoint in self._endpoints():
            if all(endpoint.namespace is not known for known in found):
                found.append(endpoint.namespace)
        return found

    def next_port(self) -> int:
        """A source port (or ping id) no other exchange of this lab has used."""
        port = next(self._ports)
        if port > 65535:
            raise RuntimeError("this lab has run out of exchange source ports")
        return port

    def set_exchange_rules(self, rules: list[str]) -> None:
        """Fill every node's exchange chain with `rules` (iptables rule specifications for
        the raw table, each ending in a target), replacing what it held; [] empties it."""
        lines = [f":{EXCHANGE_CHAIN} - [0:0]"]  # with --noflush: flushes that chain only
        lines += [f"-A {EXCHANGE_CHAIN} {rule}" for rule in rules]
        text = "*raw\n" + "\n".join(lines) + "\nCOMMIT\n"
        for namespace in self.namespaces():
            restore(namespace, text, noflush=True)

    def load_filter_table(self, text: str) -> None:
        """Make this lab a netfilter twin: the filter table `text` (iptables-save text) goes
        into the rule holder's netfilter with iptables-legacy-restore.

        Raises netns.CommandError when iptables-legacy-restore refuses it."""
        restore(self.holder_namespace, text)

    # Nodes and frames ---------------------------------------------------------------------

    def node(self, name: str, peer: str) -> Node:
        """Node `name` as seen from `peer` (the router has a side facing each)."""
        t = self.topology
        if self.kind == "host":
            endpoint = {"client": t.client, "host": t.host}[name]
            return _node(name, endpoint, holder=name == "host")
        if self.kind == "bridge":
            if name == "host":
                side = t.uplink if peer == "server" else t.bridge_side
                return _node(name, side, holder=True)
            ends = {"client1": t.clients[0], "client2": t.clients[1], "server": t.server}
            return _node(name, ends[name], holder=False)
        if name == "router":
            side = t.router.client_side if peer == "client" else t.router.server_side
            return _node(name, side, holder=True)
        return _node(name, {"client": t.client, "server": t.server}[name], holder=False)

    def next_hop_mac(self, source: str, destination: str) -> str:
        """The MAC a frame from `source` to `destination` is addressed to on the first link."""
        if self.kind == "host" or self.holder in (source, destination) or self.bridged(
            source, destination
        ):
            return self.node(destination, source).mac
        return self.node(self.holder, source).mac

    @property
    def holder(self) -> str:
        """The rule holder's node name."""
        return {"host": "host", "router": "router", "bridge": "host"}[self.kind]

    def bridged(self, source: str, destination: str) -> bool:
        """Whether frames from `source` to `destination` cross the bridge host's bridge from
        port to port (the two clients of the bridge topology)."""
        return self.kind == "bridge" and {source, destination} == {"client1", "client2"}

    def forwarding(self, source: str, destination: str) -> tuple[int, str, str]:
        """What forwarding does to a frame from `source` to `destination` through the rule
        holder: the TTL taken off, and the MACs it arrives with (bridged: unchanged)."""
        if self.bridged(source, destination):
            return 0, self.node(source, destination).mac, self.node(destination, source).mac
        router = self.node(self.holder, destination)
        return 1, router.mac, self.node(destination, self.holder).mac

    def frame(
        self,
        source: str,
        destination: str,
        packet: Packet,
        *,
        keep_addresses=False,
        fresh_id: bool = True,
    ) -> Packet:
        """`packet` completed from the topology: Ether and IP added or filled in where the
        caller left fields unset; a fresh IP id, so that each packet can be told apart."""
        src, dst = self.node(source, destination), self.node(destination, source)
        # The spec may start at Ether, at IP or above IP (an ICMP error carries an inner IP).
        if not isinstance(packet, Ether | IP):
            packet = IP() / packet
        if not isinstance(packet, Ether):
            packet = Ether() / packet
        ether, ip = packet[Ether], packet[IP]
        ether.src = ether.fields.get("src", src.mac)
        if "dst" not in ether.fields:
            group = _group_mac(ip.fields.get("dst"))
            ether.dst = group or self.next_hop_mac(source, destination)
        if not keep_addresses or "src" not in ip.fields:
            ip.src = ip.fields.get("src", src.ipv4) if not keep_addresses else src.ipv4
        if not keep_addresses or "dst" not in ip.fields:
            ip.dst = ip.fields.get("dst", dst.ipv4) if not keep_addresses else dst.ipv4
        if fresh_id and "id" not in ip.fields:
            ip.id = next(self._ids) & 0xFFFF
        return Ether(bytes(packet))  # fields computed: lengths, checksums

    # Sending and observing ----------------------------------------------------------------

    def send(self, source: str, destination: str, frame: Packet) -> None:
        """From a plain node, the frame goes on the wire; from the rule holder, the IP packet
        goes through its stack (LOCAL_OUT, routing, TC egress), as locally made traffic does."""
        node = self.node(source, destination)
        if node.holder:
            with closing(
                node.namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            ) as sock:
                try:
                    sock.sendto(bytes(frame[IP]), (frame[IP].dst, 0))
                except PermissionError:
                    pass  # netfilter's OUTPUT dropped it (a twin lab): it is not sent
            return
        with closing(node.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW)) as sock:
            sock.bind((node.ifname, 0))
            sock.send(bytes(frame))

    def receiver(self, destination: str, source: str, protocol: int) -> Receiver:
        node = self.node(destination, source)
        return Receiver(node, protocol)

    def deliver(self, source: str, destination: str, frame: Packet, count: int = 1) -> Delivery:
        """Send `count` copies of `frame` from `source` to `destination` (as `send` does) and
        see which arrived, without waiting for a timeout: the sending thread stays on one CPU
        while a probe follows the copies over each link of their path, so that every copy has
        been delivered or dropped when the last probe comes in (harness.lab.frames)."""
        hops = self._hops(source, destination)
        for _, target in hops:
            drain(self._probe_socket("capture", target))
        with self.receiver(destination, source, frame[IP].proto) as receiver:
            with pinned():
                for _ in range(count):
                    self.send(source, destination, frame)
                for origin, target in hops:
                    payload = probe_payload(next(self._probes))
                    header = ethernet(mac(target.mac), mac(origin.mac), PROBE_ETHERTYPE)
                    self._probe_socket("sender", origin).send(header + payload)
                    until_probe(self._probe_socket("capture", target), payload, PROBE_TIMEOUT)
            arrived = receiver.queued(same_packet(frame), count)
            seen = receiver.seen
        # A probe the rule holder's programs see counts there as not handled: at each end of a
        # hop that is the holder, and on the out-port of a bridged hop.
        probes = sum(node.holder for hop in hops for node in hop)
        probes += self.bridged(source, destination)
        return Delivery(arrived, seen, probes)

    def _hops(self, source: str, destination: str) -> list[tuple[Node, Node]]:
        """The links a frame from `source` to `destination` crosses, as (sending end,
        receiving end): one (bridged from port to port, too), or two through the holder."""
        holder = self.holder
        if self.kind == "host" or holder in (source, destination) or self.bridged(
            source, destination
        ):
            return [(self.node(source, destination), self.node(destination, source))]
        return [
            (self.node(source, holder), self.node(holder, source)),
            (self.node(holder, destination), self.node(destination, holder)),
        ]

    def _probe_socket(self, kind: str, node: Node) -> socket.socket:
        """The lab's probe sender or probe capture on `node`'s interface, opened once."""
        key = (kind, node.namespace.name, node.ifname)
        sock = self._probe_sockets.get(key)
        if sock is None:
            sock = sender(node) if kind == "sender" else capture(node, PROBE_ETHERTYPE)
            self._stack.callback(sock.close)
            self._probe_sockets[key] = sock
        return sock

    def write_artefacts(self, label: str) -> Path:
        folder = ARTEFACTS / _safe(label)
        folder.mkdir(parents=True, exist_ok=True)
        for taken in self.captures:
            taken.write_pcap(folder / f"{taken.namespace.name}-{taken.ifname}.pcap")
        return folder


def restore(namespace: Namespace, text: str, *, noflush: bool = False) -> None:
    """iptables-legacy-restore `text` in `namespace` (Namespace.run has no stdin: a file)."""
    with tempfile.NamedTemporaryFile("w", prefix="bpflab-", suffix=".rules") as rules:
        rules.write(text)
        rules.flush()
        flags = ["--noflush"] if noflush else []
        namespace.run(["iptables-legacy-restore", "-w", "10", *flags, rules.name])


def with_exchange_chain(text: str) -> str:
    """Raw-table restore `text` (quiet rules) with the exchange chain declared and jumped to
    first from PREROUTING and OUTPUT, ahead of every quiet rule."""
    lines = text.splitlines()
    last_declaration = max(i for i, line in enumerate(lines) if line.startswith(":"))
    added = [
        f":{EXCHANGE_CHAIN} - [0:0]",
        f"-A PREROUTING -j {EXCHANGE_CHAIN}",
        f"-A OUTPUT -j {EXCHANGE_CHAIN}",
    ]
    lines[last_declaration + 1 : last_declaration + 1] = added
    return "\n".join(lines) + "\n"


def _node(name: str, endpoint, *, holder: bool) -> Node:
    return Node(
        name, endpoint.namespace, endpoint.ifname, endpoint.mac, str(endpoint.ipv4.ip), holder
    )


def _group_mac(address: str | None) -> str | None:
    """The Ethernet address a broadcast or multicast IPv4 destination goes to, as a sender's
    stack would address it (so the receiver sees the packet type netfilter would)."""
    if address is None:
        return None
    ip = ipaddress.IPv4Address(address)
    if ip.is_multicast:
        low = int(ip) & 0x7FFFFF  # RFC 1112: 01:00:5e and the group's low 23 bits
        return "01:00:5e:" + ":".join(f"{(low >> s) & 0xFF:02x}" for s in (16, 8, 0))
    if ip == ipaddress.IPv4Address("255.255.255.255") or any(
        ip == network.broadcast_address for network in LAB_NETWORKS
    ):
        return "ff:ff:ff:ff:ff:ff"
    return None


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:100]


def same_packet(sent: Packet) -> Match:
    """Matches the frame or IP packet carrying the same IP source, destination, protocol and
    id as `sent`: the packet after any forwarding."""
    ip = sent[IP]
    key = (ip.src, ip.dst, ip.proto, ip.id)

    def match(packet: Packet) -> bool:
        return (
            IP in packet
            and (packet[IP].src, packet[IP].dst, packet[IP].proto, packet[IP].id) == key
        )

    return match


def field_diff(expected: Packet, got: Packet | None) -> str:
    """Layer by layer, the fields that differ between what was expected and what was seen."""
    if got is None:
        return "  nothing comparable arrived"
    lines = []
    layer_e, layer_g = expected, got
    while layer_e is not None and layer_e.name not in ("NoPayload",):
        if layer_g is None or type(layer_g) is not type(layer_e):
            lines.append(f"  {layer_e.name}: expected, got {getattr(layer_g, 'name', 'nothing')}")
            break
        for field in layer_e.fields_desc:
            want, have = layer_e.getfieldval(field.name), layer_g.getfieldval(field.name)
            if want != have:
                lines.append(f"  {layer_e.name}.{field.name}: expected {want!r}, got {have!r}")
        layer_e = layer_e.payload if layer_e.payload.name != "NoPayload" else None
        layer_g = layer_g.payload if layer_g.payload.name != "NoPayload" else None
    return "\n".join(lines) or "  (no field differs)"


def expect_received(
    lab: Lab,
    source: str,
    destination: str,
    frame: Packet,
    *,
    count: int = 1,
    label: str = "expectation",
) -> list[Packet]:
    """Send `frame` `count` times from `source` and require all to reach `destination`."""
    arrived = _exchange(lab, source, destination, frame, count)
    if len(arrived[0]) != count:
        _fail(
            lab,
            label,
            f"{count} sent from {source} to {destination}, {len(arrived[0])} "
            "arrived, all were expected to",
            frame,
            arrived[1],
        )
    return arrived[0]


def expect_not_received(
    lab: Lab,
    source: str,
    destination: str,
    frame: Packet,
    *,
    count: int = 1,
    label: str = "expectation",
) -> None:
    arrived = _exchange(lab, source, destination, frame, count)
    if arrived[0]:
        _fail(
            lab,
            label,
            f"{count} sent from {source} to {destination}, {len(arrived[0])} "
            "arrived, none was expected to",
            frame,
            arrived[0],
        )


def _exchange(lab: Lab, source: str, destination: str, frame: Packet, count: int):
    delivery = lab.deliver(source, destination, frame, count)
    return delivery.arrived, delivery.seen


def _fail(lab: Lab, label: str, message: str, frame: Packet, seen: list[Packet]) -> None:
    folder = lab.write_artefacts(label)
    expected = frame[IP] if seen and IP in seen[0] and Ether not in seen[0] else frame
    closest = next((p for p in seen if IP in p and p[IP].proto == frame[IP].proto), None)
    raise ExpectationFailed(
        f"{message}\n{field_diff(expected, closest)}\ncaptures of every lab interface: {folder}"
    )
