"""`bpflab verify` and `bpflab run`: a rule set's programs loaded, and run on packets with
BPF_PROG_TEST_RUN."""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack

from . import environment
from .cli_input import EXIT_OK, UsageError, parse_rules, read_sets, require


def bridged_argument(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--bridged",
        action="store_true",
        help="build for a namespace whose bridge hands its traffic to iptables (br_netfilter):"
        " -m physdev reads the ports, and verify loads the bridge ports' program too; by"
        " default, a namespace without one",
    )


def compile_program_listing(args: argparse.Namespace) -> int:
    """`bpflab compile`: the annotated disassembly of one program, or its C."""
    from codegen.bpf.asm import assemble
    from codegen.bpf.disasm import listing
    from codegen.tc.generator import compile_program

    from .runner import standin_interfaces

    ruleset = parse_rules(args.rules)
    interfaces = standin_interfaces(ruleset)
    if args.backend == "c":
        from codegen.c import c_source

        source = c_source(
            ruleset, args.hook, interfaces=interfaces, fastpath=args.fastpath, bridges=args.bridged
        )
        print(source, end="")
        return EXIT_OK
    compiled = compile_program(
        ruleset, args.hook, interfaces=interfaces, fastpath=args.fastpath, bridges=args.bridged
    )
    assembly = assemble(compiled.items)
    print(listing(list(assembly.insns)))
    per_rule: dict[object, int] = {}
    for insn in assembly.insns:
        if insn.annotation is not None:
            per_rule[insn.annotation] = per_rule.get(insn.annotation, 0) + insn.slots
    print(
        f"\n; {compiled.name}: {assembly.slot_count} instructions, "
        f"{len(per_rule)} rules compiled, chains {', '.join(compiled.chains)}"
    )
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    require(environment.missing_bpf)
    if args.backend == "c":
        require(environment.missing_bcc)
    from codegen.bpf.isa import MapType
    from codegen.bpf.maps import Map
    from codegen.conntrack import TrackerMaps, uses_conntrack
    from codegen.rules.extensions.set import bind_sets, uses_sets
    from codegen.rules.routes import STANDIN_ROUTES
    from codegen.tc.generator import COUNTERS_MAP
    from codegen.tc.layout import CounterLayout
    from codegen.tc.matches.addrtype import ADDRESS_TYPES, uses_addrtype
    from codegen.tc.matches.hashlimit import HASHLIMIT_MAP, uses_hashlimit
    from codegen.tc.matches.hashlimit import create_map as create_hashlimit_map
    from codegen.tc.matches.limit import LIMIT_MAP, uses_limit
    from codegen.tc.matches.limit import create_map as create_limit_map
    from codegen.tc.matches.policy import SECPATH_MAP, uses_policy
    from codegen.tc.matches.policy import create_map as create_secpath_map
    from codegen.tc.matches.recent import create_maps as create_recent_maps
    from codegen.tc.matches.recent import uses_recent
    from codegen.tc.replies import INTERFACE_ADDRESSES, INTERFACE_VALUE_SIZE

    from .backends import load_program
    from .counters import CounterMap
    from .deploy.routes import address_types_map
    from .deploy.sets import set_maps
    from .log_reader import LogMaps
    from .runner import RUN_TABLE_ENTRIES, standin_interfaces

    # -m set's sets: --sets FILE, else the stand-in sets a test run has.
    ruleset = bind_sets(parse_rules(args.rules), read_sets(args.sets))
    interfaces = standin_interfaces(ruleset)
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
        TrackerMaps.create(RUN_TABLE_ENTRIES) as tracker,
        Map(MapType.HASH, 4, INTERFACE_VALUE_SIZE, 16, name=INTERFACE_ADDRESSES) as sources,
        LogMaps(4096) as logging,
        ExitStack() as stack,
    ):
        tracking = tracker.maps if uses_conntrack(ruleset) else {}
        tracking = {**tracking, INTERFACE_ADDRESSES: sources, **logging.maps}
        if uses_addrtype(ruleset):  # its routes as a test run has them
            trie = stack.enter_context(address_types_map(STANDIN_ROUTES, interfaces))
            tracking[ADDRESS_TYPES] = trie
        if uses_limit(ruleset):
            tracking[LIMIT_MAP] = stack.enter_context(create_limit_map(ruleset))
        if uses_hashlimit(ruleset):
            tracking[HASHLIMIT_MAP] = stack.enter_context(create_hashlimit_map(ruleset))
        if uses_policy(ruleset):  # a test's security path; the programs read the skb's
            tracking[SECPATH_MAP] = stack.enter_context(create_secpath_map())
        for name, held in (set_maps(ruleset, interfaces) if uses_sets(ruleset) else {}).items():
            tracking[name] = stack.enter_context(held)
        for name, held in (create_recent_maps(ruleset) if uses_recent(ruleset) else {}).items():
            tracking[name] = stack.enter_context(held)
        for hook in ("ingress", "egress", *(["bridged"] if args.bridged else [])):
            program = load_program(
                ruleset,
                hook,
                interfaces=interfaces,
                maps={COUNTERS_MAP: counters, **tracking},
                fastpath=args.fastpath,
                backend=args.backend,
                bridges=args.bridged,
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


OWNER_HELP = (
    "the socket OUTPUT's packets carry, for -m owner: a process's fsuid and fsgid (and its"
    " supplementary groups, for --suppl-groups), the kernel's own (no file), or none (default:"
    " test-run's, which is no socket to it)"
)
OWNER_METAVAR = "UID:GID[:GROUP,...]|kernel|none"


def parse_owner(text: str | None) -> object:
    """--owner: "dummy" (not given), None ("none"), or a SocketOwner."""
    from codegen.rules.packet import SocketOwner

    if text is None:
        return "dummy"
    if text == "none":
        return None
    if text == "kernel":
        return SocketOwner(file=False)
    uid, _, rest = text.partition(":")
    gid, _, groups = rest.partition(":")
    try:
        listed = tuple(int(group) for group in groups.split(",")) if groups else ()
        return SocketOwner(int(uid), int(gid), listed)
    except ValueError:
        raise UsageError(
            f"--owner {text!r}: give UID:GID or UID:GID:GROUP,GROUP,... (numbers up to"
            " 4294967295), kernel or none"
        ) from None


def run(args: argparse.Namespace) -> int:
    require(environment.missing_bpf)
    from .lab.packets import SpecError, parse_packet
    from .runner import ChainRunner

    owner = parse_owner(getattr(args, "owner", None))
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
    sets = read_sets(args.sets)
    with ChainRunner(ruleset, devices, backend=args.backend, sets=sets) as runner:
        for number, (frame, chain_run, when) in enumerate(
            zip(frames, chains, times, strict=True), start=1
        ):
            in_iface = args.in_iface if chain_run != "OUTPUT" else None
            out_iface = args.out_iface if chain_run != "INPUT" else None
            outcome = runner.run(
                frame,
                chain_run,
                in_iface,
                out_iface,
                time=when,
                owner=owner if chain_run == "OUTPUT" else "dummy",  # type: ignore[arg-type]
            )
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
            if outcome.log:  # LOG rules' lines, as the kernel would print them
                result["log"] = list(outcome.log)
            if outcome.mark:  # what -j MARK rules left on the skb (each packet starts at 0)
                result["mark"] = f"0x{outcome.mark:x}"
            if args.json:
                print(json.dumps(result))
            else:
                where = (
                    "not handled (not IPv4 or malformed)"
                    if outcome.verdict == "PASS"
                    else (f"{chain} policy" if index == "policy" else f"{chain} rule {index}")
                )
                answered = f", answered with {result['answer']}" if "answer" in result else ""
                marked = f", mark {result['mark']}" if "mark" in result else ""
                print(f"packet {number}: {result['verdict']:6} by {where}{answered}{marked}")
                for line in outcome.log:
                    print(f"  log: {line}")
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
