"""`bpflab`: the command line. The only place that prints errors and chooses exit codes.

Exit codes: 0 ok, 1 a check failed, 2 bad input or environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from codegen.bpf.syscall import BpfError, BpfFeatureError, BpfPermissionError

from . import environment

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class UsageError(Exception):
    """Bad input or environment: printed as one sentence, exit code 2."""


class CheckFailed(Exception):
    """A check that ran and failed (a verifier rejection, a mismatch): exit code 1."""


def _read_rules(path: str) -> tuple[str, str]:
    from codegen.rules.text_file import decode_rules

    # Bytes, decoded by decode_rules: a file that is not UTF-8 text is a ParseError at
    # FILE:LINE:COL, not a UnicodeDecodeError traceback.
    if path == "-":
        return decode_rules(sys.stdin.buffer.read(), "<stdin>"), "<stdin>"
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    return decode_rules(data, path), path


def _parse_rules(path: str):
    from codegen.rules import parse, validate

    text, name = _read_rules(path)
    ruleset = parse(text, name)
    validate(ruleset)
    return ruleset


def _require(probe: Callable[[], str | None]) -> None:
    reason = probe()
    if reason is not None:
        raise UsageError(reason)


# Commands -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    _require(environment.missing_bpffs)
    _require(environment.missing_netns)
    if args.toolchain:
        from .demo import run_demo

        return run_demo()
    scripts = sorted(EXAMPLES.glob("*.toml"))
    if not scripts:
        raise UsageError(f"no example scripts in {EXAMPLES}")
    return _replay_all([str(path) for path in scripts], "bytecode")


def _replay(args: argparse.Namespace) -> int:
    _require(environment.missing_bpffs)
    _require(environment.missing_netns)
    if args.backend == "c":
        _require(environment.missing_bcc)
    return _replay_all(args.scripts, args.backend)


def _replay_all(paths: list[str], backend: str) -> int:
    from .lab.replay import replay
    from .lab.scripts import load_script

    scripts = [load_script(path) for path in paths]  # every script checked before any runs
    failed = 0
    for number, script in enumerate(scripts):
        report = replay(script, backend=backend)  # a ReplayError is a ScriptError: FILE:LINE
        print(("\n" if number else "") + report.render())
        failed += not report.ok
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from codegen.rules import write

    print(write(_parse_rules(args.rules)), end="")
    return EXIT_OK


def _compile(args: argparse.Namespace) -> int:
    from codegen.bpf.asm import assemble
    from codegen.bpf.disasm import listing
    from codegen.tc.generator import compile_program

    from .runner import standin_interfaces

    ruleset = _parse_rules(args.rules)
    interfaces = standin_interfaces(ruleset)
    if args.backend == "c":
        from codegen.c import c_source

        print(c_source(ruleset, args.hook, interfaces=interfaces, fastpath=args.fastpath), end="")
        return EXIT_OK
    compiled = compile_program(ruleset, args.hook, interfaces=interfaces, fastpath=args.fastpath)
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


def _verify(args: argparse.Namespace) -> int:
    _require(environment.missing_bpf)
    if args.backend == "c":
        _require(environment.missing_bcc)
    from codegen.bpf.isa import MapType
    from codegen.bpf.maps import Map
    from codegen.conntrack import TrackerMaps, uses_conntrack
    from codegen.tc.generator import COUNTERS_MAP, LOCAL_MAP
    from codegen.tc.layout import CounterLayout

    from .backends import load_program
    from .counters import CounterMap
    from .runner import RUN_TABLE_ENTRIES, standin_interfaces

    ruleset = _parse_rules(args.rules)
    interfaces = standin_interfaces(ruleset)
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
        Map(MapType.HASH, 4, 1, 16, name=LOCAL_MAP) as local,
        TrackerMaps.create(RUN_TABLE_ENTRIES) as tracker,
    ):
        tracking = tracker.maps if uses_conntrack(ruleset) else {}
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


def _run(args: argparse.Namespace) -> int:
    _require(environment.missing_bpf)
    from .lab.packets import SpecError, parse_packet
    from .runner import ChainRunner

    ruleset = _parse_rules(args.rules)
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
        _require(environment.missing_bcc)
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
            if args.json:
                print(json.dumps(result))
            else:
                where = (
                    "not handled (not IPv4 or malformed)"
                    if outcome.verdict == "PASS"
                    else (f"{chain} policy" if index == "policy" else f"{chain} rule {index}")
                )
                print(f"packet {number}: {result['verdict']:6} by {where}")
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


def _apply(args: argparse.Namespace) -> int:
    _require(environment.missing_bpffs)
    from .deploy import lifecycle

    text, name = _read_rules(args.rules)
    if args.backend == "c":
        _require(environment.missing_bcc)
    applied = lifecycle.apply(
        text,
        name,
        args.netns,
        devices=args.dev or None,
        fastpath=args.fastpath,
        backend=args.backend,
    )
    verb = "replaced" if applied.replaced else "attached"
    for hook, program in applied.programs.items():
        stats = program.stats
        processed = f", {stats.insns_processed} processed" if stats else ""
        print(f"{hook}: {program.insn_count} instructions{processed}")
    carried = (
        f"; counters of {applied.carried} unchanged rules carried over"
        if (applied.replaced)
        else ""
    )
    print(f"{verb} on {', '.join(applied.devices)} in namespace {args.netns}{carried}")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from .deploy import lifecycle
    from .deploy.listing import list_table

    ruleset, _ = lifecycle.current(args.netns)
    print(list_table(ruleset, verbose=args.verbose), end="")
    return EXIT_OK


def _save(args: argparse.Namespace) -> int:
    from .deploy import lifecycle

    print(lifecycle.save(args.netns, args.counters), end="")
    return EXIT_OK


def _conntrack(args: argparse.Namespace) -> int:
    _require(environment.missing_bpffs)
    from .deploy import lifecycle

    if args.flush:
        emptied = lifecycle.forget_connections(args.netns)
        print(
            f"bpflab: connection table of {args.netns} emptied: {emptied} entries removed",
            file=sys.stderr,
        )
        return EXIT_OK
    lines = lifecycle.connections(args.netns)
    for line in lines:
        print(line)
    print(f"bpflab: {len(lines)} flow entries have been shown.", file=sys.stderr)
    return EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    _require(environment.missing_bpffs)
    from .deploy import lifecycle

    removed = lifecycle.flush(args.netns)
    print(f"flushed namespace {args.netns}: removed {len(removed)} pins")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    _require(environment.missing_netns)
    from codegen.rules import write
    from codegen.rules.ipt_blob import read_table
    from netns.namespace import Namespace

    namespace = Namespace.existing(args.netns)
    with namespace.enter():
        ruleset = read_table()
    print(write(ruleset, counters=args.counters), end="")
    return EXIT_OK


def _cleanup(args: argparse.Namespace) -> int:
    _require(environment.missing_netns)
    from netns.reaper import reap

    from .deploy.lifecycle import forget_missing

    removed = reap(orphans=args.orphans)
    forgotten = [name for name in forget_missing() if name not in removed]
    for name in forgotten:
        print(f"forgot the rule set of vanished namespace {name}")
    for name in removed:
        print(f"removed {name}")
    if not removed and not forgotten:
        print("nothing to clean up")
    return EXIT_OK


def _doctor(args: argparse.Namespace) -> int:
    """Print what this machine can and cannot do for bpfilter-lab."""
    failures = 0
    for what, probe in environment.PROBES.items():
        reason = probe()
        failures += reason is not None
        print(f"{what:10} {'ok' if reason is None else reason}")
    return EXIT_OK if failures == 0 else EXIT_BAD_INPUT


# Parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpflab",
        description="Turn iptables filter-table rules into eBPF for TC and prove them on real "
        "kernels.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    def rules_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("rules", metavar="RULES", help="iptables-save text ('-' for stdin)")

    def backend_argument(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--backend",
            choices=["bytecode", "c"],
            default="bytecode",
            help="generate eBPF instructions directly (default) or C compiled by bcc",
        )

    sub = command("demo", _demo, "replay the example packet scripts and print their tables")
    sub.add_argument(
        "--toolchain",
        action="store_true",
        help="instead: assemble, verify and test-run a small hand-written filter",
    )

    sub = command("replay", _replay, "run packet scripts: topology, rules, packets, checks")
    sub.add_argument("scripts", nargs="+", metavar="SCRIPT", help="packet scripts (TOML)")
    backend_argument(sub)

    sub = command("check", _check, "parse and validate RULES and print their canonical form")
    rules_argument(sub)

    sub = command("compile", _compile, "print the annotated disassembly of a generated program")
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--hook", choices=["ingress", "egress"], default="ingress")
    sub.add_argument("--fastpath", action="store_true", help="forward ACCEPTed FORWARD traffic")

    sub = command("verify", _verify, "load both programs into the verifier and print its stats")
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--fastpath", action="store_true")

    sub = command("run", _run, "run one chain's program on packets with BPF_PROG_TEST_RUN")
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--chain", choices=["INPUT", "FORWARD", "OUTPUT"])
    sub.add_argument(
        "--host",
        action="append",
        metavar="ADDRESS",
        help="instead of --chain: the host's address (repeatable); packets to it go through "
        "INPUT, packets from it through OUTPUT, sharing one connection table",
    )
    sub.add_argument(
        "--packet",
        action="append",
        metavar="SPEC",
        help="a frame in scapy syntax, e.g. 'Ether()/IP(dst=\"198.18.0.2\")/TCP()'",
    )
    sub.add_argument("--pcap", metavar="FILE", help="frames from a capture")
    sub.add_argument("--in", dest="in_iface", metavar="IF")
    sub.add_argument("--out", dest="out_iface", metavar="IF")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")

    sub = command("apply", _apply, "compile, verify and attach RULES in a network namespace")
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument(
        "--dev",
        action="append",
        metavar="IF",
        help="device to attach to (repeatable; default: all but lo)",
    )
    sub.add_argument(
        "--fastpath",
        action="store_true",
        help="forward ACCEPTed FORWARD traffic in the program (bpf_redirect)",
    )

    sub = command("list", _list, "list the applied rules and counters, like iptables -L -n -x")
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument("-v", "--verbose", action="store_true", help="with packet and byte counts")

    sub = command("save", _save, "print the applied rules as iptables-save text")
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument("-c", "--counters", action="store_true", help="with [packets:bytes]")

    sub = command(
        "conntrack", _conntrack, "list the connections the programs track, like conntrack -L"
    )
    sub.add_argument("--netns", required=True, metavar="NS")
    actions = sub.add_mutually_exclusive_group()
    actions.add_argument("-L", "--dump", action="store_true", help="list them (the default)")
    actions.add_argument("-F", "--flush", action="store_true", help="forget them all")

    sub = command("flush", _flush, "detach the programs of a namespace and remove their state")
    sub.add_argument("--netns", required=True, metavar="NS")

    sub = command("import", _import, "print a namespace's live iptables filter table (blob read)")
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument("-c", "--counters", action="store_true")

    sub = command("cleanup", _cleanup, "remove namespaces and pins left by bpflab runs that died")
    sub.add_argument(
        "--orphans",
        action="store_true",
        help="also remove bl* namespaces that have no owner record",
    )

    from .bench.run import add_command as add_bench

    add_bench(commands)

    command("doctor", _doctor, "check what this machine can do")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from codegen.bpf.asm import AssemblyError
    from codegen.bpf.loader import VerifierError
    from codegen.rules.model import RuleError
    from codegen.tc.generator import CompileError
    from netns.namespace import NamespaceError

    from .deploy.lifecycle import LifecycleError
    from .lab.scripts import ScriptError

    try:
        return args.run(args)
    except (RuleError, ScriptError) as error:
        print(str(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (UsageError, CompileError, NamespaceError, LifecycleError) as error:
        print(f"bpflab: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except VerifierError as error:
        print(f"bpflab: error: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except AssemblyError as error:
        print(f"bpflab: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as error:
        print(f"bpflab: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (BpfPermissionError, BpfFeatureError) as error:
        print(f"bpflab: error: {error.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BpfError as error:
        print(f"bpflab: error: {error.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bpflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
