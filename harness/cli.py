"""`bpflab`: the command line. The only place that prints errors and chooses exit codes.

Exit codes: 0 ok, 1 a check failed, 2 bad input or environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from codegen.bpf.syscall import BpfError, BpfFeatureError, BpfPermissionError

from . import environment
from .cli_input import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CheckFailed,
    UsageError,
    note_left_out,
    parse_rules,
    read_rules,
    read_sets,
    require,
)
from .cli_recent import recent
from .cli_run import (
    OWNER_HELP,
    OWNER_METAVAR,
    bridged_argument,
    compile_program_listing,
    run,
    verify,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# Commands -----------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    require(environment.missing_netns)
    if args.toolchain:
        from .demo import run_demo

        return run_demo()
    scripts = sorted(EXAMPLES.glob("*.toml"))
    if not scripts:
        raise UsageError(f"no example scripts in {EXAMPLES}")
    return _replay_all([str(path) for path in scripts], "bytecode")


def _replay(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    require(environment.missing_netns)
    if args.backend == "c":
        require(environment.missing_bcc)
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

    print(write(parse_rules(args.rules)), end="")
    return EXIT_OK


def _apply(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    from .deploy import lifecycle

    text, name = read_rules(args.rules)
    if args.backend == "c":
        require(environment.missing_bcc)
    applied = lifecycle.apply(
        text,
        name,
        args.netns,
        devices=args.dev or None,
        fastpath=args.fastpath,
        backend=args.backend,
        sets=read_sets(args.sets),
    )
    note_left_out(applied.left_out)
    if applied.fresh is not None:
        print(f"bpflab: {applied.fresh}", file=sys.stderr)
    verb = "replaced" if applied.replaced else "attached"
    if isinstance(applied.patched, int):  # harness.deploy.patch: the programs running stay
        verb = f"{applied.patched} changed rules replaced in the maps of the programs running"
        if not applied.patched:
            verb = "no rule changed: the programs running stay"
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
    require(environment.missing_bpffs)
    from .deploy import lifecycle
    from .deploy.listing import list_table

    ruleset, _ = lifecycle.current(args.netns)
    print(list_table(ruleset, verbose=args.verbose), end="")
    return EXIT_OK


def _save(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    from .deploy import lifecycle

    print(lifecycle.save(args.netns, args.counters), end="")
    return EXIT_OK


def _conntrack(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
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


def _log(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    import time

    from .deploy import lifecycle
    from .log_reader import namespace_log, pcap_header, pcap_record

    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    shown = packets = 0
    with lifecycle.log_maps(args.netns) as maps, ExitStack() as stack:
        pcap = None
        if args.pcap:
            try:
                pcap = stack.enter_context(open(args.pcap, "wb"))
            except OSError as error:
                raise UsageError(f"cannot write {args.pcap}: {error.strerror}") from None
            pcap.write(pcap_header())
        wall_offset = time.time_ns() - time.monotonic_ns()
        try:
            for event in namespace_log(args.netns, maps, follow=args.follow, timeout=args.timeout):
                line = event.line
                if line is None:  # an NFLOG rule's packet
                    packets += 1
                    if pcap is not None:
                        pcap.write(pcap_record(event, wall_offset))
                        pcap.flush()
                    continue
                print(f"<{event.level}>{line}" if args.levels else line, flush=args.follow)
                shown += 1
        except KeyboardInterrupt:
            pass  # the end of --follow: the count still follows
        dropped = maps.dropped()
    nflog = ""
    if packets:
        where = f"written to {args.pcap}" if args.pcap else "not kept (see --pcap)"
        nflog = f"; {packets} NFLOG packets {where}"
    print(
        f"bpflab: {shown} log lines shown{nflog}; {dropped} events dropped because the ring "
        "buffer was full",
        file=sys.stderr,
    )
    return EXIT_OK


def _flush(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    from .deploy import lifecycle

    removed = lifecycle.flush(args.netns)
    print(f"flushed namespace {args.netns}: removed {len(removed)} pins")
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    require(environment.missing_netns)
    from codegen.rules import write
    from codegen.rules.ipt_blob import read_table
    from netns.namespace import Namespace

    namespace = Namespace.existing(args.netns)
    with namespace.enter():
        ruleset = read_table()
    print(write(ruleset, counters=args.counters), end="")
    return EXIT_OK


def _cleanup(args: argparse.Namespace) -> int:
    require(environment.missing_netns)
    from netns.reaper import reap

    from .deploy import leftovers

    removed = reap(orphans=args.orphans)
    for name in removed:
        print(f"removed {name}")
    # After the reaper: the pins and state of every other namespace that is gone (any name).
    forgotten = leftovers.clean()
    for leftover in forgotten:
        print(leftover.line())
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
    for what, probe in environment.WARNINGS.items():  # said, but not a failure
        print(f"{what:10} {probe() or 'ok'}")
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

    def sets_argument(sub: argparse.ArgumentParser, default: str) -> None:
        sub.add_argument(
            "--sets",
            metavar="FILE",
            help=f"the ipsets -m set looks up, as `ipset save` prints them ({default})",
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

    sub = command(
        "compile", compile_program_listing, "print the annotated disassembly of a generated program"
    )
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--hook", choices=["ingress", "egress", "bridged"], default="ingress")
    sub.add_argument("--fastpath", action="store_true", help="forward ACCEPTed FORWARD traffic")
    bridged_argument(sub)

    sub = command("verify", verify, "load both programs into the verifier and print its stats")
    rules_argument(sub)
    backend_argument(sub)
    sub.add_argument("--fastpath", action="store_true")
    sets_argument(sub, "default: the stand-in sets")
    bridged_argument(sub)

    sub = command("run", run, "run one chain's program on packets with BPF_PROG_TEST_RUN")
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
    sub.add_argument("--owner", metavar=OWNER_METAVAR, help=OWNER_HELP)
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sets_argument(sub, "default: the stand-in sets")

    sub = command("apply", _apply, "compile, verify and attach RULES in a network namespace")
    rules_argument(sub)
    backend_argument(sub)
    sets_argument(sub, "default: the namespace's own, read with ipset save")
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
    sub = command("recent", recent, "list -m recent's tables as /proc/net/xt_recent/ does")
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument("--name", metavar="NAME", help="only this table, without its heading")

    sub = command(
        "log",
        _log,
        "print the lines the applied LOG rules wrote, as the kernel's LOG target would print "
        "them (each once); NFLOG rules' packets go to --pcap",
    )
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument(
        "-f", "--follow", action="store_true", help="wait for more lines until Ctrl-C or --timeout"
    )
    sub.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --follow: stop after this long"
    )
    sub.add_argument(
        "--levels",
        action="store_true",
        help="start each line with its syslog level as <N>, as `dmesg -r` does",
    )
    sub.add_argument(
        "--pcap",
        metavar="FILE",
        help="write the packets of NFLOG rules to FILE (pcap, raw IPv4)",
    )

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

    from .cli_sets import add_command as add_set

    add_set(commands)

    from .bench.run import add_command as add_bench

    add_bench(commands)

    from .exec.command import add_command as add_exec

    backend_argument(add_exec(commands))

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
    from .lab.errors import ScriptError

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
    except BrokenPipeError:
        # The reader went away (`bpflab run ... | head`): nothing more to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
