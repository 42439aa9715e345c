"""`-m owner` in the bytecode programs under BPF_PROG_TEST_RUN against the reference
evaluator: every socket state (none, one no file holds, a file's with its uid and gid, and the
dummy socket test-run gives every packet), every option negated or not, ranges at the ends of
the id space, in OUTPUT's entry function, a user chain's function and a chunk function; and
random matches and owners (hypothesis); in both backends (the C reads the socket with
bpf_probe_read_kernel, codegen/c/owner.py, the bytecode with kfuncs)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from codegen.bpf.btf import BtfError, vmlinux
from codegen.c import c_source
from codegen.rules import evaluate, parse
from codegen.rules.extensions.owner import ID_MAX, IdRange, Owner
from codegen.rules.model import Accept, Chain, Drop, Jump, Rule, Ruleset
from codegen.rules.packet import SocketOwner
from codegen.tc.chains import CHUNK_RULES
from codegen.tc.generator import CompileError, compile_program
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


def test_suppl_groups_is_refused_by_the_bytecode_backend_with_the_rule() -> None:
    ruleset = parse(
        "*filter\n-A OUTPUT -m owner --gid-owner 5 --suppl-groups -j DROP\nCOMMIT\n", "o.rules"
    )
    with pytest.raises(CompileError) as caught:
        compile_program(ruleset, "egress", interfaces={})
    message = str(caught.value)
    assert (
        "o.rules:2:1" in message and "--suppl-groups" in message and "rule 1 of OUTPUT" in (message)
    )


def test_suppl_groups_is_refused_by_the_c_backend_in_one_sentence() -> None:
    ruleset = parse(
        "*filter\n-A OUTPUT -m owner --gid-owner 5 --suppl-groups -j DROP\nCOMMIT\n", "o.rules"
    )
    with pytest.raises(CompileError) as caught:
        c_source(ruleset, "egress", interfaces={})
    message = str(caught.value)
    assert message.startswith("o.rules:2:1: the C backend refuses this '-m owner' because")
    assert "--suppl-groups" in message and "\n" not in message


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
    return Owner(uid, gid, socket)


ids = st.sampled_from([0, 1, 7, 999, 1000, 1999, 2000, 65534, ID_MAX - 1, ID_MAX]) | st.integers(
    0, 0xFFFFFFFF
)
socket_owners = st.none() | st.builds(SocketOwner, ids, ids, st.just(()), st.booleans())


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
    ("given", "owner"),
    [
        (None, None),  # test-run's socket: none to -m owner
        ("none", None),
        ("kernel", SocketOwner(file=False)),
        ("0:0", SocketOwner(0, 0)),
        ("1500:2500", SocketOwner(1500, 2500)),
        ("1500:7", SocketOwner(1500, 7)),
    ],
)
def test_bpflab_run_takes_the_owner(given: str | None, owner, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "owner.rules"
    rules.write_text(RULES)
    extra = [] if given is None else ["--owner", given]
    spec = "Ether()/IP(src='198.18.0.2', dst='198.18.0.1', id=2)/TCP(sport=54321, dport=22)"
    result = _bpflab("run", str(rules), "--chain", "OUTPUT", "--packet", spec, *extra)
    assert result.returncode == 0, result.stderr
    packet = bytes(IP(src="198.18.0.2", dst="198.18.0.1", id=2) / TCP(sport=54321, dport=22))
    expected = evaluate(parse(RULES, "owner"), packet, "OUTPUT", None, None, owner=owner)
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
