"""The netfilter oracle: twin topologies where the kernel's iptables-legacy decides.

`NetfilterOracle` owns a HostTopology (client -> host: the host's INPUT chain sees what the client
sends, its OUTPUT chain what the host sends) and a RouterTopology (client -> router -> server: the
router's FORWARD chain). It loads one filter table into the host and the router, injects one
packet at a time so that it traverses the chosen chain, and reports what netfilter did: the
verdict, seen on the far side of the chain, and every counter that moved (an `Observation`).

How a verdict is observed:
- INPUT: a raw IP socket in the host for the packet's protocol. Raw delivery happens after
  LOCAL_IN, so the socket sees the packet exactly when INPUT accepted it. The host's Ip
  InDelivers counter (/proc/net/snmp) must agree; it alone decides for ICMP shorter than its
  8-byte header, which raw ICMP sockets never receive.
- FORWARD: an AF_PACKET socket on the server's interface sees the forwarded frame.
- OUTPUT: the host sends with a raw IP_HDRINCL socket; a drop in LOCAL_OUT makes sendto fail
  with EPERM, and an accepted packet reaches the client's AF_PACKET socket. Both must agree.
"Not seen" is decided without sleeping, by a probe frame that follows the packet
(`harness.lab.frames`).

Noise is kept out of the counters: IPv6 is off, neighbours are permanent, the raw table drops
everything the host or router kernels would send on their own (RSTs, ICMP errors, echo replies)
before the filter table sees it, and the client and server drop every incoming IP packet in
their raw PREROUTING so that they never answer. Only the `bl` namespaces the oracle creates are
touched, always through `Namespace.run`.

What the oracle refuses to inject, because it would not reach the chain as given, and the
address plan it checks on entry are in `harness.lab.twin`.

`load` checks that the kernel reads back the table it was given, except for what
iptables-legacy-save cannot print (`! --dport 0:65535`, `! -i +`, `--tcp-flags NONE X`: the
kernel holds them, and they never match).
"""

from __future__ import annotations

import copy
import itertools
import os
import shlex
import socket
import sys
import tempfile
from contextlib import ExitStack
from ipaddress import IPv4Address
from types import TracebackType
from typing import Self

from codegen.rules import Interface, Match, Ruleset, parse, write
from codegen.rules.extensions import extension_of
from codegen.rules.model import IP_PART
from netns import HostTopology, Namespace, RouterTopology

from .frames import (
    ETH_P_ALL,
    ETH_P_IP,
    PROBE_ETHERTYPE,
    ObservationError,
    capture,
    destination_mac,
    drain,
    ethernet,
    ip_payload,
    mac,
    pinned,
    probe_payload,
    same_but_id,
    sender,
    until_probe,
)
from .observation import Observation, describe_packet, moved_counters
from .twin import (
    CHAINS,
    DESTINATIONS,
    HOST,
    HOST_CLIENT,
    INTERFACES,
    IPPROTO_ICMP,
    IPPROTO_RAW,
    QUIET_RECEIVER,
    QUIET_ROUTER,
    ROUTER_CLIENT,
    ROUTER_CLIENT_SIDE,
    ROUTER_SERVER_SIDE,
    SERVER,
    Counters,
    OracleError,
    PacketRefused,
    prepare,
    quiet_host,
    seen_by_chain,
)

IPTABLES_WAIT = "10"  # seconds to wait for the xtables lock (the oracle's own lock file)
COMMAND_TIMEOUT = 30.0
# Seconds to wait for a probe. Probes arrive in microseconds; this is only reached when the
# topology is broken, and then the oracle raises rather than guessing (generous: a busy
# machine may delay a softirq or a thread by much more than an idle one).
ARRIVAL_TIMEOUT = 10.0


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
                    "netns.topology changed its address plan; update harness/lab/twin.py"
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
        self._restore(host, quiet_host(os.geteuid()))
        self._restore(self.router.router.namespace, QUIET_ROUTER)
        for receiver in (self.host.client, self.router.client, self.router.server):
            self._restore(receiver.namespace, QUIET_RECEIVER)

    def _open_sockets(self, stack: ExitStack) -> None:
        def keep(sock: socket.socket) -> socket.socket:
            return stack.enter_context(sock)

        host, router = self.host, self.router
        self._host_client_sender = keep(sender(host.client))
        self._host_probes = keep(capture(host.host, PROBE_ETHERTYPE))
        self._host_probe_sender = keep(sender(host.host))
        self._host_client_capture = keep(capture(host.client, ETH_P_ALL))
        self._host_raw_sender = keep(
            host.host.namespace.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_RAW)
        )
        self._router_client_sender = keep(sender(router.client))
        self._router_probes = keep(capture(router.router.client_side, PROBE_ETHERTYPE))
        self._router_probe_sender = keep(sender(router.router.server_side))
        self._server_capture = keep(capture(router.server, ETH_P_ALL))
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
        return probe_payload(next(self._probes))

    def _input(self, packet: bytes, destination: IPv4Address) -> bool:
        client, host = self.host.client, self.host.host
        receiver = self._raw_receiver(packet[9])
        drain(receiver)
        drain(self._host_probes)
        frame = ethernet(destination_mac(destination, host.mac), mac(client.mac), ETH_P_IP)
        probe = self._probe()
        probe_frame = ethernet(mac(host.mac), mac(client.mac), PROBE_ETHERTYPE) + probe
        before = self._local_deliveries()
        with pinned():
            self._host_client_sender.send(frame + packet)
            self._host_client_sender.send(probe_frame)
            until_probe(self._host_probes, probe, self.timeout)
        seen = any(received == packet for received in drain(receiver))
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
        drain(self._router_probes)
        drain(self._server_capture)
        frame = ethernet(mac(router.client_side.mac), mac(client.mac), ETH_P_IP)
        forwarded = seen_by_chain(packet, "FORWARD")
        first, second = self._probe(), self._probe()
        with pinned():
            self._router_client_sender.send(frame + packet)
            self._router_client_sender.send(
                ethernet(mac(router.client_side.mac), mac(client.mac), PROBE_ETHERTYPE) + first
            )
            # The first probe proves the router processed the packet, so a forwarded copy is
            # already queued towards the server; the second, sent now, queues behind it.
            until_probe(self._router_probes, first, self.timeout)
            self._router_probe_sender.send(
                ethernet(mac(server.mac), mac(router.server_side.mac), PROBE_ETHERTYPE) + second
            )
            frames = until_probe(self._server_capture, second, self.timeout)
        return any(ip_payload(frame) == forwarded for frame in frames)

    def _output(self, packet: bytes, mark: int) -> bool:
        client, host = self.host.client, self.host.host
        drain(self._host_client_capture)
        if mark != self._output_mark:
            # raw_send_hdrinc gives the skb the socket's mark before LOCAL_OUT.
            # Packed by hand: setsockopt's int form is signed and refuses marks >= 2**31.
            self._host_raw_sender.setsockopt(
                socket.SOL_SOCKET, socket.SO_MARK, mark.to_bytes(4, sys.byteorder)
            )
            self._output_mark = mark
        probe = self._probe()
        with pinned():
            try:
                self._host_raw_sender.sendto(packet, (str(HOST_CLIENT), 0))
                sent = True
            except PermissionError:
                sent = False  # NF_DROP in LOCAL_OUT: raw_send_hdrinc returns -EPERM
            except OSError as error:
                raise PacketRefused(f"the host's raw socket refused the packet: {error}") from error
            self._host_probe_sender.send(
                ethernet(mac(client.mac), mac(host.mac), PROBE_ETHERTYPE) + probe
            )
            frames = until_probe(self._host_client_capture, probe, self.timeout)
        # IP_HDRINCL lets the kernel fill a zero IP id: compare everything else.
        arrived = any(same_but_id(ip_payload(frame), packet) for frame in frames)
        if sent != arrived:
            raise ObservationError(
                "OUTPUT verdict signals disagree: sendto "
                + ("succeeded" if sent else "failed with EPERM")
                + " but the packet "
                + ("never reached" if sent else "reached")
                + f" the client\n  {describe_packet(packet)}"
            )
        return sent
