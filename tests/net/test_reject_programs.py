"""REJECT in the generated programs (both backends) under BPF_PROG_TEST_RUN: for the packets
the reference's answers are judged by against the kernel (test_reject_vs_netfilter), the
programs drop what the reference drops and answer exactly when it says the kernel answers,
with the same kind of answer, built as the kernel builds it."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror
from scapy.layers.l2 import Ether

from codegen.rules import evaluate, parse
from harness.runner import ChainRunner, frame_for
from tests.net.test_reject_vs_netfilter import _CODES, CASES, RULES, _layer, destination_of

pytestmark = pytest.mark.privileged

CLIENT, HOST = "198.18.0.1", "198.18.0.2"


def _kind(reply: bytes | None) -> str | None:
    if reply is None:
        return None
    packet = Ether(reply)
    if TCP in packet and packet[TCP].flags & 0x04:
        return "tcp-reset"
    if ICMP in packet and packet[ICMP].type == 3:
        return _CODES.get(packet[ICMP].code, f"icmp code {packet[ICMP].code}")
    return f"something else: {packet.summary()}"


def _checksums_ok(packet: IP) -> bool:
    rebuilt = IP(bytes(packet))
    rebuilt.chksum = None
    transport = rebuilt.payload
    if hasattr(transport, "chksum"):
        transport.chksum = None
    again = IP(bytes(rebuilt))
    return again.chksum == packet.chksum and (
        not hasattr(transport, "chksum") or again.payload.chksum == packet.payload.chksum
    )


@pytest.fixture(scope="module", params=["bytecode", "c"])
def runner(request: pytest.FixtureRequest):
    with ChainRunner(parse(RULES, "reject"), backend=request.param) as loaded:
        yield loaded


@pytest.mark.parametrize(
    ("name", "kind", "protocol", "broadcast"), CASES, ids=[c[0] for c in CASES]
)
def test_programs_answer_as_the_reference_says_the_kernel_does(
    runner: ChainRunner, name: str, kind, protocol, broadcast: bool
) -> None:
    header = IP(src=CLIENT, dst=destination_of(name), **({"proto": protocol} if protocol else {}))
    packet = bytes(header / _layer(kind))
    pkt_type = "broadcast" if broadcast else "host"
    want = evaluate(runner.ruleset, packet, "INPUT", "eth0", None, pkt_type=pkt_type)
    got = runner.run(frame_for(packet), "INPUT", "eth0", pkt_type=pkt_type)
    assert (got.verdict, got.deciding) == (want.verdict, want.deciding)
    assert _kind(got.reply) == want.reply
    if got.reply is None:
        return
    answer = Ether(got.reply)[IP]
    assert (answer.src, answer.dst, answer.ttl) == (HOST, CLIENT, 64)
    assert _checksums_ok(answer), answer.show(dump=True)
    if want.reply == "tcp-reset":
        sent = IP(packet)[TCP]
        assert (answer.id, answer.flags, answer.tos) == (0, "DF", 0)
        assert (answer[TCP].sport, answer[TCP].dport) == (sent.dport, sent.sport)
        assert answer[TCP].window == 0
        if sent.flags & 0x10:  # ACK: the RST takes its sequence from the ACK
            assert (answer[TCP].flags, answer[TCP].seq) == ("R", sent.ack)
        else:
            length = len(bytes(sent.payload)) + bool(sent.flags & 0x02) + bool(sent.flags & 0x01)
            assert answer[TCP].flags == "RA"
            assert (answer[TCP].seq, answer[TCP].ack) == (0, sent.seq + length)
    else:
        assert answer.tos == (IP(packet).tos & 0x1E) | 0xC0 and answer.flags == 0
        assert bytes(answer[ICMP].payload)[: len(packet)] == packet  # the whole packet quoted
        assert IPerror in answer
