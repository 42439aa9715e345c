"""`-m policy --dir in|out [--pol none|ipsec] [--strict] [!] --reqid|--spi|--proto|--mode|
--tunnel-src|--tunnel-dst ... [--next ...]` (libxt_policy.c, xt_policy.c revision 0): the IPsec
states that decapsulated a packet (`--dir in`: the skb's security path) or will encapsulate it
(`--dir out`: the route's bundle).

policy_mt: without a path (or bundle) `--pol none` matches and `--pol ipsec` does not; with
one, `--pol none` never matches and ipsec compares the states with the elements: without
`--strict` (one element) any state that fits it; with it, as many states as elements, the last
fitting the first. An element's options each compare one field of a state (`!` negates one).

Kernel details kept: `--spi` is stored in host order and compared with the SPI as it lies in
memory (network order), so on a little-endian host `--spi 0x1000` is the SA `ip xfrm` calls
spi 0x00100000; with `--strict` and two elements or more, match_policy_in compares the second
state with the element before the first (pos = i - len + 1), memory outside the match, which
the reference refuses to judge. `--pol none` with element options keeps the element in the
blob, though iptables-save does not print it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.conntrack import MaskedAddress
from codegen.rules.model import ExtensionMatch, Rule, RuleError, check_uint
from codegen.rules.names import PROTOCOL_NAMES
from codegen.rules.packet import Packet, XfrmState
from codegen.rules.syntax import (
    Line,
    MatchParser,
    OptionContext,
    Token,
    format_ip,
    ipmask_to_numeric,
    parse_hostmask,
    parse_protocol,
    strtoui,
)

POLICY_MATCH_IN, POLICY_MATCH_OUT, POLICY_MATCH_NONE, POLICY_MATCH_STRICT = 1, 2, 4, 8
MAX_ELEMENTS = 4  # XT_POLICY_MAX_ELEM
MODE_TRANSPORT, MODE_TUNNEL = 0, 1
MODES = {"transport": MODE_TRANSPORT, "tunnel": MODE_TUNNEL}
IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP = 50, 51, 108
PROTOCOLS = frozenset({IPPROTO_ESP, IPPROTO_AH, IPPROTO_COMP})
UINT32 = 0xFFFF_FFFF
# struct xt_policy_spec's bits, in declaration order (a bit field of one byte, lowest first).
SPEC_SADDR, SPEC_DADDR, SPEC_PROTO, SPEC_MODE, SPEC_SPI, SPEC_REQID = 1, 2, 4, 8, 16, 32
SPEC_MASK = 0x3F
Direction = Literal["in", "out"]


def in_memory(value: int) -> int:
    """A 32-bit value in network order (an SPI as `ip xfrm` shows it, an address) as a
    little-endian host reads its 4 bytes: what xt_policy compares `--spi` with."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


@dataclass(frozen=True, slots=True)
class Compared:
    """One of an element's scalar options: the value, maybe negated."""

    value: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.value, 32, "policy value")

    def holds(self, actual: int) -> bool:
        return (self.value == actual) != self.negated


@dataclass(frozen=True, slots=True)
class PolicyElement:
    """One policy element: the options given, each None when not."""

    reqid: Compared | None = None
    spi: Compared | None = None
    proto: Compared | None = None
    mode: Compared | None = None
    tunnel_src: MaskedAddress | None = None
    tunnel_dst: MaskedAddress | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)  # type: ignore[attr-defined]

    def fits(self, state: XfrmState) -> bool:
        """match_xfrm_state: every option given holds for `state`."""
        for address, actual in ((self.tunnel_src, state.saddr), (self.tunnel_dst, state.daddr)):
            if address is not None and not address.matches(actual):
                return False
        for option, value in (
            (self.proto, state.proto),
            (self.mode, state.mode),
            (self.spi, in_memory(state.spi)),
            (self.reqid, state.reqid),
        ):
            if option is not None and not option.holds(value):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Policy(ExtensionMatch):
    """`-m policy`: the direction, `--pol none` (`none`) or ipsec, `--strict`, and the
    elements (one without --strict; with --pol none, none, or the one the options filled,
    which the blob keeps and iptables-save does not print)."""

    direction: Direction
    none: bool = False
    strict: bool = False
    elements: tuple[PolicyElement, ...] = (PolicyElement(),)

    @property
    def used(self) -> tuple[PolicyElement, ...]:
        """The elements the kernel compares (info->len of them)."""
        return () if self.none else self.elements

    @property
    def flags(self) -> int:
        flags = POLICY_MATCH_IN if self.direction == "in" else POLICY_MATCH_OUT
        return (
            flags
            | (POLICY_MATCH_NONE if self.none else 0)
            | (POLICY_MATCH_STRICT if self.strict else 0)
        )


class XtPolicyElem(ctypes.Structure):
    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),
        ("smask", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("dmask", ctypes.c_uint8 * 16),
        ("spi", ctypes.c_uint32),
        ("reqid", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
        ("match", ctypes.c_uint8),
        ("invert", ctypes.c_uint8),
    ]


class XtPolicyInfo(ctypes.Structure):
    _fields_ = [
        ("pol", XtPolicyElem * MAX_ELEMENTS),
        ("flags", ctypes.c_uint16),
        ("len", ctypes.c_uint16),
    ]


_ELEMENT_OPTIONS = ("reqid", "spi", "proto", "mode", "tunnel_src", "tunnel_dst")


class PolicyParser(MatchParser):
    name = "policy"
    options = {
        **{key.replace("_", "-"): (key, True) for key in ("dir", "pol", *_ELEMENT_OPTIONS)},
        "strict": ("strict", False),
        "next": ("next", False),
    }
    # libxt_policy lets `! --dir` through and ignores the `!`.
    invertible = frozenset({"dir", *_ELEMENT_OPTIONS})
    _ONCE = {"dir": "--dir", "pol": "--pol", "strict": "--strict"}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.direction: Direction | None = None
        self.none = False
        self.strict = False
        self.elements: list[dict[str, object]] = [{}]

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self._ONCE and key in self.given:
            raise ctx.error(f'policy: option "{self._ONCE[key]}" can only be used once.')
        text = ctx.value.text if ctx.value is not None else ""
        element = self.elements[-1]
        if key == "dir":
            if text not in ("in", "out"):
                raise ctx.error(f'policy_match: invalid dir "{text}"', at_value=True)
            self.direction = text  # type: ignore[assignment]
        elif key == "pol":
            if text not in ("none", "ipsec"):
                raise ctx.error(f'policy match: invalid policy "{text}"', at_value=True)
            self.none = text == "none"
        elif key == "strict":
            self.strict = True
        elif key == "next":
            if len(self.elements) + 1 == MAX_ELEMENTS + 1:
                raise ctx.error("policy match: maximum policy depth reached")
            self.elements.append({})
        else:
            if key in element:
                raise ctx.error(f"policy match: double --{key.replace('_', '-')} option")
            element[key] = self._value(key, text, ctx)

    def _value(self, key: str, text: str, ctx: OptionContext) -> object:
        if key in ("tunnel_src", "tunnel_dst"):
            return MaskedAddress(*parse_hostmask(ctx), ctx.negated)
        if key in ("reqid", "spi"):
            value = strtoui(text, UINT32)
            if value is None:
                raise ctx.error(
                    f'policy: bad value for option "--{key}", or out of range (0-{UINT32})',
                    at_value=True,
                )
        elif key == "proto":
            value = parse_protocol(text)
            if value is None:
                raise ctx.error(f"unknown protocol '{text}' specified", at_value=True)
            if value not in PROTOCOLS:
                raise ctx.error("policy match: protocol must be ah/esp/ipcomp", at_value=True)
        else:
            value = MODES.get(text)
            if value is None:
                raise ctx.error(f'policy match: invalid mode "{text}"', at_value=True)
        return Compared(value, ctx.negated)

    def finish(self, line: Line) -> Policy:
        column = self.token.column
        if "next" in self.given and "strict" not in self.given:
            raise line.error('policy: option "--next" also requires "--strict".', column)
        if self.direction is None:
            raise line.error("policy match: neither --dir in nor --dir out specified", column)
        elements = tuple(PolicyElement(**values) for values in self.elements)  # type: ignore[arg-type]
        if self.none:
            if self.strict:
                raise line.error("policy match: policy none but --strict given", column)
            if len(elements) > 1:
                raise line.error("policy match: policy none but policy given", column)
            elements = () if elements[0].empty else elements
        policy = Policy(self.direction, self.none, self.strict, elements)
        try:
            check_elements(policy)
        except RuleError as error:
            raise line.error(error.message, column) from None
        return policy


def check_elements(match: Policy) -> None:
    """policy_check's tests of the elements compared."""
    for index, element in enumerate(match.used):
        if match.strict and element.empty:
            raise RuleError(
                f"policy match: empty policy element {index}. --strict is in effect, but at"
                " least one of reqid, spi, tunnel-src, tunnel-dst, proto or mode is required."
            )
        mode = element.mode or Compared(MODE_TRANSPORT)
        tunnel_only = (mode.value == MODE_TUNNEL and mode.negated) or (
            mode.value == MODE_TRANSPORT and not mode.negated
        )
        if (element.tunnel_src or element.tunnel_dst) and tunnel_only:
            raise RuleError("policy match: --tunnel-src/--tunnel-dst is only valid in tunnel mode")


def _entry_words(element: PolicyElement, prefix: str, numeric: bool) -> list[str]:
    """print_entry's words, in its order: reqid, spi, proto, mode, tunnel-dst, tunnel-src."""
    words: list[str] = []

    def add(option: Compared | MaskedAddress | None, name: str, text: str) -> None:
        if option is not None:
            words.extend([*(["!"] if option.negated else []), prefix + name, text])

    if element.reqid is not None:
        add(element.reqid, "reqid", str(element.reqid.value))
    if element.spi is not None:
        add(element.spi, "spi", f"{element.spi.value:#x}" if element.spi.value else "0x0")
    if element.proto is not None:
        number = element.proto.value
        add(
            element.proto,
            "proto",
            str(number) if numeric else PROTOCOL_NAMES.get(number, str(number)),
        )
    if element.mode is not None:
        names = {value: name for name, value in MODES.items()}
        add(element.mode, "mode", names.get(element.mode.value, "???"))
    for option, name in ((element.tunnel_dst, "tunnel-dst"), (element.tunnel_src, "tunnel-src")):
        if option is not None:
            add(option, name, format_ip(option.address) + ipmask_to_numeric(option.mask))
    return words


def _flag_words(match: Policy, prefix: str) -> list[str]:
    words = [prefix + "dir", match.direction, prefix + "pol", "none" if match.none else "ipsec"]
    return [*words, prefix + "strict"] if match.strict else words


def _spec(element: PolicyElement) -> tuple[int, int]:
    """The element's `match` and `invert` spec bytes."""
    match = invert = 0
    for bit, option in (
        (SPEC_SADDR, element.tunnel_src),
        (SPEC_DADDR, element.tunnel_dst),
        (SPEC_PROTO, element.proto),
        (SPEC_MODE, element.mode),
        (SPEC_SPI, element.spi),
        (SPEC_REQID, element.reqid),
    ):
        if option is not None:
            match |= bit
            invert |= bit if option.negated else 0
    return match, invert


def _set_address(array: ctypes.Array[ctypes.c_uint8], value: int, mask: bool = False) -> None:
    """An address, or a mask: libxtables writes sixteen 0xff bytes for none given (/32)."""
    array[:] = [0xFF] * 16 if mask and value == UINT32 else [*value.to_bytes(4, "big"), *[0] * 12]


def _address(array: ctypes.Array[ctypes.c_uint8]) -> int:
    return int.from_bytes(bytes(array[:4]), "big")


def _encode_element(element: PolicyElement) -> XtPolicyElem:
    data = XtPolicyElem()
    if element.tunnel_src is not None:
        _set_address(data.saddr, element.tunnel_src.address)
        _set_address(data.smask, element.tunnel_src.mask, mask=True)
    if element.tunnel_dst is not None:
        _set_address(data.daddr, element.tunnel_dst.address)
        _set_address(data.dmask, element.tunnel_dst.mask, mask=True)
    for name in ("spi", "reqid", "proto", "mode"):
        option = getattr(element, name)
        if option is not None:
            setattr(data, name, option.value)
    data.match, data.invert = _spec(element)
    return data


def _decode_element(data: XtPolicyElem) -> PolicyElement:
    if data.match & ~SPEC_MASK or data.invert & ~SPEC_MASK:
        raise BlobError(f"policy match: unknown element bits {data.match:#x}/{data.invert:#x}")
    if data.invert & ~data.match:
        raise BlobError("policy match: an element negates an option it does not use")
    if data.match & SPEC_MODE and data.mode not in MODES.values():
        raise BlobError(f"policy match: unknown mode {data.mode}")
    values: dict[str, object] = {}
    for bit, name in (
        (SPEC_PROTO, "proto"),
        (SPEC_MODE, "mode"),
        (SPEC_SPI, "spi"),
        (SPEC_REQID, "reqid"),
    ):
        if data.match & bit:
            values[name] = Compared(getattr(data, name), bool(data.invert & bit))
    for bit, name, address, mask in (
        (SPEC_SADDR, "tunnel_src", data.saddr, data.smask),
        (SPEC_DADDR, "tunnel_dst", data.daddr, data.dmask),
    ):
        if data.match & bit:
            values[name] = MaskedAddress(_address(address), _address(mask), bool(data.invert & bit))
    element = PolicyElement(**values)  # type: ignore[arg-type]
    given = XtPolicyElem.from_buffer_copy(bytes(data))
    for mask in (given.smask, given.dmask):  # `/32` written out is four 0xff bytes, not 16
        if bytes(mask) == b"\xff" * 4 + bytes(12):
            mask[:] = [0xFF] * 16
    if bytes(_encode_element(element)) != bytes(given):
        raise BlobError("policy match: an element holds values for options it does not use")
    return element


class PolicyExtension(MatchExtension):
    name = "policy"
    revision = 0
    model = Policy
    data = XtPolicyInfo
    parser = PolicyParser
    examples = (
        "-m policy --dir in --pol ipsec",
        "-m policy --dir in --pol none",
        "-m policy --dir out --pol none",
        "-m policy --dir in --pol ipsec --proto esp",
        "-m policy --dir in --pol ipsec --strict --reqid 1 --spi 0x1 --proto ipcomp",
        "-m policy --dir in --pol ipsec ! --reqid 7 --mode tunnel ! --tunnel-dst 198.18.2.1"
        " --tunnel-src 198.18.0.0/15",
        "-m policy --dir out --pol ipsec --strict --reqid 1 --spi 0x1 --proto esp --mode tunnel"
        " --tunnel-dst 10.0.0.0/8 --tunnel-src 10.0.0.0/8 --next --reqid 2",
        "-m policy --dir in --pol ipsec ! --spi 0xc0ffee ! --proto ah ! --mode transport",
    )

    def save(self, match: Policy) -> list[str]:
        words = ["-m", "policy", *_flag_words(match, "--")]
        for index, element in enumerate(match.used):
            if index:
                words.append("--next")
            words += _entry_words(element, "--", numeric=False)
        return words

    def describe(self, match: Policy) -> str:
        words = ["policy", "match", *_flag_words(match, "")]
        for index, element in enumerate(match.used):
            if len(match.used) > 1:
                words.append(f"[{index}]")
            words += _entry_words(element, "", numeric=True)
        return "".join(f" {word}" for word in words)

    def as_saved(self, match: Policy) -> Policy:
        return replace(match, elements=()) if match.none else match

    def check(self, match: Policy, rule: Rule, chain: str) -> None:
        if match.none and match.strict:
            raise RuleError("policy match: policy none but --strict given")
        if match.none and len(match.elements) > 1:
            raise RuleError("policy match: policy none but policy given")
        if not match.none and not match.elements:
            raise RuleError("policy match: policy ipsec has no element")
        if len(match.elements) > MAX_ELEMENTS:
            raise RuleError("policy match: too many policy elements")
        if len(match.elements) > 1 and not match.strict:
            raise RuleError('policy: option "--next" also requires "--strict".')
        check_elements(match)

    def hooks(self, match: Policy) -> frozenset[str]:
        return frozenset({"INPUT", "FORWARD"} if match.direction == "in" else {"FORWARD", "OUTPUT"})

    def hook_refusal(self, match: Policy, hook: str) -> str:
        what = "input policy (--dir in)" if match.direction == "in" else "output policy (--dir out)"
        return f"policy: an {what} is not valid in {hook}"

    def encode(self, match: Policy) -> XtPolicyInfo:
        data = XtPolicyInfo()
        for index, element in enumerate(match.elements):
            data.pol[index] = _encode_element(element)
        data.flags = match.flags
        data.len = len(match.used)
        return data

    def decode(self, data: XtPolicyInfo) -> Policy:
        flags = data.flags
        if flags & ~(POLICY_MATCH_IN | POLICY_MATCH_OUT | POLICY_MATCH_NONE | POLICY_MATCH_STRICT):
            raise BlobError(f"policy match: unknown flags {flags:#x}")
        direction = flags & (POLICY_MATCH_IN | POLICY_MATCH_OUT)
        if direction not in (POLICY_MATCH_IN, POLICY_MATCH_OUT):
            raise BlobError("policy match: not exactly one of --dir in and --dir out")
        if data.len > MAX_ELEMENTS:
            raise BlobError(f"policy match: {data.len} elements, at most {MAX_ELEMENTS}")
        none = bool(flags & POLICY_MATCH_NONE)
        count = data.len
        if none and count == 0 and bytes(data.pol[0]) != bytes(XtPolicyElem()):
            count = 1  # the element --pol none took options into, which only the blob shows
        elements = tuple(_decode_element(data.pol[index]) for index in range(count))
        if any(
            bytes(data.pol[index]) != bytes(XtPolicyElem()) for index in range(count, MAX_ELEMENTS)
        ):
            raise BlobError("policy match: data in elements past its length")
        if none and data.len:
            raise BlobError("policy match: policy none with policy elements")
        if not none and not count:
            raise BlobError("policy match: policy ipsec with no element")
        return Policy(
            "in" if direction == POLICY_MATCH_IN else "out",
            none,
            bool(flags & POLICY_MATCH_STRICT),
            elements,
        )

    def matches(self, match: Policy, packet: Packet) -> bool:
        states = packet.secpath if match.direction == "in" else packet.bundle
        if states is None:  # no security path (no bundle): policy_mt's -1
            return match.none
        if match.none:
            return False
        return match_in(match, states) if match.direction == "in" else match_out(match, states)


def match_in(match: Policy, states: tuple[XfrmState, ...]) -> bool:
    """match_policy_in for a packet with a security path of `states` (first applied first)."""
    elements = match.used
    if not match.strict:
        return any(elements[0].fits(state) for state in states)
    if len(states) != len(elements):
        return False
    if not elements[0].fits(states[-1]):
        return False
    if len(states) > 1:
        raise ValueError(
            "policy match: with --strict and more than one element the kernel compares the"
            " second state with memory outside the match; there is no answer to give"
        )
    return True


def match_out(match: Policy, states: tuple[XfrmState, ...]) -> bool:
    """match_policy_out for a route whose bundle applies `states` in order."""
    elements = match.used
    if not match.strict:
        return any(elements[0].fits(state) for state in states)
    for index, state in enumerate(states):
        if index >= len(elements) or not elements[index].fits(state):
            return False
    return len(states) == len(elements)


EXTENSION = PolicyExtension()
