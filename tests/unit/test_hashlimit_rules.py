"""`-m hashlimit` in the rule layer: what iptables-legacy 1.8.9 saves and lists for what it takes
(each expectation below was printed by it in a namespace), what it and the kernel refuse, the
revision 3 blob, and xt_hashlimit's arithmetic in the reference with a clock: a bucket per key,
names shared, expiry, htable-max."""

from __future__ import annotations

import ctypes

import pytest

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.extensions import hashlimit_bytes
from codegen.rules.extensions.hashlimit import EXTENSION
from codegen.rules.extensions.hashlimit_bytes import bytes_to_cost, cost_to_bytes
from codegen.rules.extensions.hashlimit_table import (
    BYTES,
    INVERT,
    RATE_MATCH,
    Hashlimit,
    cost,
    credit_cap,
    credits_per_jiffy,
    msecs_to_jiffies,
    table_max,
    table_size,
)
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow
from codegen.rules.validation import validate

HEAD = "*filter\n"


def _rule(options: str) -> str:
    return f"{HEAD}-A INPUT {options}\nCOMMIT\n"


def _saved(options: str) -> str:
    return write(parse(_rule(options), "t.rules")).splitlines()[4].removeprefix("-A INPUT ")


def _match(options: str) -> Hashlimit:
    (match,) = parse(_rule(options), "t.rules")["INPUT"].rules[0].matches
    assert isinstance(match, Hashlimit)
    return match


H = "-m hashlimit "
SAVED = [
    (
        "--hashlimit-upto 5/s --hashlimit-mode srcip --hashlimit-srcmask 32"
        " --hashlimit-name icmp-echo-drop",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-mode srcip"
        " --hashlimit-name icmp-echo-drop",
    ),
    (
        "--hashlimit-above 3/min --hashlimit-name a --hashlimit-mode dstport,srcip,dstip"
        " --hashlimit-srcmask 24 --hashlimit-dstmask 0",
        "--hashlimit-above 3/min --hashlimit-burst 5 --hashlimit-mode srcip,dstip,dstport"
        " --hashlimit-name a --hashlimit-srcmask 24 --hashlimit-dstmask 0",
    ),
    (
        "--hashlimit-upto 3/hour --hashlimit-name b --hashlimit-htable-size 100"
        " --hashlimit-htable-max 10 --hashlimit-htable-expire 5000"
        " --hashlimit-htable-gcinterval 200",
        "--hashlimit-upto 3/hour --hashlimit-burst 5 --hashlimit-name b"
        " --hashlimit-htable-size 100 --hashlimit-htable-max 10"
        " --hashlimit-htable-gcinterval 200 --hashlimit-htable-expire 5000",
    ),
    (
        "! --hashlimit-upto 3/hour --hashlimit-name c",
        "--hashlimit-above 3/hour --hashlimit-burst 5 --hashlimit-name c",
    ),
    (
        "! --hashlimit-above 3/hour --hashlimit-name c",
        "--hashlimit-upto 3/hour --hashlimit-burst 5 --hashlimit-name c",
    ),
    (
        "--hashlimit 7/d --hashlimit-name f",
        "--hashlimit-upto 7/day --hashlimit-burst 5 --hashlimit-name f",
    ),
    (
        "--hashlimit-upto 60/min --hashlimit-name a",
        "--hashlimit-upto 1/sec --hashlimit-burst 5 --hashlimit-name a"
        " --hashlimit-htable-expire 60000",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-burst 5k --hashlimit-name a",
        "--hashlimit-upto 5/sec --hashlimit-burst 5120 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-burst 5x --hashlimit-name a",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-burst 0x10 --hashlimit-name a",
        "--hashlimit-upto 5/sec --hashlimit-burst 16 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5abc/s --hashlimit-name a",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-name a --hashlimit-mode srcip|dstport",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-mode srcip,dstport"
        " --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-name a --hashlimit-mode srcip,srcip",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-mode srcip --hashlimit-name a",
    ),
    (
        '--hashlimit-upto 5/s --hashlimit-name a --hashlimit-mode ""',
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-name a --hashlimit-htable-size 0"
        " --hashlimit-htable-max 0",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-name a --hashlimit-srcmask 0x10",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name a --hashlimit-srcmask 16",
    ),
    (
        "--hashlimit-upto 1000000/s --hashlimit-name a",
        "--hashlimit-upto 1000000/sec --hashlimit-burst 5 --hashlimit-name a",
    ),
    (
        "--hashlimit-upto 7/day --hashlimit-burst 1000000 --hashlimit-name e",
        "--hashlimit-upto 7/day --hashlimit-burst 1000000 --hashlimit-name e",
    ),
    # Rate matching: a packet rate's period per its unit's second, the interval that unit.
    (
        "--hashlimit-upto 3/min --hashlimit-name r --hashlimit-rate-match",
        "--hashlimit-upto 3/sec --hashlimit-burst 5 --hashlimit-name r --hashlimit-htable-expire"
        " 60000 --hashlimit-rate-match --hashlimit-rate-interval 60",
    ),
    (
        "--hashlimit-upto 40/sec --hashlimit-name r --hashlimit-rate-interval 10",
        "--hashlimit-upto 40/sec --hashlimit-burst 5 --hashlimit-name r",
    ),
    (
        "--hashlimit-upto 40mb/s --hashlimit-name r --hashlimit-rate-match"
        " --hashlimit-rate-interval 3 --hashlimit-burst 100mb",
        "--hashlimit-upto 40mb/s --hashlimit-burst 120mb --hashlimit-name r"
        " --hashlimit-rate-match --hashlimit-rate-interval 3",
    ),
    (
        "--hashlimit-above 5/sec --hashlimit-name r --hashlimit-rate-match"
        " --hashlimit-rate-interval 10abc --hashlimit-mode srcip,dstport --hashlimit-srcmask 24",
        "--hashlimit-above 5/sec --hashlimit-burst 5 --hashlimit-mode srcip,dstport"
        " --hashlimit-name r --hashlimit-srcmask 24 --hashlimit-rate-match"
        " --hashlimit-rate-interval 10",
    ),
    (  # atoi: the long's low 32 bits, 1
        "--hashlimit-upto 5/sec --hashlimit-name r --hashlimit-rate-match"
        " --hashlimit-rate-interval 4294967297",
        "--hashlimit-upto 5/sec --hashlimit-burst 5 --hashlimit-name r --hashlimit-rate-match",
    ),
]


@pytest.mark.parametrize(("given", "saved"), SAVED, ids=[given for given, _ in SAVED])
def test_saved_as_iptables_legacy_saves_it(given: str, saved: str) -> None:
    assert _saved(H + given) == H + saved
    assert _saved(H + saved) == H + saved  # and reads back unchanged


LISTED = [
    (
        "--hashlimit-upto 5/s --hashlimit-mode srcip --hashlimit-name x",
        " limit: up to 5/sec burst 5 mode srcip",
    ),
    (
        "--hashlimit-above 3/min --hashlimit-name a --hashlimit-mode dstport,srcip,dstip"
        " --hashlimit-srcmask 24 --hashlimit-dstmask 0",
        " limit: above 3/min burst 5 mode srcip-dstip-dstport srcmask 24 dstmask 0",
    ),
    (
        "--hashlimit-upto 3/hour --hashlimit-name b --hashlimit-htable-size 100"
        " --hashlimit-htable-max 10 --hashlimit-htable-expire 5000"
        " --hashlimit-htable-gcinterval 200",
        " limit: up to 3/hour burst 5 htable-size 100 htable-max 10 htable-gcinterval 200"
        " htable-expire 5000",
    ),
    (
        "--hashlimit-upto 7/day --hashlimit-burst 1000000 --hashlimit-name e",
        " limit: up to 7/day burst 1000000",
    ),
    # -L prints the period times the interval, rate matching or not.
    (
        "--hashlimit-upto 3/min --hashlimit-name r --hashlimit-rate-match",
        " limit: up to 4320/day burst 5 htable-expire 60000 rate-match rate-interval 60",
    ),
    (
        "--hashlimit-upto 40/sec --hashlimit-name r --hashlimit-rate-interval 10",
        " limit: up to 4/sec burst 5",
    ),
    (
        "--hashlimit-upto 40mb/s --hashlimit-name r --hashlimit-rate-match"
        " --hashlimit-rate-interval 3 --hashlimit-burst 100mb",
        " limit: up to 40mb/s burst 120mb rate-match rate-interval 3",
    ),
    (
        "--hashlimit-above 5/sec --hashlimit-name r --hashlimit-rate-match"
        " --hashlimit-rate-interval 10 --hashlimit-mode srcip,dstport --hashlimit-srcmask 24",
        " limit: above 30/min burst 5 mode srcip-dstport htable-expire 1000 srcmask 24"
        " rate-match rate-interval 10",
    ),
]


@pytest.mark.parametrize(("given", "listed"), LISTED, ids=[given for given, _ in LISTED])
def test_listed_as_iptables_legacy_lists_it(given: str, listed: str) -> None:
    assert EXTENSION.describe(_match(H + given)) == listed


# (options, what the error's column points at, a piece of its message)
REFUSED = [
    ("--hashlimit-name a", "-m hashlimit", "You have to specify --hashlimit"),
    ("--hashlimit-upto 5/s", "-m hashlimit", 'option "--hashlimit-name" must be specified'),
    (
        "--hashlimit-upto 5/s --hashlimit-above 3/s --hashlimit-name a",
        "--hashlimit-above",
        "cannot be used together",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-upto 6/s --hashlimit-name a",
        "--hashlimit-upto 6",
        "can only be used once",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-name a --hashlimit-name b",
        "--hashlimit-name b",
        "can only be used once",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-burst 0 --hashlimit-name a",
        "0 ",
        "out of range (1-1000000)",
    ),
    (
        "--hashlimit-upto 5/s --hashlimit-burst 1000001 --hashlimit-name a",
        "1000001",
        "out of range",
    ),
    ("--hashlimit-upto 5/s --hashlimit-burst 1m --hashlimit-name a", "1m", "out of range"),
    ("--hashlimit-upto 0/s --hashlimit-name a", "0/s", 'Bad value for "--hashlimit-upto"'),
    ("--hashlimit-above 5/sx --hashlimit-name a", "5/sx", 'Bad value for "--hashlimit-above"'),
    ("--hashlimit-upto 1000001/s --hashlimit-name a", "1000001/s", "Rate too fast"),
    (
        "--hashlimit-upto 512kb/s --hashlimit-burst 100 --hashlimit-name a",
        "100",
        "burst cannot be smaller than 524288b",
    ),
    (
        "--hashlimit-upto 1kb/s --hashlimit-burst 2000000 --hashlimit-name a",
        "2000000",
        "out of range (1-1000000)",
    ),
    ("--hashlimit-upto 15b/s --hashlimit-name a", "15b/s", "below 16 bytes a second"),
    ("--hashlimit-upto 0kb/s --hashlimit-name a", "0kb/s", 'Bad value for "--hashlimit-upto"'),
    *(
        (
            f"--hashlimit-upto 1/s --hashlimit-name a --hashlimit-rate-interval {interval}",
            interval,
            'Bad value for "--hashlimit-rate-interval" option',
        )
        for interval in ("0", "0x10", "4294967295", "-3", "x")
    ),
    (
        "--hashlimit-upto 1/s --hashlimit-name a --hashlimit-rate-match --hashlimit-rate-match",
        "--hashlimit-rate-match",
        "can only be used once",
    ),
    (
        "--hashlimit-upto 1000001/day --hashlimit-name a --hashlimit-rate-match",
        "1000001/day",
        "Numerical result out of range",
    ),
    (
        "--hashlimit-upto 1/s --hashlimit-name a --hashlimit-mode srcip,bogus",
        "srcip,bogus",
        'Bad value for "--hashlimit-mode"',
    ),
    (
        "--hashlimit-upto 1/s --hashlimit-name a ! --hashlimit-mode srcip",
        "--hashlimit-mode",
        "cannot be inverted",
    ),
    ("--hashlimit-upto 1/s --hashlimit-name a --hashlimit-srcmask 33", "33", "Invalid argument"),
    (
        "--hashlimit-upto 1/s --hashlimit-name a --hashlimit-htable-expire 0",
        "0",
        "Invalid argument",
    ),
    (
        "--hashlimit-upto 1/s --hashlimit-name a --hashlimit-htable-gcinterval 0",
        "0",
        "Invalid argument",
    ),
    (
        "--hashlimit-upto 1/s --hashlimit-name a --hashlimit-htable-size 4294967296",
        "4294967296",
        "(0-4294967295)",
    ),
    ("--hashlimit-upto 1/s --hashlimit-name a/b", "a/b", "Invalid argument"),
    ("--hashlimit-upto 1/s --hashlimit-name ..", "..", "Invalid argument"),
    ("--hashlimit-upto 1/s --hashlimit-name " + "n" * 255, "nnn", "longer than 254 bytes"),
    ("--hashlimit-upto 1/s --hashlimit-name 'a b'", "'a b'", "iptables-save would print bare"),
    (
        "--hashlimit-upto 1/day --hashlimit-burst 1000000 --hashlimit-name a",
        "1000000",
        "Numerical result out of range",
    ),
]


@pytest.mark.parametrize(
    ("options", "pointed", "message"), REFUSED, ids=[r[0][:70] for r in REFUSED]
)
def test_refused_at_file_line_column(options: str, pointed: str, message: str) -> None:
    line = f"-A INPUT {H}{options}"
    with pytest.raises(RuleError) as caught:
        parse(_rule(H + options), "t.rules")
    source = caught.value.source
    assert source is not None and source.line == 2
    assert line[source.column - 1 :].startswith(pointed), line[source.column - 1 :]
    assert message in caught.value.message
    assert "\n" not in caught.value.message


def test_one_name_with_two_settings_is_refused_at_the_second_rule() -> None:
    text = (
        f"{HEAD}-A INPUT {H}--hashlimit-upto 5/s --hashlimit-name a --hashlimit-mode srcip\n"
        f"-A INPUT {H}--hashlimit-above 5/s --hashlimit-name a --hashlimit-mode srcip\n"
        f"-A INPUT {H}--hashlimit-upto 5/s --hashlimit-name a --hashlimit-mode dstip\nCOMMIT\n"
    )
    with pytest.raises(RuleError) as caught:
        validate(parse(text, "t.rules"))
    assert caught.value.source is not None and caught.value.source.line == 4
    assert "--hashlimit-name a is used at line 2 with other settings" in caught.value.message


def test_the_blob_is_revision_3_and_reads_back() -> None:
    match = _match(
        H + "--hashlimit-above 3/min --hashlimit-burst 7 --hashlimit-mode srcip,dstport"
        " --hashlimit-name blob --hashlimit-srcmask 24 --hashlimit-htable-expire 1234"
    )
    data = EXTENSION.encode(match)
    assert (EXTENSION.revision, ctypes.sizeof(data)) == (3, 312)
    raw = bytes(data)
    assert raw[:5] == b"blob\x00"
    assert int.from_bytes(raw[256:264], "little") == 20_000_000  # avg: 1000000 * 60 / 3
    assert int.from_bytes(raw[264:272], "little") == 7
    assert int.from_bytes(raw[272:276], "little") == 4 | 2 | INVERT  # SIP | DPT | INVERT
    assert int.from_bytes(raw[284:288], "little") == 1000  # gc_interval
    assert int.from_bytes(raw[288:292], "little") == 1234
    assert raw[296:298] == bytes([24, 32])
    assert EXTENSION.decode(type(data).from_buffer_copy(raw)) == match
    windowed = _match(H + "--hashlimit-upto 3/min --hashlimit-name w --hashlimit-rate-match")
    raw = bytes(EXTENSION.encode(windowed))
    assert int.from_bytes(raw[256:264], "little") == 333_333  # 20000000 / 60 seconds
    assert int.from_bytes(raw[272:276], "little") == RATE_MATCH
    assert int.from_bytes(raw[292:296], "little") == 60  # the interval
    assert EXTENSION.decode(type(data).from_buffer_copy(raw)) == windowed


def test_a_byte_rate_is_a_cost_and_its_burst_refills() -> None:
    """libxt_hashlimit's numbers: 512kb/s is the cost UINT32_MAX / (32768 + 1), a 1mb burst
    two seconds' worth; the expire defaults to 60 s with a burst, 15 s without."""
    match = _match(H + "--hashlimit-upto 512kb/s --hashlimit-burst 1mb --hashlimit-name b")
    assert (match.bytes, match.avg, match.burst, match.expire) == (True, 131068, 2, 60000)
    assert _match(H + "--hashlimit-upto 512kb/s --hashlimit-name b").expire == 15000
    data = EXTENSION.encode(match)
    assert data.cfg.mode == BYTES and EXTENSION.decode(data) == match
    # 100b/s stands for 96b/s; a burst of 100 bytes is two seconds' worth, printed as 192b.
    slow = _match(H + "--hashlimit-upto 100b/s --hashlimit-burst 100 --hashlimit-name s")
    assert EXTENSION.save(slow)[3:6] == ["96b/s", "--hashlimit-burst", "192b"]
    assert EXTENSION.describe(slow).startswith(" limit: up to 96b/s burst 192b")
    assert (cost_to_bytes(bytes_to_cost(5000 << 20)), cost_to_bytes(1 << 31)) == (5286113568, 0)
    # xt_hashlimit at HZ 250: 2^24 credits a jiffy, a second's 4194304000; a 16-byte chunk
    # of 512kb/s costs 127995 of them.
    assert (hashlimit_bytes.credits_per_jiffy(250), hashlimit_bytes.full(250)) == (
        1 << 24,
        4194304000,
    )
    assert hashlimit_bytes.chunk_cost(131068, 250) == 131068 * 250 * (1 << 24) >> 32
    assert hashlimit_bytes.packet_cost(1500, 131068, 250) == 94 * (131068 * 250 * (1 << 24) >> 32)


def test_the_kernels_own_credits() -> None:
    """What /proc/net/ipt_hashlimit/NAME showed at HZ 250 for 1/hour burst 4, a full key:
    credit, credit_cap, cost 1979120923200000000 1979120923200000000 494780230800000000."""
    match = _match(H + "--hashlimit-upto 1/hour --hashlimit-burst 4 --hashlimit-name p")
    assert credits_per_jiffy(250) == 1 << 39
    assert (credit_cap(match, 250), cost(match, 250)) == (1979120923200000000, 494780230800000000)
    assert [credits_per_jiffy(hz) for hz in (100, 300, 1000)] == [1 << 40, 1 << 39, 1 << 37]
    assert [msecs_to_jiffies(ms, 250) for ms in (1, 4, 5, 3000)] == [1, 1, 2, 750]
    assert msecs_to_jiffies(1, 300) == 1 and msecs_to_jiffies(10, 300) == 3


def test_table_sizes_as_htable_create_makes_them() -> None:
    match = _match(H + "--hashlimit-upto 1/s --hashlimit-name s")
    assert (table_size(match, 2 << 30), table_max(match, 2 << 30)) == (8192, 65536)
    assert table_size(match, 64 << 20) == 512 and table_size(match, 1 << 20) == 16
    sized = _match(H + "--hashlimit-upto 1/s --hashlimit-name s --hashlimit-htable-size 100")
    assert table_max(sized) == 800
    capped = _match(
        H + "--hashlimit-upto 1/s --hashlimit-name s --hashlimit-htable-size 100"
        " --hashlimit-htable-max 10"
    )
    assert table_max(capped) == 100  # never fewer than size


def _udp(source: str, sport: int = 4000, dport: int = 53, size: int = 29) -> bytes:
    """A datagram of `size` bytes (IP header included)."""
    from scapy.layers.inet import IP, UDP

    payload = b"q" * (size - 28)
    return bytes(IP(src=source, dst="198.18.1.1") / UDP(sport=sport, dport=dport) / payload)


def _accepted(rules: str, packets: list[tuple[float, bytes]], hz: int = 250) -> str:
    ruleset = parse(f"{HEAD}:INPUT DROP [0:0]\n{rules}\nCOMMIT\n", "t.rules")
    steps = [FlowStep(packet, "INPUT", "eth0", time=t) for t, packet in packets]
    return "".join(
        "H" if e.evaluation.hotdrop else "A" if e.evaluation.verdict == "ACCEPT" else "d"
        for e in evaluate_flow(ruleset, steps, memory=MatchMemory(hz))
    )


A, B, C = "198.18.0.5", "198.18.0.6", "198.18.3.5"
# (name, rules, packets as (time, bytes), fates: A accepted, d dropped, H hotdropped)
SEQUENCES = [
    (
        "two sources each get their burst, then a token per 0.2 s each",
        "-A INPUT -m hashlimit --hashlimit-upto 5/s --hashlimit-mode srcip --hashlimit-name h"
        " -j ACCEPT",
        [(0.0, _udp(A)), (0.0, _udp(B))] * 7 + [(0.2, _udp(A)), (0.2, _udp(B))] * 2,
        "AA" * 5 + "dd" * 2 + "AA" + "dd",
    ),
    (
        "a /24 mask puts A and B in one bucket, C in its own",
        "-A INPUT -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 3 --hashlimit-mode"
        " srcip --hashlimit-srcmask 24 --hashlimit-name h -j ACCEPT",
        [(0.0, _udp(A)), (0.0, _udp(B)), (0.0, _udp(C))] * 3,
        "AAA" + "AdA" + "ddA",
    ),
    (
        "no mode: one bucket; above matches what is over",
        "-A INPUT -m hashlimit --hashlimit-above 1/min --hashlimit-burst 2 --hashlimit-name h"
        " -j ACCEPT",
        [(0.0, _udp(A)), (0.0, _udp(B)), (0.0, _udp(C)), (0.0, _udp(A))],
        "ddAA",
    ),
    (
        "dstport mode: a port each",
        "-A INPUT -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 1 --hashlimit-mode"
        " dstport --hashlimit-name h -j ACCEPT",
        [(0.0, _udp(A, dport=53)), (0.0, _udp(B, dport=53)), (0.0, _udp(A, dport=54))],
        "AdA",
    ),
    (
        "two rules of one name share the buckets",
        "-A INPUT -p udp --dport 53 -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 2"
        " --hashlimit-mode srcip --hashlimit-name h -j ACCEPT\n"
        "-A INPUT -p udp --dport 54 -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 2"
        " --hashlimit-mode srcip --hashlimit-name h -j ACCEPT",
        [(0.0, _udp(A, dport=53)), (0.0, _udp(A, dport=54)), (0.0, _udp(A, dport=54))],
        "AAd",
    ),
    (
        "an entry idle for htable-expire (750 jiffies) is gone: full again",
        "-A INPUT -m hashlimit --hashlimit-upto 1/min --hashlimit-burst 1 --hashlimit-mode"
        " srcip --hashlimit-name h --hashlimit-htable-expire 3000 -j ACCEPT",
        [(0.0, _udp(A)), (2.996, _udp(A)), (5.992, _udp(A)), (8.992, _udp(A))],
        "AddA",
    ),
    (
        "htable-max 16 (its size): the 17th live key is dropped on the spot",
        "-A INPUT -m hashlimit --hashlimit-upto 1/min --hashlimit-mode srcip --hashlimit-name h"
        " --hashlimit-htable-size 16 --hashlimit-htable-max 16 -j ACCEPT",
        [(0.0, _udp(f"198.18.0.{n}")) for n in range(1, 18)] + [(0.0, _udp("198.18.0.1"))],
        "A" * 16 + "HA",
    ),
    (
        "1kb/s: a second's credit holds one 1000-byte datagram (63 chunks of 16 bytes)",
        "-A INPUT -m hashlimit --hashlimit-upto 1kb/s --hashlimit-mode srcip --hashlimit-name b"
        " -j ACCEPT",
        [(0.0, _udp(A, size=1000)), (0.0, _udp(A, size=1000)), (0.0, _udp(B, size=1000))]
        + [(0.5, _udp(A, size=1000)), (1.0, _udp(A, size=1000))],
        "AdAdA",
    ),
    (
        "a burst of 2kb is two refills of a second's credit each",
        "-A INPUT -m hashlimit --hashlimit-upto 1kb/s --hashlimit-burst 2kb --hashlimit-name b"
        " -j ACCEPT",
        [(0.0, _udp(A, size=1000))] * 4 + [(1.0, _udp(A, size=1000))] * 2,
        "AAAdAd",
    ),
    (
        "small datagrams cost less: 2 chunks each, 32 of them in a second's credit",
        "-A INPUT -m hashlimit --hashlimit-upto 1kb/s --hashlimit-name b -j ACCEPT",
        [(0.0, _udp(A, size=29))] * 33,
        "A" * 32 + "d",
    ),
    (
        "above: what is over a byte rate",
        "-A INPUT -m hashlimit --hashlimit-above 1kb/s --hashlimit-name b -j ACCEPT",
        [(0.0, _udp(A, size=1000))] * 3,
        "dAA",
    ),
    (
        "rate match 2/sec burst 1: a window takes 3; the one after a busy window none",
        "-A INPUT -m hashlimit --hashlimit-upto 2/sec --hashlimit-burst 1 --hashlimit-mode srcip"
        " --hashlimit-name w --hashlimit-rate-match --hashlimit-htable-expire 60000 -j ACCEPT",
        [(0.0, _udp(A))] * 4 + [(0.0, _udp(B))] + [(1.0, _udp(A))] * 2 + [(2.0, _udp(A))],
        "AAAdA" + "dd" + "A",
    ),
    (
        "rate match 1kb/s: a second's window counts 1024 bytes",
        "-A INPUT -m hashlimit --hashlimit-upto 1kb/s --hashlimit-name w --hashlimit-rate-match"
        " -j ACCEPT",
        [(0.0, _udp(A, size=400))] * 3 + [(0.999, _udp(A, size=29))],
        "AAdd",
    ),
    (
        "rate match above 1/sec, 4-second windows: past 1 + 1, and all of the next window",
        "-A INPUT -m hashlimit --hashlimit-above 1/sec --hashlimit-burst 1 --hashlimit-name w"
        " --hashlimit-rate-match --hashlimit-rate-interval 4 --hashlimit-htable-expire 60000"
        " -j ACCEPT",
        [(0.0, _udp(A))] * 3 + [(3.9, _udp(A)), (4.0, _udp(A)), (8.0, _udp(A))],
        "ddAAAd",
    ),
]


@pytest.mark.parametrize(
    ("name", "rules", "packets", "fates"), SEQUENCES, ids=[s[0] for s in SEQUENCES]
)
def test_the_reference_counts_per_key(name: str, rules: str, packets: list, fates: str) -> None:
    assert _accepted(rules, packets) == fates


def test_a_lone_packet_is_the_first_after_a_load() -> None:
    ruleset = parse(
        _rule(H + "--hashlimit-above 1/min --hashlimit-burst 1 --hashlimit-name h -j DROP")
    )
    assert evaluate(ruleset, _udp(A), "INPUT", "eth0", None).verdict == "ACCEPT"
