"""`bpflab log` on a bridge host against the kernel's own LOG target with br_netfilter: two
bridge labs (netns.bridge), one filtering with iptables-legacy and `bridge-nf-call-iptables`
on, one with our programs attached; the same packets, sent from raw sockets of the same nodes
in both, must log the same lines in the same order. A packet a bridge hands to iptables names
its ports after the devices (PHYSIN= to the bridge host and routed on, PHYSIN= and PHYSOUT=
from port to port); one routed towards the bridge or sent by the host names none. The rule
sets log with and without -m physdev rules of their own: LOG alone needs the ports.

Shares the kernel log's reader, its unique prefix and the host-wide nf_log_all_netns switch
(and its lock) with tests/net/test_log_vs_netfilter.py, in the same xdist group."""

from __future__ import annotations

import os
import re
import socket
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from harness.deploy.lifecycle import apply, flush
from harness.lab.traffic import restore
from harness.lab.twin import quiet_host
from netns.bridge import BRIDGE, CLIENTS, SERVER, BridgeTopology
from tests.net.test_bridge_vs_netfilter import _namespace
from tests.net.test_log_vs_netfilter import (  # noqa: F401 (a fixture)
    OPTIONS,
    TAG,
    KernelLog,
    _both_logs,
    kernel_logs_every_namespace,
)

pytestmark = [pytest.mark.netns, pytest.mark.privileged, pytest.mark.xdist_group("nf_log")]

if not Path("/proc/sys/net/bridge").exists():
    pytest.skip("this kernel has no br_netfilter", allow_module_level=True)

LOGS = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i br0 -j LOG --log-prefix "{TAG}i: "
-A FORWARD -j LOG --log-prefix "{TAG}f: " --log-macdecode
-A FORWARD -p tcp -j LOG --log-prefix "{TAG}t: " --log-level 3 --log-tcp-options
-A OUTPUT -o br0 -j LOG --log-prefix "{TAG}o: "
COMMIT
"""
# The same with physdev rules of its own, logging by port.
PHYSDEV = LOGS.replace(
    "COMMIT",
    f'-A FORWARD -m physdev --physdev-is-bridged -j LOG --log-prefix "{TAG}b: "\n'
    f'-A INPUT -m physdev --physdev-in port2 -j LOG --log-prefix "{TAG}p: "\n'
    "COMMIT",
)

C1, C2, HOST, SRV = (str(a.ip) for a in (CLIENTS[0], CLIENTS[1], BRIDGE, SERVER))
# (name, the sending node, the IP packet, the prefixes its lines must carry)
CASES = [
    ("bridged udp", "client1", IP(src=C1, dst=C2, id=61) / UDP(sport=61, dport=62) / b"b", "f"),
    (
        "bridged tcp the other way",
        "client2",
        IP(src=C2, dst=C1, id=62) / TCP(sport=63, dport=64, flags="S", options=OPTIONS),
        "ft",
    ),
    ("to the bridge host", "client1", IP(src=C1, dst=HOST, id=63) / UDP(sport=1, dport=2), "i"),
    ("from the other port", "client2", IP(src=C2, dst=HOST, id=64) / UDP(sport=3, dport=4), "i"),
    ("routed out", "client2", IP(src=C2, dst=SRV, id=65, ttl=9) / UDP(sport=5, dport=6), "f"),
    ("routed to the bridge", "server", IP(src=SRV, dst=C1, id=66) / UDP(sport=7, dport=8), "f"),
    ("from the host", "host", IP(src=HOST, dst=C2, id=67) / UDP(sport=9, dport=10), "o"),
]


def _send(lab: BridgeTopology, node: str, packet: bytes) -> None:
    with closing(_namespace(lab, node).socket(socket.AF_INET, socket.SOCK_RAW, 255)) as raw:
        raw.sendto(packet, (str(IP(packet).dst), 0))


@pytest.mark.parametrize("text", [LOGS, PHYSDEV], ids=["log-alone", "with-physdev"])
@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_bridged_lines_name_the_ports_as_the_kernels_do(
    kernel_logs_every_namespace: None,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    backend: str,
    text: str,
) -> None:
    with ExitStack() as stack:
        kernel_log = KernelLog()
        stack.callback(kernel_log.close)
        ours = stack.enter_context(BridgeTopology())
        twin = stack.enter_context(BridgeTopology())
        for lab in (ours, twin):
            for node in ("client1", "client2", "host", "server"):
                restore(_namespace(lab, node), quiet_host(os.geteuid()))
        restore(twin.host, text)
        apply(text, "bridge-log.rules", ours.host.name, backend=backend)
        stack.callback(flush, ours.host.name)
        kernel_log.read()
        failures, ports, fired = [], set(), set()
        for name, node, layer, prefixes in CASES:
            packet = bytes(layer)
            _send(twin, node, packet)
            _send(ours, node, packet)
            kernel, mine = _both_logs(kernel_log, ours.host.name, capsys)
            kinds = {line.split(":")[0][len(TAG) + 3 :] for line in kernel}
            fired |= kinds
            if not set(prefixes) <= kinds:
                failures.append(f"{name}: the kernel logged {kernel}, not all of {prefixes}")
            if kernel != mine:
                failures.append(f"{name}:\n  kernel {kernel}\n  ours   {mine}")
            ports |= {word for line in kernel for word in line.split() if word.startswith("PHYS")}
    assert not failures, "\n".join(failures)
    assert fired == set(re.findall(f"{TAG}(.): ", text)), fired  # every LOG rule had its say
    # Every kind of port the kernel names was seen, so the comparison covered them.
    assert ports >= {"PHYSIN=port1", "PHYSIN=port2", "PHYSOUT=port1", "PHYSOUT=port2"}, ports
