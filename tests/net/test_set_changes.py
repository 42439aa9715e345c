"""`bpflab set add|del` against ipset: the same changes made to a namespace's ipsets with ipset
and to the applied copy with change_set (the command's function), step by step. After each
step the copy holds what ipset holds (every member, nomatch flags too), a change ipset refuses
is refused and changes nothing, and the attached programs (each backend) count the next
packets as the reference evaluator says over the copy. At the end iptables-legacy, over the
namespace's ipsets, counts the same packets as the reference does: the copy, the programs and
netfilter agree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from codegen.rules import parse
from codegen.rules.sets import SetError, SetTable
from harness.deploy.lifecycle import apply, current, flush
from harness.deploy.sets import applied_sets, change_set, namespace_sets
from harness.deploy.state import LifecycleError
from harness.lab.waiting import until
from netns import HostTopology
from netns.namespace import CommandError
from tests.net.test_ipt_blob import counters, restore, save
from tests.net.test_set_vs_netfilter import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.privileged,
    pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset is not installed"),
]

SETS = """\
create h3 hash:ip family inet maxelem 3
add h3 198.18.0.5
create n3 hash:net family inet
add n3 198.18.4.0/22
create s3 hash:ip,port family inet
add s3 198.18.0.5,tcp:80
create np3 hash:net,port family inet
add np3 198.18.4.0/24,udp:53
create p3 bitmap:port range 0-1024
add p3 22
create ni3 hash:net,iface family inet
add ni3 198.18.4.0/22,eth0
"""
MATCHES = (
    "-m set --match-set h3 src",
    "-m set --match-set n3 src",
    "-m set --match-set n3 src --return-nomatch",
    "-m set --match-set s3 src,dst",
    "-m set --match-set np3 src,dst",
    "-m set --match-set p3 dst",
    "-m set --match-set ni3 src,src",
)
RULES = (
    "*filter\n"
    + "".join(f"-A INPUT -m ttl --ttl-eq 77 {match}\n" for match in MATCHES)
    + "-A INPUT -m ttl --ttl-eq 77 -j DROP\nCOMMIT\n"
)
# (ipset's words, whether ipset takes the change), in order.
STEPS = (
    ("add h3 198.18.0.6", True),
    ("add h3 198.18.0.6", False),  # already there
    ("add h3 198.18.4.1", True),
    ("add h3 198.18.0.8", False),  # full: maxelem 3
    ("del h3 198.18.0.99", False),  # not there
    ("add n3 198.18.5.0/24 nomatch", True),
    ("-exist add n3 198.18.5.0/24", True),  # the nomatch flag goes
    ("add n3 198.18.6.0/25 nomatch", True),
    ("del n3 198.18.4.0/22", True),
    ("add s3 198.18.0.9,udp:53", True),
    ("del s3 198.18.0.5,tcp:80", True),
    ("add np3 198.18.4.0/26,udp:53 nomatch", True),
    ("add p3 80", True),
    ("del p3 22", True),
    ("add p3 2000", False),  # outside its range
    ("del h3 198.18.0.5", True),
    ("add ni3 198.18.4.1,eth1", True),  # hides eth0's /22 from 198.18.4.1
    ("add ni3 198.18.4.1,eth1", False),
    ("add ni3 198.18.5.0/24,et wildcard", True),
    ("add ni3 198.18.5.0/25,eth0 nomatch", True),
    ("del ni3 198.18.4.1,eth1", True),
)
SOURCES = ("198.18.0.5", "198.18.0.6", "198.18.0.9", "198.18.4.1", "198.18.5.1", "198.18.6.1")


def _packets() -> list[bytes]:
    layers = (TCP(dport=80, flags="S"), UDP(sport=9, dport=53), TCP(dport=22, flags="S"))
    return [
        bytes(IP(src=source, dst="198.18.0.2", ttl=77, id=n) / layer)
        for n, (source, layer) in enumerate((s, layer) for s in SOURCES for layer in layers)
    ]


def _members(sets: SetTable) -> dict[str, set]:
    return {
        name: {
            (m.network, m.prefix, m.protocol, m.port, m.nomatch, m.iface, m.wildcard)
            for m in table.members
        }
        for name, table in sets.sets.items()
        if name in {"h3", "n3", "s3", "np3", "p3", "ni3"}
    }


@pytest.fixture
def lab():  # type: ignore[no-untyped-def]
    with HostTopology(ipv6=False) as topology:
        built = Lab(topology, SETS)
        try:
            yield built
        finally:
            built.close()


def _ours(lab: Lab, words: str) -> bool:
    """Make the change of ipset's `words` with change_set; whether it was taken."""
    exist = words.startswith("-exist ")
    action, name, *entry = words.removeprefix("-exist ").split()
    before = applied_sets(lab.host.name)
    try:
        change_set(lab.host.name, name, " ".join(entry), delete=action == "del", exist=exist)
    except SetError:
        assert applied_sets(lab.host.name) == before  # refused: nothing changed
        return False
    return True


def _moved(lab: Lab, start: dict, expected: dict) -> dict:
    """How far each rule's counters of `expected` moved since `start`."""
    now = current(lab.host.name)[1]
    return {key: (now[key][0] - start[key][0], now[key][1] - start[key][1]) for key in expected}


@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_changes_in_place_agree_with_ipset(lab: Lab, backend: str, tmp_path: Path) -> None:
    apply(RULES, "sets", lab.host.name, backend=backend)  # type: ignore[arg-type]
    packets = _packets()
    try:
        for words, taken in STEPS:
            try:
                lab.host.run(["ipset", *words.split()])
                kernel_took = True
            except CommandError:
                kernel_took = False
            assert kernel_took == taken, words
            assert _ours(lab, words) == taken, words
            ours = applied_sets(lab.host.name)
            assert _members(ours) == _members(namespace_sets(lab.host)), words
            start = current(lab.host.name)[1]
            lab.send(packets)
            expected = lab.expected(packets, ours, RULES)
            moved = until(
                lambda start=start, expected=expected: _moved(lab, start, expected),
                lambda got, expected=expected: got == expected,
            )
            assert moved == expected, words
        # The steps changed what the rules see: every set rule counted something at some point.
        assert all(
            current(lab.host.name)[1]["INPUT", n][0] > 0 for n in range(1, len(MATCHES) + 1)
        )
    finally:
        flush(lab.host.name)
    restore(lab.host, RULES, tmp_path)  # the twin, over the namespace's own ipsets
    lab.send(packets)
    expected = lab.expected(packets, namespace_sets(lab.host), RULES)
    kernel = until(
        lambda: counters(parse("\n".join(save(lab.host, counters=True)) + "\n", "kernel")),
        lambda kernel: {key: kernel[key] for key in expected} == expected,
    )
    assert {key: kernel[key] for key in expected} == expected


def test_the_command_lists_saves_and_refuses(lab: Lab) -> None:
    apply(RULES, "sets", lab.host.name)

    def bpflab(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "harness.cli", "set", *words, "--netns", lab.host.name],
            capture_output=True,
            text=True,
            timeout=60,
        )

    try:
        added = bpflab("add", "n3", "198.18.9.0/24", "nomatch")
        assert added.returncode == 0, added.stderr
        listed = bpflab("list", "n3")
        assert listed.stdout.splitlines() == [
            "Name: n3",
            "Type: hash:net",
            "Header: family inet maxelem 65536",
            "Number of entries: 2",
            "Members:",
            "198.18.4.0/22",
            "198.18.9.0/24 nomatch",
        ]
        saved = bpflab("save")
        assert "add n3 198.18.9.0/24 nomatch\n" in saved.stdout
        assert "create p3 bitmap:port range 0-1024\nadd p3 22\n" in saved.stdout
        again = bpflab("add", "n3", "198.18.9.0/24")
        assert again.returncode == 2
        assert "198.18.9.0/24 is already in set 'n3'" in again.stderr
        assert "Traceback" not in again.stderr
        unknown = bpflab("del", "absent", "198.18.0.1")
        assert unknown.returncode == 2 and "uses no set 'absent'" in unknown.stderr
        assert bpflab("list", "n3").stdout == listed.stdout  # the refusals changed nothing
    finally:
        flush(lab.host.name)
    gone = bpflab("list")
    assert gone.returncode == 2 and "no rule set is applied" in gone.stderr


def test_a_rule_set_without_sets_has_none_to_change(lab: Lab) -> None:
    apply("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n", "plain", lab.host.name)
    try:
        with pytest.raises(LifecycleError, match="uses no set 'h3' \\(it uses: none\\)"):
            change_set(lab.host.name, "h3", "198.18.0.1")
    finally:
        flush(lab.host.name)
