"""The IP header part of a rule (struct ipt_ip, what ip_packet_match compares): addresses,
devices, protocol and `-f`. Not an extension: every rule has these fields, checked before any
`-m` match.
"""

from __future__ import annotations

from codegen.rules.model import Address, Fragment, Interface, Protocol

from .common import (
    UINT32_MAX,
    Labels,
    Writer,
    always_miss,
    device_test,
    hex_literal,
    require,
    unless,
)


def write_address(match: Address, labels: Labels) -> list[str]:
    """ip_packet_match: `(addr & mask) == address`, inverted by `!`."""
    field = "f->saddr" if match.direction == "src" else "f->daddr"
    if match.mask == 0:
        return always_miss(labels) if match.negated else []
    masked = field if match.mask == UINT32_MAX else f"({field} & {hex_literal(match.mask)})"
    return require(f"{masked} == {hex_literal(match.address)}", match.negated, labels)


def write_interface(match: Interface, labels: Labels) -> list[str]:
    """Device names become the ifindexes known when the program is built (`eth+`: every known
    device whose name starts with `eth`); a name nobody has matches no packet."""
    field = "f->in_ifindex" if match.direction == "in" else "f->out_ifindex"
    return device_test(field, match.name, match.negated, labels)


def write_protocol(match: Protocol, labels: Labels) -> list[str]:
    if match.number == 0:  # -p all
        return always_miss(labels) if match.negated else []
    return require(f"f->protocol == {match.number}", match.negated, labels)


def write_fragment(match: Fragment, labels: Labels) -> list[str]:
    # -f: second and later fragments; ! -f: first fragments and whole datagrams.
    return unless("f->fragment == 0" if match.negated else "f->fragment != 0", labels)


WRITERS: dict[type, Writer] = {
    Address: write_address,
    Interface: write_interface,
    Protocol: write_protocol,
    Fragment: write_fragment,
}
