"""`-m set` and ipsets in the rule layer: the match's text, refusals and blob codec, `ipset
save` text read into sets (and what cannot be), and what a set answers for a packet as
ip_set_test does (longest prefix with nomatch, --return-nomatch, dimensions, ports).
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.extensions.set import (
    EXTENSION,
    SetMatch,
    StandinIndexes,
    bind_sets,
    set_indexes,
)
from codegen.rules.ipt_blob import BlobError
from codegen.rules.packet import read_packet
from codegen.rules.sets import SetError, parse_sets

# What `ipset save` printed on this machine (ipset 7.17) for sets made with ipset create/add.
SAVED = """\
create s1 hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xa5e10479
add s1 198.18.0.1
create n1 hash:net family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xa19cfe01
add n1 198.18.0.0/16
add n1 198.18.5.0/24 nomatch
create p1 bitmap:port range 0-1024
add p1 20
add p1 21
add p1 22
add p1 80
create ip1 hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x207c50b5
add ip1 198.18.0.1,tcp:80
add ip1 198.18.0.2,udp:53
add ip1 198.18.0.3,icmp:echo-request
create np1 hash:net,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xe50
add np1 198.18.0.0/24,tcp:80
"""
SETS = parse_sets(SAVED, "saved")


def _rule(options: str) -> str:
    return f"*filter\n-A INPUT {options} -j DROP\nCOMMIT\n"


def _packet(
    layer: object, source: str = "198.18.0.1", destination: str = "198.18.9.9", **fields: int
) -> bytes:
    return bytes(IP(src=source, dst=destination, **fields) / layer)  # type: ignore[operator]


def _verdict(options: str, packet: bytes) -> str:
    ruleset = parse(_rule(options), "t")
    return evaluate(ruleset, packet, "INPUT", "eth0", None, sets=SETS).verdict


# -- text ---------------------------------------------------------------------------------

# (options, as iptables-legacy-save 1.8.9 printed them here, as iptables -L -n printed them)
SAVED_RULES = [
    ("-m set --match-set s1 src,dst", "-m set --match-set s1 src,dst", " match-set s1 src,dst"),
    (
        "-m set ! --match-set n1 dst --return-nomatch",
        "-m set ! --match-set n1 dst --return-nomatch",
        " ! match-set n1 dst return-nomatch",
    ),
    (
        "-m set --match-set ip1 src,dst ! --update-counters ! --update-subcounters",
        "-m set --match-set ip1 src,dst ! --update-counters ! --update-subcounters",
        " match-set ip1 src,dst ! update-counters ! update-subcounters",
    ),
    (
        "-m set --match-set np1 dst,dst,src,src,dst,dst",
        "-m set --match-set np1 dst,dst,src,src,dst,dst",
        " match-set np1 dst,dst,src,src,dst,dst",
    ),
    ("-m set --set s1 src --update-counters", "-m set --match-set s1 src", " match-set s1 src"),
]


@pytest.mark.parametrize(("options", "saved", "listed"), SAVED_RULES)
def test_saves_and_lists_as_iptables_legacy(options: str, saved: str, listed: str) -> None:
    ruleset = parse(_rule(options), "t")
    assert f"-A INPUT {saved} -j DROP" in write(ruleset).splitlines()
    (match,) = ruleset["INPUT"].rules[0].matches
    assert EXTENSION.describe(match) == listed


REFUSED = [
    ("-m set --match-set s1", "requires two args"),
    ("-m set --match-set s1 src,dst,src,dst,src,dst,src", "more src/dst options than 6"),
    ("-m set --match-set s1 source", "'src' or 'dst'"),
    ("-m set --match-set s1 src --match-set n1 dst", "only once"),
    ("-m set --match-set " + "x" * 32 + " src", "too long, max 31"),
    ("-m set --match-set p1 src --packets-gt 5", "counters"),
    ("-m set --match-set p1 src ! --bytes-eq 5", "counters"),
    ("-m set --return-nomatch", "--match-set must be specified"),
    ("-m set ! --return-nomatch --match-set s1 src", "cannot be negated"),
]


@pytest.mark.parametrize(("options", "message"), REFUSED)
def test_refusals_name_the_place(options: str, message: str) -> None:
    with pytest.raises(RuleError, match=message) as caught:
        parse(_rule(options), "r.rules")
    assert str(caught.value).startswith("r.rules:2:")


# -- blob ---------------------------------------------------------------------------------


def test_the_payload_holds_the_index_the_caller_gives() -> None:
    """Byte for byte what iptables-legacy wrote for these rules here (sets s1=0, n1=1, ip1=3)."""
    indexes = StandinIndexes()
    indexes.indexes.update({"s1": 0, "n1": 1, "p1": 2, "ip1": 3, "np1": 4})
    blobs = {
        "-m set --match-set s1 src,dst": "00000202",
        "-m set ! --match-set n1 dst --return-nomatch": "01000101",
        "-m set --match-set np1 dst,dst,src,src,dst,dst": "04000618",
    }
    flags = {"00000202": 0, "01000101": 0x80, "04000618": 0}
    with set_indexes(indexes):
        for options, head in blobs.items():
            (match,) = parse(_rule(options), "t")["INPUT"].rules[0].matches
            data = bytes(EXTENSION.encode(match))
            assert len(data) == 48 and data[:4].hex() == head
            assert int.from_bytes(data[40:44], "little") == flags[head]
            assert EXTENSION.decode(EXTENSION.data.from_buffer_copy(data)) == match


def test_an_index_without_a_name_is_a_blob_error() -> None:
    data = EXTENSION.data()
    data.match_set.index, data.match_set.dim = 77, 1
    with set_indexes(StandinIndexes()), pytest.raises(BlobError, match="index 77 has no name"):
        EXTENSION.decode(data)
    data.match_set.index, data.packets.op = 0, 4
    with pytest.raises(BlobError, match="counter"):
        EXTENSION.decode(data)


# -- ipset save text ----------------------------------------------------------------------


def test_ipset_save_text_is_read() -> None:
    assert SETS["s1"].kind == "hash:ip" and len(SETS["s1"].members) == 1
    assert [m.nomatch for m in SETS["n1"].members] == [False, True]
    assert SETS["p1"].port_range == (0, 1024)
    assert {(m.protocol, m.port) for m in SETS["ip1"].members} == {(6, 80), (17, 53), (1, 0x800)}
    (member,) = SETS["np1"].members
    assert (member.prefix, member.protocol, member.port) == (24, 6, 80)


def test_hand_written_ranges_expand() -> None:
    sets = parse_sets(
        "create a hash:ip\nadd a 198.18.0.1-198.18.0.3\nadd a 198.18.1.0/30\n"
        "create b bitmap:port range 10-20\nadd b 11-13\n"
        "create c hash:net\nadd c 198.18.0.1-198.18.0.6\n"
        "create d hash:ip,port\nadd d 198.18.0.1,udp:1-3\nadd d 198.18.0.1,gre:0\n",
        "hand",
    )
    assert len(sets["a"].members) == 7 and len(sets["b"].members) == 3
    assert sorted(m.prefix for m in sets["c"].members) == [31, 31, 32, 32]  # .1, .2-.3, .4-.5, .6
    assert len(sets["d"].members) == 4


BAD_SETS = [
    ("create x hash:ip family inet6\n", 1, 25, "only inet"),
    ("create x hash:ip timeout 60\n", 1, 18, "timeouts"),
    ("create x hash:ip counters\n", 1, 18, "counters"),
    ("create x hash:mac\n", 1, 10, "not supported"),
    ("create x hash:ip netmask 24\n", 1, 26, "netmask 32"),
    ("create x bitmap:port\n", 1, 1, "range"),
    ("create x bitmap:port range 0-10\nadd x 11\n", 2, 7, "outside"),
    ("add y 198.18.0.1\n", 1, 5, "not created"),
    ("create x hash:ip\ncreate x hash:net\n", 2, 8, "twice"),
    ("create x hash:net\nadd x 198.18.0.0/0\n", 2, 7, "prefix length 0"),
    ("create x hash:ip\nadd x 198.18.0.300\n", 2, 7, "not an IPv4 address"),
    ("create x hash:ip\nadd x 198.18.0.1 nomatch\n", 2, 18, "not supported"),
    ("create x hash:ip,port\nadd x 198.18.0.1,icmp:bogus\n", 2, 18, "icmp"),
    ("create x hash:ip,port\nadd x 198.18.0.1,gre:5\n", 2, 18, "has no ports"),
    ("create x hash:ip,port\nadd x 198.18.0.1\n", 2, 7, r"ADDRESS,\[PROTO:\]PORT"),
    ("flush x\n", 1, 1, "only create and add"),
]


@pytest.mark.parametrize(("text", "line", "column", "message"), BAD_SETS)
def test_set_errors_name_file_line_and_column(
    text: str, line: int, column: int, message: str
) -> None:
    with pytest.raises(SetError, match=message) as caught:
        parse_sets(text, "sets.txt")
    assert str(caught.value).startswith(f"sets.txt:{line}:{column}: error:")


# -- what a set answers ---------------------------------------------------------------------

ANSWERS = [
    # hash:ip, each direction, and the address 0 no hash:ip holds
    ("-m set --match-set s1 src", _packet(UDP()), "DROP"),
    ("-m set --match-set s1 dst", _packet(UDP()), "ACCEPT"),
    ("-m set ! --match-set s1 dst", _packet(UDP()), "DROP"),
    # hash:net: the longest prefix decides; a nomatch member makes an exception
    ("-m set --match-set n1 dst", _packet(UDP()), "DROP"),
    ("-m set --match-set n1 dst", _packet(UDP(), destination="198.18.5.1"), "ACCEPT"),
    (
        "-m set --match-set n1 dst --return-nomatch",
        _packet(UDP(), "198.18.0.1", "198.18.5.1"),
        "DROP",
    ),
    ("-m set --match-set n1 dst --return-nomatch", _packet(UDP()), "ACCEPT"),
    (
        "-m set ! --match-set n1 dst --return-nomatch",
        _packet(UDP(), "198.18.0.1", "198.19.0.1"),
        "DROP",
    ),
    ("-m set --match-set n1 src", _packet(UDP(), "198.19.0.1"), "ACCEPT"),
    # --return-nomatch means nothing to a type without nomatch
    ("-m set --match-set s1 src --return-nomatch", _packet(UDP()), "DROP"),
    # bitmap:port: the port of TCP and UDP only, in the direction given
    ("-m set --match-set p1 dst", _packet(TCP(dport=22)), "DROP"),
    ("-m set --match-set p1 src", _packet(TCP(dport=22, sport=5000)), "ACCEPT"),
    ("-m set --match-set p1 dst", _packet(Raw(b"\x00\x00\x00\x16" + bytes(8))), "ACCEPT"),
    ("-m set --match-set p1 dst", _packet(Raw(bytes(TCP(dport=22))[:10]), proto=6), "ACCEPT"),
    # hash:ip,port: fewer directions than its dimension never match; ICMP's type/code
    ("-m set --match-set ip1 src,dst", _packet(TCP(dport=80)), "DROP"),
    ("-m set --match-set ip1 src", _packet(TCP(dport=80)), "ACCEPT"),
    ("-m set ! --match-set ip1 src", _packet(TCP(dport=80)), "DROP"),
    ("-m set --match-set ip1 src,src", _packet(TCP(dport=80)), "ACCEPT"),
    ("-m set --match-set ip1 src,dst", _packet(UDP(dport=80)), "ACCEPT"),
    ("-m set --match-set ip1 src,dst,src", _packet(TCP(dport=80)), "DROP"),
    ("-m set --match-set ip1 src,dst", _packet(ICMP(type=8), "198.18.0.3"), "DROP"),
    ("-m set --match-set ip1 src,dst", _packet(ICMP(type=0), "198.18.0.3"), "ACCEPT"),
    # hash:net,port: prefix of the address, whole protocol and port
    ("-m set --match-set np1 src,dst", _packet(TCP(dport=80), "198.18.0.77"), "DROP"),
    ("-m set --match-set np1 src,dst", _packet(TCP(dport=80), "198.18.1.77"), "ACCEPT"),
    ("-m set --match-set np1 src,src", _packet(TCP(dport=80), "198.18.0.77"), "ACCEPT"),
]


@pytest.mark.parametrize(("options", "packet", "verdict"), ANSWERS)
def test_what_a_set_answers(options: str, packet: bytes, verdict: str) -> None:
    assert _verdict(options, packet) == verdict


def test_later_fragments_have_no_port_but_other_protocols_do() -> None:
    later = bytes(IP(src="198.18.0.1", dst="198.18.9.9", frag=10, proto=6) / Raw(bytes(20)))
    assert _verdict("-m set --match-set ip1 src,dst", later) == "ACCEPT"
    gre = parse_sets("create g hash:ip,port\nadd g 198.18.0.1,gre:0\n", "g")
    ruleset = parse(_rule("-m set --match-set g src,dst"), "t")
    for fragment in (0, 10):
        packet = bytes(IP(src="198.18.0.1", dst="198.18.9.9", frag=fragment, proto=47) / (b"x" * 4))
        assert evaluate(ruleset, packet, "INPUT", None, None, sets=gre).verdict == "DROP"


def test_nested_nomatch_longest_prefix_wins() -> None:
    sets = parse_sets(
        "create n hash:net\nadd n 198.18.0.0/16\nadd n 198.18.1.0/24 nomatch\n"
        "add n 198.18.1.128/25\nadd n 198.18.1.129 nomatch\n",
        "n",
    )
    answers = {}
    for last in ("0.1", "1.1", "1.200", "1.129"):
        parsed = read_packet(_packet(UDP(), "198.18." + last), None, None, 0, "host", sets=sets)
        answers[last] = EXTENSION.matches(SetMatch("n", ("src",)), parsed)
    assert answers == {"0.1": True, "1.1": False, "1.200": True, "1.129": False}


def test_binding_refuses_a_set_that_does_not_exist() -> None:
    ruleset = parse(_rule("-m set --match-set missing src"), "b.rules")
    with pytest.raises(RuleError, match="set 'missing' does not exist") as caught:
        bind_sets(ruleset, SETS)
    assert str(caught.value).startswith("b.rules:2:1:")
    bound = bind_sets(parse(_rule("-m set --match-set s1 src"), "b"), SETS)
    (match,) = bound["INPUT"].rules[0].matches
    assert match.bound is SETS["s1"]


# -- packet scripts' `sets` ---------------------------------------------------------------

SCRIPT = '''\
topology = "host"
rules = """
*filter
-A INPUT -m set --match-set blocked src -j DROP
COMMIT
"""
sets = """
create blocked hash:net family inet
add blocked 198.18.0.0/24
add blocked 198.18.0.9 %s
"""

[[packets]]
from = "client"
to = "host"
packet = "UDP()"
expect = "drop"
'''


def test_a_script_takes_sets_and_points_at_their_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from harness.lab.scripts import ScriptError, load_script

    good = tmp_path / "good.toml"
    good.write_text(SCRIPT % "nomatch")
    assert "add blocked 198.18.0.9 nomatch" in load_script(good).sets_text
    bad = tmp_path / "bad.toml"
    bad.write_text(SCRIPT % "timeout 5")
    with pytest.raises(ScriptError, match=r"bad\.toml:10: error: 'timeout' after a member"):
        load_script(bad)
    missing = tmp_path / "missing.toml"
    missing.write_text(
        SCRIPT.replace("create blocked", "create other").replace("add blocked", "add other") % ""
    )
    with pytest.raises(
        ScriptError, match=r"missing\.toml:7: error: set: set 'blocked' does not exist"
    ):
        load_script(missing)


# -- save text and changes in place (bpflab set add|del) -------------------------------------


def test_saved_text_reads_back_as_the_same_sets() -> None:
    from codegen.rules.set_changes import save_text
    from codegen.rules.sets import STANDIN_SETS

    for table in (SETS, STANDIN_SETS):
        text = save_text(table)
        assert parse_sets(text, "again") == table
        assert save_text(parse_sets(text, "again")) == text
    assert "add ip1 198.18.0.3,icmp:echo-request\n" in save_text(SETS)
    assert "add n1 198.18.5.0/24 nomatch\n" in save_text(SETS)


def test_maxelem_is_kept_and_bounds_the_members() -> None:
    text = "create small hash:ip family inet maxelem 2\nadd small 198.18.0.1\n"
    assert parse_sets(text)["small"].maxelem == 2
    assert parse_sets(text)["small"].capacity == 2
    full = r"<sets>:4:11: error: set 'small' is full: its maxelem is 2"
    with pytest.raises(SetError, match=full):
        parse_sets(text + "add small 198.18.0.2\nadd small 198.18.0.3\n")
    with pytest.raises(SetError, match="maxelem of set 'bad' must be"):
        parse_sets("create bad hash:ip maxelem 0\n")
    assert parse_sets("create p bitmap:port range 10-19\n")["p"].capacity == 10


def test_a_change_is_checked_as_ipset_checks_it() -> None:
    from codegen.rules.set_changes import changed

    nets = SETS["n1"]
    grown, went_in, went_out = changed(nets, "198.18.6.0/24 nomatch")
    assert went_out == [] and [(m.prefix, m.nomatch) for m in went_in] == [(24, True)]
    assert len(grown.members) == 3 and len(nets.members) == 2  # a new set; the old one stays
    with pytest.raises(SetError, match="198.18.0.0/16 is already in set 'n1' \\(--exist"):
        changed(nets, "198.18.0.0/16")
    flipped, went_in, went_out = changed(nets, "198.18.5.0/24", exist=True)
    assert [m.nomatch for m in went_out] == [True] and [m.nomatch for m in went_in] == [False]
    assert changed(nets, "198.18.0.0/16", exist=True)[1:] == ([], [])  # the same: no change
    smaller, _, went_out = changed(nets, "198.18.5.0/24", delete=True)
    assert len(smaller.members) == 1 and went_out[0].nomatch
    with pytest.raises(SetError, match="198.18.7.0/24 is not in set 'n1'"):
        changed(nets, "198.18.7.0/24", delete=True)
    assert changed(nets, "198.18.7.0/24", delete=True, exist=True)[0] == nets
    with pytest.raises(SetError, match="'nomatch' after a member to delete"):
        changed(nets, "198.18.5.0/24 nomatch", delete=True)
    with pytest.raises(SetError, match="port 2000 is outside set 'p1''s range 0-1024"):
        changed(SETS["p1"], "2000")
    with pytest.raises(SetError, match="'nomatch' after a member of a hash:ip set"):
        changed(SETS["s1"], "198.18.0.9 nomatch")
    # A range is taken whole or not at all (ipset stops at the first member already there).
    with pytest.raises(SetError, match="198.18.0.1 is already in set 's1'"):
        changed(SETS["s1"], "198.18.0.0-198.18.0.3")
    small = parse_sets("create small hash:ip maxelem 3\nadd small 198.18.0.1\n")["small"]
    with pytest.raises(SetError, match="set 'small' is full: its maxelem is 3"):
        changed(small, "198.18.0.8/30")
    assert len(changed(small, "198.18.0.8/31")[0].members) == 3


def test_the_map_changes_of_a_change() -> None:
    from codegen.rules.set_changes import changed
    from codegen.tc.matches.set import changes, entries

    nets = SETS["n1"]
    flipped, went_in, went_out = changed(nets, "198.18.5.0/24", exist=True)
    written, gone = changes(nets, went_in, went_out)
    assert gone == [] and list(written.values()) == [b"\x01"]  # MEMBER over NOMATCH
    assert entries(flipped) == {**entries(nets), **written}
    _, went_in, went_out = changed(SETS["p1"], "22", delete=True)
    assert changes(SETS["p1"], went_in, went_out) == ({(22).to_bytes(4, "little"): b"\0"}, [])
    smaller, went_in, went_out = changed(SETS["ip1"], "198.18.0.2,udp:53", delete=True)
    written, gone = changes(SETS["ip1"], went_in, went_out)
    assert written == {} and set(entries(SETS["ip1"])) - set(gone) == set(entries(smaller))


# -- hash:net,iface and list:set --------------------------------------------------------------

# As ipset 7.17 saved them on this machine (bucketsize and initval aside).
DEVICE_SETS = """\
create ni hash:net,iface family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xd71604c4
add ni 198.18.0.128/25,eth0 nomatch
add ni 198.18.0.0/24,eth0
add ni 198.18.3.0/24,lo
add ni 198.18.2.0/24,veth wildcard
add ni 198.18.1.1,eth1
add ni 198.18.1.0/24,eth0
create h1 hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x99d8e45e
add h1 198.18.9.9
create l list:set size 8
add l h1
add l ni
create l2 list:set size 4
add l2 ni
add l2 h1 before ni
"""


def test_device_and_list_sets_are_read_and_saved_back() -> None:
    from codegen.rules.set_changes import save_text

    sets = parse_sets(DEVICE_SETS, "devices")
    members = sets["ni"].members
    assert [(m.prefix, m.iface, m.wildcard, m.nomatch) for m in members[:4]] == [
        (25, "eth0", False, True),
        (24, "eth0", False, False),
        (24, "lo", False, False),
        (24, "veth", True, False),
    ]
    assert [t.name for t in sets["l"].listed] == ["h1", "ni"] and sets["l"].size == 8
    assert [t.name for t in sets["l2"].listed] == ["h1", "ni"]  # `before` put it first
    text = save_text(sets)
    assert "add ni 198.18.2.0/24,veth wildcard\n" in text and "create l2 list:set size 4\n" in text
    assert parse_sets(text, "again") == sets


@pytest.mark.parametrize(
    ("address", "device", "answer"),
    [
        ("198.18.0.1", "eth0", True),
        ("198.18.0.129", "eth0", False),  # the nomatch /25 inside
        ("198.18.0.1", "eth1", False),
        ("198.18.2.7", "veth3", True),  # a wildcard member: a prefix of the name
        ("198.18.2.7", "vet", False),
        ("198.18.1.1", "eth1", True),
        # The longest prefix any member holds decides: eth1's /32 hides eth0's /24 (multi).
        ("198.18.1.1", "eth0", False),
        ("198.18.1.2", "eth0", True),
        ("198.18.0.1", "", False),  # no device there (OUTPUT's in-device)
    ],
)
def test_what_a_device_set_answers(address: str, device: str, answer: bool) -> None:
    table = parse_sets(DEVICE_SETS, "devices")["ni"]
    value = int.from_bytes(bytes(int(part) for part in address.split(".")), "big")
    assert table.test(value, None, False, device) is answer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("create n hash:net,iface\nadd n 198.18.0.0/24,physdev:eth0\n", "physdev members"),
        ("create n hash:net,iface\nadd n 198.18.0.0/24\n", "is not NET,DEVICE"),
        ("create n hash:net,iface\nadd n 198.18.0.0/24,abcdefghijklmnop\n", "1-15 characters"),
        ("create n hash:net\nadd n 198.18.0.0/24 wildcard\n", "'wildcard' after a member"),
        ("create l list:set\nadd l nope\n", "set 'nope' is not created before"),
        ("create a list:set\ncreate l list:set\nadd l a\n", "cannot be a member of list:set"),
        ("create h hash:ip\ncreate l list:set\nadd l h\nadd l h\n", "already in list:set"),
        (
            "create h hash:ip\ncreate l list:set size 1\ncreate g hash:ip\nadd l h\nadd l g\n",
            "full",
        ),
        ("create h hash:ip\ncreate l list:set\nadd l h after nope\n", "'nope' is not in list"),
        ("create l list:set size 0\n", "size of set 'l' must be"),
    ],
)
def test_device_and_list_sets_refuse_what_ipset_refuses(text: str, message: str) -> None:
    with pytest.raises(SetError, match=message):
        parse_sets(text, "bad")


def test_a_list_set_matches_through_its_members_in_their_directions() -> None:
    sets = parse_sets(DEVICE_SETS, "devices")
    rules = "*filter\n-A INPUT -m set --match-set l src,src\n-A INPUT -m set --match-set l src\n"
    rules += "COMMIT\n"
    ruleset = parse(rules, "list")
    cases = {
        ("198.18.9.9", "eth5"): {("INPUT", 1), ("INPUT", 2)},  # in h1
        ("198.18.0.1", "eth0"): {("INPUT", 1)},  # in ni: two directions only
        ("198.18.0.1", "eth5"): set(),
    }
    for (source, device), counted in cases.items():
        packet = bytes(IP(src=source, dst="198.18.0.2") / UDP())
        result = evaluate(ruleset, packet, "INPUT", device, None, sets=sets)
        assert set(result.counters) - {("INPUT", "policy")} == counted, (source, device)


def test_a_list_set_is_not_changed_in_place_and_device_keys_follow_their_members() -> None:
    from codegen.rules.set_changes import changed
    from codegen.tc.matches.set import changes, entries

    sets = parse_sets(DEVICE_SETS, "devices")
    with pytest.raises(SetError, match="is a list:set"):
        changed(sets["l"], "h1")
    devices = {"eth0": 2, "veth0": 3, "veth1": 4, "lo": 1}
    table = sets["ni"]
    held = entries(table, None, devices)
    # One longest-prefix entry per network, and one per member and device: the wildcard's
    # under veth0 and veth1; eth1 is not here, its member keeps only its network's entry (which
    # still hides eth0's /24 from 198.18.1.1).
    assert len(held) == 6 + 6
    grown, went_in, went_out = changed(table, "198.18.2.0/24,veth0 nomatch")
    written, gone = changes(table, went_in, went_out, devices)
    assert gone == [] and list(written.values()) == [b"\x02"]  # veth0's key: NOMATCH now
    assert entries(grown, None, devices) == {**held, **written}
    smaller, went_in, went_out = changed(grown, "198.18.2.0/24,veth0", delete=True)
    written, gone = changes(grown, went_in, went_out, devices)
    assert gone == [] and list(written.values()) == [b"\x01"]  # the wildcard's again
