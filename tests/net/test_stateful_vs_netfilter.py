"""Stateful rule sets on real traffic: our programs against netfilter's conntrack, flow by flow.

One router lab runs our programs, its twin the same filter table in iptables-legacy with the
kernel's conntrack (its default nf_conntrack_tcp_be_liberal=0, as our tracker's). Each
example draws a rule set of conntrack and state matches (states, directions, statuses, the
connection's protocol, mixed with ports and protocols) and a short flow: several packets of one
connection, both ways, between two nodes of the lab (client and server through FORWARD, or either
of them and the router through INPUT and OUTPUT), TCP with flags and sequence numbers near the
connection's own (and now and then far from them), UDP, or ICMP echoes and errors quoting the
flow. Every packet must meet the same fate in both labs and move the same counters. Some rules
carry `-m limit` too (1/hour or 1/min, bursts of 1 to 3: no timing within a flow refills them),
whose buckets both labs keep along the flow and refill at each load, and `-m hashlimit` (one
table per rule set, 1/hour or 1/min, bursts of 1 to 3, keyed by nothing, the source, or the
source and the ports; upto or above by rule; now and then rate matching, in windows of the
rate's unit), a bucket per key of the flow's two directions.
Some rules mark: `-j CONNMARK` (every mode, masks and shifts) and `-j MARK`, read back by
`-m connmark` and `-m mark` matches along the flow (a connection's mark lives in its entry).

Both tables start empty: our rule set is flushed after each example (its table goes with its
pins), the twin's filter table is emptied before each load (netfilter would keep a hashlimit
table of a name the next table has too) and its conntrack is flushed with `conntrack -F`. The
twin's counters are read without zeroing them (`iptables-legacy -Z` replaces the whole table,
which refills every limit bucket, as any table load does) and compared as what moved since the
last reading.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from codegen.rules import parse, write
from codegen.rules.extensions.connmark import Connmark
from codegen.rules.extensions.connmark_target import ConnmarkTarget
from codegen.rules.extensions.conntrack import Conntrack
from codegen.rules.extensions.ctinfo import STATUS_NAMES, AnyOf
from codegen.rules.extensions.hashlimit import parse_rate as hashlimit_rate
from codegen.rules.extensions.hashlimit_rate import stored
from codegen.rules.extensions.hashlimit_table import HASH_DPT, HASH_SIP, HASH_SPT, Hashlimit
from codegen.rules.extensions.limit import Limit, parse_rate
from codegen.rules.extensions.mark import Mark
from codegen.rules.extensions.mark_target import MarkTarget
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.state import State
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import Accept, Chain, Drop, Protocol, Rule, Ruleset, Target
from codegen.rules.names import BUILTIN_CHAINS
from harness.deploy import lifecycle
from harness.lab.observation import moved_counters
from harness.lab.traffic import Lab
from tests.net.test_attached_vs_netfilter import (
    BACKENDS,
    TWIN_SETTINGS,
    _fate,
    _our_counters,
)

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

# (initiator, responder): the chains their packets take in the router.
PAIRS = (("client", "server"), ("server", "client"), ("client", "router"), ("router", "server"))
STATE_BITS = {"INVALID": 1, "ESTABLISHED": 2, "RELATED": 4, "NEW": 8}
TCP_FLAGS = ("S", "S", "SA", "A", "A", "PA", "FA", "R", "RA", "F", "SF", "", "SAF")
PORTS = {"initiator": 40000, "responder": 80}


@dataclass(frozen=True)
class Step:
    forward: bool  # from the initiator (the connection's original direction) or back
    packet: Packet  # above IP


@st.composite
def conntrack_matches(draw: st.DrawFn, protocol: int) -> Conntrack | State:
    states = draw(st.integers(1, 15))
    negated = draw(st.booleans()) and draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        return State(states, negated)
    options: dict = {"state": AnyOf(states, negated)}
    if draw(st.booleans()):
        options["direction"] = draw(st.sampled_from(("ORIGINAL", "REPLY")))
    if draw(st.integers(0, 3)) == 0:
        bits = draw(st.sampled_from([bit for _, bit in STATUS_NAMES if bit]))
        options["status"] = AnyOf(bits, draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        options["protocol"] = Protocol(protocol, negated=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0 and protocol != 1:
        port = PORTS[draw(st.sampled_from(("initiator", "responder")))]
        options["origdst_port"] = PortRange(port, port, draw(st.booleans()))
    if len(options) > 1 and draw(st.integers(0, 5)) == 0:
        options["state"] = None  # no --ctstate: an entry-less packet never matches
    return Conntrack(**options)


@st.composite
def hashlimits(draw: st.DrawFn) -> Hashlimit:
    """The rule set's one hashlimit table: rates no timing within a flow refills."""
    rate = hashlimit_rate(draw(st.sampled_from(("1/hour", "1/min"))))
    assert isinstance(rate, tuple)
    avg, unit = rate
    mode = draw(st.sampled_from((0, HASH_SIP, HASH_SIP | HASH_SPT | HASH_DPT, HASH_DPT)))
    burst = draw(st.integers(1, 3))
    if draw(st.booleans()):  # rate matching: windows of the unit's length, as iptables sets
        avg, interval = stored(avg, unit, 0, False)
        return Hashlimit(
            "drawn", avg, burst, mode=mode, expire=unit * 1000, rate_match=True, interval=interval
        )
    return Hashlimit("drawn", avg, burst, mode=mode, expire=unit * 1000)


_CTMARKS = st.sampled_from((0, 1, 2, 3, 0x10))
_CTMASKS = st.sampled_from((0xFFFFFFFF, 0xFF, 3, 1, 0))


@st.composite
def connmarks(draw: st.DrawFn) -> Connmark:
    return Connmark(draw(_CTMARKS), draw(_CTMASKS), draw(st.booleans()) and draw(st.booleans()))


@st.composite
def marks(draw: st.DrawFn) -> Mark:
    """The packet's own mark, which --restore-mark and MARK write."""
    return Mark(draw(_CTMARKS), draw(_CTMASKS), draw(st.booleans()) and draw(st.booleans()))


@st.composite
def stateful_targets(draw: st.DrawFn) -> Target:
    """Mostly verdicts; now and then CONNMARK (each mode, masks, shifts) or MARK."""
    kind = draw(st.integers(0, 9))
    if kind < 6:
        return Accept() if kind % 2 else Drop()
    if kind == 6:
        return MarkTarget(draw(_CTMARKS), draw(_CTMASKS))
    mode = draw(st.sampled_from(("set", "set", "save", "restore")))
    shift = draw(st.sampled_from((0, 0, 0, 1, 4)))
    masks = draw(_CTMASKS), draw(_CTMASKS)
    return ConnmarkTarget(mode, draw(_CTMARKS), *masks, draw(st.booleans()), shift)


@st.composite
def stateful_rulesets(draw: st.DrawFn, protocol: int) -> Ruleset:
    table = draw(hashlimits())
    chains = {}
    for name in BUILTIN_CHAINS:
        rules = []
        for _ in range(draw(st.integers(0, 4))):
            matches: list = []
            if draw(st.integers(0, 3)) > 0:
                matches.append(draw(conntrack_matches(protocol)))
            if draw(st.integers(0, 3)) == 0 and protocol in (6, 17):
                matches.insert(0, Protocol(protocol))
                port = PortRange(PORTS["responder"], PORTS["responder"], draw(st.booleans()))
                matches.append(TcpMatch(dport=port) if protocol == 6 else UdpMatch(dport=port))
            if draw(st.integers(0, 3)) == 0:
                rate = parse_rate(draw(st.sampled_from(("1/hour", "1/min"))))
                assert isinstance(rate, int)
                limit = Limit(rate, draw(st.integers(1, 3)))
                matches.insert(draw(st.integers(0, len(matches))), limit)
            if draw(st.integers(0, 3)) == 0:
                hashlimit = replace(table, above=draw(st.booleans()))
                matches.insert(draw(st.integers(0, len(matches))), hashlimit)
            if draw(st.integers(0, 3)) == 0:
                mark = draw(connmarks()) if draw(st.integers(0, 2)) else draw(marks())
                matches.insert(draw(st.integers(0, len(matches))), mark)
            rules.append(Rule(matches=tuple(matches), target=draw(stateful_targets())))
        policy = "ACCEPT" if draw(st.integers(0, 2)) else "DROP"
        chains[name] = Chain(name, policy=policy, rules=rules)
    return Ruleset(chains=chains)


@st.composite
def flows(draw: st.DrawFn, protocol: int) -> list[Step]:
    """A connection's packets, near what its two ends would send."""
    steps = []
    seq = {True: draw(st.sampled_from((1000, 0xFFFFFF00))), False: 5000}
    for _ in range(draw(st.integers(2, 6))):
        forward = draw(st.integers(0, 2)) > 0 if not steps else draw(st.booleans())
        ports = (PORTS["initiator"], PORTS["responder"])
        sport, dport = ports if forward else ports[::-1]
        if protocol == 6:
            flags = draw(st.sampled_from(TCP_FLAGS))
            data = draw(st.sampled_from((b"", b"", b"data")))
            own = seq[forward] if draw(st.integers(0, 5)) else draw(st.integers(0, 0xFFFFFFFF))
            ack = seq[not forward]
            packet = TCP(sport=sport, dport=dport, flags=flags, seq=own, ack=ack, window=8192)
            if data:
                packet = packet / Raw(data)
            seq[forward] = (own + len(data) + ("S" in flags) + ("F" in flags)) & 0xFFFFFFFF
        elif protocol == 17:
            packet = UDP(sport=sport, dport=dport) / Raw(b"q")
        else:
            kind = draw(st.sampled_from(("echo", "echo", "reply", "error")))
            if kind == "error":
                # An error about the flow's own echo, as the other end's stack would send.
                quoted = bytes(IP(proto=1) / ICMP(type=8, id=7))[:28]
                packet = ICMP(type=3, code=draw(st.sampled_from((1, 3, 13)))) / Raw(quoted)
            else:
                packet = ICMP(type=8 if kind == "echo" else 0, id=7, seq=len(steps))
        steps.append(Step(forward, packet))
    return steps


@st.composite
def cases(draw: st.DrawFn):
    protocol = draw(st.sampled_from((6, 6, 6, 17, 17, 1)))
    pair = draw(st.sampled_from(PAIRS))
    return draw(stateful_rulesets(protocol)), pair, draw(flows(protocol))


@pytest.fixture(scope="module")
def labs() -> Iterator[tuple[Lab, Lab]]:
    with Lab("router") as ours, Lab("router") as twin:
        yield ours, twin


def _quoting(lab: Lab, step: Step, source: str, destination: str) -> Packet:
    """An ICMP error's quoted echo carries the addresses of the echo it answers."""
    if not isinstance(step.packet, ICMP) or step.packet.type != 3:
        return step.packet
    inner = lab.node(destination, source), lab.node(source, destination)
    quoted = IP(src=inner[0].ipv4, dst=inner[1].ipv4, proto=1) / ICMP(type=8, id=7)
    return ICMP(type=3, code=step.packet.code) / Raw(bytes(quoted)[:28])


def _netfilter_moved(twin: Lab, before: dict) -> tuple[dict, dict]:
    """The twin's filter counters that moved since `before`, and the new reading, read with
    iptables-legacy-save alone: zeroing them would load the table anew."""
    saved = twin.holder_namespace.run(["iptables-legacy-save", "-c", "-t", "filter"]).stdout
    now = moved_counters(parse(saved, "<iptables-legacy-save>"))
    moved = {}
    for position, (count, octets) in now.items():
        old = before.get(position, (0, 0))
        if (count, octets) != old:
            moved[position] = (count - old[0], octets - old[1])
    return moved, now


def _run_steps(
    ours: Lab, twin: Lab, backend: str, text: str, pair: tuple[str, str], steps: list[Step]
) -> None:
    """Send each step through both labs: the same fate, the same counters moved."""
    initiator, responder = pair
    namespace = ours.holder_namespace.name
    _, kernel_reading = _netfilter_moved(twin, {})
    _, reading = _our_counters(namespace, {})
    for number, step in enumerate(steps, 1):
        source, destination = (initiator, responder) if step.forward else (responder, initiator)
        packet = _quoting(ours, step, source, destination)
        frame = ours.frame(source, destination, Ether() / IP() / packet)
        ours_arrived = _fate(ours, source, destination, frame)
        twin_arrived = _fate(twin, source, destination, frame)
        moved, reading = _our_counters(namespace, reading)
        kernel, kernel_reading = _netfilter_moved(twin, kernel_reading)
        flow = "\n".join(
            f"  {'>' if s.forward else '<'} {s.packet.summary()}" for s in steps[:number]
        )
        where = f"packet {number} {source}->{destination} ({backend})\n{text}flow:\n{flow}"
        assert ours_arrived == twin_arrived, (
            f"netfilter {'passed' if twin_arrived else 'dropped'} it, ours "
            f"{'passed' if ours_arrived else 'dropped'} it: {where}"
        )
        assert moved == kernel, f"counters: ours {moved}, netfilter {kernel}: {where}"


# A drop is decided by a probe without waiting (Lab.deliver): a third of the profile (32 in CI);
# the C backend a sixteenth (6 in CI): bcc compiles each drawn rule set for seconds, and its
# tracker is held to the reference flow by flow under test-run (test_tracker_programs,
# test_connmark_programs).
EXAMPLES = max(32, settings().max_examples // 3)
C_EXAMPLES = max(6, settings().max_examples // 16)


@settings(max_examples=EXAMPLES, **TWIN_SETTINGS)
@given(case=cases())
def test_stateful_programs_do_what_netfilter_does(labs, case) -> None:
    _stateful_case(labs, "bytecode", case)


@pytest.mark.bcc
@settings(max_examples=C_EXAMPLES, **TWIN_SETTINGS)
@given(case=cases())
def test_stateful_c_programs_do_what_netfilter_does(labs, case) -> None:
    _stateful_case(labs, "c", case)


def _stateful_case(labs, backend: str, case) -> None:
    ours, twin = labs
    ruleset, (initiator, responder), steps = case
    text = write(ruleset)
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, "<drawn>", namespace, backend=backend)
    twin.load_filter_table("*filter\nCOMMIT\n")  # no hashlimit table lives on into this one
    twin.load_filter_table(text)
    twin.holder_namespace.run(["conntrack", "-F"], check=False)
    try:
        _run_steps(ours, twin, backend, text, (initiator, responder), steps)
    finally:
        lifecycle.flush(namespace)


def _in_every_chain(rules: list[str], *extra: str) -> str:
    # The policies written out: iptables-restore leaves a built-in chain's policy as it was
    # (a drawn example's DROP) unless the text says it.
    policies = [f":{chain} ACCEPT [0:0]" for chain in BUILTIN_CHAINS]
    lines = [f"-A {chain} {rule}" for chain in BUILTIN_CHAINS for rule in rules]
    return "\n".join(["*filter", *policies, *extra, *lines, "COMMIT", ""])


# The marks of connections, the same rules in every chain so that each pair's packets meet
# them: restore the packet's mark, classify a NEW connection in a user chain and save its mark
# (a NEW UDP packet is dropped after the save: its entry, and the mark, are never kept);
# every ESTABLISHED packet flips a bit of its connection's mark, which the next packet's
# counters read; every operation with shifts and masks, read back by -m connmark and -m mark.
CONNMARK_RULESETS = {
    "classify": _in_every_chain(
        [
            "-j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff",
            "-m mark --mark 0x1/0xff",
            "-m conntrack --ctstate NEW -j classify",
            "-m connmark --mark 0x0/0xff",
            "-m conntrack --ctstate ESTABLISHED,RELATED -j CONNMARK --xor-mark 0x100",
            "-m connmark --mark 0x100/0x100",
            "-m connmark ! --mark 0x0/0xffffff00 -j ACCEPT",
        ],
        ":classify - [0:0]",
        "-A classify -p tcp -j MARK --set-xmark 0x1/0xff",
        "-A classify -p icmp -j MARK --set-xmark 0x2/0xff",
        "-A classify -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff",
        "-A classify -p udp -m connmark --mark 0x0/0xff -j CONNMARK --set-mark 0x7",
        "-A classify -p udp -m conntrack --ctdir ORIGINAL -m connmark --mark 0x7 -j DROP",
    ),
    "operations": _in_every_chain(
        [
            "-j CONNMARK --xor-mark 0x80000001",
            "-m connmark --mark 0x1/0x1",
            "-j CONNMARK --save-mark --nfmask 0xf0f --ctmask 0xffff --left-shift-mark 4",
            "-m connmark --mark 0x0/0xffff",
            "-j CONNMARK --or-mark 0x300",
            "-p tcp -j CONNMARK --set-mark 0x40/0xf0 --right-shift-mark 1",
            "-m connmark --mark 0x20/0x70",
            "-j CONNMARK --restore-mark --ctmask 0xff0 --nfmask 0xff --right-shift-mark 4",
            "-m mark --mark 0x2/0xf",
            "-j MARK --set-xmark 0x9/0xf",
            "-j CONNMARK --save-mark --mask 0xf",
            "-m connmark --mark 0x9/0xf",
        ]
    ),
}


def _connmark_flows(pair_number: int) -> list[list[Step]]:
    """A TCP connection, a UDP exchange and ICMP echoes with an error about them, each with
    ports of its own so that connections of different flows and pairs never meet."""
    sport = 41000 + pair_number * 10
    ports = (sport, PORTS["responder"])

    def tcp(forward: bool, flags: str, seq: int, ack: int) -> Step:
        sport_, dport = ports if forward else ports[::-1]
        return Step(forward, TCP(sport=sport_, dport=dport, flags=flags, seq=seq, ack=ack))

    udp_ports = (sport + 1, 53)
    return [
        [tcp(True, "S", 1000, 0), tcp(False, "SA", 5000, 1001), tcp(True, "A", 1001, 5001),
         tcp(True, "PA", 1001, 5001), tcp(False, "A", 5001, 1001), tcp(True, "FA", 1001, 5001)],
        [Step(True, UDP(sport=udp_ports[0], dport=udp_ports[1]) / Raw(b"q")),
         Step(True, UDP(sport=udp_ports[0], dport=udp_ports[1]) / Raw(b"q")),
         Step(False, UDP(sport=udp_ports[1], dport=udp_ports[0]) / Raw(b"a"))],
        [Step(True, ICMP(type=8, id=7, seq=1)), Step(False, ICMP(type=0, id=7, seq=1)),
         Step(False, ICMP(type=3, code=3) / Raw(b"")), Step(True, ICMP(type=8, id=7, seq=2))],
    ]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONNMARK_RULESETS))
def test_connection_marks_do_what_netfilter_does(labs, backend: str, name: str) -> None:
    ours, twin = labs
    text = CONNMARK_RULESETS[name]
    namespace = ours.holder_namespace.name
    lifecycle.apply(text, name, namespace, backend=backend)
    twin.load_filter_table("*filter\nCOMMIT\n")
    twin.load_filter_table(text)
    twin.holder_namespace.run(["conntrack", "-F"], check=False)
    try:
        for number, pair in enumerate(PAIRS):
            for steps in _connmark_flows(number):
                _run_steps(ours, twin, backend, text, pair, steps)
    finally:
        lifecycle.flush(namespace)
