"""`-m owner` in the rule layer and the reference evaluator: what iptables-legacy 1.8.9 reads,
saves, lists and refuses (the expected texts are its own, taken in a namespace; names are
looked up here as libxt_owner does, in this machine's passwd and group), the blob payload,
and owner_mt's answers for every socket state, written out by hand from xt_owner.c."""

from __future__ import annotations

import pytest

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.owner import (
    EXTENSION,
    ID_MAX,
    IdRange,
    Owner,
    XtOwnerMatchInfo,
    parse_ids,
)
from codegen.rules.ipt_blob import decode_table, encode_table
from codegen.rules.packet import SocketOwner
from codegen.rules.validation import validate

HEADER = "*filter\n:owned - [0:0]\n"


def _saved(options: str) -> str:
    return write(parse(f"{HEADER}-A OUTPUT {options}\nCOMMIT\n", "t")).splitlines()[5]


def _match(options: str) -> Owner:
    (match,) = parse(f"{HEADER}-A OUTPUT {options}\nCOMMIT\n", "t")["OUTPUT"].rules[0].matches
    assert isinstance(match, Owner)
    return match


# (options as given, the rule as iptables-legacy-save prints it, as `iptables -L -n` does)
SAVED = [
    ("-m owner --uid-owner root", "--uid-owner 0", "owner UID match 0"),
    ("-m owner --uid-owner nobody", "--uid-owner 65534", "owner UID match 65534"),
    ("-m owner --gid-owner nogroup", "--gid-owner 65534", "owner GID match 65534"),
    ("-m owner --gid-owner root", "--gid-owner 0", "owner GID match 0"),
    ("-m owner --uid-owner 010", "--uid-owner 8", "owner UID match 8"),
    ("-m owner --uid-owner 0x10:0x20", "--uid-owner 16-32", "owner UID match 16-32"),
    ('-m owner --uid-owner " 5"', "--uid-owner 5", "owner UID match 5"),
    ("-m owner --uid-owner +5", "--uid-owner 5", "owner UID match 5"),
    ("-m owner --uid-owner 5-5", "--uid-owner 5", "owner UID match 5"),
    ("-m owner --uid-owner 4294967294", "--uid-owner 4294967294", "owner UID match 4294967294"),
    (
        "-m owner ! --uid-owner 10-20 ! --gid-owner nogroup --suppl-groups",
        "! --uid-owner 10-20 ! --gid-owner 65534 --suppl-groups",
        "! owner UID match 10-20 ! owner GID match 65534 incl. suppl. groups",
    ),
    (
        "-m owner --gid-owner 0x10:0x20 --socket-exists",
        "--socket-exists --gid-owner 16-32",
        "owner socket exists owner GID match 16-32",
    ),
    ("-m owner ! --socket-exists", "! --socket-exists", "! owner socket exists"),
    ("-m owner --gid-owner 5 --uid-owner 7", "--uid-owner 7 --gid-owner 5", None),
]


@pytest.mark.parametrize(("options", "saved", "listed"), SAVED)
def test_saves_and_lists_as_iptables_does(options: str, saved: str, listed: str | None) -> None:
    assert _saved(options) == f"-A OUTPUT -m owner {saved}"
    if listed is not None:
        assert EXTENSION.describe(_match(options)) == f" {listed}"


def test_two_owner_matches_in_one_rule_stay_two() -> None:
    text = f"{HEADER}-A OUTPUT -m owner --gid-owner 5 -m owner --uid-owner 65534 -j DROP\nCOMMIT\n"
    assert write(parse(text, "t")).splitlines()[5] == (
        "-A OUTPUT -m owner --gid-owner 5 -m owner --uid-owner 65534 -j DROP"
    )


# (rule lines, the error's place, a part of its message): what iptables-legacy refuses.
REFUSED = [
    ("-A INPUT -m owner --uid-owner 0", "t:3:10", "valid only in OUTPUT"),
    ("-A FORWARD -m owner --socket-exists", "t:3:12", "not in FORWARD"),
    ("-A OUTPUT -m owner --uid-owner 20-10", "t:3:11", "20-10 is an empty range"),
    ("-A OUTPUT -m owner --uid-owner 4294967295", "t:3:32", "bad value for --uid-owner"),
    ("-A OUTPUT -m owner --uid-owner 5-", "t:3:32", "bad value"),
    ("-A OUTPUT -m owner --uid-owner -5", "t:3:32", "bad value"),
    ('-A OUTPUT -m owner --uid-owner ""', "t:3:32", "bad value"),
    ('-A OUTPUT -m owner --uid-owner "5 "', "t:3:32", "bad value"),
    ("-A OUTPUT -m owner --uid-owner 0x", "t:3:32", "bad value"),
    ("-A OUTPUT -m owner --uid-owner 08", "t:3:32", "bad value"),
    ("-A OUTPUT -m owner --uid-owner no-such-user-here", "t:3:32", "a user name"),
    ("-A OUTPUT -m owner --gid-owner no-such-group-here", "t:3:32", "a group name"),
    ("-A OUTPUT -m owner --suppl-groups --gid-owner 3", "t:3:20", "--gid-owner before it"),
    ("-A OUTPUT -m owner ! --suppl-groups --gid-owner 3", "t:3:22", "cannot be inverted"),
    ("-A OUTPUT -m owner --uid-owner 1 --uid-owner 2", "t:3:34", "can only be used once"),
    ("-A OUTPUT -m owner --socket-exists --socket-exists", "t:3:36", "can only be used once"),
    ("-A OUTPUT -m owner", "t:3:11", "--uid-owner, --gid-owner or --socket-exists"),
]


@pytest.mark.parametrize(("lines", "where", "message"), REFUSED)
def test_refuses_what_iptables_refuses(lines: str, where: str, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(f"{HEADER}{lines}\nCOMMIT\n", "t")
    assert str(caught.value).startswith(f"{where}: error: owner: ")
    assert message in str(caught.value)


def test_a_user_chain_reached_from_input_refuses_it() -> None:
    text = (
        f"{HEADER}-A owned -m owner --uid-owner 0\n-A OUTPUT -j owned\n-A INPUT -j owned\nCOMMIT\n"
    )
    ruleset = parse(text, "t")  # the jump from INPUT comes after the match
    with pytest.raises(RuleError) as caught:
        validate(ruleset)
    assert "t:3:1:" in str(caught.value)
    assert "not in INPUT (chain owned is reached from INPUT)" in str(caught.value)
    validate(parse(f"{HEADER}-A owned -m owner --uid-owner 0\n-A OUTPUT -j owned\nCOMMIT\n", "t"))


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("0", (0, 0)),
        ("1-2", (1, 2)),
        ("1:2", (1, 2)),
        ("0x1f-017", (31, 15)),  # reversed: read, then refused by the check
        ("+1-+2", (1, 2)),
        ("1- 2", (1, 2)),
        ("-0", (0, 0)),
        ("1-2-3", None),
        ("1:", None),
        ("4294967294", (ID_MAX, ID_MAX)),
        ("4294967295", None),
        ("1 -2", None),
    ],
)
def test_ids_read_as_owner_parse_range_reads_them(text: str, ids: tuple[int, int] | None) -> None:
    assert parse_ids(text) == ids


def test_blob_payload_is_the_kernels_struct() -> None:
    match = Owner(IdRange(10, 20, True), IdRange(30, 30), False, True)
    data = EXTENSION.encode(match)
    assert bytes(data)[:18] == (
        (10).to_bytes(4, "little")
        + (20).to_bytes(4, "little")
        + (30).to_bytes(4, "little")
        + (30).to_bytes(4, "little")
        + bytes([1 | 2 | 4 | 8, 1 | 4])
    )
    assert EXTENSION.decode(XtOwnerMatchInfo.from_buffer_copy(bytes(data))) == match


@pytest.mark.parametrize(
    ("flags", "invert", "error"),
    [
        (16, 0, "unknown flags"),
        (1, 2, "invert flags 0x2"),
        (1, 8, "invert flags 0x8"),
        (8, 0, "supplementary groups without a gid"),
        (0, 0, "no uid, gid or socket"),
    ],
)
def test_blob_payloads_we_cannot_hold_are_refused(flags: int, invert: int, error: str) -> None:
    data = XtOwnerMatchInfo(0, 0, 0, 0, flags, invert)
    with pytest.raises(BlobError, match=error):
        EXTENSION.decode(data)


def test_a_table_round_trips_through_the_blob() -> None:
    text = (
        f"{HEADER}-A OUTPUT -j owned\n"
        + "".join(f"-A owned {example}\n" for example in EXTENSION.examples)
        + "COMMIT\n"
    )
    ruleset = parse(text, "t")
    assert decode_table(encode_table(ruleset)) == ruleset


NO_FILE = SocketOwner(file=False)
ROOT = SocketOwner(0, 0, (5,))
USER = SocketOwner(1500, 2500, (2000, 7))
# (options, answers for: no socket, a socket no file holds, root's file, the user's file),
# each worked out from owner_mt: no socket holds when (match ^ invert) == 0; a socket without
# a file when the uid and gid bits of (match ^ invert) are clear; ! --socket-exists fails any
# socket; a file's fsuid and fsgid (and groups, with --suppl-groups) are compared.
ANSWERS = [
    ("--uid-owner 0", (False, False, True, False)),
    ("! --uid-owner 0", (True, True, False, True)),
    ("--uid-owner 1000-1999", (False, False, False, True)),
    ("--gid-owner 2500", (False, False, False, True)),
    ("! --gid-owner 2500", (True, True, True, False)),
    ("--gid-owner 2000", (False, False, False, False)),  # a group, not the fsgid
    ("--gid-owner 2000 --suppl-groups", (False, False, False, True)),
    ("--gid-owner 5 --suppl-groups", (False, False, True, False)),
    # --suppl-groups is a bit of `match` that no `invert` bit cancels: no socket fails it.
    ("! --gid-owner 7 --suppl-groups", (False, True, True, False)),
    ("--socket-exists", (False, True, True, True)),
    ("! --socket-exists", (True, False, False, False)),
    ("! --socket-exists ! --uid-owner 0", (True, False, False, False)),
    ("--socket-exists ! --uid-owner 0", (False, True, False, True)),
    ("--socket-exists --uid-owner 1500", (False, False, False, True)),
    ("! --uid-owner 0 ! --gid-owner 0", (True, True, False, True)),
    ("! --uid-owner 0 --gid-owner 2500", (False, False, False, True)),
    ("--uid-owner 0-4294967294", (False, False, True, True)),
]


@pytest.mark.parametrize(("options", "answers"), ANSWERS)
def test_answers_as_owner_mt(options: str, answers: tuple[bool, ...]) -> None:
    ruleset = parse(f"{HEADER}-A OUTPUT -m owner {options} -j DROP\nCOMMIT\n", "t")
    udp = bytes.fromhex("4500001c0001000040110000c6120002c61200019c40138800080000")
    got = tuple(
        evaluate(ruleset, udp, "OUTPUT", None, "eth0", owner=owner).verdict == "DROP"
        for owner in (None, NO_FILE, ROOT, USER)
    )
    assert got == answers
