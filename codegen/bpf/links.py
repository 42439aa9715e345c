"""Attaching SCHED_CLS programs to a device's TC ingress or egress hook.

Two mechanisms, chosen by a feature probe (or forced by `mode`):
- tcx links (kernel >= 6.6): a BPF link owns the attachment; a link update swaps the program
  atomically; pinning the link in bpffs keeps it when the process ends.
- clsact + cls_bpf in direct-action mode (older kernels), through rtnetlink with pyroute2;
  `tc filter replace` on the same handle swaps atomically.

Everything here acts in the calling thread's network namespace: ifindexes are resolved there, so
enter the device's namespace first.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Literal

from .isa import AttachType
from .syscall import BpfError, BpfFeatureError, Command, bpf, close

Direction = Literal["ingress", "egress"]
Mode = Literal["auto", "tcx", "cls_bpf"]

_TC_PARENT = {"ingress": 0xFFFF_FFF2, "egress": 0xFFFF_FFF3}  # TC_H_CLSACT:TC_H_MIN_{IN,E}GRESS
_TCX_TYPE = {"ingress": AttachType.TCX_INGRESS, "egress": AttachType.TCX_EGRESS}
_FILTER_HANDLE = 1
_FILTER_PRIORITY = 1


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32)]


@dataclass
class TcAttachment:
    """One program on one hook of one device; `replace` swaps it atomically."""

    ifindex: int
    direction: Direction
    mode: Literal["tcx", "cls_bpf"]
    link_fd: int = -1  # tcx only

    def replace(self, prog_fd: int, name: str = "bpflab") -> None:
        if self.mode == "tcx":
            attr = _LinkUpdateAttr(link_fd=self.link_fd, new_prog_fd=prog_fd)
            bpf(Command.LINK_UPDATE, attr, f"replacing the program on ifindex {self.ifindex}")
        else:
            _cls_bpf_filter("replace-filter", self.ifindex, self.direction, prog_fd, name)

    def detach(self) -> None:
        if self.mode == "tcx":
            if self.link_fd >= 0:
                attr = _LinkDetachAttr(link_fd=self.link_fd)
                try:
                    bpf(Command.LINK_DETACH, attr, f"detaching from ifindex {self.ifindex}")
                except BpfError as error:
                    if error.errno not in (errno.ENOLINK, errno.EINVAL):
                        raise
                self.close()
        else:
            _cls_bpf_delete(self.ifindex, self.direction)

    def close(self) -> None:
        """Drop our reference; a pinned tcx link stays attached."""
        if self.link_fd >= 0:
            close(self.link_fd)
            self.link_fd = -1


def attach_tc(
    prog_fd: int,
    ifindex: int,
    direction: Direction,
    *,
    mode: Mode = "auto",
    name: str = "bpflab",
) -> TcAttachment:
    """Attach a loaded SCHED_CLS program to `ifindex` in the current network namespace."""
    if direction not in _TC_PARENT:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    if mode in ("auto", "tcx"):
        try:
            return _attach_tcx(prog_fd, ifindex, direction)
        except BpfFeatureError:
            if mode == "tcx":
                raise
    _cls_bpf_filter("add-filter", ifindex, direction, prog_fd, name)
    return TcAttachment(ifindex, direction, "cls_bpf")


def _attach_tcx(prog_fd: int, ifindex: int, direction: Direction) -> TcAttachment:
    attr = _LinkCreateAttr(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=_TCX_TYPE[direction]
    )
    try:
        fd = bpf(Command.LINK_CREATE, attr, f"attaching a tcx link to ifindex {ifindex}")
    except BpfError as error:
        if error.errno == errno.EINVAL:
            # Kernels before 6.6 do not know the tcx attach types.
            raise BpfFeatureError(
                error.errno, "this kernel has no tcx links (needs Linux >= 6.6)"
            ) from None
        if error.errno == errno.ENODEV:
            raise BpfError(
                error.errno, f"no device with ifindex {ifindex} in this network namespace"
            ) from None
        raise
    return TcAttachment(ifindex, direction, "tcx", fd)


def _cls_bpf_filter(
    command: str, ifindex: int, direction: Direction, prog_fd: int, name: str
) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        if command == "add-filter":
            try:
                ipr.tc("add", "clsact", index=ifindex)
            except NetlinkError as error:
                if error.code != errno.EEXIST:
                    raise BpfError(
                        error.code, f"adding clsact to ifindex {ifindex} failed: {error}"
                    ) from None
        try:
            ipr.tc(
                command,
                "bpf",
                index=ifindex,
                handle=_FILTER_HANDLE,
                prio=_FILTER_PRIORITY,
                parent=_TC_PARENT[direction],
                fd=prog_fd,
                name=name,
                direct_action=True,
            )
        except NetlinkError as error:
            raise BpfError(
                error.code, f"attaching cls_bpf to ifindex {ifindex} {direction} failed: {error}"
            ) from None


def _cls_bpf_delete(ifindex: int, direction: Direction) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                index=ifindex,
                handle=_FILTER_HANDLE,
                prio=_FILTER_PRIORITY,
                parent=_TC_PARENT[direction],
            )
        except NetlinkError as error:
            if error.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise BpfError(error.code, f"detaching cls_bpf from ifindex {ifindex}") from None
