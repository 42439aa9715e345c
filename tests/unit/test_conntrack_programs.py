"""The pieces around the programs' connection tracker that need no kernel: which rule sets it is
built for, how a missing compiler is said, its listing format and its C for bcc."""

from __future__ import annotations

import pytest

from codegen import conntrack
from codegen.bpf import clang
from codegen.c import conntrack as c_tracker
from codegen.conntrack import Entry, first_tracking_rule
from codegen.conntrack.listing import entry_line, table_lines
from codegen.rules import parse
from codegen.rules.packet import IPS_ASSURED, IPS_SEEN_REPLY
from codegen.tc.generator import CompileError, compile_program

STATEFUL = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
-A INPUT -m state --state ESTABLISHED -j ACCEPT
COMMIT
"""


def test_only_rule_sets_that_ask_about_connections_track_them() -> None:
    ruleset = parse(STATEFUL, "stateful.rules")
    assert first_tracking_rule(ruleset)[:2] == ("INPUT", 2)
    stateless = parse(STATEFUL.replace("-m state --state ESTABLISHED ", ""), "stateless.rules")
    assert first_tracking_rule(stateless) is None
    program = compile_program(stateless, "chain", interfaces={}, chain="INPUT")
    assert not set(conntrack.MAPS) & set(program.maps)


def test_no_clang_is_one_sentence_naming_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> str:
        raise clang.ClangUnavailable("no clang for the BPF target on PATH")

    monkeypatch.setattr(clang, "find_clang", missing)
    monkeypatch.setenv("BPFLAB_CACHE_DIR", "/nonexistent/bpflab-cache")
    conntrack.bytecode_functions.cache_clear()
    try:
        with pytest.raises(CompileError) as raised:
            compile_program(
                parse(STATEFUL, "stateful.rules"), "chain", interfaces={}, chain="INPUT"
            )
    finally:
        conntrack.bytecode_functions.cache_clear()
    assert str(raised.value) == (
        "stateful.rules:6:1: the bytecode backend cannot build the connection tracker that rule "
        "2 of INPUT needs: no clang for the BPF target on PATH: "
        "-A INPUT -m state --state ESTABLISHED -j ACCEPT"
    )


def _entry(proto: int, status: int, deadline: int, **tuple_parts: int) -> Entry:
    entry = Entry(proto=proto, status=status, deadline=deadline)
    entry.orig.src, entry.orig.dst = 0xC6120001, 0xC6120002
    entry.orig.sport, entry.orig.dport = tuple_parts["sport"], tuple_parts["dport"]
    entry.reply.src, entry.reply.dst = 0xC6120002, 0xC6120001
    entry.reply.sport, entry.reply.dport = tuple_parts["rsport"], tuple_parts["rdport"]
    return entry


def test_entries_print_as_conntrack_L_prints_them() -> None:
    second = 1_000_000_000
    tcp = _entry(
        6,
        IPS_SEEN_REPLY | IPS_ASSURED,
        431999 * second + 5,
        sport=40000,
        dport=22,
        rsport=22,
        rdport=40000,
    )
    tcp.tcp_state = 3
    udp = _entry(17, 0, 29 * second + 7, sport=40001, dport=53, rsport=53, rdport=40001)
    icmp = _entry(1, IPS_SEEN_REPLY, 30 * second, sport=7, dport=8 << 8, rsport=7, rdport=0)
    gone = _entry(17, 0, 0, sport=1, dport=2, rsport=2, rdport=1)
    assert entry_line(tcp, 0) == (
        "tcp      6 431999 ESTABLISHED src=198.18.0.1 dst=198.18.0.2 sport=40000 dport=22 "
        "src=198.18.0.2 dst=198.18.0.1 sport=22 dport=40000 [ASSURED] mark=0 use=1"
    )
    assert entry_line(udp, 0) == (
        "udp      17 29 src=198.18.0.1 dst=198.18.0.2 sport=40001 dport=53 [UNREPLIED] "
        "src=198.18.0.2 dst=198.18.0.1 sport=53 dport=40001 mark=0 use=1"
    )
    assert entry_line(icmp, 0) == (
        "icmp     1 30 src=198.18.0.1 dst=198.18.0.2 type=8 code=0 id=7 "
        "src=198.18.0.2 dst=198.18.0.1 type=0 code=0 id=7 mark=0 use=1"
    )
    assert table_lines([udp, gone, tcp], 1) == [entry_line(tcp, 1), entry_line(udp, 1)]


def test_the_c_backend_gets_the_tracker_in_bccs_words() -> None:
    text = "\n".join(c_tracker.tracker(4096))
    for macro in ("CT_LOOKUP(", "CT_INSERT(", "CT_DELETE(", "CT_DECLARE_MAPS\n"):
        assert macro not in text
    assert 'BPF_TABLE_PINNED("lru_hash", struct ct_key, struct ct_entry, ct_table, 4096,' in text
    assert "ct_table.lookup(key)" in text and "ct_table.insert(&pending->key" in text
    assert "#define CT_GLOBAL static __always_inline" in text
