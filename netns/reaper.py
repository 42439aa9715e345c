"""Remove what crashed or killed test runs left behind.

A `Namespace` writes its state file before creating the namespace and removes it after the
namespace is gone, so while an owner lives its namespaces always have a state file naming it.
"""

from __future__ import annotations

import os

from netns.namespace import (
    NETNS_DIR,
    PREFIX,
    STATE_DIR,
    owner_alive,
    remove_namespace,
    remove_pins,
)


def _names(directory: os.PathLike[str] | str) -> set[str]:
    try:
        return {name for name in os.listdir(directory) if name.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def reap(*, orphans: bool = False) -> list[str]:
    """Remove `bl` namespaces whose owner is dead, with their bpffs pins and state files.

    An owner is dead when its pid no longer runs or now belongs to a process started at
    another time. With `orphans`, also remove `bl` namespaces whose owner is unknown: no state
    file, or one that cannot be read. Namespaces of live owners are never touched.
    Returns the sorted names whose leftovers were removed.
    """
    removed = []
    for name in sorted(_names(NETNS_DIR) | _names(STATE_DIR)):
        state_file = STATE_DIR / name
        alive = owner_alive(state_file)
        if alive or (alive is None and not orphans):
            continue
        remove_namespace(name)
        remove_pins(name)
        # Last, so that a reaper interrupted above still finds the owner dead next time.
        state_file.unlink(missing_ok=True)
        removed.append(name)
    return removed
