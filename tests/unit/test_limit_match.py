"""`-m limit` in the rule layer: what iptables-legacy 1.8.9 takes and refuses (tried in a
namespace, HZ 250), how it saves, lists and encodes it, and xt_limit's arithmetic. The registry
tests (test_extensions.py) take its examples through every layer; tests/net/test_ipt_blob.py
holds them to iptables-legacy itself."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, UDP

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.extensions.limit import (
    EXTENSION,
    KERNEL_HZ,
    Bucket,
    Limit,
    credit_cap,
    credits_per_jiffy,
    kernel_refusal,
    parse_rate,
    print_rate,
    refused_at,
    seconds_to_jiffies,
    user2credits,
)
from codegen.rules.ipt_blob import BlobError, decode_table, encode_table
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow

# (options as written, what iptables-legacy-save 1.8.9 printed for them)
SPELLINGS = [
    ("", "--limit 3/hour"),
    ("--limit 10/s", "--limit 10/sec"),
    ("--limit 10/se", "--limit 10/sec"),
    ("--limit 10/second", "--limit 10/sec"),
    ("--limit 10/SEC", "--limit 10/sec"),
    ("--limit 10", "--limit 10/sec"),
    ("--limit 10/m", "--limit 10/min"),
    ("--limit 10/mi", "--limit 10/min"),
    ("--limit 10/minute", "--limit 10/min"),
    ("--limit 10/h", "--limit 10/hour"),
    ("--limit 10/d", "--limit 10/day"),
    ("--limit 10/D", "--limit 10/day"),
    ("--limit 10abc/sec", "--limit 10/sec"),
    ("--limit +10/sec", "--limit 10/sec"),
    ("--limit 010/sec", "--limit 10/sec"),
    ("--limit 4294967306/s", "--limit 10/sec"),  # atoi's 32 bits
    ("--limit 10000/sec", "--limit 10000/sec"),
    ("--limit 7/min", "--limit 7/min"),
    ("--limit 2/s", "--limit 2/sec"),
    ("--limit 60/min", "--limit 1/sec"),
    ("--limit-burst 0x10", "--limit 3/hour --limit-burst 16"),
    ("--limit-burst 010", "--limit 3/hour --limit-burst 8"),
    ("--limit-burst 5", "--limit 3/hour"),
    ("--limit 10000/s --limit-burst 10000", "--limit 10000/sec --limit-burst 10000"),
    ("--limit-b=3 --limit=4/h", "--limit 4/hour --limit-burst 3"),
]


@pytest.mark.parametrize(("options", "saved"), SPELLINGS)
def test_every_spelling_iptables_takes(options: str, saved: str) -> None:
    ruleset = parse(f"*filter\n-A INPUT -m limit {options}\nCOMMIT\n", "spelling")
    assert write(ruleset).splitlines()[4] == f"-A INPUT -m limit {saved}"


# (rule, column of the error, what the error says)
REFUSED_RULES = [
    ("-A INPUT -m limit --limit 10/seconds", 27, 'bad rate "10/seconds"'),
    ("-A INPUT -m limit --limit 10/", 27, 'bad rate "10/"'),
    ("-A INPUT -m limit --limit /sec", 27, 'bad rate "/sec"'),
    ("-A INPUT -m limit --limit 0/sec", 27, 'bad rate "0/sec"'),
    ("-A INPUT -m limit --limit 0", 27, 'bad rate "0"'),
    ("-A INPUT -m limit --limit 0x10/sec", 27, 'bad rate "0x10/sec"'),
    ("-A INPUT -m limit --limit 10/sec/", 27, 'bad rate "10/sec/"'),
    ("-A INPUT -m limit --limit 10/x", 27, 'bad rate "10/x"'),
    ("-A INPUT -m limit --limit 4294967296/s", 27, 'bad rate "4294967296/s"'),
    ("-A INPUT -m limit --limit -5/sec", 27, 'Rate too fast "-5/sec"'),
    ("-A INPUT -m limit --limit 10001/sec", 27, 'Rate too fast "10001/sec"'),
    ("-A INPUT -m limit --limit 99999999999999999999/s", 27, "Rate too fast"),
    ("-A INPUT -m limit ! --limit 10/s", 21, 'option "--limit" cannot be inverted'),
    ("-A INPUT -m limit ! --limit-burst 3", 21, 'option "--limit-burst" cannot be inverted'),
    ("-A INPUT -m limit --limit 1/s --limit 2/s", 31, '"--limit" can only be used once'),
    ("-A INPUT -m limit --limit-burst 3 --limit-burst 4", 35, "can only be used once"),
    ("-A INPUT -m limit --limit-burst 10001", 33, "out of range (0-10000)"),
    ("-A INPUT -m limit --limit-burst -1", 33, "out of range (0-10000)"),
    ("-A INPUT -m limit --limit-burst abc", 33, "out of range (0-10000)"),
    ("-A INPUT -m limit --limit", 19, "requires an argument"),
    # The kernel's ERANGE (limit_mt_check), at the burst when one is given.
    ("-A INPUT -m limit --limit-burst 0", 33, "refuses --limit-burst 0"),
    ("-A INPUT -m limit --limit-burst 10000", 33, "overflows xt_limit's credits"),
    ("-A INPUT -m limit --limit 1/day", 10, "--limit 1/day --limit-burst 5 overflows"),
    ("-A INPUT -m limit --limit 5/day --limit-burst 10000", 47, "at HZ 250, 1000"),
    # Taken by a kernel at HZ 250 (this project's), refused at HZ 100 and 300.
    ("-A INPUT -m limit --limit 2/day --limit-burst 10000", 47, "at HZ 100, 300"),
]


@pytest.mark.parametrize(("rule", "column", "message"), REFUSED_RULES)
def test_what_iptables_refuses_is_refused(rule: str, column: int, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"*filter\n{rule}\nCOMMIT\n", "refused")
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"refused:2:{column}: error:"), str(caught.value)


def test_a_model_the_kernel_refuses_fails_validation() -> None:
    ruleset = parse("*filter\n-A INPUT -m limit\nCOMMIT\n")
    ruleset["INPUT"].rules[0].matches = (Limit(avg=parse_rate("1/day"), burst=5),)
    with pytest.raises(RuleError, match="overflows xt_limit's credits"):
        encode_table(ruleset)


def test_list_and_payload_are_what_iptables_legacy_shows() -> None:
    assert EXTENSION.describe(Limit(1000, 5)) == " limit: avg 10/sec burst 5"
    assert EXTENSION.describe(Limit()) == " limit: avg 3/hour burst 5"
    assert EXTENSION.describe(Limit(parse_rate("7/min"), 10)) == " limit: avg 7/min burst 10"
    # What iptables-legacy-restore sent for `--limit 10/sec --limit-burst 7` (strace), and
    # what IPT_SO_GET_ENTRIES gave back: avg, burst, zeros.
    assert bytes(EXTENSION.encode(Limit(1000, 7))).hex() == "e803000007000000" + "00" * 32
    assert ctypes.sizeof(EXTENSION.data) == 40


def test_what_the_kernel_keeps_past_burst_is_not_read() -> None:
    # A kernel without the match's usersize (before 4.11) showed its credits and pointer.
    data = EXTENSION.data(avg=1000, burst=7, prev=123, credit=9, credit_cap=22400, cost=3200)
    assert EXTENSION.decode(data) == Limit(1000, 7)
    with pytest.raises(BlobError, match="a period of 0"):
        EXTENSION.decode(EXTENSION.data(avg=0, burst=5))


def test_blob_round_trip() -> None:
    rule = "-A INPUT -m limit --limit 25/sec --limit-burst 50 -j RETURN"
    ruleset = parse(f"*filter\n{rule}\nCOMMIT\n")
    assert decode_table(encode_table(ruleset)) == ruleset


@pytest.mark.parametrize(
    ("avg", "printed"),
    [
        (1000, "10/sec"),
        (10000, "1/sec"),
        (1, "10000/sec"),
        (200000, "3/min"),
        (12000000, "3/hour"),
        (864000000, "1/day"),
        (600000 // 7, "7/min"),
        (36000000 // 10001, "10002/hour"),  # print_rate's rounding, as iptables prints it
        (0, "inf"),
    ],
)
def test_print_rate(avg: int, printed: str) -> None:
    assert print_rate(avg) == printed


def test_as_saved_is_what_reads_back() -> None:
    match = Limit(36000000 // 10001, 5)
    again = parse(f"*filter\n-A INPUT {' '.join(EXTENSION.save(match))}\nCOMMIT\n")
    assert again["INPUT"].rules[0].matches == (EXTENSION.as_saved(match),)


# ---------------------------------------------------------------------------------------------
# xt_limit's arithmetic


def test_credits_per_jiffy() -> None:
    found = {hz: credits_per_jiffy(hz) for hz in KERNEL_HZ}
    assert found == {100: 256, 250: 128, 300: 128, 1000: 32}


def test_user2credits_both_branches() -> None:
    # 3/min at HZ 250 (stateful.md): cost 640000, cap 3200000.
    assert user2credits(200000, 250) == 640000
    assert credit_cap(Limit(200000, 5), 250) == 3200000
    # Past 0xFFFFFFFF / (HZ * CPJ) (134217 at HZ 250) it divides first, losing the remainder.
    assert user2credits(134217, 250) == 134217 * 32000 // 10000
    assert user2credits(134218, 250) == 13 * 32000
    assert user2credits(12000000, 250) == 1200 * 32000


def test_refusal_depends_on_hz() -> None:
    match = Limit(parse_rate("2/day"), 10000)
    assert {hz: refused_at(match, hz) for hz in KERNEL_HZ} == {
        100: True,
        250: False,
        300: True,
        1000: False,
    }
    assert kernel_refusal(Limit(1000, 5)) is None


def test_seconds_to_jiffies() -> None:
    assert seconds_to_jiffies(0.35, 250) == 87
    assert seconds_to_jiffies(2, 250) == 500
    assert seconds_to_jiffies(0.0039, 250) == 0
    assert seconds_to_jiffies(0.004, 250) == 1
    assert seconds_to_jiffies(1700000000.123456, 1000) == 1700000000123


def _passed(bucket: Bucket, count: int, now: int, hz: int) -> int:
    return sum(bucket.take(now, hz) for _ in range(count))


@pytest.mark.parametrize("hz", KERNEL_HZ)
def test_ten_per_second_burst_five(hz: int) -> None:
    """stateful.md §6, verified against the kernel: 20 back-to-back, 5 pass; 0.35 s later, 3
    more; after 2 s more, 5 again."""
    bucket = Bucket.full(Limit(1000, 5), hz, 0)
    assert _passed(bucket, 20, 0, hz) == 5
    assert _passed(bucket, 20, seconds_to_jiffies(0.35, hz), hz) == 3
    assert _passed(bucket, 20, seconds_to_jiffies(2.35, hz), hz) == 5


def test_three_per_minute() -> None:
    """One packet per 20 s (5000 jiffies at HZ 250) once the burst of 5 is spent."""
    bucket = Bucket.full(Limit(parse_rate("3/min"), 5), 250, 0)
    assert _passed(bucket, 10, 0, 250) == 5
    assert _passed(bucket, 3, 4999, 250) == 0
    assert _passed(bucket, 3, 5000, 250) == 1
    assert _passed(bucket, 3, 5000 + 3 * 5000, 250) == 3


def test_twenty_five_per_second_burst_fifty() -> None:
    bucket = Bucket.full(Limit(parse_rate("25/sec"), 50), 250, 0)
    assert _passed(bucket, 100, 0, 250) == 50
    assert _passed(bucket, 100, 250, 250) == 25  # one second: 25 more
    assert _passed(bucket, 100, 250 + 10 * 250, 250) == 50  # refilled to the cap, no more


def test_a_rate_in_the_dividing_branch() -> None:
    """3/hour: avg 12000000 is past user2credits' 134217, so cost is (avg / 10000) * 32000."""
    match = Limit()
    bucket = Bucket.full(match, 250, 0)
    assert (bucket.cost, bucket.cap) == (38400000, 192000000)
    assert _passed(bucket, 10, 0, 250) == 5
    per_packet = 38400000 // 128  # 300000 jiffies: 20 minutes
    assert _passed(bucket, 2, per_packet - 1, 250) == 0
    assert _passed(bucket, 2, per_packet, 250) == 1


def test_the_u32_credit_wraps_after_a_long_idle() -> None:
    """As the kernel's: 2^32 / 128 jiffies (1.55 days at HZ 250) idle add nothing, and a
    little more can wrap a full credit to almost none."""
    bucket = Bucket.full(Limit(1000, 5), 250, 0)
    assert _passed(bucket, 5, 0, 250) == 5
    assert _passed(bucket, 1, 2**25, 250) == 0  # 2^25 * 128 = 2^32: nothing added
    full = Bucket.full(Limit(1000, 5), 250, 0)
    # 16000 credits + (2^32 - 10000) wraps to 6000: one packet where a fresh bucket has five.
    assert _passed(full, 5, (2**32 - 10000) // 128 + 1, 250) == 1


# ---------------------------------------------------------------------------------------------
# The reference evaluator: buckets kept between packets


def _udp(number: int = 0) -> bytes:
    return bytes(IP(src="198.18.0.5", dst="198.18.1.1", id=number) / UDP(dport=53) / b"q")


def _flow(rules: str, times: list[float], hz: int = 250) -> list[str]:
    ruleset = parse(f"*filter\n:INPUT DROP [0:0]\n{rules}\nCOMMIT\n", "flow")
    steps = [FlowStep(_udp(i), "INPUT", "veth0", time=t) for i, t in enumerate(times)]
    results = evaluate_flow(ruleset, steps, memory=MatchMemory(hz))
    return [result.evaluation.verdict for result in results]


def test_the_verified_burst_through_the_evaluator() -> None:
    times = [0.0] * 20 + [0.35] * 20 + [2.35] * 20
    verdicts = _flow("-A INPUT -m limit --limit 10/sec -j ACCEPT", times)
    accepted = [verdicts[i : i + 20].count("ACCEPT") for i in (0, 20, 40)]
    assert accepted == [5, 3, 5]


def test_each_limit_match_has_its_own_bucket() -> None:
    # Two rules of the same text, and two limit matches in one rule: four buckets.
    rules = (
        "-A INPUT -p udp -m limit --limit 1/hour --limit-burst 2 -j LOG\n"
        "-A INPUT -p udp -m limit --limit 1/hour --limit-burst 2"
        " -m limit --limit 1/hour --limit-burst 1 -j ACCEPT\n"
        "-A INPUT -p udp -m limit --limit 1/hour --limit-burst 3 -j ACCEPT"
    )
    ruleset = parse(f"*filter\n:INPUT DROP [0:0]\n{rules}\nCOMMIT\n", "flow")
    memory = MatchMemory(250)
    steps = [FlowStep(_udp(i), "INPUT", "veth0", time=1.0) for i in range(6)]
    results = [r.evaluation for r in evaluate_flow(ruleset, steps, memory=memory)]
    assert [r.deciding for r in results] == [
        ("INPUT", 2),  # rule 2's two buckets both have credit
        ("INPUT", 3),  # rule 2's second bucket (burst 1) is empty; its first gave one
        ("INPUT", 3),
        ("INPUT", 3),  # rule 3's bucket of 3: the fourth goes to the policy
        ("INPUT", "policy"),
        ("INPUT", "policy"),
    ]
    # Rule 1 (a LOG, which continues) took two; rule 2's first match saw all six packets
    # until its bucket of 2 ran dry, its second only the packets the first let through.
    assert sorted(memory.memories) == [
        ("INPUT", 1, 1),
        ("INPUT", 2, 1),
        ("INPUT", 2, 2),
        ("INPUT", 3, 1),
    ]
    assert [r.counters.get(("INPUT", 1), (0, 0))[0] for r in results] == [1, 1, 0, 0, 0, 0]


def test_a_single_evaluation_is_the_first_packet_after_a_load() -> None:
    ruleset = parse(
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -m limit --limit 1/hour --limit-burst 1 -j ACCEPT\n"
        "COMMIT\n"
    )
    for _ in range(3):
        assert evaluate(ruleset, _udp(), "INPUT", "veth0", None).verdict == "ACCEPT"


def test_one_traversal_meeting_a_match_twice_takes_twice() -> None:
    ruleset = parse(
        "*filter\n:INPUT DROP [0:0]\n:once - [0:0]\n-A INPUT -j once\n-A INPUT -j once\n"
        "-A once -m limit --limit 1/hour --limit-burst 1 -j LOG\nCOMMIT\n"
    )
    result = evaluate(ruleset, _udp(), "INPUT", "veth0", None, memory=MatchMemory(250))
    assert result.counters[("once", 1)][0] == 1  # the second visit found the bucket empty


def test_a_bucket_loaded_long_before_its_first_packet_wraps_as_the_kernels() -> None:
    ruleset = parse(
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -m limit --limit 10/sec -j ACCEPT\nCOMMIT\n"
    )
    later = ((2**32 - 10000) // 128 + 1) / 250  # seconds after the load: see the Bucket test
    steps = [FlowStep(_udp(i), "INPUT", "veth0", time=later) for i in range(5)]
    loaded = evaluate_flow(ruleset, steps, memory=MatchMemory(250, loaded_at=0.0))
    assert [r.evaluation.verdict for r in loaded].count("ACCEPT") == 1
    stamped = evaluate_flow(ruleset, steps, memory=MatchMemory(250))
    assert [r.evaluation.verdict for r in stamped].count("ACCEPT") == 5
