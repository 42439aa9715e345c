"""Rule sets of the shapes people bring (bench/shapes.py: a CIDR deny list, a mixed ACL, a port
range list) from a thousand rules up: what a packet costs aimed at the first rule, the last and
none, how long the INPUT chain program and a whole `apply` take, and how big the programs are.

Per shape and size: the text is parsed once (`parse_s`); the INPUT chain program is compiled,
verified and loaded (`load_s`), checked to decide each packet by the rule the shape aims it at,
and timed with BPF_PROG_TEST_RUN as the rest of the bench times chain programs; then the whole
rule set is applied to a namespace holding the devices the ACL names, two veth pairs (parse,
both hooks' programs compiled, verified and attached: `apply_s`), applied again over itself
(`reapply_s`: no rule changed, so the programs stay: harness.deploy.patch), and applied with
its middle rule replaced by one of the same shape (`changed_s`, and `changed_in_place`: whether
the programs stayed, the rule replaced in their maps, or the apply was whole). The set
shape's N are its set's members, parsed with its one rule (`parse_s`).
The C backend's INPUT chain program (`c`: its rule table, scanned in rule order, the oracle the
differential tests compare with) is loaded and timed on the same packets, when bcc is here.
"""

from __future__ import annotations

from collections.abc import Callable

from codegen.rules import parse
from codegen.rules.sets import parse_sets
from netns import Namespace

from ..runner import ChainRunner, frame_for
from .report import _ns, _table
from .settings import Progress, TimingSettings
from .shapes import INTERFACES, SEED, SHAPES, decided_by, packet, rules, sets
from .testrun import BenchCheckFailed, ProgramFacts, time_program

POSITIONS = ("first", "last", "none")


def _namespace_devices(namespace: Namespace) -> None:
    """Devices named as the ACL shape's `-i` rules name them: veth pairs of two of them."""
    with namespace.ipr() as ipr:
        for name, peer in zip(INTERFACES[::2], INTERFACES[1::2], strict=True):
            ipr.link("add", ifname=name, kind="veth", peer=peer)
        for name in INTERFACES:
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")


def _check(runner: ChainRunner, frame: bytes, shape: str, count: int, position: str) -> None:
    outcome = runner.run(frame, "INPUT")
    verdict, rule = decided_by(shape, count, position)
    if (outcome.verdict, outcome.deciding) != (verdict, ("INPUT", rule)):
        raise BenchCheckFailed(
            f"{shape} of {count:,} rules decided {outcome.verdict} by {outcome.deciding} for "
            f"the {position} packet, want {verdict} by ('INPUT', {rule!r})"
        )


def _chain_program(runner: ChainRunner, shape: str, count: int, settings, clock) -> dict:
    """Load the INPUT chain program, check it on the shape's packets and time it on each."""
    started = clock()
    program = runner.program("INPUT")
    load_s = clock() - started
    facts = ProgramFacts.of(program.fd)
    timing = {}
    for position in POSITIONS:
        frame = frame_for(packet(shape, position))
        _check(runner, frame, shape, count, position)
        timing[position] = time_program(program.fd, frame, settings).to_json()
    return {
        "load_s": load_s,
        "instructions": facts.xlated_instructions,
        "verifier_processed": facts.verifier_processed,
        "ns_per_packet": {position: timing[position]["ns"] for position in POSITIONS},
        "timing": timing,
    }


def measure_shape(
    shape: str,
    count: int,
    settings: TimingSettings,
    clock: Callable[[], float],
    c_backend: bool = False,
) -> dict:
    text = rules(shape, count)
    filename = f"bench-{shape}-{count}.rules"
    listed = sets(shape, count)
    started = clock()
    ruleset = parse(text, filename)
    table = None if listed is None else parse_sets(listed, f"bench-{shape}-{count}.sets")
    parse_s = clock() - started
    with ChainRunner(ruleset, sets=table) as runner:
        bytecode = _chain_program(runner, shape, count, settings, clock)
    c = None
    if c_backend:
        with ChainRunner(ruleset, sets=table, backend="c") as runner:
            c = _chain_program(runner, shape, count, settings, clock)
    from ..deploy.lifecycle import apply

    with Namespace() as namespace:
        _namespace_devices(namespace)
        started = clock()
        applied = apply(text, filename, namespace.name, sets=table)
        apply_s = clock() - started
        started = clock()
        apply(text, filename, namespace.name, sets=table)
        reapply_s = clock() - started
        changed_s = changed_in_place = None
        if listed is None:  # the set shape has one rule: its changes are the set's
            changed = _one_rule_changed(text, shape, count)
            started = clock()
            patched = apply(changed, filename, namespace.name, sets=table).patched
            changed_s, changed_in_place = clock() - started, isinstance(patched, int)
        ingress = applied.programs["ingress"]
        egress = applied.programs["egress"]
        hooks = {
            name: {
                "instructions": loaded.insn_count,
                "verifier_processed": loaded.stats.insns_processed if loaded.stats else None,
            }
            for name, loaded in (("ingress", ingress), ("egress", egress))
        }
    return {
        "shape": shape,
        "rules": count,
        "parse_s": parse_s,
        **bytecode,
        "apply_s": apply_s,
        "reapply_s": reapply_s,
        "changed_s": changed_s,
        "changed_in_place": changed_in_place,
        "hooks": hooks,
        "c": c,
    }


def _one_rule_changed(text: str, shape: str, count: int) -> str:
    """The rule set with its middle INPUT rule replaced by the middle one of another draw of
    the same shape."""
    lines = text.splitlines()
    other = [line for line in rules(shape, count, seed=SEED + 1).splitlines() if "-A INPUT" in line]
    at = [number for number, line in enumerate(lines) if line.startswith("-A INPUT")]
    lines[at[len(at) // 2]] = other[len(other) // 2]
    return "\n".join(lines) + "\n"


def measure(
    sizes: tuple[int, ...],
    settings: TimingSettings,
    clock: Callable[[], float],
    progress: Progress,
    c_backend: bool = False,
) -> list[dict]:
    """Every shape at every size, smallest first; with `c_backend`, its chain programs too."""
    entries = []
    for shape in SHAPES:
        for count in sorted(sizes):
            entry = measure_shape(shape, count, settings, clock, c_backend)
            entries.append(entry)
            ns = entry["ns_per_packet"]
            progress(
                f"shape {shape:7} {count:>7,} rules: first {ns['first']:,.0f} ns, last "
                f"{ns['last']:,.0f} ns, no match {ns['none']:,.0f} ns; parse "
                f"{entry['parse_s']:.2f} s, chain program {entry['load_s']:.2f} s, apply "
                f"{entry['apply_s']:.2f} s, again {entry['reapply_s']:.2f} s" + _changed(entry)
            )
            if entry["c"] is not None:
                ns = entry["c"]["ns_per_packet"]
                progress(
                    f"shape {shape:7} {count:>7,} rules, c: first {ns['first']:,.0f} ns, last "
                    f"{ns['last']:,.0f} ns, no match {ns['none']:,.0f} ns; chain program "
                    f"{entry['c']['load_s']:.2f} s"
                )
    return entries


def report_lines(results: dict) -> list[str]:
    """The shapes' table (bench/shaped.py)."""
    entries = results.get("shapes") or []
    if not entries:
        return []
    lines = [
        "## Rule sets of real shapes (BPF_PROG_TEST_RUN, bytecode)",
        "",
        "The INPUT chain program on a packet decided by the first rule, the last, or the "
        "policy; `apply` is parse, both hooks' programs compiled, verified and attached; "
        "`again` the same text applied again; `one rule changed` the middle rule replaced "
        "(in the maps: the programs stayed, harness.deploy.patch).",
        "",
    ]
    rows = [
        [
            f"{entry['shape']}: {SHAPES[entry['shape']].summary}",
            f"{entry['rules']:,}",
            *(_ns(entry["ns_per_packet"][position]) for position in POSITIONS),
            f"{entry['verifier_processed']:,}",
            f"{entry['parse_s']:.2f} s",
            f"{entry['apply_s']:.2f} s",
            f"{entry['reapply_s']:.2f} s",
            _changed(entry).removeprefix(", one rule changed "),
        ]
        for entry in entries
    ]
    header = ["shape", "rules", "first", "last", "no match", "verifier", "parse", "apply", "again"]
    header.append("one rule changed")
    return lines + _table(header, rows) + _c_lines(entries)


def _changed(entry: dict) -> str:
    """The one-rule-changed apply's time and how it was made, if it was measured."""
    if entry.get("changed_s") is None:
        return ""
    how = "in the maps" if entry["changed_in_place"] else "whole"
    return f", one rule changed {entry['changed_s']:.2f} s ({how})"


def _c_lines(entries: list[dict]) -> list[str]:
    """The C backend's chain programs of the same shapes, where it was measured."""
    measured = [entry for entry in entries if entry.get("c")]
    if not measured:
        return []
    rows = [
        [
            entry["shape"],
            f"{entry['rules']:,}",
            *(_ns(entry["c"]["ns_per_packet"][position]) for position in POSITIONS),
            f"{entry['c']['verifier_processed']:,}",
            f"{entry['c']['load_s']:.2f} s",
        ]
        for entry in measured
    ]
    header = ["shape", "rules", "first", "last", "no match", "verifier", "chain program"]
    return [
        "",
        "The C backend (bcc) on the same rule sets: the oracle, its runs of plain rules "
        "scanned from a rule table in rule order (codegen/c/table.py), so a packet that "
        "matches late pays for every rule before.",
        "",
        *_table(header, rows),
    ]
