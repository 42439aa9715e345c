"""Bridge ports in `bpflab apply`: a port gets the port programs (the frame's stamp on ingress,
bridged FORWARD on egress), every other device the routed pair; a device enslaved after an
apply gets the port programs at the next one, in place. With br_netfilter off in the
namespace, netfilter filters no bridged packet and sees no port: the programs pass bridged
traffic whatever FORWARD says, and -m physdev holds only where every option is negated, as
the twin lab shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.bpf.info import linked_program, program_info
from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import close
from harness.deploy.lifecycle import PIN_ROOT, flush
from netns.bridge import BridgeTopology
from netns.namespace import Namespace
from tests.net.test_bridge_vs_netfilter import _case, quiet
from tests.net.test_cli_lifecycle import bpflab

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m physdev --physdev-is-bridged -j DROP
-A FORWARD -m physdev ! --physdev-is-in
-A FORWARD -i br0 -o eth1 -j ACCEPT
-A FORWARD -i eth1 -o br0 -j ACCEPT
COMMIT
"""


def _running(netns: str, device: str, direction: str) -> str:
    """The name of the program the pinned link of `device` runs."""
    link = get_pinned(str(PIN_ROOT / netns / f"link_{device}_{direction}"))
    try:
        program = linked_program(link)
        try:
            return program_info(program).name.decode()
        finally:
            close(program)
    finally:
        close(link)


def test_ports_get_the_port_programs(tmp_path: Path) -> None:
    rules = tmp_path / "bridge.rules"
    rules.write_text(RULES)
    with Namespace() as namespace:
        run = namespace.run
        run(["ip", "link", "add", "br0", "type", "bridge"])
        run(["ip", "link", "add", "port1", "type", "veth", "peer", "name", "port2"])
        try:
            assert bpflab("apply", str(rules), "--netns", namespace.name).returncode == 0
            assert _running(namespace.name, "port1", "egress") == "bpflab_egress"
            # Enslaved: the next apply swaps each link's program for the port's.
            run(["ip", "link", "set", "port1", "master", "br0"])
            applied = bpflab("apply", str(rules), "--netns", namespace.name)
            assert applied.returncode == 0, applied.stderr
            assert _running(namespace.name, "port1", "ingress") == "bpflab_port_in"
            assert _running(namespace.name, "port1", "egress") == "bpflab_bridged"
            assert _running(namespace.name, "br0", "ingress") == "bpflab_ingress"
            assert _running(namespace.name, "port2", "egress") == "bpflab_egress"
        finally:
            flush(namespace.name)


@pytest.fixture(scope="module")
def unfiltered_labs():
    with BridgeTopology(call_iptables=False) as ours, BridgeTopology(call_iptables=False) as twin:
        quiet(ours, twin)
        yield ours, twin


@pytest.mark.parametrize("backend", ["bytecode", pytest.param("c", marks=pytest.mark.bcc)])
def test_without_br_netfilter_bridged_traffic_is_not_filtered(unfiltered_labs, backend) -> None:
    _case(unfiltered_labs, backend, RULES, reference=False)
