"""The live filter table of a network namespace: getsockopt(IPT_SO_GET_INFO, IPT_SO_GET_ENTRIES)
to read it, setsockopt(IPT_SO_SET_REPLACE, IPT_SO_SET_ADD_COUNTERS) to replace it, on a raw
socket in the calling thread's namespace (or one the caller made elsewhere). Nothing here
changes namespaces: callers enter one (`Namespace.enter()`) or pass a socket.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from codegen.rules.blob.decode import decode_entries
from codegen.rules.blob.encode import encode_counters, encode_table
from codegen.rules.blob.ipset import KernelSetIndexes
from codegen.rules.blob.structs import (
    IPT_SO_GET_ENTRIES,
    IPT_SO_GET_INFO,
    IPT_SO_SET_ADD_COUNTERS,
    IPT_SO_SET_REPLACE,
    READ_ATTEMPTS,
    SOL_IP,
    TABLE_NAME,
    BlobError,
    IptGetEntries,
    IptGetinfo,
    IptReplace,
    XtCounters,
    XtCountersInfo,
    cstring,
    field_bytes,
)
from codegen.rules.extensions.set import set_indexes
from codegen.rules.model import Ruleset


@dataclass(frozen=True, slots=True)
class TableInfo:
    """struct ipt_getinfo: where each hook's chain starts and where its policy entry is."""

    name: str
    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    size: int


_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_getsockopt.restype = ctypes.c_int
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_setsockopt.restype = ctypes.c_int


def kernel_error(action: str, number: int) -> BlobError:
    """One sentence for an errno from the ip_tables socket options."""
    if number in (errno.EPERM, errno.EACCES):
        return BlobError(f"{action} needs root (CAP_NET_ADMIN)")
    if number == errno.ENOPROTOOPT:
        return BlobError(
            f"{action} failed: this kernel has no legacy iptables (load the ip_tables module)"
        )
    if number == errno.ENOENT:
        return BlobError(
            f"{action} failed: there is no filter table in this network namespace, or the"
            " kernel lacks a match or target module the table uses (ENOENT); running"
            " `iptables-legacy -L -n` in the namespace loads iptable_filter"
        )
    if number == errno.ELOOP:
        return BlobError(f"{action} failed: the kernel found a loop among the chains (ELOOP)")
    if number == errno.EINVAL:
        return BlobError(f"{action} failed: the kernel refused the table as malformed (EINVAL)")
    return BlobError(f"{action} failed: {os.strerror(number)} ({errno.errorcode.get(number)})")


def _open_socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as error:
        raise kernel_error("opening a raw socket for the filter table", error.errno or 0) from None


def _get(sock: socket.socket, option: int, buffer: ctypes.Array[ctypes.c_char]) -> int:
    """getsockopt with `buffer` as input and output; the errno on failure, else 0."""
    length = ctypes.c_uint32(len(buffer))
    if _getsockopt(sock.fileno(), SOL_IP, option, buffer, ctypes.byref(length)) != 0:
        return ctypes.get_errno()
    return 0


def _get_info(sock: socket.socket) -> TableInfo:
    request = IptGetinfo(name=TABLE_NAME.encode())
    buffer = ctypes.create_string_buffer(bytes(request), ctypes.sizeof(request))
    number = _get(sock, IPT_SO_GET_INFO, buffer)
    if number:
        raise kernel_error("reading the filter table's info (IPT_SO_GET_INFO)", number)
    info = IptGetinfo.from_buffer_copy(buffer.raw)
    return TableInfo(
        cstring(field_bytes(info, "name")),
        info.valid_hooks,
        tuple(info.hook_entry),
        tuple(info.underflow),
        info.num_entries,
        info.size,
    )


def read_entries(sock: socket.socket | None = None) -> tuple[TableInfo, bytes]:
    """The live filter table of the calling thread's namespace (or of `sock`'s): its
    ipt_getinfo and its entries exactly as IPT_SO_GET_ENTRIES returns them."""
    own = sock is None
    sock = _open_socket() if sock is None else sock
    try:
        for _ in range(READ_ATTEMPTS):
            info = _get_info(sock)
            header_size = ctypes.sizeof(IptGetEntries)
            request = IptGetEntries(name=TABLE_NAME.encode(), size=info.size)
            buffer = ctypes.create_string_buffer(bytes(request), header_size + info.size)
            number = _get(sock, IPT_SO_GET_ENTRIES, buffer)
            if number == errno.EAGAIN:
                continue  # replaced between the two calls: its size changed
            if number:
                raise kernel_error("reading the filter table (IPT_SO_GET_ENTRIES)", number)
            return info, buffer.raw[header_size:]
        raise BlobError(
            f"the filter table kept changing while being read ({READ_ATTEMPTS} attempts)"
        )
    finally:
        if own:
            sock.close()


def read_table(sock: socket.socket | None = None) -> Ruleset:
    """The live filter table of the calling thread's network namespace (or of the namespace
    `sock`, a raw AF_INET socket, was created in), with rule and policy counters."""
    info, entries = read_entries(sock)
    own = sock is None
    sock = _open_socket() if sock is None else sock
    try:
        # -m set payloads hold the namespace's set indexes: name them as its ip_set does.
        with set_indexes(KernelSetIndexes(sock)):
            return decode_entries(
                entries, info.hook_entry, info.underflow, info.valid_hooks, info.num_entries
            )
    finally:
        if own:
            sock.close()


def write_table(ruleset: Ruleset, sock: socket.socket | None = None) -> None:
    """Replace the filter table of the calling thread's namespace (or `sock`'s) with
    `ruleset`, then set every rule's and policy's counters from the model, as
    `iptables-legacy-restore -c` does. Raises RuleError for a rule set iptables would refuse,
    BlobError when the kernel refuses."""
    own = sock is None
    sock = _open_socket() if sock is None else sock
    try:
        # Encode first: a rule set we refuse never reaches the kernel. -m set payloads take
        # the indexes of the namespace's sets.
        with set_indexes(KernelSetIndexes(sock)):
            blob = bytearray(encode_table(ruleset))
        old = _get_info(sock)
        # The kernel hands back the old table's counters here; libiptc uses them to carry
        # counters over, we only need room for them.
        old_counters = (XtCounters * max(old.num_entries, 1))()
        header = IptReplace.from_buffer(blob)
        header.num_counters = old.num_entries
        header.counters = ctypes.addressof(old_counters)
        buffer = (ctypes.c_char * len(blob)).from_buffer(blob)
        if _setsockopt(sock.fileno(), SOL_IP, IPT_SO_SET_REPLACE, buffer, len(blob)) != 0:
            raise kernel_error(
                "replacing the filter table (IPT_SO_SET_REPLACE)", ctypes.get_errno()
            )
        counters = encode_counters(ruleset)
        info = XtCountersInfo(name=TABLE_NAME.encode(), num_counters=len(counters))
        values = (XtCounters * len(counters))(*counters)
        payload = bytes(info) + bytes(values)
        counters_buffer = ctypes.create_string_buffer(payload, len(payload))
        if _setsockopt(
            sock.fileno(), SOL_IP, IPT_SO_SET_ADD_COUNTERS, counters_buffer, len(payload)
        ):
            raise kernel_error(
                "setting the filter table's counters (IPT_SO_SET_ADD_COUNTERS)", ctypes.get_errno()
            )
    finally:
        if own:
            sock.close()
