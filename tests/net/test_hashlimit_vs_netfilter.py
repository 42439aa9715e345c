"""`-m hashlimit` on real traffic: the same datagrams sent back to back from two source addresses
of the client (198.18.0.1 and 198.18.0.3, one link) to a host that filters with
iptables-legacy, and to its twin that runs our attached programs, in both backends. The same
number must arrive from each source, and every rule's counter must agree. The rates are ones
no sub-second timing can change the count of (1/hour, 1/min, 7/day; byte rates whose next
datagram needs a third of a second's refill or more; rate matching in windows of a minute or
more).
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from codegen.rules import parse
from codegen.rules.ipt_blob import read_table
from harness.deploy import lifecycle
from netns import HostTopology
from tests.net.test_limit_vs_netfilter import _counters
from tests.net.test_tc_attached import PAYLOAD, rules

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

BACKENDS = ("bytecode", "c")
PORTS = (5001, 5002)
SENT = 12  # per source and port
SECOND_SOURCE = "198.18.0.3"

CASES = [
    (
        "per source 1/hour burst 4: each source its own burst",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 4"
            " --hashlimit-mode srcip --hashlimit-name persource -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
    (
        "a /24 source mask: both sources share one bucket",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 5"
            " --hashlimit-mode srcip --hashlimit-srcmask 24 --hashlimit-name subnet -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
    (
        "above per source and destination port, in a user chain",
        rules(
            ":flood - [0:0]",
            "-A INPUT -p udp -j flood",
            "-A flood -m hashlimit --hashlimit-above 1/min --hashlimit-burst 3"
            " --hashlimit-mode srcip,dstport --hashlimit-name flood -j DROP",
            "-A flood -j ACCEPT",
        ),
    ),
    (
        "one name in two rules: the ports share each source's bucket",
        rules(
            "-A INPUT -p udp --dport 5001 -m hashlimit --hashlimit-upto 1/hour"
            " --hashlimit-burst 6 --hashlimit-mode srcip --hashlimit-name both -j ACCEPT",
            "-A INPUT -p udp --dport 5002 -m hashlimit --hashlimit-upto 1/hour"
            " --hashlimit-burst 6 --hashlimit-mode srcip --hashlimit-name both -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
    (
        "128b/s per source with a burst of two refills: 3 datagrams a second's credit",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-upto 128b/s --hashlimit-burst 256b"
            " --hashlimit-mode srcip --hashlimit-name bytes -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
    (
        "above 16b/s per destination port: a datagram's price capped at a second's credit",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-above 16b/s --hashlimit-burst 64b"
            " --hashlimit-mode dstport --hashlimit-name tiny -j DROP",
            "-A INPUT -p udp -j ACCEPT",
        ),
    ),
    (
        "rate match 3/min per source: a 60-second window takes the burst and the rate",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-upto 3/min --hashlimit-mode srcip"
            " --hashlimit-name window --hashlimit-rate-match -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
    (
        "rate match above 256b/s per destination port: a 100-second window counts bytes",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-above 256b/s --hashlimit-mode dstport"
            " --hashlimit-name bytewin --hashlimit-rate-match --hashlimit-rate-interval 100"
            " -j DROP",
            "-A INPUT -p udp -j ACCEPT",
        ),
    ),
    (
        "7/day burst 1000000, whose credit cap wraps in 64 bits",
        rules(
            "-A INPUT -p udp -m hashlimit --hashlimit-upto 7/day --hashlimit-burst 1000000"
            " --hashlimit-name wrap -j ACCEPT",
            "-A INPUT -p udp -j DROP",
        ),
    ),
]


def exchange(lab: HostTopology) -> dict[tuple[str, int], int]:
    """SENT datagrams to each port from each of the client's two addresses, interleaved,
    back to back; how many arrived, by source address and port."""
    client, host = lab.client, lab.host
    sources = (str(client.ipv4.ip), SECOND_SOURCE)
    receivers = {}
    senders = []
    arrived = {(source, port): 0 for source in sources for port in PORTS}
    try:
        for port in PORTS:
            sock = host.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((str(host.ipv4.ip), port))
            sock.settimeout(0.3)
            receivers[port] = sock
        for source in sources:
            out = client.namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
            out.bind((source, 0))
            senders.append(out)
        for _ in range(SENT):
            for port in PORTS:
                for out in senders:
                    out.sendto(PAYLOAD, (str(host.ipv4.ip), port))
        for port, sock in receivers.items():
            for _ in range(SENT * len(sources)):
                try:
                    _, (source, _) = sock.recvfrom(2048)
                except TimeoutError:
                    break
                arrived[source, port] += 1
    finally:
        for held in (*senders, *receivers.values()):
            held.close()
    return arrived


def _with_second_source(lab: HostTopology) -> None:
    lab.client.namespace.run(["ip", "addr", "add", f"{SECOND_SOURCE}/24", "dev", "eth0"])


def _restore(lab: HostTopology, text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "hashlimit.rules"
        path.write_text(text)
        lab.host.namespace.run(["iptables-legacy-restore", str(path)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "text"), CASES, ids=[name for name, _ in CASES])
def test_the_same_datagrams_arrive_as_through_netfilter(backend: str, name: str, text: str):
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        for lab in (theirs, ours):
            _with_second_source(lab)
        _restore(theirs, text)
        lifecycle.apply(text, "hashlimit.rules", ours.host.namespace.name, backend=backend)
        try:
            by_netfilter = exchange(theirs)
            by_us = exchange(ours)
            with theirs.host.namespace.enter():
                kernel = _counters(read_table())
            _, counted = lifecycle.current(ours.host.namespace.name)
        finally:
            lifecycle.flush(ours.host.namespace.name)
    total = sum(by_netfilter.values())
    assert 0 < total < SENT * 4, f"{name}: netfilter let {by_netfilter} through"
    assert by_us == by_netfilter, name
    model = parse(text, "hashlimit.rules")
    for chain in model.chains.values():
        for index in range(1, len(chain.rules) + 1):
            assert counted[(chain.name, index)] == kernel[(chain.name, index)], (
                f"{name}: {chain.name} rule {index}"
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reload_keeps_a_names_table_in_both(backend: str):
    """netfilter keeps a name's table across a table replace when the new table has a rule of
    that name (the same rules restored twice let nothing more through), and destroys it with
    its last rule; an apply keeps and drops our entries the same way. The sequence: the rules,
    the same again, the table renamed (fresh), renamed with another rule before it (kept),
    rules without hashlimit (gone), the renamed table again (fresh)."""
    first = CASES[0][1]
    renamed = first.replace("persource", "renamed")
    extra = renamed.replace(
        "-A INPUT -p udp -m hashlimit", "-A INPUT -p tcp -j DROP\n-A INPUT -p udp -m hashlimit", 1
    )
    plain = rules("-A INPUT -p udp -j ACCEPT")
    sequence = [first, first, renamed, extra, plain, renamed]
    arrived: dict[str, list[int]] = {"netfilter": [], "programs": []}
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        for lab in (theirs, ours):
            _with_second_source(lab)
        try:
            for text in sequence:
                _restore(theirs, text)
                lifecycle.apply(text, "hashlimit.rules", ours.host.namespace.name, backend=backend)
                for lab, key in ((theirs, "netfilter"), (ours, "programs")):
                    arrived[key].append(sum(exchange(lab).values()))
        finally:
            lifecycle.flush(ours.host.namespace.name)
    assert arrived["netfilter"] == [8, 0, 8, 0, SENT * 4, 8], arrived
    assert arrived["programs"] == arrived["netfilter"]
