"""`-m physdev [!] --physdev-in NAME [!] --physdev-out NAME [!] --physdev-is-in
[!] --physdev-is-out [!] --physdev-is-bridged` (libxt_physdev.c, xt_physdev.c revision 0): the
bridge ports a packet came in through and goes out by, for packets that br_netfilter hands to
iptables.

Only a packet that crossed a bridge of its namespace, with br_netfilter's
`bridge-nf-call-iptables` on, carries the ports (skb's nf_bridge info): the port it came in by,
and for a bridged packet (FORWARD from port to port) the port it leaves by. For every other
packet xt_physdev answers from the options alone: it matches when each option given is negated.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.blob.structs import IFNAMSIZ, BlobError, field_bytes, name_bytes
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.log import Log
from codegen.rules.model import (
    INTERFACE_NAME_MAX,
    ExtensionMatch,
    Interface,
    Rule,
    RuleError,
    Ruleset,
)
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, MatchParser, OptionContext, Token

PHYSDEV_IN, PHYSDEV_OUT, PHYSDEV_BRIDGED, PHYSDEV_IS_IN, PHYSDEV_IS_OUT = 1, 2, 4, 8, 16
PHYSDEV_MASK = 0x1F


@dataclass(frozen=True, slots=True)
class PortName:
    """`--physdev-in` or `--physdev-out`: a port name, a prefix when it ends in `+`."""

    name: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Physdev(ExtensionMatch):
    """`-m physdev`: the ports (`in_port`, `out_port`), and for each of is-in, is-out and
    is-bridged, True (the option), False (`!` the option) or None (not given)."""

    in_port: PortName | None = None
    out_port: PortName | None = None
    is_in: bool | None = None
    is_out: bool | None = None
    is_bridged: bool | None = None

    @property
    def flags(self) -> tuple[int, int]:
        """The blob's `bitmask` and `invert`."""
        bitmask = invert = 0
        for flag, port in ((PHYSDEV_IN, self.in_port), (PHYSDEV_OUT, self.out_port)):
            if port is not None:
                bitmask |= flag
                invert |= flag if port.negated else 0
        for flag, given in (
            (PHYSDEV_BRIDGED, self.is_bridged),
            (PHYSDEV_IS_IN, self.is_in),
            (PHYSDEV_IS_OUT, self.is_out),
        ):
            if given is not None:
                bitmask |= flag
                invert |= 0 if given else flag
        return bitmask, invert


class XtPhysdevInfo(ctypes.Structure):
    _fields_ = [
        ("physindev", ctypes.c_char * IFNAMSIZ),
        ("in_mask", ctypes.c_uint8 * IFNAMSIZ),
        ("physoutdev", ctypes.c_char * IFNAMSIZ),
        ("out_mask", ctypes.c_uint8 * IFNAMSIZ),
        ("invert", ctypes.c_uint8),
        ("bitmask", ctypes.c_uint8),
    ]


_LABELS = {
    "in": "--physdev-in",
    "out": "--physdev-out",
    "is_in": "--physdev-is-in",
    "is_out": "--physdev-is-out",
    "is_bridged": "--physdev-is-bridged",
}


class PhysdevParser(MatchParser):
    name = "physdev"
    options = {
        "physdev-in": ("in", True),
        "physdev-out": ("out", True),
        "physdev-is-in": ("is_in", False),
        "physdev-is-out": ("is_out", False),
        "physdev-is-bridged": ("is_bridged", False),
    }
    invertible = frozenset(_LABELS)

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.values: dict[str, object] = {}

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error(f'physdev: option "{_LABELS[key]}" can only be used once.')
        if key in ("in", "out"):
            assert ctx.value is not None
            name = ctx.value.text
            if not name or len(name) > INTERFACE_NAME_MAX:
                raise ctx.error(
                    f"physdev: bad port name '{name}' for {_LABELS[key]} (1 to"
                    f" {INTERFACE_NAME_MAX} characters)",
                    at_value=True,
                )
            self.values[key] = PortName(name, ctx.negated)
        else:
            self.values[key] = not ctx.negated

    def finish(self, line: Line) -> Physdev:
        if not self.values:
            raise line.error("PHYSDEV: no physdev option specified", self.token.column)
        get = self.values.get
        return Physdev(get("in"), get("out"), get("is_in"), get("is_out"), get("is_bridged"))  # type: ignore[arg-type]


def _words(match: Physdev) -> list[str]:
    """physdev_save's words, in its order: is-in, in, is-out, out, is-bridged."""
    words: list[str] = []

    def flag(given: bool | None, label: str) -> None:
        if given is not None:
            words.extend([*([] if given else ["!"]), label])

    def port(given: PortName | None, label: str) -> None:
        if given is not None:
            words.extend([*(["!"] if given.negated else []), label, given.name])

    flag(match.is_in, "--physdev-is-in")
    port(match.in_port, "--physdev-in")
    flag(match.is_out, "--physdev-is-out")
    port(match.out_port, "--physdev-out")
    flag(match.is_bridged, "--physdev-is-bridged")
    return words


def _name_and_mask(port: PortName | None) -> tuple[bytes, ctypes.Array[ctypes.c_uint8]]:
    """xtables_parse_interface's name and mask (as for -i and -o)."""
    mask = (ctypes.c_uint8 * IFNAMSIZ)()
    if port is None:
        return b"", mask
    name = name_bytes(port.name, IFNAMSIZ, "port name")
    covered = len(name) - 1 if port.name.endswith("+") else len(name) + 1
    for index in range(covered):
        mask[index] = 0xFF
    return name, mask


def _port(name: bytes, mask: bytes, negated: bool) -> PortName:
    """The port name as physdev_save prints it: the name, `+` where the mask stops short."""
    text = name.split(b"\0", 1)[0]
    covered = next((index for index, byte in enumerate(mask) if not byte), IFNAMSIZ)
    if covered <= len(text):
        text = text[:covered] + b"+"
    return PortName(text.decode("utf-8", "surrogateescape"), negated)


class PhysdevExtension(MatchExtension):
    name = "physdev"
    revision = 0
    model = Physdev
    data = XtPhysdevInfo
    parser = PhysdevParser
    examples = (
        "-m physdev --physdev-is-bridged",
        "-m physdev ! --physdev-is-bridged",
        "-m physdev --physdev-in eth0",
        "-m physdev ! --physdev-in veth+",
        "-m physdev --physdev-is-in ! --physdev-is-out",
        "-m physdev ! --physdev-in tap0 --physdev-out vnet+ --physdev-is-bridged",
    )

    def save(self, match: Physdev) -> list[str]:
        return ["-m", "physdev", *_words(match)]

    def describe(self, match: Physdev) -> str:
        return " PHYSDEV match" + "".join(f" {word}" for word in _words(match))

    def check(self, match: Physdev, rule: Rule, chain: str) -> None:
        if match.flags[0] == 0:
            raise RuleError("PHYSDEV: no physdev option specified")
        for port in (match.in_port, match.out_port):
            if port is not None and not 0 < len(port.name) <= INTERFACE_NAME_MAX:
                raise RuleError(f"physdev: bad port name '{port.name}'")

    def hooks(self, match: Physdev) -> frozenset[str]:
        # physdev_mt_check: the output port is known only for bridged packets, which OUTPUT
        # never has unless the rule asks for them.
        bitmask, invert = match.flags
        if bitmask & (PHYSDEV_OUT | PHYSDEV_IS_OUT) and (
            not bitmask & PHYSDEV_BRIDGED or invert & PHYSDEV_BRIDGED
        ):
            return frozenset({"INPUT", "FORWARD"})
        return frozenset({"INPUT", "FORWARD", "OUTPUT"})

    def hook_refusal(self, match: Physdev, hook: str) -> str:
        return (
            "physdev: --physdev-out and --physdev-is-out are only supported in FORWARD (and"
            f" POSTROUTING) with bridged traffic, not in {hook}"
        )

    def encode(self, match: Physdev) -> XtPhysdevInfo:
        data = XtPhysdevInfo()
        data.physindev, data.in_mask = _name_and_mask(match.in_port)
        data.physoutdev, data.out_mask = _name_and_mask(match.out_port)
        data.bitmask, data.invert = match.flags
        return data

    def decode(self, data: XtPhysdevInfo) -> Physdev:
        bitmask, invert = data.bitmask, data.invert
        if not bitmask & PHYSDEV_MASK or bitmask & ~PHYSDEV_MASK:
            raise BlobError(f"physdev match: bad option bits {bitmask:#x}")
        if invert & ~bitmask:
            raise BlobError(f"physdev match: invert bits {invert & ~bitmask:#x} of options unused")

        def port(flag: int, name: str, mask: str) -> PortName | None:
            if not bitmask & flag:
                return None
            return _port(field_bytes(data, name), bytes(getattr(data, mask)), bool(invert & flag))

        def given(flag: int) -> bool | None:
            return not invert & flag if bitmask & flag else None

        return Physdev(
            port(PHYSDEV_IN, "physindev", "in_mask"),
            port(PHYSDEV_OUT, "physoutdev", "out_mask"),
            given(PHYSDEV_IS_IN),
            given(PHYSDEV_IS_OUT),
            given(PHYSDEV_BRIDGED),
        )

    def matches(self, match: Physdev, packet: Packet) -> bool:
        return physdev_matches(match, packet.physin, packet.physout)


def reads_ports(ruleset: Ruleset) -> bool:
    """Whether the programs of `ruleset` need the bridge ports of a packet that a bridge hands
    to iptables: -m physdev matches them, and -j LOG prints them (PHYSIN=, PHYSOUT=)."""
    return ruleset.first_with((Physdev, Log)) is not None


def no_bridge_answer(match: Physdev) -> bool:
    """xt_physdev for a packet without bridge ports: whether every option given is negated."""
    bitmask, invert = match.flags
    return bitmask & ~invert == 0


def physdev_matches(match: Physdev, physin: str | None, physout: str | None) -> bool:
    """physdev_mt for a packet whose nf_bridge info names `physin` (None: no such info) and
    `physout` (None: not bridged). With bridge information but no output port, an output port
    option fails whether negated or not, as in the kernel (a packet routed on from a bridge:
    `! --physdev-out X` does not hold for it)."""
    if physin is None:
        return no_bridge_answer(match)
    for given, present in (
        (match.is_bridged, physout is not None),
        (match.is_in, True),
        (match.is_out, physout is not None),
    ):
        if given is not None and present != given:
            return False
    if match.in_port is not None and not _device(match.in_port).matches(physin):
        return False
    if match.out_port is not None:
        return physout is not None and _device(match.out_port).matches(physout)
    return True


def _device(port: PortName) -> Interface:
    """A port name compares as -i's does (ifname_compare_aligned under its mask)."""
    return Interface("in", port.name, port.negated)


EXTENSION = PhysdevExtension()
