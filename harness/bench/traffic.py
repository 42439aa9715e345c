"""Throughput across a veth pair, and load and update times, for each filter.

Four host topologies (a client and a receiving host on one veth pair, netns.HostTopology), one per
filter: none, our TC programs (`lifecycle.apply`), iptables-legacy's INPUT chain, an nftables
input chain. Each receiver holds its rule set for a whole size, so the filters can be alternated
trial by trial without reloading.

Traffic: trafgen (netsniff-ng) in the client namespace sends one 64-byte frame over and over from
one process through a PACKET_MMAP ring, bounded in count and stopped after the window. veth
hands each frame to the receiver's backlog on the sending CPU, so the receiver's whole path (TC
ingress, IP, netfilter, TCP) runs on that CPU right after the send: the rate is set by the
cost of send plus receive, and what a filter adds shows in it.

Counted at the receiver: the IP layer's InDelivers of the receiving namespace, i.e. packets that
passed every filter and were handed to TCP (which drops the RST silently). The client's
transmit counter gives the offered rate. Both are read at the start and the end of a window
after a warm-up; the rate is the delivered count over the window.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from netns import HostTopology, Namespace

from .workload import (
    CLIENT_PORT,
    EMPTY_IPTABLES,
    HOST_PORT,
    STATEFUL_POSITIONS,
    Position,
    StatefulPosition,
    ethernet_frame,
    ip_packet,
    iptables_rules,
    nft_rules,
    stateful_iptables_rules,
    stateful_nft_rules,
    stateful_packet,
)

FILTERS = ("none", "bytecode", "iptables-legacy", "nftables")
LOADABLE = ("bytecode", "iptables-legacy", "nftables")
TRAFGEN = "trafgen"
START_TIMEOUT = 3.0  # seconds for the generator's first packet to show
STOP_TIMEOUT = 3.0  # seconds for the generator to exit after SIGINT, before SIGKILL
MAX_RATE = 5_000_000  # packets per second no veth here reaches: bounds the generator's count
COMMAND_TIMEOUT = 300.0  # iptables-legacy-restore or nft -f of the largest sets takes < 5 s

Progress = Callable[[str], None]


class TrafficError(Exception):
    """The traffic generator or a filter tool failed, in one sentence."""


def missing_tools() -> str | None:
    """None when every tool the traffic bench runs is installed, else what is missing."""
    import shutil

    wanted = {
        TRAFGEN: "netsniff-ng",
        "iptables-legacy-restore": "iptables",
        "nft": "nftables",
        "ip": "iproute2",
    }
    missing = [
        f"{tool} (Debian package {package})"
        for tool, package in wanted.items()
        if shutil.which(tool) is None
    ]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/bootstrap or apt-get install them"
    return None


@dataclass(frozen=True)
class RuleSetTexts:
    """One rule set as each filter loads it."""

    name: str  # what the files written for it are called
    iptables: str  # iptables-save text: `bpflab apply` and iptables-legacy-restore read it
    nft: str  # for `nft -f`
    nft_again: str  # the same, loading over `nft` in one transaction
    sets: str | None = None  # the ipsets its -m set rules use, as `ipset save` prints them


@dataclass(frozen=True)
class Sample:
    delivered_pps: float
    offered_pps: float


def _proc_net(namespace: Namespace, name: str) -> str:
    # /proc/net follows the process's main thread; /proc/thread-self/net the thread that reads.
    with namespace.enter():
        return Path("/proc/thread-self/net", name).read_text()


def delivered(namespace: Namespace) -> int:
    """Ip InDelivers of the namespace: packets handed to a transport protocol."""
    lines = [line.split() for line in _proc_net(namespace, "snmp").splitlines()]
    ip = [line for line in lines if line and line[0] == "Ip:"]
    return int(dict(zip(ip[0][1:], ip[1][1:], strict=True))["InDelivers"])


def transmitted(namespace: Namespace, ifname: str) -> int:
    for line in _proc_net(namespace, "dev").splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == ifname:
            return int(counters.split()[9])  # rx: 8 fields, then tx bytes, tx packets
    raise TrafficError(f"no interface {ifname} in namespace {namespace.name}")


class Receiver:
    """One topology whose host filters with one of FILTERS."""

    def __init__(self, topology: HostTopology, filter_name: str, directory: Path):
        self.topology = topology
        self.filter = filter_name
        self.directory = directory
        self.loaded = False
        self.ipsets = False  # iptables-legacy's receiver holds ipsets

    @property
    def host(self) -> Namespace:
        return self.topology.host.namespace

    @property
    def client(self) -> Namespace:
        return self.topology.client.namespace

    def _run(self, argv: list[str]) -> None:
        self.host.run(argv, timeout=COMMAND_TIMEOUT)

    def _write(self, name: str, text: str) -> str:
        path = self.directory / f"{self.filter}-{name}"
        path.write_text(text)
        return str(path)

    def clear(self) -> None:
        """Back to no rules at all, so that the next load starts from nothing."""
        if not self.loaded:
            return
        if self.filter == "bytecode":
            from ..deploy.lifecycle import flush

            flush(self.host.name)
        elif self.filter == "iptables-legacy":
            self._run(["iptables-legacy-restore", self._write("empty.rules", EMPTY_IPTABLES)])
            if self.ipsets:  # unreferenced now: every set of the receiver goes
                self._run(["ipset", "destroy"])
                self.ipsets = False
        elif self.filter == "nftables":
            self._run(["nft", "flush", "ruleset"])
        self.loaded = False

    def load(self, count: int, clock: Callable[[], float], *, stateful: bool = False) -> dict:
        """Load `count` rules (of the stateful workload, with `stateful`) into a receiver that
        has none, then load them again over themselves (the atomic update); time both."""
        rules = stateful_iptables_rules if stateful else iptables_rules
        nft = stateful_nft_rules if stateful else nft_rules
        texts = RuleSetTexts(str(count), rules(count), nft(count), nft(count, replace=True))
        return self.load_texts(texts, clock)

    def load_texts(self, texts: RuleSetTexts, clock: Callable[[], float]) -> dict:
        """Load a rule set into a receiver that has none, then load it again over itself (the
        atomic update); time both. iptables-legacy's time includes `ipset restore`."""
        self.clear()
        figures: dict = {}
        name, text, sets = texts.name, texts.iptables, texts.sets
        if self.filter == "bytecode":
            from codegen.rules.sets import parse_sets

            from ..deploy.lifecycle import Applied, apply

            def load() -> Applied:  # the sets read each time, as ipset restore reads them
                table = None if sets is None else parse_sets(sets, f"{name}.sets")
                return apply(text, "bench.rules", self.host.name, sets=table)

            started = clock()
            applied = load()
            figures["load_s"] = clock() - started
            self.loaded = True
            started = clock()
            load()
            figures["update_s"] = clock() - started
            ingress = applied.programs["ingress"]
            figures["ingress_instructions"] = ingress.insn_count
            figures["ingress_verifier_processed"] = (
                ingress.stats.insns_processed if ingress.stats is not None else None
            )
        elif self.filter == "iptables-legacy":
            path = self._write(f"{name}.rules", text)
            steps = [["iptables-legacy-restore", path]]
            if sets is not None:  # -exist: the second load replaces nothing it has
                steps.insert(0, ["ipset", "restore", "-exist", "-file", self._write(name, sets)])
            started = clock()
            for step in steps:
                self._run(step)
            figures["load_s"] = clock() - started
            self.loaded = True
            self.ipsets = sets is not None
            started = clock()
            for step in steps:
                self._run(step)
            figures["update_s"] = clock() - started
        elif self.filter == "nftables":
            first = self._write(f"{name}.nft", texts.nft)
            again = self._write(f"{name}-replace.nft", texts.nft_again)
            started = clock()
            self._run(["nft", "-f", first])
            figures["load_s"] = clock() - started
            self.loaded = True
            started = clock()
            self._run(["nft", "-f", again])
            figures["update_s"] = clock() - started
        return figures

    def frame(self, count: int, position: Position | StatefulPosition) -> bytes:
        client, host = self.topology.client, self.topology.host
        if position in STATEFUL_POSITIONS:
            packet = stateful_packet(count, position, client.ipv4.ip, host.ipv4.ip)  # type: ignore[arg-type]
        else:
            packet = ip_packet(count, position, host.ipv4.ip)  # type: ignore[arg-type]
        return self.framed(packet)

    def framed(self, packet: bytes) -> bytes:
        """An IPv4 packet in the Ethernet frame the client sends the host."""
        client, host = self.topology.client, self.topology.host
        return ethernet_frame(packet, source_mac=client.mac, destination_mac=host.mac)

    def prime(self) -> None:
        """The host writes to the client first, through its stack (OUTPUT and every filter's
        connection tracking), so that the client's datagrams are replies."""
        import socket

        client, host = self.topology.client, self.topology.host
        with self.host.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((str(host.ipv4.ip), HOST_PORT))
            sock.sendto(b"prime", (str(client.ipv4.ip), CLIENT_PORT))

    def measure(self, frame: bytes, *, warmup_s: float, window_s: float) -> Sample:
        """Send `frame` from the client with trafgen and count what the host delivers."""
        config = self.directory / f"{self.filter}-frame.trafgen"
        config.write_text("{ " + ", ".join(f"0x{byte:02x}" for byte in frame) + " }\n")
        ifname = self.topology.client.ifname
        bound = int(MAX_RATE * (START_TIMEOUT + warmup_s + window_s + STOP_TIMEOUT))
        argv = [
            "ip", "netns", "exec", self.client.name,
            TRAFGEN, "--dev", ifname, "--conf", str(config), "--num", str(bound),
            # One process; leave IRQ affinities and the (global) socket memory sysctls alone.
            "--cpus", "1", "--notouch-irq", "--no-sock-mem", "--no-cpu-stats",
        ]  # fmt: skip
        sent_before = transmitted(self.client, ifname)
        errors = self.directory / "trafgen.err"
        with errors.open("w") as error_file:
            # A session of its own: trafgen forks a sender, and SIGINT to the group stops both
            # the way Ctrl-C would.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=error_file,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while transmitted(self.client, ifname) == sent_before:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise TrafficError(
                        f"trafgen sent nothing in {START_TIMEOUT} s from namespace "
                        f"{self.client.name}: {_tail(errors)}"
                    )
                time.sleep(0.005)
            time.sleep(warmup_s)
            delivered_before, sent_before = delivered(self.host), transmitted(self.client, ifname)
            started = time.monotonic()
            time.sleep(window_s)
            delivered_after, sent_after = delivered(self.host), transmitted(self.client, ifname)
            elapsed = time.monotonic() - started
            if process.poll() is not None:
                raise TrafficError(f"trafgen stopped before the end of the window: {_tail(errors)}")
        finally:
            _stop(process)
        return Sample(
            (delivered_after - delivered_before) / elapsed, (sent_after - sent_before) / elapsed
        )


def _stop(process: subprocess.Popen) -> None:
    """Stop the generator we started: its process group is the session it leads."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
    return " / ".join(line for line in lines if line)[-300:] or "no message"


class TrafficBench:
    """The four receivers, built on entry and removed (with whatever they hold) on exit."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.receivers: dict[str, Receiver] = {}

    def __enter__(self) -> TrafficBench:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bpflab-")))
            for name in FILTERS:
                topology = stack.enter_context(HostTopology(ipv6=False))
                receiver = Receiver(topology, name, directory)
                # Registered after the topology: it runs first on exit, while the namespace
                # still exists, and removes the state `apply` keeps outside the namespace.
                stack.callback(_quietly_clear, receiver)
                self.receivers[name] = receiver
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def load(
        self, count: int, clock: Callable[[], float], *, stateful: bool = False
    ) -> dict[str, dict]:
        return {
            name: self.receivers[name].load(count, clock, stateful=stateful) for name in LOADABLE
        }

    def load_texts(self, texts: RuleSetTexts, clock: Callable[[], float]) -> dict[str, dict]:
        """One rule set into every filter that loads one (Receiver.load_texts)."""
        return {name: self.receivers[name].load_texts(texts, clock) for name in LOADABLE}

    def throughput(
        self,
        count: int,
        position: Position | StatefulPosition,
        *,
        trials: int,
        warmup_s: float,
        window_s: float,
        progress: Progress,
    ) -> dict[str, dict]:
        """Every filter `trials` times, in an order rotated each trial so that none always
        follows the same one; medians and ratios to no filter."""
        frames = {name: self.receivers[name].frame(count, position) for name in FILTERS}
        return self.rates(
            frames,
            f"{count:>6,} rules, {position} rule",
            trials=trials,
            warmup_s=warmup_s,
            window_s=window_s,
            progress=progress,
            prime=position == "established",
        )

    def rates(
        self,
        frames: dict[str, bytes],
        label: str,
        *,
        trials: int,
        warmup_s: float,
        window_s: float,
        progress: Progress,
        prime: bool = False,
    ) -> dict[str, dict]:
        """Each filter's rate for its frame (`frames` by filter), as `throughput` measures it;
        `prime`: the host writes to the client before each window (the frames are replies)."""
        samples: dict[str, list[Sample]] = {name: [] for name in FILTERS}
        for trial in range(trials):
            order = FILTERS[trial % len(FILTERS) :] + FILTERS[: trial % len(FILTERS)]
            for name in order:
                if prime:
                    self.receivers[name].prime()
                sample = self.receivers[name].measure(
                    frames[name], warmup_s=warmup_s, window_s=window_s
                )
                samples[name].append(sample)
            progress(
                f"throughput {label}, trial {trial + 1}/{trials}: "
                + ", ".join(f"{n} {samples[n][-1].delivered_pps / 1e6:.3f}" for n in FILTERS)
                + " Mpps"
            )
        rates = {name: [sample.delivered_pps for sample in samples[name]] for name in FILTERS}
        results = {}
        for name in FILTERS:
            median = statistics.median(rates[name])
            reference = statistics.median(rates["none"])
            # The machine's speed drifts over tens of seconds (other work, the host under the
            # VM): a filter's rate over no filter's in the same round cancels most of that.
            paired = [
                rate / base for rate, base in zip(rates[name], rates["none"], strict=True) if base
            ]
            results[name] = {
                "pps": median,
                "ratio": statistics.median(paired) if paired else None,
                "ratio_of_medians": median / reference if reference else None,
                "best_pps": max(rates[name]),
                "trials": [round(rate) for rate in rates[name]],
                "offered_trials": [round(sample.offered_pps) for sample in samples[name]],
            }
        return results


def _quietly_clear(receiver: Receiver) -> None:
    try:
        receiver.clear()
    except Exception:  # the namespace goes away next anyway; this only tidies /run/bpflab
        pass


def process_overhead(namespace: Namespace, runs: int = 5) -> float:
    """Median seconds of `ip netns exec NS true`: included in the iptables and nft times."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        namespace.run(["true"])
        times.append(time.perf_counter() - started)
    return statistics.median(times)
