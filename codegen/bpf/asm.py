"""Labels, subprograms and linking: a list of instructions and markers becomes loadable bytes.

A program is written as a flat list of `Insn`, `Label` and `Subprogram` items. A `Label` names the
next instruction; a `Subprogram` is a label that also starts a BPF-to-BPF function, which runs up
to the next `Subprogram` marker. Everything before the first marker is the entry function.

Resolution happens in two steps, as the kernel needs it:
- `assemble()` places every instruction in raw 8-byte slots (LD_IMM64 takes two) and turns label
  references into offsets, in slot units;
- `Assembly.link()` puts in what is only known at load time: map fds and kfunc BTF ids.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .disasm import disassemble
from .insn import Insn
from .isa import Class, JmpOp


@dataclass(frozen=True)
class Label:
    name: str


@dataclass(frozen=True)
class Subprogram(Label):
    """Starts a function. A global one is verified once, on its own, for any caller; it takes
    arguments described for the verifier ("ctx", "scalar", or a pointer to that many bytes)
    and returns a scalar. A static one (the default) is verified at every call."""

    linkage: str = "static"
    arguments: tuple[str | int, ...] = ()


Item = Insn | Label


class AssemblyError(ValueError):
    """A program that cannot be assembled; names the instruction and what is wrong with it."""

    def __init__(self, message: str, index: int | None = None, insn: Insn | None = None):
        self.index = index
        self.insn = insn
        where = ""
        if index is not None and insn is not None:
            where = f"instruction {index} ({disassemble(insn)}): "
            if insn.annotation is not None:
                where = f"instruction {index} ({disassemble(insn)}) from {insn.annotation}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Function:
    name: str
    start: int  # first slot
    end: int  # one past the last slot
    linkage: str = "static"
    arguments: tuple[str | int, ...] = ()


@dataclass(frozen=True)
class Assembly:
    """Instructions with labels resolved; maps and kfuncs may still be symbolic."""

    insns: tuple[Insn, ...]
    slots: tuple[int, ...]  # slot of each instruction
    functions: tuple[Function, ...]

    @property
    def slot_count(self) -> int:
        return self.slots[-1] + self.insns[-1].slots if self.insns else 0

    @property
    def map_names(self) -> set[str]:
        return {insn.map for insn in self.insns if insn.map is not None}

    def insn_at_slot(self, slot: int) -> Insn | None:
        """The instruction whose first slot is `slot` (verifier logs count slots)."""
        index = bisect_left(self.slots, slot)
        if index < len(self.slots) and self.slots[index] == slot:
            return self.insns[index]
        return None

    def link(
        self,
        maps: Mapping[str, int] | None = None,
        kfunc_id: Callable[[str], int] | None = None,
    ) -> tuple[Insn, ...]:
        """Resolve map references to fds and kfunc names to BTF ids."""
        maps = maps or {}
        result = []
        for index, insn in enumerate(self.insns):
            if insn.map is not None:
                if insn.map not in maps:
                    raise AssemblyError(f"no map named {insn.map!r} was given", index, insn)
                fd = maps[insn.map]
                insn = insn.resolved(imm=(insn.imm & ~0xFFFF_FFFF) | fd)
            elif insn.kfunc is not None:
                if kfunc_id is None:
                    raise AssemblyError("kfunc calls need vmlinux BTF to resolve", index, insn)
                try:
                    insn = insn.resolved(imm=kfunc_id(insn.kfunc))
                except LookupError as error:
                    raise AssemblyError(str(error.args[0]), index, insn) from None
            result.append(insn)
        return tuple(result)

    def encode(self, maps: Mapping[str, int] | None = None, kfunc_id=None) -> bytes:
        return b"".join(insn.encode() for insn in self.link(maps, kfunc_id))


def assemble(items: Iterable[Item]) -> Assembly:
    items = list(items)
    insns: list[Insn] = []
    slots: list[int] = []
    labels: dict[str, int] = {}
    starts: list[tuple[str, int]] = [("main", 0)]
    markers: dict[str, Subprogram] = {}
    slot = 0
    for item in items:
        if isinstance(item, Label):
            if item.name in labels:
                raise AssemblyError(f"label {item.name!r} is defined twice")
            labels[item.name] = slot
            if isinstance(item, Subprogram):
                markers[item.name] = item
                if slot == 0:
                    starts[0] = (item.name, 0)
                else:
                    starts.append((item.name, slot))
            continue
        if not isinstance(item, Insn):
            raise AssemblyError(f"item {item!r} is neither an instruction nor a label")
        insns.append(item)
        slots.append(slot)
        slot += item.slots
    if not insns:
        raise AssemblyError("the program has no instructions")
    for name, start in starts:
        if start >= slot:
            raise AssemblyError(f"subprogram {name!r} has no instructions")
    bounds = [s for _, s in starts] + [slot]
    functions = tuple(
        Function(
            name,
            start,
            bounds[i + 1],
            markers[name].linkage if name in markers else "static",
            markers[name].arguments if name in markers else ("ctx",),
        )
        for i, (name, start) in enumerate(starts)
    )
    subprogram_starts = {start for _, start in starts}

    def function_of(at: int) -> Function:
        return next(f for f in functions if f.start <= at < f.end)

    resolved: list[Insn] = []
    for index, (insn, at) in enumerate(zip(insns, slots, strict=True)):
        if insn.target is not None:
            if insn.target not in labels:
                raise AssemblyError(f"undefined label {insn.target!r}", index, insn)
            target = labels[insn.target]
            delta = target - (at + 1)
            if insn.is_pseudo_call or insn.is_pseudo_func:
                if target not in subprogram_starts or target == 0:
                    raise AssemblyError(
                        f"call target {insn.target!r} is not a subprogram", index, insn
                    )
                insn = insn.resolved(imm=delta & 0xFFFF_FFFF if insn.is_wide else delta)
            else:
                if target >= slot or function_of(target) != function_of(at):
                    raise AssemblyError(
                        f"jump to {insn.target!r} leaves subprogram {function_of(at).name!r}",
                        index,
                        insn,
                    )
                if _is_gotol(insn):
                    if not -(1 << 31) <= delta < (1 << 31):
                        raise AssemblyError(f"jump offset {delta} does not fit", index, insn)
                    insn = insn.resolved(imm=delta)
                else:
                    if not -(1 << 15) <= delta < (1 << 15) and _is_ja(insn):
                        # An unconditional jump too far for 16 bits becomes gotol (cpu v4),
                        # which takes the same single slot, so no other offset moves.
                        insn = insn.resolved(code=Class.JMP32 | JmpOp.JA, off=0, imm=delta)
                    elif not -(1 << 15) <= delta < (1 << 15):
                        raise AssemblyError(
                            f"jump offset {delta} does not fit in 16 bits (use gotol)",
                            index,
                            insn,
                        )
                    else:
                        insn = insn.resolved(off=delta)
        resolved.append(insn)
    return Assembly(tuple(resolved), tuple(slots), functions)


def _is_ja(insn: Insn) -> bool:
    return insn.cls == Class.JMP and insn.op == JmpOp.JA


def _is_gotol(insn: Insn) -> bool:
    return insn.cls == Class.JMP32 and insn.op == JmpOp.JA


def remove_unreachable(items: Iterable[Item]) -> list[Item]:
    """Drop instructions no path reaches, and subprograms nothing calls: the verifier refuses
    both, and generators produce them naturally (a rule after an unconditional verdict, a match
    that can never hold). Labels stay; jumps that reach code keep reaching it."""
    items = list(items)
    positions = [i for i, item in enumerate(items) if isinstance(item, Insn)]
    order = {item_index: n for n, item_index in enumerate(positions)}
    label_at: dict[str, int] = {}
    pending: list[str] = []
    for index, item in enumerate(items):
        if isinstance(item, Label):
            pending.append(item.name)
        elif pending:
            for name in pending:
                label_at[name] = order[index]
            pending.clear()
    insns = [items[i] for i in positions]
    reachable = [False] * len(insns)
    work = [0] if insns else []
    while work:
        n = work.pop()
        if n >= len(insns) or reachable[n]:
            continue
        reachable[n] = True
        insn = insns[n]
        ends = insn.cls in (Class.JMP, Class.JMP32) and insn.op == JmpOp.EXIT
        if insn.target is not None and insn.target in label_at:
            work.append(label_at[insn.target])
        unconditional = insn.is_jump and insn.op == JmpOp.JA
        if not ends and not unconditional:
            work.append(n + 1)
    kept: list[Item] = []
    for index, item in enumerate(items):
        if isinstance(item, Insn):
            if reachable[order[index]]:
                kept.append(item)
        elif isinstance(item, Subprogram):
            start = label_at.get(item.name)
            if start is not None and reachable[start]:
                kept.append(item)
            else:
                # Skip the marker; its code is unreachable too, so nothing of it is kept.
                continue
        else:
            kept.append(item)
    return kept
