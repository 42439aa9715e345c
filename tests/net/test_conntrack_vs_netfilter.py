"""`-m conntrack` and `-m state` against iptables-legacy and the kernel, in throwaway namespaces:
the spellings and payloads of tests/unit/test_conntrack.py are what iptables-legacy makes of
them, and xt_conntrack answers for a real connection what the reference evaluator answers for
the same connection described by hand (a UDP query and its answer over `lo`)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from codegen.rules import evaluate, parse
from codegen.rules.blob.decode import _split_entries
from codegen.rules.ipt_blob import read_entries, read_table, write_table
from codegen.rules.packet import IPS_CONFIRMED, IPS_SEEN_REPLY, Connection, ConnectionTuple
from netns import Namespace
from tests.net.test_ipt_blob import restore, save
from tests.unit.test_conntrack import PAYLOADS, SPELLINGS

pytestmark = [pytest.mark.netns, pytest.mark.privileged]


def test_spellings_save_as_iptables_legacy_saves_them(tmp_path: Path) -> None:
    text = "*filter\n" + "".join(f"-A INPUT {written}\n" for written, _ in SPELLINGS) + "COMMIT\n"
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        lines = save(ns)
    assert [line for line in lines if line.startswith("-A ")] == [
        f"-A INPUT {expected}" for _, expected in SPELLINGS
    ]


def test_payloads_are_what_iptables_legacy_writes(tmp_path: Path) -> None:
    text = "*filter\n" + "".join(f"-A INPUT {options}\n" for options, _ in PAYLOADS) + "COMMIT\n"
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        with ns.enter():
            _, entries = read_entries()
    written = [entry.matches for entry in _split_entries(entries) if entry.matches]
    assert [[(m.name, m.revision, m.data) for m in matches] for matches in written] == [
        [("conntrack", 3, payload)] for _, payload in PAYLOADS
    ]


HOST = "198.18.0.1"
CLIENT_PORT, SERVER_PORT = 40000, 5001
# Counting rules (no target), each seen by the query and the answer in INPUT.
RULES = [
    "-m conntrack --ctdir ORIGINAL",
    "-m conntrack --ctdir REPLY",
    "-m conntrack --ctstate NEW",
    "-m conntrack --ctstate RELATED,ESTABLISHED",
    "-m conntrack ! --ctstate NEW",
    "-m conntrack --ctstate INVALID,UNTRACKED,SNAT,DNAT",
    "-m conntrack --ctexpire 25:30",
    "-m conntrack ! --ctexpire 25:30",
    "-m conntrack --ctstatus SEEN_REPLY",
    "-m conntrack ! --ctstatus SEEN_REPLY,ASSURED",
    "-m conntrack --ctstatus CONFIRMED",
    "-m conntrack --ctstatus NONE",
    "-m conntrack ! --ctstatus NONE",
    "-m conntrack --ctproto 17",
    "-m conntrack ! --ctproto udp",
    f"-m conntrack --ctorigsrc {HOST} --ctorigdst 198.18.0.0/15 --ctreplsrc {HOST}/32",
    "-m conntrack ! --ctrepldst 198.19.0.0/16",
    f"-m conntrack --ctorigsrcport {CLIENT_PORT} --ctorigdstport {SERVER_PORT}",
    f"-m conntrack --ctreplsrcport {SERVER_PORT} --ctrepldstport 39000:41000",
    f"-m conntrack ! --ctreplsrcport {SERVER_PORT}",
    "-m conntrack ! --ctstate INVALID --ctproto 17 --ctstatus CONFIRMED --ctdir REPLY",
    "-m state --state NEW",
    "-m state --state ESTABLISHED",
    "-m state ! --state INVALID",
]


def _udp(source: int, destination: int, payload: bytes) -> bytes:
    address = socket.inet_aton(HOST)
    header = bytes([0x45, 0]) + (28 + len(payload)).to_bytes(2, "big") + bytes(4)
    header += bytes([64, 17, 0, 0]) + address + address
    return header + source.to_bytes(2, "big") + destination.to_bytes(2, "big") + bytes(4) + payload


def test_conntrack_answers_as_the_reference_evaluator_does() -> None:
    text = "*filter\n" + "".join(f"-A INPUT {rule}\n" for rule in RULES) + "COMMIT\n"
    ruleset = parse(text, "conntrack.rules")
    host = int.from_bytes(socket.inet_aton(HOST), "big")
    original = ConnectionTuple(host, host, CLIENT_PORT, SERVER_PORT)
    reply = ConnectionTuple(host, host, SERVER_PORT, CLIENT_PORT)
    # What conntrack holds when each reaches INPUT: the query's entry was confirmed on its way
    # out; the answer finds it replied to. UDP's unreplied and replied timeouts are 30 s.
    query = Connection("NEW", "ORIGINAL", 17, original, reply, IPS_CONFIRMED, 29)
    answer = Connection(
        "ESTABLISHED", "REPLY", 17, original, reply, IPS_SEEN_REPLY | IPS_CONFIRMED, 29
    )
    expected = [0] * len(RULES)
    for packet, connection in (
        (_udp(CLIENT_PORT, SERVER_PORT, b"q"), query),
        (_udp(SERVER_PORT, CLIENT_PORT, b"a"), answer),
    ):
        counted = evaluate(ruleset, packet, "INPUT", "lo", None, connection=connection).counters
        for (chain, index), (packets, _) in counted.items():
            if chain == "INPUT" and index != "policy":
                expected[int(index) - 1] += packets
    with Namespace() as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        ns.run(["ip", "address", "add", f"{HOST}/32", "dev", "lo"])
        with ns.enter():
            write_table(ruleset)
        client = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with client, server:
            for sock in (client, server):
                sock.settimeout(2)
            client.bind((HOST, CLIENT_PORT))
            server.bind((HOST, SERVER_PORT))
            client.sendto(b"q", (HOST, SERVER_PORT))
            _, peer = server.recvfrom(16)
            server.sendto(b"a", peer)
            client.recvfrom(16)
        with ns.enter():
            counted = [rule.packets for rule in read_table()["INPUT"].rules]
    assert dict(zip(RULES, counted, strict=True)) == dict(zip(RULES, expected, strict=True))
    assert counted.count(0) not in (0, len(RULES)), "the rules should tell the packets apart"
