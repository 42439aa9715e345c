"""`-j MARK --set-xmark V[/M] | --set-mark V[/M] | --and-mark B | --or-mark B | --xor-mark B`
(libxt_MARK.c revision 2, xt_MARK.c): change the packet's mark, then go on with the next rule
(XT_CONTINUE). Every later `-m mark` of the same traversal sees the new mark, and so do the
kernel's later hooks (the mark stays on the skb).

The payload is `struct xt_mark_tginfo2 { u32 mark, mask; }` and the kernel computes
`skb->mark = (skb->mark & ~mask) ^ mark`. The options are spellings of one (mark, mask) pair, as
mark_tg_parse fills it in: `--set-xmark V/M` is (V, M), `--set-mark V/M` is (V, V | M), `--and-mark
B` is (0, ~B), `--or-mark B` is (B, B), `--xor-mark B` is (B, 0); a missing mask is 0xffffffff.
Checked against iptables-legacy 1.8.9: save always prints `--set-xmark 0xV/0xM`; `-L` prints
`MARK and|or|xor|set|xset ...` (mark_tg_print's cases, in its order); only one option per rule;
the filter table takes it in every chain.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.extensions.target_base import TargetAction, TargetExtension
from codegen.rules.model import UINT32_MAX, ExtensionTarget, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, OptionContext, TargetParser, Token, strtoui

# The options in libxt_MARK's table order, each with whether it takes VALUE[/MASK].
OPTIONS: tuple[tuple[str, bool], ...] = (
    ("set-xmark", True),
    ("set-mark", True),
    ("and-mark", False),
    ("or-mark", False),
    ("xor-mark", False),
)
_TAKES_MASK = dict(OPTIONS)
# Their xtables ids (O_SET_MARK = 0, ... O_SET_XMARK = 4); each excludes every other (F_ANY).
_IDS = (("set-xmark", 4), ("set-mark", 0), ("and-mark", 1), ("or-mark", 2), ("xor-mark", 3))
_EXCLUDES = {name: frozenset(range(5)) for name, _ in _IDS}


@dataclass(frozen=True, slots=True)
class MarkTarget(ExtensionTarget):
    """`-j MARK`: the packet's mark becomes `(mark & ~mask) ^ value` (xt_mark_tginfo2's mark
    is `value` here, so as not to read as the packet's)."""

    value: int
    mask: int = UINT32_MAX

    def __post_init__(self) -> None:
        check_uint(self.value, 32, "MARK value")
        check_uint(self.mask, 32, "MARK mask")

    def apply(self, mark: int) -> int:
        """The packet's mark after this target, from `mark` before it."""
        return (mark & ~self.mask & UINT32_MAX) ^ self.value


class XtMarkTginfo2(ctypes.Structure):
    _fields_ = [("mark", ctypes.c_uint32), ("mask", ctypes.c_uint32)]


def pair(option: str, value: int, mask: int = UINT32_MAX) -> tuple[int, int]:
    """The (mark, mask) of xt_mark_tginfo2 that `--OPTION value[/mask]` writes (mark_tg_parse)."""
    if option == "set-xmark":
        return value, mask
    if option == "set-mark":
        return value, value | mask
    if option == "and-mark":
        return 0, ~value & UINT32_MAX
    if option == "or-mark":
        return value, value
    if option == "xor-mark":
        return value, 0
    raise ValueError(f"not a MARK option: {option!r}")


class MarkTargetParser(TargetParser):
    name = "MARK"
    options = {option: (option, True) for option, _ in OPTIONS}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.target: MarkTarget | None = None

    def parse(self, key: str, ctx: OptionContext) -> None:
        assert ctx.value is not None
        if key in self.given:
            raise ctx.error(f'MARK: option "--{key}" can only be used once')
        text = ctx.value.text
        if _TAKES_MASK[key]:
            value_text, slash, mask_text = text.partition("/")
            value = strtoui(value_text, UINT32_MAX)
            mask = strtoui(mask_text, UINT32_MAX) if slash else UINT32_MAX
            shape = "VALUE[/MASK], each 0 to 0xffffffff"
        else:
            value, mask = strtoui(text, UINT32_MAX), UINT32_MAX
            shape = "0 to 0xffffffff"
        if value is None or mask is None:
            raise ctx.error(f"MARK: bad value '{text}' for --{key} ({shape})", at_value=True)
        self.target = MarkTarget(*pair(key, value, mask))

    def finish(self, line: Line) -> MarkTarget:
        if self.target is None:
            raise line.error(
                "MARK: one of the --set-xmark, --{and,or,xor,set}-mark options is required",
                self.token.column,
            )
        self.check_exclusions(line, _IDS, _EXCLUDES)  # after every value, as xtables does
        return self.target


class MarkTargetExtension(TargetExtension):
    name = "MARK"
    revision = 2
    model = MarkTarget
    data = XtMarkTginfo2
    parser = MarkTargetParser
    terminal = False
    examples = (
        "-j MARK --set-xmark 0x10000/0x10000",
        "-j MARK --set-xmark 0x0/0x10000",
        "-j MARK --set-xmark 0x40000/0xffffffff",
        "-j MARK --set-xmark 0x9/0x0",
        "-j MARK --set-xmark 0x5/0xf5",
        "-j MARK --set-xmark 0x0/0x0",
        "-p tcp -m mark --mark 0x1/0x1 -j MARK --set-xmark 0xfeedcafe/0xfeedcafe",
    )

    def save(self, target: MarkTarget) -> list[str]:
        return ["-j", "MARK", "--set-xmark", f"0x{target.value:x}/0x{target.mask:x}"]

    def describe(self, target: MarkTarget) -> str:
        value, mask = target.value, target.mask
        if value == 0:
            return f" MARK and 0x{~mask & UINT32_MAX:x}"
        if value == mask:
            return f" MARK or 0x{value:x}"
        if mask == 0:
            return f" MARK xor 0x{value:x}"
        if mask == UINT32_MAX:
            return f" MARK set 0x{value:x}"
        return f" MARK xset 0x{value:x}/0x{mask:x}"

    def encode(self, target: MarkTarget) -> XtMarkTginfo2:
        return XtMarkTginfo2(target.value, target.mask)

    def decode(self, data: XtMarkTginfo2) -> MarkTarget:
        return MarkTarget(data.mark, data.mask)  # mark_tg has no checkentry: any pair

    def act(self, target: MarkTarget, packet: Packet) -> TargetAction:
        return TargetAction(None, mark=target.apply(packet.mark))  # and on with the next rule


EXTENSION = MarkTargetExtension()
