"""A packet script's rules given as the iptables commands someone typed (`commands = [...]`).

Each command is one `iptables ...` (or `iptables-legacy ...`) command line, for the filter
table. The kernel is the reference: at load, the commands run with the real iptables-legacy in
a throwaway namespace of their own, and its `iptables-legacy-save` is the rule set the script
checks (a command the kernel refuses is a script error at its line, with iptables' message). At
replay, the same commands run with the same binary under `bpflab exec` in the rule holder's
namespace (harness.exec), the path under test, and the table they leave must be the kernel's.
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Sequence

from codegen.rules import parse, write
from netns.namespace import Namespace

PROGRAMS = ("iptables", "iptables-legacy")
BINARY = "iptables-legacy"
COMMAND_TIMEOUT = 30.0  # seconds one command may take
# What the commands start from, as in a new namespace: the kernel's filter table, all ACCEPT.
EMPTY_TABLE = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


class CommandError(ValueError):
    """A command that cannot be run: the sentence, and which command (0-based)."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(message)


def argv_of(index: int, command: object) -> list[str]:
    """The argv of one command line: `iptables-legacy` and its words; CommandError for what is
    not an iptables command for the filter table."""
    if not isinstance(command, str):
        raise CommandError(index, "each command must be a string: an iptables command line")
    try:
        words = shlex.split(command)
    except ValueError as error:
        raise CommandError(index, f"command cannot be split into words: {error}") from None
    if not words or words[0] not in PROGRAMS:
        first = words[0] if words else ""
        raise CommandError(index, f"a command must start with iptables, not {first!r}")
    for position, word in enumerate(words):
        table = None
        if word in ("-t", "--table") and position + 1 < len(words):
            table = words[position + 1]
        elif word.startswith("--table="):
            table = word.split("=", 1)[1]
        if table is not None and table != "filter":
            raise CommandError(index, f"commands are for the filter table, not -t {table}")
    return [BINARY, *words[1:]]


def kernel_table(commands: Sequence[list[str]]) -> str:
    """The filter table the kernel holds after `commands`, as iptables-legacy-save prints it;
    CommandError for the first command it refuses."""
    with Namespace() as scratch:
        for index, argv in enumerate(commands):
            done = scratch.run(argv, check=False, timeout=COMMAND_TIMEOUT)
            if done.returncode != 0:
                said = (done.stderr.strip() or done.stdout.strip()).splitlines()
                raise CommandError(
                    index,
                    f"iptables-legacy refused the command on the kernel: {said[0] if said else ''}",
                )
        saved = scratch.run([f"{BINARY}-save", "-t", "filter"], timeout=COMMAND_TIMEOUT)
    return saved.stdout


def run_under_exec(netns: str, commands: Sequence[list[str]], backend: str) -> str | None:
    """Run `commands` under `bpflab exec` in `netns`; None if each succeeded, else what went
    wrong with the first that failed (its status and what it and the supervisor said)."""
    from harness.exec.process import run

    for argv in commands:
        said = io.StringIO()
        status = run(netns, argv, backend=backend, log=said)
        if status != 0:
            text = " ".join(said.getvalue().split())
            return f"`{shlex.join(argv)}` exited {status} under bpflab exec: {text}"
    return None


def same_table(applied: str, reference: str) -> str | None:
    """None if the two tables (iptables-save text) hold the same chains, policies and rules,
    counters aside; else the first line where they differ."""
    ours = write(parse(applied, "under bpflab exec")).splitlines()
    kernel = write(parse(reference, "on the kernel")).splitlines()
    for number, (mine, theirs) in enumerate(zip(ours, kernel, strict=False), 1):
        if mine != theirs:
            return f"line {number}: {mine!r} under bpflab exec, {theirs!r} on the kernel"
    if len(ours) != len(kernel):
        return f"{len(ours)} lines under bpflab exec, {len(kernel)} on the kernel"
    return None
