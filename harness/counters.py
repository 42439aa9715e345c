"""The counters map every generated program of a rule set shares: per-CPU {packets, bytes} per
rule and policy position, in the order of the rule set's `CounterLayout`.

Both the test-run runner and the deployed lifecycle read and write it; it sits below both.
"""

from __future__ import annotations

import struct

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map, sum_percpu
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import CounterLayout, Position

COUNTER_VALUE = struct.Struct("<QQ")


class CounterMap(Map):
    """The generated programs' per-CPU counters, one {packets, bytes} slot per position."""

    def __init__(self, layout: CounterLayout, *, fd: int | None = None):
        super().__init__(
            MapType.PERCPU_ARRAY, 4, COUNTER_VALUE.size, len(layout), name=COUNTERS_MAP, fd=fd
        )
        self.layout = layout

    def read(self) -> dict[Position, tuple[int, int]]:
        totals = {}
        for slot, position in enumerate(self.layout.positions):
            raw = self.lookup(slot)
            if raw is not None:
                totals[position] = sum_percpu(self.percpu_values(raw), "<QQ")
        return totals  # type: ignore[return-value]

    def write(self, values: dict[Position, tuple[int, int]]) -> None:
        """Set counters (on one CPU; the others zeroed): how counters carry over an update."""
        from codegen.bpf.syscall import possible_cpus

        zero = COUNTER_VALUE.pack(0, 0)
        for position, (packets, bytes_) in values.items():
            if position in self.layout:  # a dict lookup: tables of 100,000 rules
                value = COUNTER_VALUE.pack(packets, bytes_) + zero * (possible_cpus() - 1)
                self.update(self.layout.slot(position), value)
