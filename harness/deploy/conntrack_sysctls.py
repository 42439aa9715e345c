"""The connection tracker's settings in a namespace: its net.netfilter.nf_conntrack_* sysctls
as they are at apply time, compiled into the programs' tracker (codegen.conntrack.defines), so
that the tracker times entries out, and treats TCP windows and mid-stream pickups, as that
namespace's netfilter does (kube-proxy, for one, sets nf_conntrack_tcp_be_liberal and longer
established and close-wait timeouts). A sysctl changed later is seen at the next apply; one the
kernel does not show (nf_conntrack not loaded) keeps the kernel's default."""

from __future__ import annotations

from dataclasses import fields

from codegen.rules.tracking.timeouts import Timeouts
from netns.namespace import Namespace

# Timeouts' fields by sysctl; tcp_syn_sent2 has none (the kernel's table holds it).
_NAMES = {
    **{
        f.name: f"nf_conntrack_tcp_timeout_{f.name.removeprefix('tcp_')}"
        for f in fields(Timeouts)
        if f.name.startswith("tcp_") and f.name != "tcp_syn_sent2"
    },
    "tcp_max_retrans_count": "nf_conntrack_tcp_max_retrans",
    "tcp_be_liberal": "nf_conntrack_tcp_be_liberal",
    "tcp_loose": "nf_conntrack_tcp_loose",
    "udp": "nf_conntrack_udp_timeout",
    "udp_stream": "nf_conntrack_udp_timeout_stream",
    "icmp": "nf_conntrack_icmp_timeout",
    "generic": "nf_conntrack_generic_timeout",
}
SYSCTLS = {field: f"net.netfilter.{name}" for field, name in _NAMES.items()}


def namespace_timeouts(namespace: Namespace) -> Timeouts:
    """The namespace's conntrack settings; each sysctl it does not show keeps its default."""
    return Timeouts(**namespace.read_sysctls(SYSCTLS))
