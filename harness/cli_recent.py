"""`bpflab recent --netns NS [--name NAME]`: -m recent's tables in the rule set applied in a
namespace, each entry as /proc/net/xt_recent/NAME prints it (harness.deploy.recent)."""

from __future__ import annotations

import argparse
import sys

from . import environment
from .cli_input import EXIT_OK, UsageError, require


def recent(args: argparse.Namespace) -> int:
    require(environment.missing_bpffs)
    from .deploy.recent import namespace_tables

    try:
        tables = namespace_tables(args.netns, args.name)
    except KeyError:
        raise UsageError(
            f"no rule applied in {args.netns} names the recent table {args.name!r}"
        ) from None
    for name, lines in tables.items():
        if args.name is None:
            print(f"{name}:")
        for line in lines:
            print(line)
    shown = sum(len(lines) for lines in tables.values())
    print(f"bpflab: {shown} entries in {len(tables)} recent tables.", file=sys.stderr)
    return EXIT_OK
