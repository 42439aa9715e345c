"""`bpflab exec`: the real iptables-legacy binaries under seccomp user notification, against
the same commands on the kernel's own table in a twin namespace.

- read path: for every table of the blob corpus, the GET_ENTRIES answer (harness.exec.table)
  is the kernel's byte for byte (counters and comefrom bits included);
- after traffic, `iptables-legacy-save -c`, `-L -n -v -x`, `-S` and a raw GET_ENTRIES made
  under `bpflab exec` print what the kernel's table prints;
- write path: a sequence of iptables commands (-A, -I, -R, -D, -N, -E, -X, -F, -P, -Z, -C,
  restore -c) run under `bpflab exec` and on the twin leave the same `iptables-legacy-save -c`
  after the same traffic, and the traffic meets the same fate;
- refusals (an extension we do not generate) fail the command as iptables fails and change
  nothing; other tables (`-t nat`, `-t raw`) land in the kernel's tables.

Every command gets its own xtables lock file (XTABLES_LOCKFILE): the machine-wide one is
shared with every other test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from codegen.rules.blob.ipset import KernelSetIndexes
from codegen.rules.extensions.set import set_indexes
from codegen.rules.ipt_blob import read_entries, read_table
from harness.deploy import lifecycle
from harness.deploy.locking import LOCK_ROOT, lock_path, table_path
from harness.exec.table import table_of
from netns import HostTopology, Namespace
from netns.namespace import NETNS_DIR, format_name
from tests.net.test_ipt_blob import CASES, example_sets, restore
from tests.net.test_tc_attached import UDP_IP_LENGTH, rules, udp_exchange
from tests.unit.test_exec_table import TABLE as WALKED

pytestmark = [pytest.mark.netns, pytest.mark.privileged, pytest.mark.exec]

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT = 120
# A raw GET_INFO + GET_ENTRIES from a process of its own, printed as hex: what any program
# reading the table through the socket options gets.
RAW_READ = (
    "from codegen.rules.ipt_blob import read_entries; info, entries = read_entries(); "
    "print(info); print(entries.hex())"
)


@pytest.fixture
def lock_file(tmp_path: Path) -> Iterator[dict[str, str]]:
    path = tmp_path / "xtables.lock"
    path.touch()
    yield {**os.environ, "XTABLES_LOCKFILE": str(path), "PYTHONPATH": str(ROOT)}
    # The supervisor's lock and table files of the namespaces this test made and removed: names
    # of this process and worker only (another run's files are not ours, whatever their state).
    mine = format_name(os.getpid(), os.environ.get("PYTEST_XDIST_WORKER"), 0)[:-1]
    for kept in LOCK_ROOT.glob(f"{mine}*") if LOCK_ROOT.is_dir() else ():
        if not (NETNS_DIR / kept.name.rsplit(".", 1)[0]).exists():
            kept.unlink(missing_ok=True)


def under_exec(
    ns: str,
    env: dict[str, str],
    *command: str,
    stdin: str | None = None,
    backend: str = "",
    fastpath: bool = False,
) -> subprocess.CompletedProcess[str]:
    extra = (["--backend", backend] if backend else []) + (["--fastpath"] if fastpath else [])
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "exec", "--netns", ns, *extra, "--", *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        input=stdin,
        env=env,
        cwd=ROOT,
    )


def on_kernel(
    ns: str, env: dict[str, str], *command: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        input=stdin,
        env=env,
        cwd=ROOT,
    )


def without_comments(text: str) -> str:
    """iptables-legacy-save's output without its `#` lines (they carry the time)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


EMPTY_FILTER = rules()


def kernel_filter(ns: str, env: dict[str, str]) -> str:
    """The kernel's own filter table in `ns`, bypassing bpflab, without its policy counters
    (it exists, empty, from the first `bpflab exec`, and counts what our programs accept)."""
    saved = on_kernel(ns, env, "iptables-legacy-save", "-t", "filter")
    assert saved.returncode == 0, saved.stderr
    return re.sub(r" \[\d+:\d+\]$", " [0:0]", without_comments(saved.stdout), flags=re.M)


@pytest.mark.parametrize("text", [*CASES, pytest.param(WALKED, id="exec-walk")])
def test_get_entries_answer_is_the_kernels(text: str, tmp_path: Path) -> None:
    with Namespace() as ns:
        restore(ns, text, tmp_path)
        with ns.enter():
            info, entries = read_entries()
            model = read_table()
            with ns.socket(2, 3, 255) as sock, set_indexes(KernelSetIndexes(sock)):
                table = table_of(model)
    assert table.entries == entries
    from codegen.rules.blob.structs import IptGetinfo

    ours = IptGetinfo.from_buffer_copy(table.info)
    assert (tuple(ours.hook_entry), tuple(ours.underflow), ours.num_entries, ours.size) == (
        info.hook_entry,
        info.underflow,
        info.num_entries,
        info.size,
    )
    assert ours.valid_hooks == info.valid_hooks


READ_RULES = rules(
    ":udp_in - [0:0]",
    ":unused - [0:0]",
    "-A INPUT -p udp -j udp_in",
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A INPUT -s 198.18.0.0/24 -p udp -m multiport --dports 5310,5311 -j DROP",
    "-A udp_in -p udp -m udp --dport 5300 -j DROP",
    "-A udp_in -p udp -m udp --dport 5301:5302 -j ACCEPT",
    "-A udp_in -j RETURN",
    "-A unused -i eth0 -j DROP",
    "-A OUTPUT -p udp -j ACCEPT",
    policies="ACCEPT DROP ACCEPT",
)
TRAFFIC = ([5300, 5301, 5302, 5303, 5310], 3)  # every rule above with traffic moves


def test_read_path_after_traffic_prints_what_the_kernel_prints(lock_file, tmp_path) -> None:
    with HostTopology(ipv6=False) as ours, HostTopology(ipv6=False) as twin:
        mine, theirs = ours.host.namespace.name, twin.host.namespace.name
        lifecycle.apply(READ_RULES, "read.rules", mine)
        loaded = on_kernel(theirs, lock_file, "iptables-legacy-restore", "-w", stdin=READ_RULES)
        assert loaded.returncode == 0, loaded.stderr
        ports, count = TRAFFIC
        got = udp_exchange(ours.client, ours.host, ports, count=count)
        assert got == udp_exchange(twin.client, twin.host, ports, count=count)
        assert got == {5300: 0, 5301: 3, 5302: 3, 5303: 3, 5310: 0}
        for command in (
            ["iptables-legacy-save", "-c"],
            ["iptables-legacy-save", "-t", "filter"],
            ["iptables-legacy", "-w", "-L", "-n", "-v", "-x"],
            ["iptables-legacy", "-w", "-L", "-n", "-v", "-x", "--line-numbers"],
            ["iptables-legacy", "-w", "-S"],
            ["iptables-legacy", "-w", "-L", "udp_in", "-n", "-v"],
            [sys.executable, "-c", RAW_READ],
        ):
            answered = under_exec(mine, lock_file, *command)
            expected = on_kernel(theirs, lock_file, *command)
            assert (answered.returncode, answered.stderr) == (0, ""), command
            assert expected.returncode == 0, expected.stderr
            assert without_comments(answered.stdout) == without_comments(expected.stdout), command
        saved = under_exec(mine, lock_file, "iptables-legacy-save", "-c").stdout
        assert f"[3:{3 * UDP_IP_LENGTH}] -A udp_in -p udp -m udp --dport 5300 -j DROP" in saved
        # bpflab's own view agrees with what iptables read through the socket options.
        assert lifecycle.save(mine, counters=True) == without_comments(saved)


RESTORED = rules(
    ":fresh - [0:0]",
    "[7:700] -A INPUT -p udp -m udp --dport 5301 -j fresh",
    "[5:500] -A fresh -p udp -m udp --dport 5301 -j DROP",
    policies="ACCEPT ACCEPT ACCEPT",
).replace(":INPUT ACCEPT [0:0]", ":INPUT ACCEPT [11:1100]")

# (command, ports to send a datagram to twice afterwards); each command runs through
# `bpflab exec` in one namespace and straight on the kernel in its twin.
STEPS: list[tuple[list[str], list[int]]] = [
    (
        ["iptables-legacy", "-w", "-A", "INPUT", "-p", "udp", "--dport", "5300", "-j", "DROP"],
        [5300, 5301],
    ),
    (
        ["iptables-legacy", "-w", "-I", "INPUT", "1", "-p", "udp", "--dport", "5301", "-j", "DROP"],
        [5300, 5301, 5302],
    ),
    (
        ["iptables-legacy", "-w", "-R", "INPUT", "1", "-p", "udp", "--dport", "5302", "-j", "DROP"],
        [5301, 5302],
    ),
    (["iptables-legacy", "-w", "-N", "udp_in"], []),
    (["iptables-legacy", "-w", "-A", "udp_in", "-p", "udp", "--dport", "5303", "-j", "DROP"], []),
    (["iptables-legacy", "-w", "-A", "INPUT", "-p", "udp", "-j", "udp_in"], [5300, 5303, 5304]),
    (["iptables-legacy", "-w", "-C", "INPUT", "-p", "udp", "--dport", "5300", "-j", "DROP"], []),
    (["iptables-legacy", "-w", "-C", "INPUT", "-p", "udp", "--dport", "5399", "-j", "DROP"], []),
    (["iptables-legacy", "-w", "-E", "udp_in", "udp_chain"], [5303]),
    (["iptables-legacy", "-w", "-Z", "INPUT"], [5300, 5304]),
    (["iptables-legacy", "-w", "-D", "INPUT", "2"], [5300, 5302]),
    (["iptables-legacy", "-w", "-P", "INPUT", "DROP"], [5305]),
    (["iptables-legacy", "-w", "-P", "INPUT", "ACCEPT"], [5305]),
    (["iptables-legacy", "-w", "-F", "udp_chain"], [5303]),
    (["iptables-legacy", "-w", "-D", "INPUT", "-p", "udp", "-j", "udp_chain"], []),
    (["iptables-legacy", "-w", "-X", "udp_chain"], [5300, 5303]),
    (["iptables-legacy", "-w", "-X", "no_such_chain"], []),
    (["iptables-legacy-restore", "-w", "-c"], [5300, 5301]),
    (["iptables-legacy", "-w", "-Z"], [5301]),
]


def test_commands_change_the_programs_as_they_change_the_kernels_table(lock_file) -> None:
    with HostTopology(ipv6=False) as ours, HostTopology(ipv6=False) as twin:
        mine, theirs = ours.host.namespace.name, twin.host.namespace.name
        for number, (command, ports) in enumerate(STEPS, 1):
            stdin = RESTORED if command[0] == "iptables-legacy-restore" else None
            answered = under_exec(mine, lock_file, *command, stdin=stdin)
            expected = on_kernel(theirs, lock_file, *command, stdin=stdin)
            where = f"step {number}: {' '.join(command)}: {answered.stderr}"
            assert (answered.returncode, answered.stdout, answered.stderr) == (
                expected.returncode,
                expected.stdout,
                expected.stderr,
            ), where
            arrived = udp_exchange(ours.client, ours.host, ports, count=2)
            assert arrived == udp_exchange(twin.client, twin.host, ports, count=2), where
            saved = under_exec(mine, lock_file, "iptables-legacy-save", "-c")
            assert saved.returncode == 0, saved.stderr
            kernel_saved = on_kernel(theirs, lock_file, "iptables-legacy-save", "-c")
            assert without_comments(saved.stdout) == without_comments(kernel_saved.stdout), where
            # ... and it was our programs: the kernel's own filter table there stayed empty.
            assert kernel_filter(mine, lock_file) == EMPTY_FILTER, where
        # The last steps: the restored table, zeroed, then one datagram to 5301 dropped twice.
        assert lifecycle.save(mine, counters=True) == without_comments(saved.stdout)
        assert "[2:" + str(2 * UDP_IP_LENGTH) + "] -A fresh -p udp -m udp --dport 5301 -j DROP" in (
            saved.stdout
        )


def test_a_refused_update_fails_as_iptables_fails_and_changes_nothing(lock_file) -> None:
    with HostTopology(ipv6=False) as ours:
        mine = ours.host.namespace.name
        lifecycle.apply(rules("-A INPUT -p udp -m udp --dport 5300 -j DROP"), "r.rules", mine)
        assert udp_exchange(ours.client, ours.host, [5300, 5301]) == {5300: 0, 5301: 1}
        before = under_exec(mine, lock_file, sys.executable, "-c", RAW_READ)
        pins = sorted(path.name for path in (Path("/sys/fs/bpf/bpflab") / mine).iterdir())
        program = (Path("/sys/fs/bpf/bpflab") / mine / "prog_ingress").stat().st_ino
        # dscp: a match the kernel has and we do not generate. iptables asks its revision
        # (ENOENT from us, as from a kernel without xt_dscp), warns, and sends the table
        # anyway; the SET_REPLACE fails with EINVAL.
        refused = under_exec(
            mine, lock_file, "iptables-legacy", "-w", "-A", "INPUT", "-m", "dscp", "--dscp", "1"
        )
        assert refused.returncode == 1
        lines = refused.stderr.splitlines()
        assert (
            lines[0] == "Warning: Extension dscp revision 0 not supported, missing kernel module?"
        )
        assert lines[1].startswith(
            "bpflab exec: IPT_SO_SET_REPLACE refused, nothing changed: filter table entry at "
            "offset 200: chain INPUT rule 2: match 'dscp' is not supported"
        )
        assert lines[2:] == ["iptables: Invalid argument. Run `dmesg' for more information."]
        # Nothing changed: the same programs, pins, counters and GET_ENTRIES answer, and
        # traffic decided as before.
        assert (Path("/sys/fs/bpf/bpflab") / mine / "prog_ingress").stat().st_ino == program
        assert sorted(path.name for path in (Path("/sys/fs/bpf/bpflab") / mine).iterdir()) == pins
        after = under_exec(mine, lock_file, sys.executable, "-c", RAW_READ)
        assert after.stdout == before.stdout and after.returncode == 0
        assert udp_exchange(ours.client, ours.host, [5300, 5301]) == {5300: 0, 5301: 1}
        assert kernel_filter(mine, lock_file) == EMPTY_FILTER


def test_a_target_we_do_not_generate_is_refused_like_a_missing_module(lock_file) -> None:
    with Namespace() as ns:
        command = ["iptables-legacy", "-w", "-A", "INPUT", "-j", "NFQUEUE", "--queue-num", "1"]
        answered = under_exec(ns.name, lock_file, *command)
        assert answered.returncode == 1
        lines = answered.stderr.splitlines()
        assert lines[0] == (
            "Warning: Extension NFQUEUE revision 0 not supported, missing kernel module?"
        )
        assert "target 'NFQUEUE' is not supported" in lines[1]
        assert lines[2:] == ["iptables: Invalid argument. Run `dmesg' for more information."]
        assert lifecycle.read_state(ns.name) is None  # nothing was applied
        assert kernel_filter(ns.name, lock_file) == EMPTY_FILTER
        # The kernel itself has NFQUEUE: the same command straight on it succeeds.
        assert on_kernel(ns.name, lock_file, *command).returncode == 0


@pytest.mark.parametrize(
    "table, chain, rule, saved",
    [
        (
            "nat",
            "POSTROUTING",
            ["-s", "198.18.0.0/24", "-j", "MASQUERADE"],
            "-A POSTROUTING -s 198.18.0.0/24 -j MASQUERADE",
        ),
        (
            "raw",
            "PREROUTING",
            ["-p", "udp", "--dport", "5300", "-j", "NOTRACK"],
            "-A PREROUTING -p udp -m udp --dport 5300 -j NOTRACK",
        ),
        ("mangle", "INPUT", ["-p", "tcp", "-j", "ACCEPT"], "-A INPUT -p tcp -j ACCEPT"),
    ],
)
def test_other_tables_reach_the_kernel(table, chain, rule, saved, lock_file) -> None:
    with Namespace() as ns:
        added = under_exec(
            ns.name, lock_file, "iptables-legacy", "-w", "-t", table, "-A", chain, *rule
        )
        assert (added.returncode, added.stderr) == (0, "")
        kernel = on_kernel(ns.name, lock_file, "iptables-legacy-save", "-t", table)
        assert saved in kernel.stdout.splitlines()
        listed = under_exec(ns.name, lock_file, "iptables-legacy", "-w", "-t", table, "-S", chain)
        assert saved in listed.stdout.splitlines()
        assert lifecycle.read_state(ns.name) is None


@pytest.mark.parametrize(
    "backend", [pytest.param("bytecode"), pytest.param("c", marks=pytest.mark.bcc)]
)
def test_an_added_rule_decides_traffic_in_each_backend(backend, lock_file) -> None:
    with HostTopology(ipv6=False) as ours:
        mine = ours.host.namespace.name
        assert udp_exchange(ours.client, ours.host, [5300, 5301]) == {5300: 1, 5301: 1}
        added = under_exec(
            mine,
            lock_file,
            *("iptables-legacy", "-w", "-A", "INPUT", "-p", "udp", "--dport", "5300", "-j", "DROP"),
            backend=backend,
        )
        assert (added.returncode, added.stderr) == (0, "")
        assert udp_exchange(ours.client, ours.host, [5300, 5301]) == {5300: 0, 5301: 1}
        listed = under_exec(
            mine, lock_file, "iptables-legacy", "-w", "-L", "INPUT", "-n", "-v", "-x"
        )
        assert listed.stdout.splitlines()[2].split()[:3] == ["1", str(UDP_IP_LENGTH), "DROP"]
        # bpflab list -v prints the same table (its own listing, the same counters).
        ours_listed = subprocess.run(
            [sys.executable, "-m", "harness.cli", "list", "-v", "--netns", mine],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=ROOT,
        )
        assert ours_listed.returncode == 0, ours_listed.stderr
        assert ours_listed.stdout.splitlines()[:3] == listed.stdout.splitlines()[:3]


def test_fastpath_is_given_to_the_tables_exec_applies_and_then_kept(lock_file) -> None:
    forward = ("iptables-legacy", "-w", "-A", "FORWARD", "-p", "udp", "-j", "ACCEPT")
    with Namespace() as plain, Namespace() as fast:
        lifecycle.apply(EMPTY_FILTER, "empty.rules", plain.name)
        assert under_exec(plain.name, lock_file, *forward).returncode == 0
        assert lifecycle.read_state(plain.name)["fastpath"] is False
        added = under_exec(fast.name, lock_file, *forward, fastpath=True)
        assert (added.returncode, added.stderr) == (0, "")
        assert lifecycle.read_state(fast.name)["fastpath"] is True
        # Without the option, the next table is applied as the running one was: fast.
        assert under_exec(fast.name, lock_file, *forward).returncode == 0
        assert lifecycle.read_state(fast.name)["fastpath"] is True
        for ns in (plain, fast):
            assert table_path(ns.name).exists()  # what exec answers the next GET_ENTRIES from
            lifecycle.flush(ns.name)
            # Nothing of the namespace's is left: exec's table and lock go with the rest.
            assert not table_path(ns.name).exists() and not lock_path(ns.name).exists()


def test_concurrent_execs_in_one_namespace_all_land(lock_file) -> None:
    with HostTopology(ipv6=False) as ours:
        mine = ours.host.namespace.name
        ports = [5300, 5301, 5302, 5303]
        command = [sys.executable, "-m", "harness.cli", "exec", "--netns", mine, "--"]
        running = [
            subprocess.Popen(
                [*command, "iptables-legacy", "-w", "30", "-A", "INPUT", "-p", "udp", "--dport",
                 str(port), "-j", "DROP"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=lock_file,
                cwd=ROOT,
            )
            for port in ports
        ]  # fmt: skip
        for process in running:
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, stderr
        saved = under_exec(mine, lock_file, "iptables-legacy-save").stdout
        rules_saved = sorted(line for line in saved.splitlines() if line.startswith("-A"))
        assert rules_saved == [f"-A INPUT -p udp -m udp --dport {port} -j DROP" for port in ports]
        assert udp_exchange(ours.client, ours.host, ports) == dict.fromkeys(ports, 0)


def test_exit_status_and_usage_errors(lock_file) -> None:
    with Namespace() as ns:
        assert under_exec(ns.name, lock_file, "sh", "-c", "exit 7").returncode == 7
        killed = under_exec(ns.name, lock_file, "sh", "-c", "kill -TERM $$")
        assert killed.returncode == 128 + 15
        # The command runs in the namespace (its own loopback only) and sees the same table
        # through a script calling iptables twice.
        script = under_exec(
            ns.name,
            lock_file,
            "sh",
            "-c",
            "ip -o link show | wc -l; iptables-legacy -w -N x && iptables-legacy -w -S x",
        )
        assert (script.returncode, script.stdout) == (0, "1\n-N x\n")
        missing = under_exec(ns.name, lock_file, "no-such-command-here")
        assert missing.returncode == 2
        assert missing.stderr.startswith("bpflab: error: no command 'no-such-command-here' found")
        empty = under_exec(ns.name, lock_file)
        assert (empty.returncode, empty.stderr) == (
            2,
            "bpflab: error: exec needs a COMMAND after `--`\n",
        )
    gone = under_exec("blnosuchns", lock_file, "true")
    assert (gone.returncode, gone.stderr) == (
        2,
        "bpflab: error: network namespace 'blnosuchns' does not exist (see `ip netns list`)\n",
    )


VECTORS = ROOT.parent / "shared" / "iptables-tests"
# The iptables project's test files of the families we generate (format: their SOURCE file).
VECTOR_FILES = (
    "libxt_tcp.t libxt_udp.t libipt_icmp.t libxt_multiport.t libipt_iprange.t libxt_iprange.t"
    " libxt_length.t libipt_ttl.t libxt_pkttype.t libxt_mark.t libxt_comment.t"
    " libxt_conntrack.t libipt_conntrack.t libxt_state.t libipt_REJECT.t libipt_LOG.t"
    " libxt_NFLOG.t libxt_limit.t libxt_addrtype.t libxt_MARK.t libxt_set.t"
    " libxt_hashlimit.t libxt_recent.t libipt_recent.t libipt_standard.t"
).split()


def vector_lines(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, chain, rule, OK or FAIL) of each filter-table line of `path`, the
    chain the first built-in one its `:CHAINS` line names (as iptables-test.py picks)."""
    found, chain, table = [], "INPUT", "filter"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith(":"):
            names = [name for name in line[1:].split(",") if name in ("INPUT", "FORWARD", "OUTPUT")]
            chain = names[0] if names else ""
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        fields = line.split(";")
        if table == "filter" and chain and len(fields) == 3:
            found.append((number, chain, fields[0], fields[2]))
    return found


def vector_script(lines: list[tuple[int, str, str, str]]) -> str:
    """A shell script doing what iptables-test.py does with each line: add the rule, read
    it back (`-S`), delete it by its spec; printing each command's messages and status. The
    line's number goes to stderr too, where the supervisor says why it refused an update."""
    script = []
    for number, chain, rule, _ in lines:
        script.append(f"echo '# {number}'; echo '# {number}' >&2")
        script.append(f'iptables-legacy -w -A {chain} {rule} 2>&1; s=$?; echo "status $s"')
        script.append(
            f"[ $s = 0 ] && iptables-legacy -w -S {chain} 2>&1 | tail -n 1 &&"
            f' iptables-legacy -w -D {chain} {rule} 2>&1; echo "deleted $?"'
        )
    return "\n".join([*script, "echo '# 0'", "iptables-legacy -w -S 2>&1"]) + "\n"


def blocks(output: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    current: list[str] = []
    for line in output.splitlines():
        if line.startswith("# "):
            current = found.setdefault(int(line[2:]), [])
        else:
            current.append(line)
    return found


REFUSED_ON_PURPOSE = ["iptables: Invalid argument. Run `dmesg' for more information.", "status 1"]


@pytest.mark.parametrize("name", VECTOR_FILES)
def test_iptables_vectors_give_what_they_give_on_the_kernel(name, lock_file) -> None:
    """Each line gives what it gives on the kernel (status, messages, the rule read back, its
    deletion by spec), except where we refuse on purpose: what the vector marks FAIL and
    iptables-legacy 1.8.9 is laxer about (tests/unit/test_iptables_vectors.py), and features
    the rule layer or the generator refuse in one sentence; those fail with EINVAL, the
    reason on the supervisor's stderr, and change nothing."""
    path = VECTORS / name
    assert path.is_file(), f"{path} is missing (see ../shared/iptables-tests/SOURCE)"
    lines = vector_lines(path)
    assert lines  # the file has filter-table lines
    script = vector_script(lines)
    with Namespace() as ours, Namespace() as twin:
        for ns in (ours, twin):
            example_sets(ns, "--match-set")
        answered = under_exec(ours.name, lock_file, "sh", "-c", script)
        expected = on_kernel(twin.name, lock_file, "sh", "-c", script)
    assert answered.returncode == expected.returncode == 0
    mine, theirs = blocks(answered.stdout), blocks(expected.stdout)
    assert sorted(mine) == sorted(theirs) == [0, *(number for number, *_ in lines)]
    differ, reasons = [], blocks(answered.stderr)  # the supervisor's, by line
    for number, _, rule, verdict in lines:
        if mine[number] == theirs[number]:
            continue
        refused = mine[number][:2] == REFUSED_ON_PURPOSE and theirs[number][0] == "status 0"
        reason = " ".join(reasons.get(number, []))
        if refused and (verdict == "FAIL" or "not supported" in reason or "refuses" in reason):
            # iptables-legacy 1.8.9 is laxer than the vector, or a feature we refuse in one
            # sentence (LOG --log-uid, hashlimit byte rates): EINVAL, the table unchanged.
            continue
        differ.append(f"{name}:{number} {rule}: kernel {theirs[number]}, exec {mine[number]}")
    assert not differ, "\n".join([*differ, answered.stderr])
    # Every rule added was deleted again by its spec: both tables end empty.
    assert mine[0] == theirs[0] == ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
