"""`bpflab` as a user meets it: exit codes, one-sentence errors with FILE:LINE:COL, and the output
of check, compile, verify and run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged

RULES = """*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:web - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -s 198.18.0.0/24 -p udp -m udp --dport 53 -j web
-A web -m length --length 0:40 -j RETURN
-A web -j ACCEPT
COMMIT
"""


def bpflab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def rules_file(tmp_path):
    path = tmp_path / "firewall.rules"
    path.write_text(RULES)
    return path


def test_check_prints_the_canonical_form(rules_file):
    result = bpflab("check", str(rules_file))
    assert result.returncode == 0, result.stderr
    assert "-A INPUT -s 198.18.0.0/24 -p udp -m udp --dport 53 -j web" in result.stdout


BAD = [
    ("*filter\n-A INPUT -j TCPMSS\nCOMMIT\n", "2:13: error: target 'TCPMSS' is not supported"),
    ("*filter\n-A INPUT -p tcp --dport 99999 -j ACCEPT\nCOMMIT\n", "2:"),
    ("*nat\nCOMMIT\n", "1:1: error:"),
    ("*filter\n-A INPUT -j nowhere\nCOMMIT\n", "2:"),
]


@pytest.mark.parametrize(("text", "where"), BAD)
def test_bad_rules_exit_2_naming_the_place(tmp_path, text, where):
    path = tmp_path / "bad.rules"
    path.write_text(text)
    for command in ("check", "compile", "verify", "run"):
        extra = ["--chain", "INPUT", "--packet", "Ether()/IP()"] if command == "run" else []
        result = bpflab(command, str(path), *extra)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(f"{path}:{where}"), result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""


def test_reject_is_generated_by_both_backends(tmp_path):
    """Both backends generate REJECT: the C compiles, loads, and its answer comes back from
    `run` as the bytecode's does (the C's drop tail tail-calls the answer program)."""
    path = tmp_path / "reject.rules"
    path.write_text("*filter\n-A INPUT -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT\n")
    assert bpflab("check", str(path)).returncode == 0
    for backend in ("bytecode", "c"):
        for command in ("compile", "verify", "run"):
            spec = 'Ether(dst="02:00:00:00:00:02")/IP(dst="198.18.0.2")/TCP()'
            extra = ["--chain", "INPUT", "--packet", spec] if command == "run" else []
            generated = bpflab(command, "--backend", backend, str(path), *extra)
            assert generated.returncode == 0, (backend, command, generated.stderr)
            if command == "run":
                assert "DROP   by INPUT rule 1, answered with tcp-reset" in generated.stdout
        c_text = bpflab("compile", "--backend", "c", str(path)).stdout
        assert "f->reject = 8;" in c_text and "replies.call(skb, 0);" in c_text


def test_missing_file_is_one_sentence():
    result = bpflab("check", "/nonexistent/rules")
    assert result.returncode == 2
    assert (
        result.stderr
        == "bpflab: error: cannot read /nonexistent/rules: No such file or directory\n"
    )


def test_compile_annotates_each_rule(rules_file):
    result = bpflab("compile", str(rules_file))
    assert result.returncode == 0, result.stderr
    assert "; -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT" in result.stdout
    assert "; -A web -m length --length 0:40 -j RETURN" in result.stdout
    assert "call bpf_fib_lookup#69" in result.stdout
    assert "instructions, 4 rules compiled, chains INPUT, FORWARD" in result.stdout


def test_verify_prints_statistics(rules_file):
    result = bpflab("verify", str(rules_file), "--fastpath")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ingress  bpflab_ingress: accepted;")
    assert lines[1].startswith("egress   bpflab_egress: accepted;")
    assert "processed" in lines[0] and "states" in lines[0]


def test_verify_bridged_reads_the_ports_and_loads_the_ports_program(tmp_path):
    rules = tmp_path / "physdev.rules"
    rules.write_text(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "-A FORWARD -m physdev --physdev-is-bridged --physdev-in eth0 -j DROP\nCOMMIT\n"
    )
    plain = bpflab("verify", str(rules))
    bridged = bpflab("verify", str(rules), "--bridged")
    assert plain.returncode == bridged.returncode == 0, plain.stderr + bridged.stderr
    assert len(plain.stdout.splitlines()) == 2
    lines = bridged.stdout.splitlines()
    assert len(lines) == 3 and lines[2].startswith("bridged  bpflab_bridged: accepted;")

    def instructions(line: str) -> int:
        return int(line.split("accepted; ")[1].split()[0])

    # Without a bridge the match is a constant miss; with one, it reads the ports.
    assert instructions(lines[0]) > instructions(plain.stdout.splitlines()[0])


def test_run_prints_one_json_object_per_packet_then_counters(rules_file):
    result = bpflab(
        "run",
        str(rules_file),
        "--chain",
        "INPUT",
        "--json",
        "--in",
        "eth0",
        "--packet",
        'Ether()/IP(src="198.18.0.1", dst="198.18.0.2")/TCP(dport=22, flags="S")',
        "--packet",
        'Ether()/IP(src="198.18.0.1", dst="198.18.0.2")/UDP(dport=53)/Raw(b"x"*40)',
        "--packet",
        'Ether()/IP(src="198.18.0.1", dst="198.18.0.2")/UDP(dport=53)',
        "--packet",
        'Ether()/IP(src="198.18.9.1", dst="198.18.0.2")/UDP(dport=9)',
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[:4] == [
        {"packet": 1, "verdict": "ACCEPT", "chain": "INPUT", "rule": 1},
        {"packet": 2, "verdict": "ACCEPT", "chain": "web", "rule": 2},
        {"packet": 3, "verdict": "DROP", "chain": "INPUT", "rule": None},
        {"packet": 4, "verdict": "DROP", "chain": "INPUT", "rule": None},
    ]
    counters = lines[4]["counters"]
    assert counters["INPUT"] == {
        "policy": [2, 56],
        "rules": [
            [1, 40],
            [2, 96],
        ],
    }
    assert counters["web"] == {"policy": None, "rules": [[1, 28], [1, 68]]}


@pytest.mark.parametrize(
    "spec",
    [
        '__import__("os").system("true")',
        "IP(dst=open('/etc/passwd').read())",
        "IP()/Nope()",
        "IP(",
        "IP(ttl=x)",
    ],
)
def test_run_refuses_unsafe_or_bad_packet_specs(rules_file, spec):
    result = bpflab("run", str(rules_file), "--chain", "INPUT", "--packet", spec)
    assert result.returncode == 2
    assert result.stderr.startswith("bpflab: error: --packet 1: column ")
    assert "Traceback" not in result.stderr


STATEFUL = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_run_takes_a_hosts_capture_both_ways_on_its_own_clock(tmp_path, backend):
    """With --host, what the host sends goes through OUTPUT and what it receives through
    INPUT, sharing one connection table, and the capture's timestamps are the tracker's clock:
    an answer 31 seconds after its query finds the UDP entry gone (its timeout is 30)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    host, peer = "198.18.0.2", "198.18.0.1"
    frames = []
    for when, port, source, destination in (
        (0.0, 40000, host, peer),  # a query
        (1.0, 40000, peer, host),  # its answer
        (10.0, 40001, host, peer),
        (41.0, 40001, peer, host),  # too late
    ):
        ports = (port, 53) if source == host else (53, port)
        frame = Ether() / IP(src=source, dst=destination) / UDP(sport=ports[0], dport=ports[1])
        frame.time = 1_700_000_000 + when
        frames.append(frame)
    capture = tmp_path / "dns.pcap"
    wrpcap(str(capture), frames)
    rules = tmp_path / "stateful.rules"
    rules.write_text(STATEFUL)
    result = bpflab(
        "run", str(rules), "--backend", backend, "--host", host, "--pcap", str(capture), "--json"
    )
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in result.stdout.splitlines()[:4]]
    assert verdicts == [
        {"packet": 1, "verdict": "ACCEPT", "chain": "OUTPUT", "rule": None},
        {"packet": 2, "verdict": "ACCEPT", "chain": "INPUT", "rule": 1},
        {"packet": 3, "verdict": "ACCEPT", "chain": "OUTPUT", "rule": None},
        {"packet": 4, "verdict": "DROP", "chain": "INPUT", "rule": None},
    ]
    neither = bpflab("run", str(rules), "--host", "198.18.7.7", "--pcap", str(capture))
    assert neither.returncode == 2
    assert neither.stderr == (
        "bpflab: error: packet 1 (198.18.0.2 > 198.18.0.1) is neither to nor from the host "
        "(198.18.7.7)\n"
    )
