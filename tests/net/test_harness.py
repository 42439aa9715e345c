"""The harness itself: traffic expectations that pass and fail (with pcaps and a field diff),
replay exit codes, the reaper after a SIGKILL, and counters equal to netfilter's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.utils import rdpcap

from codegen.rules import parse
from harness.deploy import lifecycle
from harness.lab.netfilter import NetfilterOracle
from harness.lab.traffic import ExpectationFailed, Lab, expect_not_received, expect_received
from harness.lab.waiting import until

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p udp -m udp --dport 9 -j DROP
-A FORWARD -p udp -m udp --dport 53 -j ACCEPT
COMMIT
"""


def bpflab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=180
    )


def test_expectations_pass_and_fail_with_artefacts(tmp_path, monkeypatch):
    monkeypatch.setattr("harness.lab.traffic.ARTEFACTS", tmp_path)
    with Lab("host") as lab:
        lifecycle.apply(RULES, "rules", lab.holder_namespace.name)
        try:
            allowed = lab.frame("client", "host", UDP(dport=8) / b"fine")
            blocked = lab.frame("client", "host", UDP(dport=9) / b"blocked")
            expect_received(lab, "client", "host", allowed, count=2)
            expect_not_received(lab, "client", "host", blocked)
            with pytest.raises(ExpectationFailed) as caught:
                expect_received(lab, "client", "host", blocked, label="should-fail")
            message = str(caught.value)
            assert "1 sent from client to host, 0 arrived, all were expected to" in message
            assert f"captures of every lab interface: {tmp_path / 'should-fail'}" in message
            pcaps = sorted((tmp_path / "should-fail").glob("*.pcap"))
            assert len(pcaps) == 2
            frames = [p for path in pcaps for p in rdpcap(str(path))]
            assert any(UDP in p and p[UDP].dport == 9 for p in frames)
            with pytest.raises(ExpectationFailed, match="none was expected to"):
                expect_not_received(lab, "client", "host", allowed)
        finally:
            lifecycle.flush(lab.holder_namespace.name)


def test_forwarded_frame_is_rewritten():
    with Lab("router") as lab:
        lifecycle.apply(RULES, "rules", lab.holder_namespace.name)
        try:
            sent = lab.frame("client", "server", IP(ttl=20) / UDP(dport=53) / b"q")
            (got,) = expect_received(lab, "client", "server", sent)
            assert got[IP].ttl == 19
            assert got.src == lab.node("router", "server").mac
            assert got.dst == lab.node("server", "router").mac
            expect_not_received(
                lab, "client", "server", lab.frame("client", "server", UDP(dport=54))
            )
        finally:
            lifecycle.flush(lab.holder_namespace.name)


def _script(tmp_path, expect: str, counters: str = "") -> str:
    path = tmp_path / f"{expect}.toml"
    path.write_text(f'''description = "check"
topology = "host"
rules = """
{RULES}"""
[[packets]]
from = "client"
to = "host"
packet = 'UDP(dport=9)'
expect = "{expect}"
{counters}''')
    return str(path)


def test_replay_exit_codes(tmp_path):
    good = bpflab("replay", _script(tmp_path, "drop", '[counters]\n"INPUT:1" = { packets = 1 }'))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "all as expected" in good.stdout
    wrong = bpflab("replay", _script(tmp_path, "pass"))
    assert wrong.returncode == 1
    assert "  1  client->host UDP" in wrong.stdout and "MISMATCH" in wrong.stdout
    assert "1 sent, 0 arrived, expected 1" in wrong.stdout
    counted = bpflab(
        "replay", _script(tmp_path, "netfilter", '[counters]\n"INPUT:1" = { packets = 5 }')
    )
    assert counted.returncode == 1
    assert "INPUT:1" in counted.stdout and "expected 5/*" in counted.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('topology = "mesh"\n')
    refused = bpflab("replay", str(bad))
    assert refused.returncode == 2
    known = "'host', 'router', 'bridge'"
    assert refused.stderr == f"{bad}:1: error: topology must be one of {known}, not 'mesh'\n"


@pytest.mark.xdist_group("reaper")  # with the reaper tests of test_netns.py, never beside them
def test_reaper_cleans_up_after_sigkill():
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from netns import Namespace\n"
                "ns = Namespace().__enter__()\n"
                "print(ns.name, flush=True)\n"
                "time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        name = child.stdout.readline().strip()
        assert name.startswith("bl") and os.path.exists(f"/var/run/netns/{name}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert os.path.exists(f"/var/run/netns/{name}")  # SIGKILL left it behind
    state = lifecycle.STATE_ROOT / f"{name}.json"  # as if it had rules applied
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("{}")
    cleaned = bpflab("cleanup")
    assert cleaned.returncode == 0
    assert f"removed {name}" in cleaned.stdout
    assert not os.path.exists(f"/var/run/netns/{name}")
    assert not state.exists()


def test_counters_equal_netfilters_for_the_same_traffic():
    text = """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:svc - [0:0]
-A INPUT -p tcp -j svc
-A INPUT -p udp -m udp --dport 53 -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A svc -p tcp -m tcp --dport 22 --tcp-flags SYN,ACK SYN -j ACCEPT
-A svc -j RETURN
COMMIT
"""
    traffic = [
        UDP(sport=1, dport=53) / b"query",
        UDP(dport=54),
        TCP(dport=22, flags="S"),
        TCP(dport=22, flags="A"),
        TCP(dport=80, flags="S"),
        ICMP(type=8),
        ICMP(type=13),
    ]
    with Lab("host") as lab:
        lifecycle.apply(text, "rules", lab.holder_namespace.name)
        try:
            frames = [lab.frame("client", "host", packet) for packet in traffic]
            for frame in frames:
                with lab.receiver("host", "client", frame[IP].proto) as receiver:
                    lab.send("client", "host", frame)
                    receiver.collect(lambda p: False, 1, 0.05)
            theirs: dict = {}
            with NetfilterOracle() as oracle:
                oracle.load(parse(text))
                for frame in frames:
                    for position, (p, b) in oracle.run(bytes(frame[IP]), "INPUT").counters.items():
                        old = theirs.get(position, (0, 0))
                        theirs[position] = (old[0] + p, old[1] + b)

            def moved() -> dict:
                counted = lifecycle.current(lab.holder_namespace.name)[1]
                return {k: v for k, v in counted.items() if v != (0, 0) and k[0]}

            ours = until(moved, lambda ours: ours == theirs)
        finally:
            lifecycle.flush(lab.holder_namespace.name)
    assert ours == theirs
    assert len(ours) >= 5
