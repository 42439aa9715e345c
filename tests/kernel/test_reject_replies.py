"""codegen/reject's reject_reply, run by the kernel with BPF_PROG_TEST_RUN: the answers it builds
in place of the packet, field by field against what nf_send_reset and icmp_send put in theirs
(research stateful.md section 4, codegen/rules/extensions/reject.py), and the packets it answers
with nothing but the drop.

Under test-run the skb's device is the loopback, whose address is 00:00:00:00:00:00: frames sent
to it are PACKET_HOST, others PACKET_OTHERHOST (eth_type_trans), so the frames here go to it.
"""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.l2 import Ether
from scapy.packet import Padding, Raw

from codegen import reject
from codegen.bpf import clang
from codegen.bpf import insn as I
from codegen.bpf.isa import R1, R2, R3, R4, R5, R6, Size
from codegen.bpf.loader import LoadedProgram, load
from codegen.bpf.testrun import SKB_OFFSETS, prog_test_run
from codegen.jiffies import kernel_hz
from codegen.reject.limits import Rate, RateMaps
from codegen.rules.extensions.reject import REJECT_TYPES
from codegen.rules.icmp_rate import IcmpRateLimiter, IcmpSysctls

pytestmark = pytest.mark.privileged

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
PEER_MAC, OUR_MAC = "02:00:00:00:00:01", "00:00:00:00:00:00"
PEER, US, ROUTER = "198.18.0.1", "198.18.0.2", "198.18.7.254"
ETH = Ether(src=PEER_MAC, dst=OUR_MAC)
CODES = {value: code for _, _, value, code in REJECT_TYPES if code is not None}
TCP_RESET = 7


@pytest.fixture(scope="module")
def limits():
    """The rate limits' maps, unconfigured (no limits) unless a test sets them."""
    with RateMaps.create() as maps:
        yield maps


@pytest.fixture(scope="module")
def programs(limits):
    loaded: dict[tuple[int, int, str], LoadedProgram] = {}

    def get(with_: int, hook: int = 0, source: str = ROUTER) -> LoadedProgram:
        key = (with_, hook, source)
        if key not in loaded:
            entry = [
                I.mov64(R6, R1),
                I.mov64(R1, R6),
                I.mov64(R2, with_),
                I.mov64(R3, hook),
                I.mov32(R4, int(ipaddress.IPv4Address(source))),
                I.ldx(Size.W, R5, R6, SKB_OFFSETS["pkt_type"]),  # as the programs pass it
                I.call_local("reject_reply"),
                I.exit_(),
            ]
            items = [*entry, *reject.bytecode_functions()]
            loaded[key] = load(items, name="reject_test", maps=limits.maps)
        return loaded[key]

    yield get
    for program in loaded.values():
        program.close()


def answer(programs, frame, with_: int, hook: int = 0, source: str = ROUTER) -> Ether | None:
    result = prog_test_run(programs(with_, hook, source).fd, bytes(frame))
    if result.retval == TC_ACT_SHOT:
        return None
    assert result.retval == TC_ACT_REDIRECT
    return Ether(result.data)


def sum16(data: bytes, start: int = 0) -> int:
    """The ones' complement sum of `data` (zero-padded to even length), folded to 16 bits."""
    data += b"\0" * (len(data) % 2)
    total = start + sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_sum(ip: IP, length: int) -> int:
    header = ipaddress.IPv4Address(ip.src).packed + ipaddress.IPv4Address(ip.dst).packed
    return sum16(header + bytes([0, ip.proto]) + length.to_bytes(2, "big"))


def ip_checksum_ok(ip: IP) -> bool:
    return sum16(bytes(ip)[: ip.ihl * 4]) == 0xFFFF


def tcp_checksum_ok(ip: IP) -> bool:
    segment = bytes(ip)[ip.ihl * 4 : ip.len]
    return sum16(segment, pseudo_sum(ip, len(segment))) == 0xFFFF


def check_rst(reply: Ether, sent: Ether) -> TCP:
    assert reply.src == sent.dst and reply.dst == sent.src and reply.type == 0x0800
    ip, tcp = reply[IP], reply[TCP]
    assert (ip.version, ip.ihl, ip.tos, ip.id, ip.flags, ip.frag) == (4, 5, 0, 0, "DF", 0)
    assert (ip.ttl, ip.proto, ip.len) == (64, 6, 40)
    assert (ip.src, ip.dst) == (sent[IP].dst, sent[IP].src)
    assert (tcp.sport, tcp.dport) == (sent[TCP].dport, sent[TCP].sport)
    assert (tcp.dataofs, tcp.window, tcp.urgptr, tcp.reserved) == (5, 0, 0, 0)
    assert len(reply) == 54 and not tcp.payload
    assert ip_checksum_ok(ip)
    assert tcp_checksum_ok(ip)
    return tcp


def test_a_syn_gets_rst_ack_acknowledging_it(programs) -> None:
    sent = ETH / IP(src=PEER, dst=US, tos=0xB8) / TCP(sport=40000, dport=23, flags="S", seq=1000)
    tcp = check_rst(answer(programs, sent, TCP_RESET), sent)
    assert (str(tcp.flags), tcp.seq, tcp.ack) == ("RA", 0, 1001)


def test_data_with_ack_gets_a_bare_rst_at_its_ack(programs) -> None:
    sent = (
        ETH
        / IP(src=PEER, dst=US)
        / TCP(sport=40000, dport=80, flags="PA", seq=5000, ack=0xFFFFFFF0)
        / Raw(b"GET / HTTP/1.0\r\n\r\n")
    )
    tcp = check_rst(answer(programs, sent, TCP_RESET), sent)
    assert (str(tcp.flags), tcp.seq, tcp.ack) == ("R", 0xFFFFFFF0, 0)


def test_a_fin_with_data_and_no_ack_counts_both(programs) -> None:
    sent = (
        ETH
        / IP(src=PEER, dst=US)
        / TCP(sport=1, dport=2, flags="F", seq=0xFFFFFFFF, options=[("NOP", None)] * 4)
        / Raw(b"abc")
        / Padding(b"\0" * 10)
    )
    tcp = check_rst(answer(programs, sent, TCP_RESET), sent)
    assert (str(tcp.flags), tcp.seq, tcp.ack) == ("RA", 0, 3)  # seq + FIN + 3 bytes, mod 2**32


def test_a_long_odd_segment_is_checked_and_counted(programs) -> None:
    """1401 bytes of data: the checksum runs over many chunks and an odd tail."""
    sent = (
        ETH
        / IP(src=PEER, dst=US)
        / TCP(flags="P", seq=10)
        / Raw(bytes(range(251)) * 5 + b"z" * 146)
    )
    tcp = check_rst(answer(programs, sent, TCP_RESET), sent)
    assert (str(tcp.flags), tcp.seq, tcp.ack) == ("RA", 0, 10 + 1401)
    broken = Ether(bytes(sent))
    broken[Raw].load = broken[Raw].load[:-1] + b"y"  # one byte changed, the checksum kept
    assert prog_test_run(programs(TCP_RESET).fd, bytes(broken)).retval == TC_ACT_SHOT


def test_a_socket_style_partial_checksum_is_accepted(programs) -> None:
    """A TCP checksum holding only the pseudo header's sum (CHECKSUM_PARTIAL) is taken as good."""
    sent = ETH / IP(src=PEER, dst=US) / TCP(sport=1, dport=2, flags="S", seq=7)
    sent = Ether(bytes(sent))
    sent[TCP].chksum = pseudo_sum(sent[IP], len(sent[TCP]))
    tcp = check_rst(answer(programs, sent, TCP_RESET), sent)
    assert (str(tcp.flags), tcp.ack) == ("RA", 8)


def quote_of(sent: Ether) -> bytes:
    ip = Ether(bytes(sent))[IP]
    return bytes(ip)[: ip.len][:548]  # the datagram without the Ethernet padding, cut


def check_unreachable(reply: Ether, sent: Ether, code: int, source: str = ROUTER) -> None:
    assert reply.src == sent.dst and reply.dst == sent.src and reply.type == 0x0800
    ip = reply[IP]
    quote = quote_of(sent)
    assert (ip.version, ip.ihl, ip.flags, ip.frag, ip.ttl, ip.proto) == (4, 5, 0, 0, 64, 1)
    assert ip.tos == (sent[IP].tos & 0x1E) | 0xC0
    assert ip.id != 0
    assert (ip.src, ip.dst) == (source, sent[IP].src)
    assert ip.len == 20 + 8 + len(quote) <= 576
    assert len(reply) == 14 + ip.len  # nothing after the answer
    assert ip_checksum_ok(ip)
    icmp_bytes = bytes(ip)[20 : ip.len]
    assert (icmp_bytes[0], icmp_bytes[1], icmp_bytes[4:8]) == (3, code, b"\0\0\0\0")
    assert icmp_bytes[8:] == quote
    assert sum16(icmp_bytes) == 0xFFFF


UDP_SMALL = ETH / IP(src=PEER, dst=US, tos=0x10) / UDP(sport=5353, dport=9) / Raw(b"hi")


@pytest.mark.parametrize("with_", sorted(CODES))
def test_every_icmp_code(programs, with_: int) -> None:
    check_unreachable(answer(programs, UDP_SMALL, with_), UDP_SMALL, CODES[with_])


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(UDP_SMALL, id="udp"),
        pytest.param(ETH / IP(src=PEER, dst=US, tos=0xB8) / TCP(dport=22, flags="S"), id="tcp"),
        pytest.param(ETH / IP(src=PEER, dst=US) / ICMP(type=8, id=7) / Raw(b"ping"), id="echo"),
        pytest.param(
            ETH / IP(src=PEER, dst=US) / UDP(dport=9) / Raw(bytes(range(256)) * 4), id="1000+"
        ),
        pytest.param(
            ETH / IP(src=PEER, dst=US) / UDP(dport=9) / Raw(b"x") / Padding(b"\xee" * 20),
            id="padded",
        ),
        pytest.param(
            ETH / IP(src=PEER, dst=US, options=b"\x01" * 4) / UDP(dport=9) / Raw(b"opts"),
            id="ip-options",
        ),
        pytest.param(ETH / IP(src=PEER, dst=US, proto=253) / Raw(b"\xff\xff"), id="other"),
    ],
)
def test_the_error_quotes_the_datagram(programs, sent: Ether) -> None:
    check_unreachable(answer(programs, sent, 3), sent, 3)


def test_the_1000_byte_quote_is_exactly_548_bytes(programs) -> None:
    sent = Ether(bytes(ETH / IP(src=PEER, dst=US) / UDP(dport=9) / Raw(bytes(972))))
    assert sent[IP].len == 1000
    reply = answer(programs, sent, 3)
    assert reply[IP].len == 576 and len(bytes(reply)) == 14 + 576
    assert bytes(reply[IP])[28:] == bytes(sent[IP])[:548]
    assert isinstance(reply[ICMP].payload, IPerror)


def test_udp_without_a_checksum_is_answered(programs) -> None:
    sent = ETH / IP(src=PEER, dst=US) / UDP(sport=1, dport=2, chksum=0) / Raw(b"z")
    check_unreachable(answer(programs, sent, 3), sent, 3)


def test_egress_answers_the_same(programs) -> None:
    """hook 1 (OUTPUT): the same answer, redirected to our own ingress (the flag is not seen
    under test-run; the retval and the bytes are)."""
    sent = ETH / IP(src=US, dst=PEER) / TCP(sport=40000, dport=23, flags="S", seq=9)
    ingress = prog_test_run(programs(TCP_RESET, 0, US).fd, bytes(sent))
    egress = prog_test_run(programs(TCP_RESET, 1, US).fd, bytes(sent))
    assert ingress.retval == egress.retval == TC_ACT_REDIRECT
    assert ingress.data == egress.data
    check_rst(Ether(egress.data), sent)
    udp = ETH / IP(src=US, dst=PEER) / UDP(dport=9) / Raw(b"q")
    reply = answer(programs, udp, 3, 1, US)
    check_unreachable(reply, udp, 3, US)


def test_icmp_errors_keep_to_the_kernels_rate_limits(programs, limits) -> None:
    """rj_rate_allows against the reference's buckets (codegen.rules.icmp_rate), packet by
    packet on a fixed clock, and against what the kernel did on this machine: a burst of 20
    from one peer got 6 answers, a burst at once after it none, one a second later."""
    hz = kernel_hz()
    model = IcmpRateLimiter(hz)
    limits.configure(IcmpSysctls(), hz, draw=model.draw)
    start = 1 << 32  # a fixed clock, as the runner's

    def burst(count: int, at: int, peer: str = PEER, hook: int = 0) -> tuple[int, int]:
        limits.set_clock(start + at)
        sent = ETH / IP(src=peer, dst=US) / UDP(sport=5, dport=9) / Raw(b"r")
        ours = expected = 0
        for _ in range(count):
            result = prog_test_run(programs(3, hook, US).fd, bytes(sent))
            ours += result.retval == TC_ACT_REDIRECT
            address = int(ipaddress.IPv4Address(peer))
            expected += model.allows(address, at, local=bool(hook))
        return ours, expected

    try:
        assert burst(20, 0) == (6, 6)
        assert burst(10, hz // 5) == (0, 0)
        assert burst(10, hz // 5 + hz) == (1, 1)
        assert burst(10, hz // 5 + 4 * hz) == (3, 3)
        assert burst(10, 6 * hz, hook=1) == (10, 10)  # to our own socket: no peer's bucket
        # Many peers at once, from fresh buckets: the global bucket's 50 credits, one an
        # error here, run out.
        limits.forget()
        model = IcmpRateLimiter(hz)
        many = [burst(2, 20 * hz, peer=f"198.18.9.{n}") for n in range(1, 60)]
        assert sum(ours for ours, _ in many) == sum(want for _, want in many) == 50
        assert [ours for ours, _ in many] == [want for _, want in many]
        # 20 ms later the global bucket has refilled by 20 (1000 a second).
        late = [burst(1, 20 * hz + hz // 50, peer=f"198.18.10.{n}") for n in range(1, 30)]
        assert sum(ours for ours, _ in late) == sum(want for _, want in late) == 20
    finally:
        limits.maps["reject_rate"].update(0, bytes(Rate()))  # unconfigured: no limits
        limits.forget()


def bad_checksum(frame: Ether, layer) -> Ether:
    built = frame.__class__(bytes(frame))
    built[layer].chksum ^= 0x0101
    return built


NO_ANSWER = [
    pytest.param(
        ETH / IP(src=PEER, dst=US, frag=10) / Raw(bytes(16)), TCP_RESET, id="fragment-rst"
    ),
    pytest.param(ETH / IP(src=PEER, dst=US, frag=10) / Raw(bytes(16)), 3, id="fragment-icmp"),
    pytest.param(ETH / IP(src=PEER, dst=US) / TCP(flags="R"), TCP_RESET, id="rst"),
    pytest.param(ETH / IP(src=PEER, dst=US) / TCP(flags="RA"), TCP_RESET, id="rst-ack"),
    pytest.param(ETH / IP(src=PEER, dst=US) / UDP(), TCP_RESET, id="rst-for-udp"),
    pytest.param(ETH / IP(src=PEER, dst=US) / TCP(flags="S") / Raw(b"x"), 4, id="echo-reply-value"),
    pytest.param(
        ETH / IP(src=PEER, dst=US) / ICMP(type=3, code=3) / IPerror(src=US, dst=PEER) / UDP(),
        3,
        id="icmp-error",
    ),
    pytest.param(ETH / IP(src=PEER, dst=US) / ICMP(type=11), 3, id="time-exceeded"),
    pytest.param(ETH / IP(src=PEER, dst=US) / ICMP(type=19), 3, id="icmp-type-19"),
    pytest.param(ETH / IP(src=PEER, dst="255.255.255.255") / UDP(), 3, id="broadcast"),
    pytest.param(ETH / IP(src=PEER, dst="224.0.0.1") / UDP(), 3, id="multicast"),
    pytest.param(
        ETH / IP(src=PEER, dst="224.0.0.1") / TCP(flags="S"), TCP_RESET, id="multicast-rst"
    ),
    pytest.param(
        Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src=PEER, dst=US) / UDP(),
        3,
        id="pkt-type-broadcast",
    ),
    pytest.param(
        Ether(src=PEER_MAC, dst="02:00:00:00:00:09") / IP(src=PEER, dst=US) / UDP(),
        3,
        id="pkt-type-otherhost",
    ),
    pytest.param(
        bad_checksum(ETH / IP(src=PEER, dst=US) / TCP(flags="S"), TCP), TCP_RESET, id="bad-tcp"
    ),
    pytest.param(
        bad_checksum(ETH / IP(src=PEER, dst=US) / TCP(flags="S"), TCP), 3, id="bad-tcp-icmp"
    ),
    pytest.param(
        bad_checksum(ETH / IP(src=PEER, dst=US) / UDP() / Raw(b"x"), UDP), 3, id="bad-udp"
    ),
    pytest.param(bad_checksum(ETH / IP(src=PEER, dst=US) / ICMP(type=8), ICMP), 3, id="bad-icmp"),
    pytest.param(
        ETH / IP(src=PEER, dst=US, proto=6) / Raw(bytes(12)), TCP_RESET, id="short-tcp-header"
    ),
]


@pytest.mark.parametrize(("sent", "with_"), NO_ANSWER)
def test_no_answer_only_the_drop(programs, sent: Ether, with_: int) -> None:
    result = prog_test_run(programs(with_).fd, bytes(sent))
    assert result.retval == TC_ACT_SHOT
    assert result.data == bytes(sent)  # untouched


def test_unverified_protocols_are_answered_whatever_their_checksum(programs) -> None:
    sent = ETH / IP(src=PEER, dst=US, proto=47) / Raw(b"\x12\x34\x56\x78")  # GRE
    check_unreachable(answer(programs, sent, 3), sent, 3)


def test_the_verifier_cost_stays_small(programs) -> None:
    stats = programs(3).stats
    assert stats is not None and stats.insns_processed < 100_000


def test_no_clang_is_one_clear_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def missing() -> str:
        raise clang.ClangUnavailable("no clang for the BPF target on PATH")

    monkeypatch.setattr(clang, "find_clang", missing)
    monkeypatch.setenv("BPFLAB_CACHE_DIR", str(tmp_path / "cache"))
    reject.bytecode_functions.cache_clear()
    try:
        with pytest.raises(reject.RejectUnavailable) as raised:
            reject.bytecode_functions()
    finally:
        reject.bytecode_functions.cache_clear()
    assert str(raised.value) == (
        "REJECT's answers cannot be built: no clang for the BPF target on PATH"
    )
