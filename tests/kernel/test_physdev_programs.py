"""-m physdev under test-run: the evaluator, the bytecode and the C chain programs given the same
bridge ports (harness.runner's `bridge_ports`: the chain program reads them from cb[3] and
cb[4]) must give the same verdict, deciding rule and counters, for rule sets drawn over the
bridge host's names and packets crossing every way: bridged (both ports), to the bridge or
routed on from a port (the in-port alone), and with no bridge information at all."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from codegen.rules import evaluate, parse
from harness.runner import ChainRunner, frame_for
from tests.bridge_strategies import bridge_rulesets
from tests.kernel.test_three_way import OneCompileRunner, report

pytestmark = pytest.mark.privileged

DEVICES = ("br0", "eth1", "port1", "port2", "pa")
_PORTS = st.sampled_from(("port1", "port2", "pa"))


@st.composite
def _case(draw: st.DrawFn):
    chain = draw(st.sampled_from(("INPUT", "FORWARD", "OUTPUT")))
    kind = draw(st.sampled_from(("bridged", "bridged", "from a port", "from a port", "none")))
    if chain == "OUTPUT" or kind == "none":
        ports = None
    elif kind == "bridged" and chain == "FORWARD":
        ports = (draw(_PORTS), draw(_PORTS))
    else:
        ports = (draw(_PORTS), None)
    in_iface = None if chain == "OUTPUT" else draw(st.sampled_from(("br0", "eth1")))
    out_iface = None if chain == "INPUT" else draw(st.sampled_from(("br0", "eth1")))
    packet = bytes(
        IP(src="198.18.4.2", dst="198.18.4.3", ttl=64)
        / UDP(sport=draw(st.integers(1, 65535)), dport=53)
        / b"x"
    )
    return chain, in_iface, out_iface, ports, packet


@pytest.mark.bcc
@settings(max_examples=max(12, settings().max_examples // 8), deadline=None)
@given(text=bridge_rulesets(probing=True), cases=st.lists(_case(), min_size=6, max_size=6))
def test_evaluator_bytecode_and_c_agree_on_bridge_ports(text, cases) -> None:
    ruleset = parse(text, "<drawn>")
    with ChainRunner(ruleset, DEVICES) as bytecode, OneCompileRunner(ruleset, DEVICES) as c:
        for chain, in_iface, out_iface, ports, packet in cases:
            frame = frame_for(packet)
            voices = {
                "evaluator": evaluate(
                    ruleset, packet, chain, in_iface, out_iface, bridge_ports=ports
                ),
                "bytecode": bytecode.run(frame, chain, in_iface, out_iface, bridge_ports=ports),
                "c": c.run(frame, chain, in_iface, out_iface, bridge_ports=ports),
            }
            case = f"chain {chain} in={in_iface} out={out_iface} ports={ports}"
            problem = report(ruleset, case, voices)
            if problem is not None:
                pytest.fail(problem, pytrace=False)
