"""`-m physdev` (xt_physdev.c) over the facts' bridge ports (codegen.tc.bridges): PHYS_IN is 0
for a packet no bridge handed to iptables, which xt_physdev answers from the options alone
(codegen.rules.extensions.physdev); PHYS_OUT is 0 unless the packet is bridged. Port names are
resolved to the ifindexes present when the program is built, as -i's are. With bridge
information but no output port, an output port option fails, negated or not, as in the
kernel."""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R1, JmpOp
from codegen.rules.extensions.physdev import Physdev, no_bridge_answer

from ..layout import Facts
from .base import Context, Emitter, device_is, load


def physdev(match: Physdev, ctx: Context) -> list[Item]:
    without = [] if no_bridge_answer(match) else [I.ja(ctx.miss)]
    if not ctx.bridge_ports:  # OUTPUT: the facts' words are the owner's
        return without
    bridged = ctx.new_label("physdev_bridged")
    done = ctx.new_label("physdev_done")
    code: list[Item] = [
        load(Facts.PHYS_IN),
        I.jmp32(JmpOp.JNE, R1, 0, bridged),
        *without,
        I.ja(done),
        Label(bridged),
    ]
    if match.is_in is False:  # a packet with bridge information has an input port
        code.append(I.ja(ctx.miss))
    for given in (match.is_bridged, match.is_out):  # both: whether there is an output port
        if given is not None:
            unless = JmpOp.JEQ if given else JmpOp.JNE
            code += [load(Facts.PHYS_OUT), I.jmp32(unless, R1, 0, ctx.miss)]
    if match.in_port is not None:
        code += device_is(Facts.PHYS_IN, match.in_port.name, match.in_port.negated, ctx)
    if match.out_port is not None:
        code += [load(Facts.PHYS_OUT), I.jmp32(JmpOp.JEQ, R1, 0, ctx.miss)]
        code += device_is(Facts.PHYS_OUT, match.out_port.name, match.out_port.negated, ctx)
    return [*code, Label(done)]


EMITTER = Emitter(Physdev, physdev)
