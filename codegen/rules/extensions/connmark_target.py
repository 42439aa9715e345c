"""`-j CONNMARK` (libxt_CONNMARK.c revision 2, xt_connmark.c): change the mark of the packet's
connection, or copy marks between the connection and the packet, then go on with the next
rule (XT_CONTINUE).

The payload is `struct xt_connmark_tginfo2 { u32 ctmark, ctmask, nfmask; u8 shift_dir,
shift_bits, mode; }`, and connmark_tg_shift does, with `<<`/`>>` the shift it names:
- XT_CONNMARK_SET: ct->mark = ((ct->mark & ~ctmask) ^ ctmark) << shift;
- XT_CONNMARK_SAVE: ct->mark = (ct->mark & ~ctmask) ^ ((skb->mark & nfmask) << shift);
- XT_CONNMARK_RESTORE: skb->mark = (skb->mark & ~nfmask) ^ ((ct->mark & ctmask) << shift).
A packet without a connection (INVALID) is left alone. The connection's mark is the entry's:
a NEW packet's entry keeps it only if it is confirmed (the chains accept the packet), a known
connection's changes at once, whatever the verdict; a RELATED packet changes its master's.

The options fill the payload in the order given (connmark_tg_parse_v2): `--set-xmark V/M` is
(V, M), `--set-mark V/M` is (V, V | M), `--and-mark B` is (0, ~B), `--or-mark B` is (B, B),
`--xor-mark B` is (B, 0), each into (ctmark, ctmask); `--ctmask`/`--nfmask` write their mask,
`--mask` both, and `--left-shift-mark`/`--right-shift-mark` the shift, each where it comes,
so a later option overwrites an earlier one's field. Checked against iptables-legacy 1.8.9 on
this kernel: save prints `--set-xmark 0xV/0xM` or `--save-mark|--restore-mark --nfmask 0xN
--ctmask 0xC`, then `--left-shift-mark N` / `--right-shift-mark N` when the shift is not 0; the
kernel refuses a shift of 32 (userspace takes 0 to 32).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.mark_target import pair
from codegen.rules.extensions.target_base import TargetAction, TargetExtension
from codegen.rules.model import UINT32_MAX, ExtensionTarget, Rule, RuleError, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import Line, OptionContext, TargetParser, Token, strtoui

Mode = Literal["set", "save", "restore"]
MODES: tuple[Mode, ...] = ("set", "save", "restore")  # XT_CONNMARK_SET, _SAVE, _RESTORE
MAX_SHIFT = 31  # the kernel's checkentry refuses more (userspace takes 32)

# The options in libxt_CONNMARK's v2 table order: (name, xtables id, takes an argument).
_TABLE: tuple[tuple[str, int, bool], ...] = (
    ("set-xmark", 8, True),
    ("set-mark", 0, True),
    ("and-mark", 3, True),
    ("or-mark", 4, True),
    ("xor-mark", 5, True),
    ("save-mark", 1, False),
    ("restore-mark", 2, False),
    ("left-shift-mark", 6, True),
    ("right-shift-mark", 7, True),
    ("ctmask", 9, True),
    ("nfmask", 10, True),
    ("mask", 11, True),
)
_IDS = tuple((name, number) for name, number, _ in _TABLE)
_ID = dict(_IDS)
_OPERATIONS = ("set-xmark", "set-mark", "and-mark", "or-mark", "xor-mark", "save-mark",
               "restore-mark")  # fmt: skip
# Each option's exclusions (xt_option_entry.excl) as xtables ids.
_EXCLUDES: dict[str, frozenset[int]] = {
    **{name: frozenset(_ID[other] for other in _OPERATIONS) for name in _OPERATIONS},
    "ctmask": frozenset({_ID["mask"]}),
    "nfmask": frozenset({_ID["mask"]}),
    "mask": frozenset({_ID["ctmask"], _ID["nfmask"]}),
}


def _shifted(value: int, right: bool, bits: int) -> int:
    return (value >> bits if right else value << bits) & UINT32_MAX


@dataclass(frozen=True, slots=True)
class ConnmarkTarget(ExtensionTarget):
    """`-j CONNMARK`: xt_connmark_tginfo2's fields, the mode by name."""

    mode: Mode
    ctmark: int = 0
    ctmask: int = UINT32_MAX
    nfmask: int = UINT32_MAX
    shift_right: bool = False
    shift_bits: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CONNMARK mode must be one of {', '.join(MODES)}: {self.mode!r}")
        for name in ("ctmark", "ctmask", "nfmask"):
            check_uint(getattr(self, name), 32, f"CONNMARK {name}")
        check_uint(self.shift_bits, 8, "CONNMARK shift")

    def marks(self, ctmark: int, mark: int) -> tuple[int, int]:
        """The (connection mark, packet mark) after this target, from those before it."""
        right, bits = self.shift_right, self.shift_bits
        if self.mode == "set":
            return _shifted((ctmark & ~self.ctmask) ^ self.ctmark, right, bits), mark
        if self.mode == "save":
            moved = _shifted(mark & self.nfmask, right, bits)
            return (ctmark & ~self.ctmask & UINT32_MAX) ^ moved, mark
        moved = _shifted(ctmark & self.ctmask, right, bits)
        return ctmark, (mark & ~self.nfmask & UINT32_MAX) ^ moved


class XtConnmarkTginfo2(ctypes.Structure):
    _fields_ = [
        ("ctmark", ctypes.c_uint32),
        ("ctmask", ctypes.c_uint32),
        ("nfmask", ctypes.c_uint32),
        ("shift_dir", ctypes.c_uint8),
        ("shift_bits", ctypes.c_uint8),
        ("mode", ctypes.c_uint8),
    ]


class ConnmarkTargetParser(TargetParser):
    name = "CONNMARK"
    options = {name: (name, takes) for name, _, takes in _TABLE}

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        # connmark_tg_init_v2's defaults, then each option written in as it comes.
        self.fields = {"mode": "set", "ctmark": 0, "ctmask": UINT32_MAX, "nfmask": UINT32_MAX,
                       "shift_right": False, "shift_bits": 0}  # fmt: skip

    def parse(self, key: str, ctx: OptionContext) -> None:
        if key in self.given:
            raise ctx.error(f'CONNMARK: option "--{key}" can only be used once')
        fields = self.fields
        if key == "save-mark":
            fields["mode"] = "save"
            return
        if key == "restore-mark":
            fields["mode"] = "restore"
            return
        assert ctx.value is not None
        text = ctx.value.text
        if key in ("left-shift-mark", "right-shift-mark"):
            bits = strtoui(text, 32)
            if bits is None:
                raise ctx.error(
                    f'CONNMARK: bad value for option "--{key}", or out of range (0-32)',
                    at_value=True,
                )
            fields["shift_right"], fields["shift_bits"] = key == "right-shift-mark", bits
            return
        if key in ("set-xmark", "set-mark"):
            value_text, slash, mask_text = text.partition("/")
            value = strtoui(value_text, UINT32_MAX)
            mask = strtoui(mask_text, UINT32_MAX) if slash else UINT32_MAX
        else:
            value, mask = strtoui(text, UINT32_MAX), UINT32_MAX
        if value is None or mask is None:
            raise ctx.error(
                f'CONNMARK: bad integer value for option "--{key}", or out of range',
                at_value=True,
            )
        if key in ("ctmask", "nfmask"):
            fields[key] = value
        elif key == "mask":
            fields["ctmask"] = fields["nfmask"] = value
        else:
            fields["mode"] = "set"
            fields["ctmark"], fields["ctmask"] = pair(key, value, mask)

    def finish(self, line: Line) -> ConnmarkTarget:
        if not any(key in _OPERATIONS for key in self.given):
            raise line.error("CONNMARK target: No operation specified", self.token.column)
        self.check_exclusions(line, _IDS, _EXCLUDES)
        return ConnmarkTarget(**self.fields)  # type: ignore[arg-type]


class ConnmarkTargetExtension(TargetExtension):
    name = "CONNMARK"
    revision = 2
    model = ConnmarkTarget
    data = XtConnmarkTginfo2
    parser = ConnmarkTargetParser
    terminal = False
    examples = (
        "-j CONNMARK --set-xmark 0x1/0xffffffff",
        "-j CONNMARK --set-xmark 0x5/0xf0",
        "-j CONNMARK --set-xmark 0x0/0xfffffff0",
        "-j CONNMARK --set-xmark 0x3/0x0",
        "-j CONNMARK --set-xmark 0x5/0xf --left-shift-mark 3",
        "-j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "-j CONNMARK --save-mark --nfmask 0xf --ctmask 0xf0 --right-shift-mark 4",
        "-j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff",
        "-j CONNMARK --restore-mark --nfmask 0xf0 --ctmask 0xf --left-shift-mark 4",
        "-p tcp -m connmark --mark 0x1/0x1 -j CONNMARK --restore-mark --nfmask 0x1 --ctmask 0x1",
    )

    def save(self, target: ConnmarkTarget) -> list[str]:
        words = ["-j", "CONNMARK"]
        if target.mode == "set":
            words += ["--set-xmark", f"0x{target.ctmark:x}/0x{target.ctmask:x}"]
        else:
            words += [f"--{target.mode}-mark", "--nfmask", f"0x{target.nfmask:x}"]
            words += ["--ctmask", f"0x{target.ctmask:x}"]
        if target.shift_bits:
            words += [_shift_name(target), str(target.shift_bits)]
        return words

    def describe(self, target: ConnmarkTarget) -> str:
        ctmark, ctmask, nfmask = target.ctmark, target.ctmask, target.nfmask
        if target.mode == "set":
            if ctmark == 0:
                text = f" CONNMARK and 0x{~ctmask & UINT32_MAX:x}"
            elif ctmark == ctmask:
                text = f" CONNMARK or 0x{ctmark:x}"
            elif ctmask == 0:
                text = f" CONNMARK xor 0x{ctmark:x}"
            elif ctmask == UINT32_MAX:
                text = f" CONNMARK set 0x{ctmark:x}"
            else:
                text = f" CONNMARK xset 0x{ctmark:x}/0x{ctmask:x}"
        else:
            # save prints nfmask first and ctmask with a ~, restore the other way round.
            first, second = (nfmask, ctmask) if target.mode == "save" else (ctmask, nfmask)
            names = ("nfmask", "ctmask") if target.mode == "save" else ("ctmask", "nfmask")
            text = f" CONNMARK {target.mode}"
            if first != UINT32_MAX or second != UINT32_MAX:
                if first == second:
                    text += f" mask 0x{first:x}"
                else:
                    text += f" {names[0]} 0x{first:x} {names[1]} ~0x{second:x}"
        if target.shift_bits:
            text += f" {_shift_name(target)[2:]} {target.shift_bits}"
        return text

    def check(self, target: ConnmarkTarget, rule: Rule, chain: str) -> None:
        if target.shift_bits > MAX_SHIFT:
            raise RuleError(
                f"CONNMARK: the kernel refuses a shift of {target.shift_bits} bits "
                f"(0 to {MAX_SHIFT})"
            )

    def encode(self, target: ConnmarkTarget) -> XtConnmarkTginfo2:
        return XtConnmarkTginfo2(
            target.ctmark,
            target.ctmask,
            target.nfmask,
            int(target.shift_right),
            target.shift_bits,
            MODES.index(target.mode),
        )

    def decode(self, data: XtConnmarkTginfo2) -> ConnmarkTarget:
        if data.mode >= len(MODES) or data.shift_dir > 1:
            raise BlobError(
                f"CONNMARK target: mode {data.mode} or shift direction {data.shift_dir} is "
                "not one iptables writes (modes 0 to 2, directions 0 and 1)"
            )
        return ConnmarkTarget(
            MODES[data.mode],
            data.ctmark,
            data.ctmask,
            data.nfmask,
            bool(data.shift_dir),
            data.shift_bits,
        )

    def act(self, target: ConnmarkTarget, packet: Packet) -> TargetAction:
        connection = packet.tracked_connection
        if connection is None:
            return TargetAction(None)  # nf_ct_get found no entry: nothing to mark
        ctmark, mark = target.marks(connection.mark, packet.mark)
        return TargetAction(
            None,
            mark=mark if mark != packet.mark else None,
            ctmark=ctmark if ctmark != connection.mark else None,
        )


def _shift_name(target: ConnmarkTarget) -> str:
    return "--right-shift-mark" if target.shift_right else "--left-shift-mark"


EXTENSION = ConnmarkTargetExtension()
