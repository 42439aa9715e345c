"""Compiling C source to a BPF object with clang, cached by what determines the result.

The object's bytes are what `codegen.bpf.elf.read_functions` reads. An object is kept under
`<cache>/<name>-<sha256>.o`, the hash taken over clang's version, the flags and the source, so a
second compile of the same thing costs a file read; the cache is `$BPFLAB_CACHE_DIR`, else
`$XDG_CACHE_HOME/bpflab`, else `~/.cache/bpflab`. Several processes may compile at once: each
writes a temporary file and renames it into place.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .asm import Item

CLANGS = ("clang-19", "clang-18", "clang-17", "clang")
FLAGS = ("-O2", "-target", "bpf", "-mcpu=v3", "-g0", "-Wall", "-Werror")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_ERROR_RE = re.compile(r": (fatal )?error: ")


class ClangUnavailable(RuntimeError):
    """No clang that can target BPF is installed."""


class ClangError(RuntimeError):
    """clang refused the source; the message is its first error, `stderr` all it said."""

    def __init__(self, message: str, stderr: str):
        super().__init__(message)
        self.stderr = stderr


def compile_object(
    source: str,
    *,
    name: str,
    defines: Mapping[str, int | str] = {},  # noqa: B006 - read only
    include_dirs: Sequence[Path] = (),
) -> bytes:
    """Compile C `source` (diagnostics call it `name.c`) and return the BPF object's bytes."""
    if not _NAME_RE.match(name):
        raise ValueError(f"object name {name!r} must be letters, digits, '_', '.' or '-'")
    clang = find_clang()
    flags = [*FLAGS, *(f"-D{key}={value}" for key, value in sorted(defines.items()))]
    flags += [f"-I{directory}" for directory in include_dirs]
    flags += [f"-idirafter{directory}" for directory in _multiarch_includes()]
    text = f'#line 1 "{name}.c"\n{source}'
    key = hashlib.sha256("\0".join([_version(clang), *flags, text]).encode()).hexdigest()
    cache = _cache_dir()
    cached = cache / f"{name}-{key}.o"
    if cached.exists():
        return cached.read_bytes()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{name}-", suffix=".o", dir=cache)
    except OSError:  # the cache cannot be written: compile where we can, and keep nothing
        with tempfile.TemporaryDirectory(prefix="bpflab-") as directory:
            output = Path(directory) / f"{name}.o"
            _run(clang, flags, text, output, name)
            return output.read_bytes()
    os.close(descriptor)
    try:
        _run(clang, flags, text, Path(temporary), name)
        data = Path(temporary).read_bytes()
        os.replace(temporary, cached)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return data


def find_clang() -> str:
    for candidate in CLANGS:
        path = shutil.which(candidate)
        if path is not None:
            return path
    raise ClangUnavailable(
        f"no clang for the BPF target on PATH ({', '.join(CLANGS)}); scripts/bootstrap installs it"
    )


def _run(clang: str, flags: list[str], text: str, output: Path, name: str) -> None:
    command = [clang, *flags, "-c", "-x", "c", "-", "-o", str(output)]
    done = subprocess.run(command, input=text, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if _ERROR_RE.search(line)] or lines or ["no diagnostic"]
        raise ClangError(f"clang could not compile {name}.c: {errors[0]}", done.stderr)


@functools.cache
def _version(clang: str) -> str:
    done = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True)
    return done.stdout


def _multiarch_includes() -> list[Path]:
    """Debian keeps <asm/types.h>, which <linux/bpf.h> needs, under a per-architecture directory
    that clang does not search when it targets BPF."""
    names = [sysconfig.get_config_var("MULTIARCH"), f"{platform.machine()}-linux-gnu"]
    found = [Path("/usr/include") / n for n in names if n and (Path("/usr/include") / n).is_dir()]
    return found[:1]


def _cache_dir() -> Path:
    if os.environ.get("BPFLAB_CACHE_DIR"):
        return Path(os.environ["BPFLAB_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "bpflab"
    return Path.home() / ".cache" / "bpflab"


def linked_globals(
    source: str, *, name: str, arguments: Mapping[str, tuple[str | int, ...]]
) -> tuple[Item, ...]:
    """A fixed component written in C as assembler items to link into programs: `source`
    compiled, its functions read from the object, each one a BTF-described global verified
    once, described by `arguments` (the assembler's "ctx", "scalar" or a pointer's size).
    Raises ClangUnavailable, ClangError or ObjectError; RuntimeError if the object holds other
    functions than `arguments` names."""
    from .asm import Subprogram
    from .elf import read_functions  # elf reads what this module makes: imported when linking

    functions = read_functions(compile_object(source, name=name))
    if set(functions) != set(arguments):
        raise RuntimeError(f"the {name} object has {sorted(functions)}, not {sorted(arguments)}")
    items: list[Item] = []
    for function, (_, *code) in functions.items():
        items += [Subprogram(function, "global", arguments[function]), *code]
    return tuple(items)
