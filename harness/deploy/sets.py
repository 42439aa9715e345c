"""The maps of `-m set` (codegen.tc.matches.set): the sets a rule set uses, read from the
namespace's own ipsets (`ipset save` run inside it) or from a file in that format, bound to
the rules (codegen.rules.extensions.set.bind_sets) and copied into one BPF map each.

Where sets come from, as `bpflab apply` takes them: `--sets FILE` when given (the namespace's
ipsets are not read then), else the namespace's own, read at apply time; `verify` and `run`
take `--sets FILE` or, without it, the stand-in sets (codegen.rules.sets.STANDIN_SETS). A set
changed after the apply is seen at the next apply, as routes are by -m addrtype.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack

from codegen.bpf.maps import Map
from codegen.rules.extensions.set import bound_sets
from codegen.rules.model import Ruleset
from codegen.rules.sets import SetError, SetTable, parse_sets
from codegen.tc.matches.set import entries, map_name, map_shape
from netns.namespace import CommandError, Namespace, NamespaceError


class SetsUnavailable(NamespaceError):
    """The namespace's ipsets cannot be read, in one sentence."""


def namespace_sets(namespace: Namespace) -> SetTable:
    """The ipsets of `namespace`, as `ipset save` prints them there."""
    if shutil.which("ipset") is None:
        raise SetsUnavailable(
            "the rules use -m set but ipset is not installed to read the namespace's sets "
            "(install it, or give --sets FILE)"
        )
    try:
        saved = namespace.run(["ipset", "save"]).stdout
    except CommandError as error:
        raise SetsUnavailable(f"ipset save failed in namespace {namespace.name}: {error}") from None
    try:
        return parse_sets(saved, f"ipset save in {namespace.name}")
    except SetError as error:
        raise SetsUnavailable(
            f"a set of namespace {namespace.name} cannot be copied: {error}"
        ) from None


def set_maps(ruleset: Ruleset) -> dict[str, Map]:
    """A new map for each set `ruleset` (bound) uses, filled, by the name the programs use;
    the caller closes them."""
    maps: dict[str, Map] = {}
    with ExitStack() as undo:
        for name, table in bound_sets(ruleset).items():
            kind, key_size, value_size, size = map_shape(table)
            held = undo.enter_context(Map(kind, key_size, value_size, size, name="bpflab_set"))
            for key, value in entries(table).items():
                held.update(key, value)
            maps[map_name(name)] = held
        undo.pop_all()
    return maps


def load_sets(namespace: Namespace, text: str) -> None:
    """Create the sets of `text` (ipset save format) in `namespace` with ipset restore, as a
    packet script's `sets` asks (our programs then read them back at apply, the netfilter
    twin matches on them)."""
    if shutil.which("ipset") is None:
        raise SetsUnavailable("the script has sets but ipset is not installed to create them")
    with tempfile.NamedTemporaryFile("w", suffix=".ipset") as file:
        file.write(text)
        file.flush()
        try:
            namespace.run(["ipset", "restore", "-file", file.name])
        except CommandError as error:
            reason = error.stderr.strip() if error.stderr else str(error)
            raise SetsUnavailable(f"ipset restore refused the sets: {reason}") from None
