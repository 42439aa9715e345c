"""Where an applied rule set's state lives, whose namespace it is, and the journal that makes
a SIGKILLed apply finish whole (harness.deploy.lifecycle's module doc says how they are used).

- `/run/bpflab/rulesets/NS.json`: the state of the rule set applied in NS (rules, devices,
  counter layout, the namespace's identity, the id of its counters map);
- `/run/bpflab/rulesets/NS.journal`: the state an apply is switching to, written before its
  first link update and renamed over NS.json as its commit;
- `/sys/fs/bpf/bpflab/NS/`: the pins, `identity` among them (harness.deploy.identity).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from codegen.bpf.info import map_info
from codegen.bpf.maps import get_pinned
from codegen.bpf.syscall import BpfError, close
from netns.namespace import PIN_ROOT, process_start_time

from . import identity

if TYPE_CHECKING:
    from codegen.tc.layout import CounterLayout, Position

    from ..backends import Backend

STATE_ROOT = Path("/run/bpflab/rulesets")


class LifecycleError(Exception):
    """A lifecycle step that cannot be done, in one sentence."""


def pin_dir(netns: str) -> Path:
    return PIN_ROOT / netns


def state_file(netns: str) -> Path:
    return STATE_ROOT / f"{netns}.json"


def journal_file(netns: str) -> Path:
    """The state an apply is switching to, from before its first link update to its commit."""
    return STATE_ROOT / f"{netns}.journal"


FAULT = "BPFLAB_FAULT"  # tests only: the point of apply where the process SIGKILLs itself
FAULT_POINTS = ("after-compile", "during-carry", "between-hooks", "after-pinning-maps")
PATCH_FAULT = "during-patch"  # a patched re-apply's: its maps written, its state not committed


def fault(point: str) -> None:
    if os.environ.get(FAULT) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def saved_state(netns: str) -> dict | None:
    """The state file of `netns` as written, whichever namespace it belongs to."""
    try:
        return json.loads(state_file(netns).read_text())
    except FileNotFoundError:
        return None


def read_state(netns: str) -> dict | None:
    """The state of the rule set applied in the namespace named `netns` now; None when none is,
    or when what is there belongs to a namespace of that name that is gone (identity). An
    apply that was killed between its journal and its commit is finished first."""
    finish_killed(netns)
    state = saved_state(netns)
    if state is None or identity.gone(netns, state, pin_dir(netns)) is not None:
        return None
    return state


def _applying(netns: str) -> bool:
    """Whether the apply that wrote the journal of `netns` still runs (its journal is then
    not a killed one's: it commits or removes it itself)."""
    owner = (saved_journal(netns) or {}).get("owner")
    try:
        pid, start_time = int(owner["pid"]), int(owner["start_time"])
    except (KeyError, TypeError, ValueError):
        return False
    return process_start_time(pid) == start_time


def saved_journal(netns: str) -> dict | None:
    try:
        journal = json.loads(journal_file(netns).read_text())
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) else None


def pinned_counters_id(netns: str) -> int | None:
    try:
        fd = get_pinned(str(pin_dir(netns) / "counters"))
    except BpfError:
        return None
    try:
        return map_info(fd).id
    finally:
        close(fd)


def previous_state(netns: str, saved: dict | None = None) -> dict | None:
    """The state whose layout the pinned counters have: the state file's (`saved`, if read
    already), or the journal's when an apply killed before its commit had pinned its counters
    already."""
    journal = saved_journal(netns)
    if journal is not None and journal.get("counters_id") == pinned_counters_id(netns):
        return journal
    return saved if saved is not None else saved_state(netns)


_finishing: set[str] = set()  # the namespaces whose killed apply this process is finishing


def finish_killed(netns: str) -> bool:
    """Finish the apply a killed process left the journal of in `netns`, if one did (whether
    one did: the state file changed)."""
    if netns in _finishing or not journal_file(netns).exists():
        return False
    if _applying(netns) or stale(netns) is not None:
        return False
    _finishing.add(netns)
    try:
        finish(netns)
    finally:
        _finishing.discard(netns)
    # Whatever command got here, the user learns that the rule set running changed.
    print(
        f"bpflab: completed an apply that was killed in namespace {netns}; its rule set runs"
        " there now",
        file=sys.stderr,
    )
    return True


def finish(netns: str) -> None:
    """Apply again what the journal of a killed apply holds: every device's links, every pin
    and the state then belong to that rule set, whole; its counters carried from the pinned
    ones (packets the programs counted in the moment between a kill and this are lost)."""
    journal = saved_journal(netns)
    if journal is None:  # unreadable: the apply died writing it, before any link changed
        journal_file(netns).unlink(missing_ok=True)
        return
    from codegen.rules.sets import parse_sets

    from .lifecycle import apply

    try:
        apply(
            journal["rules"],
            journal["file"],
            netns,
            devices=journal["devices"] or None,
            fastpath=journal["fastpath"],
            backend=journal.get("backend", "bytecode"),
            carry_counters=journal.get("carry_counters", True),
            sets=None if not journal.get("sets") else parse_sets(journal["sets"], "journal"),
        )
    except (KeyError, TypeError) as error:
        raise LifecycleError(
            f"the journal {journal_file(netns)} of an interrupted apply is damaged ({error}); "
            f"run `bpflab flush --netns {netns}` and apply again"
        ) from None


def stale(netns: str, saved: dict | None = None) -> str | None:
    """Why the pins and state under the name `netns` belong to a namespace that is gone (the
    end of a sentence), None if they do not or there are none. `saved`: the state file, if
    read already."""
    pins = pin_dir(netns)
    if saved is None:
        if not any(path.exists() for path in (pins, state_file(netns), journal_file(netns))):
            return None
        try:
            saved = saved_state(netns)
        except (OSError, ValueError):
            saved = None
    return identity.gone(netns, saved or saved_journal(netns), pins)


def remove_stale(netns: str) -> list[str]:
    """Remove the pins and state file left under the name `netns` by a namespace that is gone,
    never through them: the links are unpinned, not detached (their devices died with that
    namespace). The identity pin goes last, so that an interrupted removal is judged again the
    same way. Returns the paths removed."""
    pins = pin_dir(netns)
    removed: list[str] = []
    tree = pins.is_dir() and not pins.is_symlink()
    for entry in sorted(pins.iterdir()) if tree else []:
        if entry.name == identity.PIN_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(str(entry))
    for path in (journal_file(netns), state_file(netns)):
        if path.exists():
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if tree:
        if (pins / identity.PIN_NAME).exists():
            (pins / identity.PIN_NAME).unlink()
            removed.append(str(pins / identity.PIN_NAME))
        pins.rmdir()
    return removed


def journal_state(
    netns: str,
    rules_text: str,
    filename: str,
    targets: dict[str, int],
    fastpath: bool,
    layout: CounterLayout,
    identities: dict[tuple, Position],
    belongs_to: identity.Identity | None = None,
    *,
    backend: Backend = "bytecode",
    carry_counters: bool = True,
    counters_id: int = 0,
    sets: str | None = None,
    applied_with: dict | None = None,
    classifier: dict | None = None,
) -> dict:
    """The state an apply commits (see apply), for write_journal."""
    return {
        "netns": netns,
        "identity": None if belongs_to is None else belongs_to.to_json(),
        "backend": backend,
        "carry_counters": carry_counters,
        "counters_id": counters_id,  # which pinned counters map goes with this layout
        "owner": {"pid": os.getpid(), "start_time": process_start_time(os.getpid())},
        "rules": rules_text,
        "file": filename,
        "devices": sorted(targets),
        "fastpath": fastpath,
        "positions": [list(position) for position in layout.positions],
        "identities": [[list(key), list(position)] for key, position in identities.items()],
        "sets": sets,  # the -m set sets as applied (ipset save text; bpflab set changes them)
        # What the programs were built for beside the rules, and their classifier maps'
        # layouts by hook: what a later patch needs (harness.deploy.patch).
        "applied_with": applied_with,
        "classifier": classifier or {},
    }


def write_journal(netns: str, state: dict) -> None:
    """Write the journal of an apply (see apply); its commit renames it to the state file."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    _write(journal_file(netns), state)


def rewrite_state(netns: str, state: dict) -> None:
    """Replace the state file of `netns` with `state` in one step (a change made in place,
    such as `bpflab set add`); LifecycleError if it cannot be written (nothing changed)."""
    _write(state_file(netns), state)


def _write(path: Path, state: dict) -> None:
    temporary = path.with_name(f"{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(state))  # no indent: the C encoder
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise LifecycleError(storage_error(temporary, error)) from None
    os.replace(temporary, path)


def storage_error(path: Path, error: OSError) -> str:
    """One sentence for a state file that cannot be written (nothing was changed yet)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left for {path} (the filesystem of {path.parent} is full): nothing was "
            "changed; free some space there and apply again"
        )
    return f"cannot write {path}: {error.strerror or error}; nothing was changed"
