"""The namespace's local destinations, written into the ingress program as constants.

What a namespace delivers locally (its addresses, subnet broadcasts, the limited broadcast and the
groups its devices joined: harness.deploy.addresses) is read when a rule set is applied, and it
was only ever read then. So it is known when the program is generated, and the ingress program
compares the packet's addresses with it inline, in a binary search of compare-and-branch
instructions, instead of looking them up in a hash map: two lookups a packet (the source, for
martians; the destination, for INPUT or FORWARD) cost about 45 ns of the ingress program's
100 on this VM (`bpflab bench`'s fixed cost); the search costs a few instructions. A change of
the namespace's addresses is seen at the next apply, as before.

Both backends take the same `LocalAddresses`: address (host order) -> a `Local` kind. A
program made for no namespace (`bpflab compile` and `verify`, the bench's load figures) takes
STANDIN: with nothing local, INPUT would be unreachable and left out of the program.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import JmpOp, Reg
from codegen.rules.routes import BROADCAST, LOCAL, RouteTable

from .layout import Local

LocalAddresses = Mapping[int, int]
LINEAR = 4  # at most this many addresses are compared one after the other
STANDIN: LocalAddresses = {0xC6120002: Local.ADDRESS, 0xFFFFFFFF: Local.BROADCAST}  # 198.18.0.2


def from_routes(routes: RouteTable) -> LocalAddresses:
    """What a namespace of these routes delivers locally, as far as its host routes tell (a
    test run's stand-in namespace: its local and broadcast /32s, and the limited broadcast)."""
    kinds = {LOCAL: Local.ADDRESS, BROADCAST: Local.BROADCAST}
    local = {0xFFFFFFFF: Local.BROADCAST}
    for route in routes.routes:
        if route.length == 32 and route.type in kinds:
            local.setdefault(route.network, kinds[route.type])
    return local


def _multicast(address: int) -> bool:
    return address >> 28 == 0xE


def own_addresses(local: LocalAddresses) -> list[int]:
    """The namespace's own addresses: a packet from one of them is a martian."""
    return sorted(address for address, kind in local.items() if kind == Local.ADDRESS)


def unicast_destinations(local: LocalAddresses) -> list[int]:
    """The destinations other than multicast that go through INPUT: addresses, broadcasts."""
    return sorted(address for address in local if not _multicast(address))


def broadcasts(local: LocalAddresses) -> list[int]:
    """The namespace's broadcast destinations: a packet to one has a broadcast route."""
    return sorted(address for address, kind in local.items() if kind == Local.BROADCAST)


def joined_groups(local: LocalAddresses) -> list[int]:
    """The multicast destinations that go through INPUT: groups a device joined."""
    return sorted(
        address for address, kind in local.items() if _multicast(address) and kind == Local.GROUP
    )


def membership(
    value: Reg,
    addresses: Sequence[int],
    found: str,
    missing: str | None,
    new_label: Callable[[str], str],
) -> list[Item]:
    """Go to `found` if the low 32 bits of `value` are one of the sorted `addresses`, else to
    `missing` (None: fall through). A binary search down to runs of LINEAR compares; its
    conditional jumps stay within the search, which then goes on with unconditional ones (the
    targets may be further than a conditional jump reaches)."""
    hit = new_label("local_hit")
    miss = new_label("local_miss")
    code: list[Item] = []

    def search(part: Sequence[int]) -> None:
        if len(part) <= LINEAR:
            code.extend(I.jmp32(JmpOp.JEQ, value, address, hit) for address in part)
            code.append(I.ja(miss))
            return
        middle = len(part) // 2
        upper = new_label("local_upper")
        code.append(I.jmp32(JmpOp.JGE, value, part[middle], upper))
        search(part[:middle])
        code.append(Label(upper))
        search(part[middle:])

    search(addresses)
    code += [Label(hit), I.ja(found), Label(miss)]
    if missing is not None:
        code.append(I.ja(missing))
    return code


def c_membership(name: str, addresses: Iterable[int]) -> list[str]:
    """A C function `name(u32)`: 1 if its argument is one of `addresses`, else 0 (clang makes
    the same kind of search of a switch: the BPF target has no jump tables)."""
    cases = [f"    case {address:#010x}:" for address in sorted(addresses)]
    body = ["    switch (address) {", *cases, "        return 1;", "    }"] if cases else []
    return [
        f"static __always_inline int {name}(u32 address)",
        "{",
        *body,
        "    return 0;",
        "}",
        "",
    ]
