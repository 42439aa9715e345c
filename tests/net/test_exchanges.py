"""Real connections in packet scripts (`exchange = "tcp" | "udp" | "ping"`): the replay's exit
status and table, load-time errors, and quiet nodes that stay quiet around an exchange."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP

from harness.lab.exchange import run_exchange
from harness.lab.scripts import ScriptError, load_script
from harness.lab.traffic import EXCHANGE_CHAIN, Lab

net = [pytest.mark.netns, pytest.mark.privileged]

STATEFUL_HOST = '''
topology = "host"
rules = """
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 8080 -j ACCEPT
COMMIT
"""
'''


def bpflab(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BPFLAB_ARTEFACTS": str(tmp_path / "artefacts")},
    )


def entry(**keys: object) -> str:
    lines = ["", "[[packets]]"]
    for key, value in keys.items():
        text = str(value).lower() if isinstance(value, bool) else repr(value)
        lines.append(f"{key} = {text}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, *entries: str, extra: str = "") -> Path:
    path = tmp_path / "exchanges.toml"
    path.write_text(STATEFUL_HOST + "".join(entries) + extra)
    return path


@pytest.mark.parametrize(
    "keys, key, message",
    [
        ({"exchange": "tcp", "expect": "connects"}, "exchange", "needs `port`"),
        ({"exchange": "udp", "port": 0, "expect": "connects"}, "port", "1 to 65535"),
        ({"exchange": "tcp", "port": 80, "expect": "pass"}, "expect", "'connects'"),
        ({"exchange": "ping", "listen": False, "expect": "refused"}, "listen", "ping"),
        ({"exchange": "ping", "port": 1, "expect": "refused"}, "port", "ping"),
        ({"exchange": "tcp", "port": 80, "count": 2, "expect": "connects"}, "count", "one"),
        ({"exchange": "sctp", "port": 80, "expect": "connects"}, "exchange", "tcp, udp"),
        ({"exchange": "tcp", "port": 80, "listen": 1, "expect": "connects"}, "listen", "true"),
        ({"packet": "TCP()", "port": 80, "expect": "pass"}, "port", "only goes with"),
        ({"packet": "TCP()", "expect": "connects"}, "expect", "needs `exchange`"),
    ],
)
def test_exchange_entries_are_checked_when_loaded(tmp_path, keys, key, message):
    path = write(tmp_path, entry(**{"from": "client", "to": "host", **keys}))
    with pytest.raises(ScriptError) as caught:
        load_script(path)
    line = next(
        number
        for number, text in enumerate(path.read_text().splitlines(), 1)
        if text.startswith(f"{key} =")
    )
    assert str(caught.value).startswith(f"{path}:{line}: error: ")
    assert message in caught.value.message


def test_an_exchange_entry_loads(tmp_path):
    path = write(
        tmp_path,
        entry(**{"from": "host", "to": "client", "exchange": "udp", "port": 53}, expect="refused"),
        entry(**{"from": "client", "to": "host", "exchange": "ping"}, expect="netfilter"),
    )
    first, second = load_script(path).packets
    assert (first.exchange, first.port, first.listen, first.chain) == ("udp", 53, True, "OUTPUT")
    assert (second.exchange, second.port, second.chain) == ("ping", None, "INPUT")


@pytest.mark.netns
@pytest.mark.privileged
def test_a_wrong_exchange_expectation_fails_the_replay(tmp_path):
    path = write(
        tmp_path,
        entry(**{"from": "client", "to": "host", "exchange": "tcp"}, port=8080, expect="connects"),
        entry(**{"from": "client", "to": "host", "exchange": "tcp"}, port=8081, expect="connects"),
    )
    result = bpflab(tmp_path, "replay", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    rows = result.stdout.splitlines()
    assert any("client->host tcp:8080" in row and row.endswith(" ok") for row in rows)
    wrong = next(row for row in rows if "client->host tcp:8081" in row)
    assert "connects  times out" in wrong and wrong.endswith("MISMATCH")
    assert "expected connects, got times out" in result.stdout
    assert "MISMATCHES" in rows[-1]
    assert any((tmp_path / "artefacts" / "exchanges").glob("*.pcap"))


@pytest.mark.netns
@pytest.mark.privileged
def test_a_bad_exchange_entry_exits_2_with_its_line(tmp_path):
    path = write(
        tmp_path, entry(**{"from": "client", "to": "host", "exchange": "tcp"}, expect="connects")
    )
    result = bpflab(tmp_path, "replay", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    line = path.read_text().splitlines().index('exchange = "tcp"') + 1
    assert f"{path}:{line}: error: " in result.stderr
    assert "needs `port`" in result.stderr


REJECTING = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 7000 -j REJECT --reject-with tcp-reset
-A INPUT -p udp -m udp --dport 7001 -j REJECT --reject-with icmp-port-unreachable
-A INPUT -p tcp -m tcp --dport 7002 -j REJECT --reject-with icmp-admin-prohibited
-A INPUT -p icmp -j REJECT --reject-with icmp-host-prohibited
-A INPUT -p udp -m udp --dport 7003 -j DROP
COMMIT
"""


@pytest.mark.netns
@pytest.mark.privileged
@pytest.mark.parametrize(
    "kind, port, listen, outcome",
    [
        ("tcp", 7000, True, "refused"),  # the REJECT's RST
        ("udp", 7001, True, "refused"),  # ICMP port unreachable, on the next recv
        ("tcp", 7002, True, "refused"),  # ICMP admin prohibited during connect
        ("ping", None, True, "refused"),  # an ICMP error quoting the echo request
        ("udp", 7003, True, "times out"),
        ("tcp", 8080, False, "refused"),  # nothing listens: the host kernel's own RST
        ("udp", 8080, False, "refused"),  # nothing listens: its own ICMP port unreachable
        ("tcp", 8080, True, "connects"),
    ],
)
def test_outcomes_in_a_netfilter_lab(kind, port, listen, outcome):
    """Refusals (a RST, ICMP errors from netfilter's REJECT or from the kernel) reach the
    initiator through the quiet nodes, in a lab whose host filters with netfilter."""
    with Lab("host") as lab:
        lab.load_filter_table(REJECTING)
        got = run_exchange(lab, "client", "host", kind, port, listen)
        assert got.outcome == outcome, got.detail


@pytest.mark.netns
@pytest.mark.privileged
def test_nodes_stay_quiet_around_an_exchange():
    """The exchange chain is empty before and after an exchange, so the kernels still never
    answer crafted packets: a SYN to a port nothing listens on gets no RST."""
    with Lab("host") as lab:
        assert run_exchange(lab, "client", "host", "tcp", 8080, listen=False).outcome == "refused"
        for namespace in lab.namespaces():
            listing = namespace.run(["iptables-legacy", "-w", "10", "-t", "raw", "-S"]).stdout
            assert f"-N {EXCHANGE_CHAIN}" in listing
            assert f"-A {EXCHANGE_CHAIN} " not in listing
        for source, destination in (("client", "host"), ("host", "client")):
            frame = lab.frame(source, destination, TCP(sport=49152, dport=8080, flags="S"))
            with lab.receiver(source, destination, socket.IPPROTO_TCP) as receiver:
                lab.send(source, destination, frame)
                receiver.collect(lambda packet: False, 1, lab.timeout)
            answers = [p for p in receiver.seen if IP in p and p[IP].src == frame[IP].dst]
            assert not answers, [p.summary() for p in answers]
