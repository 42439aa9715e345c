"""Just enough of BTF to look up names in the kernel's own type information.

kfunc calls name a kernel function by its BTF type id in vmlinux, and the kernel's enumerations
(helper ids, attach types) let tests check our constants against the running kernel.
Format: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

VMLINUX = "/sys/kernel/btf/vmlinux"
_MAGIC = 0xEB9F

# Kinds, and the size of the data that follows each type's 12-byte header.
KIND_INT, KIND_ENUM, KIND_FUNC, KIND_ENUM64 = 1, 6, 12, 19
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BtfError(LookupError):
    pass


@dataclass(frozen=True)
class BtfType:
    id: int
    name: str
    kind: int
    vlen: int
    offset: int  # of the data after the header, in the type section


class Btf:
    def __init__(self, data: bytes):
        magic, _version, _flags, header_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BtfError("not BTF data (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._types_data = data[header_len + type_off : header_len + type_off + type_len]
        self._strings = data[header_len + str_off : header_len + str_off + str_len]
        self.types: list[BtfType] = []
        self._by_name: dict[tuple[str, int], list[BtfType]] = {}
        self._parse()

    def _string(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode()

    def _parse(self) -> None:
        data = self._types_data
        offset = 0
        type_id = 1  # id 0 is void
        while offset < len(data):
            name_off, info, _size = struct.unpack_from("<III", data, offset)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            entry = BtfType(type_id, self._string(name_off), kind, vlen, offset + 12)
            self.types.append(entry)
            self._by_name.setdefault((entry.name, kind), []).append(entry)
            offset += 12 + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_MEMBER.get(kind, 0) * vlen
            type_id += 1

    def find(self, name: str, kind: int) -> BtfType:
        found = self._by_name.get((name, kind))
        if not found:
            raise BtfError(f"{name!r} is not in the kernel's BTF")
        return found[0]

    def function_id(self, name: str) -> int:
        try:
            return self.find(name, KIND_FUNC).id
        except BtfError:
            raise BtfError(f"kernel function {name!r} is not in the kernel's BTF") from None

    def enum(self, name: str) -> dict[str, int]:
        """Members of the enum `name`, or of the (often anonymous) enum that has member `name`."""
        found = self._by_name.get((name, KIND_ENUM))
        if found:
            return self._members(found[0])
        for entry in self.types:
            if entry.kind == KIND_ENUM and name in self._members(entry):
                return self._members(entry)
        raise BtfError(f"enum {name!r} is not in the kernel's BTF")

    def _members(self, entry: BtfType) -> dict[str, int]:
        values = {}
        for index in range(entry.vlen):
            name_off, value = struct.unpack_from("<Ii", self._types_data, entry.offset + 8 * index)
            values[self._string(name_off)] = value
        return values


@cache
def vmlinux() -> Btf:
    try:
        with open(VMLINUX, "rb") as file:
            return Btf(file.read())
    except FileNotFoundError:
        raise BtfError(
            f"{VMLINUX} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF"
        ) from None
