"""Maps through bpf(2): every type we use, every operation, per-CPU sums, pins in bpffs."""

from __future__ import annotations

import os
import struct

import pytest

from codegen.bpf.isa import MapType
from codegen.bpf.maps import BPF_NOEXIST, Map, RingBuffer, sum_percpu
from codegen.bpf.syscall import BpfError, possible_cpus

pytestmark = pytest.mark.privileged


def test_array_lookup_update_iterate():
    with Map(MapType.ARRAY, 4, 8, 4, name="t_array") as array:
        assert array.lookup(2) == bytes(8)
        array.update(2, struct.pack("<Q", 42))
        assert array.lookup(2) == struct.pack("<Q", 42)
        assert array.lookup(4) is None  # out of range
        assert [int.from_bytes(k, "little") for k in array.keys()] == [0, 1, 2, 3]
        with pytest.raises(BpfError):
            array.delete(0)  # arrays cannot delete


def test_hash_update_delete_iterate():
    with Map(MapType.HASH, 4, 4, 8, name="t_hash") as table:
        for key in (5, 9, 1):
            table.update(key, struct.pack("<I", key * 10))
        assert dict(
            (int.from_bytes(k, "little"), int.from_bytes(v, "little")) for k, v in table.items()
        ) == {5: 50, 9: 90, 1: 10}
        with pytest.raises(BpfError, match="File exists"):
            table.update(5, bytes(4), BPF_NOEXIST)
        assert table.delete(9) is True
        assert table.delete(9) is False
        assert table.lookup(9) is None


def test_percpu_array_values_are_summed():
    with Map(MapType.PERCPU_ARRAY, 4, 16, 1, name="t_percpu") as counters:
        counters.update(0, struct.pack("<QQ", 3, 100))  # the same value on every CPU
        values = counters.percpu_values(counters.lookup(0))
        assert len(values) == possible_cpus()
        assert sum_percpu(values) == (3 * possible_cpus(), 100 * possible_cpus())


@pytest.mark.parametrize("kind", [MapType.ARRAY, MapType.PERCPU_ARRAY, MapType.HASH])
def test_batches_read_and_write_what_single_calls_do(kind: MapType) -> None:
    with Map(kind, 4, 16, 10, name="t_batch") as table:
        keys = [1, 2, 3, 5, 8, 9] if kind == MapType.HASH else list(range(10))
        values = [struct.pack("<QQ", key, key * 3) * (table.stride // 16) for key in keys]
        table.update_batch(keys, values)  # type: ignore[arg-type]
        single = dict(table.items())
        assert len(single) == len(keys)
        for chunk in (1, 3, 4, 10, 64):  # batch boundaries anywhere, and one batch of all
            assert dict(table.lookup_batch(chunk)) == single
        assert single[(8 if kind == MapType.HASH else 7).to_bytes(4, "little")][:16] == (
            struct.pack("<QQ", 8, 24) if kind == MapType.HASH else struct.pack("<QQ", 7, 21)
        )


def test_lpm_trie_longest_prefix_wins():
    def key(prefix: int, address: str) -> bytes:
        return struct.pack("<I", prefix) + bytes(int(part) for part in address.split("."))

    with Map(MapType.LPM_TRIE, 8, 4, 16, name="t_lpm") as trie:
        trie.update(key(15, "198.18.0.0"), struct.pack("<I", 1))
        trie.update(key(24, "198.18.7.0"), struct.pack("<I", 2))
        assert trie.lookup(key(32, "198.18.7.9")) == struct.pack("<I", 2)
        assert trie.lookup(key(32, "198.19.1.1")) == struct.pack("<I", 1)
        assert trie.lookup(key(32, "10.0.0.1")) is None


def test_prog_array_holds_programs():
    from codegen.bpf import insn as I
    from codegen.bpf.isa import R0
    from codegen.bpf.loader import load

    with Map(MapType.PROG_ARRAY, 4, 4, 2, name="t_progs") as progs:
        with load([I.mov64(R0, 0), I.exit_()], name="tail") as tail:
            progs.update(0, struct.pack("<I", tail.fd))
        # A prog array hands out program ids, not fds, on lookup.
        assert progs.lookup(0) is not None
        assert progs.lookup(1) is None


def test_ringbuf_size_must_be_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RingBuffer(5000)


def test_pin_and_open_again(tmp_path):
    directory = f"/sys/fs/bpf/bpflab/test-{os.getpid()}"
    os.makedirs(directory, exist_ok=True)
    path = f"{directory}/counters"
    try:
        with Map(MapType.ARRAY, 4, 8, 2, name="t_pinned") as array:
            array.update(1, struct.pack("<Q", 7))
            array.pin(path)
        with Map.from_pin(path) as again:
            assert (again.map_type, again.key_size, again.value_size) == (MapType.ARRAY, 4, 8)
            assert again.name == "t_pinned"
            assert again.lookup(1) == struct.pack("<Q", 7)
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(directory)
    with pytest.raises(BpfError, match="No such file"):
        Map.from_pin(path)


def test_batches_take_keys_as_bytes_and_eight_byte_numbers() -> None:
    with Map(MapType.HASH, 8, 8, 8, name="t_batch8") as table:
        table.update_batch([7, (1 << 40) + 3], [b"a" * 8, b"b" * 8])  # type: ignore[list-item]
        table.update_batch([(9).to_bytes(8, "little")], [b"c" * 8])
        assert dict(table.items()) == {
            (7).to_bytes(8, "little"): b"a" * 8,
            ((1 << 40) + 3).to_bytes(8, "little"): b"b" * 8,
            (9).to_bytes(8, "little"): b"c" * 8,
        }


def test_an_mmapable_array_is_written_in_one_copy_with_its_padding() -> None:
    """Elements of 12 bytes sit 16 apart in an mmapable array's memory: the copy pads each,
    and the map's own lookups read back what was written."""
    from harness.classifier_tables import BPF_F_MMAPABLE, MappedArray

    values = [bytes([n]) * 12 for n in range(1, 6)]
    with Map(MapType.ARRAY, 4, 12, 8, name="t_mmap", flags=BPF_F_MMAPABLE) as table:
        memory = MappedArray(table)
        try:
            memory.write(values)
            with pytest.raises(IndexError):
                memory.write([b"x" * 11])
        finally:
            memory.close()
        assert [table.lookup(n) for n in range(7)] == [*values, bytes(12), bytes(12)]
