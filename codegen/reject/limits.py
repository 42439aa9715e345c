"""The maps REJECT's ICMP rate limits live in (reject.bpf.c's rj_rate_allows; what the limits are:
codegen.rules.icmp_rate), shared by every program of a namespace and kept across its applies,
as the kernel keeps its buckets across table loads:

- `reject_rate`: an array of one Rate: the namespace's icmp sysctls (apply reads them), the
  kernel's HZ, the clock (0: the real jiffies; a test run fixes it), the global credits an
  error takes (0: at random, as the kernel; a test run fixes them) and the global bucket;
- `reject_peers`: an LRU hash, peer address (host order) -> Peer, the per-peer buckets. The
  kernel forgets an idle peer after two minutes at least, when its bucket is full again
  anyway; the LRU map forgets the least recent peer when full, as the kernel's pool does.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path

from codegen.bpf.isa import MapType
from codegen.bpf.maps import Map, MapGroup, open_pins
from codegen.rules.icmp_rate import IcmpSysctls

RATE_MAP, PEERS_MAP = "reject_rate", "reject_peers"
MAPS = (RATE_MAP, PEERS_MAP)
PEER_ENTRIES = 16384


class Rate(ctypes.Structure):
    """struct rj_rate."""

    _fields_ = [
        ("clock", ctypes.c_uint64),
        ("ratelimit", ctypes.c_uint32),
        ("ratemask", ctypes.c_uint32),
        ("msgs_per_sec", ctypes.c_uint32),
        ("msgs_burst", ctypes.c_uint32),
        ("hz", ctypes.c_uint32),
        ("draw", ctypes.c_uint32),
        ("credit", ctypes.c_int32),
        ("stamp", ctypes.c_uint32),
        ("primed", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Peer(ctypes.Structure):
    """struct rj_peer."""

    _fields_ = [("tokens", ctypes.c_uint64), ("last", ctypes.c_uint64)]


class RateMaps(MapGroup):
    """One namespace's (or one test run's) two maps; `maps` gives them by the programs' names."""

    @classmethod
    def create(cls) -> RateMaps:
        return cls.made(
            {
                RATE_MAP: (MapType.ARRAY, 4, ctypes.sizeof(Rate), 1),
                PEERS_MAP: (MapType.LRU_HASH, 4, ctypes.sizeof(Peer), PEER_ENTRIES),
            }
        )

    @classmethod
    def kept_or_new(cls, directory: Path) -> RateMaps:
        """The maps pinned in `directory` if both are there in this shape, else new ones."""
        shapes = {RATE_MAP: ctypes.sizeof(Rate), PEERS_MAP: ctypes.sizeof(Peer)}

        def fits(opened: Mapping[str, Map]) -> bool:
            return all(opened[name].value_size == size for name, size in shapes.items())

        opened = open_pins(directory, MAPS, fits)
        return cls.create() if opened is None else cls(opened)

    def rate(self) -> Rate:
        raw = self.maps[RATE_MAP].lookup(0)
        assert raw is not None  # an array's element is always there
        return Rate.from_buffer_copy(raw)

    def configure(
        self, sysctls: IcmpSysctls, hz: int, *, clock: int = 0, draw: int | None = None
    ) -> None:
        """Set the sysctls, HZ, the clock (jiffies; 0: the real ones) and the credits an error
        takes (None: at random), keeping the buckets."""
        rate = self.rate()
        rate.ratelimit = sysctls.ratelimit_jiffies(hz)
        rate.ratemask = sysctls.ratemask & 0xFFFF_FFFF
        rate.msgs_per_sec = max(sysctls.msgs_per_sec, 0)
        rate.msgs_burst = max(sysctls.msgs_burst, 0)
        rate.hz = hz
        rate.clock = clock
        rate.draw = 0 if draw is None else 1 + draw
        self.maps[RATE_MAP].update(0, bytes(rate))

    def set_clock(self, jiffies: int) -> None:
        rate = self.rate()
        rate.clock = jiffies
        self.maps[RATE_MAP].update(0, bytes(rate))

    def forget(self, clock: int | None = None) -> None:
        """Every bucket as a new namespace has it: full peers, an unprimed global one; and
        the clock set to `clock` (jiffies; None: kept), in the same write."""
        rate = self.rate()
        rate.credit = rate.stamp = rate.primed = 0
        if clock is not None:
            rate.clock = clock
        self.maps[RATE_MAP].update(0, bytes(rate))
        peers = self.maps[PEERS_MAP]
        for key in list(peers.keys()):
            peers.delete(key)
