"""`bpflab verify` and `bpflab run`: a rule set's programs loaded, and run on packets with
BPF_PROG_TEST_RUN."""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack

from . import environment
from .cli_input import EXIT_OK, UsageError, parse_rules, require


def verify(args: argparse.Namespace) -> int:
    require(environment.missing_bpf)
    if args.backend == "c":
        require(environment.missing_bcc)
    from codegen.bpf.isa import MapType
    from codegen.bpf.maps import Map
    from codegen.conntrack import TrackerMaps, uses_conntrack
    from codegen.tc.generator import COUNTERS_MAP, LOCAL_MAP
    from codegen.tc.layout import CounterLayout
    from codegen.tc.matches.limit import LIMIT_MAP, uses_limit
    from codegen.tc.matches.limit import create_map as create_limit_map
    from codegen.tc.replies import INTERFACE_ADDRESSES, INTERFACE_VALUE_SIZE

    from .backends import load_program
    from .counters import CounterMap
    from .runner import RUN_TABLE_ENTRIES, standin_interfaces

    ruleset = parse_rules(args.rules)
    interfaces = standin_interfaces(ruleset)
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
        Map(MapType.HASH, 4, 1, 16, name=LOCAL_MAP) as local,
        TrackerMaps.create(RUN_TABLE_ENTRIES) as tracker,
        Map(MapType.HASH, 4, INTERFACE_VALUE_SIZE, 16, name=INTERFACE_ADDRESSES) as sources,
        ExitStack() as stack,
    ):
        tracking = tracker.maps if uses_conntrack(ruleset) else {}
        tracking = {**tracking, INTERFACE_ADDRESSES: sources}
        if uses_limit(ruleset):
            tracking[LIMIT_MAP] = stack.enter_context(create_limit_map(ruleset))
        for hook in ("ingress", "egress"):
            program = load_program(
                ruleset,
                hook,
                interfaces=interfaces,
                maps={COUNTERS_MAP: counters, LOCAL_MAP: local, **tracking},
                fastpath=args.fastpath,
                backend=args.backend,
            )
            try:
                stats = program.stats
                figures = (
                    f"{stats.insns_processed} processed, {stats.states_total} states "
                    f"(peak {stats.states_peak}), {stats.verification_usec} us"
                    if stats is not None
                    else "no verifier statistics"
                )
                print(
                    f"{hook:8} {program.name}: accepted; {program.insn_count} instructions, "
                    f"{figures}"
                )
            finally:
                program.close()
    return EXIT_OK


def _chains_of(frames: list[bytes], args: argparse.Namespace) -> list[str]:
    """The chain each frame goes through: --chain for all, or with --host, INPUT for what is
    addressed to the host and OUTPUT for what it sends (a capture of both directions)."""
    if not args.host:
        if args.chain is None:
            raise UsageError("give --chain, or --host ADDRESS for a capture of a host's traffic")
        return [args.chain] * len(frames)
    if args.chain is not None:
        raise UsageError("give --chain or --host, not both")
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    chains = []
    for number, frame in enumerate(frames, start=1):
        packet = Ether(frame)
        if IP not in packet:
            raise UsageError(f"packet {number} is not IPv4, so neither to nor from the host")
        if packet[IP].dst in args.host:
            chains.append("INPUT")
        elif packet[IP].src in args.host:
            chains.append("OUTPUT")
        else:
            raise UsageError(
                f"packet {number} ({packet[IP].src} > {packet[IP].dst}) is neither to nor "
                f"from the host ({', '.join(args.host)})"
            )
    return chains


def answer_kind(frame: bytes) -> str:
    """What a REJECT answered with, as --reject-with names it ("tcp-reset", "icmp type 3 code
    N" for the ICMP errors)."""
    from scapy.layers.inet import ICMP, TCP
    from scapy.layers.l2 import Ether

    packet = Ether(frame)
    if TCP in packet:
        return "tcp-reset"
    if ICMP in packet:
        return f"icmp type {packet[ICMP].type} code {packet[ICMP].code}"
    return "an answer"


def run(args: argparse.Namespace) -> int:
    require(environment.missing_bpf)
    from .lab.packets import SpecError, parse_packet
    from .runner import ChainRunner

    ruleset = parse_rules(args.rules)
    frames: list[bytes] = []
    for number, spec in enumerate(args.packet or [], start=1):
        try:
            frames.append(bytes(parse_packet(spec)))
        except SpecError as error:
            raise UsageError(f"--packet {number}: {error}") from None
    times: list[float | None] = [None] * len(frames)
    if args.pcap:
        from scapy.utils import rdpcap

        try:
            captured = rdpcap(args.pcap)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {args.pcap}: {error}") from None
        frames += [bytes(packet) for packet in captured]
        # The capture's own clock drives the connection tracker's timeouts.
        start = float(captured[0].time) if captured else 0.0
        times += [float(packet.time) - start for packet in captured]
    if not frames:
        raise UsageError("give packets with --packet SPEC or --pcap FILE")
    chains = _chains_of(frames, args)
    devices = [name for name in (args.in_iface, args.out_iface) if name]
    if args.backend == "c":
        require(environment.missing_bcc)
    with ChainRunner(ruleset, devices, backend=args.backend) as runner:
        for number, (frame, chain_run, when) in enumerate(
            zip(frames, chains, times, strict=True), start=1
        ):
            in_iface = args.in_iface if chain_run != "OUTPUT" else None
            out_iface = args.out_iface if chain_run != "INPUT" else None
            outcome = runner.run(frame, chain_run, in_iface, out_iface, time=when)
            chain, index = outcome.deciding
            result = {
                "packet": number,
                "verdict": "ACCEPT" if outcome.verdict == "PASS" else outcome.verdict,
                "chain": chain or None,
                "rule": index if isinstance(index, int) else None,
            }
            if outcome.verdict == "PASS":
                result["handled"] = False
            if outcome.reply is not None:
                result["answer"] = answer_kind(outcome.reply)
            if args.json:
                print(json.dumps(result))
            else:
                where = (
                    "not handled (not IPv4 or malformed)"
                    if outcome.verdict == "PASS"
                    else (f"{chain} policy" if index == "policy" else f"{chain} rule {index}")
                )
                answered = f", answered with {result['answer']}" if "answer" in result else ""
                print(f"packet {number}: {result['verdict']:6} by {where}{answered}")
        totals = runner.counters.read()
    counters: dict[str, dict] = {}
    for name, chain in ruleset.chains.items():
        counters[name] = {
            "policy": list(totals[(name, "policy")]) if chain.builtin else None,
            "rules": [list(totals[(name, i)]) for i in range(1, len(chain.rules) + 1)],
        }
    if args.json:
        print(json.dumps({"counters": counters}))
    else:
        for name, values in counters.items():
            policy = (
                f" policy {values['policy'][0]}p/{values['policy'][1]}b" if values["policy"] else ""
            )
            rules = " ".join(f"{p}p/{b}b" for p, b in values["rules"])
            print(f"{name}:{policy} rules [{rules}]")
    return EXIT_OK
