"""The start of every program: the packet's headers parsed once into the facts struct
(codegen.tc.layout.Facts) that every match reads, or a jump to `not_handled` for what the kernel
would drop before netfilter sees it (ip_rcv_core's checks) or what is not IPv4.

Expects the context in r6 and leaves FACTS (r9) pointing at the facts, r2 and r3 at the packet's
data and data_end.
"""

from __future__ import annotations

from codegen.bpf import insn as I
from codegen.bpf.asm import Item, Label
from codegen.bpf.isa import R0, R1, R2, R3, R4, R6, R7, R10, AluOp, JmpOp, Reg, Size
from codegen.bpf.testrun import SKB_OFFSETS

from .layout import FACTS, FACTS_OFFSET, Facts, Field
from .program import Hook

ETH_HLEN, ETH_P_IP_BE = 14, 0x0008
PACKET_HOST, PACKET_OTHERHOST = 0, 3
HEADERS = ETH_HLEN + 60 + 20  # the most any match looks at: Ethernet, IPv4 with options, TCP


def parse(hook: Hook, tracking: bool = False) -> list[Item]:
    """Fill the packet facts, or go to `not_handled`. Without `tracking` the connection's part
    of the facts is never read, so it is not zeroed (ct_classify writes all of it)."""
    nh = "not_handled"
    size = Facts.SIZE if tracking else Facts.CONNECTION
    facts_store = [I.st(Size.DW, R10, FACTS_OFFSET + 8 * i, 0) for i in range(size // 8)]
    code: list[Item] = [
        *facts_store,
        I.mov64(FACTS, R10),
        I.alu64(AluOp.ADD, FACTS, FACTS_OFFSET),
        # A VLAN tag taken off by offload (the frame data shows the inner EtherType): the
        # IP stack sees the packet on the VLAN device, whose own programs judge it, if any.
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["vlan_present"]),
        I.jmp(JmpOp.JNE, R1, 0, nh),
        # Make the headers linear if they are not (large or non-linear skbs).
        I.ldx(Size.W, R2, R6, SKB_OFFSETS["len"]),
        I.jmp(JmpOp.JLE, R2, HEADERS, "pull_length_known"),
        I.mov64(R2, HEADERS),
        Label("pull_length_known"),
        I.ldx(Size.W, R3, R6, SKB_OFFSETS["data"]),
        I.ldx(Size.W, R4, R6, SKB_OFFSETS["data_end"]),
        I.alu64(AluOp.ADD, R3, R2),
        I.jmp(JmpOp.JLE, R3, R4, "linear"),
        I.mov64(R1, R6),
        I.call("skb_pull_data"),
        Label("linear"),
        *ip_header_within(nh),
        I.ldx(Size.H, R1, R2, 12),
        I.jmp32(JmpOp.JNE, R1, ETH_P_IP_BE, nh),
        I.ldx(Size.B, R4, R2, ETH_HLEN),
        I.mov32(R1, R4),
        I.alu32(AluOp.RSH, R1, 4),
        I.jmp32(JmpOp.JNE, R1, 4, nh),
        I.alu32(AluOp.AND, R4, 0x0F),
        I.jmp32(JmpOp.JLT, R4, 5, nh),
        I.alu32(AluOp.LSH, R4, 2),  # header length in bytes, 20..60
        I.ldx(Size.H, R1, R2, ETH_HLEN + 2),
        I.to_be(R1, 16),  # total length
        I.jmp32(JmpOp.JLT, R1, R4, nh),
        I.stx(Size.H, FACTS, Facts.TOT_LEN.offset, R1),
        I.alu32(AluOp.ADD, R1, ETH_HLEN),
        I.ldx(Size.W, R0, R6, SKB_OFFSETS["len"]),
        I.jmp32(JmpOp.JGT, R1, R0, nh),  # claims more than arrived: ip_rcv drops it
        I.alu32(AluOp.SUB, R1, ETH_HLEN),
        I.alu32(AluOp.SUB, R1, R4),
        I.stx(Size.H, FACTS, Facts.L4_LEN.offset, R1),
        *_copy_be(R2, ETH_HLEN + 6, Size.H, Facts.FRAGMENT, mask=0x1FFF),
        *_copy_be(R2, ETH_HLEN + 4, Size.H, Facts.ID),
        I.ldx(Size.B, R1, R2, ETH_HLEN + 6),
        I.alu32(AluOp.RSH, R1, 5),  # MF: bit 13 of the network-order flags and offset
        I.alu32(AluOp.AND, R1, 1),
        I.stx(Size.B, FACTS, Facts.MORE_FRAGMENTS.offset, R1),
        *_copy_be(R2, ETH_HLEN + 1, Size.B, Facts.TOS),
        *_copy_be(R2, ETH_HLEN + 8, Size.B, Facts.TTL),
        *_copy_be(R2, ETH_HLEN + 9, Size.B, Facts.PROTOCOL),
        *_copy_be(R2, ETH_HLEN + 12, Size.W, Facts.SADDR),
        *_copy_be(R2, ETH_HLEN + 16, Size.W, Facts.DADDR),
        I.ldx(Size.W, R1, R6, SKB_OFFSETS["mark"]),
        I.stx(Size.W, FACTS, Facts.MARK.offset, R1),
        # Test-run cannot make every packet type (its device is lo, whose broadcast address
        # is all zeros): the chain program takes the type from cb[2] instead.
        I.ldx(
            Size.W,
            R1,
            R6,
            SKB_OFFSETS["cb"] + 8 if hook == "chain" else SKB_OFFSETS["pkt_type"],
        ),
        I.stx(Size.B, FACTS, Facts.PKT_TYPE.offset, R1),
    ]
    if hook == "ingress":
        # ip_rcv drops frames for another host before any hook.
        code.append(I.jmp32(JmpOp.JEQ, R1, PACKET_OTHERHOST, nh))
    # The transport header, for first fragments only, as far as it is there.
    code += [
        I.ldx(Size.H, R1, FACTS, Facts.FRAGMENT.offset),
        I.jmp32(JmpOp.JNE, R1, 0, "parsed"),
        I.mov64(R7, R2),
        I.alu64(AluOp.ADD, R7, ETH_HLEN),
        I.alu64(AluOp.ADD, R7, R4),
        I.ldx(Size.H, R4, FACTS, Facts.L4_LEN.offset),
    ]
    for needed, loads in (
        (2, [(0, Size.B, Facts.ICMP_TYPE), (1, Size.B, Facts.ICMP_CODE)]),
        (4, [(0, Size.H, Facts.SPORT), (2, Size.H, Facts.DPORT)]),
        (14, [(13, Size.B, Facts.TCP_FLAGS)]),
    ):
        code += [
            I.jmp32(JmpOp.JLT, R4, needed, "parsed"),
            I.mov64(R1, R7),
            I.alu64(AluOp.ADD, R1, needed),
            I.jmp(JmpOp.JGT, R1, R3, "parsed"),
        ]
        for offset, size, fact in loads:
            code += _copy_be(R7, offset, size, fact)
    code.append(Label("parsed"))
    interfaces = {
        "ingress": (SKB_OFFSETS["ifindex"], None),
        "egress": (None, SKB_OFFSETS["ifindex"]),
        "chain": (SKB_OFFSETS["ingress_ifindex"], SKB_OFFSETS["cb"]),
        "bridged": (None, None),  # the bridge (codegen.tc.bridges)
    }[hook]
    for offset, fact in zip(interfaces, (Facts.IN_IFINDEX, Facts.OUT_IFINDEX), strict=True):
        if offset is not None:
            code += [I.ldx(Size.W, R1, R6, offset), I.stx(Size.W, FACTS, fact.offset, R1)]
    return code


def ip_header_within(short: str) -> list[Item]:
    """r2, r3 = the packet's data and data_end (r6: the context); to `short` unless an
    Ethernet header and an IPv4 header without options are within them."""
    return [
        I.ldx(Size.W, R2, R6, SKB_OFFSETS["data"]),
        I.ldx(Size.W, R3, R6, SKB_OFFSETS["data_end"]),
        I.mov64(R1, R2),
        I.alu64(AluOp.ADD, R1, ETH_HLEN + 20),
        I.jmp(JmpOp.JGT, R1, R3, short),
    ]


def _copy_be(
    base: Reg, offset: int, size: Size, fact: Field, mask: int | None = None
) -> list[Item]:
    """Load a network-order packet field, convert it to host order, store it as a fact."""
    code: list[Item] = [I.ldx(size, R1, base, offset)]
    if size != Size.B:
        code.append(I.to_be(R1, size.bytes * 8))
    if mask is not None:
        code.append(I.alu32(AluOp.AND, R1, mask))
    return [*code, I.stx(fact.size, FACTS, fact.offset, R1)]
