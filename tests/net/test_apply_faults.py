"""Issue 16, part 3: `bpflab apply` SIGKILLed at each step leaves the old rule set or the new
one running, whole, with counters that add up, and the next command needs no manual step."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codegen.bpf.info import _get, program_info
from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import close
from harness.deploy import state
from harness.exec.supervisor import LOCK_ROOT
from netns import HostTopology
from netns.namespace import NETNS_DIR, PIN_ROOT, format_name
from tests.net.test_cli_lifecycle import bpflab
from tests.net.test_tc_attached import rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

OLD = rules(
    "-A INPUT -p udp -m udp --dport 5300 -j DROP",
    "-A INPUT -p udp -m udp --dport 5301 -j ACCEPT",
)
NEW = rules(
    "-A INPUT -p udp -m udp --dport 5301 -j ACCEPT",
    "-A INPUT -p udp -m udp --dport 5302 -j DROP",
)


class _LinkInfo(ctypes.Structure):
    """The head of struct bpf_link_info (UAPI): enough for the attached program's id."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 64),
    ]


def _pinned_id(path: str, link: bool) -> int:
    fd = get_pinned(path)
    try:
        if not link:
            return program_info(fd).id
        info = _LinkInfo()
        _get(fd, info, f"reading the info of {path}")
        return info.prog_id
    finally:
        close(fd)


def _rules_and_packets(listing: str) -> list[tuple[str, str, int]]:
    """(target, port, packets) of each rule in `bpflab list -v` output."""
    found = []
    for line in listing.splitlines():
        words = line.split()
        if words and words[0].isdigit() and "udp" in words:
            found.append((words[2], words[-1].removeprefix("dpt:"), int(words[0])))
    return found


def _killed_apply(path, ns: str, point: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "apply", str(path), "--netns", ns],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, state.FAULT: point},
    )


@pytest.mark.parametrize(
    "point, survivor",
    [
        ("after-compile", "old"),
        ("during-carry", "old"),
        ("between-hooks", "new"),  # ingress switched, egress not: the next command finishes
        ("after-pinning-maps", "new"),
    ],
)
def test_sigkill_of_apply_leaves_one_rule_set_whole(tmp_path, point, survivor):
    assert point in state.FAULT_POINTS
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(OLD)
    new.write_text(NEW)
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            first = bpflab("apply", str(old), "--netns", ns)
            assert first.returncode == 0, first.stderr
            assert udp_exchange(topology.client, topology.host, [5300, 5301], count=2) == {
                5300: 0,
                5301: 2,
            }
            killed = _killed_apply(new, ns, point)
            assert killed.returncode == -signal.SIGKILL, killed.stderr

            listed = bpflab("list", "-v", "--netns", ns)  # the next command, as a user runs it
            assert listed.returncode == 0, listed.stderr
            expected = {  # after NEW: the ACCEPT rule's counters carried over, DROP's from zero
                "old": [("DROP", "5300", 2), ("ACCEPT", "5301", 2)],
                "new": [("ACCEPT", "5301", 2), ("DROP", "5302", 0)],
            }
            assert _rules_and_packets(listed.stdout) == expected[survivor]
            assert not state.journal_file(ns).exists()
            pins = PIN_ROOT / ns
            for direction in ("ingress", "egress"):  # both hooks run the programs pinned
                assert _pinned_id(str(pins / f"link_eth0_{direction}"), link=True) == _pinned_id(
                    str(pins / f"prog_{direction}"), link=False
                ), direction

            arrived = udp_exchange(topology.client, topology.host, [5300, 5301, 5302])
            listed = bpflab("list", "-v", "--netns", ns).stdout
            if survivor == "old":
                assert arrived == {5300: 0, 5301: 1, 5302: 1}
                assert _rules_and_packets(listed) == [("DROP", "5300", 3), ("ACCEPT", "5301", 3)]
            else:
                assert arrived == {5300: 1, 5301: 1, 5302: 0}
                assert _rules_and_packets(listed) == [("ACCEPT", "5301", 3), ("DROP", "5302", 1)]

            again = bpflab("apply", str(new), "--netns", ns)  # and the next apply just works
            assert again.returncode == 0, again.stderr
            assert "replaced on eth0" in again.stdout
            carried = 2 if survivor == "new" else 1
            assert f"counters of {carried} unchanged rules carried over" in again.stdout
            listed = bpflab("list", "-v", "--netns", ns).stdout
            assert _rules_and_packets(listed)[0] == ("ACCEPT", "5301", 3)
            assert bpflab("flush", "--netns", ns).returncode == 0
        finally:
            state.state_file(ns).unlink(missing_ok=True)
            state.journal_file(ns).unlink(missing_ok=True)


@pytest.mark.parametrize("point", state.FAULT_POINTS)
def test_an_apply_after_a_killed_one_applies_whole(tmp_path, point):
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(OLD)
    new.write_text(NEW)
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            assert bpflab("apply", str(old), "--netns", ns).returncode == 0
            assert udp_exchange(topology.client, topology.host, [5301], count=2) == {5301: 2}
            assert _killed_apply(new, ns, point).returncode == -signal.SIGKILL
            again = bpflab("apply", str(new), "--netns", ns)
            assert again.returncode == 0, again.stderr
            # the killed apply finished first where it had switched a hook, then this one
            carried = 1 if point in ("after-compile", "during-carry") else 2
            assert again.stdout.endswith(
                f"replaced on eth0 in namespace {ns}; counters of {carried} unchanged rules "
                "carried over\n"
            )
            assert not state.journal_file(ns).exists()
            pins = PIN_ROOT / ns
            for direction in ("ingress", "egress"):
                assert _pinned_id(str(pins / f"link_eth0_{direction}"), link=True) == _pinned_id(
                    str(pins / f"prog_{direction}"), link=False
                ), direction
            assert udp_exchange(topology.client, topology.host, [5300, 5301, 5302]) == {
                5300: 1,
                5301: 1,
                5302: 0,
            }
            listed = bpflab("list", "-v", "--netns", ns).stdout
            assert _rules_and_packets(listed) == [("ACCEPT", "5301", 3), ("DROP", "5302", 1)]
            assert bpflab("flush", "--netns", ns).returncode == 0
        finally:
            state.state_file(ns).unlink(missing_ok=True)
            state.journal_file(ns).unlink(missing_ok=True)


@pytest.mark.exec
def test_sigkill_of_exec_between_hooks_is_finished_by_the_next_command(tmp_path):
    """`bpflab exec` SIGKILLed in its SET_REPLACE's apply: iptables fails, and the next
    command (here iptables itself under exec) sees the new table, running whole."""
    lock = tmp_path / "xtables.lock"
    lock.touch()
    env = {**os.environ, "XTABLES_LOCKFILE": str(lock)}
    add = ("iptables-legacy", "-w", "-A", "INPUT", "-p", "udp", "--dport", "5300", "-j", "DROP")
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            killed = subprocess.run(
                [sys.executable, "-m", "harness.cli", "exec", "--netns", ns, "--", *add],
                capture_output=True,
                text=True,
                timeout=120,
                env={**env, state.FAULT: "between-hooks"},
            )
            assert killed.returncode != 0
            assert state.journal_file(ns).exists()  # killed between its journal and commit
            listed = subprocess.run(
                [sys.executable, "-m", "harness.cli", "exec", "--netns", ns, "--"]
                + ["iptables-legacy", "-w", "-S", "INPUT"],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.splitlines() == [
                "-P INPUT ACCEPT",
                "-A INPUT -p udp -m udp --dport 5300 -j DROP",
            ]
            assert not state.journal_file(ns).exists()
            pins = PIN_ROOT / ns
            for direction in ("ingress", "egress"):
                assert _pinned_id(str(pins / f"link_eth0_{direction}"), link=True) == _pinned_id(
                    str(pins / f"prog_{direction}"), link=False
                ), direction
            assert udp_exchange(topology.client, topology.host, [5300, 5301]) == {
                5300: 0,
                5301: 1,
            }
            assert bpflab("flush", "--netns", ns).returncode == 0
        finally:
            state.state_file(ns).unlink(missing_ok=True)
            state.journal_file(ns).unlink(missing_ok=True)
            for suffix in (".lock", ".table"):
                (LOCK_ROOT / f"{ns}{suffix}").unlink(missing_ok=True)


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"


@pytest.mark.xdist_group("reaper")  # its `bpflab cleanup` beside no other
def test_sigkill_of_replay_is_undone_by_the_next_cleanup():
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_XDIST_WORKER"}
    child = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "replay", str(EXAMPLE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    prefix = format_name(child.pid, None, 0).removesuffix("0")  # its namespaces' names

    def applied() -> list[Path]:
        return sorted(state.STATE_ROOT.glob(f"{prefix}*.json"))

    try:
        deadline = time.monotonic() + 60
        while not applied() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert applied(), "the replay ended (or took a minute) before its rules were applied"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    names = {path.stem for path in applied()}
    assert names and all((NETNS_DIR / name).exists() for name in names)  # left behind
    cleaned = bpflab("cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    for name in names:
        assert f"removed {name}" in cleaned.stdout.splitlines()
        assert not (NETNS_DIR / name).exists()
        assert not (PIN_ROOT / name).exists()
        assert not state.state_file(name).exists()
    assert not [name for name in os.listdir(NETNS_DIR) if name.startswith(prefix)]
    again = subprocess.run(
        [sys.executable, "-m", "harness.cli", "replay", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr


# A run the classifier answers with a tree (64 rules and more), then a rule of it replaced.
RUN = [f"-A INPUT -p udp -m udp --dport {6000 + i} -j DROP" for i in range(80)]
PATCHED = [*RUN[:40], "-A INPUT -p udp -m udp --dport 5302 -j DROP", *RUN[41:]]


def test_a_patch_killed_before_its_commit_is_applied_whole_by_the_next_command(tmp_path):
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(rules(*RUN))
    new.write_text(rules(*PATCHED))
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        pins = PIN_ROOT / ns
        try:
            assert bpflab("apply", str(old), "--netns", ns).returncode == 0
            program = _pinned_id(str(pins / "prog_ingress"), link=False)
            patched = bpflab("apply", str(new), "--netns", ns)  # a patch, whole: the CLI says so
            assert "1 changed rules replaced in the maps of the programs running" in patched.stdout
            assert _pinned_id(str(pins / "prog_ingress"), link=False) == program
            assert udp_exchange(topology.client, topology.host, [5302, 5303]) == {5302: 0, 5303: 1}
            assert bpflab("apply", str(old), "--netns", ns).returncode == 0  # patched back
            assert _killed_apply(new, ns, state.PATCH_FAULT).returncode == -signal.SIGKILL
            assert state.journal_file(ns).exists()  # its maps written, not committed
            listed = bpflab("list", "--netns", ns)
            assert "completed an apply that was killed" in listed.stderr
            assert not state.journal_file(ns).exists()
            assert "--dport 5302" in bpflab("save", "--netns", ns).stdout
            assert _pinned_id(str(pins / "prog_ingress"), link=False) != program  # whole
            assert udp_exchange(topology.client, topology.host, [5302, 5303]) == {5302: 0, 5303: 1}
            assert bpflab("flush", "--netns", ns).returncode == 0
        finally:
            state.state_file(ns).unlink(missing_ok=True)
            state.journal_file(ns).unlink(missing_ok=True)
