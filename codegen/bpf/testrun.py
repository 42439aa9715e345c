"""BPF_PROG_TEST_RUN: run a loaded program on a packet without any device.

The skb context passed in may set only the fields the kernel's test-run allows (mark, priority,
ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size, hwtstamp); the rest must be 0.
`ifindex` names a device in the *calling thread's* network namespace: enter the namespace first.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from .syscall import BpfError, Command, bpf, pointer


class SkBuff(ctypes.Structure):
    """struct __sk_buff as the kernel's UAPI lays it out (192 bytes)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


SKB_OFFSETS = {name: getattr(SkBuff, name).offset for name, *_ in SkBuff._fields_}


class BpfSock(ctypes.Structure):
    """The head of struct bpf_sock (UAPI), what bpf_sk_fullsock returns a pointer to."""

    _fields_ = [
        ("bound_dev_if", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


BPF_SOCK_OFFSETS = {name: getattr(BpfSock, name).offset for name, *_ in BpfSock._fields_}


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int  # the program's return value, as a signed 32-bit int (TC_ACT_UNSPEC is -1)
    data: bytes  # the packet after the program
    context: SkBuff | None
    duration_ns: int  # mean per run, as the kernel measures it


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    repeat: int = 1,
    ifindex: int = 0,
    ingress_ifindex: int = 0,
    mark: int = 0,
    context: SkBuff | None = None,
) -> RunResult:
    """Run the program `repeat` times on `data` (an Ethernet frame for TC programs)."""
    if context is None and (ifindex or ingress_ifindex or mark):
        context = SkBuff(ifindex=ifindex, ingress_ifindex=ingress_ifindex, mark=mark)
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    out_size = max(len(data) + 256, 2048)  # room for programs that grow the packet
    data_out = ctypes.create_string_buffer(out_size)
    ctx_out = SkBuff()
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=pointer(data_in),
        data_out=pointer(data_out),
        repeat=repeat,
    )
    if context is not None:
        attr.ctx_size_in = ctypes.sizeof(SkBuff)
        attr.ctx_in = ctypes.addressof(context)
        attr.ctx_size_out = ctypes.sizeof(SkBuff)
        attr.ctx_out = ctypes.addressof(ctx_out)
    try:
        bpf(Command.PROG_TEST_RUN, attr, "running the program with BPF_PROG_TEST_RUN")
    except BpfError as error:
        if error.errno != errno.EINVAL:
            raise
        raise BpfError(
            error.errno,
            "BPF_PROG_TEST_RUN refused the input: it needs a frame of at least 14 bytes (with "
            "a whole IP header when the EtherType is IPv4), a context whose fields outside its "
            "allowlist are 0, and an ifindex that exists in the calling thread's namespace",
        ) from None
    retval = attr.retval - (1 << 32) if attr.retval & 0x8000_0000 else attr.retval
    return RunResult(
        retval,
        data_out.raw[: attr.data_size_out],
        ctx_out if context is not None else None,
        attr.duration,
    )
