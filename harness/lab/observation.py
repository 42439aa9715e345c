"""What netfilter did with one packet (`Observation`), and how it compares with another voice: the
reference evaluator or a backend (`disagreement`, a report for a failing test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from codegen.rules import Evaluation, Ruleset, evaluate

from .twin import CHAINS, Counters, Position


@dataclass(frozen=True)
class Observation:
    """What netfilter did with one packet in one chain.

    `packet` is the packet as the chain saw it (checksum fixed, trimmed, TTL decremented for
    FORWARD); `in_iface`, `out_iface` and `pkt_type` are what the chain saw, ready to hand to
    the reference evaluator (`reference`). `counters` maps every rule or policy whose counter
    moved, as (chain, 1-based index) or (chain, "policy"), to (packets, bytes) added.
    """

    chain: str
    verdict: Literal["ACCEPT", "DROP"]
    counters: Counters
    packet: bytes
    in_iface: str | None
    out_iface: str | None
    pkt_type: str
    mark: int = 0
    sent: bytes = field(default=b"", repr=False)  # the bytes injected, before the chain

    def reference(self, ruleset: Ruleset) -> Evaluation:
        """The reference evaluator's verdict for the same packet, chain and devices."""
        return evaluate(
            ruleset,
            self.packet,
            self.chain,
            self.in_iface,
            self.out_iface,
            mark=self.mark,
            pkt_type=self.pkt_type,
        )


def moved_counters(ruleset: Ruleset) -> Counters:
    """The non-zero counters of `ruleset` (read after zeroing), keyed as `Observation.counters`."""
    moved: Counters = {}
    for chain in ruleset.chains.values():
        if chain.builtin and (chain.packets or chain.bytes):
            moved[(chain.name, "policy")] = (chain.packets, chain.bytes)
        for index, rule in enumerate(chain.rules, 1):
            if rule.packets or rule.bytes:
                moved[(chain.name, index)] = (rule.packets, rule.bytes)
    return moved


def _position_order(position: Position) -> tuple[int, str, int]:
    chain, index = position
    rank = CHAINS.index(chain) if chain in CHAINS else len(CHAINS)  # type: ignore[arg-type]
    return (rank, chain, 1 << 30 if index == "policy" else int(index))


def _format_position(position: Position) -> str:
    chain, index = position
    return f"{chain} policy" if index == "policy" else f"{chain} #{index}"


def _format_counter(counter: tuple[int, int] | None) -> str:
    return "-" if counter is None else f"{counter[0]} pkt {counter[1]} B"


def describe_packet(packet: bytes) -> str:
    """A readable rendering of an IPv4 packet: scapy's repr and the bytes in hex."""
    from scapy.layers.inet import IP  # scapy is slow to import: only when a report is needed

    return f"{IP(packet)!r}\n  hex: {packet.hex()}"


class Judgement(Protocol):
    """What another voice says about a packet: the reference evaluator's `Evaluation`, or a
    backend's outcome with the same fields (`hotdrop` is optional)."""

    @property
    def verdict(self) -> str: ...
    @property
    def deciding(self) -> Position: ...
    @property
    def counters(self) -> Mapping[Position, tuple[int, int]]: ...


def disagreement(
    ruleset_text: str, observation: Observation, evaluation: Judgement, label: str = "evaluator"
) -> str | None:
    """None when `evaluation` gives the verdict and the moved counters netfilter observed;
    otherwise a report with the rule set, the packet, the chain's devices and both sides'
    counters side by side (differing rows marked `!`)."""
    if evaluation.verdict == observation.verdict and evaluation.counters == observation.counters:
        return None
    positions = sorted(set(evaluation.counters) | set(observation.counters), key=_position_order)
    rows = [("counter", label, "netfilter")]
    for position in positions:
        mine, kernel = evaluation.counters.get(position), observation.counters.get(position)
        rows.append(
            (
                ("  " if mine == kernel else "! ") + _format_position(position),
                _format_counter(mine),
                _format_counter(kernel),
            )
        )
    rows.append(("verdict", evaluation.verdict, observation.verdict))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    table = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    deciding = _format_position(evaluation.deciding)
    return (
        f"{label} and netfilter disagree in {observation.chain} "
        f"(in {observation.in_iface or '-'}, out {observation.out_iface or '-'}, "
        f"pkt_type {observation.pkt_type})\n"
        f"rule set:\n{ruleset_text}"
        f"packet as the chain saw it:\n  {describe_packet(observation.packet)}\n"
        f"{label}: {evaluation.verdict} by {deciding}"
        f"{' (hotdrop)' if getattr(evaluation, 'hotdrop', False) else ''}"
        f"{f', mark {observation.mark:#x}' if observation.mark else ''}\n{table}"
    )
