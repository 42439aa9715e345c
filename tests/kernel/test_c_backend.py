"""The C backend (codegen.c): its C compiles with bcc and loads for every hook, it shares the
caller's maps, each rule's code sits under its iptables-save text, and what goes wrong comes back
as one sentence naming the rule, with nothing of bcc's on the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack, closing
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from codegen.bpf.isa import MapType, TcAction
from codegen.bpf.maps import Map
from codegen.bpf.testrun import SkBuff, prog_test_run
from codegen.c import (
    BccUnavailable,
    CCompileError,
    CVerifierError,
    Entry,
    c_source,
    compiler,
    load_c_program,
    load_c_programs,
)
from codegen.c import matches as c_matches
from codegen.c.compiler import PIN_ROOT
from codegen.c.source import MAX_EXPANDED_RULES, comment, user_chains_reached
from codegen.c.table import TABLE_FROM
from codegen.reject.limits import RateMaps
from codegen.rules import extensions, parse, write
from codegen.rules.extensions import BY_NAME, MATCHES
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.extensions.length import Length
from codegen.rules.iptables_save import write_rule
from codegen.rules.model import ExtensionMatch
from codegen.tc.generator import COUNTERS_MAP
from codegen.tc.layout import CounterLayout
from codegen.tc.replies import INTERFACE_ADDRESSES, INTERFACE_VALUE_SIZE
from harness.backends import load_program
from harness.counters import CounterMap
from harness.deploy.addresses import (
    fill_interface_map,
    interface_addresses,
    local_addresses,
)
from harness.lab.twin import ALL_HOSTS, HOST, with_addresses
from harness.runner import frame_for, standin_interfaces
from netns import RouterTopology
from tests.kernel.test_tc_chains import EVERY_MATCH
from tests.strategies import packets, rulesets

pytestmark = [pytest.mark.bcc, pytest.mark.privileged]

HOOKS = [
    ("ingress", None),
    ("egress", None),
    ("chain", "INPUT"),
    ("chain", "FORWARD"),
    ("chain", "OUTPUT"),
]
SMALL = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp -m udp --dport 7 -j DROP
-A OUTPUT -m length --length 0:40 -j ACCEPT
COMMIT
"""


@pytest.fixture(scope="module")
def every_match():
    ruleset = parse(EVERY_MATCH, "every-match.rules")
    interfaces = standin_interfaces(ruleset, ["lo"])
    with (
        CounterMap(CounterLayout.of(ruleset)) as counters,
    ):
        yield ruleset, interfaces, {COUNTERS_MAP: counters}


def _reached(ruleset, hook, chain):
    roots = {"ingress": ("INPUT", "FORWARD"), "egress": ("OUTPUT",)}.get(hook, (chain,))
    return [*roots, *user_chains_reached(ruleset, roots)]


@pytest.mark.parametrize("table_from", [TABLE_FROM, 1], ids=["inline", "table"])
@pytest.mark.parametrize("fastpath", [False, True], ids=["kernel-path", "fast-path"])
@pytest.mark.parametrize(("hook", "chain"), HOOKS, ids=[h if not c else c for h, c in HOOKS])
def test_every_match_and_target_compiles_and_loads(every_match, hook, chain, fastpath, table_from):
    """Also with every plain rule in the rule table (codegen/c/table.py), beside the C of
    every family: no name of the table's clashes with theirs."""
    ruleset, interfaces, maps = every_match
    with load_c_program(
        ruleset,
        hook,
        interfaces=interfaces,
        maps=maps,
        chain=chain,
        fastpath=fastpath,
        table_from=table_from,
    ) as program:
        assert program.fd >= 0
        assert program.name == (f"bpflab_{chain}" if chain else f"bpflab_{hook}")
        assert program.stats is not None and program.stats.insns_processed > 0
        assert program.insn_count > 0 and program.compiled_insns > 0


@pytest.mark.parametrize(("hook", "chain"), HOOKS, ids=[h if not c else c for h, c in HOOKS])
def test_each_rule_is_under_a_comment_with_its_text(every_match, hook, chain):
    ruleset, interfaces, _ = every_match
    text = c_source(ruleset, hook, interfaces=interfaces, chain=chain, fastpath=True)
    lines = text.splitlines()
    expected = [
        f"// {write_rule(name, rule)}"
        for name in _reached(ruleset, hook, chain)
        for rule in ruleset.chains[name].rules
    ]
    stripped = [line.strip() for line in lines]
    for line in expected:
        assert stripped.count(line) == 1, line
    # Each comment is followed by its rule's code: C, not another comment or a blank line.
    for number, line in enumerate(stripped):
        if line.startswith("// -A"):
            assert stripped[number + 1] and not stripped[number + 1].startswith("//"), line
    assert sum(line.startswith("// -A") for line in stripped) == len(expected)


def test_the_cli_prints_the_c(tmp_path):
    path = tmp_path / "small.rules"
    path.write_text(SMALL)
    result = subprocess.run(
        [sys.executable, "-m", "harness.cli", "compile", "--backend", "c", "--hook", "egress",
         str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "// -A OUTPUT -p udp -m udp --dport 7 -j DROP" in result.stdout
    assert "int bpflab_egress(struct __sk_buff *skb)" in result.stdout


def test_the_programs_count_in_the_callers_map():
    """The C program's counters are the caller's map: a packet run through it moves the slot
    read back through the Map object that was passed in."""
    ruleset = parse(SMALL, "small.rules")
    layout = CounterLayout.of(ruleset)
    packet = bytes(IP(src="198.18.0.2", dst="198.18.0.1") / UDP(dport=7))
    with CounterMap(layout) as counters:
        with load_c_program(
            ruleset, "chain", interfaces={}, maps={COUNTERS_MAP: counters}, chain="OUTPUT"
        ) as program:
            context = SkBuff()
            result = prog_test_run(program.fd, frame_for(packet), context=context)
            assert result.retval == TcAction.SHOT
            assert result.context is not None
            assert layout.positions[result.context.cb[1]] == ("OUTPUT", 1)
        assert counters.read()[("OUTPUT", 1)] == (1, len(packet))


def test_one_compile_gives_several_programs(every_match):
    ruleset, interfaces, maps = every_match
    entries = [Entry("chain", name) for name in ("INPUT", "FORWARD", "OUTPUT")]
    programs = load_c_programs(ruleset, entries, interfaces=interfaces, maps=maps)
    try:
        assert [program.name for program in programs] == [e.function for e in entries]
        assert len({program.fd for program in programs}) == 3
    finally:
        for program in programs:
            program.close()


def test_no_pins_are_left_behind(every_match):
    ruleset, interfaces, maps = every_match
    load_c_program(ruleset, "ingress", interfaces=interfaces, maps=maps).close()
    mine = [name for name in os.listdir(PIN_ROOT) if name.startswith(f"c_{os.getpid()}_")]
    assert mine == []


def test_pins_of_a_compile_that_died_are_removed():
    """A process killed mid-compile leaves its pin directory (holding maps alive); the next
    compile removes those of processes that no longer run."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = PIN_ROOT / f"c_{dead.pid}_1"
    if Path(f"/proc/{dead.pid}").exists():
        pytest.skip("the pid was reused at once")
    stale.mkdir(parents=True)
    ruleset = parse(SMALL, "small.rules")
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        counters.pin(str(stale / COUNTERS_MAP))
        load_c_program(ruleset, "egress", interfaces={}, maps={COUNTERS_MAP: counters}).close()
    assert not stale.exists()


# ---------------------------------------------------------------------------------------------
# The match writers: one module per family, registered by the model it writes


def test_each_family_module_writes_the_model_of_its_namesake():
    """codegen/c/matches mirrors codegen/rules/extensions: the module named after a family
    writes that family's model."""
    for family in c_matches.FAMILIES:
        model = BY_NAME[family].model
        module = getattr(c_matches, family)
        assert module.MODEL is model, family
        assert c_matches.WRITERS[model] is module.write, family


def test_every_rule_layer_family_is_written_or_refused_with_a_reason():
    written = [family for family in BY_NAME if family not in c_matches.REFUSED]
    assert c_matches.FAMILIES == tuple(written)
    assert set(c_matches.REFUSED) <= set(BY_NAME)
    assert all(reason.strip() for reason in c_matches.REFUSED.values())
    for family in c_matches.REFUSED:
        assert BY_NAME[family].model not in c_matches.WRITERS, family


def test_a_refused_family_is_refused_with_its_reason_before_anything_compiles(monkeypatch):
    """Every family is written today, so refuse one for the test (as REFUSED and a missing
    writer are, for a family not written yet)."""

    def compile_anyway(*args: object) -> None:
        pytest.fail("bcc was asked to compile a unit the C backend refuses")

    family = "comment"
    monkeypatch.setattr(compiler, "_compile", compile_anyway)
    monkeypatch.setitem(c_matches.REFUSED, family, "it is refused for this test")
    monkeypatch.delitem(c_matches.WRITERS, BY_NAME[family].model)
    example = BY_NAME[family].examples[0]
    ruleset = parse(f"*filter\n-A INPUT {example} -j ACCEPT\nCOMMIT\n", "refused.rules")
    with pytest.raises(CCompileError) as raised:
        c_source(ruleset, "ingress", interfaces={})
    assert str(raised.value) == (
        f"refused.rules:2:1: the C backend refuses the '-m {family}' match because"
        f" it is refused for this test: -A INPUT {example} -j ACCEPT"
    )


@pytest.mark.parametrize(
    ("extension", "example"),
    [
        (extension, example)
        for extension in MATCHES
        if extension.name not in c_matches.REFUSED
        for example in extension.examples
    ],
    ids=lambda value: getattr(value, "name", value),
)
def test_a_rule_hotdrops_exactly_when_its_family_can(extension, example):
    """The hotdrop tail is written when the rule registry says a family can hotdrop, and the
    family's writer jumps to it then and only then. Each example is put in the first built-in
    chain the kernel lets it run in; a form the C refuses on purpose (policy's --dir out) is
    refused in one sentence naming the rule."""
    chain = next(
        name for name in ("INPUT", "FORWARD", "OUTPUT") if name in extension.hooks(_model(example))
    )
    ruleset = parse(f"*filter\n-A {chain} {example} -j ACCEPT\nCOMMIT\n", "e.rules")
    try:
        text = c_source(ruleset, "chain", interfaces={}, chain=chain)
    except CCompileError as refused:
        assert str(refused).startswith("e.rules:2:1: the C backend refuses "), refused
        assert "\n" not in str(refused) and example in str(refused)
        assert "--dir out" in example
        return
    hotdrop = f"rule_{CounterLayout.of(ruleset).slot((chain, 1))}_hotdrop"
    assert (f"goto {hotdrop};" in text) == extension.can_hotdrop
    assert (f"\n{hotdrop}:\n" in text) == extension.can_hotdrop


def _model(example: str) -> ExtensionMatch:
    """The match an example of a family is, parsed where no hook check applies."""
    ruleset = parse(f"*filter\n:probe - [0:0]\n-A probe {example}\nCOMMIT\n")
    matches = ruleset.chains["probe"].rules[0].matches
    (match,) = [found for found in matches if isinstance(found, ExtensionMatch)]
    return match


# ---------------------------------------------------------------------------------------------
# When things go wrong: one sentence, the rule named, nothing printed


def test_a_compile_error_names_the_rule_and_prints_nothing(monkeypatch, capfd):
    ruleset = parse(SMALL, "small.rules")
    monkeypatch.setitem(c_matches.WRITERS, Length, lambda match, labels: ["not C at all;"])
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        with pytest.raises(CCompileError) as raised:
            load_c_program(
                ruleset, "chain", interfaces={}, maps={COUNTERS_MAP: counters}, chain="OUTPUT"
            )
    message = str(raised.value)
    assert message.startswith("bcc could not compile the C of bpflab_OUTPUT: main.c:")
    assert "error" not in message.split(": ", 2)[1]  # clang's own "error:" tag is dropped
    assert "-A OUTPUT -m length --length 0:40 -j ACCEPT (small.rules:6:1)" in message
    assert "\n" not in message
    assert raised.value.__cause__ is None and raised.value.__context__ is None  # no bcc trace
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_a_verifier_rejection_names_the_rule_and_prints_nothing(monkeypatch, capfd):
    ruleset = parse(SMALL, "small.rules")

    def wild_read(match, labels):  # reads memory at an address taken from the packet
        return [f"if (*(u32 *)(long)f->saddr == 1) goto {labels.miss};"]

    monkeypatch.setitem(c_matches.WRITERS, Length, wild_read)
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        with pytest.raises(CVerifierError) as raised:
            load_c_program(
                ruleset, "chain", interfaces={}, maps={COUNTERS_MAP: counters}, chain="OUTPUT"
            )
    message = str(raised.value)
    assert "the verifier rejected program 'bpflab_OUTPUT'" in message
    assert "invalid mem access" in message
    assert message.endswith("(in the C of -A OUTPUT -m length --length 0:40 -j ACCEPT "
                            "(small.rules:6:1))")  # fmt: skip
    assert "processed" in raised.value.log
    assert capfd.readouterr() == ("", "")


@dataclass(frozen=True)
class Unwritten(ExtensionMatch):
    """A match family the rule layer knows and the C backend has no writer for."""


class UnwrittenExtension(MatchExtension):
    name = "unwritten"
    model = Unwritten

    def save(self, match: ExtensionMatch) -> list[str]:
        return ["-m", "unwritten"]


def test_a_match_without_a_writer_is_refused_before_anything_compiles(monkeypatch, capfd):
    monkeypatch.setitem(extensions.BY_MODEL, Unwritten, UnwrittenExtension())

    def compile_anyway(*args: object) -> None:
        pytest.fail("bcc was asked to compile a unit the C backend cannot write")

    monkeypatch.setattr(compiler, "_compile", compile_anyway)
    ruleset = parse(SMALL, "small.rules")
    rule = ruleset.chains["OUTPUT"].rules[1]
    rule.matches = (*rule.matches, Unwritten())
    expected = (
        "small.rules:6:1: the C backend has no code for Unwritten: "
        "-A OUTPUT -m length --length 0:40 -m unwritten -j ACCEPT"
    )
    with pytest.raises(CCompileError) as raised:
        c_source(ruleset, "egress", interfaces={})
    assert str(raised.value) == expected
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        with pytest.raises(CCompileError) as raised:
            load_c_program(
                ruleset, "chain", interfaces={}, maps={COUNTERS_MAP: counters}, chain="OUTPUT"
            )
    assert str(raised.value) == expected
    assert capfd.readouterr() == ("", "")


def test_bcc_missing_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)  # `import bcc` now raises ImportError
    ruleset = parse(SMALL, "small.rules")
    with pytest.raises(BccUnavailable, match=r"^bcc is not importable: .*python3-bpfcc"):
        load_c_program(ruleset, "egress", interfaces={}, maps={COUNTERS_MAP: object()})


def test_a_map_of_the_wrong_shape_is_refused():
    ruleset = parse(SMALL, "small.rules")
    with Map(MapType.ARRAY, 4, 16, 8, name="counters") as wrong:
        with pytest.raises(CCompileError, match="must be a PERCPU_ARRAY map"):
            load_c_program(ruleset, "egress", interfaces={}, maps={COUNTERS_MAP: wrong})
    with pytest.raises(CCompileError, match="need the map 'counters'"):
        load_c_program(ruleset, "egress", interfaces={}, maps={})


@pytest.mark.parametrize(
    ("hook", "chain", "error"),
    [
        ("chain", "web", "only a built-in chain can run on its own"),
        ("chain", None, "only a built-in chain can run on its own"),
        ("ingress", "INPUT", "takes no chain"),
        ("sideways", None, "unknown hook"),
    ],
)
def test_bad_programs_are_refused(hook, chain, error):
    with pytest.raises(CCompileError, match=error):
        c_source(parse(SMALL), hook, interfaces={}, chain=chain)  # type: ignore[arg-type]


def test_chains_that_would_inline_too_much_are_refused():
    """Ten calls to a chain that makes ten calls... six deep is a million inlined rules."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":c{level} - [0:0]" for level in range(6)]
    lines += ["-A INPUT -j c0"] * 10
    for level in range(5):
        lines += [f"-A c{level} -j c{level + 1}"] * 10
    lines += ["-A c5 -j ACCEPT", "COMMIT", ""]
    ruleset = parse("\n".join(lines))
    with pytest.raises(CCompileError, match=f"limit is {MAX_EXPANDED_RULES:,}"):
        c_source(ruleset, "ingress", interfaces={})
    assert "chain_" not in c_source(ruleset, "egress", interfaces={})  # OUTPUT calls none


def test_nesting_deeper_than_bpf_calls_allow_still_loads():
    """User chains are inlined: no BPF call frames, so no 8-frame limit (the bytecode
    backend refuses this rule set)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":c{i} - [0:0]" for i in range(12)] + ["-A OUTPUT -j c0"]
    lines += [f"-A c{i} -j c{i + 1}" for i in range(11)] + ["-A c11 -j DROP", "COMMIT", ""]
    ruleset = parse("\n".join(lines))
    packet = bytes(IP(src="198.18.0.2", dst="198.18.0.1") / UDP(dport=9))
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        with load_c_program(
            ruleset, "chain", interfaces={}, maps={COUNTERS_MAP: counters}, chain="OUTPUT"
        ) as program:
            result = prog_test_run(program.fd, frame_for(packet), context=SkBuff())
            assert result.retval == TcAction.SHOT
        moved = counters.read()
    assert moved[("c11", 1)] == (1, len(packet))


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain", "// plain"),
        ("ends in \\", "// ends in \\ //"),
        ("carriage\rreturn", "// carriage\\x0dreturn"),
    ],
)
def test_comments_cannot_leak_into_the_code(text, shown):
    assert comment(text) == shown


def test_odd_comments_compile():
    text = SMALL.replace(
        "-A OUTPUT -m length", '-A OUTPUT -m comment --comment "*/ back\\\\" -m length'
    )
    ruleset = parse(text)
    with CounterMap(CounterLayout.of(ruleset)) as counters:
        load_c_program(ruleset, "egress", interfaces={}, maps={COUNTERS_MAP: counters}).close()


# ---------------------------------------------------------------------------------------------
# The attached hooks: bytecode and C programs side by side in a router's namespace


HOOK_RULESETS = 15
FRAMES_PER_HOOK = 8


@pytest.fixture(scope="module")
def router():
    with RouterTopology(ipv6=False) as topology:
        yield topology


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# Addresses ip_route_input treats apart: limited broadcast, 0.0.0.0 (0.1.2.3 is no martian
# since Linux 5.3), loopback, groups not joined (224.0.0.1 is).
ODD = tuple(
    IPv4Address(address)
    for address in (
        "255.255.255.255",
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "127.9.9.9",
        "224.0.0.5",
        "239.1.2.3",
    )
)


@st.composite
def hook_frames(draw: st.DrawFn, router) -> tuple[str, bytes, int, int]:
    """(hook, frame, ifindex, mark): a frame arriving at the router (for INPUT: to its own,
    a multicast, a broadcast, an unknown or a martian address; for FORWARD: to the server),
    sometimes from a martian source, or leaving it; sometimes for another host at layer 2,
    sometimes malformed."""
    client_side, server_side = router.router.client_side, router.router.server_side
    hook = draw(st.sampled_from(("ingress", "ingress", "egress")))
    if hook == "ingress":
        chain = draw(st.sampled_from(("INPUT", "FORWARD")))
        packet = draw(packets(chain))
        source, destination = IPv4Address(packet[12:16]), IPv4Address(packet[16:20])
        if chain == "INPUT":
            destination = draw(st.sampled_from((client_side.ipv4.ip, ALL_HOSTS, HOST, *ODD)))
        if draw(st.integers(0, 3)) == 0:  # a martian source, or one of the router's own
            source = draw(st.sampled_from((*ODD, client_side.ipv4.ip, server_side.ipv4.ip)))
        packet = with_addresses(packet, source, destination)
        device = client_side
        destination_mac = draw(
            st.sampled_from((_mac(device.mac),) * 4 + (b"\xff" * 6, bytes.fromhex("02aa00000001")))
        )
    else:
        packet = draw(packets("OUTPUT"))
        device = draw(st.sampled_from((client_side, server_side)))
        destination_mac = bytes.fromhex("02bb00000001")
    mangle = draw(st.sampled_from((None,) * 12 + ("version", "length", "short", "ipv6")))
    ethertype = b"\x08\x00"
    if mangle == "version":
        packet = bytes([0x60 | packet[0] & 0x0F]) + packet[1:]
    elif mangle == "length":  # claims more than arrived: ip_rcv drops it
        packet = packet[:2] + (len(packet) + 8).to_bytes(2, "big") + packet[4:]
    elif mangle == "short":  # shorter than its own header
        packet = packet[:2] + (19).to_bytes(2, "big") + packet[4:]
    elif mangle == "ipv6":  # test-run wants a whole IPv6 header's worth of bytes
        ethertype, packet = b"\x86\xdd", packet.ljust(40, b"\0")
    frame = destination_mac + bytes.fromhex("02cc00000001") + ethertype + packet
    return hook, frame, device.ifindex, draw(st.sampled_from((0, 0, 1, 0x10)))


def _without_answer_id(frame: bytes) -> bytes:
    """`frame` with the IP id and header checksum of a REJECT's ICMP answer zeroed: the id is
    random, as the kernel's is (the answers' own tests check the checksum)."""
    ip = 14
    if len(frame) >= ip + 21 and frame[ip + 9] == 1 and frame[ip + 20] == 3:  # ICMP unreachable
        return frame[: ip + 4] + bytes(2) + frame[ip + 6 : ip + 10] + bytes(2) + frame[ip + 12 :]
    return frame


@pytest.mark.netns
def test_bytecode_and_c_agree_on_ingress_and_egress(router):
    """Test-run in the router's namespace, so that bpf_fib_lookup sees its routes: the two
    backends' ingress and egress programs give the same verdict, move the same counters and
    leave the same bytes (the fast path rewrites TTL, checksum and MACs)."""
    namespace = router.router.namespace
    local = local_addresses(namespace)
    sources = interface_addresses(namespace)  # where a REJECT's answers come from
    with namespace.enter():
        interfaces = {
            "eth0": router.router.client_side.ifindex,
            "eth1": router.router.server_side.ifindex,
        }
    ran = 0
    covered: set[str] = set()  # chains whose counters moved, verdicts seen

    @given(
        ruleset=rulesets(),
        fastpath=st.booleans(),
        frames=st.lists(
            hook_frames(router), min_size=FRAMES_PER_HOOK * 3, max_size=FRAMES_PER_HOOK * 3
        ),
    )
    def agree(ruleset, fastpath, frames):
        nonlocal ran
        layout = CounterLayout.of(ruleset)
        with ExitStack() as stack:
            maps = {}
            for backend in ("bytecode", "c"):
                counters = stack.enter_context(CounterMap(layout))
                devices = stack.enter_context(
                    Map(MapType.HASH, 4, INTERFACE_VALUE_SIZE, 16, name=INTERFACE_ADDRESSES)
                )
                fill_interface_map(devices, sources)
                limits = stack.enter_context(RateMaps.create())  # unconfigured: no limits
                maps[backend] = {
                    COUNTERS_MAP: counters,
                    INTERFACE_ADDRESSES: devices,
                    **limits.maps,
                }
            programs = {
                "bytecode": {
                    hook: stack.enter_context(
                        closing(
                            load_program(ruleset, hook, interfaces=interfaces,
                                         maps=maps["bytecode"], fastpath=fastpath, local=local,
                                         bridges=False)
                        )
                    )
                    for hook in ("ingress", "egress")
                },
                "c": dict(
                    zip(
                        ("ingress", "egress"),
                        [stack.enter_context(closing(program)) for program in load_c_programs(
                            ruleset, [Entry("ingress"), Entry("egress")], interfaces=interfaces,
                            maps=maps["c"], fastpath=fastpath, local=local,
                            bridges=False)],  # the router bridges nothing
                        strict=True,
                    )
                ),
            }  # fmt: skip
            for hook, frame, ifindex, mark in frames:
                seen = {}
                for backend in ("bytecode", "c"):
                    counters = maps[backend][COUNTERS_MAP]
                    before = counters.read()
                    with namespace.enter():
                        result = prog_test_run(
                            programs[backend][hook].fd,
                            frame,
                            context=SkBuff(ifindex=ifindex, mark=mark),
                        )
                    after = counters.read()
                    moved = {k: v for k, v in after.items() if before.get(k) != v}
                    seen[backend] = (result.retval, _without_answer_id(result.data), moved)
                    covered.update(chain or "not handled" for chain, _ in moved)
                    covered.add(TcAction(result.retval).name)
                assert seen["bytecode"] == seen["c"], (
                    f"{write(ruleset)}fastpath={fastpath} {hook} ifindex={ifindex} mark={mark}\n"
                    f"frame {frame.hex()}\nbytecode {seen['bytecode']}\nc        {seen['c']}"
                )
                ran += 1

    # More under a bigger profile: `--hypothesis-profile=deep` runs 250 rule sets.
    examples = max(HOOK_RULESETS, settings.default.max_examples // 20)
    settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))(agree)()
    assert ran >= examples * FRAMES_PER_HOOK * 3
    # Every path was taken: both classifications, OUTPUT, not handled, passes and drops (the
    # fast path, when drawn, too; test_the_fast_path_rewrites_alike takes it every time).
    assert {"INPUT", "FORWARD", "OUTPUT", "not handled", "OK", "SHOT"} <= covered


def test_the_fast_path_rewrites_alike(router):
    """Forwarded by the programs themselves: both backends redirect to the server's side with
    the TTL decremented, the checksum fixed up and the MACs from the lookup."""
    text = SMALL.replace("-A OUTPUT", "-A FORWARD -p udp -j ACCEPT\n-A OUTPUT", 1)
    ruleset = parse(text)
    namespace = router.router.namespace
    client_side, server_side = router.router.client_side, router.router.server_side
    interfaces = {"eth0": client_side.ifindex, "eth1": server_side.ifindex}
    packet = bytes(IP(src="198.18.1.1", dst="198.18.2.1", ttl=9) / UDP(dport=7) / b"fast")
    frame = _mac(client_side.mac) + bytes.fromhex("02cc00000001") + b"\x08\x00" + packet
    results = {}
    for backend in ("bytecode", "c"):
        with (
            CounterMap(CounterLayout.of(ruleset)) as counters,
        ):
            maps = {COUNTERS_MAP: counters}
            with load_program(
                ruleset, "ingress", interfaces=interfaces, maps=maps, fastpath=True,
                backend=backend,
            ) as program, namespace.enter():  # fmt: skip
                result = prog_test_run(
                    program.fd, frame, context=SkBuff(ifindex=client_side.ifindex)
                )
            results[backend] = (result.retval, result.data, counters.read()[("FORWARD", 1)])
    assert results["bytecode"] == results["c"]
    retval, data, counted = results["c"]
    assert retval == TcAction.REDIRECT and counted == (1, len(packet))
    forwarded = IP(data[14:])
    assert data[:12] == _mac(router.server.mac) + _mac(server_side.mac)  # next hop, our side
    assert forwarded.ttl == 8 and IP(bytes(forwarded)).chksum == forwarded.chksum
