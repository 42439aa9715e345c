"""The reference evaluator: what the kernel's ipt_do_table does with one IPv4 packet.

It is the oracle generated programs are checked against, so it follows the kernel rather than
intuition: a rule's counter moves when all its matches match, jump and RETURN rules included;
jumps push a return position and gotos do not; RETURN (or the end of a user chain) with nothing
to return to applies the built-in chain's policy; the tcp, udp, icmp and multiport matches never
match a non-first fragment, and when the transport header they need is cut short they drop the
packet on the spot ("hotdrop"), as does the tcp match for a fragment at offset 1. What each
match extension answers, and what each target extension does (REJECT: DROP, and the answer
the kernel would send), is its module's (codegen.rules.extensions).

`evaluate_flow` runs a sequence of packets with a connection table (codegen.rules.tracking)
between them: each is classified before its chain, as nf_conntrack_in does, and a new
connection is confirmed only if the chain accepts its first packet.

Stateful matches (`-m limit`: a token bucket per match, xt_limit's) and targets (REJECT: its
ICMP errors' rate limits) keep their state between packets in a `MatchMemory`, one per table
load (netfilter refills every bucket at each load):
`evaluate_flow` keeps one along the flow, at each step's time. A single `evaluate` without
one is the first packet after a load: each limit match finds its bucket full, at time 0 (the
same match met twice in one traversal, through two jumps to its chain, takes from it twice).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from codegen.jiffies import kernel_hz
from codegen.rules.extensions import extension_of, target_extension_of
from codegen.rules.extensions.base import Memory
from codegen.rules.model import (
    IP_PART,
    Accept,
    Address,
    Drop,
    ExtensionTarget,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    Ruleset,
)
from codegen.rules.names import BUILTIN_CHAINS
from codegen.rules.packet import (
    Connection,
    HotDrop,
    Packet,
    SocketOwner,
    XfrmState,
    read_packet,
)
from codegen.rules.routes import RouteTable
from codegen.rules.sets import SetTable
from codegen.rules.tracking import ConnectionTable

Position = tuple[str, int | Literal["policy"]]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The outcome for one packet.

    `deciding` is the rule that gave the verdict as (chain, 1-based index), or
    (built-in chain, "policy"); for a hotdrop it is the rule whose match dropped the packet.
    `counters` maps each rule (and policy) whose counter moved to (packets, bytes) added.
    `reply` is what the kernel sends back, as the deciding target names it (`-j REJECT`:
    "icmp-port-unreachable", "tcp-reset", ...), None when it sends nothing. `logged`: the
    rules whose target logged the packet, in order (log_line.py writes their lines)."""

    verdict: Literal["ACCEPT", "DROP"]
    deciding: Position
    counters: dict[Position, tuple[int, int]] = field(default_factory=dict)
    hotdrop: bool = False
    reply: str | None = None
    # The rules whose target logged the packet (`-j LOG`), in the order they fired.
    logged: tuple[Position, ...] = ()
    # The packet's mark when the verdict was given: the one it came with, as `-j MARK` rules
    # on its way changed it (what the skb carries on to the kernel's later hooks).
    mark: int = 0
    # The mark each rule of `logged` saw when it fired (a LOG line's MARK=), in the same order.
    logged_marks: tuple[int, ...] = ()
    # The mark of the packet's connection when the verdict was given, as `-j CONNMARK` rules on
    # its way left it (None: the packet has no connection).
    connection_mark: int | None = None


class MatchMemory:
    """What stateful matches keep between packets since a table load: one Memory per match,
    keyed by its rule's position and its place among the rule's matches, made at its first
    packet. `hz` is the kernel's (None: the running kernel's, found when first needed);
    `loaded_at` the load's time in seconds (None: each match's first packet, as the programs
    stamp their buckets: the same credit unless that packet comes 2^32 / CPJ jiffies or more
    after the load, 1.55 days at HZ 250, where xt_limit's u32 credit wraps)."""

    def __init__(self, hz: int | None = None, loaded_at: float | None = None) -> None:
        self.hz = hz
        self.loaded_at = loaded_at
        self.memories: dict[tuple[str, int, int], Memory] = {}
        self.shared: dict[str, object] = {}  # what every match shares (hashlimit's tables)
        self.ruleset: Ruleset | None = None  # the rule set loaded, set at its first packet

    def memory(self, key: tuple[str, int, int], time: float) -> Memory:
        found = self.memories.get(key)
        if found is None:
            if self.hz is None:
                self.hz = kernel_hz()
            found = self.memories[key] = Memory(
                time, self.hz, self.loaded_at, shared=self.shared, ruleset=self.ruleset
            )
        found.time = time
        return found

    def recall(self, position: Position, time: float) -> Callable[[int], Memory]:
        """The memory of a match of the rule at `position` by its place among the rule's
        matches, for a packet at `time`."""
        chain, index = position
        assert isinstance(index, int)
        return lambda number: self.memory((chain, index, number), time)


def _match(match: Match, packet: Packet, memory: Callable[[], Memory] | None = None) -> bool:
    if isinstance(match, Address):
        return match.matches(packet.saddr if match.direction == "src" else packet.daddr)
    if isinstance(match, Interface):
        return match.matches(packet.in_device if match.direction == "in" else packet.out_device)
    if isinstance(match, Protocol):
        if match.number == 0:
            return True
        return (packet.protocol == match.number) != match.negated
    if isinstance(match, Fragment):
        return (packet.fragment_offset != 0) != match.negated
    extension = extension_of(match)
    if extension.stateful and memory is not None:
        return extension.matches_with(match, packet, memory())
    return extension.matches(match, packet)


def _rule_matches(
    rule: Rule, packet: Packet, memory: Callable[[int], Memory] | None = None
) -> bool:
    # The kernel checks the IP header part (ip_packet_match) before the extension matches,
    # whatever order the model lists them in; the order matters for hotdrops. A stateful
    # match is asked only when the matches before it held, as the kernel asks it.
    ip_part = [m for m in rule.matches if isinstance(m, IP_PART)]
    if not all(_match(m, packet) for m in ip_part):
        return False
    for number, match in enumerate(rule.matches):
        if isinstance(match, IP_PART):
            continue
        recall = None if memory is None else (lambda number=number: memory(number))
        if not _match(match, packet, recall):
            return False
    return True


def evaluate(
    ruleset: Ruleset,
    packet: bytes,
    chain: str,
    in_iface: str | None,
    out_iface: str | None,
    *,
    mark: int = 0,
    pkt_type: str = "host",
    connection: Connection | None = None,
    routes: RouteTable | None = None,
    memory: MatchMemory | None = None,
    time: float = 0.0,
    owner: SocketOwner | None = None,
    sets: SetTable | None = None,
    secpath: tuple[XfrmState, ...] | None = None,
    bridge_ports: tuple[str, str | None] | None = None,
) -> Evaluation:
    """Run `packet` (IPv4, from the IP header on) through built-in `chain` as ipt_do_table
    would, with `connection` the conntrack entry it carries (None: none, which connection
    tracking matches see as INVALID) and `routes` the namespace's routes `-m addrtype` looks
    addresses up in (None: codegen.rules.routes.STANDIN_ROUTES). The rule set is not changed;
    the counters that moved are in the result. `memory` is what stateful matches kept since
    the table's load, updated for a packet arriving at `time` (seconds); None: a fresh one,
    the first packet after a load. `owner` is the socket the packet carries (-m owner; None:
    none). `sets` are the ipsets -m set looks up (None: those bound to the matches, else
    codegen.rules.sets.STANDIN_SETS). `secpath` is the IPsec states that decapsulated the
    packet (-m policy --dir in; None: none). `bridge_ports` is the bridge port the packet came
    in by and the one it leaves by (None: not bridged), as br_netfilter records them for
    -m physdev; None: it crossed no bridge that hands its traffic to iptables."""
    if chain not in BUILTIN_CHAINS or chain not in ruleset.chains:
        raise ValueError(f"chain must be one of {', '.join(BUILTIN_CHAINS)}, not {chain!r}")
    parsed = read_packet(
        packet,
        in_iface,
        out_iface,
        mark,
        pkt_type,
        connection=connection,
        routes=routes,
        owner=owner,
        sets=sets,
        secpath=secpath,
        bridge_ports=bridge_ports,
    )
    counters: dict[Position, tuple[int, int]] = {}
    memory = MatchMemory() if memory is None else memory
    if memory.ruleset is None:
        memory.ruleset = ruleset

    def count(position: Position) -> None:
        packets, size = counters.get(position, (0, 0))
        counters[position] = (packets + 1, size + parsed.total_length)

    def ended(verdict: Literal["ACCEPT", "DROP"], position: Position, **more: Any) -> Evaluation:
        return Evaluation(
            verdict,
            position,
            counters,
            logged=tuple(logged),
            mark=parsed.mark,
            logged_marks=tuple(logged_marks),
            connection_mark=_connection_mark(parsed),
            **more,
        )

    def policy() -> Evaluation:
        position: Position = (chain, "policy")
        count(position)
        verdict = ruleset.chains[chain].policy
        assert verdict in ("ACCEPT", "DROP")
        return ended(verdict, position)

    logged: list[Position] = []
    logged_marks: list[int] = []
    stack: list[tuple[str, int]] = []
    current, index = chain, 0
    # Every step moves forward in a chain or enters a chain; loops are refused by validation,
    # and this bound keeps a malformed model from hanging the caller.
    budget = 1 + sum(len(c.rules) + 1 for c in ruleset.chains.values()) * (len(ruleset.chains) + 1)
    for _ in range(budget):
        rules = ruleset.chains[current].rules
        if index >= len(rules):
            if current == chain and not stack:
                return policy()
            # The end of a user chain is an unconditional RETURN.
            if not stack:
                return policy()
            current, index = stack.pop()
            index += 1
            continue
        rule = rules[index]
        position: Position = (current, index + 1)
        try:
            matched = _rule_matches(rule, parsed, memory.recall(position, time))
        except HotDrop:
            return ended("DROP", position, hotdrop=True)
        if not matched:
            index += 1
            continue
        count(position)
        target = rule.target
        if target is None:
            index += 1
        elif isinstance(target, Accept):
            return ended("ACCEPT", position)
        elif isinstance(target, Drop):
            return ended("DROP", position)
        elif isinstance(target, Return):
            if not stack:
                return policy()
            current, index = stack.pop()
            index += 1
        elif isinstance(target, Jump):
            stack.append((current, index))
            current, index = target.chain, 0
        elif isinstance(target, Goto):
            current, index = target.chain, 0
        elif isinstance(target, ExtensionTarget):
            family = target_extension_of(target)
            if family.stateful:  # its memory: the rule's, after its matches'
                action = family.act_with(target, parsed, memory.memory((*position, -1), time))
            else:
                action = family.act(target, parsed)
            if action.logged:
                logged.append(position)
                logged_marks.append(parsed.mark)
            if action.mark is not None:  # later rules, and the kernel after us, see it
                parsed = replace(parsed, mark=action.mark)
            if action.ctmark is not None and parsed.connection is not None:
                parsed = replace(parsed, connection=replace(parsed.connection, mark=action.ctmark))
            if action.verdict is None:
                index += 1  # XT_CONTINUE
            else:
                return ended(action.verdict, position, reply=action.reply)
        else:
            raise TypeError(f"cannot evaluate target {target!r}")
    raise RuntimeError("evaluation did not end: the rule set has a loop (run validate first)")


def _connection_mark(packet: Packet) -> int | None:
    connection = packet.tracked_connection
    return None if connection is None else connection.mark


@dataclass(frozen=True, slots=True)
class FlowStep:
    """One packet of a flow: what `evaluate` takes, and when it arrives (seconds on the
    connection table's clock, never decreasing along a flow)."""

    packet: bytes
    chain: str
    in_iface: str | None = None
    out_iface: str | None = None
    time: float = 0.0
    mark: int = 0
    pkt_type: str = "host"


@dataclass(frozen=True, slots=True)
class FlowEvaluation:
    """The outcome for one packet of a flow, and the connection it carried (None: INVALID)."""

    evaluation: Evaluation
    connection: Connection | None


def evaluate_flow(
    ruleset: Ruleset,
    steps: Iterable[FlowStep],
    table: ConnectionTable | None = None,
    memory: MatchMemory | None = None,
) -> list[FlowEvaluation]:
    """Run `steps` in order through their chains, tracking connections in `table` (a fresh
    one if None; pass one to keep or inspect its entries) and keeping what stateful matches
    remember in `memory` (a fresh one, a table loaded just now, if None; each step at its
    time). Each packet is classified first
    (nf_conntrack_in: PREROUTING for INPUT and FORWARD, LOCAL_OUT for OUTPUT) and evaluated
    with the connection it carries; a new entry is confirmed only when the verdict is ACCEPT
    (nf_confirm at the end of INPUT or POSTROUTING). Raises TrackingError for a packet the
    tracker cannot follow (a fragment, a protocol such as SCTP with a tracker of its own)."""
    table = ConnectionTable() if table is None else table
    memory = MatchMemory() if memory is None else memory
    results: list[FlowEvaluation] = []
    last = float("-inf")
    for step in steps:
        if step.time < last:
            raise ValueError(f"flow time went back from {last} to {step.time}")
        last = step.time
        classification = table.classify(step.packet, step.time)
        evaluation = evaluate(
            ruleset,
            step.packet,
            step.chain,
            step.in_iface,
            step.out_iface,
            mark=step.mark,
            pkt_type=step.pkt_type,
            connection=classification.connection,
            memory=memory,
            time=step.time,
        )
        if classification.entry is not None and evaluation.connection_mark is not None:
            # CONNMARK wrote the entry's mark: at once for a known connection, for a new one
            # only if confirm keeps its entry.
            classification.entry.mark = evaluation.connection_mark
        if evaluation.verdict == "ACCEPT":
            table.confirm(classification)
        results.append(FlowEvaluation(evaluation, classification.connection))
    return results
