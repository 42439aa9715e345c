"""Loading programs into the kernel: the verifier's verdict, its log and its statistics.

A load first asks only for statistics (log level 4), which costs nothing on success. When the
verifier refuses, the load is repeated with the full log (level 1) so the error can be traced to
the failing instruction and, through its annotation, to whatever produced it.
"""

from __future__ import annotations

import ctypes
import errno
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import btf as btf_module
from .asm import Assembly, Item, assemble
from .disasm import disassemble
from .isa import ProgType
from .syscall import BpfError, Command, bpf, close, error_for, pointer

LOG_LEVEL_VERBOSE = 1
LOG_LEVEL_STATS = 4
FAILURE_LOG_SIZE = 1 << 20  # first try; grown to what the kernel says it needs
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,15}$")


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("core_relo_cnt", ctypes.c_uint32),
        ("fd_array", ctypes.c_uint64),
        ("core_relos", ctypes.c_uint64),
        ("core_relo_rec_size", ctypes.c_uint32),
        ("log_true_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class VerifierStats:
    insns_processed: int
    states_total: int
    states_peak: int
    verification_usec: int

    @classmethod
    def from_log(cls, log: str) -> VerifierStats | None:
        processed = re.search(r"processed (\d+) insns .*?total_states (\d+) peak_states (\d+)", log)
        if processed is None:
            return None
        time = re.search(r"verification time (\d+) usec", log)
        return cls(
            int(processed.group(1)),
            int(processed.group(2)),
            int(processed.group(3)),
            int(time.group(1)) if time else 0,
        )


class VerifierError(BpfError):
    """The verifier refused the program.

    Holds the whole log, the index (in slots, as the log counts) of the instruction the verifier
    stopped at, that instruction and its annotation. The message is short: the last lines of the
    log and the annotation.
    """

    def __init__(
        self,
        code: int,
        name: str,
        log: str,
        slot: int | None,
        insn: object | None,
    ):
        self.log = log
        self.slot = slot
        self.insn = insn
        self.annotation = getattr(insn, "annotation", None)
        tail = error_lines(log)
        where = ""
        if slot is not None:
            where = f" at instruction {slot}"
            if insn is not None:
                where += f" ({disassemble(insn)})"
            if self.annotation is not None:
                where += f" from {self.annotation}"
        reason = " / ".join(tail) if tail else "no log"
        super().__init__(code, f"the verifier rejected program {name!r}{where}: {reason}")

    def __str__(self) -> str:
        return self.args[1]


@dataclass
class LoadedProgram:
    fd: int
    name: str
    prog_type: ProgType
    assembly: Assembly
    stats: VerifierStats | None
    log: str = ""
    maps: dict[str, int] = field(default_factory=dict)
    resources: list = field(default_factory=list)  # objects closed with the program (maps)
    layout: dict | None = None  # its classifier maps' (harness.classifier_tables), as JSON

    @property
    def insn_count(self) -> int:
        return self.assembly.slot_count

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1
        for resource in self.resources:
            resource.close()
        self.resources.clear()

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    program: Iterable[Item] | Assembly,
    *,
    name: str = "bpflab",
    prog_type: ProgType = ProgType.SCHED_CLS,
    maps: Mapping[str, object] | None = None,
    license: str = "GPL",
    log_level: int = LOG_LEVEL_STATS,
) -> LoadedProgram:
    """Assemble (if needed), link and load a program; raise VerifierError if it is refused.

    `maps` maps the names used in `ld_map_fd`/`ld_map_value` to objects with an `fd` (or fds).
    A `log_level` above statistics keeps the verifier's whole log of an accepted program.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"program name {name!r} must be 1-15 characters of [A-Za-z0-9_]")
    assembly = program if isinstance(program, Assembly) else assemble(program)
    fds = {key: getattr(value, "fd", value) for key, value in (maps or {}).items()}
    needs_btf = any(insn.kfunc for insn in assembly.insns)
    kfunc_id = btf_module.vmlinux().function_id if needs_btf else None
    code = b"".join(insn.encode() for insn in assembly.link(fds, kfunc_id))
    buffer = ctypes.create_string_buffer(code, len(code))
    licence = ctypes.create_string_buffer(license.encode())
    btf_fd, func_info = _function_info(assembly)

    def attempt(level: int, log_size: int) -> tuple[int, str, int]:
        log = ctypes.create_string_buffer(log_size)
        attr = _ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(code) // 8,
            insns=pointer(buffer),
            license=pointer(licence),
            log_level=level,
            log_size=log_size,
            log_buf=pointer(log),
            prog_name=name.encode(),
        )
        if btf_fd >= 0:
            attr.prog_btf_fd = btf_fd
            attr.func_info_rec_size = 8
            attr.func_info = pointer(func_info)
            attr.func_info_cnt = len(assembly.functions)
        try:
            fd = bpf(Command.PROG_LOAD, attr, f"loading program {name!r}")
        except BpfError as error:
            text = log.value.decode(errors="replace")
            return -(error.errno or 1), text, attr.log_true_size
        return fd, log.value.decode(errors="replace"), attr.log_true_size

    try:
        size = 1 << 16 if log_level == LOG_LEVEL_STATS else 1 << 24
        fd, text, true_size = attempt(log_level, size)
        if fd == -errno.ENOSPC:
            # Accepted, but the log did not fit (a long program logs a line per function).
            fd, text, _ = attempt(log_level, max(true_size + 1, size * 4))
        if fd >= 0:
            stats = VerifierStats.from_log(text)
            return LoadedProgram(fd, name, prog_type, assembly, stats, text, fds)
        _raise_refusal(-fd, name, assembly, attempt)
    finally:
        close(btf_fd)
    raise AssertionError("unreachable")


def _function_info(assembly: Assembly) -> tuple[int, ctypes.Array | None]:
    """BTF and func_info for programs with global functions; (-1, None) for the others."""
    if all(function.linkage == "static" for function in assembly.functions[1:]):
        return -1, None
    builder = btf_module.BtfBuilder()
    records = b""
    for index, function in enumerate(assembly.functions):
        linkage = (
            btf_module.LINKAGE_GLOBAL
            if index == 0 or function.linkage == "global"
            else (btf_module.LINKAGE_STATIC)
        )
        type_id = builder.function(_btf_name(function.name), function.arguments, linkage)
        records += struct.pack("<II", function.start, type_id)
    fd = btf_module.load_btf(builder.encode())
    return fd, ctypes.create_string_buffer(records, len(records))


def _btf_name(name: str) -> str:
    """Function names as BTF accepts them (C identifiers)."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"f_{cleaned}"


# What the verifier fails a program with, beside a failure of the call: ENOMEM too, for "The
# sequence of 8193 jumps is too complex" and for jumps its rewrites push past 16 bits.
REFUSALS = (errno.EACCES, errno.EINVAL, errno.E2BIG, errno.ENOSPC, errno.EFAULT, errno.ENOMEM)


def _raise_refusal(failure: int, name: str, assembly: Assembly, attempt) -> None:
    if failure not in REFUSALS:
        raise error_for(failure, f"loading program {name!r}")
    # Refused: ask again for the whole log, growing the buffer until it fits.
    size = FAILURE_LOG_SIZE
    while True:
        fd, text, true_size = attempt(LOG_LEVEL_VERBOSE | LOG_LEVEL_STATS, size)
        if fd >= 0:  # accepted on the second try: should not happen, but do not leak it
            close(fd)
            raise error_for(failure, f"loading program {name!r}")
        if -fd == errno.ENOSPC and size < (1 << 30):
            size = max(size * 4, true_size + 1)
            continue
        break
    slot = failing_slot(text)
    insn = assembly.insn_at_slot(slot) if slot is not None else None
    raise VerifierError(failure, name, text, slot, insn)


_STATS_LINE = re.compile(r"^(verification time|stack depth|processed \d+ insns)")


def error_lines(log: str, count: int = 2) -> list[str]:
    """The verifier's own complaint: the last lines before its statistics."""
    lines = [line for line in log.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not _STATS_LINE.match(line)]
    return lines[-count:]


_INSN_LINE = re.compile(r"^(\d+): \([0-9a-f]{2}\)", re.MULTILINE)


def failing_slot(log: str) -> int | None:
    """The instruction the verifier was looking at when it stopped: the last one it printed."""
    found = _INSN_LINE.findall(log)
    return int(found[-1]) if found else None
