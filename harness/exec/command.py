"""`bpflab exec --netns NS [--backend B] -- COMMAND ...` on the command line."""

from __future__ import annotations

import argparse
import os
import shutil

from .. import environment
from ..cli_input import UsageError, require


def add_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `exec` to the CLI's subcommands; the caller adds --backend."""
    description = (
        "run COMMAND (iptables-legacy, -save, -restore, or a script calling them) in NS with "
        "its filter table calls answered by bpflab's programs there; exits with its status"
    )
    sub = commands.add_parser("exec", help=description, description=description)
    sub.set_defaults(run=run_command)
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument(
        "--fastpath",
        action="store_true",
        help="apply the tables COMMAND sends with --fastpath (forward ACCEPTed FORWARD "
        "traffic); without it, as the rule set applied in NS was",
    )
    sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    return sub


def run_command(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    require(environment.missing_netns)
    from .process import run

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("exec needs a COMMAND after `--`")
    if shutil.which(command[0]) is None:
        raise UsageError(f"no command {command[0]!r} found (PATH: {os.environ.get('PATH', '')})")
    if args.backend == "c":
        require(environment.missing_bcc)
    return run(args.netns, command, backend=args.backend, fastpath=args.fastpath)
