"""REJECT's ICMP rate limits in a namespace (codegen.reject.limits): the buckets are pinned and
kept across applies, as the kernel keeps its own across table loads, and each apply sets them
to the namespace's net.ipv4.icmp_* sysctls as they are then (a change is seen at the next
apply)."""

from __future__ import annotations

from pathlib import Path

from codegen.jiffies import HzUnknown, kernel_hz
from codegen.reject.limits import RateMaps
from codegen.rules.icmp_rate import IcmpSysctls
from netns.namespace import Namespace

from .state import LifecycleError

_SYSCTLS = {
    "ratelimit_ms": "net.ipv4.icmp_ratelimit",
    "ratemask": "net.ipv4.icmp_ratemask",
    "msgs_per_sec": "net.ipv4.icmp_msgs_per_sec",
    "msgs_burst": "net.ipv4.icmp_msgs_burst",
}


def namespace_sysctls(namespace: Namespace) -> IcmpSysctls:
    """The namespace's icmp sysctls; one the kernel does not have keeps its default."""
    return IcmpSysctls(**namespace.read_sysctls(_SYSCTLS))


def open_limits(pins: Path, namespace: Namespace) -> RateMaps:
    """The namespace's buckets (the pinned ones, or new), set to its sysctls now; LifecycleError
    when the kernel's HZ, which they count in, is unknown."""
    try:
        hz = kernel_hz()
    except HzUnknown as error:
        raise LifecycleError(f"REJECT's ICMP rate limits count in jiffies, but {error}") from None
    limits = RateMaps.kept_or_new(pins)
    try:
        limits.configure(namespace_sysctls(namespace), hz)
    except BaseException:
        limits.close()
        raise
    return limits
