"""A namespace's own conntrack sysctls, against its netfilter: an apply compiles the router's
net.netfilter.nf_conntrack_* settings into the tracker (harness.deploy.conntrack_sysctls), so
that with nf_conntrack_tcp_be_liberal=1 a segment far out of the window is no longer INVALID,
and with nf_conntrack_tcp_loose=0 a connection is not picked up mid-stream. Twin router labs
(ours, and the kernel's with the same filter table in iptables-legacy) get the same sysctls and
the same frames; every packet must meet the same fate and move the same counters. A sysctl
changed after an apply is seen at the next one, patching or not."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from scapy.layers.inet import TCP
from scapy.packet import Raw

from harness.deploy import lifecycle
from harness.deploy.conntrack_sysctls import namespace_timeouts
from harness.lab.traffic import Lab
from tests.net.test_attached_vs_netfilter import BACKENDS
from tests.net.test_stateful_vs_netfilter import PORTS, Step, _run_steps

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -m conntrack --ctstate NEW
-A FORWARD -m conntrack --ctstate ESTABLISHED
-A FORWARD -m conntrack --ctstatus ASSURED
COMMIT
"""


# The same with a run of 80 rules the programs answer with a decision tree, so that a
# re-apply of the same text could be a patch of its maps (harness.deploy.patch), which would
# keep the tracker the programs were built with.
CLASSIFIED = RULES.replace(
    ":OUTPUT ACCEPT [0:0]\n",
    ":OUTPUT ACCEPT [0:0]\n"
    + "".join(f"-A FORWARD -s 198.19.{n // 200}.{n % 200 + 1}/32 -j DROP\n" for n in range(80)),
)


def _tcp(forward: bool, flags: str, seq: int, ack: int, data: bytes = b"") -> Step:
    ports = (PORTS["initiator"], PORTS["responder"])
    sport, dport = ports if forward else ports[::-1]
    packet = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192)
    return Step(forward, packet / Raw(data) if data else packet)


HANDSHAKE = [_tcp(True, "S", 1000, 0), _tcp(False, "SA", 5000, 1001), _tcp(True, "A", 1001, 5001)]
# Far past the window (INVALID at the default be_liberal=0), then an ACK of data never sent,
# then an in-window segment.
FAR = [
    _tcp(True, "PA", 901001, 5001, b"far"),
    _tcp(True, "A", 1001, 905001),
    _tcp(True, "PA", 1001, 5001, b"in"),
]
# A mid-stream segment of a connection never seen (picked up at the default loose=1).
MIDSTREAM = [_tcp(True, "A", 77000, 88000), _tcp(False, "A", 88000, 77000)]
CASES = [
    ("be_liberal 1: out of window is not INVALID", {"tcp_be_liberal": 1}, HANDSHAKE + FAR),
    ("loose 0: no pickup mid-stream", {"tcp_loose": 0}, MIDSTREAM),
]
SYSCTL = {"tcp_be_liberal": "nf_conntrack_tcp_be_liberal", "tcp_loose": "nf_conntrack_tcp_loose"}


def _moved(packet: TCP, port: int) -> TCP:
    """The segment with the initiator's port `port` instead of PORTS' own."""
    moved = packet.copy()
    if moved.sport == PORTS["initiator"]:
        moved.sport = port
    else:
        moved.dport = port
    return moved


@pytest.fixture(scope="module")
def labs() -> Iterator[tuple[Lab, Lab]]:
    with Lab("router") as ours, Lab("router") as twin:
        yield ours, twin


def _set(labs: tuple[Lab, Lab], settings: dict[str, int]) -> None:
    for lab in labs:
        for field, value in settings.items():
            lab.holder_namespace.sysctl(f"net.netfilter.{SYSCTL[field]}", value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "settings", "steps"), CASES, ids=[c[0] for c in CASES])
def test_the_namespaces_sysctls_track_as_its_netfilter(labs, backend, name, settings, steps):
    ours, twin = labs
    namespace = ours.holder_namespace
    defaults = {field: getattr(namespace_timeouts(namespace), field) for field in settings}
    _set(labs, settings)
    try:
        assert {f: getattr(namespace_timeouts(namespace), f) for f in settings} == settings
        lifecycle.apply(RULES, "sysctls.rules", namespace.name, backend=backend)
        twin.load_filter_table(RULES)
        twin.holder_namespace.run(["conntrack", "-F"], check=False)
        _run_steps(ours, twin, backend, RULES, ("client", "server"), steps)
    finally:
        lifecycle.flush(namespace.name)
        _set(labs, defaults)


def test_a_sysctl_changed_later_is_seen_at_the_next_apply(labs) -> None:
    """The same rules applied again after the sysctl changed are built anew, not patched (a
    patch keeps the tracker the first apply compiled): the far segment passes, then is
    INVALID."""
    ours, twin = labs
    namespace = ours.holder_namespace
    try:
        for liberal, port in ((1, 41000), (0, 42000)):  # a connection of its own each time
            _set(labs, {"tcp_be_liberal": liberal})
            applied = lifecycle.apply(CLASSIFIED, "sysctls.rules", namespace.name)
            assert not isinstance(applied.patched, int), "patched: the tracker was kept"
            twin.load_filter_table(CLASSIFIED)
            flow = [replace(step, packet=_moved(step.packet, port)) for step in HANDSHAKE + FAR]
            _run_steps(ours, twin, "bytecode", CLASSIFIED, ("client", "server"), flow)
    finally:
        lifecycle.flush(namespace.name)
        _set(labs, {"tcp_be_liberal": 0})
