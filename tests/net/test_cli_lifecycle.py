"""apply, list, save and flush from separate processes, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from netns import HostTopology
from tests.net.test_tc_attached import UDP_IP_LENGTH, rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]


def bpflab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_apply_list_save_flush(tmp_path):
    first = tmp_path / "first.rules"
    first.write_text(
        rules(
            "-A INPUT -p udp -m udp --dport 5300 -j DROP",
            "-A INPUT -p udp -m udp --dport 5301 -j ACCEPT",
        )
    )
    second = tmp_path / "second.rules"
    second.write_text(
        rules(
            "-A INPUT -p udp -m udp --dport 5301 -j ACCEPT",
            "-A INPUT -p udp -m udp --dport 5302 -j DROP",
        )
    )
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        applied = bpflab("apply", str(first), "--netns", ns)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.endswith(f"attached on eth0 in namespace {ns}\n")
        assert udp_exchange(topology.client, topology.host, [5300, 5301], count=2) == {
            5300: 0,
            5301: 2,
        }
        listed = bpflab("list", "-v", "--netns", ns)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0] == "Chain INPUT (policy ACCEPT 0 packets, 0 bytes)"
        assert lines[2].split()[:4] == ["2", str(2 * UDP_IP_LENGTH), "DROP", "17"]
        assert lines[3].split()[:4] == ["2", str(2 * UDP_IP_LENGTH), "ACCEPT", "17"]

        again = bpflab("apply", str(second), "--netns", ns)
        assert again.returncode == 0, again.stderr
        assert (
            "replaced on eth0" in again.stdout and "counters of 1 unchanged rules" in again.stdout
        )
        saved = bpflab("save", "-c", "--netns", ns)
        assert saved.returncode == 0, saved.stderr
        assert f"[2:{2 * UDP_IP_LENGTH}] -A INPUT -p udp -m udp --dport 5301 -j ACCEPT" in (
            saved.stdout
        )
        assert "[0:0] -A INPUT -p udp -m udp --dport 5302 -j DROP" in saved.stdout
        assert udp_exchange(topology.client, topology.host, [5300, 5302]) == {5300: 1, 5302: 0}

        flushed = bpflab("flush", "--netns", ns)
        assert flushed.returncode == 0, flushed.stderr
        assert udp_exchange(topology.client, topology.host, [5302]) == {5302: 1}
        gone = bpflab("list", "--netns", ns)
        assert gone.returncode == 2
        assert gone.stderr == f"bpflab: error: no rule set is applied in namespace {ns}\n"


def test_missing_namespace_and_device_are_one_sentence(tmp_path):
    path = tmp_path / "r.rules"
    path.write_text(rules())
    result = bpflab("apply", str(path), "--netns", "blnosuchns")
    assert result.returncode == 2
    assert result.stderr == (
        "bpflab: error: network namespace 'blnosuchns' does not exist (see `ip netns list`)\n"
    )
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        result = bpflab("apply", str(path), "--netns", ns, "--dev", "eth9")
        assert result.returncode == 2
        assert result.stderr.startswith(f"bpflab: error: no device eth9 in namespace {ns}")
        assert bpflab("list", "--netns", ns).returncode == 2  # nothing was applied
