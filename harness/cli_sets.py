"""`bpflab set add|del|list|save`: the -m set sets of the rule set applied in a namespace,
changed in place as `ipset add|del` changes a set and listed as `ipset list|save` prints
them (harness.deploy.sets)."""

from __future__ import annotations

import argparse
import sys

from codegen.rules.set_changes import header, save_text, shown
from codegen.rules.sets import IpSet, SetTable

from . import environment
from .cli_input import EXIT_OK, UsageError, require


def add_command(commands: argparse._SubParsersAction) -> None:
    help = "change or list the -m set sets of an applied rule set, as ipset does"
    sub = commands.add_parser("set", help=help, description=help)
    sub.set_defaults(run=_set)
    sub.add_argument("action", choices=["add", "del", "list", "save"])
    sub.add_argument("name", nargs="?", metavar="NAME", help="the set (list, save: default all)")
    sub.add_argument(
        "entry",
        nargs="*",
        metavar="ENTRY",
        help="add, del: the member as ipset takes it, e.g. 198.18.0.0/24 nomatch",
    )
    sub.add_argument("--netns", required=True, metavar="NS")
    sub.add_argument(
        "--exist",
        action="store_true",
        help="as ipset -exist: adding a member already there replaces it, deleting one that "
        "is not there is no error",
    )


def _set(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    from .deploy.sets import applied_sets, change_set

    if args.action in ("add", "del"):
        if args.name is None or not args.entry:
            raise UsageError(f"set {args.action} needs a set NAME and an ENTRY")
        went_in, went_out = change_set(
            args.netns,
            args.name,
            " ".join(args.entry),
            delete=args.action == "del",
            exist=args.exist,
        )
        print(
            f"bpflab: set {args.name} in {args.netns}: {went_in} added, {went_out} removed.",
            file=sys.stderr,
        )
        return EXIT_OK
    if args.entry:
        raise UsageError(f"set {args.action} takes no ENTRY")
    sets = applied_sets(args.netns)
    if args.name is not None:
        if args.name not in sets:
            raise UsageError(
                f"the rule set applied in namespace {args.netns} uses no set '{args.name}'"
            )
        sets = SetTable({args.name: sets[args.name]})
    if args.action == "save":
        sys.stdout.write(save_text(sets))
        return EXIT_OK
    for number, table in enumerate(sets.sets.values()):
        if number:
            print()
        sys.stdout.write(listing(table))
    return EXIT_OK


def listing(table: IpSet) -> str:
    """`table` as `ipset list NAME` prints it (without the lines about the kernel's memory)."""
    lines = [
        f"Name: {table.name}",
        f"Type: {table.kind}",
        f"Header: {header(table)}",
        f"Number of entries: {len(table.members)}",
        "Members:",
        *(shown(table, member, flag=True) for member in table.members),
    ]
    return "".join(line + "\n" for line in lines)
