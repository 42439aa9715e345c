"""Namespaces, topologies and the reaper on the running kernel (needs root)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2.netlink.rtnl.ndmsg import NUD_NOARP, NUD_PERMANENT
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Ether

import netns.reaper
import netns.topology
from netns import (
    CommandError,
    Endpoint,
    HostTopology,
    Namespace,
    NamespaceError,
    RouterTopology,
    reap,
)
from netns.namespace import NETNS_DIR, STATE_DIR, new_name, process_start_time

pytestmark = pytest.mark.netns

SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>; Python's socket module does not name it
ETH_P_ALL = 0x0003
RECEIVE_TIMEOUT = 2.0  # seconds
MAX_FRAMES = 100  # per capture: every receive loop is bounded in count as well as in time


def thread_netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)


def own_leftovers() -> set[str]:
    """Namespaces and state files of this process."""
    prefix = new_name().rsplit("-", 1)[0] + "-"
    return {
        name
        for directory in (NETNS_DIR, STATE_DIR)
        for name in os.listdir(directory)
        if name.startswith(prefix)
    }


def address(endpoint: Endpoint, family: int) -> str:
    interface = endpoint.ipv4 if family == socket.AF_INET else endpoint.ipv6
    assert interface is not None
    return str(interface.ip)


def capture(endpoint: Endpoint) -> socket.socket:
    """An AF_PACKET socket seeing every frame on `endpoint`, with a receive timeout."""
    sock = endpoint.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((endpoint.ifname, ETH_P_ALL))
    sock.settimeout(RECEIVE_TIMEOUT)
    return sock


def frames(sock: socket.socket) -> Iterator[Ether]:
    """Frames from `sock` until it times out, MAX_FRAMES arrived or RECEIVE_TIMEOUT passed."""
    deadline = time.monotonic() + RECEIVE_TIMEOUT
    for _ in range(MAX_FRAMES):
        if time.monotonic() > deadline:
            return
        try:
            yield Ether(sock.recv(65535))
        except TimeoutError:
            return


# --- Namespace -------------------------------------------------------------------------------


def test_namespace_exists_only_inside_its_block() -> None:
    with Namespace() as ns:
        assert ns.name in os.listdir(NETNS_DIR)
        state = json.loads(ns.state_file.read_text())
        assert state == {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}
    assert ns.name not in os.listdir(NETNS_DIR)
    assert not ns.state_file.exists()


def test_enter_moves_the_thread_and_back() -> None:
    outside = thread_netns_inode()
    with Namespace() as ns:
        with ns.enter():
            assert thread_netns_inode() == os.stat(ns.path).st_ino != outside
        assert thread_netns_inode() == outside
        with pytest.raises(RuntimeError, match="inside"), ns.enter():
            raise RuntimeError("raised inside")
        assert thread_netns_inode() == outside
    with pytest.raises(NamespaceError, match="does not exist"), ns.enter():
        pass
    assert thread_netns_inode() == outside


def test_run_captures_output_and_reports_failures() -> None:
    with Namespace() as ns:
        links = ns.run(["ip", "-o", "link", "show"]).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
        with pytest.raises(CommandError, match="exited with status 3: oops") as failure:
            ns.run(["sh", "-c", "echo oops >&2; exit 3"])
        assert failure.value.returncode == 3
        assert ns.run(["false"], check=False).returncode == 1
        with pytest.raises(CommandError, match="timed out after 0.2 s"):
            ns.run(["sleep", "5"], timeout=0.2)


def test_sysctl_changes_the_namespace_only() -> None:
    # A second namespace of ours is the witness, not the root namespace's value: other work on
    # the machine may change that one at any time.
    path = "/proc/sys/net/ipv4/ip_forward"
    with Namespace() as ns, Namespace() as other:
        other_value = other.run(["cat", path]).stdout.strip()
        wanted = "0" if other_value == "1" else "1"
        ns.sysctl("net.ipv4.ip_forward", wanted)
        assert ns.run(["cat", path]).stdout.strip() == wanted
        assert other.run(["cat", path]).stdout.strip() == other_value
        with pytest.raises(NamespaceError, match="no sysctl net.ipv4.no_such_key"):
            ns.sysctl("net.ipv4.no_such_key", 1)


def test_ifindex() -> None:
    with Namespace() as ns:
        assert ns.ifindex("lo") == 1
        with pytest.raises(NamespaceError, match=f"no interface eth9 in namespace {ns.name}"):
            ns.ifindex("eth9")


def test_socket_belongs_to_the_namespace() -> None:
    with Namespace() as ns, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outside:
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            with ns.socket(socket.AF_INET6, socket.SOCK_DGRAM) as second:
                assert netns_cookie(first) == netns_cookie(second) != netns_cookie(outside)


def test_creating_without_root_says_so() -> None:
    code = "from netns import Namespace\nwith Namespace():\n    pass\n"
    result = subprocess.run(
        [sys.executable, "-c", code],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "NamespaceError: creating network namespaces needs root" in result.stderr


# --- Topologies ------------------------------------------------------------------------------


def test_host_topology_wiring() -> None:
    with HostTopology() as topology:
        client, host = topology.client, topology.host
        assert (str(client.ipv4), str(client.ipv6)) == ("198.18.0.1/24", "fd00::1/64")
        assert (str(host.ipv4), str(host.ipv6)) == ("198.18.0.2/24", "fd00::2/64")
        assert (client.mac, host.mac) == ("02:00:c6:12:00:01", "02:00:c6:12:00:02")
        for end, peer in ((client, host), (host, client)):
            assert end.namespace.ifindex(end.ifname) == end.ifindex
            with end.namespace.ipr() as ipr:
                (link,) = ipr.link("get", index=end.ifindex)
                assert link.get("address") == end.mac
                assert link.get("operstate") == "UP"
                # NOARP entries are multicast groups (MLD), which need no resolution.
                neighbours = {
                    (entry.get("dst"), entry.get("lladdr"), entry["state"])
                    for entry in ipr.neigh("dump", ifindex=end.ifindex)
                    if entry["state"] != NUD_NOARP
                }
            assert neighbours == {
                (str(peer.ipv4.ip), peer.mac, NUD_PERMANENT),
                (str(peer.ipv6.ip), peer.mac, NUD_PERMANENT),
            }
            features = end.namespace.run(["ethtool", "-k", end.ifname]).stdout
            for feature in (
                "rx-checksumming",
                "tx-checksumming",
                "tcp-segmentation-offload",
                "generic-segmentation-offload",
                "generic-receive-offload",
            ):
                assert f"{feature}: off" in features
            tentative = end.namespace.run(["ip", "-6", "addr", "show", "tentative"]).stdout
            assert tentative == ""


def test_host_topology_without_ipv6() -> None:
    with HostTopology(ipv6=False) as topology:
        assert topology.client.ipv6 is None and topology.host.ipv6 is None
        for end in (topology.client, topology.host):
            assert end.namespace.run(["ip", "-6", "addr", "show", "dev", "eth0"]).stdout == ""


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_host_topology_carries_udp_without_address_resolution(family: int) -> None:
    with HostTopology() as topology:
        client, host = topology.client, topology.host
        with (
            capture(host) as frames_on_host,
            host.namespace.socket(family, socket.SOCK_DGRAM) as receiver,
            client.namespace.socket(family, socket.SOCK_DGRAM) as sender,
        ):
            receiver.bind((address(host, family), 0))
            receiver.settimeout(RECEIVE_TIMEOUT)
            sender.sendto(b"bpflab", (address(host, family), receiver.getsockname()[1]))
            payload, source = receiver.recvfrom(2048)
            frames_on_host.settimeout(0.1)
            seen = list(frames(frames_on_host))
    assert (payload, source[0]) == (b"bpflab", address(client, family))
    assert any(UDP in frame and frame[UDP].load == b"bpflab" for frame in seen)
    # The permanent neighbours made ARP and neighbour solicitation unnecessary.
    assert not any(ARP in frame or ICMPv6ND_NS in frame for frame in seen)


def test_router_topology_wiring() -> None:
    with RouterTopology() as topology:
        router = topology.router
        assert str(topology.client.ipv4) == "198.18.1.1/24"
        assert str(router.client_side.ipv4) == "198.18.1.254/24"
        assert str(router.server_side.ipv4) == "198.18.2.254/24"
        assert str(topology.server.ipv4) == "198.18.2.1/24"
        assert router.client_side.namespace is router.server_side.namespace is router.namespace
        assert {router.client_side.ifindex, router.server_side.ifindex} == {
            router.namespace.ifindex("eth0"),
            router.namespace.ifindex("eth1"),
        }
        for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
            value = router.namespace.run(["cat", f"/proc/sys/net/{key}"]).stdout
            assert value.strip() == "1"
        routes = topology.client.namespace.run(["ip", "route", "show", "default"]).stdout
        assert routes.startswith("default via 198.18.1.254 dev eth0")
        routes = topology.server.namespace.run(["ip", "-6", "route", "show", "default"]).stdout
        assert routes.startswith("default via fd00:2::fe dev eth0")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_router_topology_forwards_and_decrements_ttl(family: int) -> None:
    with RouterTopology() as topology:
        client, server, router = topology.client, topology.server, topology.router
        with (
            capture(server) as frames_on_server,
            server.namespace.socket(family, socket.SOCK_DGRAM) as receiver,
            client.namespace.socket(family, socket.SOCK_DGRAM) as sender,
        ):
            receiver.bind((address(server, family), 0))
            port = receiver.getsockname()[1]
            if family == socket.AF_INET:
                sender.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
            else:
                sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 64)
            sender.sendto(b"bpflab", (address(server, family), port))
            arrived = [
                frame
                for frame in frames(frames_on_server)
                if UDP in frame and frame[UDP].dport == port
            ][:1]
    assert arrived, "the datagram did not reach the server"
    (frame,) = arrived
    assert (frame.src, frame.dst) == (router.server_side.mac, server.mac)
    network = frame[IP] if family == socket.AF_INET else frame[IPv6]
    assert (network.src, network.dst) == (address(client, family), address(server, family))
    assert (network.ttl if family == socket.AF_INET else network.hlim) == 63


def test_topology_that_fails_to_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    create_veth_pair = netns.topology.create_veth_pair
    calls = []

    def fail_on_second_pair(*ends: object) -> object:
        calls.append(ends)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return create_veth_pair(*ends)

    monkeypatch.setattr(netns.topology, "create_veth_pair", fail_on_second_pair)
    before = own_leftovers()
    with pytest.raises(RuntimeError, match="injected failure"), RouterTopology():
        pass
    assert len(calls) == 2
    assert own_leftovers() == before


# --- Reaper ----------------------------------------------------------------------------------

# Reapers remove every dead owner's namespaces, other tests' included: these tests run on one
# pytest-xdist worker (`--dist loadgroup`), one after the other.
REAPER = pytest.mark.xdist_group("reaper")


def dead_owner() -> dict[str, int]:
    """The state of an owner that has exited: a process this test started and waited for."""
    process = subprocess.Popen(["true"])
    start_time = process_start_time(process.pid)  # readable until waited for (a zombie)
    assert process.wait(timeout=10) == 0
    assert start_time is not None and process_start_time(process.pid) is None
    return {"pid": process.pid, "start_time": start_time}


@REAPER
def test_reap_removes_namespaces_of_dead_owners_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The owners this test makes up are shown to this reaper only: any other reaper on the
    # machine (a `bpflab cleanup` outside this run) would rightly remove a dead owner's
    # namespace first, and this one would not report it. The namespaces and pins are real.
    owners = tmp_path / "owners"
    owners.mkdir()
    monkeypatch.setattr(netns.reaper, "STATE_DIR", owners)
    with Namespace() as live, Namespace() as dead, Namespace() as reused:
        (owners / live.name).write_text(live.state_file.read_text())
        (owners / dead.name).write_text(json.dumps(dead_owner()))
        # A live pid started at another time: the owner died and its pid was reused.
        reused_state = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()) - 1}
        (owners / reused.name).write_text(json.dumps(reused_state))
        if os.path.ismount("/sys/fs/bpf"):
            (dead.pin_dir / "tc" / "globals").mkdir(parents=True)

        removed = reap()

        assert dead.name in removed and reused.name in removed
        assert live.name not in removed
        for gone in (dead, reused):
            assert gone.name not in os.listdir(NETNS_DIR)
            assert not (owners / gone.name).exists()
        assert not dead.pin_dir.exists()
        assert live.name in os.listdir(NETNS_DIR) and (owners / live.name).exists()


@REAPER
def test_reap_removes_namespaces_without_state_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with Namespace() as orphan:
        orphan.state_file.unlink()
        assert orphan.name not in reap()
        assert orphan.name in os.listdir(NETNS_DIR)

        # Other `bl` namespaces without state may exist on this machine and are not this
        # test's to remove: show the reaper a listing that holds only this one.
        listing = tmp_path / "netns"
        listing.mkdir()
        (listing / orphan.name).touch()
        monkeypatch.setattr(netns.reaper, "NETNS_DIR", listing)
        assert orphan.name in reap(orphans=True)
        assert orphan.name not in os.listdir(NETNS_DIR)
