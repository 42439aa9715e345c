"""`-m recent` on real traffic: bursts of UDP datagrams from one source, sent back to back to a
host that filters with iptables-legacy, and to its twin that runs our attached programs. The
same number must arrive and the rules' counters must agree; a re-apply keeps a table whose
name the rules still have, as iptables-legacy-restore does, and drops one they lost; and
`list_tables` shows what /proc/net/xt_recent/NAME shows. The windows (60 s and more) are ones
no timing of a burst sent in well under a second can change.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from codegen.rules import parse
from codegen.rules.ipt_blob import read_table
from harness.deploy import lifecycle
from harness.deploy.recent import namespace_tables
from netns import HostTopology
from tests.kernel.test_cli import bpflab
from tests.net.test_limit_vs_netfilter import _counters
from tests.net.test_tc_attached import rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

BACKENDS = ("bytecode", "c")
PORT = 5001
SENT = 20

GUARD = rules(
    f"-A INPUT -p udp -m udp --dport {PORT} -m recent --set --name SSH",
    f"-A INPUT -p udp -m udp --dport {PORT} -m recent --update --seconds 60 --hitcount 4"
    " --name SSH -j DROP",
    f"-A INPUT -p udp -m udp --dport {PORT} -j ACCEPT",
)
CASES = [
    ("the ssh guard: 3 of a burst arrive", GUARD),
    (
        "a /24 mask, --rcheck before --set, a user chain",
        rules(
            ":seen - [0:0]",
            f"-A INPUT -p udp -m udp --dport {PORT} -j seen",
            "-A seen -m recent --rcheck --seconds 600 --hitcount 5 --name net"
            " --mask 255.255.255.0 -j DROP",
            "-A seen -m recent --set --name net --mask 255.255.255.0",
        ),
    ),
    (
        "! --rcheck of a table nobody sets",
        rules(
            f"-A INPUT -p udp -m udp --dport {PORT} -m recent --set --name once",
            f"-A INPUT -p udp -m udp --dport {PORT} -m recent --update --seconds 60"
            " --hitcount 2 --name once -j DROP",
            f"-A INPUT -p udp -m udp --dport {PORT} -m recent ! --rcheck --name never -j ACCEPT",
        ),
    ),
]


def _restore(lab, text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "recent.rules"
        path.write_text(text)
        lab.host.namespace.run(["iptables-legacy-restore", str(path)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "text"), CASES, ids=[name for name, _ in CASES])
def test_the_same_datagrams_arrive_as_through_netfilter(backend: str, name: str, text: str):
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        _restore(theirs, text)
        lifecycle.apply(text, "recent.rules", ours.host.namespace.name, backend=backend)
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
    model = parse(text, "recent.rules")
    for chain in model.chains.values():
        for index in range(1, len(chain.rules) + 1):
            assert counted[(chain.name, index)] == kernel[(chain.name, index)], (
                f"{name}: {chain.name} rule {index}"
            )
    assert counted[("INPUT", "policy")] == kernel[("INPUT", "policy")], name


RENAMED = GUARD.replace("--name SSH", "--name OTHER")
GROWN = GUARD.replace("--hitcount 4", "--hitcount 33")  # a ring of 64 instead of 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reload_keeps_the_tables_of_names_still_used(backend: str):
    """Reload the same rules: the table lives on and the source stays blocked; grow its ring
    (--hitcount 33): netfilter flushes it, all 25 arrive, and a reload keeps it (7 more
    stamps reach 33); rename it: a new, empty table, and the burst's first three arrive."""
    loads = [GUARD, GUARD, GROWN, GROWN, RENAMED]
    arrived: dict[str, list[int]] = {"netfilter": [], "programs": []}
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        try:
            for text in loads:
                _restore(theirs, text)
                lifecycle.apply(text, "recent.rules", ours.host.namespace.name, backend=backend)
                for lab, key in ((theirs, "netfilter"), (ours, "programs")):
                    got = udp_exchange(lab.client, lab.host, [PORT], count=25)[PORT]
                    arrived[key].append(got)
        finally:
            lifecycle.flush(ours.host.namespace.name)
    assert arrived["netfilter"] == [3, 0, 25, 7, 3], arrived
    assert arrived["programs"] == arrived["netfilter"]


def _shape(line: str) -> tuple[str, str, int, int]:
    """An entry line's address, TTL and index, and how many stamps it holds (the jiffies
    themselves differ between the two hosts)."""
    found = re.fullmatch(r"src=(\S+) ttl: (\d+) last_seen: \d+ oldest_pkt: (\d+)(.*)", line)
    assert found is not None, line
    return found.group(1), found.group(2), int(found.group(3)), len(found.group(4).split(","))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_listing_is_procs(backend: str):
    with HostTopology(ipv6=False) as theirs, HostTopology(ipv6=False) as ours:
        _restore(theirs, GUARD)
        lifecycle.apply(GUARD, "recent.rules", ours.host.namespace.name, backend=backend)
        try:
            udp_exchange(theirs.client, theirs.host, [PORT], count=7)
            udp_exchange(ours.client, ours.host, [PORT], count=7)
            proc = theirs.host.namespace.run(["cat", "/proc/net/xt_recent/SSH"])
            listed = namespace_tables(ours.host.namespace.name)
            shown = bpflab("recent", "--netns", ours.host.namespace.name, "--name", "SSH")
            unknown = bpflab("recent", "--netns", ours.host.namespace.name, "--name", "ssh")
        finally:
            lifecycle.flush(ours.host.namespace.name)
    text = proc.stdout if isinstance(proc.stdout, str) else proc.stdout.decode()
    theirs_lines = [_shape(line) for line in text.splitlines()]
    ours_lines = [_shape(line) for line in listed["SSH"]]
    assert len(theirs_lines) == 1 and theirs_lines[0][3] == 11  # 7 --set, 4 --update stamps
    assert [line[1:] for line in ours_lines] == [line[1:] for line in theirs_lines]
    assert ours_lines[0][0] == str(ours.client.ipv4.ip)
    assert theirs_lines[0][0] == str(theirs.client.ipv4.ip)
    assert shown.returncode == 0 and shown.stdout.splitlines() == listed["SSH"], shown.stderr
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert "'ssh'" in unknown.stderr


REAPING = rules(
    "-A INPUT -m recent --update --seconds 10 --reap --rttl --name DEFAULT",
    "-A INPUT -m recent ! --rcheck --seconds 4294967295 --reap --name x --mask 255.0.0.0 --rdest",
)


def test_reap_rules_read_back_from_the_kernel_as_parsed():
    """--reap (which both backends refuse, and so is in no registry example) through
    iptables-legacy-restore and back from the kernel's table: the same model, and our blob
    of it is the kernel's byte for byte."""
    from codegen.rules.ipt_blob import read_entries, write_table
    from netns.namespace import Namespace

    with Namespace() as theirs, Namespace() as ours:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "reap.rules"
            path.write_text(REAPING)
            theirs.run(["iptables-legacy-restore", str(path)])
        with theirs.enter():
            assert read_table() == parse(REAPING)
            kernel = read_entries()
        with ours.enter():
            write_table(parse(REAPING))
            assert read_entries() == kernel
