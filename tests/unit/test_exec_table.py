"""The pure parts of `bpflab exec` (harness.exec): the seccomp filter, run through a small
classic-BPF evaluator; the ioctl numbers; the revision answers; the table the supervisor
hands back (entry positions, comefrom bits, counters) and the reading of ADD_COUNTERS."""

from __future__ import annotations

import errno
import struct

import pytest

from codegen.rules import parse
from codegen.rules.blob.encode import encode_table
from codegen.rules.blob.structs import IptEntry, IptGetinfo, IptReplace
from harness.exec import seccomp
from harness.exec.supervisor import _names_other_table_in
from harness.exec.table import (
    COUNTER,
    REPLACE_SIZE,
    REVISION,
    added_counters,
    counters_bytes,
    entry_positions,
    revision_answer,
    table_as_sent,
    table_of,
    with_counters,
)


def run_filter(nr: int, arch: int = seccomp.AUDIT_ARCH_X86_64, args: tuple = ()) -> int:
    """What the filter returns for a call: a minimal cBPF machine (LD W ABS, JEQ/JGE/JGT/JSET
    K, RET K), enough for this program and refusing any other opcode."""
    values = [*args, *([0] * (6 - len(args)))]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *values)
    program = seccomp.filter_program()
    accumulator, pc = 0, 0
    for _ in range(len(program) + 1):
        code, true, false, k = program[pc]
        if code == seccomp.LD_W_ABS:
            accumulator = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == seccomp.RET_K:
            return k
        else:
            taken = {
                seccomp.JEQ_K: accumulator == k,
                seccomp.JGE_K: accumulator >= k,
                seccomp.JGT_K: accumulator > k,
                seccomp.JSET_K: bool(accumulator & k),
            }[code]
            pc += 1 + (true if taken else false)
    raise AssertionError("the filter did not return")


NOTIFY, ALLOW = seccomp.SECCOMP_RET_USER_NOTIF, seccomp.SECCOMP_RET_ALLOW
GET, SET = seccomp.NR_GETSOCKOPT, seccomp.NR_SETSOCKOPT


@pytest.mark.parametrize(
    "nr, arch, args, expected",
    [
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 64), NOTIFY),  # GET_INFO
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 65), NOTIFY),  # GET_ENTRIES
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 66), NOTIFY),  # GET_REVISION_MATCH
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 67), NOTIFY),  # GET_REVISION_TARGET
        (SET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 64), NOTIFY),  # SET_REPLACE
        (SET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 65), NOTIFY),  # SET_ADD_COUNTERS
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 63), ALLOW),
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 68), ALLOW),
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 0, 83), ALLOW),  # SO_IP_SET: ipset's
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 41, 64), ALLOW),  # SOL_IPV6: ip6tables'
        (SET, seccomp.AUDIT_ARCH_X86_64, (3, 1, 64), ALLOW),  # SOL_SOCKET
        # int arguments: the kernel ignores the upper halves, so does the filter.
        (GET, seccomp.AUDIT_ARCH_X86_64, (3, 1 << 32, (7 << 32) | 65), NOTIFY),
        (0, seccomp.AUDIT_ARCH_X86_64, (3, 0, 64), ALLOW),  # read
        (59, seccomp.AUDIT_ARCH_X86_64, (), ALLOW),  # execve
        (
            GET | seccomp.X32_SYSCALL_BIT,
            seccomp.AUDIT_ARCH_X86_64,
            (3, 0, 64),
            seccomp.SECCOMP_RET_ERRNO | errno.ENOSYS,
        ),
        (GET, 0x40000003, (3, 0, 64), seccomp.SECCOMP_RET_KILL_PROCESS),  # i386
    ],
)
def test_the_filter_stops_only_the_iptables_options(nr, arch, args, expected) -> None:
    assert run_filter(nr, arch, args) == expected


def test_ioctl_numbers_are_the_headers() -> None:
    # <linux/seccomp.h> on x86_64, as a C compiler computes them.
    assert seccomp.NOTIF_RECV == 0xC0502100
    assert seccomp.NOTIF_SEND == 0xC0182101
    assert seccomp.NOTIF_ID_VALID == 0x40082102
    assert len(seccomp.filter_bytes()) == 8 * len(seccomp.filter_program())


def revision(name: str, number: int, target: bool = False) -> int:
    return revision_answer(REVISION.pack(name.encode(), number), target)


@pytest.mark.parametrize(
    "name, number, target, expected",
    [
        ("tcp", 0, False, 0),
        ("conntrack", 3, False, 0),
        ("conntrack", 2, False, errno.EPROTONOSUPPORT),  # we generate revision 3 only
        ("multiport", 1, False, 0),
        ("dscp", 0, False, errno.ENOENT),
        ("REJECT", 0, True, 0),
        ("REJECT", 1, True, errno.EPROTONOSUPPORT),
        ("NFQUEUE", 3, True, errno.ENOENT),
        ("tcp", 0, True, errno.ENOENT),  # a match is no target
        ("", 0, True, 0),  # the standard target
    ],
)
def test_revision_answers(name, number, target, expected) -> None:
    assert revision(name, number, target) == expected


TABLE = """\
*filter
:INPUT ACCEPT [10:1000]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:b - [0:0]
:a - [0:0]
:unused - [0:0]
[1:100] -A INPUT -p tcp -j a
[2:200] -A INPUT -j ACCEPT
[3:300] -A INPUT -p udp -j DROP
[4:400] -A a -p tcp -g b
[5:500] -A b -p tcp -j RETURN
[6:600] -A OUTPUT -j b
[7:700] -A unused -j DROP
COMMIT
"""


def entries_of(entries: bytes) -> list[IptEntry]:
    found, offset = [], 0
    while offset < len(entries):
        entry = IptEntry.from_buffer_copy(entries, offset)
        found.append(entry)
        offset += entry.next_offset
    return found


def test_entry_positions_follow_libiptcs_order() -> None:
    assert entry_positions(parse(TABLE)) == (
        ("INPUT", 1), ("INPUT", 2), ("INPUT", 3), ("INPUT", "policy"),
        ("FORWARD", "policy"),
        ("OUTPUT", 1), ("OUTPUT", "policy"),
        None, ("a", 1), None,  # user chains sorted: a, b, unused
        None, ("b", 1), None,
        None, ("unused", 1), None,
        None,
    )  # fmt: skip


def test_table_carries_counters_and_the_hooks_that_reach_each_entry() -> None:
    table = table_of(parse(TABLE))
    entries = entries_of(table.entries)
    counters = [(entry.counters.pcnt, entry.counters.bcnt) for entry in entries]
    assert counters == [
        (1, 100), (2, 200), (3, 300), (10, 1000), (0, 0), (6, 600), (0, 0),
        (0, 0), (4, 400), (0, 0), (0, 0), (5, 500), (0, 0), (0, 0), (7, 700), (0, 0), (0, 0),
    ]  # fmt: skip
    input_, forward, output = 1 << 1, 1 << 2, 1 << 3
    assert [entry.comefrom for entry in entries] == [
        input_, input_,  # an unconditional ACCEPT ends INPUT's walk: rule 3 and the policy
        0, 0,  # are never reached (the kernel's mark_source_chains agrees: tests/net)
        forward,
        output, output,
        0, input_, input_,  # a (from INPUT): its ERROR head is never walked
        0, input_ | output, input_ | output,  # b, from INPUT through a's goto and from OUTPUT
        0, 0, 0,  # unused
        0,
    ]  # fmt: skip
    assert counters_bytes(table) == b"".join(COUNTER.pack(*pair) for pair in counters)
    info = IptGetinfo.from_buffer_copy(table.info)
    assert (info.num_entries, info.size) == (len(entries), len(table.entries))
    assert tuple(info.hook_entry)[0] == tuple(info.hook_entry)[4] == 0xFFFFFFFF


def test_add_counters_by_position() -> None:
    positions = entry_positions(parse(TABLE))
    raw = b"".join(COUNTER.pack(index, 10 * index) for index in range(len(positions)))
    added = added_counters(positions, raw)
    assert added[("INPUT", "policy")] == (3, 30)
    assert added[("b", 1)] == (11, 110)
    assert len(added) == sum(position is not None for position in positions)


@pytest.mark.parametrize(
    "words, other",
    [
        (["iptables-legacy", "-A", "INPUT", "-j", "ACCEPT"], False),
        (["iptables-legacy", "-t", "filter", "-A", "INPUT"], False),
        (["iptables-legacy", "-t", "nat", "-A", "POSTROUTING"], True),
        (["iptables-legacy", "--table", "raw", "-S"], True),
        (["iptables-legacy", "--table=mangle", "-S"], True),
        (["iptables-legacy", "-tnat", "-S"], True),
        (["iptables-legacy-restore", "-c"], False),
    ],
)
def test_revision_queries_of_other_tables_go_to_the_kernel(words, other) -> None:
    assert _names_other_table_in([word.encode() for word in words]) is other


def test_a_replaced_table_reads_back_as_sent() -> None:
    # `--icmp-type 255/255`: the model reads it as `any` (255, codes 0-255), the kernel
    # keeps the payload it was given, and `iptables -D` compares payloads byte for byte.
    ruleset = parse(
        TABLE.replace("-A INPUT -p udp -j DROP", "-A INPUT -p icmp -m icmp --icmp-type any -j DROP")
    )
    blob = bytearray(encode_table(ruleset))
    # ipt_icmp after the 32-byte xt_entry_match header (its name 2 bytes in): type, codes.
    code_offset = blob.index(b"icmp\0") - 2 + 32 + 1
    assert blob[code_offset - 1 : code_offset + 2] == b"\xff\x00\xff"
    blob[code_offset] = 0xFF  # type 255, codes 255-255
    header = IptReplace.from_buffer_copy(blob)
    entries = bytes(blob[REPLACE_SIZE:])
    sent = table_as_sent(header, entries, with_counters(ruleset, {}))
    encoded = table_of(with_counters(ruleset, {}))
    assert sent.positions == encoded.positions == entry_positions(ruleset)
    assert sent.entries[code_offset - REPLACE_SIZE] == 0xFF
    assert sent.entries != encoded.entries
    # Nothing else differs: counters zero, the same comefrom bits.
    changed = [
        i for i, (a, b) in enumerate(zip(sent.entries, encoded.entries, strict=True)) if a != b
    ]
    assert changed == [code_offset - REPLACE_SIZE]
