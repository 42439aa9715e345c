"""`-m physdev` where a namespace bridges with br_netfilter on: netfilter would see the bridge
ports there and the programs cannot, so `bpflab apply` refuses the rule set in one sentence
(exit 2) and changes nothing; the same rules apply where the namespace has no bridge, and
where br_netfilter does not hand the bridge's traffic to iptables."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.deploy.lifecycle import flush, read_state
from netns.namespace import Namespace
from tests.net.test_cli_lifecycle import bpflab

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m physdev --physdev-is-bridged -j DROP
COMMIT
"""
CALL_IPTABLES = "net.bridge.bridge-nf-call-iptables"


def _call_iptables_here() -> bool:
    return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()


def test_physdev_is_refused_where_the_namespace_bridges_into_iptables(tmp_path):
    rules = tmp_path / "physdev.rules"
    rules.write_text(RULES)
    with Namespace() as namespace:
        namespace.run(["ip", "link", "add", "blbr0", "type", "bridge"])
        namespace.run(["ip", "link", "set", "blbr0", "up"])
        try:
            if not _call_iptables_here():  # no br_netfilter: nothing hands bridged packets over
                assert bpflab("apply", str(rules), "--netns", namespace.name).returncode == 0
                return
            namespace.sysctl(CALL_IPTABLES, 1)
            refused = bpflab("apply", str(rules), "--netns", namespace.name)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            message = refused.stderr.strip()
            assert "-m physdev cannot be judged" in message and "blbr0" in message
            assert len(message.splitlines()) == 1 and "Traceback" not in message
            assert read_state(namespace.name) is None  # nothing applied
            # br_netfilter off in this namespace: bridged packets skip iptables, and so do
            # the bridge ports; the rules apply.
            namespace.sysctl(CALL_IPTABLES, 0)
            applied = bpflab("apply", str(rules), "--netns", namespace.name)
            assert applied.returncode == 0, applied.stderr
        finally:
            flush(namespace.name)


def test_physdev_applies_where_the_namespace_has_no_bridge(tmp_path):
    rules = tmp_path / "physdev.rules"
    rules.write_text(RULES)
    with Namespace() as namespace:
        namespace.run(["ip", "link", "add", "blveth0", "type", "veth", "peer", "blveth1"])
        try:
            applied = bpflab("apply", str(rules), "--netns", namespace.name)
            assert applied.returncode == 0, applied.stderr
            assert read_state(namespace.name) is not None
        finally:
            flush(namespace.name)
