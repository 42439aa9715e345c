"""What namespaces that are gone left behind: pins under /sys/fs/bpf/bpflab/NS, the rule-set
state /run/bpflab/rulesets/NS.json, and `bpflab exec`'s /run/bpflab/exec/NS.lock and NS.table.

Every name that has any of them is judged by harness.deploy.identity: its leftovers are the ones
of a namespace that no longer exists, or whose name now holds another namespace. Whatever the
name (the lab applies to namespaces of any name, and these paths are all the project's), a live
namespace's are left alone, and so are those of a `bl` namespace whose owner still runs
(netns.namespace: it is being created or removed by that owner). An exec lock another process
holds is left too. The C backend's own compile directories (`c_PID_N`, codegen.c.compiler) are
not a namespace's and are not looked at.
"""

from __future__ import annotations

import fcntl
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from netns.namespace import PIN_ROOT, owner_alive
from netns.namespace import STATE_DIR as OWNERS

from . import identity, state
from .locking import LOCK_ROOT, lock_path, table_path

_COMPILE_DIRECTORY = re.compile(r"c_\d+_\d+")


@dataclass
class Leftover:
    """The leftovers under one name, and why they are a namespace's that is gone."""

    name: str
    why: str  # the end of a sentence: "no longer exists", "is now another namespace"
    paths: list[str] = field(default_factory=list)  # what remove() removed

    def line(self) -> str:
        count = len(self.paths)
        what = "pin or state file" if count == 1 else "pins and state files"
        return f"removed what namespace {self.name} left ({count} {what}): it {self.why}"


def _names() -> set[str]:
    names: set[str] = set()
    if PIN_ROOT.is_dir():
        names |= {
            entry.name
            for entry in PIN_ROOT.iterdir()
            if entry.is_dir() and not entry.is_symlink()
            if not _COMPILE_DIRECTORY.fullmatch(entry.name)
        }
    for directory, suffixes in (
        (state.STATE_ROOT, (".json", ".journal")),
        (LOCK_ROOT, (".lock", ".table")),
    ):
        if directory.is_dir():
            names |= {
                entry.stem
                for entry in directory.iterdir()
                if entry.suffix in suffixes
                if entry.suffix != ".lock" or _free(entry)  # a held lock is not a leftover
            }
    return {name for name in names if name not in ("", ".", "..")}


def _state(name: str) -> dict | None:
    try:
        saved = state.saved_state(name)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def find() -> list[Leftover]:
    """The names whose pins and state belong to a namespace that is gone, sorted."""
    found = []
    for name in sorted(_names()):
        if owner_alive(OWNERS / name):
            continue
        why = identity.gone(name, _state(name), PIN_ROOT / name)
        if why is not None:
            found.append(Leftover(name, why))
    return found


def _free(lock: Path) -> bool:
    """Whether no process holds the exec lock `lock` (it is then taken and let go)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def remove(leftover: Leftover) -> Leftover:
    """Remove what `leftover` names (pins, then state, then exec's files); returns it with the
    paths removed."""
    leftover.paths.extend(state.remove_stale(leftover.name))
    table = table_path(leftover.name)
    if table.exists():
        table.unlink(missing_ok=True)
        leftover.paths.append(str(table))
    lock = lock_path(leftover.name)
    if _free(lock):
        lock.unlink(missing_ok=True)
        leftover.paths.append(str(lock))
    return leftover


def clean() -> list[Leftover]:
    """Remove the leftovers of every namespace that is gone; returns what was removed (not
    those another process removed first)."""
    return [leftover for leftover in map(remove, find()) if leftover.paths]


def summary(found: list[Leftover]) -> str | None:
    """One sentence for `bpflab doctor` (None: nothing is left)."""
    if not found:
        return None
    names = ", ".join(leftover.name for leftover in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    count = (
        "1 namespace that is gone" if len(found) == 1 else f"{len(found)} namespaces that are gone"
    )
    return f"warning: {count} left pins or state ({names}{more}): run `bpflab cleanup`"
