"""What every packet pays before its first rule: the whole ingress and egress programs timed
with BPF_PROG_TEST_RUN beside the INPUT chain program and the empty program, on a rule set of
one rule (the workload's, matching the timed packets' first-rule traffic).

Test-run gives the packet the loopback of the calling thread's namespace, so the programs run
inside a namespace of our own (`bl` prefix) whose routes make each case what it says: its lo
(the test-run device) forwards, a dummy device holds the route a forwarded packet takes, and the
ingress program's local addresses hold the destination the local packet goes to (the kernel here
has no dummy devices: the route's device is one end of a veth pair whose two ends stay inside).
The cases:

- `local`: to a local address, through INPUT (the local-address compare, then the chain);
- `forwarded`: to an address behind the veth device, through FORWARD (bpf_fib_lookup first;
  FORWARD is empty, so its policy decides);
- `martian`: from a multicast source, which ip_route_input drops before any hook: not handled;
- `fragment`: a later fragment to the local address, which INPUT's fragment map decides;
- `output`: a packet made here (no ingress device), through OUTPUT (the egress program);
- `bridged`: a packet bridged from one port to another, through FORWARD on the out-port's
  egress (the `bridged` program: its two bridge-port lookups, then the chain; the test-run
  device, lo, stands for the out-port and the veth device for the in-port, both ports of a
  stand-in bridge in the program's `bridge_ports`).

The fixed cost is the ingress program's `local` figure less the chain program's: what the
classification in front of INPUT's rules costs.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from codegen.bpf.testrun import SkBuff
from codegen.rules import parse
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import NOT_HANDLED, CounterLayout, Local
from netns import Namespace
from netns.veth import prepare_namespace

from ..backends import Backend, load_program
from ..counters import CounterMap
from ..deploy.bridges import bridge_maps
from ..runner import frame_for, standin_interfaces
from .settings import TimingSettings
from .testrun import BenchCheckFailed, time_program
from .workload import ip_packet, iptables_rules

LOCAL = IPv4Address("198.18.0.2")
BEHIND = IPv4Address("198.18.9.2")  # behind the veth device's 198.18.9.0/24
DEVICE, PEER = "blfixed0", "blfixed1"
CASES = ("local", "forwarded", "martian", "fragment", "output", "bridged")
HOOKS = {"output": "egress", "bridged": "bridged"}  # the rest: ingress
# What decides each case: a counter position the programs move.
DECIDING = {
    "local": ("INPUT", 1),
    "forwarded": ("FORWARD", "policy"),
    "martian": NOT_HANDLED,
    "output": ("OUTPUT", "policy"),
    "bridged": ("FORWARD", "policy"),
}
LOOPBACK, STANDIN_BRIDGE = 1, 999  # test-run's device (the out-port), the bridge's ifindex


def _packets() -> dict[str, bytes]:
    """The IP packets of each case, all the first-rule packet of the one-rule workload."""
    first = ip_packet(1, "first", LOCAL)
    forwarded = ip_packet(1, "first", BEHIND)
    martian = bytearray(first)
    martian[12:16] = IPv4Address("224.0.0.9").packed  # a multicast source
    fragment = bytearray(first)
    fragment[6:8] = struct.pack("!H", 8)  # offset 8 (64 bytes in), no MF: a later fragment
    for packet in (martian, fragment):
        packet[10:12] = b"\0\0"
        total = sum(struct.unpack("!10H", bytes(packet[:20])))
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        packet[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return {
        "local": first,
        "forwarded": forwarded,
        "martian": bytes(martian),
        "fragment": bytes(fragment),
        "output": first,
        "bridged": forwarded,
    }


def _lab(namespace: Namespace) -> int:
    """A namespace where the test-run device (lo) forwards to a veth device's subnet; the veth
    device's ifindex."""
    prepare_namespace(namespace, ipv6=False, forwarding=True)
    namespace.sysctl("net.ipv4.conf.lo.forwarding", 1)
    with namespace.ipr() as ipr:
        ipr.link("add", ifname=DEVICE, kind="veth", peer=PEER)
        index = ipr.link_lookup(ifname=DEVICE)[0]
        ipr.addr("add", index=index, address="198.18.9.1", prefixlen=24)
        for name in (DEVICE, PEER):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        # A neighbour, so that the lookup answers SUCCESS as for a resolved next hop.
        ipr.neigh("add", dst=str(BEHIND), lladdr="02:00:00:00:09:02", ifindex=index, state=0x80)
    return index


def measure_fixed(settings: TimingSettings, backend: Backend = "bytecode") -> dict:
    """ns per packet of the empty-rule-set classification, per case, with the chain program's
    figure beside them (see the module doc)."""
    ruleset = parse(iptables_rules(1), "bench-fixed.rules")
    layout = CounterLayout.of(ruleset)
    interfaces = standin_interfaces(ruleset)
    packets = _packets()
    figures: dict[str, dict] = {}
    with (
        Namespace() as namespace,
        CounterMap(layout) as counters,
    ):
        port = _lab(namespace)
        bridged = bridge_maps({LOOPBACK: STANDIN_BRIDGE, port: STANDIN_BRIDGE})
        maps = {COUNTERS_MAP: counters, **bridged}
        programs = {
            hook: load_program(
                ruleset,
                hook,
                interfaces=interfaces,
                maps=maps,
                chain=chain,
                backend=backend,
                local={int(LOCAL): Local.ADDRESS},
            )
            for hook, chain in (
                ("ingress", None),
                ("egress", None),
                ("bridged", None),
                ("chain", "INPUT"),
            )
        }
        try:
            with namespace.enter():
                for case in CASES:
                    hook = HOOKS.get(case, "ingress")
                    frame = frame_for(packets[case])
                    # ingress_ifindex 0: made here (the egress case); bridged: the in-port.
                    context = SkBuff(ingress_ifindex=port if case == "bridged" else 0)
                    _check(counters, layout, programs[hook].fd, frame, context, case)
                    figures[case] = time_program(
                        programs[hook].fd, frame, settings, context=context
                    ).to_json()
                chain = time_program(programs["chain"].fd, frame_for(packets["local"]), settings)
        finally:
            for program in programs.values():
                program.close()
            for table in bridged.values():
                table.close()
    return {
        "backend": backend,
        "cases": {case: figures[case]["ns"] for case in CASES},
        "chain_ns": chain.ns,
        "fixed_ns": figures["local"]["ns"] - chain.ns,
        "timing": {**figures, "chain": chain.to_json()},
    }


def _check(
    counters: CounterMap, layout: CounterLayout, fd: int, frame: bytes, context, case: str
) -> None:
    """The case goes where it says (DECIDING), or the figure would time something else."""
    from codegen.bpf.testrun import prog_test_run

    want = DECIDING.get(case)
    if want is None:
        return
    before = counters.read()
    prog_test_run(fd, frame, context=context)
    moved = {p for p, v in counters.read().items() if v != before.get(p)}
    if want not in moved:
        raise BenchCheckFailed(
            f"fixed cost: the {case} packet moved {sorted(map(str, moved))}, not {want}"
        )
