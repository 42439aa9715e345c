"""C functions compiled by clang, read out of the object and linked into assembled programs."""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from codegen.bpf import insn as I
from codegen.bpf.asm import Label, Subprogram, remove_unreachable
from codegen.bpf.clang import ClangError, ClangUnavailable, compile_object
from codegen.bpf.elf import ObjectError, read_functions
from codegen.bpf.insn import Insn
from codegen.bpf.isa import R0, R1, R6, AluOp, MapType, PseudoSrc
from codegen.bpf.loader import load
from codegen.bpf.maps import Map
from codegen.bpf.testrun import prog_test_run

SOURCE = """\
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

extern int some_map;

static __attribute__((noinline)) int weigh(unsigned int i)
{
    if (i % 3 == 0)
        return 2 * i;
    if (i & 1)
        return 1;
    return -1;
}

__attribute__((noinline)) int sum_to(int n)
{
    int sum = 0;
    for (int i = 0; i < n && i < 64; i++)
        sum += weigh(i);
    return sum;
}

__attribute__((noinline)) int twice(int n)
{
    return 2 * sum_to(n);
}

__attribute__((noinline)) int lookup(int key)
{
    int *value = bpf_map_lookup_elem(&some_map, &key);
    return value ? *value : -1;
}
"""


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("BPFLAB_CACHE_DIR", str(cache))
    return cache


def compiled(source: str, name: str = "test", defines: Mapping[str, int | str] = {}) -> bytes:
    try:
        return compile_object(source, name=name, defines=defines)
    except ClangUnavailable as error:
        pytest.skip(str(error))


def weigh(i: int) -> int:
    return 2 * i if i % 3 == 0 else 1 if i & 1 else -1


def insns(items: list) -> list[Insn]:
    return [item for item in items if isinstance(item, Insn)]


def test_functions_come_out_as_subprograms_with_symbolic_references() -> None:
    functions = read_functions(compiled(SOURCE))
    assert set(functions) == {"sum_to", "twice", "lookup", "weigh"}  # weigh: called, static
    for name, items in functions.items():
        assert items[0] == Subprogram(name)
        assert not any(isinstance(item, Subprogram) for item in items[1:])
        labels = {item.name for item in items if isinstance(item, Label)}
        for insn in insns(items):
            if insn.is_jump:
                assert insn.target in labels and insn.off == 0
    calls = {
        name: [i.target for i in insns(items) if i.is_pseudo_call]
        for name, items in functions.items()
    }
    assert calls["sum_to"] == ["weigh"]  # pc-relative, no relocation
    assert calls["twice"] == ["sum_to"]  # through an R_BPF_64_32 relocation
    assert any(i.is_jump for i in insns(functions["sum_to"]))  # the loop
    (map_load,) = [i for i in insns(functions["lookup"]) if i.is_wide]
    assert (map_load.map, map_load.src, map_load.imm) == ("some_map", PseudoSrc.MAP_FD, 0)


@pytest.mark.privileged
def test_linked_functions_pass_the_verifier_and_compute_what_the_c_says() -> None:
    functions = read_functions(compiled(SOURCE))
    entry = [
        I.mov64(R1, 10),
        I.call_local("twice"),
        I.mov64(R6, R0),
        I.mov64(R1, 2),
        I.call_local("lookup"),
        I.alu64(AluOp.ADD, R0, R6),
        I.exit_(),
    ]
    program = entry + [item for items in functions.values() for item in items]
    assert insns(remove_unreachable(program)) == insns(program)  # every jump target is known
    with Map(MapType.ARRAY, 4, 4, 4, name="some_map") as some_map:
        some_map.update(2, struct.pack("<i", 1000))
        with load(program, name="elf_link", maps={"some_map": some_map}) as loaded:
            result = prog_test_run(loaded.fd, bytes(64))
    assert result.retval == 2 * sum(weigh(i) for i in range(10)) + 1000


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "static const int table[] = {3, 1, 4, 1, 5, 9, 2, 6};\n"
            "__attribute__((noinline)) int pick(int n) { return table[n & 7]; }\n",
            r"^pick, instruction \d+: refers to \.rodata",
        ),
        (
            "int counter;\nint pick(int n) { counter += n; return counter; }\n",
            r"^pick, instruction \d+: refers to counter in \.bss",
        ),
        (
            "extern int elsewhere(int);\nint pick(int n) { return elsewhere(n) + 1; }\n",
            r"^pick, instruction \d+: calls elsewhere, which the object does not define",
        ),
    ],
    ids=["rodata", "bss", "extern-call"],
)
def test_what_a_program_cannot_hold_is_refused_by_name(source: str, message: str) -> None:
    with pytest.raises(ObjectError, match=message):
        read_functions(compiled(source, "refused"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"MZ" + data[2:],
        lambda data: data[:4] + b"\x01" + data[5:],  # 32-bit class
        lambda data: data[:18] + struct.pack("<H", 62) + data[20:],  # x86-64
        lambda data: data[:200],
        lambda data: data[: len(data) - 10],
    ],
    ids=["empty", "magic", "class", "machine", "truncated", "cut-headers"],
)
def test_malformed_objects_are_one_error(damage) -> None:
    data = damage(compiled(SOURCE))
    with pytest.raises(ObjectError) as error:
        read_functions(data)
    assert "\n" not in str(error.value)


def test_clang_errors_name_the_file_line_and_column() -> None:
    source = "int f(void)\n{\n    return 1\n}\n"
    with pytest.raises(ClangError, match=r"syntax\.c:3:\d+: error: expected ';'"):
        compiled(source, "syntax")


def test_a_second_compile_is_read_from_the_cache(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = "int value(void) { return N; }\n"
    first = compiled(source, "cached", {"N": 1})

    def no_clang(*args, **kwargs):
        raise AssertionError(f"clang ran again: {args}")

    with monkeypatch.context() as patch:
        patch.setattr(subprocess, "run", no_clang)
        assert compiled(source, "cached", {"N": 1}) == first
    assert compiled(source, "cached", {"N": 2}) != first
    names = sorted(path.name for path in cache_dir.iterdir())
    assert len(names) == 2 and all(re.fullmatch(r"cached-[0-9a-f]{64}\.o", n) for n in names)


def test_an_unwritable_cache_still_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BPFLAB_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert set(read_functions(compiled(SOURCE))) == {"sum_to", "twice", "lookup", "weigh"}
