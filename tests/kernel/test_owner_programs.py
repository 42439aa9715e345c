"""`-m owner` in the bytecode programs under BPF_PROG_TEST_RUN against the reference
evaluator: every socket state (none, one no file holds, a file's with its uid and gid, and the
dummy socket test-run gives every packet), every option negated or not, ranges at the ends of
the id space, in OUTPUT's entry function, a user chain's function and a chunk function; and
random matches and owners (hypothesis); `--suppl-groups` over group lists up to a cred's
largest; in both backends (the C reads the socket with bpf_probe_read_kernel,
codegen/c/owner.py, the bytecode with kfuncs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet import UDP as UDP_LAYER

import codegen.c.owner as c_owner_module
import codegen.tc.matches.owner as owner_module
from codegen.bpf.btf import BtfError, vmlinux
from codegen.rules import evaluate, parse
from codegen.rules.extensions.owner import ID_MAX, IdRange, Owner
from codegen.rules.model import Accept, Chain, Drop, Jump, Rule, Ruleset
from codegen.rules.packet import SocketOwner
from codegen.tc.chains import CHUNK_RULES
from codegen.tc.generator import CompileError, compile_program
from codegen.tc.matches.owner import MAX_DISTINCT, NGROUPS_MAX
from harness.runner import ChainRunner, frame_for

pytestmark = pytest.mark.privileged
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

UDP = bytes.fromhex("4500001c0001000040110000c6120002c61200019c40138800080000")
TCP_SYN = bytes.fromhex(
    "450000280002000040060000c6120002c6120001d431001600000001000000005002000000000000"
)

RULES = """\
*filter
:owned - [0:0]
-A OUTPUT -m owner --uid-owner 0
-A OUTPUT -m owner ! --uid-owner 0
-A OUTPUT -m owner --uid-owner 1000-1999
-A OUTPUT -m owner ! --uid-owner 1000-1999
-A OUTPUT -m owner --gid-owner 2000
-A OUTPUT -m owner ! --gid-owner 2000-2999
-A OUTPUT -m owner --socket-exists
-A OUTPUT -m owner ! --socket-exists
-A OUTPUT -m owner --socket-exists --uid-owner 1500 --gid-owner 2500
-A OUTPUT -m owner ! --socket-exists ! --uid-owner 0
-A OUTPUT -m owner ! --uid-owner 0 ! --gid-owner 0
-A OUTPUT -m owner --uid-owner 0-4294967294
-A OUTPUT -m owner --uid-owner 4294967294
-A OUTPUT -m owner ! --gid-owner 0-4294967294
-A OUTPUT -m owner --gid-owner 7 -m owner --uid-owner 7
-A OUTPUT -p tcp -j owned
-A OUTPUT -m owner --uid-owner 1500 -j DROP
-A owned -m owner --uid-owner 0 -j RETURN
-A owned -m owner --socket-exists ! --gid-owner 2500 -j ACCEPT
-A owned -m owner ! --socket-exists -j DROP
COMMIT
"""
# The owners a packet can have: none, the kernel's own socket, processes' sockets.
OWNERS: tuple[SocketOwner | None, ...] = (
    None,
    SocketOwner(file=False),
    SocketOwner(0, 0),
    SocketOwner(1500, 2500),
    SocketOwner(1500, 2000),
    SocketOwner(999, 2999),
    SocketOwner(2000, 3000),
    SocketOwner(7, 7),
    SocketOwner(ID_MAX, ID_MAX),
    SocketOwner(65534, 65534),
)


def _agree(runner: ChainRunner, ruleset: Ruleset, packet: bytes, owner) -> None:  # type: ignore[no-untyped-def]
    ours = runner.run(frame_for(packet), "OUTPUT", owner=owner)
    expected = evaluate(ruleset, packet, "OUTPUT", None, None, owner=owner)
    assert (ours.verdict, ours.deciding, ours.counters) == (
        expected.verdict,
        expected.deciding,
        expected.counters,
    ), owner


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_owner_through_every_option(backend: str) -> None:
    ruleset = parse(RULES, "owner")
    with ChainRunner(ruleset, backend=backend) as runner:
        for owner in OWNERS:
            for packet in (UDP, TCP_SYN):
                _agree(runner, ruleset, packet, owner)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_dummy_socket_of_test_run_is_no_socket(backend: str) -> None:
    """Test-run gives every packet a socket without a struct socket (sock_init_data(NULL)):
    the program reads it through the kernel's structures, and owner_mt sees none."""
    ruleset = parse(RULES, "owner")
    with ChainRunner(ruleset, backend=backend) as runner:
        read = runner.run(frame_for(TCP_SYN), "OUTPUT")  # the program walks the socket
        said = runner.run(frame_for(TCP_SYN), "OUTPUT", owner=None)
    assert (read.verdict, read.deciding, read.counters) == (
        said.verdict,
        said.deciding,
        said.counters,
    )
    assert read.verdict == "DROP" and read.deciding == ("owned", 3)
    assert read.counters[("OUTPUT", 8)] == (1, len(TCP_SYN))  # ! --socket-exists


@pytest.mark.parametrize("backend", BACKENDS)
def test_owner_matches_in_a_chunk_function(backend: str) -> None:
    """Past CHUNK_RULES rules a chain is cut into functions that get only the facts: the
    owner read once in the entry function reaches them."""
    rules = [Rule((Owner(uid=IdRange(n, n)),), None) for n in range(CHUNK_RULES + 5)]
    rules.append(Rule((Owner(uid=IdRange(CHUNK_RULES + 3, CHUNK_RULES + 3)),), Drop()))
    rules.append(Rule((Owner(gid=IdRange(9, 9, negated=True)),), Accept()))
    ruleset = Ruleset(
        {
            "INPUT": Chain("INPUT", "ACCEPT"),
            "FORWARD": Chain("FORWARD", "ACCEPT"),
            "OUTPUT": Chain("OUTPUT", "DROP", rules=[Rule((), Jump("many"))]),
            "many": Chain("many", None, rules=rules),
        }
    )
    with ChainRunner(ruleset, backend=backend) as runner:
        for owner in (
            None,
            SocketOwner(CHUNK_RULES + 3, 9),
            SocketOwner(CHUNK_RULES + 4, 9),
            SocketOwner(CHUNK_RULES + 4, 8),
            SocketOwner(file=False),
        ):
            _agree(runner, ruleset, UDP, owner)


GROUP_RULES = """\
*filter
:grouped - [0:0]
-A OUTPUT -m owner --gid-owner 5 --suppl-groups
-A OUTPUT -m owner ! --gid-owner 100-200 --suppl-groups
-A OUTPUT -m owner --gid-owner 0 --suppl-groups
-A OUTPUT -m owner --gid-owner 4294967294 --suppl-groups
-A OUTPUT -m owner --gid-owner 7-4294967294 --suppl-groups
-A OUTPUT -m owner --gid-owner 0-4294967294 --suppl-groups
-A OUTPUT -m owner --gid-owner 65536-65536 --suppl-groups
-A OUTPUT -m owner --gid-owner 5 --uid-owner 1
-A OUTPUT -p udp -j grouped
-A grouped -m owner --gid-owner 100-200 --suppl-groups -j RETURN
-A grouped -m owner --socket-exists ! --gid-owner 5 --suppl-groups -j DROP
COMMIT
"""
# Sorted or not (the kernel sorts a cred's groups), short and as long as a cred's can be
# (NGROUPS_MAX: the search's 17 steps), with the ranges' ends just inside and just outside.
GROUP_OWNERS: tuple[SocketOwner | None, ...] = (
    None,
    SocketOwner(file=False),
    SocketOwner(1, 1),
    SocketOwner(1, 1, (5,)),
    SocketOwner(1, 1, (4, 6)),
    SocketOwner(1, 1, (201, 3, 150, 9)),
    SocketOwner(1, 1, (99, 201)),
    SocketOwner(1, 5, (1, 2)),
    SocketOwner(1, 150, ()),
    SocketOwner(9, 9, (0, 1, 2, 3, 4, 6, 8, 10)),
    SocketOwner(1, 6, (ID_MAX,)),
    SocketOwner(1, 6, (ID_MAX - 1,)),
    SocketOwner(1, 6, tuple(range(1000, 1000 + NGROUPS_MAX))),
    SocketOwner(1, 6, tuple(range(0, 2 * NGROUPS_MAX, 2))),  # 65536 is the last one
    SocketOwner(1, 6, tuple(range(1, 2 * NGROUPS_MAX, 2))),  # 5 and 65537, never 65536
    SocketOwner(1, 6, (*range(10, 10 + NGROUPS_MAX - 1), 65536)),
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_supplementary_groups_through_every_option(backend: str) -> None:
    ruleset = parse(GROUP_RULES, "groups")
    with ChainRunner(ruleset, backend=backend) as runner:
        for owner in GROUP_OWNERS:
            _agree(runner, ruleset, UDP, owner)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_search_that_stops_one_step_early_is_caught(backend: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The owners above tell a whole search from one a step short: with 16 steps a group
    found only by the 17th probe of 65536 is missed."""
    monkeypatch.setattr(owner_module, "SEARCH_STEPS", owner_module.SEARCH_STEPS - 1)
    monkeypatch.setattr(c_owner_module, "SEARCH_STEPS", owner_module.SEARCH_STEPS)
    ruleset = parse(GROUP_RULES, "groups")
    with ChainRunner(ruleset, backend=backend) as runner:
        with pytest.raises(AssertionError):
            for owner in GROUP_OWNERS:
                _agree(runner, ruleset, UDP, owner)


def test_more_distinct_group_ranges_than_the_facts_word_holds_are_refused() -> None:
    rules = "".join(
        f"-A OUTPUT -m owner --gid-owner {n} --suppl-groups\n" for n in range(MAX_DISTINCT + 1)
    )
    last = "-A OUTPUT -m owner --gid-owner 3 --suppl-groups"
    ruleset = parse(f"*filter\n{rules}{last}\nCOMMIT\n", "o")
    with pytest.raises(CompileError) as caught:
        compile_program(ruleset, "egress", interfaces={})
    message = str(caught.value)
    assert message.startswith(f"o:{MAX_DISTINCT + 2}:1: ") and "--suppl-groups" in message
    assert f"number {MAX_DISTINCT + 1} of {MAX_DISTINCT + 1}" in message


def _ranges(draw) -> IdRange | None:  # type: ignore[no-untyped-def]
    edges = st.sampled_from([0, 1, 7, 1000, 1999, 2000, 65534, ID_MAX - 1, ID_MAX])
    if not draw(st.booleans()):
        return None
    first, last = sorted((draw(edges), draw(edges)))
    return IdRange(first, last, draw(st.booleans()))


@st.composite
def owner_matches(draw) -> Owner:  # type: ignore[no-untyped-def]
    uid, gid = _ranges(draw), _ranges(draw)
    socket = draw(st.sampled_from([None, True, False]))
    if uid is None and gid is None and socket is None:
        socket = True
    return Owner(uid, gid, socket, gid is not None and draw(st.booleans()))


ids = st.sampled_from([0, 1, 7, 999, 1000, 1999, 2000, 65534, ID_MAX - 1, ID_MAX]) | st.integers(
    0, 0xFFFFFFFF
)
socket_owners = st.none() | st.builds(
    SocketOwner, ids, ids, st.lists(ids, max_size=12).map(tuple), st.booleans()
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(owner_matches(), min_size=1, max_size=6), st.lists(socket_owners, max_size=8))
def test_random_owner_matches_agree_with_the_reference(backend, matches, owners) -> None:  # type: ignore[no-untyped-def]
    rules = [Rule((match,), None) for match in matches]
    rules.append(Rule((matches[0],), Drop()))
    ruleset = Ruleset(
        {
            "INPUT": Chain("INPUT", "ACCEPT"),
            "FORWARD": Chain("FORWARD", "ACCEPT"),
            "OUTPUT": Chain("OUTPUT", "ACCEPT", rules=rules),
        }
    )
    with ChainRunner(ruleset, backend=backend) as runner:
        for owner in [None, *owners]:
            _agree(runner, ruleset, UDP, owner)


def _bpflab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "given", "owner"),
    [
        (RULES, None, None),  # test-run's socket: none to -m owner
        (RULES, "none", None),
        (RULES, "kernel", SocketOwner(file=False)),
        (RULES, "0:0", SocketOwner(0, 0)),
        (RULES, "1500:2500", SocketOwner(1500, 2500)),
        (RULES, "1500:7", SocketOwner(1500, 7)),
        (GROUP_RULES, "1:1:5", SocketOwner(1, 1, (5,))),
        (GROUP_RULES, "1:1:150,3", SocketOwner(1, 1, (150, 3))),
        (GROUP_RULES, "1:1", SocketOwner(1, 1)),
    ],
)
def test_bpflab_run_takes_the_owner(text: str, given: str | None, owner, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "owner.rules"
    rules.write_text(text)
    extra = [] if given is None else ["--owner", given]
    # GROUP_RULES tell the groups apart on UDP (its chain `grouped`)
    transport = TCP(sport=54321, dport=22) if text is RULES else UDP_LAYER(sport=5, dport=22)
    spec = f"Ether()/IP(src='198.18.0.2', dst='198.18.0.1', id=2)/{transport.command()}"
    result = _bpflab("run", str(rules), "--chain", "OUTPUT", "--packet", spec, *extra)
    assert result.returncode == 0, result.stderr
    packet = bytes(IP(src="198.18.0.2", dst="198.18.0.1", id=2) / transport)
    expected = evaluate(parse(text, "owner"), packet, "OUTPUT", None, None, owner=owner)
    chain, index = expected.deciding
    where = f"{chain} policy" if index == "policy" else f"{chain} rule {index}"
    assert result.stdout.splitlines()[0] == f"packet 1: {expected.verdict:6} by {where}"


def test_bpflab_run_refuses_a_bad_owner(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "owner.rules"
    rules.write_text(RULES)
    result = _bpflab(
        "run", str(rules), "--chain", "OUTPUT", "--packet", "Ether()/IP()", "--owner", "root"
    )
    assert result.returncode == 2
    assert "--owner 'root': give UID:GID" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("struct", "path", "where"),
    [
        ("ethhdr", "h_proto", (12, 2)),
        ("iphdr", "daddr", (16, 4)),  # inside anonymous unions and structs
        ("tcphdr", "dest", (2, 2)),
        ("sk_buff", "sk", None),  # whatever this kernel's layout, a pointer
    ],
)
def test_member_offsets_come_from_the_kernels_btf(struct: str, path: str, where) -> None:  # type: ignore[no-untyped-def]
    found = vmlinux().member_offset(struct, path)
    assert found == where if where is not None else found[1] == 8


def test_a_missing_member_or_a_bit_field_is_refused() -> None:
    with pytest.raises(BtfError, match="no member 'nothing_here'"):
        vmlinux().member_offset("sock", "nothing_here")
    for bit_field in ("syn", "doff"):  # doff starts on a byte, and is still a bit field
        with pytest.raises(BtfError, match="bit field"):
            vmlinux().member_offset("tcphdr", bit_field)
