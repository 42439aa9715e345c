"""The namespace's ipset names and indexes (ip_set's getsockopt SO_IP_SET, by name and by
index), which a `-m set` payload holds in place of a name (codegen.rules.extensions.set): the
kernel blob readers and writers of codegen.rules.blob.kernel resolve through this.
"""

from __future__ import annotations

import ctypes
import socket

SO_IP_SET = 83
IP_SET_OP_GET_BYNAME, IP_SET_OP_GET_BYINDEX = 0x06, 0x07
IPSET_PROTOCOL_MIN = 6  # the oldest protocol the kernel takes these requests in
IPSET_MAXNAMELEN = 32
INVALID_INDEX = 0xFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]


class _NameIndex(ctypes.Union):
    _fields_ = [("name", ctypes.c_char * IPSET_MAXNAMELEN), ("index", ctypes.c_uint16)]


class IpSetReqGetSet(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint), ("version", ctypes.c_uint), ("set", _NameIndex)]


class KernelSetIndexes:
    """The sets of the namespace `sock` (a raw AF_INET socket) was made in; each answer is
    asked of the kernel (a name or index it does not know: None)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _ask(self, request: IpSetReqGetSet) -> IpSetReqGetSet | None:
        length = ctypes.c_uint32(ctypes.sizeof(request))
        fd = self.sock.fileno()
        if _getsockopt(fd, socket.SOL_IP, SO_IP_SET, ctypes.byref(request), ctypes.byref(length)):
            return None
        return request

    def index_of(self, name: str) -> int | None:
        request = IpSetReqGetSet(IP_SET_OP_GET_BYNAME, IPSET_PROTOCOL_MIN)
        encoded = name.encode()
        if len(encoded) >= IPSET_MAXNAMELEN:
            return None
        request.set.name = encoded
        answer = self._ask(request)
        if answer is None or answer.set.index == INVALID_INDEX:
            return None
        return int(answer.set.index)

    def name_of(self, index: int) -> str | None:
        request = IpSetReqGetSet(IP_SET_OP_GET_BYINDEX, IPSET_PROTOCOL_MIN)
        request.set.index = index
        answer = self._ask(request)
        if answer is None or not answer.set.name:
            return None
        return answer.set.name.decode(errors="replace")
