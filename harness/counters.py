"""The counters map every generated program of a rule set shares: per-CPU {packets, bytes} per
rule and policy position, in the order of the rule set's `CounterLayout`.

Both the test-run runner and the deployed lifecycle read and write it; it sits below both.
"""

from __future__ import annotations

import struct

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.bpf.syscall import possible_cpus
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
        """Every position's {packets, bytes}, added up over the CPUs (read in batches)."""
        positions = self.layout.positions
        cpus = possible_cpus()
        every_cpu = struct.Struct(f"<{2 * cpus}Q")  # COUNTER_VALUE, once per CPU
        totals = {}
        for key, raw in self.lookup_batch():
            slot = int.from_bytes(key, "little")
            if slot < len(positions):
                fields = every_cpu.unpack(raw)
                totals[positions[slot]] = (sum(fields[0::2]), sum(fields[1::2]))
        return totals

    def write(self, values: dict[Position, tuple[int, int]]) -> None:
        """Set counters (on one CPU; the others zeroed), in one batch: how counters carry
        over an update."""
        zero = COUNTER_VALUE.pack(0, 0) * (possible_cpus() - 1)
        slots, packed = [], []
        for position, (packets, bytes_) in values.items():
            if position in self.layout:  # a dict lookup: tables of 100,000 rules
                slots.append(self.layout.slot(position))
                packed.append(COUNTER_VALUE.pack(packets, bytes_) + zero)
        self.update_batch(slots, packed)  # type: ignore[arg-type]
