"""The classifier's maps of one bytecode program (codegen.tc.classifier), made with room for
patches (codegen.tc.classifier_patch, harness.deploy.patch), and what a patch needs to know of
them later, as JSON (`layout`, kept in the rule set's state).

- `classifier_heads`: each run's first node, by run number (the only word a patch overwrites);
- `classifier_nodes`: the nodes, then free nodes: half as many again, at least ROOM;
- `classifier_records`: the records, then a spare list of all rules for every tree run (where
  a patch writes the run's new one; the old one is the next patch's), then free records: a
  quarter as many again, at least ROOM.

Nodes and records are mmapable arrays: a patch reads and writes them in place, as memory.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.tc import classifier as C
from codegen.tc.classifier_code import HEADS_MAP, NODES_MAP, RECORDS_MAP
from codegen.tc.program import CompiledProgram

BPF_F_MMAPABLE = 1 << 10
ROOM = 4096


def make(compiled: CompiledProgram) -> tuple[dict[str, Map], dict]:
    """The program's three classifier maps, filled, and their layout (see the module doc)."""
    tables = C.Tables(nodes=compiled.nodes, records=compiled.records, heads=compiled.heads)
    runs = []
    spare = len(compiled.records)
    for run, ((chain, first, last), shape) in enumerate(
        zip(compiled.runs, compiled.shapes, strict=True)
    ):
        described: dict = {"chain": chain, "first": first, "last": last, "trees": None}
        if shape is not None:
            described.update(trees=shape[0], hulls=[[hull] for hull in shape[1]], spare=spare)
            spare += tables.every_rule(run)[1]
        runs.append(described)
    node_end = len(compiled.nodes) + max(ROOM, len(compiled.nodes) // 2)
    record_end = spare + max(ROOM, len(compiled.records) // 4)
    heads = [head.to_bytes(4, "little") for head in compiled.heads]
    made: dict[str, Map] = {}
    try:
        made[HEADS_MAP] = _array(HEADS_MAP, heads, len(heads), 0)
        made[NODES_MAP] = _array(NODES_MAP, compiled.nodes, node_end, BPF_F_MMAPABLE)
        made[RECORDS_MAP] = _array(RECORDS_MAP, compiled.records, record_end, BPF_F_MMAPABLE)
    except BaseException:
        for table in made.values():
            table.close()
        raise
    layout = {
        "runs": runs,
        "free_nodes": len(compiled.nodes),
        "node_end": node_end,
        "free_records": spare,
        "record_end": record_end,
    }
    return made, layout


def _array(name: str, values: list[bytes], size: int, flags: int) -> Map:
    """An array map of `size` entries, the first ones `values` (all of one size), written in
    one batch, or as one copy into its memory when it is mmapable."""
    table = Map(MapType.ARRAY, 4, len(values[0]), size, name=name, flags=flags)
    try:
        if flags & BPF_F_MMAPABLE:
            memory = MappedArray(table)
            try:
                memory.write(values)
            finally:
                memory.close()
        else:
            table.update_batch(list(range(len(values))), values)
    except BaseException:
        table.close()
        raise
    return table


@dataclass
class MappedArray:
    """An mmapable array map as memory: element `index` read and written in place (each
    element takes its value size rounded up to 8 bytes, as the kernel lays them out)."""

    table: Map

    def __post_init__(self) -> None:
        self.stride = (self.table.value_size + 7) // 8 * 8
        length = self.table.max_entries * self.stride
        length = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        self.memory = mmap.mmap(self.table.fd, length, mmap.MAP_SHARED)

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < self.table.max_entries:
            raise IndexError(f"{self.table.name} has no element {index}")
        at = index * self.stride
        return self.memory[at : at + self.table.value_size]

    def __setitem__(self, index: int, value: bytes) -> None:
        if not 0 <= index < self.table.max_entries or len(value) != self.table.value_size:
            raise IndexError(f"{self.table.name} has no element {index} of {len(value)} bytes")
        at = index * self.stride
        self.memory[at : at + len(value)] = value

    def write(self, values: list[bytes]) -> None:
        """Elements 0.. set to `values` (each of the value size) in one copy."""
        size = self.table.value_size
        if len(values) > self.table.max_entries or any(len(value) != size for value in values):
            raise IndexError(f"{self.table.name} takes {self.table.max_entries} of {size} bytes")
        padding = b"\0" * (self.stride - size)
        joined = padding.join(values) + padding if padding else b"".join(values)
        self.memory[: len(joined)] = joined

    def copy(self, source: int, target: int, count: int) -> None:
        """Elements source.. copied to target.. (the stretches must not overlap)."""
        if count:
            self[source + count - 1], self[target + count - 1]  # both in range
            self.memory.move(target * self.stride, source * self.stride, count * self.stride)

    def close(self) -> None:
        self.memory.close()
