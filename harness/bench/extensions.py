"""What one rule of each extension adds per packet: the INPUT chain program of a one-rule table
timed with BPF_PROG_TEST_RUN, beside the same rule without the extension.

Every case's rule is `-A INPUT -p udp --dport 9 [EXTENSION] -j TARGET`, timed on one UDP
datagram to port 9 from 198.18.0.1 to 198.18.0.2, checked first to end where the case says (its
rule, or INPUT's policy when the match does not hold). Stateful matches are timed on the path a
repeated packet takes: `-m limit` and `-m hashlimit` over their rate (the bucket read, nothing
to take; a rate-match window counting past its burst), `-m recent --update` with the source
already in the table, conntrack and CONNMARK on a flow seen before (the tracker runs for both).
LOG is timed firing, with a ring large enough for every event of the trials (the drops would be
another path), and again with a full ring: the event is lost and counted, the packet goes on.
REJECT is timed building its answer in the packet: the answer replaces the packet, and
BPF_PROG_TEST_RUN's repeats run on the packet the previous repeat left (they would time the
answer going through the chain), so it is timed one run per call, median of ONE_SHOT_TRIALS
calls, against the baseline timed the same way (a lone run also pays for the kernel's clock
reads around it). Its ICMP rate limits are set to let every answer go (icmp_ratelimit 0, no
global credit taken): their check is timed with the answer, and no run takes the refused path
instead.

`-m owner` is timed in OUTPUT's chain program, on the same datagram with a socket given as a
test gives it (the control block's uid and gid, the groups map's list), against OUTPUT's
own baseline: what it adds is the owner's facts and the comparisons, with `--suppl-groups`
the binary search over the groups (its probes read the map value as they read a
group_info), not the walk from the skb to the cred, which no test-run packet has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scapy.layers.inet import IP, UDP

from codegen.rules import parse
from codegen.rules.icmp_rate import IcmpSysctls
from codegen.rules.packet import SocketOwner
from codegen.tc.matches.owner import NGROUPS_MAX, cb_owner

from ..runner import ChainRunner, frame_for
from .report import _ns, _table
from .settings import Progress, TimingSettings
from .testrun import BenchCheckFailed, time_program, unicast_context

RULE = "-A INPUT -p udp -m udp --dport 9"
PACKET = bytes(
    IP(src="198.18.0.1", dst="198.18.0.2", id=1) / UDP(sport=4000, dport=9) / (b"x" * 18)
)
LOG_RECORD_BOUND = 512  # bytes a LOG record of PACKET takes in the ring, at most
ONE_SHOT_TRIALS = 2001  # calls of one run each, for a case whose program rewrites the packet


@dataclass(frozen=True)
class Case:
    name: str
    rules: str  # the INPUT rules, each line `-A INPUT ...`
    ends: tuple[str, int | str]  # where the checked packet's verdict comes from
    # LOG's ring: "roomy" holds every event of the trials, "full" is filled before timing;
    # None: the default ring, for cases that log nothing.
    ring: str | None = None
    one_shot: bool = False  # the program rewrites the packet: one run per call
    owner: SocketOwner | None = None  # the socket an OUTPUT case's packet carries

    @property
    def chain(self) -> str:
        return self.ends[0]


def _one(options: str, target: str = "ACCEPT", chain: str = "INPUT") -> str:
    return f"{RULE} {options} -j {target}".replace("  ", " ").replace("INPUT", chain)


def _owned(options: str, groups: int, ends: int | str = 1) -> Case:
    """An OUTPUT case whose packet's socket is 1000:1000's, with `groups` supplementary
    groups from 5000 up (none in the cases' ranges, so that a search runs to its end)."""
    owner = SocketOwner(1000, 1000, tuple(range(5000, 5000 + groups)))
    name = f"-m owner {options}" + (f", {groups:,} groups" if groups else "")
    return Case(name, _one(f"-m owner {options}", chain="OUTPUT"), ("OUTPUT", ends), owner=owner)


CASES: tuple[Case, ...] = (
    Case("baseline: -p udp --dport 9", _one(""), ("INPUT", 1)),
    Case("-m policy --dir in --pol none", _one("-m policy --dir in --pol none"), ("INPUT", 1)),
    Case(
        "-m policy --dir in --pol ipsec (no path)",
        _one("-m policy --dir in --pol ipsec"),
        ("INPUT", "policy"),
    ),
    Case(
        "-m limit, over its rate",
        _one("-m limit --limit 1/hour --limit-burst 1"),
        ("INPUT", "policy"),
    ),
    Case(
        "-m hashlimit srcip, over its rate",
        _one(
            "-m hashlimit --hashlimit-upto 1/hour --hashlimit-burst 1 --hashlimit-mode srcip"
            " --hashlimit-name b"
        ),
        ("INPUT", "policy"),
    ),
    Case(
        "-m hashlimit srcip, a byte rate, over it",
        _one(
            "-m hashlimit --hashlimit-upto 16b/s --hashlimit-mode srcip --hashlimit-name b"
        ),
        ("INPUT", "policy"),
    ),
    Case(
        "-m hashlimit srcip --hashlimit-rate-match, a byte rate's window, over it",
        _one(
            "-m hashlimit --hashlimit-upto 16b/s --hashlimit-mode srcip --hashlimit-name b"
            " --hashlimit-rate-match"
        ),
        ("INPUT", "policy"),
    ),
    Case(
        "-m recent --update, source seen",
        f"{RULE} -m recent --set\n" + _one("-m recent --update --seconds 60"),
        ("INPUT", 2),
    ),
    Case(
        "-m conntrack --ctstate NEW", _one("-m conntrack --ctstate NEW,ESTABLISHED"), ("INPUT", 1)
    ),
    Case("-m addrtype --dst-type LOCAL", _one("-m addrtype --dst-type LOCAL"), ("INPUT", 1)),
    Case("-m set --match-set nets src", _one("-m set --match-set nets src"), ("INPUT", 1)),
    Case(
        "-j MARK --set-mark 1, then ACCEPT",
        f"{RULE} -j MARK --set-mark 0x1\n{_one('')}",
        ("INPUT", 2),
    ),
    Case(
        "-j CONNMARK --save-mark, then ACCEPT",
        f"{RULE} -j CONNMARK --save-mark\n{_one('')}",
        ("INPUT", 2),
    ),
    Case(
        "-m connmark --mark 0x1 (after --set-mark)",
        f"{RULE} -j CONNMARK --set-mark 0x1\n{_one('-m connmark --mark 0x1')}",
        ("INPUT", 2),
    ),
    Case(
        "-j LOG, firing",
        f"{RULE} -j LOG --log-prefix bench\n{_one('')}",
        ("INPUT", 2),
        ring="roomy",
    ),
    Case(
        "-j LOG, ring full (event dropped)",
        f"{RULE} -j LOG --log-prefix bench\n{_one('')}",
        ("INPUT", 2),
        ring="full",
    ),
    Case("-j REJECT (answer built)", _one("", "REJECT"), ("INPUT", 1), one_shot=True),
    _owned("--uid-owner 1000", 0),
    _owned("--gid-owner 3 --suppl-groups", 8, "policy"),
    _owned("--gid-owner 3 --suppl-groups", NGROUPS_MAX, "policy"),
)
BASELINE = CASES[0]


def _ring_for(settings: TimingSettings) -> int:
    """A power-of-two ring that holds the calibration's and every trial's events."""
    events = 1000 + settings.trials * settings.repeat
    size = 4096
    while size < events * LOG_RECORD_BOUND:
        size *= 2
    return size


def measure_case(case: Case, settings: TimingSettings) -> dict:
    text = f"*filter\n:INPUT ACCEPT [0:0]\n{case.rules}\nCOMMIT\n"
    ruleset = parse(text, f"bench-{case.name}.rules")
    ring = {"log_ring_size": _ring_for(settings)} if case.ring == "roomy" else {}
    given = {} if case.owner is None else {"owner": case.owner}
    context = unicast_context()
    if case.owner is not None:
        cb_owner(context.cb, case.owner)
    with ChainRunner(ruleset, **ring) as runner:
        for _ in range(2):  # twice: the second finds what the first left (buckets, entries)
            outcome = runner.run(frame_for(PACKET), case.chain, **given)
        if outcome.deciding != case.ends:
            raise BenchCheckFailed(
                f"extension case {case.name!r}: the packet ended at {outcome.deciding}, not"
                f" {case.ends}"
            )
        program = runner.program(case.chain)
        if runner.icmp_limits is not None and runner.hz is not None:
            runner.icmp_limits.configure(IcmpSysctls(ratelimit_ms=0), runner.hz, draw=0)
        if case.ring == "full":  # fill the ring first
            time_program(program.fd, frame_for(PACKET), settings)
        if case.one_shot:
            settings = replace(settings, trials=ONE_SHOT_TRIALS, repeat=1)
        timing = time_program(program.fd, frame_for(PACKET), settings, context=context)
        lost = runner.log_drops()
    return {
        "case": case.name,
        "rule": case.rules,
        **timing.to_json(),
        "log_drops": lost,
        "one_shot": case.one_shot,
        "chain": case.chain,
    }


def measure(settings: TimingSettings, progress: Progress) -> list[dict]:
    """Every case, in order, with what it adds to the baseline's cost (timed as it is)."""
    entries = []
    baselines: dict[tuple[str, bool], float] = {}
    for case in CASES:
        entry = measure_case(case, settings)
        kind = (case.chain, case.one_shot)
        if case is BASELINE:
            baselines[kind] = entry["ns"]
        elif kind not in baselines:  # the baseline rule in the case's chain, timed alike
            baseline = replace(
                BASELINE,
                rules=_one("", chain=case.chain),
                ends=(case.chain, 1),
                one_shot=case.one_shot,
                owner=case.owner,
            )
            baselines[kind] = measure_case(baseline, settings)["ns"]
        entry["baseline_ns"] = baselines[kind]
        entry["added_ns"] = entry["ns"] - entry["baseline_ns"]
        entries.append(entry)
        progress(f"extension  {case.name:42} {entry['ns']:7.1f} ns ({entry['added_ns']:+.1f} ns)")
    return entries


def report_lines(results: dict) -> list[str]:
    """One rule of each extension (bench/extensions.py), against the rule without it."""
    entries = results.get("extensions") or []
    if not entries:
        return []
    lines = [
        "## What one rule of each extension adds (BPF_PROG_TEST_RUN, bytecode)",
        "",
        "The INPUT chain program of `-A INPUT -p udp --dport 9 [EXTENSION] -j TARGET` on a "
        "UDP datagram to port 9; stateful matches on the path a repeated packet takes. "
        "Differences of a few ns are within this machine's noise.",
        "",
    ]
    rows = [
        [entry["case"], _ns(entry["ns"]), f"{entry['added_ns']:+.1f} ns", _note(entry)]
        for entry in entries
    ]
    return lines + _table(["rule", "per packet", "added", ""], rows)


def _note(entry: dict) -> str:
    if entry.get("log_drops"):
        return f"{entry['log_drops']:,} events dropped"
    if entry.get("chain", "INPUT") != "INPUT":  # absent before the owner cases
        baseline = _ns(entry["baseline_ns"])
        return f"{entry['chain']}'s chain program, against its baseline ({baseline})"
    if entry.get("one_shot"):  # absent in results of schema 7 and before
        return f"one run per call, against the baseline timed alike ({_ns(entry['baseline_ns'])})"
    return ""
