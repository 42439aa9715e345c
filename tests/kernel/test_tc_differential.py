"""The generated programs against the reference evaluator on random rule sets and packets.

Each example is a rule set and a handful of packets for each built-in chain; every packet runs
through the chain program with BPF_PROG_TEST_RUN and through `evaluate`, and verdict, deciding
rule and every moved counter must be equal. CI runs a fixed seed (profile `ci`); more with
`--hypothesis-profile=deep`.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import Address, Protocol, evaluate, write
from codegen.rules.extensions.icmp import IcmpMatch
from codegen.rules.extensions.multiport import Multiport
from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.reject import Reject
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.validation import validate
from harness.runner import ChainRunner, frame_for
from tests.strategies import packets, rulesets

pytestmark = pytest.mark.privileged

DEVICES = ("eth0", "eth1", "eth10", "eth0.5", "lo", "wlan0")
INTERFACES = {
    "INPUT": (st.sampled_from(DEVICES), st.none()),
    "FORWARD": (st.sampled_from(DEVICES), st.sampled_from(DEVICES)),
    "OUTPUT": (st.none(), st.sampled_from(DEVICES)),
}
PACKETS_PER_CHAIN = 3
RULESETS = 120  # x 3 chains x 3 packets: over 1,000 cases
CASES_RUN: list[int] = []


@st.composite
def cases(draw: st.DrawFn, chain: str) -> tuple:
    inside, outside = INTERFACES[chain]
    return (
        draw(packets(chain)),
        draw(inside),
        draw(outside),
        draw(st.sampled_from((0, 0, 1, 0x10, 0xFFFFFFFF))),
        draw(st.sampled_from(("host", "host", "broadcast", "multicast"))),
    )


@st.composite
def aimed(draw: st.DrawFn, ruleset, traffic) -> object:
    """Rules re-aimed at the traffic: random rules seldom match random packets (most packets
    would end at a policy), so half the matches are dropped and about half the addresses
    and ports are taken from the packets."""
    packets_seen = [case[0] for cases_ in traffic.values() for case in cases_]

    def field(packet: bytes, name: str) -> int:
        header = (packet[0] & 0x0F) * 4
        if name in ("src", "dst"):
            offset = 12 if name == "src" else 16
            return int.from_bytes(packet[offset : offset + 4], "big")
        offset = header + (0 if name == "sport" else 2)
        return int.from_bytes(packet[offset : offset + 2], "big") if len(packet) > offset + 1 else 0

    def aim(match, packet: bytes, protocol_free: bool):
        if not draw(st.booleans()):
            return match
        if isinstance(match, Address):
            return dataclasses.replace(match, address=field(packet, match.direction) & match.mask)
        if isinstance(match, TcpMatch | UdpMatch):
            port = field(packet, "dport")
            return dataclasses.replace(match, dport=PortRange(port, port, match.dport.negated))
        if isinstance(match, Protocol) and protocol_free and not match.negated:
            return Protocol(packet[9])
        return match

    def keep(match) -> bool:
        return isinstance(match, Protocol) or draw(st.booleans())

    for chain in ruleset.chains.values():
        for rule in chain.rules:
            # Each rule aims at one packet, of its own chain for a built-in chain.
            own = [case[0] for case in traffic.get(chain.name, ())]
            packet = draw(st.sampled_from(own or packets_seen))
            # A protocol stays when a match or the target needs it (REJECT's tcp-reset: -p tcp).
            protocol_free = not any(
                isinstance(m, TcpMatch | UdpMatch | IcmpMatch | Multiport) for m in rule.matches
            ) and not (isinstance(rule.target, Reject) and rule.target.reply == "tcp-reset")
            rule.matches = tuple(
                aim(match, packet, protocol_free) for match in rule.matches if keep(match)
            )
    validate(ruleset)
    return ruleset


@settings(max_examples=RULESETS)
@given(
    ruleset=rulesets(),
    traffic=st.fixed_dictionaries(
        {
            chain: st.lists(cases(chain), min_size=PACKETS_PER_CHAIN, max_size=PACKETS_PER_CHAIN)
            for chain in ("INPUT", "FORWARD", "OUTPUT")
        }
    ),
    data=st.data(),
)
def _agree(ruleset, traffic, data):
    ruleset = data.draw(aimed(ruleset, traffic))
    with ChainRunner(ruleset, DEVICES) as runner:
        for chain, chain_cases in traffic.items():
            for packet, in_iface, out_iface, mark, pkt_type in chain_cases:
                expected = evaluate(
                    ruleset, packet, chain, in_iface, out_iface, mark=mark, pkt_type=pkt_type
                )
                got = runner.run(
                    frame_for(packet), chain, in_iface, out_iface, mark=mark, pkt_type=pkt_type
                )
                detail = (
                    f"\n{write(ruleset)}chain {chain} in={in_iface} out={out_iface} mark={mark:#x} "
                    f"type={pkt_type}\npacket {packet.hex()}\nevaluator {expected}\ngenerated {got}"
                )
                assert (got.verdict, got.deciding) == (expected.verdict, expected.deciding), detail
                assert got.counters == expected.counters, detail
                CASES_RUN.append(1)


def test_generated_programs_agree_with_the_evaluator():
    CASES_RUN.clear()
    _agree()  # hypothesis runs every example here
    assert len(CASES_RUN) >= RULESETS * 3 * PACKETS_PER_CHAIN >= 1000
