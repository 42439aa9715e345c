"""Run a rule set's generated chain programs on packets with BPF_PROG_TEST_RUN, no device needed.

This is what `bpflab run` and the differential tests use: one program per built-in chain, all
sharing one counters map, interface names mapped to stand-in ifindexes. Each run reports the
verdict, the rule (or policy) that decided and the counters that moved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from codegen.bpf.isa import TcAction
from codegen.bpf.testrun import SkBuff, prog_test_run
from codegen.conntrack import TrackerMaps, uses_conntrack
from codegen.jiffies import kernel_hz
from codegen.reject.limits import RateMaps
from codegen.rules.extensions.limit import seconds_to_jiffies
from codegen.rules.extensions.set import SetMatch, bind_sets, uses_sets
from codegen.rules.icmp_rate import DRAW, IcmpSysctls
from codegen.rules.model import Interface, Ruleset
from codegen.rules.names import PKT_TYPE_ALIASES, PKT_TYPES
from codegen.rules.packet import SocketOwner, XfrmState
from codegen.rules.routes import STANDIN_ROUTES, RouteTable
from codegen.rules.sets import HASH_NET_IFACE, SetTable, looked_up
from codegen.rules.tracking.timeouts import DEFAULT_TIMEOUTS, Timeouts
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import NOT_HANDLED, CounterLayout, Position
from codegen.tc.local import from_routes
from codegen.tc.log import logs
from codegen.tc.matches.addrtype import ADDRESS_TYPES, uses_addrtype
from codegen.tc.matches.hashlimit import HASHLIMIT_MAP, uses_hashlimit
from codegen.tc.matches.hashlimit import create_map as create_hashlimit_map
from codegen.tc.matches.limit import LIMIT_MAP, create_map, set_clock, uses_limit
from codegen.tc.matches.owner import (
    GROUPS_MAP,
    cb_owner,
    create_groups_map,
    groups_value,
    uses_groups,
    uses_owner,
)
from codegen.tc.matches.policy import SECPATH_MAP, cb_secpath, uses_policy
from codegen.tc.matches.policy import create_map as create_secpath_map
from codegen.tc.matches.recent import CLOCK_MAP as RECENT_CLOCK
from codegen.tc.matches.recent import create_maps as create_recent_maps
from codegen.tc.matches.recent import set_clock as set_recent_clock
from codegen.tc.matches.recent import uses_recent
from codegen.tc.replies import rejects

from .backends import Backend, Program, load_program
from .counters import CounterMap
from .deploy.routes import address_types_map
from .deploy.sets import set_maps
from .log_reader import LogEvent, LogMaps, LogRecord, record_event

FIRST_STANDIN_IFINDEX = 1000
DEFAULT_DEVICES = ("eth0", "eth1", "eth2")
RUN_TABLE_ENTRIES = 4096  # connections one test run's table holds
RUN_LOG_RING_SIZE = 64 * 1024  # bytes of the LOG records' ring: some 220 per run
CLOCK_ORIGIN = 1 << 40  # ns: a given time 0 is this on the tracker's clock (0 is "monotonic")
JIFFIES_ORIGIN = 1 << 32  # a given time 0 is this jiffy on the programs' clocks (0 is the real one)


@dataclass(frozen=True)
class Outcome:
    verdict: str  # "ACCEPT", "DROP", or "PASS" for a packet the programs do not handle
    deciding: Position
    counters: dict[Position, tuple[int, int]]  # what moved: (packets, bytes) added
    reply: bytes | None = None  # the frame a REJECT answered with (the program redirected)
    log: tuple[str, ...] = ()  # the lines its LOG rules wrote, in order (harness.log_reader)
    nflog: tuple[bytes, ...] = ()  # the packets its NFLOG rules passed on, in order
    mark: int = 0  # the skb mark the programs left (the run's own, or what -j MARK wrote)


def standin_interfaces(ruleset: Ruleset, extra: Iterable[str] = ()) -> dict[str, int]:
    """Stand-in ifindexes for every device the rules name (wildcards aside), the members of
    their hash:net,iface sets name, and any extra ones."""
    names = set(DEFAULT_DEVICES) | {name for name in extra if name}
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            for match in rule.matches:
                if isinstance(match, Interface) and not match.wildcard:
                    names.add(match.name)
                elif isinstance(match, SetMatch) and match.bound is not None:
                    names |= {
                        member.iface
                        for table in looked_up(match.bound)
                        for member in table.members
                        if table.kind == HASH_NET_IFACE and not member.wildcard
                    }
    return {name: FIRST_STANDIN_IFINDEX + i for i, name in enumerate(sorted(names))}


def frame_for(ip_packet: bytes) -> bytes:
    """An Ethernet frame around an IPv4 packet, addressed to the test-run device (lo)."""
    return bytes(6) + bytes.fromhex("020000000001") + b"\x08\x00" + ip_packet


class ChainRunner:
    """Chain programs for a rule set, loaded once, run on as many packets as wanted."""

    def __init__(
        self,
        ruleset: Ruleset,
        devices: Iterable[str] = (),
        *,
        backend: Backend = "bytecode",
        routes: RouteTable | None = None,
        log_ring_size: int = RUN_LOG_RING_SIZE,
        sets: SetTable | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ):
        """`routes`: what `-m addrtype` looks addresses up in (None: STANDIN_ROUTES, which
        the reference evaluator also takes when given none); its devices are known ones.
        `sets`: the ipsets `-m set` looks up (None: STANDIN_SETS); RuleError for a rule
        naming a set they do not hold. `timeouts`: the connection tracker's settings (the
        kernel's defaults, as the reference's)."""
        self.timeouts = timeouts
        # -m set's matches bound to their sets, each copied into a map of its own.
        ruleset = bind_sets(ruleset, sets)
        self.ruleset = ruleset
        self.backend = backend
        self.routes = STANDIN_ROUTES if routes is None else routes
        self.interfaces = standin_interfaces(ruleset, [*devices, *sorted(self.routes.devices)])
        self.layout = CounterLayout.of(ruleset)
        self.counters = CounterMap(self.layout)
        # One connection table for all chains run, so that a flow's two halves meet in it.
        self.tracker = TrackerMaps.create(RUN_TABLE_ENTRIES) if uses_conntrack(ruleset) else None
        self.address_types = (
            address_types_map(self.routes, self.interfaces) if uses_addrtype(ruleset) else None
        )
        # LOG rules' ring buffer and its count of events lost when full (codegen.tc.log).
        self.logging = LogMaps(log_ring_size) if logs(ruleset) else None
        # -m limit's buckets, full: the programs are loaded as a table is (codegen.tc.matches.
        # limit); the clock a run fixes counts in the kernel's HZ.
        self.limits = create_map(ruleset) if uses_limit(ruleset) else None
        # -m hashlimit's entries, none yet (codegen.tc.matches.hashlimit), on the same clock.
        self.hashlimits = create_hashlimit_map(ruleset) if uses_hashlimit(ruleset) else None
        self.set_maps = set_maps(ruleset, self.interfaces) if uses_sets(ruleset) else {}
        # -m recent's tables, empty, and their clock (codegen.tc.matches.recent).
        self.recent_maps = create_recent_maps(ruleset) if uses_recent(ruleset) else {}
        # REJECT's ICMP rate limits (codegen.reject.limits): the kernel's default sysctls, and
        # the global credits an error takes fixed at the reference's (IcmpRateLimiter.draw).
        self.icmp_limits = RateMaps.create() if rejects(ruleset) else None
        # The clock a run fixes for the tracker, the limits, -m recent and REJECT, in the
        # kernel's HZ.
        clocked = (
            self.tracker is not None
            or self.limits is not None
            or self.recent_maps
            or self.icmp_limits is not None
        )
        self.hz = kernel_hz() if clocked else None
        if self.icmp_limits is not None:
            assert self.hz is not None
            self.icmp_limits.configure(IcmpSysctls(), self.hz, draw=DRAW)
        self.owned = uses_owner(ruleset)  # -m owner: run() may give the packet's socket
        # --suppl-groups: where run() gives the socket's groups, and the ones it last wrote.
        self.groups = create_groups_map() if uses_groups(ruleset) else None
        self._groups_written: tuple[int, ...] | None = None
        # -m policy: where run() gives a test's security path (codegen.tc.matches.policy).
        self.secpath = create_secpath_map() if uses_policy(ruleset) else None
        self._programs: dict[str, Program] = {}

    def program(self, chain: str) -> Program:
        if chain not in self._programs:
            self._programs[chain] = load_program(
                self.ruleset,
                "chain",
                interfaces=self.interfaces,
                maps={
                    COUNTERS_MAP: self.counters,
                    **self.tracker_maps,
                    **self.route_maps,
                    **self.log_maps,
                    **({} if self.limits is None else {LIMIT_MAP: self.limits}),
                    **({} if self.hashlimits is None else {HASHLIMIT_MAP: self.hashlimits}),
                    **self.set_maps,
                    **self.recent_maps,
                    **({} if self.secpath is None else {SECPATH_MAP: self.secpath}),
                    **({} if self.groups is None else {GROUPS_MAP: self.groups}),
                    **({} if self.icmp_limits is None else self.icmp_limits.maps),
                },
                chain=chain,
                backend=self.backend,
                local=from_routes(self.routes),  # its broadcasts: REJECT answers none to them
                timeouts=self.timeouts,
            )
        return self._programs[chain]

    @property
    def route_maps(self) -> dict[str, object]:
        return {} if self.address_types is None else {ADDRESS_TYPES: self.address_types}

    @property
    def log_maps(self) -> dict[str, object]:
        return {} if self.logging is None else dict(self.logging.maps)

    @property
    def tracker_maps(self) -> dict[str, object]:
        return {} if self.tracker is None else dict(self.tracker.maps)

    def run(
        self,
        frame: bytes,
        chain: str,
        in_iface: str | None = None,
        out_iface: str | None = None,
        *,
        mark: int = 0,
        pkt_type: str = "host",
        time: float | None = None,
        owner: SocketOwner | None | Literal["dummy"] = "dummy",
        secpath: tuple[XfrmState, ...] | None | Literal["dummy"] = "dummy",
        bridge_ports: tuple[str, str | None] | None = None,
    ) -> Outcome:
        """Run `frame` through `chain`'s program. `time` (seconds, any origin, never going
        back) is the connection tracker's and -m limit's clock for this packet; None: the
        monotonic clock and the kernel's jiffies. `owner` is the socket -m owner sees (None:
        no socket); "dummy": the one test-run gives every packet, which no struct socket
        holds (xt_owner sees it as none), read by the program itself. `secpath` is the IPsec
        states that decapsulated the packet, for -m policy (None: none); "dummy": the skb's
        own, which a test run's never has. `bridge_ports`: the bridge ports -m physdev sees
        in INPUT and FORWARD (codegen.rules.reference.evaluate's; None: none), by names the
        programs were built with."""
        physin, physout = bridge_ports or (None, None)
        for name in (in_iface, out_iface, physin, physout):
            if name and name not in self.interfaces:
                raise ValueError(
                    f"device {name!r} was not known when the programs were built; pass it in "
                    "`devices`"
                )
        context = SkBuff(
            ingress_ifindex=self.interfaces.get(in_iface or "", 0),
            mark=mark,
        )
        context.cb[0] = self.interfaces.get(out_iface or "", 0)
        context.cb[2] = PKT_TYPES[PKT_TYPE_ALIASES.get(pkt_type, pkt_type)]
        if bridge_ports is not None and chain != "OUTPUT":  # cb[3], cb[4] are OUTPUT's owner's
            context.cb[3] = self.interfaces[bridge_ports[0]]
            context.cb[4] = self.interfaces.get(physout or "", 0)
        if owner != "dummy" and self.owned:  # only -m owner reads it
            cb_owner(context.cb, owner)
            if self.groups is not None and owner is not None and owner.file:
                self._give_groups(owner.groups)
        if secpath != "dummy" and self.secpath is not None:
            cb_secpath(context.cb, secpath, self.secpath)
        jiffies = None  # `time` on the kernel's jiffies, one clock for every map that keeps one
        if time is not None and self.hz is not None:
            jiffies = JIFFIES_ORIGIN + seconds_to_jiffies(time, self.hz)
        if self.tracker is not None:  # xt_conntrack reads a new entry's timeout on the jiffies
            nanoseconds = 0 if time is None else CLOCK_ORIGIN + round(time * 1e9)
            self.tracker.set_clock(nanoseconds, jiffies or 0)
        if self.limits is not None:
            set_clock(self.limits, jiffies)
        if self.recent_maps:
            set_recent_clock(self.recent_maps[RECENT_CLOCK], jiffies)
        if self.icmp_limits is not None:
            if jiffies is None:  # as the reference's lone packet: no errors sent before it
                self.icmp_limits.forget(clock=0)
            else:
                self.icmp_limits.set_clock(jiffies)
        before = self.counters.read()
        result = prog_test_run(self.program(chain).fd, frame, context=context)
        after = self.counters.read()
        moved = {
            position: (
                after[position][0] - before[position][0],
                after[position][1] - before[position][1],
            )
            for position in after
            if after[position] != before.get(position)
        }
        assert result.context is not None
        deciding = self.layout.positions[result.context.cb[1]]
        reply = None
        if deciding == NOT_HANDLED:
            verdict = "PASS"
        elif result.retval == TcAction.REDIRECT:  # a REJECT's answer, built in the packet
            verdict, reply = "DROP", result.data
        else:
            verdict = {TcAction.OK: "ACCEPT", TcAction.SHOT: "DROP"}[result.retval]
        events = self._log_events()
        lines = tuple(event.line for event in events if event.line is not None)
        nflog = tuple(event.nflog_packet for event in events if event.line is None)
        return Outcome(verdict, deciding, moved, reply, lines, nflog, result.context.mark)

    def _log_events(self) -> list[LogEvent]:
        """The events of the records the run wrote (the ring is emptied after each run)."""
        if self.logging is None:
            return []
        names = {index: name for name, index in self.interfaces.items()}
        return [
            record_event(LogRecord.decode(raw), self.ruleset, self.layout, names)
            for raw in self.logging.ring.records()
        ]

    def log_drops(self) -> int:
        """Events lost so far because the ring buffer was full."""
        return 0 if self.logging is None else self.logging.dropped()

    def close(self) -> None:
        for program in self._programs.values():
            program.close()
        self._programs.clear()
        self.counters.close()
        if self.logging is not None:
            self.logging.close()
            self.logging = None
        if self.tracker is not None:
            self.tracker.close()
        if self.address_types is not None:
            self.address_types.close()
        if self.limits is not None:
            self.limits.close()
        if self.hashlimits is not None:
            self.hashlimits.close()
        if self.icmp_limits is not None:
            self.icmp_limits.close()
            self.icmp_limits = None
        for held in self.set_maps.values():
            held.close()
        self.set_maps = {}
        for held in self.recent_maps.values():
            held.close()
        self.recent_maps = {}
        if self.secpath is not None:
            self.secpath.close()
            self.secpath = None
        if self.groups is not None:
            self.groups.close()
            self.groups = None

    def _give_groups(self, groups: tuple[int, ...]) -> None:
        """Write a test's supplementary groups in the groups map, unless it holds them."""
        assert self.groups is not None
        if groups != self._groups_written:
            self.groups.update(0, groups_value(groups))
            self._groups_written = groups

    def __enter__(self) -> ChainRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
