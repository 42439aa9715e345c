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
KIND_PTR_, KIND_STRUCT_, KIND_UNION_ = 2, 4, 5
_QUALIFIERS = {8, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type tag
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

    def struct_id(self, name: str) -> int:
        """The BTF id of `struct name` (what bpf_rdonly_cast takes)."""
        return self.find(name, KIND_STRUCT_).id

    def member_offset(self, struct_name: str, path: str) -> tuple[int, int]:
        """The byte offset of `path` (members joined by dots, through nested structs and
        unions, named or not) in `struct struct_name`, and the size in bytes of what is
        there; BtfError if a member is missing or a bit field."""
        entry = self.find(struct_name, KIND_STRUCT_)
        offset = 0
        for name in path.split("."):
            found = self._member(entry, name)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {path!r} in the kernel's BTF")
            bits, type_id = found
            if bits < 0 or bits % 8:
                raise BtfError(f"{struct_name}.{path} is a bit field")
            offset += bits // 8
            entry = self._resolved(type_id)
        return offset, self._size(entry)

    def _header(self, entry: BtfType) -> tuple[int, int]:
        _name, info, size_or_type = struct.unpack_from("<III", self._types_data, entry.offset - 12)
        return info, size_or_type

    def _resolved(self, type_id: int) -> BtfType:
        """The type `type_id` names, through typedefs and qualifiers."""
        entry = self.types[type_id - 1]
        while entry.kind in _QUALIFIERS:
            entry = self.types[self._header(entry)[1] - 1]
        return entry

    def _size(self, entry: BtfType) -> int:
        if entry.kind == KIND_PTR_:
            return 8
        return self._header(entry)[1]

    def _member(self, entry: BtfType, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of member `name` of a struct or union, looked for in its
        anonymous members too; the offset is -1 for a bit field."""
        if entry.kind not in (KIND_STRUCT_, KIND_UNION_):
            return None
        kind_flag = self._header(entry)[0] >> 31
        for index in range(entry.vlen):
            name_off, type_id, bits = struct.unpack_from(
                "<III", self._types_data, entry.offset + 12 * index
            )
            field_bits = bits >> 24 if kind_flag else 0
            if kind_flag:
                bits &= 0xFFFFFF
            member = self._string(name_off)
            if member == name:
                return (bits if not field_bits else -1), type_id  # -1: a bit field
            if not member:
                inner = self._member(self._resolved(type_id), name)
                if inner is not None:
                    return (bits + inner[0] if inner[0] >= 0 else -1), inner[1]
        return None

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


# Building BTF for our own programs -----------------------------------------------------------
#
# Global functions (verified once, on their own, whatever calls them) need the program to carry
# BTF: a FUNC and FUNC_PROTO for every function, and func_info mapping each function's first
# instruction to its FUNC. Arguments are described just enough for the verifier: the context,
# a scalar, or a pointer to a block of memory of known size.

KIND_PTR, KIND_STRUCT, KIND_FUNC_PROTO = 2, 4, 13
LINKAGE_STATIC, LINKAGE_GLOBAL = 0, 1
Argument = str | int  # "ctx", "scalar", or the size in bytes of the memory a pointer points to


class BtfBuilder:
    def __init__(self) -> None:
        self._types: list[bytes] = []
        self._strings = bytearray(b"\0")
        self._string_offsets: dict[str, int] = {"": 0}
        self._cache: dict[tuple, int] = {}
        self.int_id = self._add(
            ("int",), self._type("int", 1, 0, 4, struct.pack("<I", 32 | 1 << 24))
        )

    def _string(self, text: str) -> int:
        if text not in self._string_offsets:
            self._string_offsets[text] = len(self._strings)
            self._strings += text.encode() + b"\0"
        return self._string_offsets[text]

    def _type(
        self,
        name: str,
        kind: int,
        vlen: int,
        size_or_type: int,
        extra: bytes = b"",
        kind_flag: int = 0,
    ) -> bytes:
        info = (kind_flag << 31) | (kind << 24) | vlen
        return struct.pack("<III", self._string(name), info, size_or_type) + extra

    def _add(self, key: tuple, encoded: bytes) -> int:
        if key not in self._cache:
            self._types.append(encoded)
            self._cache[key] = len(self._types)
        return self._cache[key]

    def _argument_type(self, argument: Argument) -> int:
        if argument == "scalar":
            return self.int_id
        if argument == "ctx":
            target = self._add(("ctx",), self._type("__sk_buff", KIND_STRUCT, 0, 192))
        else:
            size = int(argument)
            target = self._add(("mem", size), self._type(f"block{size}", KIND_STRUCT, 0, size))
        return self._add(("ptr", target), self._type("", KIND_PTR, 0, target))

    def function(self, name: str, arguments: tuple[Argument, ...], linkage: int) -> int:
        params = b"".join(
            struct.pack("<II", self._string(f"arg{i}"), self._argument_type(argument))
            for i, argument in enumerate(arguments)
        )
        proto = self._add(
            ("proto", arguments),
            self._type("", KIND_FUNC_PROTO, len(arguments), self.int_id, params),
        )
        # A FUNC's vlen holds its linkage.
        return self._add(("func", name), self._type(name, KIND_FUNC, linkage, proto))

    def encode(self) -> bytes:
        types = b"".join(self._types)
        header = struct.pack(
            "<HBBIIIII", _MAGIC, 1, 0, 24, 0, len(types), len(types), len(self._strings)
        )
        return header + types + bytes(self._strings)


def load_btf(blob: bytes) -> int:
    """BPF_BTF_LOAD: the fd of our BTF, or BtfError with the kernel's complaint."""
    import ctypes

    from .syscall import BpfError, Command, bpf, pointer

    class _Attr(ctypes.Structure):
        _fields_ = [
            ("btf", ctypes.c_uint64),
            ("btf_log_buf", ctypes.c_uint64),
            ("btf_size", ctypes.c_uint32),
            ("btf_log_size", ctypes.c_uint32),
            ("btf_log_level", ctypes.c_uint32),
            ("btf_log_true_size", ctypes.c_uint32),
        ]

    data = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(1 << 16)
    attr = _Attr(
        btf=pointer(data),
        btf_log_buf=pointer(log),
        btf_size=len(blob),
        btf_log_size=len(log),
        btf_log_level=1,
    )
    try:
        return bpf(Command.BTF_LOAD, attr, "loading the program's BTF")
    except BpfError as error:
        message = log.value.decode(errors="replace").strip().splitlines()
        raise BtfError(f"the kernel refused our BTF: {message[-1] if message else error}") from None
