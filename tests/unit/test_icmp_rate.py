"""The reference's ICMP rate limits (codegen.rules.icmp_rate) and REJECT's use of them: the
figures the kernel gave on this machine (tests/net/test_reject_attached.py checks the kernel
and our programs against each other on the wire), and the arithmetic at its edges."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP

from codegen.rules import evaluate, parse
from codegen.rules.icmp_rate import IcmpRateLimiter, IcmpSysctls
from codegen.rules.reference import MatchMemory

PEER = 0xC6120001  # 198.18.0.1


def _burst(limiter: IcmpRateLimiter, count: int, at: int, peer: int = PEER, **kw) -> int:
    return sum(limiter.allows(peer, at, **kw) for _ in range(count))


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_one_peers_bursts_get_what_the_kernel_gave(hz: int) -> None:
    limiter = IcmpRateLimiter(hz)
    assert _burst(limiter, 20, 0, local=False) == 6  # a new peer's bucket: 6 messages
    assert _burst(limiter, 10, hz // 5, local=False) == 0
    assert _burst(limiter, 10, hz // 5 + hz, local=False) == 1  # one a second
    assert _burst(limiter, 10, hz // 5 + 4 * hz, local=False) == 3
    assert _burst(limiter, 10, 100 * hz, local=False) == 6  # never more than 6 saved up


def test_answers_to_our_own_socket_have_no_peer_bucket() -> None:
    limiter = IcmpRateLimiter(250)
    assert _burst(limiter, 30, 0, local=True) == 30


def test_the_global_bucket_holds_the_burst_and_refills_per_50th_of_a_second() -> None:
    limiter = IcmpRateLimiter(1000)
    sent = [limiter.allows(PEER + n, 0, local=False) for n in range(80)]
    assert sum(sent) == 50 and sent[:50] == [True] * 50
    assert not limiter.allows(PEER + 100, 19, local=False)  # under HZ / 50 since the refill
    assert _burst(limiter, 1, 20, peer=PEER + 101, local=False) == 1  # 20 credits came
    assert sum(limiter.allows(PEER + 200 + n, 20, local=False) for n in range(30)) == 19
    # The kernel's stamp is a u32 of jiffies: a refill across its wrap counts the same.
    wrapping = IcmpRateLimiter(1000, credit=0, stamp=0xFFFF_FFF0)
    assert wrapping.allows(PEER, (1 << 32) + 10, local=False)  # 26 jiffies: 26 credits
    assert wrapping.credit == 26 - 1


def test_the_sysctls_change_the_limits() -> None:
    unlimited = IcmpRateLimiter(250, IcmpSysctls(ratelimit_ms=0))
    assert _burst(unlimited, 40, 0, local=False) == 40
    unmasked = IcmpRateLimiter(250, IcmpSysctls(ratemask=0x1810))  # type 3 left out
    assert _burst(unmasked, 200, 0, local=False) == 200
    small = IcmpRateLimiter(250, IcmpSysctls(msgs_burst=4))
    assert _burst(small, 20, 0, peer=PEER, local=True) == 4
    assert IcmpSysctls(ratelimit_ms=1000).ratelimit_jiffies(300) == 300
    assert IcmpSysctls(ratelimit_ms=1).ratelimit_jiffies(250) == 1  # rounded up, as the kernel


RULES = """*filter
-A INPUT -p udp -j REJECT
-A INPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -p udp -j REJECT --reject-with icmp-admin-prohibited
COMMIT
"""


def test_reject_answers_as_the_limits_allow() -> None:
    ruleset = parse(RULES)
    memory = MatchMemory(250)
    udp = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=1, dport=2))
    got = [evaluate(ruleset, udp, "INPUT", "eth0", None, memory=memory, time=0.5) for _ in range(9)]
    assert [result.verdict for result in got] == ["DROP"] * 9
    assert [result.reply for result in got] == ["icmp-port-unreachable"] * 6 + [None] * 3
    later = evaluate(ruleset, udp, "INPUT", "eth0", None, memory=memory, time=1.5)
    assert later.reply == "icmp-port-unreachable"
    # A RST has no limit; OUTPUT's errors go to our own socket, past the peer's bucket.
    tcp = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=1, dport=2, flags="S"))
    resets = {evaluate(ruleset, tcp, "INPUT", "eth0", None, memory=memory).reply for _ in range(9)}
    assert resets == {"tcp-reset"}
    out = bytes(IP(src="198.18.0.2", dst="198.18.0.1") / UDP(sport=1, dport=2))
    own = {evaluate(ruleset, out, "OUTPUT", None, "eth0", memory=memory).reply for _ in range(9)}
    assert own == {"icmp-admin-prohibited"}
    # Without a memory each packet is the first after a load: always answered.
    assert all(
        evaluate(ruleset, udp, "INPUT", "eth0", None).reply == "icmp-port-unreachable"
        for _ in range(9)
    )
