"""Any text either parses into a Ruleset that writes and reads back to itself, or raises a
RuleError (ParseError); never another exception."""

from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.rules import RuleError, Ruleset, parse, write

WORDS = [
    "-A", "-I", "-N", "-P", "-F", "-X", "-Z", "INPUT", "FORWARD", "OUTPUT", "u", "!", "-s", "-d",
    "-i", "-o", "-p", "-f", "-j", "-g", "-m", "-c", "tcp", "udp", "icmp", "all", "6", "--dport",
    "--sport", "--syn", "--tcp-flags", "SYN,ACK", "ALL", "--icmp-type", "echo-request", "3/3",
    "multiport", "--dports", "--ports", "1,2:3", "iprange", "--src-range", "1.2.3.4-1.2.3.9",
    "length", "--length", "10:20", "ttl", "--ttl-eq", "--ttl-lt", "pkttype", "--pkt-type",
    "broadcast", "mark", "--mark", "0x1/0xff", "comment", "--comment", '"a b"', "ACCEPT", "DROP",
    "RETURN", "198.18.0.1", "198.18.0.0/15", "1.2.3.4,5.6.7.8", "eth+", "veth0", "22", "65535",
    "99999", "0x16", "--d", "--dp", "--dport=5", "state", "REJECT", "[1:2]", "1", "2", "",
]  # fmt: skip
HEAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:u - [0:0]\n"


def check(text: str) -> None:
    try:
        ruleset = parse(text, "fuzz")
    except RuleError as error:
        assert str(error)
        return
    assert isinstance(ruleset, Ruleset)
    assert parse(write(ruleset, counters=True)) == ruleset


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_any_text(text: str) -> None:
    check(text)


@settings(max_examples=300)
@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=12), max_size=6))
def test_rule_shaped_lines(lines: list[list[str]]) -> None:
    check(HEAD + "".join(" ".join(words) + "\n" for words in lines) + "COMMIT\n")


@settings(max_examples=300)
@given(
    st.lists(
        st.text(
            alphabet=st.sampled_from(list('-AIN P!sdjgm"\\:[]*# \t0123456789tcpu,./')), max_size=40
        ),
        max_size=8,
    )
)
def test_line_noise(lines: list[str]) -> None:
    check("*filter\n" + "\n".join(lines) + "\nCOMMIT\n")
