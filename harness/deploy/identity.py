"""Which kernel network namespace a rule set's state belongs to.

A name under /run/netns is only a bind mount of a namespace: after `ip netns del NS` and
`ip netns add NS` the name holds a new namespace, while the old one's pins under
/sys/fs/bpf/bpflab/NS (programs, maps, and tcx links severed when their devices died with it)
and its /run/bpflab state outlive it. So the rule-set state file (`identity`) and the pin
directory (a pinned one-entry array map, `identity`, which also judges pins whose state file is
gone) record the namespace's identity, and every command compares it with the namespace the
name holds now.

The identity is the netns cookie where the kernel gives it (SO_NETNS_COOKIE on a socket opened
inside the namespace, Linux 5.14+; one setns there and back and an AF_UNIX socket): a 64-bit
number the kernel gives each namespace once and never gives again. Elsewhere it is the
(st_dev, st_ino) of /run/netns/NS, nsfs's inode of the namespace, which the kernel may give again
to a namespace created after this one died: that fallback can take a new namespace for the old
one, never the other way round.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map
from codegen.bpf.syscall import BpfError
from netns.namespace import NETNS_DIR, Namespace, NamespaceError

SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14
PIN_NAME = "identity"
_VALUE = struct.Struct("<QQQ")  # kind, then the cookie, or st_dev and st_ino
_KINDS = {"cookie": 1, "inode": 2}


@dataclass(frozen=True)
class Identity:
    """One kernel network namespace: ("cookie", (N,)) or ("inode", (st_dev, st_ino))."""

    kind: str
    value: tuple[int, ...]

    def to_json(self) -> dict[str, int]:
        if self.kind == "cookie":
            return {"cookie": self.value[0]}
        return {"dev": self.value[0], "inode": self.value[1]}

    @classmethod
    def from_json(cls, saved: object) -> Identity | None:
        """The identity a state file recorded; None for a file written before identities
        (or one whose identity cannot be read)."""
        if not isinstance(saved, dict):
            return None
        try:
            if "cookie" in saved:
                return cls("cookie", (int(saved["cookie"]),))
            return cls("inode", (int(saved["dev"]), int(saved["inode"])))
        except (KeyError, TypeError, ValueError):
            return None

    def to_bytes(self) -> bytes:
        return _VALUE.pack(_KINDS[self.kind], *self.value, *([0] * (2 - len(self.value))))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Identity | None:
        kind, first, second = _VALUE.unpack(raw[: _VALUE.size])
        if kind == _KINDS["cookie"]:
            return cls("cookie", (first,))
        if kind == _KINDS["inode"]:
            return cls("inode", (first, second))
        return None


def _inode(name: str) -> Identity | None:
    if name in ("", ".", "..") or "/" in name:
        return None
    try:
        status = os.stat(NETNS_DIR / name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Identity("inode", (status.st_dev, status.st_ino))


def _cookie(name: str) -> Identity | None:
    """The netns cookie of namespace `name`, None where the kernel does not give it."""
    try:
        with Namespace.existing(name).socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            raw = probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except (OSError, NamespaceError):
        return None
    return Identity("cookie", struct.unpack("<Q", raw))


def of(name: str) -> Identity | None:
    """The identity of the namespace named `name` now (its cookie if this kernel gives it),
    None if there is no namespace of that name."""
    inode = _inode(name)
    if inode is None:
        return None
    return _cookie(name) or inode


def pinned(pins: Path) -> Identity | None:
    """The identity pinned in the pin directory `pins`, None if none is (or it is unreadable)."""
    path = pins / PIN_NAME
    if not path.exists():
        return None
    try:
        with Map.from_pin(str(path)) as held:
            raw = held.lookup(0)
    except BpfError:
        return None
    return None if raw is None else Identity.from_bytes(raw)


def pin(pins: Path, identity: Identity, replace: Callable[[Path, int], None]) -> None:
    """Record `identity` in the pin directory `pins` (which must exist)."""
    with Map(MapType.ARRAY, 4, _VALUE.size, 1, name="bpflab_netns") as held:
        held.update(0, identity.to_bytes())
        replace(pins / PIN_NAME, held.fd)


def recorded(state: dict | None, pins: Path) -> Identity | None:
    """The identity the state file or else the pins recorded (None: neither did)."""
    identity = Identity.from_json(state.get("identity")) if isinstance(state, dict) else None
    return identity or pinned(pins)


def gone(name: str, state: dict | None, pins: Path) -> str | None:
    """Why the state and pins of namespace `name` belong to a namespace that is gone, as the end
    of a sentence ("no longer exists", "is now another namespace"), or None when they belong to
    the namespace the name holds now. State without a recorded identity (written before
    identities) is taken as the namespace's while the name exists."""
    if _inode(name) is None:
        return "no longer exists"
    was = recorded(state, pins)
    if was is None:
        return None
    now = _inode(name) if was.kind == "inode" else _cookie(name)
    if now is None:  # cannot tell (it went since, or entering it is refused): not judged now
        return None
    return None if now == was else "is now another namespace"
