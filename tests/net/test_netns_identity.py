"""Issue 16, parts 1 and 2: a rule set's state belongs to one kernel namespace, not to a name;
`bpflab cleanup` and `bpflab doctor` find what namespaces that are gone left behind."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time

import pytest

from codegen.bpf.info import map_info
from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import close
from harness.deploy import identity, leftovers, lifecycle, state
from harness.deploy.locking import LOCK_ROOT, lock_path, table_path
from netns import HostTopology, Namespace, VethEnd, create_veth_pair, prepare_namespace
from netns.namespace import PIN_ROOT, new_name, remove_namespace
from tests.net.test_cli_lifecycle import bpflab
from tests.net.test_tc_attached import UDP_IP_LENGTH, rules, udp_exchange

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = rules(
    "-A INPUT -p udp -m udp --dport 5300 -j DROP",
    "-A INPUT -p udp -m udp --dport 5301 -j ACCEPT",
)
GONE_WAIT = 10.0  # seconds a dead namespace's devices may take to go (cleanup_net is async)


def _counters_map_id(netns: str) -> int:
    fd = get_pinned(str(PIN_ROOT / netns / "counters"))
    try:
        return map_info(fd).id
    finally:
        close(fd)


def _packets(listing: str) -> list[int]:
    """The packet counts of the rules (not the policies) of `bpflab list -v` output."""
    return [
        int(line.split()[0])
        for line in listing.splitlines()
        if line and line.split()[0].isdigit() and "udp" in line
    ]


def _wait_gone(namespace: Namespace, ifname: str) -> None:
    deadline = time.monotonic() + GONE_WAIT
    while time.monotonic() < deadline:
        with namespace.ipr() as ipr:
            if not ipr.link_lookup(ifname=ifname):
                return
        time.sleep(0.05)
    raise AssertionError(f"{ifname} in {namespace.name} outlived its peer's namespace")


def _recreate_host(topology: HostTopology):
    """`ip netns del` the host's namespace, `ip netns add` it again under the same name and
    link it to the client as before; the new host end."""
    name = topology.host.namespace.name
    subprocess.run(["ip", "netns", "del", name], check=True, timeout=30)
    _wait_gone(topology.client.namespace, "eth0")
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    host = Namespace.existing(name)
    prepare_namespace(host, ipv6=False)
    client, new_host = create_veth_pair(
        VethEnd(topology.client.namespace, "eth0", topology.client.ipv4),
        VethEnd(host, "eth0", topology.host.ipv4),
    )
    return client, new_host


def test_a_namespace_made_again_under_its_name_starts_fresh(tmp_path):
    """The issue's reproduction: apply, `ip netns del`, `ip netns add` the same name, apply
    again: it succeeds, says the old state was a gone namespace's, counters start at zero and
    the old pins are gone."""
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            first = bpflab("apply", str(path), "--netns", ns)
            assert first.returncode == 0, first.stderr
            assert udp_exchange(topology.client, topology.host, [5300, 5301], count=2) == {
                5300: 0,
                5301: 2,
            }
            assert _packets(bpflab("list", "-v", "--netns", ns).stdout) == [2, 2]
            old_identity = identity.pinned(PIN_ROOT / ns)
            assert old_identity == identity.of(ns)
            assert lifecycle.read_state(ns)["identity"] == old_identity.to_json()
            old_map = _counters_map_id(ns)

            client, host = _recreate_host(topology)
            assert (PIN_ROOT / ns / "link_eth0_ingress").exists()  # the old pins stayed
            for command in ("list", "save"):
                refused = bpflab(command, "--netns", ns)
                assert refused.returncode == 2, command
                assert refused.stderr == (
                    f"bpflab: error: no rule set is applied in namespace {ns}\n"
                ), command

            again = bpflab("apply", str(path), "--netns", ns)
            assert again.returncode == 0, again.stderr
            assert again.stderr == (
                f"bpflab: the rule set state under the name {ns} belonged to a namespace that "
                "is gone: removed it and started fresh\n"
            )
            assert again.stdout.endswith(f"attached on eth0 in namespace {ns}\n")
            assert identity.pinned(PIN_ROOT / ns) == identity.of(ns) != old_identity
            assert _counters_map_id(ns) != old_map
            assert _packets(bpflab("list", "-v", "--netns", ns).stdout) == [0, 0]
            assert udp_exchange(client, host, [5300, 5301]) == {5300: 0, 5301: 1}
            listed = bpflab("list", "-v", "--netns", ns).stdout
            assert _packets(listed) == [1, 1]
            assert f" {UDP_IP_LENGTH} ACCEPT " in listed
            assert bpflab("flush", "--netns", ns).returncode == 0
        finally:
            state.state_file(ns).unlink(missing_ok=True)


def test_flush_in_a_namespace_made_again_removes_the_old_state_without_detaching(tmp_path):
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            assert bpflab("apply", str(path), "--netns", ns).returncode == 0
            _recreate_host(topology)
            flushed = bpflab("flush", "--netns", ns)
            assert flushed.returncode == 2
            assert flushed.stderr == (
                f"bpflab: error: no rule set is applied in namespace {ns} (what was left "
                "under that name belonged to a namespace that is gone, and was removed)\n"
            )
            assert not (PIN_ROOT / ns).exists()
            assert not state.state_file(ns).exists()
            again = bpflab("flush", "--netns", ns)
            assert again.returncode == 2  # nothing left, nothing applied
        finally:
            state.state_file(ns).unlink(missing_ok=True)


def test_state_without_an_identity_is_the_namespaces_while_its_name_exists(tmp_path):
    """State written by an older version (no identity) keeps today's behaviour in a namespace
    of its name, and is stale once the name is gone."""
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    with HostTopology(ipv6=False) as topology:
        ns = topology.host.namespace.name
        try:
            assert bpflab("apply", str(path), "--netns", ns).returncode == 0
            state_file = state.state_file(ns)
            saved = json.loads(state_file.read_text())
            del saved["identity"]
            state_file.write_text(json.dumps(saved))
            (PIN_ROOT / ns / identity.PIN_NAME).unlink()
            listed = bpflab("list", "--netns", ns)
            assert listed.returncode == 0, listed.stderr
            assert ns not in [leftover.name for leftover in leftovers.find()]
            again = bpflab("apply", str(path), "--netns", ns)
            assert again.returncode == 0 and again.stderr == "", again.stderr
            assert "replaced on eth0" in again.stdout
        finally:
            state.state_file(ns).unlink(missing_ok=True)
    # The topology removed the namespace and its pins; an old state file left alone is stale.
    state_file.write_text(json.dumps(saved))
    try:
        assert lifecycle.read_state(ns) is None
        assert identity.gone(ns, saved, PIN_ROOT / ns) == "no longer exists"
    finally:
        state_file.unlink(missing_ok=True)


class _Unowned:
    """A namespace made by hand (`ip netns add`, as a user does: no owner record, so the reaper
    leaves it), with one veth pair inside so that rules can be applied; removed at the end."""

    def __init__(self) -> None:
        self.name = new_name()

    def __enter__(self) -> _Unowned:
        self.create()
        return self

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        for command in (
            ["link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
            ["link", "set", "veth0", "up"],
            ["link", "set", "veth1", "up"],
        ):
            subprocess.run(["ip", "-n", self.name, *command], check=True, timeout=30)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=True, timeout=30)

    def __exit__(self, *exc: object) -> None:
        remove_namespace(self.name)
        state.remove_stale(self.name)
        for suffix in (".lock", ".table"):
            (LOCK_ROOT / f"{self.name}{suffix}").unlink(missing_ok=True)


@pytest.mark.xdist_group("reaper")  # beside no other `bpflab cleanup`, which would race ours
def test_cleanup_removes_what_gone_namespaces_left_and_leaves_live_ones(tmp_path):
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    with _Unowned() as gone, _Unowned() as remade, _Unowned() as live, _Unowned() as locked:
        for namespace in (gone, remade, live, locked):
            applied = bpflab("apply", str(path), "--netns", namespace.name)
            assert applied.returncode == 0, applied.stderr
        pins = {
            namespace.name: len(list((PIN_ROOT / namespace.name).iterdir()))
            for namespace in (gone, remade, locked)
        }
        assert all(count >= 8 for count in pins.values())  # 4 links, 2 programs, 2 maps
        LOCK_ROOT.mkdir(parents=True, exist_ok=True)
        (LOCK_ROOT / f"{gone.name}.lock").touch()
        (LOCK_ROOT / f"{gone.name}.table").write_text("{}")
        held = os.open(LOCK_ROOT / f"{locked.name}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
            gone.delete()
            remade.delete()
            remade.create()
            locked.delete()

            doctor = bpflab("doctor")
            warning = [line for line in doctor.stdout.splitlines() if line.startswith("leftovers")]
            assert len(warning) == 1 and warning[0].startswith("leftovers  warning: ")
            assert " left pins or state (" in warning[0]
            assert warning[0].endswith("): run `bpflab cleanup`")
            found = {leftover.name: leftover.why for leftover in leftovers.find()}
            assert found[gone.name] == "no longer exists"
            assert found[remade.name] == "is now another namespace"
            assert found[locked.name] == "no longer exists"
            assert live.name not in found

            cleaned = bpflab("cleanup")
            assert cleaned.returncode == 0, cleaned.stderr
            lines = cleaned.stdout.splitlines()
            # each one's pins and state file; the writers' lock (every apply takes it) and
            # exec's table where not held
            assert (
                f"removed what namespace {gone.name} left ({pins[gone.name] + 3} pins and state "
                "files): it no longer exists" in lines
            )
            assert (
                f"removed what namespace {remade.name} left ({pins[remade.name] + 2} pins and "
                "state files): it is now another namespace" in lines
            )
            assert (
                f"removed what namespace {locked.name} left ({pins[locked.name] + 1} pins and "
                "state files): it no longer exists" in lines
            )
            assert not any(live.name in line for line in lines)
            for namespace in (gone, remade, locked):
                assert not (PIN_ROOT / namespace.name).exists()
                assert not state.state_file(namespace.name).exists()
            assert not (LOCK_ROOT / f"{gone.name}.lock").exists()
            assert not (LOCK_ROOT / f"{gone.name}.table").exists()
            assert (LOCK_ROOT / f"{locked.name}.lock").exists()  # held: left alone
            assert os.path.exists(f"/run/netns/{remade.name}")  # the namespace is not ours
            assert bpflab("list", "--netns", live.name).returncode == 0
            assert (PIN_ROOT / live.name / identity.PIN_NAME).exists()
            again = bpflab("apply", str(path), "--netns", remade.name)
            assert again.returncode == 0 and again.stderr == "", again.stderr
            second = bpflab("cleanup").stdout
            assert not any(
                name in second for name in (gone.name, remade.name, live.name, locked.name)
            )
        finally:
            os.close(held)


def _kept_under(name: str) -> list[str]:
    paths = [
        PIN_ROOT / name,
        state.state_file(name),
        state.journal_file(name),
        lock_path(name),
        table_path(name),
    ]
    return [str(path) for path in paths if path.exists()]


def test_a_lab_namespace_takes_its_rule_sets_state_with_it(tmp_path):
    """Leaving a Namespace block removes what bpflab keeps under its name, as flush would,
    so that a test that fails half-way (or never flushes) leaves nothing for cleanup."""
    with Namespace() as ns:
        lifecycle.apply(RULES, "r.rules", ns.name)
        added = bpflab(
            "exec", "--netns", ns.name, "--",
            "iptables-legacy", "-w", "-A", "INPUT", "-p", "tcp", "-j", "ACCEPT",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        kept = _kept_under(ns.name)
        assert len(kept) == 4 and str(state.journal_file(ns.name)) not in kept, kept
    assert _kept_under(ns.name) == []


def test_a_command_for_a_namespace_that_does_not_exist_leaves_no_lock(tmp_path):
    path = tmp_path / "r.rules"
    path.write_text(RULES)
    name = new_name()  # a name of ours that no namespace holds
    for command in (["apply", str(path), "--netns", name], ["flush", "--netns", name]):
        refused = bpflab(*command)
        assert refused.returncode == 2 and name in refused.stderr, refused.stderr
        assert _kept_under(name) == []
