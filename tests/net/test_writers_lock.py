"""One writer at a time per namespace (harness.deploy.locking): `bpflab apply` waits while
another process holds the namespace's lock (as `bpflab exec` does around a table replace) and
goes on, whole, once it is let go; a process that holds the lock applies without waiting for
itself."""

from __future__ import annotations

import subprocess
import sys
import time
from multiprocessing import Event, Process

import pytest

from harness.deploy.lifecycle import apply, flush, read_state
from harness.deploy.locking import namespace_lock
from netns import HostTopology
from tests.net.test_tc_attached import rules

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = rules("-A INPUT -p udp -m udp --dport 5301 -j ACCEPT")
HELD_FOR = 2.0  # seconds the other writer keeps the lock


def _hold(netns: str, taken, release) -> None:
    with namespace_lock(netns):
        taken.set()
        release.wait(30)


def test_apply_waits_for_the_namespaces_other_writer(tmp_path):
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    with HostTopology(ipv6=False) as topology:
        netns = topology.host.namespace.name
        taken, release = Event(), Event()
        holder = Process(target=_hold, args=(netns, taken, release))
        holder.start()
        try:
            assert taken.wait(10), "the holder never took the lock"
            started = time.monotonic()
            waiting = subprocess.Popen(
                [sys.executable, "-m", "harness.cli", "apply", str(path), "--netns", netns],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(HELD_FOR)
            assert waiting.poll() is None, "apply went on while another writer held the lock"
            assert read_state(netns) is None
            release.set()
            _, errors = waiting.communicate(timeout=60)
            assert waiting.returncode == 0, errors
            assert time.monotonic() - started >= HELD_FOR
            assert read_state(netns) is not None
        finally:
            release.set()
            holder.join(10)
            flush(netns)


def test_a_holder_of_the_lock_applies_without_waiting_for_itself():
    with HostTopology(ipv6=False) as topology:
        netns = topology.host.namespace.name
        try:
            started = time.monotonic()
            with namespace_lock(netns):
                apply(RULES, "held.rules", netns)
                assert read_state(netns) is not None
            assert time.monotonic() - started < 30  # far below the lock's 60 s wait
        finally:
            flush(netns)
