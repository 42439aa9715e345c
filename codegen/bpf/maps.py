"""BPF maps: create, look up, update, delete, iterate, pin; per-CPU values summed; ring buffers.

Keys and values are bytes of the map's key and value size. Per-CPU maps take and give one value
per possible CPU; `sum_percpu` adds them up as counters are read.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Self

from .info import map_info
from .isa import MapType
from .syscall import BpfError, Command, bpf, close, pointer, possible_cpus

BPF_F_NO_PREALLOC = 1 << 0
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
_PERCPU = {MapType.PERCPU_ARRAY, MapType.PERCPU_HASH}


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("map_ifindex", ctypes.c_uint32),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # or next_key
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    ]


class Map:
    def __init__(
        self,
        map_type: MapType,
        key_size: int,
        value_size: int,
        max_entries: int,
        *,
        name: str = "",
        flags: int = 0,
        fd: int | None = None,
    ):
        self.map_type = MapType(map_type)
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.name = name
        if fd is not None:
            self.fd = fd
            return
        if self.map_type == MapType.LPM_TRIE:
            flags |= BPF_F_NO_PREALLOC  # the kernel requires it for LPM tries
        attr = _MapCreateAttr(
            map_type=self.map_type,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            map_flags=flags,
            map_name=name[:15].encode(),
        )
        self.fd = bpf(Command.MAP_CREATE, attr, f"creating {self.map_type.name} map {name!r}")

    @property
    def percpu(self) -> bool:
        return self.map_type in _PERCPU

    @property
    def stride(self) -> int:
        """Bytes per value as the kernel copies it out (per-CPU values are padded to 8)."""
        if self.percpu:
            return (self.value_size + 7) // 8 * 8 * possible_cpus()
        return self.value_size

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, key: bytes | int) -> ctypes.Array:
        if isinstance(key, int):
            key = key.to_bytes(self.key_size, "little")
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name!r} keys are {self.key_size} bytes, not {len(key)}")
        return ctypes.create_string_buffer(key, self.key_size)

    def lookup(self, key: bytes | int) -> bytes | None:
        """The value (all CPUs' values, concatenated, for a per-CPU map) or None if absent."""
        key_buffer = self._key(key)
        value = ctypes.create_string_buffer(self.stride)
        attr = _MapElemAttr(map_fd=self.fd, key=pointer(key_buffer), value=pointer(value))
        try:
            bpf(Command.MAP_LOOKUP_ELEM, attr, f"looking up in map {self.name!r}")
        except BpfError as error:
            if error.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes | int, value: bytes, flags: int = BPF_ANY) -> None:
        if self.percpu and len(value) == self.value_size:
            padded = value.ljust((self.value_size + 7) // 8 * 8, b"\0")
            value = padded * possible_cpus()  # the same value on every CPU
        if len(value) != self.stride:
            raise ValueError(f"map {self.name!r} values are {self.stride} bytes, not {len(value)}")
        key_buffer = self._key(key)
        value_buffer = ctypes.create_string_buffer(value, len(value))
        attr = _MapElemAttr(
            map_fd=self.fd, key=pointer(key_buffer), value=pointer(value_buffer), flags=flags
        )
        bpf(Command.MAP_UPDATE_ELEM, attr, f"updating map {self.name!r}")

    def update_batch(self, keys: list[bytes | int], values: list[bytes]) -> None:
        """Write many entries in one call (BPF_MAP_UPDATE_BATCH); values of one CPU's size."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        if not keys:
            return
        if any(len(value) != self.stride for value in values):
            raise ValueError(f"map {self.name!r} values are {self.stride} bytes")
        if self.key_size in _INT_KEYS and all(type(key) is int for key in keys):
            key_bytes = struct.pack(f"<{len(keys)}{_INT_KEYS[self.key_size]}", *keys)
        else:
            key_bytes = b"".join(self._key(key).raw for key in keys)
        key_buffer = ctypes.create_string_buffer(key_bytes, len(key_bytes))
        value_bytes = b"".join(values)
        value_buffer = ctypes.create_string_buffer(value_bytes, len(value_bytes))
        attr = _BatchAttr(
            keys=pointer(key_buffer),
            values=pointer(value_buffer),
            count=len(keys),
            map_fd=self.fd,
        )
        bpf(Command.MAP_UPDATE_BATCH, attr, f"updating map {self.name!r} in a batch")
        if attr.count != len(keys):
            raise BpfError(errno.EIO, f"map {self.name!r} took {attr.count} of {len(keys)} entries")

    def lookup_batch(self, chunk: int = 65536) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value (all CPUs' values for a per-CPU map), up to `chunk` a call
        (BPF_MAP_LOOKUP_BATCH): a table of 100,000 counters in two calls, not 100,000."""
        token = ctypes.create_string_buffer(max(self.key_size, 8))  # where the batch stopped
        started = False
        while True:
            keys = ctypes.create_string_buffer(chunk * self.key_size)
            values = ctypes.create_string_buffer(chunk * self.stride)
            following = ctypes.create_string_buffer(len(token))
            attr = _BatchAttr(
                in_batch=pointer(token) if started else 0,
                out_batch=pointer(following),
                keys=pointer(keys),
                values=pointer(values),
                count=chunk,
                map_fd=self.fd,
            )
            finished = False
            try:
                bpf(Command.MAP_LOOKUP_BATCH, attr, f"reading map {self.name!r} in a batch")
            except BpfError as error:
                if error.errno == errno.ENOSPC:  # a hash bucket holds more than `chunk`
                    chunk *= 2
                    continue
                if error.errno != errno.ENOENT:  # ENOENT: this batch is the last
                    raise
                finished = True
            key_bytes, value_bytes = keys.raw, values.raw
            for index in range(attr.count):
                yield (
                    key_bytes[index * self.key_size : (index + 1) * self.key_size],
                    value_bytes[index * self.stride : (index + 1) * self.stride],
                )
            if finished or attr.count == 0:
                return
            token, started = following, True

    def delete(self, key: bytes | int) -> bool:
        key_buffer = self._key(key)  # kept alive across the call: attr holds only its address
        attr = _MapElemAttr(map_fd=self.fd, key=pointer(key_buffer))
        try:
            bpf(Command.MAP_DELETE_ELEM, attr, f"deleting from map {self.name!r}")
        except BpfError as error:
            if error.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> Iterator[bytes]:
        key_buffer: ctypes.Array | None = None
        next_key = ctypes.create_string_buffer(self.key_size)
        while True:
            attr = _MapElemAttr(map_fd=self.fd, key=pointer(key_buffer), value=pointer(next_key))
            try:
                bpf(Command.MAP_GET_NEXT_KEY, attr, f"iterating map {self.name!r}")
            except BpfError as error:
                if error.errno == errno.ENOENT:
                    return
                raise
            yield next_key.raw
            key_buffer = ctypes.create_string_buffer(next_key.raw, self.key_size)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def percpu_values(self, raw: bytes) -> list[bytes]:
        step = (self.value_size + 7) // 8 * 8
        return [raw[i : i + self.value_size] for i in range(0, len(raw), step)]

    def pin(self, path: str) -> None:
        pin(self.fd, path)

    @classmethod
    def from_pin(cls, path: str) -> Map:
        fd = get_pinned(path)
        info = map_info(fd, path)
        return cls(
            MapType(info.type),
            info.key_size,
            info.value_size,
            info.max_entries,
            name=info.name.decode(),
            fd=fd,
        )


class MapGroup:
    """The maps one component's programs share (a namespace's, or a test run's), by the names
    the programs use: made, pinned and closed together."""

    def __init__(self, maps: dict[str, Map]):
        self.maps = maps

    @classmethod
    def made(cls, shapes: Mapping[str, tuple[MapType, int, int, int]]) -> Self:
        """New maps of these (type, key size, value size, entries); none left open if one
        cannot be made."""
        made: dict[str, Map] = {}
        try:
            for name, (kind, key_size, value_size, entries) in shapes.items():
                made[name] = Map(kind, key_size, value_size, entries, name=name)
        except BaseException:
            for table in made.values():
                table.close()
            raise
        return cls(made)

    def pin(self, directory: Path, replace: Callable[[Path, int], None]) -> None:
        for name, table in self.maps.items():
            replace(directory / name, table.fd)

    def close(self) -> None:
        for table in self.maps.values():
            table.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_INT_KEYS = {4: "I", 8: "Q"}  # struct codes of the integer keys update_batch packs at once


def open_pins(
    directory: Path,
    names: Iterable[str],
    fits: Callable[[Mapping[str, Map]], bool] = lambda opened: True,
) -> dict[str, Map] | None:
    """The maps pinned in `directory` under `names`, if every one is there and `fits` says
    they have the shapes their user needs; else None, with whatever was opened closed."""
    opened: dict[str, Map] = {}
    try:
        for name in names:
            opened[name] = Map.from_pin(str(directory / name))
        if fits(opened):
            return opened
    except (BpfError, FileNotFoundError):
        pass
    for table in opened.values():
        table.close()
    return None


def sum_percpu(values: list[bytes], fmt: str = "<QQ") -> tuple[int, ...]:
    """Add up per-CPU values field by field (counters are read this way)."""
    total = [0] * len(struct.unpack(fmt, values[0]))
    for value in values:
        for index, field in enumerate(struct.unpack(fmt, value)):
            total[index] += field
    return tuple(total)


def pin(fd: int, path: str) -> None:
    """Pin a map, program or link in bpffs (the directory must exist)."""
    name = ctypes.create_string_buffer(path.encode())
    bpf(Command.OBJ_PIN, _ObjAttr(pathname=pointer(name), bpf_fd=fd), f"pinning {path}")


def get_pinned(path: str) -> int:
    name = ctypes.create_string_buffer(path.encode())
    return bpf(Command.OBJ_GET, _ObjAttr(pathname=pointer(name)), f"opening pinned {path}")


def unpin(path: str) -> None:
    os.unlink(path)


class RingBuffer(Map):
    """A BPF_MAP_TYPE_RINGBUF and a consumer of its records (Documentation/bpf/ringbuf.rst)."""

    _BUSY = 1 << 31
    _DISCARD = 1 << 30
    _HEADER = 8

    def __init__(self, size: int, *, name: str = "", fd: int | None = None):
        page = mmap.PAGESIZE
        if size < page or size & (size - 1):
            raise ValueError(f"ring buffer size must be a power of two >= {page}, not {size}")
        super().__init__(MapType.RINGBUF, 0, 0, size, name=name, fd=fd)
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The producer page and the data, mapped twice in a row so records can wrap.
        self._producer = mmap.mmap(
            self.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._page = page

    @classmethod
    def from_pin(cls, path: str) -> RingBuffer:
        """The pinned ring buffer at `path`, mapped for reading its records."""
        fd = get_pinned(path)
        try:
            info = map_info(fd, path)
            if info.type != MapType.RINGBUF:
                raise ValueError(f"{path} is not a ring buffer")
            return cls(info.max_entries, name=info.name.decode(), fd=fd)
        except BaseException:
            close(fd)
            raise

    def records(self) -> list[bytes]:
        """Every record committed so far and not yet consumed."""
        out = []
        consumer = struct.unpack_from("<Q", self._consumer, 0)[0]
        producer = struct.unpack_from("<Q", self._producer, 0)[0]
        mask = self.max_entries - 1
        while consumer < producer:
            at = self._page + (consumer & mask)
            header = struct.unpack_from("<I", self._producer, at)[0]
            if header & self._BUSY:
                break
            length = header & ~(self._BUSY | self._DISCARD)
            if not header & self._DISCARD:
                out.append(bytes(self._producer[at + self._HEADER : at + self._HEADER + length]))
            consumer += (length + self._HEADER + 7) // 8 * 8
            struct.pack_into("<Q", self._consumer, 0, consumer)
        return out

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a record to read (the kernel wakes a poller of the
        ring when a program commits one); whether there is one."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(max(0, round(timeout * 1000))))

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
        super().close()
