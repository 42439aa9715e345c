"""The code of classified runs (codegen.tc.classifier has their tables): one global function
for every run of the program, and the record test it runs over a leaf's records with bpf_loop.

`classify(facts, run)` finds the run's first node by its number in the heads array (so a run's
trees are replaced by writing new nodes and one head: harness.deploy.patch), builds the
packet's key (the tree's seven fields, ports ABSENT or HOT where the transport header cannot
be read), walks each of the run's trees to a leaf (a step is one array lookup and one compare;
a walk is as many steps as the deepest tree has), tests the leaf's records in order up to the
first match or to a rule no earlier than an earlier tree's match, and answers as a chain
function does: CONTINUE when no rule of the run matched, else the verdict (HOTDROP for a
hotdrop), with the deciding rule's counter slot in the facts (UNCOUNTED for a hotdrop). A
packet whose ports are HOT takes the run's list of all its rules instead of the tree.
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label, Subprogram
from codegen.bpf.isa import R0, R1, R2, R3, R4, R6, R7, R8, R10, AluOp, JmpOp, Size
from codegen.rules.names import IPPROTO_TCP, IPPROTO_UDP

from . import classifier as C
from .layout import ACCEPT, CONTINUE, FACTS, UNCOUNTED, Facts, map_and_key
from .matches import TRANSPORT_HEADERS
from .targets import NewLabel, Targets

CLASSIFY = "classifier"
RECORD_TEST = "classifier:record"
HEADS_MAP = "classifier_heads"
NODES_MAP = "classifier_nodes"
RECORDS_MAP = "classifier_records"
HOTDROP = 4  # classify's answer beside CONTINUE, ACCEPT and DROP (RETURNED is 3)

# classify's frame: the bpf_loop context (the key's eight words, then the leaf's first
# record, and what the record test found: the verdict, the slot and the rule's place in the
# run), then a map key, the run's next tree, the end of its trees and its list of all rules.
KEY = -48
FIRST, RESULT, SLOT, BEST = KEY + 32, KEY + 36, KEY + 40, KEY + 44
MAP_KEY = KEY - 8
NEXT_TREE, END_TREES, EVERY_RULE = KEY - 16, KEY - 24, KEY - 32
HEADER_BYTES = {header.protocol: header.size for header in TRANSPORT_HEADERS}


def call(run: int, targets: Targets, after: str, new_label: NewLabel) -> list[Item]:
    """Call classify for a run (its number) and act on its answer as on the deciding rule's
    verdict; on to `after` when no rule of the run matched."""
    accepted, dropped = new_label("run_accepted"), new_label("run_dropped")
    return [
        I.mov64(R1, FACTS),
        I.mov64(R2, run),
        I.call_local(CLASSIFY),
        I.jmp32(JmpOp.JEQ, R0, CONTINUE, after),
        I.jmp32(JmpOp.JEQ, R0, ACCEPT, accepted),
        I.jmp32(JmpOp.JNE, R0, HOTDROP, dropped),
        *targets.hotdrop(),
        Label(accepted),
        *targets.accept(),
        Label(dropped),
        *targets.drop(),
    ]


def functions(depth: int, trees: int) -> list[Item]:
    """classify, its walk of up to `trees` trees unrolled to `depth` steps each, and the
    record test."""
    return [*_classify(depth, trees), *_record_test()]


def _scan() -> list[Item]:
    """Test the list of R8 records from R7 with bpf_loop."""
    return [
        I.stx(Size.W, R10, FIRST, R7),
        I.mov64(R1, R8),
        I.ld_func(R2, RECORD_TEST),
        I.mov64(R3, R10),
        I.alu64(AluOp.ADD, R3, KEY),
        I.mov64(R4, 0),
        I.call("loop"),
    ]


def _classify(depth: int, trees: int) -> list[Item]:
    ready, walk, hot = f"{CLASSIFY}:ready", f"{CLASSIFY}:walk", f"{CLASSIFY}:hot"
    none, finish = f"{CLASSIFY}:none", f"{CLASSIFY}:finish"
    code: list[Item] = [
        Subprogram(CLASSIFY, "global", (Facts.SIZE, "scalar")),
        I.jmp(JmpOp.JNE, R1, 0, ready),
        I.mov64(R0, 0),
        I.exit_(),
        Label(ready),
        I.mov64(FACTS, R1),
        # The run's first node, and from it where its trees' roots and its list are.
        I.stx(Size.W, R10, MAP_KEY, R2),
        *map_and_key(HEADS_MAP, MAP_KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, none),
        I.ldx(Size.W, R6, R0, 0),
        I.stx(Size.W, R10, MAP_KEY, R6),
        *map_and_key(NODES_MAP, MAP_KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, none),
        I.ldx(Size.W, R6, R0, 8),
        I.stx(Size.W, R10, NEXT_TREE, R6),
        I.ldx(Size.W, R1, R0, 4),
        I.alu64(AluOp.ADD, R1, R6),
        I.stx(Size.W, R10, END_TREES, R1),
        I.ldx(Size.W, R1, R0, 12),
        I.stx(Size.W, R10, EVERY_RULE, R1),
    ]
    for number, fact in enumerate(
        (Facts.SADDR, Facts.DADDR, Facts.PROTOCOL, None, None, Facts.IN_IFINDEX, Facts.OUT_IFINDEX)
    ):
        if fact is not None:
            code += [
                I.ldx(fact.size, R1, FACTS, fact.offset),
                I.stx(Size.W, R10, KEY + 4 * number, R1),
            ]
    code += [
        I.st(Size.W, R10, KEY + 28, 0),
        I.st(Size.W, R10, RESULT, 0),
        I.st(Size.W, R10, SLOT, 0),
        I.st(Size.W, R10, BEST, -1),  # 0xffffffff: no rule yet
    ]
    code += _ports(hot, walk)
    code += [
        Label(hot),
        I.st(Size.W, R10, KEY + 12, C.HOT),
        I.st(Size.W, R10, KEY + 16, C.HOT),
        I.ldx(Size.W, R1, R10, EVERY_RULE),
        I.stx(Size.W, R10, MAP_KEY, R1),
        *map_and_key(NODES_MAP, MAP_KEY),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, none),
        I.ldx(Size.W, R7, R0, 8),
        I.ldx(Size.W, R8, R0, 12),
        *_scan(),
        I.ja(finish),
        Label(walk),
    ]
    for tree in range(trees):
        code += _tree(tree, depth, finish)
    return [
        *code,
        Label(finish),
        I.ldx(Size.W, R0, R10, RESULT),
        I.jmp(JmpOp.JEQ, R0, 0, none),
        I.ldx(Size.W, R1, R10, SLOT),
        I.jmp(JmpOp.JNE, R0, HOTDROP, f"{CLASSIFY}:decided"),
        I.alu32(AluOp.OR, R1, UNCOUNTED),
        Label(f"{CLASSIFY}:decided"),
        I.stx(Size.W, FACTS, Facts.DECIDED.offset, R1),
        I.exit_(),
        Label(none),
        I.mov64(R0, 0),
        I.exit_(),
    ]


def _tree(tree: int, depth: int, finish: str) -> list[Item]:
    """Walk the run's tree number `tree` (if it has one) to its leaf and test the leaf's
    records; then on to the next tree's code, or to `finish`."""
    prefix = f"{CLASSIFY}:tree{tree}"
    leaf, done = f"{prefix}:leaf", f"{prefix}:done"
    code: list[Item] = [I.ldx(Size.W, R6, R10, NEXT_TREE)]
    if tree:
        code += [
            I.alu64(AluOp.ADD, R6, tree),
            I.ldx(Size.W, R1, R10, END_TREES),
            I.jmp(JmpOp.JGE, R6, R1, finish),
        ]
    for step in range(depth + 1):
        after = f"{prefix}:step{step}"
        code += [
            I.stx(Size.W, R10, MAP_KEY, R6),
            *map_and_key(NODES_MAP, MAP_KEY),
            I.call("map_lookup_elem"),
            I.jmp(JmpOp.JEQ, R0, 0, done),
            I.ldx(Size.W, R1, R0, 0),
            I.jmp32(JmpOp.JEQ, R1, C.LEAF, leaf),
        ]
        if step == depth:
            code.append(I.ja(done))  # deeper than the deepest tree: cannot happen
            break
        code += [
            I.alu64(AluOp.AND, R1, 7),
            I.alu64(AluOp.LSH, R1, 2),
            I.mov64(R2, R10),
            I.alu64(AluOp.ADD, R2, KEY),
            I.alu64(AluOp.ADD, R2, R1),
            I.ldx(Size.W, R2, R2, 0),  # the packet's value of the node's field
            I.ldx(Size.W, R3, R0, 4),
            I.ldx(Size.W, R6, R0, 8),
            I.jmp(JmpOp.JLE, R2, R3, after),
            I.ldx(Size.W, R6, R0, 12),
            Label(after),
        ]
    return [
        *code,
        Label(leaf),
        I.ldx(Size.W, R7, R0, 8),
        I.ldx(Size.W, R8, R0, 12),
        *_scan(),
        Label(done),
    ]


def _ports(hot: str, walk: str) -> list[Item]:
    """The key's ports: the packet's, ABSENT for a later fragment or a protocol without them,
    HOT (to `hot`) where the kernel's tcp and udp matches hotdrop. Then to `walk`."""
    present, absent = f"{CLASSIFY}:present", f"{CLASSIFY}:absent"
    fragment = f"{CLASSIFY}:fragment"
    code: list[Item] = [
        I.ldx(Size.H, R2, FACTS, Facts.FRAGMENT.offset),
        I.ldx(Size.B, R1, FACTS, Facts.PROTOCOL.offset),
        I.jmp32(JmpOp.JNE, R2, 0, fragment),
        I.ldx(Size.H, R3, FACTS, Facts.L4_LEN.offset),
    ]
    for protocol in (IPPROTO_TCP, IPPROTO_UDP):
        other = f"{CLASSIFY}:not{protocol}"
        code += [
            I.jmp32(JmpOp.JNE, R1, protocol, other),
            I.jmp32(JmpOp.JLT, R3, HEADER_BYTES[protocol], hot),
            I.ja(present),
            Label(other),
        ]
    code += [
        I.ja(absent),
        Label(fragment),
        I.jmp32(JmpOp.JNE, R1, IPPROTO_TCP, absent),
        I.jmp32(JmpOp.JEQ, R2, 1, hot),  # xt_tcpudp: an offset-1 TCP fragment is hotdropped
        Label(absent),
        I.st(Size.W, R10, KEY + 12, C.ABSENT),
        I.st(Size.W, R10, KEY + 16, C.ABSENT),
        I.ja(walk),
        Label(present),
        I.ldx(Size.H, R1, FACTS, Facts.SPORT.offset),
        I.stx(Size.W, R10, KEY + 12, R1),
        I.ldx(Size.H, R1, FACTS, Facts.DPORT.offset),
        I.stx(Size.W, R10, KEY + 16, R1),
        I.ja(walk),
    ]
    return code


# Offsets of a record's fields (classifier.RECORD).
SADDR, SMASK, DADDR, DMASK, IN, OUT = 0, 4, 8, 12, 16, 20
SPORT_FIRST, SPORT_LAST, DPORT_FIRST, DPORT_LAST = 24, 26, 28, 30
PROTOCOL, FLAGS, VERDICT, PLACE, RECORD_SLOT = 32, 33, 34, 36, 40


def _record_test() -> list[Item]:
    """bpf_loop's callback (index, context): test the leaf's record `index`; 1 stops the loop
    with the context's verdict, slot and best place set, or at a rule no earlier than the
    best an earlier tree found; 0 goes on to the next record."""
    name = RECORD_TEST
    miss, matched, hotdrop = f"{name}:miss", f"{name}:matched", f"{name}:hotdrop"
    code: list[Item] = [
        Subprogram(name, "static", ("scalar", "scalar")),
        I.mov64(R6, R2),
        I.ldx(Size.W, R2, R6, FIRST - KEY),
        I.alu64(AluOp.ADD, R1, R2),
        I.stx(Size.W, R10, -8, R1),
        *map_and_key(RECORDS_MAP, -8),
        I.call("map_lookup_elem"),
        I.jmp(JmpOp.JEQ, R0, 0, miss),
        I.mov64(R7, R0),
        I.ldx(Size.W, R1, R7, PLACE),
        I.ldx(Size.W, R2, R6, BEST - KEY),
        I.jmp(JmpOp.JGE, R1, R2, f"{name}:stop"),
        I.ldx(Size.B, R8, R7, FLAGS),
    ]
    for key, value, mask, inverted in (
        (0, SADDR, SMASK, C.INV_SADDR),
        (4, DADDR, DMASK, C.INV_DADDR),
    ):
        code += [
            I.ldx(Size.W, R1, R6, key),
            I.ldx(Size.W, R2, R7, mask),
            I.alu32(AluOp.AND, R1, R2),
            I.ldx(Size.W, R2, R7, value),
            *_unless(R1, R2, inverted, miss, f"{name}:{value}"),
        ]
    for key, value, size, inverted in (
        (8, PROTOCOL, Size.B, C.INV_PROTOCOL),
        (20, IN, Size.W, C.INV_IN),
        (24, OUT, Size.W, C.INV_OUT),
    ):
        done = f"{name}:{value}"
        code += [
            I.ldx(size, R2, R7, value),
            I.jmp32(JmpOp.JEQ, R2, 0, done),  # no such test
            I.ldx(Size.W, R1, R6, key),
            *_unless(R1, R2, inverted, miss, done),
        ]
    code += [
        I.jmp(JmpOp.JSET, R8, C.PORTS, f"{name}:ports"),
        I.ja(matched),
        Label(f"{name}:ports"),
    ]
    for key, first, last, inverted in (
        (12, SPORT_FIRST, SPORT_LAST, C.INV_SPORT),
        (16, DPORT_FIRST, DPORT_LAST, C.INV_DPORT),
    ):
        outside, done = f"{name}:out{first}", f"{name}:ok{first}"
        code += [
            I.ldx(Size.W, R1, R6, key),
            I.jmp32(JmpOp.JEQ, R1, C.HOT, hotdrop),
            I.jmp32(JmpOp.JEQ, R1, C.ABSENT, miss),
            I.ldx(Size.H, R2, R7, first),
            I.jmp32(JmpOp.JLT, R1, R2, outside),
            I.ldx(Size.H, R2, R7, last),
            I.jmp32(JmpOp.JGT, R1, R2, outside),
            I.jmp(JmpOp.JSET, R8, inverted, miss),
            I.ja(done),
            Label(outside),
            I.jmp(JmpOp.JSET, R8, inverted, done),
            I.ja(miss),
            Label(done),
        ]
    return [
        *code,
        Label(matched),
        I.ldx(Size.B, R1, R7, VERDICT),
        I.stx(Size.W, R6, RESULT - KEY, R1),
        I.ja(f"{name}:slot"),
        Label(hotdrop),
        I.st(Size.W, R6, RESULT - KEY, HOTDROP),
        Label(f"{name}:slot"),
        I.ldx(Size.W, R1, R7, RECORD_SLOT),
        I.stx(Size.W, R6, SLOT - KEY, R1),
        I.ldx(Size.W, R1, R7, PLACE),
        I.stx(Size.W, R6, BEST - KEY, R1),
        Label(f"{name}:stop"),
        I.mov64(R0, 1),
        I.exit_(),
        Label(miss),
        I.mov64(R0, 0),
        I.exit_(),
    ]


def _unless(packet, rule, inverted: int, miss: str, done: str) -> list[Item]:
    """On to `done` when packet == rule (!= for a record with the `inverted` flag), else miss."""
    differs = f"{done}:differs"
    return [
        I.jmp32(JmpOp.JNE, packet, rule, differs),
        I.jmp(JmpOp.JSET, R8, inverted, miss),
        I.ja(done),
        Label(differs),
        I.jmp(JmpOp.JSET, R8, inverted, done),
        I.ja(miss),
        Label(done),
    ]
