"""Functions out of a BPF object file, as assembler items to link into generated programs.

Some fixed runtime parts (the connection tracker) are written in C and compiled with
`clang -target bpf -O2 -c`. The result is a relocatable ELF object; this module reads its
functions, with nothing but `struct`, and returns each as `Subprogram` + instructions, so that
generated code can call them with `call_local(name)` and `assemble()` lays them out.

What the object holds and the assembler needs differently:
- jumps carry slot offsets; they become `Label`s before their targets and symbolic `target`s, so
  the functions can be placed anywhere and `remove_unreachable()` sees where they lead;
- BPF-to-BPF calls (pc-relative, or relocated with R_BPF_64_32) become calls by callee name, and
  the callees, global or static, are returned too;
- LD_IMM64 relocated with R_BPF_64_64 against a map (a symbol in `.maps`/`maps`, or an undefined
  `extern`) becomes `ld_map_fd(dst, name)`, resolved by `Assembly.link()`.
Anything else that needs a relocation (global data, `.rodata`, kfuncs) has no place in a program
built here and raises `ObjectError`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .asm import Item, Label, Subprogram
from .insn import SLOT, Insn, InsnError, decode
from .isa import Class, JmpOp, PseudoSrc

EM_BPF = 247
SHT_SYMTAB, SHT_NOBITS, SHT_REL = 2, 8, 9
SHF_EXECINSTR = 0x4
STT_FUNC, STT_SECTION = 2, 3
STB_GLOBAL = 1
SHN_UNDEF = 0
R_BPF_64_64, R_BPF_64_32 = 1, 10
MAP_SECTIONS = (".maps", "maps")

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION = struct.Struct("<IIQQQQIIQQ")
_SYMBOL = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")


class ObjectError(ValueError):
    """An object file that cannot be read, or whose code cannot be linked here."""


class _Header(NamedTuple):
    """An ELF64 section header, in the order of the file."""

    name: int
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class _Symbol:
    name: str
    kind: int
    bind: int
    shndx: int
    value: int
    size: int


@dataclass(frozen=True)
class _Object:
    sections: list[_Section]
    symbols: list[_Symbol]
    # executable section index -> byte offset in it -> (relocation type, symbol)
    relocations: Mapping[int, Mapping[int, tuple[int, _Symbol]]]

    def section_name(self, index: int) -> str:
        return self.sections[index].name if 0 < index < len(self.sections) else f"section {index}"

    def is_code(self, index: int) -> bool:
        return 0 < index < len(self.sections) and bool(self.sections[index].flags & SHF_EXECINSTR)


def read_functions(data: bytes) -> dict[str, list[Item]]:
    """Every global function of the object, and the static functions they call, as items."""
    obj = _parse(data)
    functions = {
        (s.shndx, s.value): s for s in obj.symbols if s.kind == STT_FUNC and obj.is_code(s.shndx)
    }
    pending = [s for s in functions.values() if s.bind == STB_GLOBAL]
    result: dict[str, list[Item]] = {}
    while pending:
        symbol = pending.pop(0)
        if symbol.name not in result:
            result[symbol.name], callees = _function(obj, symbol, functions)
            pending.extend(callees)
    return result


def _function(
    obj: _Object, symbol: _Symbol, functions: Mapping[tuple[int, int], _Symbol]
) -> tuple[list[Item], list[_Symbol]]:
    name, code = symbol.name, obj.sections[symbol.shndx].data
    start, end = symbol.value, symbol.value + symbol.size
    if start % SLOT or symbol.size % SLOT or not 0 < symbol.size or end > len(code):
        raise ObjectError(f"function {name} does not lie on whole instructions of its section")
    try:
        insns = decode(code[start:end])
    except InsnError as error:
        raise ObjectError(f"function {name}: {error}") from None
    slots = [0]
    for insn in insns:
        slots.append(slots[-1] + insn.slots)
    index_at = {slot: index for index, slot in enumerate(slots[:-1])}
    relocations = obj.relocations.get(symbol.shndx, {})
    for offset in relocations:
        if start <= offset < end and (offset - start) // SLOT not in index_at:
            raise ObjectError(f"function {name}: a relocation points inside an instruction")

    labels: dict[int, str] = {}  # instruction index -> label before it
    callees: list[_Symbol] = []

    def callee(where: str, shndx: int, slot: int) -> _Symbol:
        found = functions.get((shndx, slot * SLOT))
        if found is None:
            raise ObjectError(
                f"{where}: calls into {obj.section_name(shndx)} where no function starts"
            )
        callees.append(found)
        return found

    linked: list[Insn] = []
    for index, (insn, slot) in enumerate(zip(insns, slots[:-1], strict=True)):
        where = f"{name}, instruction {index}"
        relocation = relocations.get(start + slot * SLOT)
        if relocation is not None:
            kind, target = relocation
            if kind == R_BPF_64_32 and insn.is_pseudo_call and obj.is_code(target.shndx):
                found = callee(where, target.shndx, target.value // SLOT + insn.imm + 1)
                insn = dataclasses.replace(insn, imm=0, target=found.name)
            elif kind == R_BPF_64_64 and insn.is_wide and _is_map(obj, target):
                insn = dataclasses.replace(insn, src=PseudoSrc.MAP_FD, imm=0, map=target.name)
            else:
                raise ObjectError(f"{where}: {_unlinkable(obj, insn, kind, target)}")
        elif insn.is_pseudo_call:
            found = callee(where, symbol.shndx, (start // SLOT) + slot + insn.imm + 1)
            insn = dataclasses.replace(insn, imm=0, target=found.name)
        elif insn.is_jump:
            gotol = insn.cls == Class.JMP32 and insn.op == JmpOp.JA
            destination = slot + 1 + (insn.imm if gotol else insn.off)
            if destination not in index_at:
                raise ObjectError(f"{where}: jumps outside the function or into an instruction")
            label = labels.setdefault(index_at[destination], f"{name}.L{destination}")
            cleared = {"imm": 0} if gotol else {"off": 0}
            insn = dataclasses.replace(insn, target=label, **cleared)
        linked.append(insn)
    items: list[Item] = [Subprogram(name)]
    for index, insn in enumerate(linked):
        if index in labels:
            items.append(Label(labels[index]))
        items.append(insn)
    return items, callees


def _is_map(obj: _Object, symbol: _Symbol) -> bool:
    if symbol.kind == STT_SECTION:
        return False
    return symbol.shndx == SHN_UNDEF or obj.section_name(symbol.shndx) in MAP_SECTIONS


def _unlinkable(obj: _Object, insn: Insn, kind: int, symbol: _Symbol) -> str:
    """Why an instruction's relocation cannot be linked, as the end of a sentence."""
    if symbol.kind == STT_SECTION:
        what = obj.section_name(symbol.shndx)
    elif symbol.shndx == SHN_UNDEF:
        what = f"{symbol.name}, which the object does not define"
    else:
        what = f"{symbol.name} in {obj.section_name(symbol.shndx)}"
    if kind not in (R_BPF_64_64, R_BPF_64_32):
        return f"has a relocation of type {kind} against {what}, which is not handled here"
    if insn.code == Class.JMP | JmpOp.CALL:
        return f"calls {what} (a kfunc or extern?); only the object's own functions can be called"
    return (
        f"refers to {what}, which programs built here cannot hold; "
        "make the data a constant or a map"
    )


def _parse(data: bytes) -> _Object:
    try:
        return _parse_object(bytes(data))
    except struct.error:
        raise ObjectError("the BPF object file is truncated") from None


def _parse_object(data: bytes) -> _Object:
    header = _HEADER.unpack_from(data)
    ident, machine = header[0], header[2]
    shoff, shentsize, shnum, shstrndx = header[6], header[11], header[12], header[13]
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or machine != EM_BPF:
        raise ObjectError("not a 64-bit little-endian BPF ELF object (clang -target bpf -c)")
    if shentsize != _SECTION.size:
        raise ObjectError(f"the BPF object's section headers are not {_SECTION.size} bytes")
    headers = [
        _Header._make(_SECTION.unpack_from(data, shoff + i * shentsize)) for i in range(shnum)
    ]
    contents = [_contents(data, h) for h in headers]
    if not 0 < shstrndx < shnum:
        raise ObjectError("the BPF object file has no section name table")
    sections = [
        _Section(_string(contents[shstrndx], h.name), h.type, h.flags, contents[i])
        for i, h in enumerate(headers)
    ]
    tables = [i for i, h in enumerate(headers) if h.type == SHT_SYMTAB]
    if not tables:
        raise ObjectError("the BPF object file has no symbol table")
    strtab = headers[tables[0]].link
    if not 0 < strtab < shnum:
        raise ObjectError("the BPF object file's symbol table has no string table")
    symbols = [
        _Symbol(_string(contents[strtab], n), info & 0xF, info >> 4, shndx, value, size)
        for n, info, _other, shndx, value, size in _SYMBOL.iter_unpack(contents[tables[0]])
    ]
    relocations: dict[int, dict[int, tuple[int, _Symbol]]] = {}
    for header, content in zip(headers, contents, strict=True):
        if (
            header.type == SHT_REL
            and 0 < header.info < shnum
            and sections[header.info].flags & SHF_EXECINSTR
        ):
            table = relocations.setdefault(header.info, {})
            for offset, info in _REL.iter_unpack(content):
                if info >> 32 >= len(symbols):
                    raise ObjectError("a relocation of the BPF object names no symbol")
                table[offset] = (info & 0xFFFF_FFFF, symbols[info >> 32])
    return _Object(sections, symbols, relocations)


def _contents(data: bytes, header: _Header) -> bytes:
    if header.type == SHT_NOBITS:
        return b""
    if header.offset + header.size > len(data):
        raise ObjectError("the BPF object file is truncated")
    return data[header.offset : header.offset + header.size]


def _string(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    if end < 0:
        raise ObjectError("the BPF object file has a name outside its string table")
    return table[offset:end].decode(errors="replace")
