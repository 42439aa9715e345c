"""`bpflab`: the command line. The only place that prints errors and chooses exit codes.

Exit codes: 0 ok, 1 a check failed, 2 bad input or environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from codegen.bpf.syscall import BpfError, BpfFeatureError, BpfPermissionError

from . import environment

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input or environment: printed as one sentence, exit code 2."""


def _demo(args: argparse.Namespace) -> int:
    _require(environment.missing_bpf)
    from .demo import run_demo

    return run_demo()


def _cleanup(args: argparse.Namespace) -> int:
    _require(environment.missing_netns)
    from netns.reaper import reap

    removed = reap(orphans=args.orphans)
    for name in removed:
        print(f"removed {name}")
    if not removed:
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


def _require(probe: Callable[[], str | None]) -> None:
    reason = probe()
    if reason is not None:
        raise UsageError(reason)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpflab",
        description="Turn iptables filter-table rules into eBPF for TC and prove them on real "
        "kernels.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="assemble, verify and test-run a small filter and print its verdicts"
    )
    demo.set_defaults(run=_demo)

    cleanup = commands.add_parser(
        "cleanup", help="remove namespaces and pins left by bpflab runs that died"
    )
    cleanup.add_argument(
        "--orphans",
        action="store_true",
        help="also remove bl* namespaces that have no owner record",
    )
    cleanup.set_defaults(run=_cleanup)

    doctor = commands.add_parser("doctor", help="check what this machine can do")
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"bpflab: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BpfPermissionError, BpfFeatureError) as error:
        print(f"bpflab: error: {error.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BpfError as error:
        print(f"bpflab: error: {error.strerror}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print("bpflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
