"""The kernel table blob without a kernel: struct layouts against the UAPI headers, the exact
bytes of a small table rebuilt here with `struct`, encode/decode round trips of every match and
target, and a precise BlobError for every malformed blob."""

from __future__ import annotations

import ctypes
import errno
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import (
    Accept,
    Address,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    RuleError,
    Ruleset,
    ipt_blob,
)
from codegen.rules.blob import kernel
from codegen.rules.blob import structs as blob
from codegen.rules.extensions import (
    comment,
    ctinfo,
    icmp,
    iprange,
    length,
    mark,
    multiport,
    pkttype,
    tcp,
    ttl,
    udp,
)
from codegen.rules.extensions.comment import Comment
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.iprange import AddressRange, IpRange
from codegen.rules.extensions.length import Length
from codegen.rules.extensions.mark import Mark
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.pkttype import PktType
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpFlags, TcpMatch
from codegen.rules.extensions.ttl import Ttl
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.ipt_blob import BlobError, decode_entries, decode_table, encode_table

X86_64 = platform.machine() == "x86_64"
HEADER = ctypes.sizeof(blob.IptReplace)

# ---------------------------------------------------------------------------------------------
# Struct layouts


@pytest.mark.skipif(not X86_64, reason="the sizes are those of x86_64")
@pytest.mark.parametrize(
    "struct, size",
    [
        (blob.IptIp, 84),
        (blob.IptEntry, 112),
        (blob.XtEntryMatch, 32),
        (blob.XtStandardTarget, 40),
        (blob.XtErrorTarget, 64),
        (blob.IptGetinfo, 84),
        (blob.IptGetEntries, 40),
        (blob.IptReplace, 96),
        (blob.XtCountersInfo, 40),
        (tcp.XtTcp, 12),
        (udp.XtUdp, 10),
        (icmp.IptIcmp, 4),
        (multiport.XtMultiportV1, 48),
        (iprange.XtIprangeMtinfo, 68),
        (length.XtLengthInfo, 6),
        (ttl.IptTtlInfo, 2),
        (pkttype.XtPkttypeInfo, 8),
        (mark.XtMarkMtinfo1, 12),
        (comment.XtCommentInfo, 256),
        (ctinfo.XtConntrackMtinfo3, 164),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_struct_sizes_on_x86_64(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_derived_sizes() -> None:
    assert blob.XT_ALIGNMENT == (8 if X86_64 else blob.XT_ALIGNMENT)
    assert blob.STANDARD_TARGET_SIZE == blob.xt_align(blob.MATCH_HEADER_SIZE + 4)
    assert blob.CHAIN_START_SIZE == blob.ENTRY_SIZE + blob.ERROR_TARGET_SIZE
    if X86_64:
        assert (blob.CHAIN_START_SIZE, blob.CHAIN_FOOT_SIZE) == (176, 152)


# ctypes struct -> C type in the UAPI headers; every ctypes field is checked by offset.
C_TYPES: list[tuple[type[ctypes.Structure], str]] = [
    (blob.IptIp, "struct ipt_ip"),
    (blob.XtCounters, "struct xt_counters"),
    (blob.IptEntry, "struct ipt_entry"),
    (blob.XtStandardTarget, "struct xt_standard_target"),
    (blob.XtErrorTarget, "struct xt_error_target"),
    (blob.IptGetinfo, "struct ipt_getinfo"),
    (blob.IptGetEntries, "struct ipt_get_entries"),
    (blob.IptReplace, "struct ipt_replace"),
    (blob.XtCountersInfo, "struct xt_counters_info"),
    (tcp.XtTcp, "struct xt_tcp"),
    (udp.XtUdp, "struct xt_udp"),
    (icmp.IptIcmp, "struct ipt_icmp"),
    (multiport.XtMultiportV1, "struct xt_multiport_v1"),
    (iprange.XtIprangeMtinfo, "struct xt_iprange_mtinfo"),
    (length.XtLengthInfo, "struct xt_length_info"),
    (ttl.IptTtlInfo, "struct ipt_ttl_info"),
    (pkttype.XtPkttypeInfo, "struct xt_pkttype_info"),
    (mark.XtMarkMtinfo1, "struct xt_mark_mtinfo1"),
    (comment.XtCommentInfo, "struct xt_comment_info"),
    (ctinfo.XtConntrackMtinfo3, "struct xt_conntrack_mtinfo3"),
]
C_INCLUDES = """
#include <stddef.h>
#include <stdio.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netfilter_ipv4/ipt_ttl.h>
#include <linux/netfilter/xt_comment.h>
#include <linux/netfilter/xt_conntrack.h>
#include <linux/netfilter/xt_iprange.h>
#include <linux/netfilter/xt_length.h>
#include <linux/netfilter/xt_mark.h>
#include <linux/netfilter/xt_multiport.h>
#include <linux/netfilter/xt_pkttype.h>
#include <linux/netfilter/xt_tcpudp.h>
"""


def _layouts_in_c() -> tuple[str, dict[str, int]]:
    """C source printing sizeof and offsetof for C_TYPES, and what ctypes says of the same."""
    lines = [C_INCLUDES, "int main(void) {"]
    expected: dict[str, int] = {}

    def emit(key: str, expression: str, value: int) -> None:
        lines.append(f'    printf("{key} %zu\\n", (size_t)({expression}));')
        expected[key] = value

    for struct_type, c_type in C_TYPES:
        name = struct_type.__name__
        emit(name, f"sizeof({c_type})", ctypes.sizeof(struct_type))
        for field_name, *_ in struct_type._fields_:
            offset = getattr(struct_type, field_name).offset
            emit(f"{name}.{field_name}", f"offsetof({c_type}, {field_name})", offset)
    header = blob.XtEntryMatch
    user = blob._XtEntryUser
    emit("xt_entry_match", "sizeof(struct xt_entry_match)", ctypes.sizeof(header))
    emit("xt_entry_target", "sizeof(struct xt_entry_target)", ctypes.sizeof(blob.XtEntryTarget))
    for field_name, c_name in (("size", "match_size"), ("name", "name"), ("revision", "revision")):
        emit(
            f"xt_entry_match.u.user.{c_name}",
            f"offsetof(struct xt_entry_match, u.user.{c_name})",
            getattr(user, field_name).offset,
        )
    emit("nf_inet_addr", "sizeof(union nf_inet_addr)", ctypes.sizeof(blob.NfInetAddr))
    emit("XT_ALIGN(1)", "XT_ALIGN(1)", blob.xt_align(1))
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n", expected


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to read the headers")
def test_struct_layouts_match_uapi_headers(tmp_path: Path) -> None:
    source, expected = _layouts_in_c()
    (tmp_path / "layout.c").write_text(source)
    compiled = subprocess.run(
        ["cc", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if compiled.returncode != 0 and "No such file" in compiled.stderr:
        pytest.skip(f"kernel UAPI headers missing: {compiled.stderr.strip().splitlines()[0]}")
    assert compiled.returncode == 0, compiled.stderr
    output = subprocess.run(
        [str(tmp_path / "layout")], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    pairs = (line.rsplit(" ", 1) for line in output.splitlines())
    in_c = {key: int(value) for key, value in pairs}
    assert in_c == expected


# ---------------------------------------------------------------------------------------------
# The bytes of a small table, rebuilt with `struct` from the headers and libiptc's
# iptcc_compile_table, independently of the ctypes definitions.

ENTRY = struct.Struct("<4s4s4s4s16s16s16s16sHBBIHHIQQ")
MATCH = struct.Struct("<H29sB")
assert ENTRY.size == 112 and MATCH.size == 32


def entry(
    target: bytes,
    matches: bytes = b"",
    *,
    src: tuple[str, int] = ("0.0.0.0", 0),
    iniface: bytes = b"",
    inmask: int = 0,
    outiface: bytes = b"",
    outmask: int = 0,
    proto: int = 0,
    flags: int = 0,
    invflags: int = 0,
    counters: tuple[int, int] = (0, 0),
) -> bytes:
    address = bytes(int(octet) for octet in src[0].split("."))
    mask = ((0xFFFFFFFF << (32 - src[1])) & 0xFFFFFFFF).to_bytes(4, "big")
    target_offset = 112 + len(matches)
    return (
        ENTRY.pack(
            address, b"", mask, b"", iniface, outiface, b"\xff" * inmask, b"\xff" * outmask,
            proto, flags, invflags,
            0, target_offset, target_offset + len(target), 0, *counters,
        )
        + matches
        + target
    )  # fmt: skip


def standard(verdict: int) -> bytes:
    return MATCH.pack(40, b"", 0) + struct.pack("<i", verdict) + bytes(4)


def error(name: str) -> bytes:
    return MATCH.pack(64, b"ERROR", 0) + name.encode().ljust(30, b"\0") + bytes(2)


def tcp_match(
    sport: tuple[int, int], dport: tuple[int, int], mask: int, compare: int, inv: int
) -> bytes:
    data = struct.pack("<HHHHBBBB", *sport, *dport, 0, mask, compare, inv)
    return MATCH.pack(48, b"tcp", 0) + data.ljust(16, b"\0")


ACCEPT, DROP, RETURN = -2, -1, -5


def small_ruleset() -> Ruleset:
    ruleset = Ruleset()
    ruleset.chains["INPUT"].policy = "DROP"
    ruleset.chains["INPUT"].packets, ruleset.chains["INPUT"].bytes = 5, 500
    ruleset.add_chain("zeta")
    ruleset.add_chain("Alpha")
    ruleset["INPUT"].rules += [
        Rule(
            (
                Address.from_network("src", "198.18.0.0/15"),
                Interface("in", "eth+"),
                Protocol(6),
                TcpMatch(dport=PortRange(22, 22), flags=TcpFlags.syn(negated=True)),
            ),
            Accept(),
            packets=1,
            bytes=60,
        ),
        Rule((), Goto("zeta")),
    ]
    ruleset["FORWARD"].rules.append(Rule((Fragment(),), Jump("Alpha")))
    ruleset["OUTPUT"].rules.append(Rule((Interface("out", "lo", negated=True),)))
    ruleset["Alpha"].rules.append(Rule((), Return()))
    ruleset["zeta"].rules.append(Rule((), Drop()))
    return ruleset


def test_small_table_bytes() -> None:
    tcp = tcp_match((0, 0xFFFF), (22, 22), 0x17, 0x02, 0x04)
    # Offsets: INPUT's tcp rule 0 (112 + 48 + 40 = 200), its goto 200, its policy 352;
    # FORWARD's rule 504, policy 656; OUTPUT's rule 808, policy 960; user chains sorted
    # bytewise: Alpha's ERROR at 1112, its RETURN rule 1288, its RETURN foot 1440; zeta's ERROR
    # at 1592, its DROP 1768, its foot 1920; the final ERROR at 2072. A jump lands after the
    # chain's 176-byte ERROR entry; a rule without a target (OUTPUT's `! -o lo`, whose mask
    # covers "lo" and its NUL) jumps to the entry after it.
    alpha, zeta = 1112 + 176, 1592 + 176
    entries = b"".join(
        [
            entry(standard(ACCEPT), tcp, src=("198.18.0.0", 15), iniface=b"eth+", inmask=3,
                  proto=6, counters=(1, 60)),
            entry(standard(zeta), flags=0x02),
            entry(standard(DROP), counters=(5, 500)),
            entry(standard(alpha), flags=0x01),
            entry(standard(ACCEPT)),
            entry(standard(960), outiface=b"lo", outmask=3, invflags=0x02),
            entry(standard(ACCEPT)),
            entry(error("Alpha")),
            entry(standard(RETURN)),
            entry(standard(RETURN)),
            entry(error("zeta")),
            entry(standard(DROP)),
            entry(standard(RETURN)),
            entry(error("ERROR")),
        ]
    )  # fmt: skip
    header = struct.pack(
        "<32sIII5I5IIQ", b"filter", 0x0E, 14, len(entries),
        0, 0, 504, 808, 0, 0, 352, 656, 960, 0, 0, 0,
    )  # fmt: skip
    assert encode_table(small_ruleset()) == header + entries


def test_empty_table_is_the_kernels_initial_table() -> None:
    # What a fresh namespace's GET_INFO reports: three 152-byte policies and the final ERROR.
    encoded = encode_table(Ruleset())
    header = blob.IptReplace.from_buffer_copy(encoded)
    assert (header.num_entries, header.size) == (4, 632)
    assert list(header.hook_entry)[1:4] == [0, 152, 304]
    assert list(header.underflow)[1:4] == [0, 152, 304]
    assert encoded[HEADER:] == b"".join([entry(standard(ACCEPT))] * 3 + [entry(error("ERROR"))])


# ---------------------------------------------------------------------------------------------
# Round trips of models built in code


def table(*rules: Rule, chain: str = "INPUT", users: tuple[str, ...] = ()) -> Ruleset:
    ruleset = Ruleset()
    for name in users:
        ruleset.add_chain(name)
    ruleset.chains[chain].rules.extend(rules)
    return ruleset


TCP, UDP, ICMP = Protocol(6), Protocol(17), Protocol(1)
ROUND_TRIPS: list[tuple[str, tuple[Match, ...]]] = [
    ("nothing", ()),
    ("source", (Address.from_network("src", "198.18.0.0/15"),)),
    ("destination host", (Address.from_network("dst", "198.18.1.1"),)),
    ("non-prefix mask", (Address("src", 0x0A000000, 0xFF00FF00),)),
    ("negated any", (Address("dst", 0, 0, negated=True),)),
    ("negated both", (Address("src", 1, negated=True), Address("dst", 2, negated=True))),
    ("in interface", (Interface("in", "veth0"),)),
    ("in wildcard", (Interface("in", "eth+"),)),
    ("15-character name", (Interface("in", "abcdefghijklmno"),)),
    ("14-character prefix", (Interface("in", "abcdefghijklmn+"),)),
    ("negated any device", (Interface("in", "+", negated=True),)),
    ("negated out", (Interface("in", "a"), Interface("out", "veth+", negated=True))),
    ("protocol", (Protocol(47),)),
    ("negated protocol", (Protocol(6, negated=True),)),
    ("fragment", (Fragment(),)),
    ("not a fragment", (TCP, Fragment(negated=True))),
    ("tcp default", (TCP, TcpMatch())),
    (
        "tcp everything",
        (
            TCP,
            TcpMatch(PortRange(1000, 2000, True), PortRange(22, 22), TcpFlags(0x3F, 0x12, True)),
        ),
    ),
    ("tcp negated full range", (TCP, TcpMatch(dport=PortRange(0, 0xFFFF, True)))),
    ("tcp none none", (TCP, TcpMatch(flags=TcpFlags(0x3F, 0)))),
    ("udp", (UDP, UdpMatch(PortRange(53, 53), PortRange(1, 1024, True)))),
    ("icmp type", (ICMP, IcmpMatch(8))),
    ("icmp code", (ICMP, IcmpMatch(3, 3, 3, negated=True))),
    ("icmp any", (ICMP, IcmpMatch())),
    ("multiport dst", (TCP, Multiport("dst", ((22, 22), (80, 80), (1000, 2000))))),
    ("multiport src negated", (UDP, Multiport("src", ((53, 53), (67, 68)), negated=True))),
    ("multiport 15 ports", (TCP, Multiport("any", tuple((p, p) for p in range(1, 16))))),
    ("multiport 7 ranges and a port", (Protocol(132), Multiport(
        "any", tuple((p, p + 1) for p in range(10, 24, 2)) + ((99, 99),)))),
    ("iprange src", (IpRange(AddressRange(0xC6120001, 0xC6120009)),)),
    ("iprange dst negated", (IpRange(dst=AddressRange(5, 4, negated=True)),)),
    ("iprange both", (IpRange(AddressRange(1, 2, True), AddressRange(3, 4)),)),
    ("length", (Length(100, 200),)),
    ("length negated", (Length(64, 64, negated=True),)),
    ("ttl eq", (Ttl("eq", 64),)),
    ("ttl ne", (Ttl("eq", 1, negated=True),)),
    ("ttl lt", (Ttl("lt", 5),)),
    ("ttl gt", (Ttl("gt", 200),)),
    ("pkttype", (PktType("broadcast"),)),
    ("pkttype negated", (PktType("otherhost", negated=True),)),
    ("mark", (Mark(1),)),
    ("mark mask negated", (Mark(0x10, 0xF0, negated=True),)),
    ("comment", (Comment("hello \"world\" it's"),)),
    ("comment 255 bytes", (Comment("x" * 255),)),
    ("comment utf-8", (Comment("café ☕"),)),
    ("empty comment", (Comment(""),)),
    ("repeated matches", (TCP, TcpMatch(dport=PortRange(1, 1)), TcpMatch(PortRange(2, 2)),
                          Comment("a"), Comment("b"))),
    (
        "all at once",
        (
            Address.from_network("src", "198.18.0.0/24", negated=True),
            Address.from_network("dst", "198.19.0.0/16"),
            Interface("in", "eth0"),
            Interface("out", "veth+"),
            TCP,
            Fragment(negated=True),
            Comment("x"),
            TcpMatch(dport=PortRange(443, 443)),
            Multiport("dst", ((80, 80),)),
            IpRange(AddressRange(1, 9)),
            Length(0, 1500),
            Ttl("gt", 1),
            PktType("unicast"),
            Mark(7, 0xFF),
        ),
    ),
]  # fmt: skip


@pytest.mark.parametrize("matches", [case[1] for case in ROUND_TRIPS],
                         ids=[case[0] for case in ROUND_TRIPS])  # fmt: skip
def test_every_match_round_trips(matches: tuple[Match, ...]) -> None:
    chain = "FORWARD"  # the only chain that takes both -i and -o
    ruleset = table(Rule(matches, Accept(), 3, 180), Rule(matches, None, 1, 2), chain=chain)
    assert decode_table(encode_table(ruleset)) == ruleset


TARGETS = [Accept(), Drop(), Return(), None, Jump("u"), Goto("u"), Jump("v"), Goto("v")]


@pytest.mark.parametrize("target", TARGETS, ids=repr)
@pytest.mark.parametrize("chain", ["INPUT", "OUTPUT", "w"])
def test_every_target_round_trips(target: object, chain: str) -> None:
    ruleset = table(chain=chain, users=("u", "v", "w"))
    ruleset[chain].rules += [Rule((), target), Rule((TCP,), target)]  # type: ignore[arg-type]
    ruleset["u"].rules.append(Rule((), target if target not in (Jump("u"), Goto("u")) else None))  # type: ignore[arg-type]
    ruleset["INPUT"].rules.append(Rule((), Jump("w")))
    decoded = decode_table(encode_table(ruleset))
    assert decoded == ruleset


def test_policies_counters_and_chain_order_round_trip() -> None:
    ruleset = Ruleset()
    for index, name in enumerate(("INPUT", "FORWARD", "OUTPUT")):
        ruleset[name].policy = "DROP" if index % 2 else "ACCEPT"
        ruleset[name].packets, ruleset[name].bytes = 2**64 - 1 - index, 2**63 + index
    for name in ("zeta", "Beta", "alpha", "_", "a-b"):
        ruleset.add_chain(name)
        ruleset[name].rules.append(Rule((), Return(), 2**64 - 1, 0))
    decoded = decode_table(encode_table(ruleset))
    assert decoded == ruleset
    # libiptc sorts user chains bytewise: upper case before `_` before lower case.
    assert [chain.name for chain in decoded.user_chains] == ["Beta", "_", "a-b", "alpha", "zeta"]


def test_counters_follow_table_order() -> None:
    ruleset = small_ruleset()
    assert ipt_blob.encode_counters(ruleset) == [
        (1, 60), (0, 0), (5, 500),  # INPUT
        (0, 0), (0, 0),  # FORWARD
        (0, 0), (0, 0),  # OUTPUT
        (0, 0), (0, 0), (0, 0),  # Alpha
        (0, 0), (0, 0), (0, 0),  # zeta
        (0, 0),  # final ERROR
    ]  # fmt: skip
    assert (
        len(ipt_blob.encode_counters(ruleset))
        == blob.IptReplace.from_buffer_copy(encode_table(ruleset)).num_entries
    )


def test_decoding_gives_the_parsers_match_order() -> None:
    # The kernel keeps the IP header part apart from the extensions: whatever order the model
    # lists them in, they come back as -s, -d, -i, -o, -p, -f, then the extensions.
    shuffled = (Comment("c"), TCP, Interface("in", "x"), Address("dst", 1),
                TcpMatch(dport=PortRange(1, 1)), Address("src", 2))  # fmt: skip
    decoded = decode_table(encode_table(table(Rule(shuffled, Drop()))))
    assert decoded["INPUT"].rules[0].matches == (
        Address("src", 2), Address("dst", 1), Interface("in", "x"), TCP, Comment("c"),
        TcpMatch(dport=PortRange(1, 1)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Random models

NAMES = ["u", "Beta", "alpha", "chain-1", "x" * 28]


@st.composite
def rules_for(draw: st.DrawFn, chain: str, callees: list[str]) -> Rule:
    matches: list[Match] = []
    for direction in ("src", "dst"):
        if draw(st.booleans()):
            mask = draw(st.integers(1, 2**32 - 1))
            matches.append(Address(direction, draw(st.integers(0, 2**32 - 1)), mask,
                                   draw(st.booleans())))  # type: ignore[arg-type]  # fmt: skip
    for direction, refused in (("in", "OUTPUT"), ("out", "INPUT")):
        if chain != refused and draw(st.booleans()):
            name = draw(st.sampled_from(["eth0", "veth+", "lo", "a" * 15, "b" * 14 + "+", "+"]))
            negated = name == "+" or draw(st.booleans())
            matches.append(Interface(direction, name, negated))  # type: ignore[arg-type]
    protocol = draw(st.sampled_from([None, 1, 6, 17, 47, 132]))
    if protocol is not None:
        matches.append(Protocol(protocol, draw(st.booleans()) if protocol == 47 else False))
    if draw(st.booleans()):
        matches.append(Fragment(draw(st.booleans())))
    ports = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(sorted)
    port_range = st.builds(lambda p, n: PortRange(p[0], p[1], n), ports, st.booleans())
    side = st.builds(AddressRange, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                     st.booleans())  # fmt: skip
    extensions = [
        st.builds(IpRange, side, st.none() | side),
        st.builds(IpRange, st.none(), side),
        st.builds(Length, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.booleans()),
        st.builds(Ttl, st.sampled_from(["lt", "gt"]), st.integers(0, 255)),
        st.builds(Ttl, st.just("eq"), st.integers(0, 255), st.booleans()),
        st.builds(PktType, st.sampled_from(["unicast", "broadcast", "multicast", "otherhost"]),
                  st.booleans()),
        st.builds(Mark, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans()),
        st.builds(Comment, st.text(st.characters(blacklist_categories=("Cs",),
                                                 blacklist_characters="\n\0"), max_size=60)),
    ]  # fmt: skip
    if protocol == 6:
        flags = st.builds(TcpFlags, st.integers(0, 0x3F), st.integers(0, 0x3F), st.booleans())
        extensions.append(st.builds(TcpMatch, port_range, port_range, flags))
    if protocol == 17:
        extensions.append(st.builds(UdpMatch, port_range, port_range))
    if protocol == 1:
        types, codes = st.integers(0, 255), st.integers(0, 255)
        extensions.append(st.builds(lambda t, n: IcmpMatch(t, 0, 0xFF, n), types, st.booleans()))
        extensions.append(
            st.builds(lambda t, c, n: IcmpMatch(t, c, c, n), types, codes, st.booleans())
        )
    if protocol in (6, 17, 132):
        single = st.integers(0, 0xFFFF).map(lambda p: (p, p))
        pair = st.tuples(st.integers(0, 0xFFFE), st.integers(1, 0xFFFF)).filter(
            lambda p: p[0] < p[1]
        )
        extensions.append(
            st.builds(
                Multiport,
                st.sampled_from(["src", "dst", "any"]),
                st.lists(st.one_of(single, pair), min_size=1, max_size=7).map(tuple),
                st.booleans(),
            )  # fmt: skip
        )
    matches += draw(st.lists(st.one_of(extensions), max_size=4))
    choices = [Accept(), Drop(), Return(), None]
    choices += [Jump(name) for name in callees] + [Goto(name) for name in callees]
    target = draw(st.sampled_from(choices))
    counters = st.integers(0, 2**64 - 1)
    return Rule(tuple(matches), target, draw(counters), draw(counters))


@st.composite
def rulesets(draw: st.DrawFn) -> Ruleset:
    ruleset = Ruleset()
    users = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    for name in users:
        ruleset.add_chain(name)
    for chain in ruleset.chains.values():
        if chain.builtin:
            chain.policy = draw(st.sampled_from(["ACCEPT", "DROP"]))
            chain.packets = draw(st.integers(0, 2**64 - 1))
            chain.bytes = draw(st.integers(0, 2**64 - 1))
            callees = users
        else:
            # Jumps only to later chains: no loops, which validate would refuse.
            callees = users[users.index(chain.name) + 1 :]
        chain.rules = draw(st.lists(rules_for(chain.name, callees), max_size=4))
    return ruleset


@settings(max_examples=100, deadline=None)
@given(rulesets())
def test_random_models_round_trip(ruleset: Ruleset) -> None:
    assert decode_table(encode_table(ruleset)) == ruleset


# ---------------------------------------------------------------------------------------------
# Encoding refusals


def test_encoding_validates_the_model() -> None:
    with pytest.raises(RuleError, match="unknown chain 'nowhere'"):
        encode_table(table(Rule((), Jump("nowhere"))))
    with pytest.raises(RuleError, match="tcp match needs '-p tcp'"):
        encode_table(table(Rule((TcpMatch(),), Accept())))


def test_encoding_refuses_names_longer_than_the_kernels_fields() -> None:
    # 15 characters pass the model's check but take 30 bytes in UTF-8.
    with pytest.raises(BlobError, match="interface name 'ééééééééééééééé' does not fit"):
        encode_table(table(Rule((Interface("in", "é" * 15),), Accept())))
    with pytest.raises(BlobError, match="chain name .* does not fit the kernel's 30-byte field"):
        encode_table(table(users=("é" * 20,)))


# ---------------------------------------------------------------------------------------------
# Decoding refusals: each a blob patched in one place, and the sentence that names it.


def patched(ruleset: Ruleset, offset: int, data: bytes) -> bytes:
    """The encoded `ruleset` with `data` written at `offset` into its entries."""
    encoded = bytearray(encode_table(ruleset))
    encoded[HEADER + offset : HEADER + offset + len(data)] = data
    return bytes(encoded)


def one_rule(*matches: Match, target: object = None) -> Ruleset:
    return table(Rule(matches, target if target is not None else Accept()), users=("u",))  # type: ignore[arg-type]


RULE_TARGET = 112  # where a rule without matches has its target
MATCH_NAME = 112 + 2  # the first match's name
DECODE_ERRORS = [
    (
        "unknown match",
        patched(one_rule(Length(1, 2)), MATCH_NAME, b"string\0"),
        "filter table entry at offset 0: chain INPUT rule 1: match 'string' is not supported"
        " (supported: tcp (revision 0), udp (revision 0), icmp (revision 0),",
    ),
    (
        "old revision",
        patched(one_rule(TCP, Multiport("dst", ((1, 1),))), MATCH_NAME + 29, b"\x00"),
        "match 'multiport' revision 0 is not supported"
        " (only revision 1, the one iptables-legacy uses)",
    ),
    (
        "match size",
        patched(one_rule(Comment("x")), MATCH_NAME, b"tcp\0"),
        "match 'tcp' has 256 bytes of data, expected 16",
    ),
    (
        "unknown target",
        patched(one_rule(), RULE_TARGET + 2, b"TCPMSS\0"),
        "chain INPUT rule 1: target 'TCPMSS' is not supported (supported: ACCEPT, DROP, RETURN,"
        " REJECT (revision 0), LOG (revision 0), NFLOG (revision 0), MARK (revision 2),"
        " CONNMARK (revision 2), jumps and gotos to user chains)",
    ),
    (
        "extension target payload",  # ACCEPT's verdict, -2, read as a reject type
        patched(one_rule(), RULE_TARGET + 2, b"REJECT\0"),
        "chain INPUT rule 1: REJECT target: --reject-with value 4294967294 is not a reject type",
    ),
    (
        "queue",
        patched(one_rule(), RULE_TARGET + 32, struct.pack("<i", -4)),
        "chain INPUT rule 1: QUEUE is not supported",
    ),
    (
        "jump into a chain's middle",
        patched(one_rule(), RULE_TARGET + 32, struct.pack("<i", 152 + 152 + 152 + 152 + 8)),
        "jumps to offset 616, which is not the start of a user chain",
    ),
    (
        "goto a verdict",
        patched(one_rule(), 82, b"\x02"),  # ipt_ip.flags
        "goto flag on a Accept verdict",
    ),
    (
        "tcp option",
        patched(one_rule(TCP, TcpMatch()), 112 + 32 + 8, b"\x02"),
        "tcp match: --tcp-option is not supported",
    ),
    (
        "ttl mode",
        patched(one_rule(Ttl("eq", 1)), 112 + 32, b"\x09"),
        "ttl match: unknown mode 9",
    ),
    (
        "pkttype",
        patched(one_rule(PktType("unicast")), 112 + 32, struct.pack("<i", 4)),
        "pkttype match: packet type 4 is not one of unicast, broadcast, multicast, otherhost",
    ),
    (
        "tos",
        patched(one_rule(), 83, b"\x04"),  # ipt_ip.invflags
        "the TOS inversion flag is set",
    ),
    (
        "policy with a match",
        patched(one_rule(), 152 + 80, b"\x06"),  # ipt_ip.proto of INPUT's policy entry
        "the policy entry of INPUT is not an unconditional ACCEPT or DROP",
    ),
    (
        "policy RETURN",
        patched(one_rule(), 152 + 112 + 32, struct.pack("<i", RETURN)),
        "the policy entry of INPUT is not an unconditional ACCEPT or DROP",
    ),
    (
        "user chain without RETURN",
        # u's foot (after INPUT's rule and policy, FORWARD's and OUTPUT's policies and u's
        # ERROR entry) made DROP.
        patched(one_rule(), 4 * 152 + 176 + 112 + 32, struct.pack("<i", DROP)),
        "user chain u does not end with an unconditional RETURN",
    ),
    (
        "bad next_offset",
        patched(one_rule(), 90, struct.pack("<H", 150)),
        "filter table entry at offset 0: bad next_offset 150",
    ),
    (
        "bad target_offset",
        patched(one_rule(), 88, struct.pack("<H", 100)),
        "bad target_offset 100 for next_offset 152",
    ),
    (
        "no final ERROR",
        patched(one_rule(), 4 * 152 + 176 + 152 + 112 + 2, b"XRROR"),
        "the table does not end with the ERROR entry",
    ),
    (
        "duplicate chain",
        patched(table(users=("a", "b")), 3 * 152 + 176 + 152 + 112 + 32, b"a\0"),
        "chain name 'a' appears twice",
    ),
]  # fmt: skip


@pytest.mark.parametrize("encoded, message", [case[1:] for case in DECODE_ERRORS],
                         ids=[case[0] for case in DECODE_ERRORS])  # fmt: skip
def test_decode_errors(encoded: bytes, message: str) -> None:
    with pytest.raises(BlobError) as caught:
        decode_table(encoded)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_decode_header_errors() -> None:
    encoded = encode_table(Ruleset())
    with pytest.raises(BlobError, match="at least 96 bytes, got 10"):
        decode_table(encoded[:10])
    with pytest.raises(BlobError, match="says 632 bytes of entries, got 631"):
        decode_table(encoded[:-1])
    entries = encoded[HEADER:]
    with pytest.raises(BlobError, match=r"valid hooks 0x1f are not the filter table's 0xe"):
        decode_entries(entries, (0, 0, 152, 304, 0), (0, 0, 152, 304, 0), 0x1F)
    with pytest.raises(BlobError, match="the table says 5 entries but holds 4"):
        decode_entries(entries, (0, 0, 152, 304, 0), (0, 0, 152, 304, 0), 0x0E, 5)
    with pytest.raises(BlobError, match="the entry or policy offset of FORWARD is not an entry"):
        decode_entries(entries, (0, 0, 150, 304, 0), (0, 0, 152, 304, 0))
    with pytest.raises(BlobError, match="chain FORWARD runs into the start of OUTPUT"):
        decode_entries(entries, (0, 0, 152, 304, 0), (0, 0, 304, 304, 0))


def test_every_truncation_is_a_blob_error() -> None:
    ruleset = small_ruleset()
    ruleset["OUTPUT"].rules.append(Rule((TCP, Multiport("dst", ((1, 2),)), Comment("x")), None))
    encoded = encode_table(ruleset)
    header = blob.IptReplace.from_buffer_copy(encoded)
    entries = encoded[HEADER:]
    for cut in range(len(entries)):
        with pytest.raises(BlobError):
            decode_entries(entries[:cut], tuple(header.hook_entry), tuple(header.underflow))


def test_every_corrupted_byte_decodes_or_is_a_blob_error() -> None:
    # Flipping any single byte must never crash the decoder with another exception.
    encoded = encode_table(small_ruleset())
    for index in range(HEADER, len(encoded)):
        corrupted = bytearray(encoded)
        corrupted[index] ^= 0xFF
        try:
            decode_table(bytes(corrupted))
        except BlobError:
            pass


# ---------------------------------------------------------------------------------------------
# Kernel errors as sentences


@pytest.mark.parametrize(
    "number, message",
    [
        (errno.EPERM, "reading the filter table needs root (CAP_NET_ADMIN)"),
        (errno.EACCES, "reading the filter table needs root (CAP_NET_ADMIN)"),
        (errno.ENOPROTOOPT, "this kernel has no legacy iptables (load the ip_tables module)"),
        (errno.ENOENT, "running `iptables-legacy -L -n` in the namespace loads iptable_filter"),
        (errno.ELOOP, "the kernel found a loop among the chains (ELOOP)"),
        (errno.EINVAL, "the kernel refused the table as malformed (EINVAL)"),
        (errno.EBUSY, "reading the filter table failed: Device or resource busy (EBUSY)"),
    ],
)
def test_kernel_errors(number: int, message: str) -> None:
    text = str(kernel.kernel_error("reading the filter table", number))
    assert message in text
    assert "\n" not in text
