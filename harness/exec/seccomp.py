"""The kernel interface of `bpflab exec`: a classic-BPF seccomp filter that hands the
iptables socket options to a supervisor (SECCOMP_RET_USER_NOTIF), the notification ioctls,
and reads and writes of the notifying process's memory (process_vm_readv/writev).

Everything is ctypes over libc and raw syscall numbers of x86_64: no package to install.
The filter is pure data (`filter_program`), so unit tests can run it through a small cBPF
evaluator without installing it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

# <linux/audit.h>, <asm/unistd_64.h>, <linux/seccomp.h>, <linux/filter.h>
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
NR_SETSOCKOPT = 54
NR_GETSOCKOPT = 55
NR_SECCOMP = 317
NR_PIDFD_GETFD = 438
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38
SOL_IP = 0
# IPT_SO_SET_REPLACE/GET_INFO (64) .. IPT_SO_GET_REVISION_TARGET (67), <netfilter_ipv4/ip_tables.h>
FIRST_OPTION, LAST_OPTION = 64, 67

# struct seccomp_data: nr, arch, instruction_pointer, args[6]; the low half of args[i] is at
# 16 + 8 * i on a little-endian machine.
DATA_NR, DATA_ARCH = 0, 4
DATA_LEVEL, DATA_OPTNAME = 16 + 8 * 1, 16 + 8 * 2

# Classic BPF opcodes.
LD_W_ABS = 0x20
JEQ_K, JGE_K, JGT_K, JSET_K = 0x15, 0x35, 0x25, 0x45
RET_K = 0x06

SOCK_FILTER = struct.Struct("<HBBI")


@dataclass(frozen=True)
class Insn:
    code: int
    k: int
    true: str | None = None  # label of a jump's targets (None: the next instruction)
    false: str | None = None
    label: str | None = None


def _source() -> list[Insn]:
    return [
        Insn(LD_W_ABS, DATA_ARCH),
        Insn(JEQ_K, AUDIT_ARCH_X86_64, false="kill"),
        Insn(LD_W_ABS, DATA_NR),
        # x32 system calls share the x86_64 arch value and have their own numbers.
        Insn(JSET_K, X32_SYSCALL_BIT, true="enosys"),
        Insn(JEQ_K, NR_GETSOCKOPT, true="level"),
        Insn(JEQ_K, NR_SETSOCKOPT, false="allow"),
        # level and optname are ints: only the low 32 bits count, as in the kernel.
        Insn(LD_W_ABS, DATA_LEVEL, label="level"),
        Insn(JEQ_K, SOL_IP, false="allow"),
        Insn(LD_W_ABS, DATA_OPTNAME),
        Insn(JGE_K, FIRST_OPTION, false="allow"),
        Insn(JGT_K, LAST_OPTION, true="allow"),
        Insn(RET_K, SECCOMP_RET_USER_NOTIF),
        Insn(RET_K, SECCOMP_RET_ALLOW, label="allow"),
        Insn(RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS, label="enosys"),
        Insn(RET_K, SECCOMP_RET_KILL_PROCESS, label="kill"),
    ]


def filter_program() -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) tuples: SECCOMP_RET_USER_NOTIF for getsockopt and
    setsockopt at SOL_IP with an option in 64..67 (the supervisor lets through what is not
    the filter table's), SECCOMP_RET_ALLOW for every other x86_64 call, ENOSYS for x32 calls
    and SECCOMP_RET_KILL_PROCESS for another architecture (int 0x80)."""
    source = _source()
    where = {insn.label: index for index, insn in enumerate(source) if insn.label}
    program = []
    for index, insn in enumerate(source):
        true, false = (
            0 if label is None else where[label] - index - 1 for label in (insn.true, insn.false)
        )
        program.append((insn.code, true, false, insn.k))
    return program


def filter_bytes() -> bytes:
    return b"".join(SOCK_FILTER.pack(*insn) for insn in filter_program())


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_listener() -> int:
    """Install the filter on the calling thread (the child, single-threaded after fork) and
    return the listener fd. Only libc calls: no allocation worth the name after fork."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = filter_bytes()
    buffer = ctypes.create_string_buffer(code, len(code))
    program = _SockFprog(len(code) // SOCK_FILTER.size, ctypes.addressof(buffer))
    fd = _libc.syscall(
        NR_SECCOMP,
        SECCOMP_SET_MODE_FILTER,
        SECCOMP_FILTER_FLAG_NEW_LISTENER,
        ctypes.byref(program),
    )
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
    return int(fd)


class SeccompData(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_int),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("args", ctypes.c_uint64 * 6),
    ]


class SeccompNotif(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("data", SeccompData),
    ]


class SeccompNotifResp(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("val", ctypes.c_int64),
        ("error", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


def _iowr(number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | number


NOTIF_RECV = _iowr(0, ctypes.sizeof(SeccompNotif))
NOTIF_SEND = _iowr(1, ctypes.sizeof(SeccompNotifResp))
NOTIF_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2  # _IOW('!', 2, __u64)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def receive(listener: int) -> SeccompNotif | None:
    """The next notification; None when its process went away before we read it."""
    notif = SeccompNotif()
    if _libc.ioctl(listener, NOTIF_RECV, ctypes.byref(notif)) != 0:
        number = ctypes.get_errno()
        if number in (errno.ENOENT, errno.EINTR):
            return None
        raise OSError(number, "SECCOMP_IOCTL_NOTIF_RECV")
    return notif


def still_valid(listener: int, notif_id: int) -> bool:
    """The notifying thread still waits for this answer (and its pid is still it)."""
    value = ctypes.c_uint64(notif_id)
    return _libc.ioctl(listener, NOTIF_ID_VALID, ctypes.byref(value)) == 0


def respond(listener: int, notif_id: int, *, value: int = 0, error: int = 0) -> None:
    """Answer the call: `value` as its return value, or -`error` (an errno)."""
    _send(listener, SeccompNotifResp(notif_id, value, -error, 0))


def let_through(listener: int, notif_id: int) -> None:
    """Let the kernel run the call as if no filter were there."""
    _send(listener, SeccompNotifResp(notif_id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE))


def _send(listener: int, response: SeccompNotifResp) -> None:
    if _libc.ioctl(listener, NOTIF_SEND, ctypes.byref(response)) != 0:
        number = ctypes.get_errno()
        if number != errno.ENOENT:  # ENOENT: the caller was killed or interrupted meanwhile
            raise OSError(number, "SECCOMP_IOCTL_NOTIF_SEND")


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


class MemoryError_(OSError):
    """The other process's memory could not be read or written (EFAULT for its call)."""


def read_memory(pid: int, address: int, length: int) -> bytes:
    if length == 0:
        return b""
    buffer = ctypes.create_string_buffer(length)
    local = _Iovec(ctypes.addressof(buffer), length)
    remote = _Iovec(address, length)
    done = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done != length:
        raise MemoryError_(errno.EFAULT, f"reading {length} bytes of process {pid}")
    return buffer.raw


def write_memory(pid: int, address: int, data: bytes) -> None:
    if not data:
        return
    buffer = ctypes.create_string_buffer(data, len(data))
    local = _Iovec(ctypes.addressof(buffer), len(data))
    remote = _Iovec(address, len(data))
    done = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done != len(data):
        raise MemoryError_(errno.EFAULT, f"writing {len(data)} bytes of process {pid}")


def take_fd(pid: int, fd: int) -> int | None:
    """A duplicate of process `pid`'s descriptor `fd` (pidfd_getfd); None if it has none."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        taken = _libc.syscall(NR_PIDFD_GETFD, pidfd, fd, 0)
        return None if taken < 0 else int(taken)
    finally:
        os.close(pidfd)


def missing_user_notification() -> str | None:
    """Why `bpflab exec` cannot run here (None: it can), for `bpflab doctor`."""
    if os.uname().machine != "x86_64":
        return f"bpflab exec's seccomp filter is written for x86_64, not {os.uname().machine}"
    try:
        actions = open("/proc/sys/kernel/seccomp/actions_avail").read().split()
    except OSError:
        return "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
    if "user_notif" not in actions:
        return (
            "this kernel lacks seccomp user notification (SECCOMP_RET_USER_NOTIF; its "
            "CONTINUE flag and pidfd_getfd need Linux 5.6 or later)"
        )
    return None
