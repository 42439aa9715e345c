"""`-m recent` in the rule layer: what iptables-legacy 1.8.9 takes, prints and refuses (each
row tried in a namespace), its blob, and recent_mt's meaning in the reference evaluator with a
clock (evaluate_flow), the kernel's table eviction and reaping included."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import IP, UDP

from codegen.rules import RuleError, parse, write
from codegen.rules.extensions.recent import EXTENSION, Recent, XtRecentMtinfoV1, table_settings
from codegen.rules.reference import FlowStep, MatchMemory, evaluate_flow

HZ = 250


def _rule(options: str) -> str:
    return f"*filter\n-A INPUT {options}\nCOMMIT\n"


def _saved(options: str) -> str:
    text = write(parse(_rule(options), "recent.rules"))
    (line,) = [line for line in text.splitlines() if line.startswith("-A INPUT")]
    return line.removeprefix("-A INPUT ")


D = "--name DEFAULT --mask 255.255.255.255 --rsource"
SAVED = [
    ("-m recent --set", f"-m recent --set {D}"),
    ("-m recent --rcheck --hitcount 255", f"-m recent --rcheck --hitcount 255 {D}"),
    ("-m recent --rcheck --hitcount 65535", f"-m recent --rcheck --hitcount 65535 {D}"),
    ("-m recent --rcheck --hitcount 0", f"-m recent --rcheck {D}"),
    (
        "-m recent ! --rcheck --seconds 60 --hitcount 4 --name SSH --rdest --mask 255.255.0.0",
        "-m recent ! --rcheck --seconds 60 --hitcount 4 --name SSH --mask 255.255.0.0 --rdest",
    ),
    (
        "-m recent --update --seconds 10 --reap --rttl",
        f"-m recent --update --seconds 10 --reap --rttl {D}",
    ),
    ("-m recent --rcheck --seconds 4294967295", f"-m recent --rcheck --seconds -1 {D}"),
    ("-m recent --rcheck --seconds 0x10", f"-m recent --rcheck --seconds 16 {D}"),
    (
        "-m recent --rsource --rdest --set",
        "-m recent --set --name DEFAULT --mask 255.255.255.255 --rdest",
    ),
    (
        "-m recent --rcheck --name %CURRENTTIME --mask 1.2.3.4",
        "-m recent --rcheck --name %CURRENTTIME --mask 1.2.3.4 --rsource",
    ),
    (
        "-m recent --remove --name x --mask 0.0.0.0",
        "-m recent --remove --name x --mask 0.0.0.0 --rsource",
    ),
]


@pytest.mark.parametrize(("given", "saved"), SAVED, ids=[g for g, _ in SAVED])
def test_saves_as_iptables_legacy(given: str, saved: str) -> None:
    assert _saved(given) == saved
    assert _saved(saved if "-1" not in saved else given) == saved


DESCRIBED = [
    ("-m recent --set", " recent: SET name: DEFAULT side: source mask: 255.255.255.255"),
    (
        "-m recent ! --rcheck --seconds 60 --hitcount 4 --name SSH --rdest --mask 255.255.0.0",
        " ! recent: CHECK seconds: 60 hit_count: 4 name: SSH side: dest mask: 255.255.0.0",
    ),
    (
        "-m recent --update --seconds 10 --reap --rttl",
        " recent: UPDATE seconds: 10 reap TTL-Match name: DEFAULT side: source"
        " mask: 255.255.255.255",
    ),
    (
        "-m recent --rcheck --seconds 2147483648 --hitcount 3",
        " recent: CHECK seconds: -2147483648 hit_count: 3 name: DEFAULT side: source"
        " mask: 255.255.255.255",
    ),
]


@pytest.mark.parametrize(("given", "listed"), DESCRIBED, ids=[g for g, _ in DESCRIBED])
def test_lists_as_iptables_legacy(given: str, listed: str) -> None:
    (match,) = parse(_rule(given), "recent.rules")["INPUT"].rules[0].matches
    assert EXTENSION.describe(match) == listed


# (options, the error's start, its column)
REFUSED = [
    (
        "-m recent",
        "recent: you must specify one of `--set', `--rcheck' `--update' or `--remove'",
        10,
    ),
    (
        "-m recent --set --update",
        'recent: option "--set" cannot be used together with "--update"',
        20,
    ),
    (
        "-m recent --update --set",
        'recent: option "--set" cannot be used together with "--update"',
        29,
    ),
    ("-m recent --set --rttl", 'recent: option "--rttl" cannot be used together with "--set"', 26),
    ("-m recent --set --set", 'recent: option "--set" can only be used once', 26),
    (
        "-m recent --rcheck --seconds 1 --seconds 2",
        'recent: option "--seconds" can only be used once',
        41,
    ),
    ("-m recent --set --name a --name b", 'recent: option "--name" can only be used once', 35),
    (
        "-m recent --update --seconds 0",
        'recent: bad value for option "--seconds", or out of range (1-4294967295)',
        39,
    ),
    ("-m recent --update --seconds -1", 'recent: bad value for option "--seconds"', 39),
    (
        "-m recent --update --hitcount -1",
        'recent: bad value for option "--hitcount", or out of range (0-4294967295)',
        40,
    ),
    ("-m recent --update --reap", 'recent: option "--reap" also requires "--seconds"', 29),
    ("-m recent --rcheck ! --rttl", 'recent: option "--rttl" cannot be inverted', 31),
    (
        "-m recent --rcheck --mask 255.255.255.0/24",
        "recent: '--mask 255.255.255.0/24' is not an IPv4",
        36,
    ),
    (
        "-m recent --set --seconds 5",
        "recent: the kernel refuses --seconds, --hitcount, --rttl and --reap with --set",
        26,
    ),
    (
        "-m recent --set --hitcount 2",
        "recent: the kernel refuses --seconds, --hitcount, --rttl and --reap with --set",
        26,
    ),
    (
        "-m recent --remove --reap --seconds 3",
        "recent: the kernel refuses --seconds, --hitcount, --rttl and --reap with --remove",
        36,
    ),
    (
        "-m recent --rcheck --hitcount 65536",
        "recent: --hitcount 65536 is above the kernel's maximum of 65535",
        29,
    ),
    ("-m recent --rcheck --name a/b", "recent: the kernel refuses the table name 'a/b'", 29),
    ("-m recent --rcheck --name ..", "recent: the kernel refuses the table name '..'", 29),
    ("-m recent --rcheck --name " + "b" * 200, "recent: --name is at most 199 bytes", 29),
]


@pytest.mark.parametrize(("options", "error", "column"), REFUSED, ids=[r[0][:60] for r in REFUSED])
def test_refuses_what_iptables_or_the_kernel_refuses(options: str, error: str, column: int) -> None:
    with pytest.raises(RuleError) as raised:
        parse(_rule(options), "recent.rules")
    first, rule = str(raised.value).split("\n")
    assert first.startswith(f"recent.rules:2:{column}: error: {error}"), first
    assert rule == f"-A INPUT {options}"


def test_the_blob_is_xt_recent_mtinfo_v1() -> None:
    match = Recent("update", "SSH", 60, 4, True, False, True, 0xFFFF0000, True)
    data = EXTENSION.encode(match)
    raw = bytes(data)
    assert ctypes.sizeof(XtRecentMtinfoV1) == len(raw) == 228
    assert raw[0:4] == (60).to_bytes(4, "little") and raw[4:8] == (4).to_bytes(4, "little")
    assert raw[8] == 4 | 16 and raw[9] == 1  # XT_RECENT_UPDATE | XT_RECENT_TTL, invert
    assert raw[10:14] == b"SSH\0" and raw[210] == 1  # name, side XT_RECENT_DEST
    # What iptables-legacy leaves after the name: the rest of the DEFAULT it wrote first
    # (tests/net/test_ipt_blob.py compares the kernel's bytes).
    assert raw[14:18] == b"ULT\0" and raw[18:210] == bytes(192)
    assert raw[212:216] == bytes([255, 255, 0, 0]) and raw[216:228] == bytes(12)
    assert EXTENSION.decode(XtRecentMtinfoV1.from_buffer_copy(raw)) == match
    # Without --mask, iptables leaves all 16 bytes of its default (tried: the kernel's table
    # holds them), and a table read back writes them again.
    (default,) = parse(_rule("-m recent --set"), "recent.rules")["INPUT"].rules[0].matches
    raw = bytes(EXTENSION.encode(default))
    assert raw[212:228] == b"\xff" * 16
    assert bytes(EXTENSION.encode(EXTENSION.decode(XtRecentMtinfoV1.from_buffer_copy(raw)))) == raw


def _udp(source: str = "198.18.0.5", ttl: int = 64, destination: str = "198.18.1.1") -> bytes:
    return bytes(IP(src=source, dst=destination, ttl=ttl) / UDP(dport=53))


def _table(rules: str, policy: str = "ACCEPT") -> str:
    return f"*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n{rules}\nCOMMIT\n"


def _verdicts(rules: str, packets: list[tuple[float, bytes]], chain: str = "INPUT") -> list:
    ruleset = parse(rules, "recent.rules")
    interfaces = ("eth0", "eth1") if chain == "FORWARD" else ("eth0", None)
    steps = [FlowStep(packet, chain, *interfaces, time=t) for t, packet in packets]
    results = evaluate_flow(ruleset, steps, memory=MatchMemory(HZ))
    return [r.evaluation.verdict[0] for r in results]  # "A" or "D"


GUARD = _table(
    "-A INPUT -m recent --set --name SSH\n"
    "-A INPUT -m recent --update --seconds 60 --hitcount 4 --name SSH -j DROP"
)


def test_the_ssh_guard() -> None:
    """3 pass, the 4th within 60 s is dropped; 60 s after the last drop one passes again."""
    packets = [(t, _udp()) for t in (0, 1, 2, 3, 4, 64.001, 65)]
    assert _verdicts(GUARD, packets) == list("AAADDAA")


def test_the_window_is_seconds_times_hz_and_its_edge_counts() -> None:
    """A stamp exactly --seconds old still counts (time_after is strict)."""
    rules = _table(
        "-A INPUT -m recent --rcheck --seconds 2 --name w -j DROP\n"
        "-A INPUT -m recent --set --name w"
    )
    assert _verdicts(rules, [(0, _udp()), (2, _udp()), (4.004, _udp())]) == list("ADA")


def test_a_table_holds_100_addresses_and_evicts_the_least_recently_updated() -> None:
    rules = _table(
        "-A INPUT -m recent --rcheck --name e -j DROP\n-A INPUT -m recent --set --name e"
    )
    sources = [f"198.18.{n // 200}.{n % 200 + 1}" for n in range(101)]
    packets = [(0, _udp(source)) for source in sources[:100]]
    packets += [
        (1, _udp(sources[0])),
        (2, _udp(sources[100])),
        (3, _udp(sources[1])),
        (4, _udp(sources[0])),
    ]
    # The first 100 are new (accepted, set); the first is seen again (its rcheck does not
    # move it up the LRU: only an update does); the 101st evicts the first; the second is
    # still there; the first is new again.
    assert _verdicts(rules, packets) == ["A"] * 100 + list("DADA")


def test_reap_removes_the_least_recently_updated_entry_when_stale() -> None:
    rules = _table(
        "-A INPUT -s 198.18.0.9 -m recent --rcheck --seconds 5 --reap --name r\n"
        "-A INPUT -m recent --rcheck --name r -j DROP\n"
        "-A INPUT -m recent --set --name r"
    )
    a, b, reaper = "198.18.0.1", "198.18.0.2", "198.18.0.9"
    packets = [(0, _udp(a)), (0.5, _udp(reaper)), (3, _udp(b)), (6, _udp(reaper))]
    packets += [(6.1, _udp(a)), (6.2, _udp(b))]
    # At 6 s the reaper's rcheck (of an entry it has: reaping needs one) reaps the least
    # recently updated entry, a's (stamped at 0, before 6 - 5), and a is new again at 6.1 s;
    # b is not reaped. The reaper's own entry is stale too, but not the oldest.
    assert _verdicts(rules, packets) == list("AAADAD")


def test_a_tables_ring_is_sized_by_its_largest_hitcount() -> None:
    """--hitcount 3 asks for 4 stamps, but --set (no hitcount) for 32: the table keeps 32
    (the size only shows in the listing and in a reload's flush: a match needs at most its
    own hitcount of fresh stamps, and the newest are kept)."""
    small = _table(
        "-A INPUT -m recent --rcheck --hitcount 3 --name s -j DROP\n"
        "-A INPUT -m recent --update --hitcount 1 --name s\n"
        "-A INPUT -s 198.18.0.7 -m recent --set --name s"
    )
    assert table_settings(parse(small, "x"))["s"] == (0xFFFF_FFFF, 32)
    ruleset = parse(_table("-A INPUT -m recent --rcheck --hitcount 3 --name s"), "x")
    assert table_settings(ruleset)["s"] == (0xFFFF_FFFF, 4)


def test_rttl_and_the_ttl_before_forwarding() -> None:
    """An entry set from INPUT at TTL 64 matches a FORWARD packet at 63 (64 before
    forwarding) under --rttl, and not one at 64."""
    rules = _table(
        "-A INPUT -m recent --set --name t\n-A FORWARD -m recent --rcheck --rttl --name t -j DROP"
    )
    ruleset = parse(rules, "recent.rules")
    steps = [
        FlowStep(_udp(ttl=64), "INPUT", "eth0", None, time=0),
        FlowStep(_udp(ttl=64), "FORWARD", "eth0", "eth1", time=1),
        FlowStep(_udp(ttl=63), "FORWARD", "eth0", "eth1", time=2),
    ]
    results = evaluate_flow(ruleset, steps, memory=MatchMemory(HZ))
    assert [r.evaluation.verdict for r in results] == ["ACCEPT", "ACCEPT", "DROP"]


def test_negated_update_stamps_when_the_check_fails() -> None:
    """`! --update`: the answer (after `!`) decides the update: an entry with 1 stamp of the
    2 asked for matches, and is stamped, so the next packet's check holds and it does not."""
    rules = _table(
        "-A INPUT -m recent --set --name n\n"
        "-A INPUT -m recent ! --update --hitcount 3 --name n -j DROP"
    )
    # set: 1 stamp, fewer than 3: ! matches, update: 2: DROP. set: 3, then 3 >= 3: no match,
    # no update: ACCEPT. set: 4: ACCEPT.
    assert _verdicts(rules, [(0, _udp()), (1, _udp()), (2, _udp())]) == list("DAA")


def test_the_table_mask_is_the_first_rules() -> None:
    """Two rules naming one table with different masks: the table has the first's, and the
    second looks addresses up with it (recent_mt masks by t->mask)."""
    rules = _table(
        "-A INPUT -s 198.18.0.1 -m recent --set --name m --mask 255.255.255.0\n"
        "-A INPUT -s 198.18.0.2 -m recent --rcheck --name m -j DROP"
    )
    assert _verdicts(rules, [(0, _udp("198.18.0.1")), (1, _udp("198.18.0.2"))]) == list("AD")


def test_remove_and_rdest() -> None:
    rules = _table(
        "-A INPUT -p udp -m recent --rcheck --rdest --name d -j DROP\n"
        "-A INPUT -s 198.18.0.1 -m recent --set --rdest --name d\n"
        "-A INPUT -s 198.18.0.2 -m recent --remove --rdest --name d"
    )
    there = "198.18.1.1"
    packets = [
        (0, _udp("198.18.0.1", destination=there)),
        (1, _udp("198.18.0.3", destination=there)),
    ]
    assert _verdicts(rules, packets) == list("AD")
    removed = [
        (0, _udp("198.18.0.1", destination=there)),
        (1, _udp("198.18.0.2", destination="198.18.1.2")),
    ]
    # The second's destination has no entry; a packet to `there` from .2 would be dropped
    # by the rcheck before --remove could see it.
    assert _verdicts(rules, removed) == list("AA")
