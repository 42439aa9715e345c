"""`-m limit` on real traffic: the same burst of UDP datagrams sent back to back to a host that
filters with iptables-legacy, and to its twin that runs our attached programs, in each backend
that generates the match. The same number must arrive, and the rules' counters must agree
(netfilter's read back from its table, ours from the counters map). The rates are ones no
sub-second timing can change the count of: 1/hour, and 1/sec with the burst sent in well under
a second.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from codegen.rules import parse
from codegen.rules.ipt_blob import read_table
from harness.deploy import lifecycle
from netns import HostTopology
from tests.net.test_tc_attached import rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

BACKENDS = ("bytecode", "c")
PORT = 5001
SENT = 30

CASES = [
    (
        "1/hour burst 5, the rest dropped",
        rules(
            f"-A INPUT -p udp -m udp --dport {PORT} -m limit --limit 1/hour -j ACCEPT",
            f"-A INPUT -p udp -m udp --dport {PORT} -j DROP",
        ),
    ),
    (
        "1/sec burst 3 in a user chain, the default burst after it",
        rules(
            ":limited - [0:0]",
            "-A INPUT -p udp -j limited",
            "-A limited -m limit --limit 1/sec --limit-burst 3 -j ACCEPT",
            "-A limited -m limit --limit 2/hour -j ACCEPT",
            "-A limited -j DROP",
        ),
    ),
    (
        "a RETURN over the limit, as OpenWrt's syn_flood chain",
        rules(
            ":flood - [0:0]",
            "-A INPUT -p udp -j flood",
            "-A INPUT -p udp -j DROP",
            "-A flood -m limit --limit 1/hour --limit-burst 7 -j RETURN",
            "-A flood -j ACCEPT",
        ),
    ),
]


def _counters(table) -> dict:
    """(chain, rule number or "policy") -> (packets, bytes) of a model read back."""
    found = {}
    for chain in table.chains.values():
        if chain.builtin:
            found[chain.name, "policy"] = (chain.packets, chain.bytes)
        for index, rule in enumerate(chain.rules, 1):
            found[chain.name, index] = (rule.packets, rule.bytes)
    return found


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "text"), CASES, ids=[name for name, _ in CASES])
def test_the_same_datagrams_arrive_as_through_netfilter(backend: str, name: str, text: str):
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "limit.rules"
            path.write_text(text)
            theirs.host.namespace.run(["iptables-legacy-restore", str(path)])
        lifecycle.apply(text, "limit.rules", ours.host.namespace.name, backend=backend)
        try:
            by_netfilter = udp_exchange(theirs.client, theirs.host, [PORT], count=SENT)[PORT]
            by_us = udp_exchange(ours.client, ours.host, [PORT], count=SENT)[PORT]
            with theirs.host.namespace.enter():
                kernel = _counters(read_table())
            _, counted = lifecycle.current(ours.host.namespace.name)
        finally:
            lifecycle.flush(ours.host.namespace.name)
    assert 0 < by_netfilter < SENT, f"{name}: netfilter let {by_netfilter} of {SENT} through"
    assert by_us == by_netfilter, name
    model = parse(text, "limit.rules")
    for chain in model.chains.values():
        for index in range(1, len(chain.rules) + 1):
            assert counted[(chain.name, index)] == kernel[(chain.name, index)], (
                f"{name}: {chain.name} rule {index}"
            )
    assert counted[("INPUT", "policy")] == kernel[("INPUT", "policy")], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reload_refills_the_buckets_in_both(backend: str):
    """iptables-restore loads the table anew and every bucket is full again; so does an apply,
    of the same rules or not (a new map each time)."""
    text = CASES[0][1]
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        arrived: dict[str, list[int]] = {"netfilter": [], "programs": []}
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "limit.rules"
            path.write_text(text)
            try:
                for _ in range(2):
                    theirs.host.namespace.run(["iptables-legacy-restore", str(path)])
                    lifecycle.apply(text, "limit.rules", ours.host.namespace.name, backend=backend)
                    for lab, key in ((theirs, "netfilter"), (ours, "programs")):
                        got = udp_exchange(lab.client, lab.host, [PORT], count=SENT)[PORT]
                        arrived[key].append(got)
            finally:
                lifecycle.flush(ours.host.namespace.name)
    assert arrived["programs"] == arrived["netfilter"] == [5, 5]
