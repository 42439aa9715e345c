"""xt_recent's tables as the reference evaluator keeps them (codegen.rules.extensions.recent
has the match): recent_table's entries by masked address in the order of their last update,
recent_entry's ring of stamps, and the kernel's eviction and reaping."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

IP_LIST_TOT = 100  # xt_recent's ip_list_tot here: entries per table


@dataclass
class Entry:
    """recent_entry: an address's stamps (jiffies) in a ring of the table's size, `index`
    the next place (1-based, as the kernel keeps it), `nstamps` how many are set."""

    ttl: int
    stamps: list[int]
    index: int = 1
    nstamps: int = 1


@dataclass
class Table:
    """recent_table: entries by masked address, least recently updated first."""

    mask: int
    size: int  # stamps per entry, a power of two
    capacity: int = IP_LIST_TOT
    entries: OrderedDict[int, Entry] = field(default_factory=OrderedDict)

    def lookup(self, address: int, ttl: int) -> Entry | None:
        entry = self.entries.get(address)
        if entry is None or not (ttl == entry.ttl or ttl == 0 or entry.ttl == 0):
            return None
        return entry

    def init(self, address: int, ttl: int, now: int) -> Entry:
        if len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        stamps = [0] * self.size
        stamps[0] = now
        entry = self.entries[address] = Entry(ttl, stamps)
        return entry

    def update(self, address: int, entry: Entry, now: int) -> None:
        entry.index &= self.size - 1
        entry.stamps[entry.index] = now
        entry.index += 1
        entry.nstamps = max(entry.nstamps, entry.index)
        self.entries.move_to_end(address)

    def reap(self, time: int, working: int, update: bool) -> None:
        """recent_entry_reap: the least recently updated entry goes if its newest stamp is
        before `time`, unless it is the one about to be updated."""
        if not self.entries:
            return
        address, oldest = next(iter(self.entries.items()))
        if address == working and update:
            return
        if time_after(time, oldest.stamps[oldest.index - 1]):
            del self.entries[address]


def time_after(a: int, b: int) -> bool:
    """time_after(a, b) on 64-bit jiffies."""
    difference = (b - a) & (1 << 64) - 1
    return difference >= 1 << 63
