"""Packet scripts are checked before anything runs: each mistake is `FILE:LINE: error: ...`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.lab.scripts import ScriptError, load_script

ROOT = Path(__file__).resolve().parents[2]

GOOD = '''description = "ok"
topology = "router"
fastpath = true
rules = """
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p udp --dport 53 -j ACCEPT
COMMIT
"""
[[packets]]
from = "client"
to = "server"
packet = 'UDP(sport=4000, dport=53)/Raw(b"q")'
expect = "pass"
count = 3
[counters]
"FORWARD:1" = { packets = 3 }
"FORWARD:policy" = { packets = 0, bytes = 0 }
'''


def commands(value: str) -> str:
    """A host script whose rules are `commands = VALUE` (on line 3)."""
    return (
        f'description = "commands"\ntopology = "host"\ncommands = {value}\n'
        '[[packets]]\nfrom = "client"\nto = "host"\npacket = "UDP(dport=7)"\nexpect = "pass"\n'
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "script.toml"
    path.write_text(text)
    return path


def test_a_good_script_loads(tmp_path):
    script = load_script(write(tmp_path, GOOD))
    assert (script.topology, script.fastpath, script.holder) == ("router", True, "router")
    (entry,) = script.packets
    assert (entry.source, entry.destination, entry.chain, entry.count) == (
        "client",
        "server",
        "FORWARD",
        3,
    )
    assert [(c.chain, c.index, c.packets, c.bytes) for c in script.counters] == [
        ("FORWARD", 1, 3, None),
        ("FORWARD", "policy", 0, 0),
    ]


def replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD = [
    ("not toml", GOOD + "x = [\n", 21, "not valid TOML"),
    (
        "unknown key",
        replace("fastpath = true", "fastpath = true\nspeed = 3"),
        4,
        "unknown key 'speed'",
    ),
    (
        "bad topology",
        replace('"router"', '"mesh"'),
        2,
        "topology must be one of 'host', 'router', 'bridge'",
    ),
    (
        "fastpath on host",
        replace('topology = "router"', 'topology = "host"'),
        3,
        "fastpath only applies to the router",
    ),
    ("bad rule", replace("-j ACCEPT", "-j TCPMSS"), 9, "target 'TCPMSS' is not supported"),
    ("node not in topology", replace('to = "server"', 'to = "host"'), 14, "`to` must be one of"),
    ("bad expect", replace('expect = "pass"', 'expect = "maybe"'), 16, "expect must be one of"),
    ("count too big", replace("count = 3", "count = 100000"), 17, "count must be"),
    ("bad packet spec", replace('Raw(b"q")', "Nope()"), 15, "unknown layer 'Nope'"),
    (
        "not IPv4",
        replace("""'UDP(sport=4000, dport=53)/Raw(b"q")'""", "'Ether(type=0x86DD)/Raw(b\"q\")'"),
        15,
        "the packet must be IPv4",
    ),
    (
        "protocol 0 to the router",
        replace('to = "server"', 'to = "router"').replace(
            "UDP(sport=4000, dport=53)", "IP(proto=0)"
        ),
        15,
        "IP protocol 0 to the router: no raw socket receives it",
    ),
    ("counter of a missing rule", replace('"FORWARD:1"', '"FORWARD:7"'), 19, "want CHAIN:N"),
    ("counter of a missing chain", replace('"FORWARD:1"', '"web:1"'), 19, "no chain 'web'"),
    ("no packets", GOOD.split("[[packets]]")[0], 1, "at least one [[packets]]"),
    (
        "commands and rules",
        GOOD.replace("[[packets]]", "commands = ['iptables -L']\n[[packets]]", 1),
        12,
        "give one of rules, rules_file or commands",
    ),
    ("commands not a list", commands('"iptables -L"'), 3, "must be a list of iptables"),
    ("not iptables", commands("[\n  'iptables -N a',\n  'ip6tables -L',\n]"), 5, "start with"),
    (
        "another table",
        commands("[\n  'iptables -t nat -A POSTROUTING -j MASQUERADE',\n]"),
        4,
        "for the filter table, not -t nat",
    ),
    (
        "both packet and pcap",
        replace("count = 3", 'count = 3\npcap = "x.pcap"'),
        15,
        "exactly one of `packet`",
    ),
]


@pytest.mark.parametrize(("name", "text", "line", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_scripts_name_file_and_line(tmp_path, name, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ScriptError) as caught:
        load_script(path)
    assert str(caught.value).startswith(f"{path}:{line}: error: "), str(caught.value)
    assert message in str(caught.value)


def _bundled(path: Path):
    """A bundled script loaded; one given as commands runs them on the kernel first, which
    needs root: without it, the one sentence saying so."""
    if "commands = [" in path.read_text() and os.geteuid() != 0:
        with pytest.raises(ScriptError, match="needs root and namespaces"):
            load_script(path)
        return None
    return load_script(path)


def test_every_bundled_script_loads():
    paths = sorted((ROOT / "tests" / "scripts").glob("*.toml"))
    paths += sorted((ROOT / "examples").glob("*.toml"))
    assert len(paths) >= 12
    scripts = [script for script in map(_bundled, paths) if script is not None]
    chains = {entry.chain for script in scripts for entry in script.packets}
    topologies = {script.topology for script in scripts}
    fastpaths = {script.fastpath for script in scripts if script.topology == "router"}
    assert chains == {"INPUT", "FORWARD", "OUTPUT"}
    assert topologies == {"host", "router", "bridge"}
    assert fastpaths == {True, False}
