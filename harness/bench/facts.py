"""What a bench result records beside its figures: how each section measures (`method`), the
machine, the tools' versions and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .settings import Settings
from .workload import FRAME_BYTES, POSITIONS


def method(settings: Settings, overhead_s: float) -> dict:
    testrun = settings.testrun
    return {
        "workload": (
            "N rules `-A INPUT -s <distinct /32 in 198.19.0.0/16> -p tcp -m tcp --dport <distinct "
            "port from 1000> -j ACCEPT`, INPUT policy DROP. Test packets: 64-byte Ethernet frames, "
            "IPv4/TCP with the RST flag and 10 bytes of payload, matching the first rule, only the "
            "last rule, or no rule (the policy drops it)."
        ),
        "per_packet": (
            "The INPUT chain program (hook `chain`, with its per-rule counters) of each backend "
            "under BPF_PROG_TEST_RUN with an __sk_buff context of a unicast packet; the kernel's "
            f"mean ns per run over `repeat` runs is one trial; median of {testrun.trials} trials. "
            f"repeat is {testrun.repeat:,} unless a trial would exceed {testrun.budget_s} s "
            "(estimated from a 1,000-run probe): then as many as fit in that budget, at least "
            "1,000 (see `repeat` beside each figure). Each program is first checked to decide "
            "every test packet as the workload says. The floor is a program of two instructions "
            "(r0 = TC_ACT_OK; exit) on the same frame. instructions = the kernel's xlated count; "
            "verifier_processed = bpf_prog_info.verified_insns; load_s = generate, compile and "
            "verify."
        ),
        "stateful": (
            "The same N rules for UDP behind `-m conntrack --ctstate RELATED,ESTABLISHED -j "
            "ACCEPT` (nftables: `ct state established,related accept`; netfilter's conntrack on "
            "for both). established: a datagram answering one the host sent first (OUTPUT), "
            "decided by the first rule; new: a datagram to the last rule's source and port, "
            "never answered, so NEW every time. Test-run: the INPUT and OUTPUT chain programs "
            "of one table; throughput: the host writes first through a real socket before each "
            "window of established traffic."
        ),
        "largest": (
            "Verifier processed instructions at 1,000 and 5,000 rules fit a line that predicts "
            "where the budget of 1,000,000 runs out; loads of the chain and the ingress program "
            "around the prediction, in steps of 1%, find the largest that loads (its next step "
            "is refused); where verification does not grow with the rules, the workload's "
            "largest rule set is tried."
        ),
        "throughput": (
            "Four client/host namespace pairs over veth (offloads off, permanent neighbours), "
            "one per filter: none, bpflab's TC programs (`lifecycle.apply` on the host's eth0, "
            "ingress and egress), iptables-legacy's filter INPUT chain, an nftables "
            "`type filter hook input` chain, each holding the same N rules. trafgen (netsniff-ng) "
            "in the client sends one frame in a loop from one process (PACKET_MMAP ring, qdisc "
            "bypassed); veth processes the receive on the sending CPU, so the rate reflects send "
            "plus receive cost. Counted at the receiver: Ip InDelivers of the host namespace "
            "(packets past every filter, handed to TCP, which discards a RST to a closed port "
            f"without answering). After {settings.warmup_s} s of warm-up, the delivered count "
            f"over a {settings.window_s} s window is one trial; {settings.throughput_trials} "
            "trials per filter, the filters alternated within each round (order rotated each "
            "round). pps: the median over rounds; ratio: the median over rounds of the filter's "
            "rate divided by no filter's rate in the same round (the machine's speed drifts "
            "between rounds; pairing cancels most of it); ratio_of_medians and best_pps beside "
            "it. `offered_trials` is the client's transmit rate over the same windows."
        ),
        "load": (
            "Into a receiver holding no rules (flushed first): `lifecycle.apply` in process "
            "(parse, generate, verify, attach ingress and egress with tcx links, pin), "
            "`iptables-legacy-restore FILE` and `nft -f FILE` through `ip netns exec` "
            f"(whose own cost, median {overhead_s * 1000:.1f} ms, is included). Update: the same "
            "rule set applied again over the loaded one: apply's atomic link swap with counter "
            "carry-over, iptables-legacy-restore's table replace, nft -f of `flush table` plus "
            "the rules in one transaction."
        ),
        "one_rule": (
            "One rule (`-s <the next source>/32 -p tcp -m tcp --dport <the next port> -j "
            "ACCEPT`) appended to INPUT holding N rules of the workload, then deleted, each a "
            "whole command timed from start to exit: `bpflab exec --netns NS -- iptables-legacy "
            "-A|-D INPUT ...` (iptables reads the table, bpflab compiles, verifies and swaps the "
            "table it sends back), `bpflab apply` of the N+1 and then the N rules (both as "
            "`python -m harness.cli`, interpreter start included), and iptables-legacy -A/-D on "
            "the kernel's table through `ip netns exec`. Median of "
            f"{settings.one_rule_trials} trials."
        ),
        "parameters": {
            "frame_bytes": FRAME_BYTES,
            "testrun_trials": testrun.trials,
            "testrun_repeat": testrun.repeat,
            "testrun_budget_s": testrun.budget_s,
            "throughput_trials": settings.throughput_trials,
            "warmup_s": settings.warmup_s,
            "window_s": settings.window_s,
            "process_overhead_s": overhead_s,
            "positions": list(POSITIONS),
        },
    }


def machine() -> dict:
    cpu_model = "unknown"
    hypervisor = False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model == "unknown":
                cpu_model = value.strip()
            if key.strip() == "flags" and " hypervisor" in f" {value}":
                hypervisor = True
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "kernel_build": platform.version(),
        "architecture": platform.machine(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "virtual_machine": hypervisor,
        "python": platform.python_version(),
    }


def _first_line(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def tool_versions() -> dict:
    return {
        "trafgen": _first_line(["trafgen", "--version"]),
        "iptables": _first_line(["iptables-legacy", "--version"]),
        "nft": _first_line(["nft", "--version"]),
    }


def commit() -> str | None:
    return _first_line(
        ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
    )
