"""`-j MARK` in the generated programs under BPF_PROG_TEST_RUN, against the reference evaluator,
by the bytecode and the C backend: the verdict, the deciding rule, every counter that moved and
the mark the skb comes back with (BPF_PROG_TEST_RUN returns the context the program left).

The rule sets are the real patterns (Tailscale's mark-then-accept in one user chain, k3s's bit
set in a user chain and tested with `! --mark` by its caller, then cleared) and the places a
mark must survive: a user chain's global function and its caller, a goto whose chain returns,
chunk functions of a long built-in chain and of a long user chain (the facts are shared
through the pointer each is given), a rule whose tcp match may hotdrop, and LOG lines after a
MARK (their MARK= is the new mark, as the kernel's LOG prints skb->mark)."""

from __future__ import annotations

import json

import pytest
from scapy.layers.inet import IP, TCP, UDP

from codegen.rules import evaluate, parse, write
from codegen.rules.extensions.log_line import LoggedPacket, logged_lines
from codegen.rules.model import Ruleset
from codegen.tc.chains import CHUNK_RULES
from harness.runner import ChainRunner, frame_for
from tests.kernel.test_cli import bpflab

pytestmark = pytest.mark.privileged
BACKENDS = [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]

SRC, DST = "198.18.0.5", "198.18.1.1"
PACKETS = {
    "udp": bytes(IP(src=SRC, dst=DST) / UDP(sport=4000, dport=53) / b"q"),
    "tcp": bytes(IP(src=SRC, dst=DST) / TCP(sport=4000, dport=22, flags="S")),
    "short tcp": bytes(IP(src=SRC, dst=DST, proto=6) / bytes(8)),  # the tcp match hotdrops
}
MARKS = (0, 0x1, 0x10000, 0x40000, 0x30000, 0xFFFFFFFF)
# (chain, in, out): each chain with each device the rule sets tell apart
PLACES = (
    ("INPUT", "eth0", None),
    ("INPUT", "tailscale0", None),
    ("INPUT", "lan0", None),
    ("FORWARD", "tailscale0", "eth0"),
    ("FORWARD", "eth0", "tailscale0"),
    ("FORWARD", "lan0", "eth0"),
    ("OUTPUT", None, "eth0"),
    ("OUTPUT", None, "tailscale0"),
)
DEVICES = ("eth0", "tailscale0", "lan0")

TAILSCALE = """*filter
:ts-forward - [0:0]
-A FORWARD -j ts-forward
-A ts-forward -i tailscale0 -j MARK --set-xmark 0x40000/0xffffffff
-A ts-forward -m mark --mark 0x40000/0xff0000 -j ACCEPT
-A ts-forward -s 100.64.0.0/10 -o tailscale0 -j DROP
-A ts-forward -o tailscale0 -j ACCEPT
-A FORWARD -j DROP
COMMIT
"""

# k3s's kube-router: a policy chain sets 0x10000 for what it allows, the pod chain (its caller)
# rejects or drops what is unmarked, then clears the bit and sets 0x20000, which the built-in
# chain accepts.
K3S = """*filter
:pod-fw - [0:0]
:policy - [0:0]
:default - [0:0]
-A INPUT -j pod-fw
-A INPUT -m mark --mark 0x20000/0x20000 -j ACCEPT
-A INPUT -j DROP
-A FORWARD -i lan0 -j pod-fw
-A FORWARD -m mark --mark 0x20000/0x20000 -j ACCEPT
-A OUTPUT -j pod-fw
-A OUTPUT -m mark --mark 0x20000/0x20000 -m mark ! --mark 0x10000/0x10000 -j ACCEPT
-A OUTPUT -j DROP
-A pod-fw -j policy
-A pod-fw -m mark ! --mark 0x10000/0x10000 -p tcp --dport 22 -j DROP
-A pod-fw -m mark ! --mark 0x10000/0x10000 -j REJECT
-A pod-fw -j MARK --set-xmark 0x0/0x10000
-A pod-fw -j MARK --set-xmark 0x20000/0x20000
-A policy -p udp -j default
-A policy -i tailscale0 -j default
-A policy -o tailscale0 -g default
-A default -j MARK --set-xmark 0x10000/0x10000
-A default -j RETURN
-A default -j MARK --set-xmark 0x0/0xffffffff
COMMIT
"""

# Every operation, in a row and in a goto's chain that returns to the built-in chain's policy.
OPERATIONS = """*filter
:ops - [0:0]
-A INPUT -j MARK --xor-mark 0x3
-A INPUT -m mark --mark 0x2 -j DROP
-A INPUT -j MARK --and-mark 0xffff00ff
-A INPUT -j MARK --or-mark 0x100
-A INPUT -m mark --mark 0x100/0xff0f -j ACCEPT
-A INPUT -g ops
-A FORWARD -j MARK --set-mark 0x5/0xf0
-A FORWARD -m mark ! --mark 0x5/0xff -j DROP
-A FORWARD -j MARK --set-xmark 0x0/0x0
-A FORWARD -g ops
-A OUTPUT -p tcp --dport 22 -j MARK --set-xmark 0x7/0xf
-A OUTPUT -p tcp -m mark --mark 0x7/0xf -j ACCEPT
-A OUTPUT -j ops
-A OUTPUT -m mark --mark 0x80000000/0x80000000 -j DROP
-A ops -j MARK --xor-mark 0x80000000
-A ops -m mark --mark 0x80000000/0x80000000 -j RETURN
-A ops -j MARK --set-mark 0xabc
COMMIT
"""


def _long() -> str:
    """A built-in chain and a user chain longer than one chunk function: the mark set in one
    chunk is matched in another, and a mark set deep in the user chain by its caller."""
    filler = CHUNK_RULES + 40
    lines = ["*filter", ":long - [0:0]", "-A INPUT -i tailscale0 -j MARK --or-mark 0x1"]
    lines += [f"-A INPUT -s 10.0.{i // 250}.{i % 250 + 1}/32 -j DROP" for i in range(filler)]
    lines += ["-A INPUT -m mark --mark 0x1/0x1 -j long", "-A INPUT -m mark --mark 0x40000 -j DROP"]
    lines += [f"-A long -d 10.1.{i // 250}.{i % 250 + 1}/32 -j DROP" for i in range(filler)]
    lines += ["-A long -m mark --mark 0x1/0x1 -j MARK --set-xmark 0x40000/0xffffffff"]
    lines += [
        "-A OUTPUT -j long",
        "-A OUTPUT -m mark --mark 0x40000 -j ACCEPT",
        "-A OUTPUT -j DROP",
    ]
    return "\n".join([*lines, "COMMIT", ""])


def _many() -> str:
    """Many MARK rules in one function (clang once kept &skb->mark in a register for them all,
    which the verifier refuses), each bit set, tested and some cleared, in INPUT and in a user
    chain OUTPUT calls."""
    lines = ["*filter", ":bits - [0:0]"]
    for chain in ("INPUT", "bits"):
        for bit in range(24):
            lines.append(f"-A {chain} -p udp -j MARK --set-xmark 0x{1 << bit:x}/0x{1 << bit:x}")
            lines.append(f"-A {chain} -m mark --mark 0x{1 << bit:x}/0x{1 << bit:x} -j MARK"
                         f" --xor-mark 0x{1 << (bit + 8) % 32:x}")  # fmt: skip
            lines.append(f"-A {chain} -m mark --mark 0x0/0x{1 << bit:x} -j DROP")
    lines += ["-A OUTPUT -j bits", "-A OUTPUT -m mark --mark 0xffffff00/0xffffff00 -j DROP"]
    return "\n".join([*lines, "COMMIT", ""])


RULESETS = {
    "tailscale": TAILSCALE,
    "k3s": K3S,
    "operations": OPERATIONS,
    "long": _long(),
    "many": _many(),
}


def _differences(ruleset: Ruleset, runner: ChainRunner) -> tuple[list[str], int]:
    """What the programs said unlike the reference, and in how many cases the mark changed."""
    differences, changed = [], 0
    for chain, inside, outside in PLACES:
        for name, packet in PACKETS.items():
            for mark in MARKS:
                ours = runner.run(frame_for(packet), chain, inside, outside, mark=mark)
                expected = evaluate(ruleset, packet, chain, inside, outside, mark=mark)
                said = (ours.verdict, ours.deciding, ours.counters, ours.mark)
                wanted = (expected.verdict, expected.deciding, expected.counters, expected.mark)
                if said != wanted:
                    differences.append(
                        f"{chain} {inside}->{outside} {name} mark {mark:#x}: program "
                        f"{said[0]} by {said[1]} mark {said[3]:#x}, reference {wanted[0]} by "
                        f"{wanted[1]} mark {wanted[3]:#x}"
                    )
                changed += expected.mark != mark
    return differences, changed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(RULESETS))
def test_the_programs_mark_as_the_reference_does(name: str, backend: str) -> None:
    ruleset = parse(RULESETS[name], name)
    with ChainRunner(ruleset, DEVICES, backend=backend) as runner:  # type: ignore[arg-type]
        differences, changed = _differences(ruleset, runner)
    assert not differences, f"{write(ruleset)[:2000]}\n" + "\n".join(differences[:20])
    # The MARK rules ran: many packets leave with a mark other than the one they came with.
    assert changed >= len(MARKS), changed


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_log_line_after_a_mark_says_the_new_mark(backend: str) -> None:
    ruleset = parse(
        "*filter\n:audit - [0:0]\n-A INPUT -j LOG --log-prefix before:\n"
        "-A INPUT -j MARK --or-mark 0x2a\n-A INPUT -j audit\n"
        '-A audit -j LOG --log-prefix "in audit:"\n-A audit -j MARK --set-xmark 0x0/0xffffffff\n'
        "-A INPUT -j LOG --log-prefix after:\nCOMMIT\n",
        "log",
    )
    packet = PACKETS["udp"]
    with ChainRunner(ruleset, DEVICES, backend=backend) as runner:  # type: ignore[arg-type]
        for mark in (0, 0x100):
            ours = runner.run(frame_for(packet), "INPUT", "eth0", None, mark=mark)
            expected = evaluate(ruleset, packet, "INPUT", "eth0", None, mark=mark)
            seen = LoggedPacket(packet, "eth0", "", mac=frame_for(packet)[:14], mark=mark)
            lines = logged_lines(ruleset, expected.logged, seen, expected.logged_marks)
            assert ours.log == tuple(lines)
            assert expected.logged_marks == (mark, mark | 0x2A, 0)
            assert f"MARK=0x{mark | 0x2A:x} " in lines[1] and "MARK=" not in lines[2]
            assert ours.mark == expected.mark == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bpflab_run_says_the_mark_the_rules_left(backend: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tailscale.rules"
    path.write_text(TAILSCALE)
    packet = 'Ether()/IP(src="198.18.0.5", dst="198.18.1.1")/UDP(dport=53)'
    common = ["--backend", backend, "--chain", "FORWARD", "--out", "eth0", "--packet", packet]
    marked = bpflab("run", str(path), "--in", "tailscale0", *common)
    plain = bpflab("run", str(path), "--in", "eth0", *common, "--json")
    assert marked.returncode == 0 and plain.returncode == 0, marked.stderr + plain.stderr
    assert "packet 1: ACCEPT by ts-forward rule 2, mark 0x40000" in marked.stdout, marked.stdout
    first = json.loads(plain.stdout.splitlines()[0])
    assert first["verdict"] == "DROP" and "mark" not in first, plain.stdout
