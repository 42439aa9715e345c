"""What every `bpflab` command shares: the exit codes, the two exceptions the command line turns
into them, and reading a rule set from a file or stdin."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input or environment: printed as one sentence, exit code 2."""


class CheckFailed(Exception):
    """A check that ran and failed (a verifier rejection, a mismatch): exit code 1."""


def read_rules(path: str) -> tuple[str, str]:
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


def parse_rules(path: str):
    from codegen.rules import validate
    from codegen.rules.iptables_save import parse_dump

    from .collector import held_off

    text, name = read_rules(path)
    with held_off():  # harness.collector
        dump = parse_dump(text, name)
        note_left_out(dump.left_out)
        validate(dump.ruleset, parsed=True)  # its rules were checked as they were read
    return dump.ruleset


def read_sets(path: str | None):
    """The ipsets of `--sets FILE` (ipset save text), None without the option."""
    if path is None:
        return None
    from codegen.rules.sets import parse_sets

    text, name = read_rules(path)
    return parse_sets(text, name)


def note_left_out(left_out: tuple[str, ...]) -> None:
    """Say on stderr which tables of a full dump were left out, and what that means."""
    from codegen.rules.iptables_save import left_out_note

    note = left_out_note(left_out)
    if note is not None:
        print(f"bpflab: {note}", file=sys.stderr)


def require(probe: Callable[[], str | None]) -> None:
    reason = probe()
    if reason is not None:
        raise UsageError(reason)
