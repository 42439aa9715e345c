"""The kernel's filter table blob against iptables-legacy itself, in throwaway namespaces.

For every rule file in tests/rules_corpus/ and a few of our own: (a) a table loaded with
`iptables-legacy-restore -c` reads back (read_table) as the model `parse` makes of the text;
(b) the same model written with write_table saves (`iptables-legacy-save`, with and without -c)
exactly as the restored table does, and its entries are byte for byte the ones
iptables-legacy-restore made; (c) counters written with IPT_SO_SET_ADD_COUNTERS come back
through `iptables-legacy-save -c`. Nothing here touches the root namespace's tables.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from codegen.rules import Ruleset, parse
from codegen.rules.extensions import MATCHES, TARGETS, extension_of
from codegen.rules.ipt_blob import BlobError, read_entries, read_table, write_table
from codegen.rules.model import IP_PART
from codegen.rules.sets import STANDIN_SETS_TEXT
from netns import Namespace

pytestmark = [pytest.mark.netns, pytest.mark.privileged]

ROOT = Path(__file__).resolve().parent.parent.parent
CORPUS = sorted((ROOT / "tests" / "rules_corpus").glob("*.rules"))

# Our own rule sets: every supported match and target in one table, user chain names that
# sort differently bytewise and by locale, and counters at the edges of 64 bits.
EVERY_MATCH = """\
*filter
:INPUT DROP [5:500]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [7:700]
:zeta - [0:0]
:alpha - [0:0]
:Beta - [0:0]
[1:60] -A INPUT -s 198.18.0.0/15 -d 198.18.1.1/32 -i eth+ -p tcp -m tcp --sport 1000:2000 \
--dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -j ACCEPT
[2:120] -A INPUT ! -s 10.0.0.0/255.0.255.0 ! -i veth0 ! -p udp -j DROP
-A INPUT -p udp -m udp ! --sport 53 ! --dport 1:1024 -j alpha
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A INPUT -p icmp -m icmp ! --icmp-type 3/3 -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type any -j ACCEPT
-A INPUT -f -j DROP
-A INPUT ! -f -p tcp ! --syn -g zeta
-A INPUT -p tcp -m multiport --dports 22,80,1000:2000,443 -j ACCEPT
-A INPUT -p udp -m multiport ! --sports 53,67:68 -j ACCEPT
-A INPUT -p tcp -m multiport --ports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j ACCEPT
-A INPUT -m iprange --src-range 198.18.0.1-198.18.0.9 ! --dst-range 198.18.1.0-198.18.1.255 \
-j ACCEPT
-A INPUT -m iprange ! --src-range 198.18.0.5-198.18.0.5 -j DROP
-A INPUT -m length --length 100:200 -j DROP
-A INPUT -m length ! --length 64 -j DROP
-A INPUT -m ttl --ttl-eq 64 -j ACCEPT
-A INPUT -m ttl ! --ttl-eq 1 -j ACCEPT
-A INPUT -m ttl --ttl-lt 5 -j DROP
-A INPUT -m ttl --ttl-gt 200 -j DROP
-A INPUT -m pkttype --pkt-type broadcast -j DROP
-A INPUT -m pkttype ! --pkt-type unicast -j DROP
-A INPUT -m mark --mark 0x1 -j ACCEPT
-A INPUT -m mark ! --mark 0x10/0xf0 -j ACCEPT
-A INPUT -m comment --comment "hello \\"world\\" it's" -j ACCEPT
-A INPUT -m comment --comment plain
-A INPUT -j Beta
-A FORWARD -i eth0 -o veth+ -j ACCEPT
-A FORWARD ! -o + -j DROP
-A OUTPUT -o lo -j RETURN
-A alpha -p tcp -m tcp --tcp-flags ALL NONE -j RETURN
-A alpha -j zeta
-A zeta -m comment --comment a -m mark --mark 0x5/0x7 -m length --length 0:40 -j DROP
COMMIT
""".replace("\\\n", "")

CHAIN_ORDER = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:b - [0:0]
:a-b - [0:0]
:_x - [0:0]
:Z - [0:0]
:0 - [0:0]
:a - [0:0]
:abcdefghijklmnopqrstuvwxyz01 - [0:0]
-A INPUT -j a
-A INPUT -g b
-A a -j a-b
-A a-b -j _x
-A _x -g Z
-A Z -j 0
-A 0 -j abcdefghijklmnopqrstuvwxyz01
-A abcdefghijklmnopqrstuvwxyz01 -j RETURN
-A b
COMMIT
"""

BIG_COUNTERS = """\
*filter
:INPUT DROP [18446744073709551615:18446744073709551615]
:FORWARD DROP [1:18446744073709551614]
:OUTPUT ACCEPT [9223372036854775808:0]
:u - [0:0]
[18446744073709551615:1] -A INPUT -j u
[4294967296:4294967297] -A u -p tcp
[0:18446744073709551615] -A FORWARD -j ACCEPT
COMMIT
"""


def _example_chain(example: str) -> str:
    """The first built-in chain a match example may run in (INPUT, but OUTPUT for -m owner),
    found from the match parsed in a chain no hook reaches."""
    ruleset = parse(f"*filter\n:free - [0:0]\n-A free {example}\nCOMMIT\n", "example")
    (match,) = [m for m in ruleset["free"].rules[0].matches if not isinstance(m, IP_PART)]
    allowed = extension_of(match).hooks(match)
    return next(chain for chain in ("INPUT", "FORWARD", "OUTPUT") if chain in allowed)


# Every registered extension's examples, one rule each (a match's in the first built-in chain
# it may run in; a target family's in INPUT, FORWARD and OUTPUT, and in a user chain reached
# from INPUT): a family added to the registry is held to iptables-legacy here without a line
# of its own.
EXTENSION_EXAMPLES = (
    "*filter\n:targets - [0:0]\n-A INPUT -j targets\n"
    + "".join(
        f"-A {_example_chain(example)} {example} -j ACCEPT\n"
        for extension in MATCHES
        for example in extension.examples
    )
    + "".join(
        f"-A {chain} {example}\n"
        for extension in TARGETS
        for example in extension.examples
        for chain in ("INPUT", "FORWARD", "OUTPUT", "targets")
    )
    + "COMMIT\n"
)

CASES = [pytest.param(path.read_text(), id=path.name) for path in CORPUS] + [
    pytest.param(EVERY_MATCH, id="every-match-and-target"),
    pytest.param(EXTENSION_EXAMPLES, id="extension-examples"),
    pytest.param(CHAIN_ORDER, id="chain-order"),
    pytest.param(BIG_COUNTERS, id="big-counters"),
]


def example_sets(ns: Namespace, text: str) -> None:
    """Create the stand-in sets (codegen.rules.sets) in `ns` if `text` has -m set matches:
    iptables refuses a rule naming a set that does not exist. Made in the same order, they
    get the same indexes in every namespace."""
    if "--match-set" in text:
        ns.run(["sh", "-c", f"printf '%s' '{STANDIN_SETS_TEXT}' | ipset -exist restore"])


def restore(ns: Namespace, text: str, directory: Path) -> None:
    """Load `text` with iptables-legacy-restore -c (so that its counters count)."""
    example_sets(ns, text)
    path = directory / f"{ns.name}.rules"
    path.write_text(text)
    ns.run(["iptables-legacy-restore", "-c", str(path)])


def save(ns: Namespace, counters: bool = False) -> list[str]:
    """iptables-legacy-save's lines, without its `# Generated`/`# Completed` comments."""
    output = ns.run(["iptables-legacy-save", "-t", "filter", *(["-c"] if counters else [])])
    return [line for line in output.stdout.splitlines() if not line.startswith("#")]


def assert_iptables_own(text: str, tmp_path: Path) -> list[str]:
    """`text` as iptables-legacy-restore loads it and as we write it: the same model, the
    same blob, the same iptables-save and `-L` (verbose and not); returns what it saved."""
    from harness.deploy.listing import list_table

    ruleset = parse(text, "iptables-own")
    with Namespace() as by_iptables, Namespace() as by_us:
        restore(by_iptables, text, tmp_path)
        with by_iptables.enter():
            assert read_table() == ruleset
            theirs = read_entries()
        with by_us.enter():
            write_table(ruleset)
            ours = read_entries()
        assert ours == theirs
        saved = save(by_iptables)
        assert save(by_us) == saved
        verbose = by_iptables.run(["iptables-legacy", "-L", "-v", "-n", "-x"]).stdout
        plain = by_iptables.run(["iptables-legacy", "-L", "-n", "-x"]).stdout
    assert list_table(ruleset, verbose=True) == verbose
    assert list_table(ruleset, verbose=False) == plain
    return saved


def counters(ruleset: Ruleset) -> dict[tuple[str, int | str], tuple[int, int]]:
    """(chain, rule number or "policy") -> (packets, bytes)."""
    found: dict[tuple[str, int | str], tuple[int, int]] = {}
    for chain in ruleset.chains.values():
        if chain.builtin:
            found[chain.name, "policy"] = (chain.packets, chain.bytes)
        for index, rule in enumerate(chain.rules, 1):
            found[chain.name, index] = (rule.packets, rule.bytes)
    return found


def test_corpus_is_there() -> None:
    # The corpus is the point of this file: an empty folder must not pass silently.
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("text", CASES)
def test_read_table_gives_the_parsed_model(text: str, tmp_path: Path) -> None:
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        with ns.enter():
            assert read_table() == parse(text)


@pytest.mark.parametrize("text", CASES)
def test_write_table_is_what_iptables_restore_makes(text: str, tmp_path: Path) -> None:
    with Namespace() as by_iptables, Namespace() as by_us:
        restore(by_iptables, text, tmp_path)
        example_sets(by_us, text)
        with by_us.enter():
            write_table(parse(text))
        assert save(by_us) == save(by_iptables)
        assert save(by_us, counters=True) == save(by_iptables, counters=True)
        with by_iptables.enter():
            theirs = read_entries()
        with by_us.enter():
            ours = read_entries()
        # Same hook offsets and entries byte for byte, counters and the kernel's comefrom
        # bits included.
        assert ours == theirs


@pytest.mark.parametrize("text", CASES)
def test_counters_come_back_through_iptables_save(text: str) -> None:
    model = parse(text)
    # Distinct counters everywhere, wide enough to catch a swapped or truncated field.
    for number, chain in enumerate(model.chains.values(), 1):
        if chain.builtin:
            chain.packets, chain.bytes = number, 2**63 + number
        for index, rule in enumerate(chain.rules, 1):
            rule.packets = number * 1000 + index
            rule.bytes = 2**40 + number * 1000 + index
    with Namespace() as ns:
        example_sets(ns, text)
        with ns.enter():
            write_table(model)
            assert read_table() == model
        saved = parse("\n".join(save(ns, counters=True)) + "\n", "iptables-legacy-save -c")
    # Only the counters: iptables-save's text loses some rules' meaning (`! -o +` prints as
    # nothing), the kernel round trip above is the exact check.
    assert counters(saved) == counters(model)


def test_a_fresh_namespace_reads_as_the_default_ruleset() -> None:
    with Namespace() as ns:
        # A socket created in the namespace reads that namespace's table from anywhere.
        with ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            assert read_table(sock) == Ruleset()


def test_replacing_a_table_drops_the_old_rules_and_counters() -> None:
    first = parse(EVERY_MATCH)
    for chain in first.chains.values():
        for rule in chain.rules:
            rule.packets, rule.bytes = 77, 7700
    second = parse(CHAIN_ORDER)
    second["INPUT"].rules[0].packets = 3
    with Namespace() as ns:
        with ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
            write_table(first, sock)
            assert read_table(sock) == first
            write_table(second, sock)
            assert read_table(sock) == second
            # Writing the same table again sets its counters, it does not add to them.
            write_table(second, sock)
            assert read_table(sock) == second


@pytest.mark.parametrize(
    "rule, message",
    [
        (
            "-A INPUT -m dscp --dscp 1 -j ACCEPT",
            "entry at offset 0: chain INPUT rule 1: match 'dscp' is not supported"
            " (supported: tcp (revision 0), udp (revision 0),",
        ),
        (
            "-A OUTPUT -p tcp -j NFQUEUE --queue-num 1",
            "entry at offset 304: chain OUTPUT rule 1: target 'NFQUEUE' is not supported",
        ),
        (
            "-A FORWARD -j CLASSIFY --set-class 1:1",
            "entry at offset 152: chain FORWARD rule 1: target 'CLASSIFY'",
        ),
        ("-A INPUT -j QUEUE", "entry at offset 0: chain INPUT rule 1: QUEUE is not supported"),
        (
            "-A INPUT -p tcp --tcp-option 2 -j DROP",
            "chain INPUT rule 1: tcp match: --tcp-option is not supported",
        ),
    ],
)
def test_unsupported_extensions_are_named(rule: str, message: str, tmp_path: Path) -> None:
    with Namespace() as ns:
        path = tmp_path / "table.rules"
        path.write_text(f"*filter\n{rule}\nCOMMIT\n")
        loaded = ns.run(["iptables-legacy-restore", str(path)], check=False)
        if loaded.returncode != 0:
            pytest.skip(f"this kernel cannot load `{rule}`: {loaded.stderr.strip()}")
        with ns.enter(), pytest.raises(BlobError) as caught:
            read_table()
    assert message in str(caught.value)
    assert str(caught.value).startswith("filter table entry at offset ")


def test_without_cap_net_admin_the_error_says_so() -> None:
    # Root without CAP_NET_ADMIN (dropped from the bounding and inheritable sets before exec):
    # the raw socket opens, the kernel refuses the socket option.
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from codegen.rules.ipt_blob import BlobError, read_table\n"
        "try:\n"
        "    read_table()\n"
        "except BlobError as error:\n"
        "    print(error)\n"
    )
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN")
    command = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    with Namespace() as ns:
        result = ns.run([*command, sys.executable, "-c", script], timeout=60)
    assert result.stdout.strip() == (
        "reading the filter table's info (IPT_SO_GET_INFO) needs root (CAP_NET_ADMIN)"
    )
