"""`-m physdev` (xt_physdev.c) over the facts' bridge ports (codegen/c/bridges.py): physin 0 is
a packet no bridge handed to iptables, which xt_physdev answers from the options alone
(codegen.rules.extensions.physdev); physout is 0 unless the packet is bridged. With bridge
information but no output port, an output port option fails, negated or not, as in the
kernel."""

from __future__ import annotations

from codegen.rules.extensions.physdev import Physdev, no_bridge_answer

from .common import Labels, device_test

MODEL = Physdev


def write(match: Physdev, labels: Labels) -> list[str]:
    miss = f"goto {labels.miss};"
    if not labels.bridge_ports:  # no bridge hands packets to iptables: never any port
        return [] if no_bridge_answer(match) else [f"{miss}  // no bridge port here"]
    code = ["if (f->physin == 0) {"]
    code += [] if no_bridge_answer(match) else [f"    {miss}  // no bridge port: xt_physdev"]
    code.append("} else {")
    inner: list[str] = []
    if match.is_in is False:  # a packet with bridge information has an input port
        inner.append(miss)
    for given in (match.is_bridged, match.is_out):  # each: whether there is an output port
        if given is not None:
            inner += [f"if ({'!' if given else ''}f->physout)", f"    {miss}"]
    if match.in_port is not None:
        inner += device_test("f->physin", match.in_port.name, match.in_port.negated, labels)
    if match.out_port is not None:
        inner += ["if (f->physout == 0)", f"    {miss}"]
        inner += device_test("f->physout", match.out_port.name, match.out_port.negated, labels)
    return [*code, *(f"    {line}" for line in inner), "}"]
