"""`-m conntrack` and `-m state` in the rule layer: what iptables-legacy 1.8.9 makes of their
spellings and payloads (every SPELLINGS and PAYLOADS row was read back from the kernel after
`iptables-legacy -A`; tests/net/test_conntrack.py holds the table to it again), what they
refuse where, and what xt_conntrack's conntrack_mt answers for a packet's connection."""

from __future__ import annotations

import re
import struct

import pytest

from codegen.rules import RuleError, Ruleset, evaluate, parse, validate, write
from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions import BY_BLOB_NAME, BY_NAME, extension_of
from codegen.rules.extensions.conntrack import Conntrack, Expiry, MaskedAddress
from codegen.rules.extensions.ctinfo import (
    STATE_SNAT,
    XT_CONNTRACK_PROTO,
    XT_CONNTRACK_STATE,
    XT_CONNTRACK_STATE_ALIAS,
    AnyOf,
    XtConntrackMtinfo3,
)
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.state import State
from codegen.rules.model import Accept, Protocol, Rule
from codegen.rules.packet import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    Connection,
    ConnectionTuple,
    read_packet,
)
from codegen.rules.syntax import ParseError

CONNTRACK, STATE = BY_NAME["conntrack"], BY_NAME["state"]


def rule_text(options: str) -> str:
    return f"*filter\n-A INPUT {options}\nCOMMIT\n"


def saved(options: str) -> str:
    return write(parse(rule_text(options))).splitlines()[4].removeprefix("-A INPUT ")


def only_match(options: str):
    (rule,) = parse(rule_text(options))["INPUT"].rules
    (match,) = rule.matches
    return match


# (what is written, what iptables-legacy-save prints for it)
SPELLINGS = [
    ("-m conntrack --ctstate new,est", "-m conntrack --ctstate NEW,ESTABLISHED"),
    (
        "-m conntrack --ctstate SNAT,DNAT,UNTRACKED,INVALID,RELATED",
        "-m conntrack --ctstate INVALID,RELATED,UNTRACKED,SNAT,DNAT",
    ),
    ("-m conntrack --ctstate s", "-m conntrack --ctstate SNAT"),
    ("-m conntrack --ctstate NEW,NEW", "-m conntrack --ctstate NEW"),
    ("-m conntrack --ctstate=NEW", "-m conntrack --ctstate NEW"),
    ("-m conntrack --ctstatu ASSURED", "-m conntrack --ctstatus ASSURED"),
    ("-m conntrack --ctstatus NONE,ASSURED", "-m conntrack --ctstatus ASSURED"),
    ("-m conntrack --ctstatus s", "-m conntrack --ctstatus SEEN_REPLY"),
    ("-m conntrack --ctproto TCP", "-m conntrack --ctproto 6"),
    ("-m conntrack --ctproto udp", "-m conntrack --ctproto 17"),
    ("-m conntrack --ctproto 0x11", "-m conntrack --ctproto 17"),
    ("-m conntrack --ctorigsrc 198.18.1.2/16", "-m conntrack --ctorigsrc 198.18.1.2/16"),
    ("-m conntrack --ctorigsrc 198.18.0.0/255.255.0.0", "-m conntrack --ctorigsrc 198.18.0.0/16"),
    ("-m conntrack --ctorigsrc 198.18.0.0/0x10", "-m conntrack --ctorigsrc 198.18.0.0/16"),
    ("-m conntrack --ctorigsrc 198.18.0.0/010", "-m conntrack --ctorigsrc 198.18.0.0/8"),
    ("-m conntrack --ctorigsrc 198.18.0.0/+8", "-m conntrack --ctorigsrc 198.18.0.0/8"),
    ("-m conntrack --ctorigsrc 198.18.0.0/32", "-m conntrack --ctorigsrc 198.18.0.0"),
    ("-m conntrack --ctorigdst 198.18.0.9/0", "-m conntrack --ctorigdst 198.18.0.9/0"),
    ("-m conntrack --ctreplsrc 10", "-m conntrack --ctreplsrc 0.0.0.10"),
    ("-m conntrack --ctreplsrc 10.1.2", "-m conntrack --ctreplsrc 10.1.0.2"),
    ("-m conntrack --ctrepldst 0x0a000001", "-m conntrack --ctrepldst 10.0.0.1"),
    ("-m conntrack --ctrepldst 010.0.0.1", "-m conntrack --ctrepldst 8.0.0.1"),
    ("-m conntrack ! --ctorigsrc 0.0.0.0/0", "-m conntrack ! --ctorigsrc 0.0.0.0/0"),
    ("-m conntrack --ctorigdstport 010", "-m conntrack --ctorigdstport 10"),
    ("-m conntrack --ctorigdstport +22", "-m conntrack --ctorigdstport 22"),
    ("-m conntrack --ctorigdstport ssh:http", "-m conntrack --ctorigdstport 22:80"),
    ("-m conntrack --ctorigdstport 0:0", "-m conntrack --ctorigdstport 0"),
    ("-m conntrack --ctorigsrcport 5:5", "-m conntrack --ctorigsrcport 5"),
    ("-m conntrack --ctreplsrcport :", "-m conntrack --ctreplsrcport 0:65535"),
    ("-m conntrack --ctrepldstport 4:", "-m conntrack --ctrepldstport 4:65535"),
    ("-m conntrack --ctexpire 010", "-m conntrack --ctexpire 8"),
    ("-m conntrack --ctexpire 0x10", "-m conntrack --ctexpire 16"),
    ("-m conntrack --ctexpire +5", "-m conntrack --ctexpire 5"),
    ("-m conntrack --ctexpire :", "-m conntrack --ctexpire 0:4294967295"),
    ("-m conntrack --ctexpire :5", "-m conntrack --ctexpire 0:5"),
    ("-m conntrack --ctexpire 5:", "-m conntrack --ctexpire 5:4294967295"),
    ("-m conntrack --ctexpire 3:3", "-m conntrack --ctexpire 3"),
    ("-m conntrack --ctdir reply", "-m conntrack --ctdir REPLY"),
    (
        "-m conntrack --ctrepldstport 4:5 --ctorigsrcport 1 --ctdir ORIGINAL --ctexpire 5"
        " --ctstatus ASSURED --ctstate NEW --ctproto 17 --ctrepldst 1.1.1.1 --ctorigsrc 2.2.2.2",
        "-m conntrack --ctstate NEW --ctproto 17 --ctorigsrc 2.2.2.2 --ctrepldst 1.1.1.1"
        " --ctorigsrcport 1 --ctrepldstport 4:5 --ctstatus ASSURED --ctexpire 5 --ctdir ORIGINAL",
    ),
    (
        "-m conntrack --ctstate NEW -m conntrack --ctproto 6",
        "-m conntrack --ctstate NEW -m conntrack --ctproto 6",
    ),
    ("-m state --state n,e,r,i,u", "-m state --state INVALID,NEW,RELATED,ESTABLISHED,UNTRACKED"),
    ("-m state --sta NEW", "-m state --state NEW"),
    (
        "-m state --state NEW -m conntrack --ctstate NEW",
        "-m state --state NEW -m conntrack --ctstate NEW",
    ),
]


@pytest.mark.parametrize(("written", "expected"), SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_a_spelling_saves_as_iptables_legacy_saves_it(written: str, expected: str) -> None:
    assert saved(written) == expected
    assert saved(expected) == expected


# (options, column, message): where each refusal points, in `-A INPUT OPTIONS`.
ERRORS = [
    ("-m conntrack", 10, "conntrack: at least one option is required"),
    ("-m conntrack -j ACCEPT", 10, "conntrack: at least one option is required"),
    ("-m conntrack --ctstate wrong", 33, "state 'wrong' in 'wrong' is not one of INVALID, NEW"),
    ("-m conntrack --ctstate NEW,", 33, "state '' in 'NEW,' is not one of"),
    ("-m conntrack --ctstate ,NEW", 33, "state '' in ',NEW' is not one of"),
    ("-m conntrack --ctstate NEWER", 33, "state 'NEWER' in 'NEWER'"),
    ("-m conntrack --ctstatus bogus", 34, "status 'bogus' in 'bogus' is not one of NONE,"),
    ("-m conntrack --ctstate NEW --ctstate NEW", 37, "conntrack: only one --ctstate allowed"),
    ("-m conntrack --ctstatus NONE --ctstatu NONE", 39, "conntrack: only one --ctstatus allowed"),
    ("-m conntrack --ctst NEW", 23, "option '--ctst' is ambiguous"),
    ("-m conntrack ! --ctdir REPLY", 25, "conntrack: option '--ctdir' cannot be negated"),
    ("-m conntrack --ctdir both", 31, "conntrack: bad --ctdir 'both' (ORIGINAL or REPLY)"),
    ("-m conntrack --ctproto 0", 33, "conntrack: rule would never match protocol"),
    ("-m conntrack ! --ctproto all", 35, "conntrack: condition would always match protocol"),
    ("-m conntrack --ctproto 256", 33, "conntrack: unknown protocol '256'"),
    ("-m conntrack --ctorigsrc localhost", 35, "host names are not supported"),
    ("-m conntrack --ctorigsrc 1.2.3.4.5", 35, "'1.2.3.4.5' is not an IPv4 address"),
    ("-m conntrack --ctorigsrc 198.18.0.0/33", 35, "bad mask '33' in '198.18.0.0/33'"),
    ("-m conntrack --ctorigsrc 198.18.0.0/255.0.255.0", 35, "bad mask '255.0.255.0'"),
    ("-m conntrack --ctorigsrc 198.18.0.0/", 35, "bad mask '' in '198.18.0.0/'"),
    ("-m conntrack --ctorigsrc 198.18.0.0/8/8", 35, "bad mask '8/8'"),
    ("-m conntrack --ctorigsrcport 4:3", 39, "invalid range '4:3' for --ctorigsrcport"),
    ("-m conntrack --ctorigdstport 65536", 39, "bad port (0-65535 or a name) '65536'"),
    ("-m conntrack --ctreplsrcport 0x10", 39, "bad port (0-65535 or a name) '0x10'"),
    ("-m conntrack --ctrepldstport 1:2:3", 39, "bad value '1:2:3' for --ctrepldstport"),
    ("-m conntrack --ctexpire 4:3", 34, "invalid range '4:3' for --ctexpire (min > max)"),
    ("-m conntrack --ctexpire 42949672956", 34, "bad seconds '42949672956' for --ctexpire"),
    ("-m conntrack --ctexpire -1", 34, "bad seconds '-1' for --ctexpire"),
    ("-m conntrack --ctexpire 5x", 34, "bad seconds '5x' for --ctexpire"),
    ("-m state", 10, "state: --state must be specified"),
    ("-m state wrong", 19, "bad argument 'wrong'"),
    ("-m state --state SNAT", 27, "state 'SNAT' in 'SNAT' is not one of INVALID, NEW,"),
    ("-m state --state NEW,", 27, "state '' in 'NEW,' is not one of"),
    ("-m state --state NEW --state NEW", 31, "state: only one --state allowed"),
    ("-m state --ctstate NEW", 19, "unknown option '--ctstate'"),
]


@pytest.mark.parametrize(("options", "column", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_a_refusal_points_where_it_goes_wrong(options: str, column: int, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(rule_text(options), "t.rules")
    assert message in caught.value.message
    assert str(caught.value).startswith(f"t.rules:2:{column}: error: ")


def test_list_prints_as_iptables_list() -> None:
    """`iptables-legacy -L -n` for the same rules (tests/net/test_list_format.py holds every
    example to it)."""
    assert CONNTRACK.describe(only_match(CONNTRACK.examples[1])) == (
        " ! ctstate INVALID ctproto 6 ctorigsrc 198.18.0.0/16 ctorigdstport 22"
        " ctstatus SEEN_REPLY,ASSURED ctexpire 5:10 ctdir REPLY"
    )
    assert (
        STATE.describe(only_match("-m state --state NEW,ESTABLISHED")) == " state NEW,ESTABLISHED"
    )
    assert STATE.describe(only_match("-m state ! --state INVALID")) == " ! state INVALID"


def _payload(head: bytes, *fields: int) -> bytes:
    """An xt_conntrack_mtinfo3 of 168 bytes (XT_ALIGN'd): the eight addresses and masks, then
    expires_min, expires_max, l4proto, the four ports, match_flags, invert_flags, state_mask,
    status_mask and the four high ports, host order."""
    addresses = head.ljust(128, b"\0")
    return (addresses + struct.pack("<IIH12H", *fields)).ljust(168, b"\0")


ORIGSRC_16 = bytes.fromhex("c6120000") + bytes(12) + bytes.fromhex("ffff0000") + bytes(12)
NO_MASK = b"\xff" * 16
# (options, the payload iptables-legacy 1.8.9 wrote for them)
PAYLOADS = [
    (
        CONNTRACK.examples[1],
        _payload(ORIGSRC_16, 5, 10, 6, 0, 22, 0, 0, 0x12C7, 0x1001, 0x01, 0x06, 0, 22, 0, 0),
    ),
    (
        "-m conntrack --ctorigdst 198.18.1.2 --ctrepldst 1.2.3.4/0",
        _payload(
            bytes(32)
            + bytes.fromhex("c6120102")
            + bytes(12)
            + NO_MASK
            + bytes(32)
            + bytes.fromhex("01020304")
            + bytes(28),
            *[0] * 7,
            0x0028,
            *[0] * 7,
        ),
    ),
    (
        "-m conntrack ! --ctorigsrcport 1 --ctrepldstport 4:5 --ctexpire 5:4294967295",
        _payload(b"", 5, 0xFFFFFFFF, 0, 1, 0, 0, 4, 0x0980, 0x0100, 0, 0, 1, 0, 0, 5),
    ),
    ("-m conntrack --ctstate SNAT,DNAT,UNTRACKED", _payload(b"", *[0] * 7, 1, 0, 0x1C0, *[0] * 5)),
    ("-m state --state NEW,ESTABLISHED", _payload(b"", *[0] * 7, 0x2001, 0, 0x0A, *[0] * 5)),
    ("-m state ! --state INVALID", _payload(b"", *[0] * 7, 0x2001, 0x0001, 0x01, *[0] * 5)),
    ("-m conntrack --ctdir REPLY", _payload(b"", *[0] * 7, 0x1000, 0x1000, *[0] * 6)),
    ("-m conntrack --ctstatus NONE", _payload(b"", *[0] * 7, 0x0040, *[0] * 7)),
]


@pytest.mark.parametrize(("options", "payload"), PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_the_payload_is_the_one_iptables_legacy_writes(options: str, payload: bytes) -> None:
    match = only_match(options)
    family = extension_of(match)
    assert (family.blob_name, family.revision) == ("conntrack", 3)
    assert bytes(family.encode(match)).ljust(168, b"\0") == payload
    data = XtConntrackMtinfo3.from_buffer_copy(payload[:164])
    (reader,) = [f for f in BY_BLOB_NAME["conntrack"] if f.claims(data)]
    assert reader is family and reader.decode(data) == match


def test_conntrack_and_state_share_the_blob_name_and_tell_payloads_apart() -> None:
    assert BY_BLOB_NAME["conntrack"] == (CONNTRACK, STATE)
    assert "state" not in BY_BLOB_NAME


@pytest.mark.parametrize(
    ("family", "fields", "message"),
    [
        ("state", {"match_flags": 0x2003}, "has options --state does not"),
        ("state", {"match_flags": 0x2001, "state_mask": STATE_SNAT}, "are not --state's"),
        ("state", {"match_flags": 0x2001}, "states 0x0 are not --state's"),
        ("conntrack", {"match_flags": 0x4000}, "bad flags 0x4000"),
        ("conntrack", {"match_flags": 0x1, "invert_flags": 0x3}, "inverted 0x3"),
        ("conntrack", {"match_flags": 0x1, "state_mask": 0x200}, "unknown state bits 0x200"),
        ("conntrack", {"match_flags": 0x40, "status_mask": 0x10}, "unknown status bits 0x10"),
        ("conntrack", {"match_flags": 0x2, "l4proto": 300}, "300 is not an IP protocol"),
        ("conntrack", {}, "conntrack match with no option"),
    ],
)
def test_a_payload_the_model_cannot_hold_is_refused(family: str, fields: dict, message: str):
    with pytest.raises(BlobError, match=message):
        BY_NAME[family].decode(XtConntrackMtinfo3(**fields))


def test_the_alias_flag_decides_who_reads_a_payload() -> None:
    alias = XtConntrackMtinfo3(match_flags=XT_CONNTRACK_STATE | XT_CONNTRACK_STATE_ALIAS)
    plain = XtConntrackMtinfo3(match_flags=XT_CONNTRACK_PROTO, l4proto=6)
    assert STATE.claims(alias) and not CONNTRACK.claims(alias)
    assert CONNTRACK.claims(plain) and not STATE.claims(plain)


@pytest.mark.parametrize(
    ("match", "message"),
    [
        (Conntrack(), "at least one option is required"),
        (Conntrack(state=AnyOf(0)), "--ctstate needs at least one state"),
        (Conntrack(protocol=Protocol(0)), "--ctproto 0 (all) would never match"),
        (Conntrack(replsrc_port=PortRange(4, 3)), "--ctreplsrcport 4:3: invalid range"),
        (Conntrack(expires=Expiry(4, 3)), "--ctexpire 4:3: min > max"),
        (Conntrack(status=AnyOf(0x10)), "--ctstatus: unknown status bits 0x10"),
        (State(0), "--state needs at least one state"),
        (State(STATE_SNAT), "--state: unknown state bits 0x40"),
    ],
)
def test_a_model_iptables_would_refuse_is_refused(match, message: str) -> None:
    ruleset = Ruleset()
    ruleset["INPUT"].rules.append(Rule((match,), Accept()))
    with pytest.raises(RuleError, match=re.escape(message)):
        validate(ruleset)


def test_a_high_port_of_zero_reads_back_as_the_low_port() -> None:
    """conntrack_dump_ports prints `5` for 5:0 (a range only a blob can hold), which reads back
    as 5:5."""
    match = Conntrack(origsrc_port=PortRange(5, 0))
    assert CONNTRACK.save(match) == ["-m", "conntrack", "--ctorigsrcport", "5"]
    assert CONNTRACK.as_saved(match) == Conntrack(origsrc_port=PortRange(5, 5))


# ---------------------------------------------------------------------------------------------
# conntrack_mt on the packet's connection

UDP = bytes.fromhex("4500001c000100004011000000000000000000001389138a00080000")
CLIENT, SERVER = 0xC6120005, 0xC6120101  # 198.18.0.5, 198.18.1.1
QUERY = ConnectionTuple(CLIENT, SERVER, 40000, 53)
ANSWER = ConnectionTuple(SERVER, CLIENT, 53, 40000)
NEW = Connection("NEW", "ORIGINAL", 17, QUERY, ANSWER, IPS_CONFIRMED, 30)
REPLY = Connection("ESTABLISHED", "REPLY", 17, QUERY, ANSWER, IPS_SEEN_REPLY | IPS_CONFIRMED, 29)
RELATED = Connection("RELATED", "REPLY", 1, QUERY, ANSWER, IPS_CONFIRMED, 10)
NATTED = Connection("ESTABLISHED", "ORIGINAL", 6, QUERY, ANSWER, IPS_SRC_NAT | IPS_ASSURED, 99)
UNTRACKED = Connection("UNTRACKED")
INVALID = Connection("INVALID")

# (options, connection, whether the match holds)
SEMANTICS = [
    ("-m conntrack --ctstate INVALID", None, True),
    ("-m conntrack --ctstate INVALID", INVALID, True),
    ("-m conntrack --ctstate NEW", None, False),
    ("-m conntrack ! --ctstate NEW", None, True),
    # No entry: only --ctstate is looked at, and the match holds only when it is given.
    ("-m conntrack --ctproto 17", None, False),
    ("-m conntrack ! --ctproto 17", None, False),
    ("-m conntrack --ctstate INVALID --ctproto 6", None, True),
    ("-m conntrack ! --ctstate NEW --ctdir REPLY", UNTRACKED, True),
    ("-m conntrack --ctstate UNTRACKED", UNTRACKED, True),
    ("-m conntrack --ctstate INVALID", UNTRACKED, False),
    ("-m conntrack --ctstatus NONE", UNTRACKED, False),
    ("-m conntrack --ctstate NEW", NEW, True),
    ("-m conntrack --ctstate RELATED,ESTABLISHED", NEW, False),
    ("-m conntrack --ctstate RELATED,ESTABLISHED", REPLY, True),
    ("-m conntrack --ctstate RELATED", RELATED, True),
    ("-m conntrack --ctstate SNAT", NATTED, True),
    ("-m conntrack --ctstate DNAT", NATTED, False),
    ("-m conntrack --ctstate DNAT", Connection(status=IPS_DST_NAT), True),
    ("-m conntrack --ctstate SNAT", Connection("UNTRACKED", status=IPS_SRC_NAT), False),
    ("-m conntrack --ctdir ORIGINAL", NEW, True),
    ("-m conntrack --ctdir ORIGINAL", REPLY, False),
    ("-m conntrack --ctdir REPLY", REPLY, True),
    ("-m conntrack --ctproto 17", NEW, True),
    ("-m conntrack --ctproto 6", NEW, False),
    ("-m conntrack ! --ctproto 6", NEW, True),
    ("-m conntrack --ctorigsrc 198.18.7.7/16", NEW, True),
    ("-m conntrack --ctorigsrc 198.18.0.5", REPLY, True),  # the tuples, not the packet
    ("-m conntrack ! --ctorigsrc 198.18.0.0/24", NEW, False),
    (
        "-m conntrack --ctorigdst 198.18.1.1 --ctreplsrc 198.18.1.1 --ctrepldst 198.18.0.5",
        NEW,
        True,
    ),
    ("-m conntrack --ctrepldst 198.18.1.1", NEW, False),
    ("-m conntrack --ctorigsrc 1.2.3.4/0", NEW, True),
    ("-m conntrack --ctorigsrcport 40000 --ctorigdstport 53", NEW, True),
    ("-m conntrack --ctreplsrcport 53 --ctrepldstport 39999:40001", REPLY, True),
    ("-m conntrack ! --ctreplsrcport 53", REPLY, False),
    ("-m conntrack --ctorigdstport 54:65535", NEW, False),
    ("-m conntrack --ctstatus SEEN_REPLY,ASSURED", REPLY, True),
    ("-m conntrack --ctstatus SEEN_REPLY,ASSURED", NEW, False),
    ("-m conntrack ! --ctstatus SEEN_REPLY", NEW, True),
    ("-m conntrack --ctstatus NONE", NEW, False),
    ("-m conntrack ! --ctstatus NONE", NEW, True),
    ("-m conntrack --ctexpire 25:30", NEW, True),
    ("-m conntrack --ctexpire 30", REPLY, False),
    ("-m conntrack ! --ctexpire 30", REPLY, True),
    ("-m state --state NEW,ESTABLISHED", None, False),
    ("-m state --state NEW,ESTABLISHED", REPLY, True),
    ("-m state ! --state INVALID", None, False),
    ("-m state ! --state INVALID", NEW, True),
    ("-m state --state UNTRACKED", UNTRACKED, True),
]


@pytest.mark.parametrize(
    ("options", "connection", "expected"),
    SEMANTICS,
    ids=[f"{s[0]} @ {s[1].state if s[1] else None}" for s in SEMANTICS],
)
def test_conntrack_mt(options: str, connection: Connection | None, expected: bool) -> None:
    match = only_match(options)
    packet = read_packet(UDP, "veth0", None, 0, "host", connection=connection)
    assert extension_of(match).matches(match, packet) is expected


def test_evaluate_hands_the_connection_to_the_matches() -> None:
    ruleset = parse(
        "*filter\n:INPUT DROP [0:0]\n"
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        "-A INPUT -m state --state NEW -j ACCEPT\nCOMMIT\n"
    )
    decided = {
        None: ("DROP", ("INPUT", "policy")),
        REPLY: ("ACCEPT", ("INPUT", 1)),
        NEW: ("ACCEPT", ("INPUT", 2)),
    }
    for connection, (verdict, position) in decided.items():
        result = evaluate(ruleset, UDP, "INPUT", "veth0", None, connection=connection)
        assert (result.verdict, result.deciding) == (verdict, position)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"state": "SYN_SENT"}, "state must be one of INVALID, NEW"),
        ({"direction": "BOTH"}, "direction must be ORIGINAL or REPLY"),
        ({"state": "NEW", "direction": "REPLY"}, "a NEW packet travels in the original"),
        ({"protocol": 256}, "protocol must be an integer in 0..255"),
        ({"expires": -1}, "expires must be an integer"),
    ],
)
def test_a_connection_no_kernel_has_is_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Connection(**arguments)


def test_masked_addresses_keep_the_address_as_given() -> None:
    match = only_match("-m conntrack --ctorigsrc 198.18.1.2/16")
    assert match.origsrc == MaskedAddress(0xC6120102, 0xFFFF0000)
