"""The bpf(2) system call through ctypes, and the errors it turns into.

We call bpf(2) directly rather than through libbpf: the attributes we need (tcx links, test-run
contexts, log_true_size) are plain structs, the distribution's libbpf is older than some of them,
and a direct call keeps one less layer between a verifier message and the user.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from functools import cache

from .isa import Command

_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) command failed; the message says what was attempted and, if known, why."""


class BpfPermissionError(BpfError):
    pass


class BpfFeatureError(BpfError):
    """The running kernel lacks something the call needs."""


_PERMISSION_HINT = (
    "needs root, or CAP_BPF with CAP_NET_ADMIN (and CAP_PERFMON for BPF-to-BPF calls); "
    "run as root or with sudo"
)


def bpf(command: Command, attr: ctypes.Structure, what: str) -> int:
    """Run one bpf(2) command. `what` names the action for error messages."""
    try:
        number = _NR_BPF[platform.machine()]
    except KeyError:
        raise BpfFeatureError(
            errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}"
        ) from None
    while True:
        result = _libc.syscall(
            number, ctypes.c_int(command), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr))
        )
        if result >= 0:
            return result
        code = ctypes.get_errno()
        if code == errno.EINTR or code == errno.EAGAIN and command == Command.PROG_LOAD:
            continue
        raise error_for(code, what)


def error_for(code: int, what: str) -> BpfError:
    if code == errno.EPERM:
        return BpfPermissionError(code, f"{what} {_PERMISSION_HINT}")
    if code == errno.ENOSYS:
        return BpfFeatureError(
            code, f"{what} failed: this kernel has no bpf(2) (CONFIG_BPF_SYSCALL)"
        )
    return BpfError(code, f"{what} failed: {os.strerror(code)}")


def pointer(buffer: ctypes.Array | bytes | None) -> int:
    """The address of a ctypes buffer, as the u64 the kernel expects."""
    if buffer is None:
        return 0
    return ctypes.addressof(buffer)


def close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@cache
def possible_cpus() -> int:
    """How many CPUs per-CPU maps hold a value for (the kernel's cpu_possible_mask)."""
    with open("/sys/devices/system/cpu/possible") as file:
        text = file.read().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count
