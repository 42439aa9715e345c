"""`-m addrtype` in the bytecode programs under BPF_PROG_TEST_RUN against the reference
evaluator, both over the same route table (the stand-in one, or one a test gives): every type
on either side, negations, both limits, in the entry function, a user chain's function and a
chunk function, by the bytecode and the C backend; and random route tables and matches
(hypothesis, bytecode)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen.rules import evaluate, parse
from codegen.rules.extensions.addrtype import AddressTypes, AddrType
from codegen.rules.model import Accept, Chain, Drop, Jump, Rule, Ruleset
from codegen.rules.routes import ROUTE_TYPES, RTN, STANDIN_ROUTES, Route, RouteTable
from codegen.rules.validation import validate
from codegen.tc.chains import CHUNK_RULES
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged
# The C backend's programs (bcc) over the same trie: a second opinion on every table case.
BACKENDS = [
    pytest.param("bytecode"),
    pytest.param("c", marks=pytest.mark.bcc),
]

# Addresses of every kind the stand-in routes tell apart.
ADDRESSES = (
    "0.0.0.0",
    "0.9.9.9",
    "255.255.255.255",
    "224.0.0.1",
    "239.1.2.3",
    "127.0.0.1",
    "127.3.3.3",
    "198.18.0.1",
    "198.18.0.2",
    "198.18.0.255",
    "198.18.1.254",
    "198.18.1.255",
    "198.19.10.1",
    "198.19.11.1",
    "198.19.12.1",
    "198.19.13.1",
    "198.19.14.1",
    "198.19.17.5",
    "198.19.17.200",
    "10.0.0.1",
)
# (chain, in, out) the packets go through: each chain's devices, and a device no route uses
PLACES = (
    ("INPUT", "eth0", None),
    ("INPUT", "eth1", None),
    ("INPUT", "lo", None),
    ("FORWARD", "eth0", "eth1"),
    ("FORWARD", "eth1", "lo"),
    ("FORWARD", "eth2", "eth0"),
    ("OUTPUT", None, "eth0"),
    ("OUTPUT", None, "lo"),
)


def _rules() -> str:
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT DROP [0:0]"]
    lines.append(":both - [0:0]")
    for name in ROUTE_TYPES:
        for chain in ("INPUT", "FORWARD", "OUTPUT"):
            lines.append(f"-A {chain} -m addrtype --src-type {name}")
            lines.append(f"-A {chain} -m addrtype ! --dst-type {name}")
        lines.append(f"-A INPUT -m addrtype --dst-type {name} --limit-iface-in")
        lines.append(f"-A OUTPUT -m addrtype ! --src-type {name} --limit-iface-out")
        lines.append(f"-A FORWARD -m addrtype --src-type {name} --limit-iface-out")
        lines.append(f"-A FORWARD -m addrtype ! --dst-type {name} --limit-iface-in")
    lines += [
        "-A INPUT -m addrtype --src-type UNICAST --dst-type LOCAL,BROADCAST -j both",
        "-A FORWARD -j both",
        "-A OUTPUT -j both",
        "-A both -m addrtype --src-type LOCAL,MULTICAST ! --dst-type UNICAST -j DROP",
        "-A both -m addrtype --src-type UNICAST --dst-type LOCAL -j ACCEPT",
        "-A both -m addrtype ! --src-type BROADCAST --dst-type ANYCAST,BROADCAST -j ACCEPT",
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


def _packet(source: str, destination: str) -> bytes:
    header = bytes([0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0])
    body = bytes([0x30, 0x39, 0, 53, 0, 8, 0, 0])
    return header + IPv4Address(source).packed + IPv4Address(destination).packed + body


def _compare(ruleset: Ruleset, runner: ChainRunner, routes: RouteTable | None, cases) -> list:  # type: ignore[no-untyped-def]
    differences = []
    for chain, inside, outside, source, destination in cases:
        packet = _packet(source, destination)
        ours = runner.run(frame_for(packet), chain, inside, outside)
        expected = evaluate(ruleset, packet, chain, inside, outside, routes=routes)
        said = (ours.verdict, ours.deciding, ours.counters)
        if said != (expected.verdict, expected.deciding, expected.counters):
            differences.append(
                f"{chain} {inside}->{outside} {source}->{destination}: program {said[:2]}, "
                f"reference {expected.verdict} {expected.deciding}"
            )
    return differences


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_type_negation_and_limit_against_the_reference(backend: str) -> None:
    ruleset = parse(_rules(), "addrtype")
    validate(ruleset)
    cases = [
        (chain, inside, outside, source, destination)
        for chain, inside, outside in PLACES
        for source in ADDRESSES
        for destination in ADDRESSES
    ]
    with ChainRunner(ruleset, backend=backend) as runner:  # type: ignore[arg-type]
        differences = _compare(ruleset, runner, None, cases)
    assert not differences, "\n".join(differences[:20])
    # The table tells the types apart: the counting rules moved for many types.
    moved = set()
    for chain, inside, outside, source, destination in cases:
        result = evaluate(ruleset, _packet(source, destination), chain, inside, outside)
        moved |= set(result.counters)
    for name in ("UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST"):
        index = ROUTE_TYPES.index(name) * 3 + 1  # INPUT has three rules per type
        assert ("INPUT", index) in moved, f"no packet had a {name} source"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_route_table_given_to_the_runner_is_the_one_the_program_sees(backend: str) -> None:
    ruleset = parse(
        "*filter\n-A INPUT -m addrtype --dst-type LOCAL -j DROP\n"
        "-A INPUT -m addrtype --dst-type BROADCAST --limit-iface-in -j DROP\nCOMMIT\n",
        "given",
    )
    routes = RouteTable(
        (
            Route(int(IPv4Address("10.1.0.0")), 16, RTN["LOCAL"], "veth9"),
            Route(int(IPv4Address("10.1.2.0")), 24, RTN["PROHIBIT"]),
            Route(int(IPv4Address("10.1.3.255")), 32, RTN["BROADCAST"], "veth9"),
        )
    )
    cases = [
        ("INPUT", device, None, "198.18.0.1", destination)
        for device in ("veth9", "eth0")
        for destination in ("10.1.0.1", "10.1.2.1", "10.1.3.255", "198.18.0.2", "10.2.0.1")
    ]
    with ChainRunner(ruleset, routes=routes, backend=backend) as runner:  # type: ignore[arg-type]
        assert not _compare(ruleset, runner, routes, cases)
        dropped = runner.run(frame_for(_packet("198.18.0.1", "10.1.0.1")), "INPUT", "eth0")
        prohibited = runner.run(frame_for(_packet("198.18.0.1", "10.1.2.1")), "INPUT", "eth0")
        stand_in = runner.run(frame_for(_packet("198.18.0.1", "198.18.0.2")), "INPUT", "eth0")
    assert (dropped.verdict, prohibited.verdict, stand_in.verdict) == ("DROP", "ACCEPT", "ACCEPT")


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_a_chunk_function(backend: str) -> None:
    # More rules than one function holds: the later ones run in chunk functions, whose frame
    # is their own.
    rules = [
        Rule((AddrType(dst=AddressTypes(1 << (i % len(ROUTE_TYPES)), i % 3 == 0)),), None)
        for i in range(CHUNK_RULES + 40)
    ]
    rules.append(Rule((AddrType(src=AddressTypes(1 << RTN["UNICAST"])),), Drop()))
    chains = {
        "INPUT": Chain("INPUT", "ACCEPT", rules=rules),
        "FORWARD": Chain("FORWARD", "ACCEPT", rules=[Rule((), Jump("user"))]),
        "OUTPUT": Chain("OUTPUT", "ACCEPT"),
        "user": Chain(
            "user", rules=[Rule((AddrType(dst=AddressTypes(1 << RTN["LOCAL"])),), Accept())]
        ),
    }
    ruleset = Ruleset(chains)
    validate(ruleset)
    cases = [
        (chain, "eth0", out, source, destination)
        for chain, out in (("INPUT", None), ("FORWARD", "eth1"))
        for source in ("198.18.0.1", "198.18.0.255", "0.0.0.0")
        for destination in ("198.18.0.2", "224.0.0.1", "198.19.14.1", "198.19.10.1")
    ]
    with ChainRunner(ruleset, backend=backend) as runner:  # type: ignore[arg-type]
        differences = _compare(ruleset, runner, None, cases)
    assert not differences, "\n".join(differences)


# Random route tables over a few nested prefixes, so that lookups meet longest-prefix choices,
# failing types and other devices.
_PREFIXES = (
    ("10.0.0.0", 8),
    ("10.1.0.0", 16),
    ("10.1.2.0", 24),
    ("10.1.2.128", 25),
    ("10.1.2.3", 32),
    ("0.0.0.0", 0),
    ("198.18.0.0", 15),
)
_DEVICES = ("eth0", "eth1", "lo", "")
_ADDRESSES = ("10.1.2.3", "10.1.2.200", "10.1.2.4", "10.1.9.9", "10.9.9.9", "11.0.0.1", "0.1.1.1")
_routes = st.lists(
    st.builds(
        lambda prefix, kind, device: Route(int(IPv4Address(prefix[0])), prefix[1], kind, device),
        st.sampled_from(_PREFIXES),
        st.integers(0, len(ROUTE_TYPES) - 1),
        st.sampled_from(_DEVICES),
    ),
    max_size=8,
).map(lambda routes: RouteTable(tuple(routes)))
_sides = st.none() | st.builds(
    AddressTypes, st.integers(1, (1 << len(ROUTE_TYPES)) - 1), st.booleans()
)
_matches = st.builds(AddrType, _sides, _sides, st.sampled_from((None, "in"))).filter(
    lambda match: match.src is not None or match.dst is not None
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=_routes, matches=st.lists(_matches, min_size=1, max_size=6))
def test_random_route_tables_and_matches(routes: RouteTable, matches: list[AddrType]) -> None:
    rules = [Rule((match,), None) for match in matches] + [Rule((matches[0],), Drop())]
    ruleset = Ruleset(
        {
            "INPUT": Chain("INPUT", "ACCEPT", rules=rules),
            "FORWARD": Chain("FORWARD", "ACCEPT"),
            "OUTPUT": Chain("OUTPUT", "ACCEPT"),
        }
    )
    validate(ruleset)
    cases = [
        ("INPUT", device, None, source, destination)
        for device in ("eth0", "eth1")
        for source in _ADDRESSES
        for destination in _ADDRESSES[::2]
    ]
    with ChainRunner(ruleset, routes=routes) as runner:
        differences = _compare(ruleset, runner, routes, cases)
    assert not differences, "\n".join(differences[:10])


def test_stand_in_routes_are_what_both_take_by_default() -> None:
    # The runner and the evaluator agree without a table because both take STANDIN_ROUTES.
    ruleset = parse("*filter\n-A INPUT -m addrtype --dst-type LOCAL -j DROP\nCOMMIT\n", "d")
    with ChainRunner(ruleset) as runner:
        assert runner.routes is STANDIN_ROUTES
        outcome = runner.run(frame_for(_packet("198.18.0.1", "198.19.17.5")), "INPUT", "eth0")
    assert outcome.verdict == "DROP"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpflab_verify_loads_both_programs(backend: str, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from harness.cli import main

    path = tmp_path / "addrtype.rules"
    path.write_text(_rules())
    status = main(["verify", str(path), "--backend", backend])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.count(": accepted;") == 2, out
