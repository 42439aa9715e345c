"""Run a packet script: build its topology, apply its rules with our programs, send its packets,
and compare what happened with what it expects (or with what netfilter does in a twin)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import rdpcap

from codegen.rules import write
from codegen.rules.extensions import target_extension_of
from codegen.rules.model import Accept, Drop, ExtensionTarget
from codegen.tc.layout import NOT_HANDLED, Position
from netns import CommandError

from ..backends import Backend
from ..deploy import lifecycle
from ..deploy.sets import load_sets
from .commands import EMPTY_TABLE, run_under_exec, same_table
from .exchange import Outcome, run_exchange
from .frames import PROBE_FRAME_BYTES
from .packets import parse_packet
from .scripts import PacketEntry, Script, ScriptError, unobservable
from .traffic import Lab, field_diff


class ReplayError(ScriptError):
    """The script cannot be run as written: a packet the lab cannot watch, rules netfilter
    refuses; `str()` is `FILE:LINE: error: MESSAGE`, the line of the packets entry."""

    def __init__(self, entry: PacketEntry, message: str):
        super().__init__(entry.path, entry.line, f"packets entry {entry.number}: {message}")


@dataclass
class PacketResult:
    entry: PacketEntry
    summary: str
    expected: str  # "pass" or "drop"
    arrived: int
    sent: int
    deciding: str
    problem: str = ""  # empty when all is as expected

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def got(self) -> str:
        if self.arrived == self.sent:
            return "pass"
        return "drop" if self.arrived == 0 else f"{self.arrived}/{self.sent} passed"


@dataclass
class ExchangeResult:
    """A real connection's row: its outcome ("connects", "refused", "times out")."""

    entry: PacketEntry
    summary: str
    expected: str
    got: str
    deciding: str
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass
class CounterResult:
    key: str
    expected: tuple[int | None, int | None]
    got: tuple[int, int]

    @property
    def ok(self) -> bool:
        pairs = zip(self.expected, self.got, strict=True)
        return all(want is None or want == have for want, have in pairs)


@dataclass
class Report:
    script: Script
    backend: str
    packets: list[PacketResult | ExchangeResult] = field(default_factory=list)
    counters: list[CounterResult] = field(default_factory=list)
    artefacts: str = ""
    table: str | None = None  # how the commands' table under bpflab exec is not the kernel's

    @property
    def ok(self) -> bool:
        results = (*self.packets, *self.counters)
        return self.table is None and all(result.ok for result in results)

    def render(self) -> str:
        title = self.script.description or self.script.path.name
        lines = [
            f"{self.script.path}: {title} ({self.script.topology} topology, "
            f"{self.backend} backend{', fast path' if self.script.fastpath else ''})"
        ]
        if self.table is not None:
            lines.append(f"MISMATCH: the commands' table: {self.table}")
        header = f"{'#':>3}  {'packet':44} {'expected':9} {'got':12} {'decided by':16} result"
        lines += [header, "-" * len(header)]
        for result in self.packets:
            mark = "ok" if result.ok else "MISMATCH"
            lines.append(
                f"{result.entry.number:>3}  {result.summary[:44]:44} {result.expected:9} "
                f"{result.got:12} {result.deciding:16} {mark}"
            )
            if result.problem:
                lines += ["       " + line for line in result.problem.splitlines()]
        if self.counters:
            lines.append("counters:")
            for counter in self.counters:
                want = "/".join("*" if v is None else str(v) for v in counter.expected)
                have = "/".join(str(v) for v in counter.got)
                mark = "ok" if counter.ok else "MISMATCH"
                lines.append(f"  {counter.key:20} expected {want:12} got {have:12} {mark}")
        if self.artefacts:
            lines.append(f"captures of every lab interface: {self.artefacts}")
        verdict = "all as expected" if self.ok else "MISMATCHES"
        lines.append(
            f"{len(self.packets)} packet entries, {len(self.counters)} counters: {verdict}"
        )
        return "\n".join(lines)


def _packets(lab: Lab, entry: PacketEntry) -> list[Packet]:
    if entry.spec is not None:
        base = [parse_packet(entry.spec)]
    else:
        assert entry.pcap is not None
        # Only IPv4 is replayed: the rules are IPv4 rules; ARP and IPv6 frames are left out.
        base = [packet[IP] for packet in rdpcap(str(entry.pcap)) if IP in packet]
        if not base:
            raise ReplayError(entry, f"{entry.pcap} holds no IPv4 packets")
    frames = []
    rewrite = entry.pcap is not None and not entry.keep_addresses  # a spec's fields are kept
    for packet in base:
        packet = packet.copy()
        if rewrite:
            # Addresses come from the topology; checksums and lengths are computed anew.
            for name in ("src", "dst", "chksum", "len"):
                packet[IP].fields.pop(name, None)
            transport = packet[IP].payload
            if hasattr(transport, "chksum"):
                transport.fields.pop("chksum", None)
        if Ether in packet and rewrite:
            packet[Ether].fields.pop("src", None)
            packet[Ether].fields.pop("dst", None)
        frame = lab.frame(
            entry.source, entry.destination, packet, keep_addresses=entry.keep_addresses
        )
        _check_observable(frame, entry)
        frames.append(frame)
    return frames


def _check_observable(frame: Packet, entry: PacketEntry) -> None:
    problem = unobservable(frame, entry.destination)  # a spec was checked when loaded; a pcap now
    if problem:
        raise ReplayError(entry, problem)


def _decides(target: object) -> bool:
    """Whether a rule with `target` gives the verdict when it matches (ACCEPT, DROP, REJECT)."""
    if isinstance(target, ExtensionTarget):
        return target_extension_of(target).terminal
    return isinstance(target, Accept | Drop)


def _without_probes(
    moved: dict[Position, tuple[int, int]], probes: int
) -> dict[Position, tuple[int, int]]:
    """`moved` less the lab's probe frames, which the programs count as not handled."""
    packets, octets = moved.pop(NOT_HANDLED, (0, 0))
    if packets > probes:
        moved[NOT_HANDLED] = (packets - probes, octets - probes * PROBE_FRAME_BYTES)
    return moved


def _deciding(script: Script, moved: dict[Position, tuple[int, int]]) -> str:
    """The rule (or policy) that gave the verdict: the one terminal position that moved."""
    for (chain, index), _ in sorted(moved.items(), key=lambda item: str(item[0])):
        if index == "policy":
            return f"{chain}:policy"
        if not chain:
            continue
        if _decides(script.ruleset.chains[chain].rules[index - 1].target):
            return f"{chain}:{index}"
    return "not handled" if NOT_HANDLED in moved else "-"


def replay(script: Script, *, backend: Backend = "bytecode") -> Report:
    report = Report(script, backend)
    with Lab(script.topology) as lab:
        namespace = lab.holder_namespace.name
        if script.sets_text:  # the script's ipsets, which apply reads back from the namespace
            load_sets(lab.holder_namespace, script.sets_text)
        if script.commands:  # the commands, through bpflab exec (harness.lab.commands)
            report.table = _commands_under_exec(script, namespace, backend)
        else:
            lifecycle.apply(
                script.rules_text,
                script.rules_name,
                namespace,
                fastpath=script.fastpath,
                backend=backend,
            )
        twins = ExitStack()  # the netfilter twin, built for the first "netfilter" entry
        twin: Lab | None = None
        try:
            for entry in script.packets:
                if entry.exchange is not None:
                    expected = entry.expect
                    if expected == "netfilter":
                        if twin is None:
                            twin = twins.enter_context(_twin(script, entry))
                        expected = _run(twin, entry).outcome
                    report.packets.append(_exchange(lab, script, entry, expected, namespace))
                    continue
                for frame in _packets(lab, entry):
                    expected = entry.expect
                    if expected == "netfilter":
                        if twin is None:
                            twin = twins.enter_context(_twin(script, entry))
                        expected = _netfilter_verdict(twin, frame, entry)
                    report.packets.append(_send(lab, script, entry, frame, expected, namespace))
            _, counters = lifecycle.current(namespace)
            for expectation in script.counters:
                got = counters.get((expectation.chain, expectation.index), (0, 0))
                report.counters.append(
                    CounterResult(
                        f"{expectation.chain}:{expectation.index}",
                        (expectation.packets, expectation.bytes),
                        got,
                    )
                )
            if not report.ok:
                report.artefacts = str(lab.write_artefacts(script.path.stem))
        finally:
            twins.close()
            lifecycle.flush(namespace)
    return report


def _commands_under_exec(script: Script, namespace: str, backend: Backend) -> str | None:
    """Run the script's commands under bpflab exec in the rule holder's namespace, from an
    empty table applied first (with the script's fast path, which exec keeps); how what they
    leave differs from the kernel's table, or None. Whatever they leave is what the packets
    meet."""
    lifecycle.apply(EMPTY_TABLE, "empty", namespace, fastpath=script.fastpath, backend=backend)
    failed = run_under_exec(namespace, script.commands, backend)
    if failed is not None:
        return failed
    state = lifecycle.read_state(namespace)
    assert state is not None, "an applied table has a state"
    return same_table(state["rules"], script.rules_text)


def _run(lab: Lab, entry: PacketEntry) -> Outcome:
    assert entry.exchange is not None
    return run_exchange(
        lab, entry.source, entry.destination, entry.exchange, entry.port, entry.listen
    )


def _exchange(
    lab: Lab, script: Script, entry: PacketEntry, expected: str, namespace: str
) -> ExchangeResult:
    """One real connection in `lab` (our programs), compared with `expected`."""
    before = lifecycle.current(namespace)[1]
    outcome = _run(lab, entry)
    moved = _moved(before, lifecycle.current(namespace)[1])
    what = f"{entry.exchange}:{entry.port}" if entry.port is not None else str(entry.exchange)
    if not entry.listen:
        what += " (no listener)"
    summary = f"{entry.source}->{entry.destination} {what}"
    if entry.description:
        summary += f" {entry.description}"
    result = ExchangeResult(
        entry, summary, expected, outcome.outcome, _rules_that_moved(script, moved)
    )
    if outcome.outcome != expected:
        result.problem = f"expected {expected}, got {outcome.outcome}: {outcome.detail}"
    return result


def _moved(before: dict, after: dict) -> dict[Position, tuple[int, int]]:
    return {
        position: (
            after[position][0] - before.get(position, (0, 0))[0],
            after[position][1] - before.get(position, (0, 0))[1],
        )
        for position in after
        if after[position] != before.get(position)
    }


def _rules_that_moved(script: Script, moved: dict[Position, tuple[int, int]]) -> str:
    """The terminal rules and policies an exchange's packets went to: `INPUT:1,3` or `-`."""
    by_chain: dict[str, list[str]] = {}

    def order(position: Position) -> tuple[str, int]:
        return position[0], 1 << 30 if position[1] == "policy" else int(position[1])

    for chain, index in sorted(moved, key=order):
        if not chain:
            continue
        if index != "policy":
            if not _decides(script.ruleset.chains[chain].rules[index - 1].target):
                continue
        by_chain.setdefault(chain, []).append(str(index))
    return " ".join(f"{chain}:{','.join(found)}" for chain, found in by_chain.items()) or "-"


def _send(
    lab: Lab, script: Script, entry: PacketEntry, frame: Packet, expected: str, namespace: str
) -> PacketResult:
    before = lifecycle.current(namespace)[1]
    delivery = lab.deliver(entry.source, entry.destination, frame, entry.count)
    arrived, seen = delivery.arrived, delivery.seen
    moved = _without_probes(_moved(before, lifecycle.current(namespace)[1]), delivery.probes)
    summary = entry.description or frame[IP].payload.summary() or frame.summary()
    result = PacketResult(
        entry,
        f"{entry.source}->{entry.destination} {summary}",
        expected,
        len(arrived),
        entry.count,
        _deciding(script, moved),
    )
    want = entry.count if expected == "pass" else 0
    if len(arrived) != want:
        closest = arrived[0] if arrived else next((p for p in seen if IP in p), None)
        reference = frame[IP] if closest is not None and Ether not in closest else frame
        result.problem = (
            f"{entry.count} sent, {len(arrived)} arrived, expected {want}\n"
            + field_diff(reference, closest)
        )
    elif arrived and entry.chain == "FORWARD":
        result.problem = _forwarding_problem(lab, entry, frame, arrived[0])
    return result


def _forwarding_problem(lab: Lab, entry: PacketEntry, sent: Packet, got: Packet) -> str:
    """A routed frame must arrive with its TTL decremented and its MACs rewritten; a bridged
    one as it was sent."""
    taken, source, destination = lab.forwarding(entry.source, entry.destination)
    problems = []
    if got[IP].ttl != sent[IP].ttl - taken:
        problems.append(f"TTL {got[IP].ttl}, expected {sent[IP].ttl - taken}")
    if got[Ether].src != source or got[Ether].dst != destination:
        problems.append(
            f"MACs {got[Ether].src} -> {got[Ether].dst}, expected {source} -> {destination}"
        )
    if IP(bytes(got[IP])).chksum != got[IP].chksum:
        problems.append("IP header checksum is wrong")
    return "forwarded frame: " + "; ".join(problems) if problems else ""


@contextmanager
def _twin(script: Script, entry: PacketEntry) -> Iterator[Lab]:
    """A second lab of the script's topology whose rule holder filters with iptables-legacy:
    the same nodes, addresses, MACs and interface names, so the same frames go through it."""
    with Lab(script.topology) as twin:
        try:
            if script.sets_text:
                load_sets(twin.holder_namespace, script.sets_text)
            twin.load_filter_table(write(script.ruleset))
        except CommandError as error:
            raise ReplayError(
                entry,
                "iptables-legacy-restore refused the rules for the netfilter twin: "
                f"{error.stderr.strip() or error}",
            ) from None
        yield twin


def _netfilter_verdict(twin: Lab, frame: Packet, entry: PacketEntry) -> str:
    """What netfilter does with `entry`'s copies of `frame`: sent the same way in the twin,
    "pass" when every copy arrives, "drop" when none does."""
    arrived = len(twin.deliver(entry.source, entry.destination, frame, entry.count).arrived)
    if arrived not in (0, entry.count):
        raise ReplayError(
            entry,
            f"netfilter passed {arrived} of {entry.count} copies of the same packet, so it "
            "gives no single verdict",
        )
    return "pass" if arrived else "drop"
