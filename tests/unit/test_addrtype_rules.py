"""`-m addrtype` in the rule layer and the reference evaluator: what iptables-legacy 1.8.9
reads, saves, lists and refuses (the expected texts are its own, taken in a namespace), the
blob payload, and inet_dev_addr_type over a route table (codegen.rules.routes)."""

from __future__ import annotations

import pytest

from codegen.rules import RuleError, evaluate, parse, write
from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions.addrtype import EXTENSION, AddressTypes, AddrType, XtAddrtypeInfoV1
from codegen.rules.ipt_blob import decode_table, encode_table
from codegen.rules.routes import RTN, STANDIN_ROUTES, Route, RouteTable
from codegen.rules.validation import hooks_reaching, validate
from codegen.tc.generator import compile_program
from codegen.tc.matches.addrtype import ADDRESS_TYPES, KEY, VALUE, entries


def _rule(chain: str, options: str) -> str:
    return f"*filter\n-A {chain} {options}\nCOMMIT\n"


def _saved(chain: str, options: str) -> str:
    return write(parse(_rule(chain, options), "t")).splitlines()[4]


# (chain, options as given, the rule as iptables-legacy-save prints it)
SAVED = [
    ("INPUT", "-m addrtype --src-type loc", "-A INPUT -m addrtype --src-type LOCAL"),
    ("INPUT", "-m addrtype --src-type u", "-A INPUT -m addrtype --src-type UNSPEC"),
    ("INPUT", "-m addrtype --src-type uni", "-A INPUT -m addrtype --src-type UNICAST"),
    ("INPUT", "-m addrtype --dst-type local,local", "-A INPUT -m addrtype --dst-type LOCAL"),
    (
        "INPUT",
        "-m addrtype ! --src-type local,BROADCAST,unicast ! --dst-type MULTICAST,xresolve,nat,"
        "throw,prohibit,unreachable,blackhole,anycast,unspec",
        "-A INPUT -m addrtype ! --src-type UNICAST,LOCAL,BROADCAST ! --dst-type UNSPEC,ANYCAST,"
        "MULTICAST,BLACKHOLE,UNREACHABLE,PROHIBIT,THROW,NAT,XRESOLVE",
    ),
    (
        "INPUT",
        "-m addrtype --dst-type LOCAL --limit-iface-in",
        "-A INPUT -m addrtype --dst-type LOCAL --limit-iface-in",
    ),
    (
        "OUTPUT",
        "-m addrtype --limit-iface-out --dst-type LOCAL",
        "-A OUTPUT -m addrtype --dst-type LOCAL --limit-iface-out",
    ),
    (
        "FORWARD",
        "-m addrtype --dst-type BROADCAST --src-type LOCAL",
        "-A FORWARD -m addrtype --src-type LOCAL --dst-type BROADCAST",
    ),
]


@pytest.mark.parametrize(("chain", "options", "expected"), SAVED)
def test_saves_as_iptables_does(chain: str, options: str, expected: str) -> None:
    assert _saved(chain, options) == expected
    # and the saved text reads back to the same model
    again = expected.removeprefix(f"-A {chain} ")
    assert _saved(chain, again) == expected


# (options, what `iptables-legacy -L -n` prints after the addresses)
LISTED = [
    ("-m addrtype --src-type LOCAL", " ADDRTYPE match src-type LOCAL"),
    (
        "-m addrtype ! --src-type LOCAL,BROADCAST ! --dst-type UNSPEC,XRESOLVE",
        " ADDRTYPE match src-type !LOCAL,BROADCAST dst-type !UNSPEC,XRESOLVE",
    ),
    ("-m addrtype --dst-type LOCAL --limit-iface-in", " ADDRTYPE match dst-type LOCAL limit-in"),
    ("-m addrtype --dst-type LOCAL --limit-iface-out", " ADDRTYPE match dst-type LOCAL limit-out"),
]


@pytest.mark.parametrize(("options", "listed"), LISTED)
def test_describes_as_iptables_lists(options: str, listed: str) -> None:
    chain = "OUTPUT" if "iface-out" in options else "INPUT"
    (match,) = parse(_rule(chain, options), "t")[chain].rules[0].matches
    assert EXTENSION.describe(match) == listed


# (chain, options, error substring, column) for what iptables refuses
REFUSED = [
    ("INPUT", "-m addrtype", "--src-type or --dst-type must be specified", 10),
    ("INPUT", "-m addrtype --limit-iface-in", "--src-type or --dst-type must be specified", 10),
    ("INPUT", "-m addrtype --src-type wrong", "bad type 'wrong'", 33),
    ("INPUT", "-m addrtype --src-type LOCALX", "bad type 'LOCALX'", 33),
    ("INPUT", "-m addrtype --src-type LOCAL,", "bad type 'LOCAL,'", 33),
    ("INPUT", "-m addrtype --src-type LOCAL,,BROADCAST", "bad type", 33),
    ("INPUT", "-m addrtype --src-type ''", "bad type", 33),
    ("INPUT", "-m addrtype --src-type LOCAL --src-type LOCAL", "can only be used once", 39),
    (
        "FORWARD",
        "-m addrtype --src-type LOCAL --limit-iface-in --limit-iface-out",
        "cannot be used together",
        58,
    ),
    (
        "FORWARD",
        "-m addrtype --src-type LOCAL --limit-iface-in --limit-iface-in",
        "can only be used once",
        58,
    ),
    ("OUTPUT", "-m addrtype --dst-type LOCAL --limit-iface-in", "not valid in OUTPUT", 11),
    ("INPUT", "-m addrtype --dst-type LOCAL --limit-iface-out", "not valid in INPUT", 10),
    ("INPUT", "-m addrtype --limit-iface-in=x --src-type LOCAL", "", 0),
]


@pytest.mark.parametrize(("chain", "options", "message", "column"), REFUSED)
def test_refuses_what_iptables_refuses(chain: str, options: str, message: str, column: int):
    with pytest.raises(RuleError) as caught:
        validate(parse(_rule(chain, options), "t"))
    assert message in str(caught.value)
    if column:
        assert f"t:2:{column}:" in str(caught.value)


USER_CHAINS = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:in_only - [0:0]
:via - [0:0]
:nowhere - [0:0]
-A INPUT -j via
-A FORWARD -g in_only
-A via -j in_only
-A in_only -m addrtype --dst-type LOCAL --limit-iface-in
-A nowhere -m addrtype --dst-type LOCAL --limit-iface-in
-A nowhere -m addrtype --dst-type LOCAL --limit-iface-out
{extra}COMMIT
"""


def test_a_user_chain_takes_the_hooks_that_reach_it() -> None:
    ruleset = parse(USER_CHAINS.format(extra=""), "t")
    validate(ruleset)  # in_only is reached from INPUT and FORWARD; nowhere from none
    assert hooks_reaching(ruleset, "in_only") == {"INPUT", "FORWARD"}
    assert hooks_reaching(ruleset, "nowhere") == frozenset()
    # OUTPUT reaching in_only through via makes its --limit-iface-in invalid, as the kernel's
    # checkentry finds by the hook mask
    ruleset = parse(USER_CHAINS.format(extra="-A OUTPUT -j via\n"), "t")
    with pytest.raises(RuleError) as caught:
        validate(ruleset)
    assert "t:11:1:" in str(caught.value)
    assert "--limit-iface-in is not valid in OUTPUT (chain in_only is reached from OUTPUT)" in (
        str(caught.value)
    )


@pytest.mark.parametrize("example", EXTENSION.examples)
def test_blob_round_trip(example: str) -> None:
    ruleset = parse(_rule("INPUT", example), "t")
    (match,) = ruleset["INPUT"].rules[0].matches
    data = EXTENSION.encode(match)
    assert bytes(data) == bytes(XtAddrtypeInfoV1.from_buffer_copy(bytes(data)))
    assert EXTENSION.decode(data) == match
    assert decode_table(encode_table(ruleset)) == ruleset


def test_blob_payload_is_the_kernels_struct() -> None:
    match = AddrType(AddressTypes(0b100, True), AddressTypes(0b1000), "out")
    data = EXTENSION.encode(match)
    assert (data.source, data.dest, data.flags) == (4, 8, 1 | 8)
    assert len(bytes(data)) == 8


@pytest.mark.parametrize(
    ("source", "dest", "flags", "error"),
    [
        (0, 0, 0, "neither"),
        (4, 0, 4 | 8, "both"),
        (1 << 12, 0, 0, "past XRESOLVE"),
        (4, 0, 16, "unknown flags"),
    ],
)
def test_blob_refusals(source: int, dest: int, flags: int, error: str) -> None:
    with pytest.raises(BlobError, match=error):
        EXTENSION.decode(XtAddrtypeInfoV1(source, dest, flags))


L, B, U, M, A = RTN["LOCAL"], RTN["BROADCAST"], RTN["UNICAST"], RTN["MULTICAST"], RTN["ANYCAST"]
# (address, device to limit to, type) over the stand-in routes
TYPES = [
    ("0.0.0.0", None, B),
    ("0.255.1.2", None, B),  # zeronet
    ("255.255.255.255", None, B),
    ("224.0.0.1", None, M),
    ("239.255.255.255", "eth1", M),  # decided before any route, device or not
    ("198.18.0.2", None, L),
    ("198.18.0.2", "eth0", L),
    ("198.18.0.2", "eth1", U),  # the local route is eth0's
    ("198.18.0.255", None, B),
    ("198.18.0.255", "eth1", U),
    ("198.18.1.254", None, L),
    ("198.18.0.1", None, U),
    ("10.9.9.9", None, U),  # the default route
    ("127.0.0.1", None, L),
    ("127.9.9.9", "lo", L),  # the /8 local route
    ("198.19.17.5", None, L),
    ("198.19.17.5", "eth0", U),
    ("198.19.17.200", None, U),  # a blackhole /25 inside the local /24: the lookup fails
    ("198.19.10.1", None, U),  # blackhole
    ("198.19.11.1", None, U),  # unreachable
    ("198.19.12.1", None, U),  # prohibit
    ("198.19.13.1", None, U),  # throw
    ("198.19.14.1", None, A),
]


@pytest.mark.parametrize(("address", "device", "expected"), TYPES)
def test_address_types_of_the_standin_routes(address: str, device: str | None, expected: int):
    value = int.from_bytes(bytes(int(part) for part in address.split(".")), "big")
    assert STANDIN_ROUTES.address_type(value, device) == expected


def test_no_routes_is_unicast_and_the_longest_prefix_wins() -> None:
    assert RouteTable().address_type(0x0A000001) == U
    table = RouteTable(
        (Route(0x0A000000, 8, L, "eth0"), Route(0x0A010000, 16, B, "eth0"), Route(0, 0, A, "x"))
    )
    assert table.address_type(0x0A010203) == B
    assert table.address_type(0x0A020203) == L
    assert table.address_type(0x0B000001) == A
    # one entry per prefix in the trie: the first route's
    twice = RouteTable((Route(0x0A000000, 8, L, "eth0"), Route(0x0A000000, 8, U, "eth1")))
    assert twice.address_type(0x0A000001) == L
    assert twice.entries() == {(8, 0x0A000000): (L, "eth0")}


def test_route_model_refuses_bad_routes() -> None:
    with pytest.raises(ValueError, match="bits past"):
        Route(0x0A000001, 8, L)
    with pytest.raises(ValueError, match="prefix length"):
        Route(0, 33, L)
    with pytest.raises(ValueError, match="route type"):
        Route(0, 0, 12)


def test_trie_entries_hold_failing_routes_as_unicast() -> None:
    found = entries(STANDIN_ROUTES, {"eth0": 7, "lo": 1})
    blackhole = KEY.pack(24, bytes([198, 19, 10, 0]))
    assert VALUE.unpack(found[blackhole]) == (U, 0)
    local = KEY.pack(32, bytes([198, 18, 0, 2]))
    assert VALUE.unpack(found[local]) == (L, 7)
    eth1 = KEY.pack(32, bytes([198, 18, 1, 254]))
    assert VALUE.unpack(found[eth1]) == (L, 0)  # a device the program does not know


def _packet(source: str, destination: str) -> bytes:
    def octets(text: str) -> bytes:
        return bytes(int(part) for part in text.split("."))

    return bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]) + octets(source) + octets(destination)


RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT DROP [0:0]
-A INPUT -m addrtype --src-type BROADCAST -j DROP
-A INPUT -m addrtype --dst-type LOCAL --limit-iface-in -j ACCEPT
-A INPUT -m addrtype ! --dst-type LOCAL,BROADCAST,MULTICAST -j DROP
-A INPUT -m addrtype --src-type UNICAST --dst-type BROADCAST,MULTICAST -j ACCEPT
-A FORWARD -m addrtype --dst-type LOCAL --limit-iface-out -j DROP
-A FORWARD -m addrtype ! --src-type UNICAST -j DROP
-A FORWARD -j ACCEPT
-A OUTPUT -m addrtype --src-type LOCAL --limit-iface-out -j ACCEPT
COMMIT
"""


# (chain, in, out, source, destination, deciding rule)
DECISIONS = [
    ("INPUT", "eth0", None, "0.0.0.0", "255.255.255.255", ("INPUT", 1)),
    ("INPUT", "eth0", None, "198.18.0.1", "198.18.0.2", ("INPUT", 2)),
    # rule 2 is limited to eth1, where the address is UNICAST; rule 3 is not: LOCAL
    ("INPUT", "eth1", None, "198.18.0.1", "198.18.0.2", ("INPUT", "policy")),
    ("INPUT", "eth0", None, "198.18.0.1", "198.18.1.9", ("INPUT", 3)),
    ("INPUT", "eth1", None, "198.18.0.1", "198.18.1.254", ("INPUT", 2)),
    ("INPUT", "eth0", None, "198.18.0.1", "198.18.0.255", ("INPUT", 4)),
    ("INPUT", "eth0", None, "198.19.10.5", "224.0.0.5", ("INPUT", 4)),  # blackhole: UNICAST
    ("INPUT", "eth0", None, "224.0.0.9", "224.0.0.5", ("INPUT", "policy")),
    ("FORWARD", "eth0", "lo", "198.18.0.1", "198.19.17.5", ("FORWARD", 1)),
    ("FORWARD", "eth0", "eth1", "198.18.0.1", "198.19.17.5", ("FORWARD", 3)),
    ("FORWARD", "eth0", "eth1", "198.19.14.1", "198.18.1.1", ("FORWARD", 2)),  # anycast
    ("OUTPUT", None, "eth0", "198.18.0.2", "198.18.0.1", ("OUTPUT", 1)),
    ("OUTPUT", None, "eth1", "198.18.0.2", "198.18.0.1", ("OUTPUT", "policy")),
]


@pytest.mark.parametrize(("chain", "inside", "outside", "source", "destination", "rule"), DECISIONS)
def test_reference_decisions(chain, inside, outside, source, destination, rule) -> None:  # type: ignore[no-untyped-def]
    ruleset = parse(RULES, "t")
    validate(ruleset)
    result = evaluate(ruleset, _packet(source, destination), chain, inside, outside)
    assert result.deciding == rule


def test_reference_takes_the_routes_given() -> None:
    ruleset = parse(_rule("INPUT", "-m addrtype --dst-type LOCAL -j DROP"), "t")
    packet = _packet("198.18.0.1", "10.1.2.3")
    assert evaluate(ruleset, packet, "INPUT", "eth0", None).verdict == "ACCEPT"
    routes = RouteTable((Route(0x0A010200, 24, L, "eth0"),))
    assert evaluate(ruleset, packet, "INPUT", "eth0", None, routes=routes).verdict == "DROP"


def test_the_bytecode_program_asks_for_the_trie_only_when_it_needs_it() -> None:
    with_it = parse(_rule("INPUT", "-m addrtype --dst-type LOCAL"), "t")
    without = parse(_rule("INPUT", "-m pkttype --pkt-type broadcast"), "t")
    assert ADDRESS_TYPES in compile_program(with_it, "chain", interfaces={}, chain="INPUT").maps
    assert ADDRESS_TYPES in compile_program(with_it, "ingress", interfaces={}).maps
    assert ADDRESS_TYPES not in compile_program(without, "ingress", interfaces={}).maps


def test_the_c_unit_declares_the_trie_only_when_it_needs_it() -> None:
    from codegen.c import c_source

    with_it = parse(_rule("INPUT", "-m addrtype --dst-type LOCAL --limit-iface-in"), "t")
    without = parse(_rule("INPUT", "-m pkttype --pkt-type broadcast"), "t")
    source = c_source(with_it, "ingress", interfaces={})
    assert 'BPF_TABLE_PINNED("lpm_trie"' in source and "address_type(f->dst_address_type" in source
    assert ADDRESS_TYPES not in c_source(without, "ingress", interfaces={})


def test_merged_tables_are_told_by_fib_trie() -> None:
    from harness.deploy.routes import tables_merged

    trie = "  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
    assert tables_merged(f"Main:\n{trie}Local:\n{trie}")
    assert not tables_merged(f"Main:\n  +-- 10.0.0.0/8\nLocal:\n{trie}")
