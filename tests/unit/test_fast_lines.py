"""The fast path for generated rule lines (codegen.rules.fast_lines) against the full parser:
for rule sets made of lines in and around its shape (edge values, lines it must leave to the
full parser, lines the full parser refuses), both paths give the same rules, sources and
counters included, or the same errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import restore
from codegen.rules.syntax import ParseError


def _mostly(valid: list[str], invalid: list[str]) -> st.SearchStrategy[str]:
    """A value of `valid` nine times in ten, else one of `invalid`."""
    return st.one_of(*[st.sampled_from(valid)] * 9, st.sampled_from(invalid))


_octets = st.sampled_from(["0", "1", "9", "10", "99", "100", "198", "249", "255"])
_prefixes = _mostly(["", "/0", "/1", "/8", "/24", "/31", "/32"], ["/33", "/032"])
_ports = _mostly(["0", "1", "22", "1023", "65535"], ["65536", "080", "http"])
_names = _mostly(["eth0", "veth1", "br-1a2b", "eth0.100", "wg0"], ["eth+", "a" * 16, "+"])


@st.composite
def _lines(draw: st.DrawFn) -> str:
    words = ["-A", draw(_mostly(["INPUT", "FORWARD", "OUTPUT", "mine"], ["absent"]))]
    for option in ("-s", "-d"):
        if draw(st.booleans()):
            net = ".".join(draw(st.lists(_octets, min_size=4, max_size=4)))
            net = draw(_mostly([net], [net + ".1", net.replace(".", ".0", 1), "256.0.0.1"]))
            words += [option, net + draw(_prefixes)]
    for option in ("-i", "-o"):
        if draw(st.integers(0, 3)) == 0:
            words += [option, draw(_names)]
    if draw(st.booleans()):
        protocol = draw(st.sampled_from(["tcp", "udp"]))
        words += ["-p", protocol]
        if draw(st.booleans()):
            words += ["-m", draw(st.sampled_from([protocol, protocol, "tcp", "udp"]))]
        for option in ("--sport", "--dport"):
            if draw(st.booleans()):
                ports = draw(_ports)
                if draw(st.booleans()):
                    ports += ":" + draw(_ports)
                words += [option, ports]
    words += ["-j", draw(_mostly(["ACCEPT", "DROP"], ["mine", "REJECT", "RETURN"]))]
    line = " ".join(words)
    if draw(st.integers(0, 4)) == 0:
        line = f"[{draw(st.integers(0, 9))}:{draw(st.integers(0, 99))}] " + line
    return line


def _parsed(text: str) -> object:
    try:
        ruleset = restore.parse(text, "gen.rules")
    except ParseError as error:
        return ("error", str(error))
    return [(name, chain.policy, chain.rules) for name, chain in ruleset.chains.items()]


def _rules(lines: list[str]) -> str:
    return "*filter\n:INPUT ACCEPT [0:0]\n:mine - [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n"


@settings(max_examples=400)
@given(st.lists(_lines(), min_size=1, max_size=8))
def test_both_paths_read_the_same_rules(lines: list[str]) -> None:
    # Each line alone (one refused line makes the whole text an error), then all together.
    texts = [_rules([line]) for line in lines] + [_rules(lines)]
    fast = [_parsed(text) for text in texts]
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(restore, "read_rule", lambda *_: False)
        full = [_parsed(text) for text in texts]
    assert fast == full


def test_the_fast_path_reads_the_generated_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lines of the benchmark's shapes go the fast way (a full parser that is never
    reached on them), and a line it leaves alone still goes the full way."""
    taken: list[str] = []
    real = restore.read_rule

    def counted(line, text, *rest):  # type: ignore[no-untyped-def]
        read = real(line, text, *rest)
        if read:
            taken.append(text)
        return read

    monkeypatch.setattr(restore, "read_rule", counted)
    lines = [
        "-A INPUT -s 198.18.0.0/15 -d 198.18.0.2/32 -i eth0 -p tcp -m tcp --dport 1:2 -j DROP",
        "[3:180] -A INPUT -s 198.19.1.1/32 -p udp -m udp --sport 53 -j ACCEPT",
        "-A INPUT -p tcp -m tcp --dport 22 -j DROP",
        "-A INPUT -p tcp -m tcp --dport ssh -j DROP",  # a service name: the full parser
        "-A INPUT -s 198.18.0.0/15 -j mine",  # a jump: the full parser
    ]
    ruleset = restore.parse(_rules(lines), "shapes.rules")
    assert taken == [lines[0], lines[1].removeprefix("[3:180] "), lines[2]]
    rules = ruleset.chains["INPUT"].rules
    assert len(rules) == 5 and (rules[1].packets, rules[1].bytes) == (3, 180)
    assert rules[1].source.column == 9 and rules[0].source.line == 4
    # What the fast path leaves alone is still refused as iptables refuses it.
    for line, refusal in (
        ("-A INPUT -p tcp -m tcp --dport 22:21 -j DROP", "invalid port range '22:21'"),
        ("-A OUTPUT -i eth0 -j DROP", "-i"),
        ("-A absent -j DROP", "chain 'absent' does not exist"),
    ):
        with pytest.raises(ParseError, match=refusal):
            restore.parse(_rules([line]), "refused.rules")
