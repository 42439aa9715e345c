"""`-m policy` against the kernel: the same traffic (UDP, ICMP and TCP from a client, on a
host whose INPUT and a user chain hold policy matches) through iptables-legacy and through
our attached programs (lifecycle apply, both backends), every rule's counters what the
reference says.

This machine's kernel has XFRM but no transform (CONFIG_INET_ESP, _AH and _IPCOMP are off:
`ip xfrm state add ... proto esp` is refused), so no packet here ever carries a security
path: netfilter judges `--pol none` true and `--pol ipsec` false for all of them, and so must
we, which is what this test holds. The comparisons over paths are held to the reference under
BPF_PROG_TEST_RUN (tests/kernel/test_policy_programs.py). The blob, iptables-save and `-L`
of every example are iptables-legacy's own, and what iptables refuses we refuse.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from codegen.rules import evaluate, parse
from codegen.rules.extensions.policy import EXTENSION as POLICY
from codegen.rules.model import RuleError
from codegen.rules.validation import validate
from harness.deploy.lifecycle import apply, current, flush
from harness.lab.waiting import until
from netns import HostTopology
from netns.namespace import CommandError, Namespace
from tests.net.test_ipt_blob import assert_iptables_own, counters, restore, save

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

RULES = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:vpn - [0:0]
-A INPUT -p udp -m policy --dir in --pol ipsec --proto esp -j ACCEPT
-A INPUT -m policy --dir in --pol none -p icmp
-A INPUT -m policy --dir in --pol ipsec
-A INPUT -m policy --dir in --pol ipsec --strict --reqid 1 --spi 0x1 --proto ipcomp
-A INPUT -p tcp -j vpn
-A INPUT -p udp -m policy --dir in --pol none --dport 5001 -j DROP
-A INPUT -m policy --dir in --pol ipsec ! --mode tunnel
-A vpn -m policy --dir in --pol ipsec --mode tunnel --tunnel-src 198.18.0.0/15 -j ACCEPT
-A vpn -m policy --dir in --pol none -j RETURN
-A FORWARD -m policy --dir in --pol none
COMMIT
"""
CLIENT, HOST = "198.18.0.1", "198.18.0.2"


def _traffic() -> list[bytes]:
    """What the client sends the host, as the host's INPUT sees it."""
    return [
        bytes(IP(src=CLIENT, dst=HOST, id=1) / UDP(sport=4000, dport=5000) / (b"a" * 10)),
        bytes(IP(src=CLIENT, dst=HOST, id=2) / UDP(sport=4000, dport=5001) / (b"b" * 11)),
        bytes(IP(src=CLIENT, dst=HOST, id=3) / ICMP(type=8, id=5, seq=1) / (b"c" * 12)),
        bytes(IP(src=CLIENT, dst=HOST, id=4) / TCP(sport=4001, dport=22, flags="S", seq=1)),
    ]


def _send(topology: HostTopology) -> None:
    client = topology.client
    with client.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)) as sock:
        sock.bind((client.ifname, 0))
        for packet in _traffic():
            sock.send(bytes(Ether(src=client.mac, dst=topology.host.mac) / IP(packet)))
            time.sleep(0.02)
    time.sleep(0.2)


def _expected() -> dict:
    """INPUT's and vpn's counters as the reference adds them up, for packets without a
    security path (the only kind this kernel has)."""
    ruleset = parse(RULES, "policy")
    total = {key: (0, 0) for key in counters(ruleset) if key[0] != "OUTPUT"}
    for packet in _traffic():
        result = evaluate(ruleset, packet, "INPUT", "eth0", None, secpath=None)
        for key, (packets, size) in result.counters.items():
            total[key] = (total[key][0] + packets, total[key][1] + size)
    return total


def test_this_kernel_has_no_ipsec_transform() -> None:
    """What the module's docstring rests on: a state of any transform is refused here."""
    state = ["ip", "xfrm", "state", "add", "src", CLIENT, "dst", HOST, "spi", "0x100"]
    transforms = (
        ["proto", "esp", "mode", "tunnel", "enc", "cbc(aes)", "0x" + "11" * 16],
        ["proto", "ah", "mode", "tunnel", "auth", "hmac(sha256)", "0x" + "22" * 32],
        ["proto", "comp", "mode", "tunnel", "comp", "deflate", ""],
    )
    with Namespace() as ns:
        for transform in transforms:
            with pytest.raises(CommandError):
                ns.run(state + [word for word in transform if word])


@pytest.mark.parametrize(
    "backend", [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]
)
def test_iptables_and_our_programs_count_what_the_reference_says(
    tmp_path: Path, backend: str
) -> None:
    want = _expected()
    assert want["INPUT", 2][0] == 1 and want["INPUT", 6][0] == 1  # none holds: icmp, :5001
    assert want["vpn", 2][0] == 1 and want["INPUT", 1] == (0, 0)  # ipsec never does
    with HostTopology(ipv6=False) as topology:
        host = topology.host.namespace
        restore(host, RULES, tmp_path)
        _send(topology)
        kernel = until(
            lambda: counters(parse("\n".join(save(host, counters=True)) + "\n", "kernel")),
            lambda kernel: {key: kernel[key] for key in want} == want,
        )
        assert {key: kernel[key] for key in want} == want
        host.run(["iptables-legacy", "-F"])
        host.run(["iptables-legacy", "-X"])
        apply(RULES, "policy", host.name, backend=backend)
        try:
            _send(topology)
            ours = until(
                lambda: current(host.name)[1],
                lambda ours: {key: ours[key] for key in want} == want,
            )
        finally:
            flush(host.name)
    assert {key: ours[key] for key in want} == want


BLOB_RULES = (
    "*filter\n:c - [0:0]\n-A INPUT -j c\n"
    + "".join(
        f"-A {'FORWARD' if '--dir out' in example else 'INPUT'} {example} -j ACCEPT\n"
        + ("" if "--dir out" in example else f"-A c {example}\n")
        for example in POLICY.examples
    )
    + "-A INPUT -m policy --pol ipsec --dir in --tunnel-dst 198.18.0.2 --mode tunnel\n"
    + "-A INPUT -m policy --dir in --pol none --reqid 3\n"
    + "COMMIT\n"
)


def test_the_blob_save_and_listing_are_iptables_own(tmp_path: Path) -> None:
    saved = assert_iptables_own(BLOB_RULES, tmp_path)
    assert "-A INPUT -m policy --dir in --pol none" in saved  # its element is the blob's only


@pytest.mark.parametrize(
    "rules",
    [
        "-A OUTPUT -m policy --dir in --pol none",
        "-A INPUT -m policy --dir out --pol none",
        "-A c -m policy --dir in --pol ipsec\n-A OUTPUT -j c",
        "-A INPUT -m policy --dir in --pol ipsec --strict",
        "-A INPUT -m policy --dir in --tunnel-src 10.0.0.1",
        "-A INPUT -m policy --dir in --next --reqid 1",
        "-A INPUT -m policy --pol none",
    ],
)
def test_what_iptables_refuses_we_refuse(rules: str, tmp_path: Path) -> None:
    text = f"*filter\n:c - [0:0]\n{rules}\nCOMMIT\n"
    with Namespace() as ns:
        with pytest.raises(CommandError):
            restore(ns, text, tmp_path)
    with pytest.raises(RuleError):
        validate(parse(text, "refused"))
