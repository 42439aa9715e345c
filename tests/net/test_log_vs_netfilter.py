"""`bpflab log` against the kernel's own LOG target: two routers built alike, one filtering with
iptables-legacy (its lines read from /dev/kmsg by the test's unique prefix), one with our
programs attached (either backend's; its lines from `bpflab log`), the same frames sent to
both; every line, its syslog level and its order must be the kernel's. INPUT (frames to the
router), FORWARD (frames through it, with the TTL the kernel decrements first) and OUTPUT
(packets the router sends);
TCP with options, --log-tcp-sequence and --log-tcp-options, UDP, ICMP echo, an ICMP error
quoting a packet, IP options with --log-ip-options, --log-macdecode, a mark, a later fragment.

The kernel logs from a namespace other than the first only with the host-wide
`net.netfilter.nf_log_all_netns` on: the test sets it and puts it back while holding
ALL_NETNS_LOCK (an flock that other test runs and scripts/noise take before they touch it), in
an xdist group of its own. Lines are waited for, never slept for: each case reads both logs
until they agree and stay so for a moment, within a generous bound.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from harness.cli import main
from harness.deploy.lifecycle import apply, current, flush
from netns import RouterTopology
from tests.net.test_ipt_blob import restore

pytestmark = [pytest.mark.netns, pytest.mark.privileged, pytest.mark.xdist_group("nf_log")]

ALL_NETNS = Path("/proc/sys/net/netfilter/nf_log_all_netns")
# Whoever changes ALL_NETNS holds this lock meanwhile (scripts/noise too): the value is ours.
ALL_NETNS_LOCK = Path("/run/lock/bpflab.nf_log_all_netns.lock")
LOCK_WAIT = 300.0  # seconds: another run's log tests may hold the lock for a minute or two
ETH_P_ALL = 0x0003
WAIT = 10.0  # seconds a frame's lines may take to come (both sides log in microseconds)
QUIET = 0.2  # seconds both logs must stay alike before a case counts as done
POLL = 0.02
CLIENT, ROUTER, SERVER = "198.18.1.1", "198.18.1.254", "198.18.2.1"
MARK = 7
TAG = "bl" + secrets.token_hex(3)  # this run's lines in the kernel's log


OUTPUT_FLAGS = "--log-tcp-sequence --log-tcp-options --log-level 6"
ALL_FLAGS = "--log-ip-options --log-tcp-options --log-tcp-sequence"


def _rules(tag: str) -> str:
    return f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:logs - [0:0]
-A INPUT -s {CLIENT}/32 -i eth0 -j logs
-A INPUT -s {CLIENT}/32 -i eth0 -j DROP
-A FORWARD -i eth0 -j LOG --log-prefix "{tag}f: " --log-ip-options --log-tcp-options
-A FORWARD -i eth0 -p udp -j LOG --log-prefix "{tag}F: " --log-macdecode --log-level 2
-A FORWARD -i eth0 -j DROP
-A OUTPUT -m mark --mark 0x{MARK:x} -j LOG --log-prefix "{tag}o: " {OUTPUT_FLAGS}
-A OUTPUT -m mark --mark 0x{MARK:x} -j DROP
-A logs -p tcp -j LOG --log-prefix "{tag}t: " --log-tcp-sequence --log-tcp-options
-A logs -p icmp -j LOG --log-prefix "{tag}i: " --log-ip-options
-A logs -j LOG --log-prefix "{tag}m: " --log-macdecode
-A logs -j LOG --log-prefix "{tag}a: " --log-level 7 {ALL_FLAGS}
COMMIT
"""


OPTIONS = [("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b"")]
RECORD_ROUTE = b"\x07\x07\x04\x00\x00\x00\x00\x00"


def _quoted(src: str, dst: str) -> bytes:
    return bytes(IP(src=src, dst=dst, id=99, ttl=1) / UDP(sport=4000, dport=33434) / b"q")


# (name, where it goes: "input", "forward" or "output", the IP packet)
CASES = [
    (
        "input tcp syn with options",
        "input",
        IP(src=CLIENT, dst=ROUTER, id=11, tos=0x10, flags="DF")
        / TCP(sport=1111, dport=9999, seq=1000, flags="SEC", window=1234, options=OPTIONS),
    ),
    (
        "input tcp with ip options",
        "input",
        IP(src=CLIENT, dst=ROUTER, id=12, options=RECORD_ROUTE)
        / TCP(sport=1112, dport=80, seq=5, ack=9, flags="PA", urgptr=0)
        / b"data",
    ),
    ("input udp", "input", IP(src=CLIENT, dst=ROUTER, id=13) / UDP(sport=2222, dport=53) / b"x"),
    (
        "input icmp echo with ip options",
        "input",
        IP(src=CLIENT, dst=ROUTER, id=14, options=RECORD_ROUTE)
        / ICMP(type=8, id=7, seq=1)
        / b"ping",
    ),
    (
        "input icmp error quoting a packet",
        "input",
        IP(src=CLIENT, dst=ROUTER, id=15) / ICMP(type=3, code=3) / _quoted(ROUTER, CLIENT),
    ),
    (
        "forward tcp with options",
        "forward",
        IP(src=CLIENT, dst=SERVER, id=21, ttl=30)
        / TCP(sport=3333, dport=443, seq=77, flags="S", options=OPTIONS),
    ),
    (
        "forward udp, macdecode",
        "forward",
        IP(src=CLIENT, dst=SERVER, id=22, ttl=9, options=RECORD_ROUTE)
        / UDP(sport=5, dport=6)
        / b"abc",
    ),
    (
        "forward icmp fragmentation needed",
        "forward",
        IP(src=CLIENT, dst=SERVER, id=23)
        / ICMP(type=3, code=4, nexthopmtu=1400)
        / _quoted(SERVER, CLIENT),
    ),
    (
        "forward later fragment",
        "forward",
        IP(src=CLIENT, dst=SERVER, id=24, frag=100, proto=17) / bytes(24),
    ),
    (
        "output tcp with sequence and options",
        "output",
        IP(src=ROUTER, dst=CLIENT, id=31, ttl=64)
        / TCP(sport=22, dport=40000, seq=123456, ack=654321, flags="SA", options=OPTIONS),
    ),
    (
        "output icmp echo reply",
        "output",
        IP(src=ROUTER, dst=CLIENT, id=32) / ICMP(type=0, id=5, seq=6) / b"pong",
    ),
]


@pytest.fixture(scope="module")
def kernel_logs_every_namespace() -> Iterator[None]:
    if not ALL_NETNS.exists():
        pytest.skip(f"{ALL_NETNS} is missing: no netfilter logging in this kernel")
    with open(ALL_NETNS_LOCK, "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{ALL_NETNS_LOCK} was held by another process for {LOCK_WAIT} s")
                time.sleep(0.1)
        try:
            before = ALL_NETNS.read_text().strip()
            ALL_NETNS.write_text("1\n")
            try:
                yield
            finally:
                ALL_NETNS.write_text(f"{before}\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class KernelLog:
    """/dev/kmsg from now on: the records of this run's LOG rules, as (level, text)."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> list[str]:
        lines = []
        for _ in range(10_000):
            try:
                record = os.read(self.fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError as error:  # EPIPE: records were overwritten before we read them
                if error.errno != errno.EPIPE:
                    raise
                continue
            header, _, text = record.partition(";")
            text = text.split("\n", 1)[0]
            if text.startswith(TAG):
                lines.append(f"<{int(header.split(',')[0]) & 7}>{text}")
        return lines

    def close(self) -> None:
        os.close(self.fd)


class Lab:
    """One router topology and the sockets that put the cases' packets on their way."""

    def __init__(self, stack: ExitStack):
        self.topology = stack.enter_context(RouterTopology(ipv6=False))
        client = self.topology.client
        self.wire = stack.enter_context(
            closing(
                client.namespace.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            )
        )
        self.wire.bind((client.ifname, 0))
        router = self.topology.router.namespace
        self.raw = stack.enter_context(
            closing(router.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
        )
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)

    @property
    def router(self) -> str:
        return self.topology.router.namespace.name

    def send(self, where: str, packet: bytes) -> None:
        if where == "output":
            try:
                self.raw.sendto(packet, (str(IP(packet).dst), 0))
            except PermissionError:
                pass  # netfilter's DROP at OUTPUT fails the send (TC's passes it silently)
            return
        router_mac = self.topology.router.client_side.mac
        frame = Ether(src=self.topology.client.mac, dst=router_mac) / IP(packet)
        self.wire.send(bytes(frame))


def _our_lines(namespace: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert main(["log", "--netns", namespace, "--levels"]) == 0
    out, err = capsys.readouterr()
    assert err.endswith("0 events dropped because the ring buffer was full\n"), err
    return out.splitlines()


def _both_logs(
    kernel_log: KernelLog, namespace: str, capsys: pytest.CaptureFixture[str]
) -> tuple[list[str], list[str]]:
    """The kernel's lines and ours for the frames just sent: read until both have lines and
    agree, and stay so for QUIET seconds, or until WAIT seconds have passed."""
    kernel: list[str] = []
    mine: list[str] = []
    deadline = time.monotonic() + WAIT
    alike_since = None
    while True:
        kernel += kernel_log.read()
        mine += _our_lines(namespace, capsys)
        now = time.monotonic()
        if kernel and kernel == mine:
            alike_since = now if alike_since is None else alike_since
            if now - alike_since >= QUIET:
                return kernel, mine
        else:
            alike_since = None
        if now > deadline:
            return kernel, mine
        time.sleep(POLL)


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_bpflab_log_prints_the_kernels_lines(
    kernel_logs_every_namespace: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    if backend == "c":
        pytest.importorskip("bcc", reason="the C backend needs bcc")
    text = _rules(TAG)
    with ExitStack() as stack:
        kernel_log = KernelLog()
        stack.callback(kernel_log.close)
        twin, ours = Lab(stack), Lab(stack)
        restore(twin.topology.router.namespace, text, tmp_path)
        apply(text, "log.rules", ours.router, backend=backend)
        stack.callback(flush, ours.router)
        kernel_log.read()
        failures, kinds = [], set()
        for name, where, layer in CASES:
            packet = bytes(layer)
            twin.send(where, packet)
            ours.send(where, packet)
            kernel, mine = _both_logs(kernel_log, ours.router, capsys)
            kinds.update(line.split(":")[0][len(TAG) + 3 :] for line in kernel)
            if not kernel:
                failures.append(f"{name}: the kernel logged nothing")
            if kernel != mine:
                failures.append(f"{name}:\n  kernel {kernel}\n  ours   {mine}")
    assert not failures, "\n".join(failures)
    assert kinds == set("fFotima"), kinds  # every LOG rule had its say


def test_follow_prints_lines_as_they_come_and_stops_at_its_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--follow --timeout`: lines written while it waits are printed, then it ends; a rule
    set without LOG rules, or none at all, is one sentence and exit 2."""
    import threading

    with ExitStack() as stack:
        lab = Lab(stack)
        namespace = lab.router
        assert main(["log", "--netns", namespace]) == 2
        assert "no rule set is applied" in capsys.readouterr().err
        apply(_rules(""), "log.rules", namespace)
        stack.callback(flush, namespace)
        packet = bytes(IP(src=CLIENT, dst=SERVER, id=41) / UDP(sport=1, dport=2))
        # The frame goes out well inside the timeout even on a busy machine.
        sender = threading.Timer(0.5, lab.send, ("forward", packet))
        sender.start()
        started = time.monotonic()
        assert main(["log", "--netns", namespace, "--follow", "--timeout", "4"]) == 0
        elapsed = time.monotonic() - started
        sender.join()
        out, err = capsys.readouterr()
        assert 4 <= elapsed < 20, elapsed
        assert [line.split(" ")[0] for line in out.splitlines()] == ["f:", "F:"], out
        assert "SRC=198.18.1.1 DST=198.18.2.1 LEN=28 TOS=0x00 PREC=0x00 TTL=63 ID=41" in out
        assert (
            err == "bpflab: 2 log lines shown; 0 events dropped because the ring buffer was full\n"
        )
        assert main(["log", "--netns", namespace]) == 0  # each line once
        assert capsys.readouterr().out == ""
        assert main(["log", "--netns", namespace, "--follow", "--timeout", "0"]) == 2
        assert "--timeout must be a positive" in capsys.readouterr().err
        apply(_rules("").split(":logs")[0] + "COMMIT\n", "plain.rules", namespace)
        assert main(["log", "--netns", namespace]) == 2
        assert "has no LOG or NFLOG rules" in capsys.readouterr().err


def test_nflog_packets_go_to_the_pcap_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bpflab log --pcap FILE`: the packets of NFLOG rules, in order, cut at --nflog-size,
    with their own length; LOG lines still on stdout."""
    from scapy.utils import rdpcap

    text = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -i eth0 -j NFLOG --nflog-group 5
-A FORWARD -i eth0 -p udp -j NFLOG --nflog-size 24
-A FORWARD -i eth0 -j LOG --log-prefix "{TAG}: "
-A FORWARD -i eth0 -j DROP
COMMIT
"""
    packets = [
        bytes(IP(src=CLIENT, dst=SERVER, id=51, ttl=20) / UDP(sport=7, dport=8) / (b"u" * 40)),
        bytes(IP(src=CLIENT, dst=SERVER, id=52, ttl=20) / TCP(sport=9, dport=10, flags="S")),
    ]
    with ExitStack() as stack:
        lab = Lab(stack)
        apply(text, "nflog.rules", lab.router)
        stack.callback(flush, lab.router)
        started = time.time()
        for packet in packets:
            lab.send("forward", packet)
        # The DROP after the NFLOG and LOG rules counts a packet once they have had their say.
        deadline = time.monotonic() + WAIT
        while current(lab.router)[1][("FORWARD", 4)][0] < len(packets):
            assert time.monotonic() < deadline, "the packets did not reach FORWARD's DROP"
            time.sleep(POLL)
        capture = tmp_path / "nflog.pcap"
        capsys.readouterr()
        assert main(["log", "--netns", lab.router, "--pcap", str(capture)]) == 0
        out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and all(f"{TAG}: IN=eth0" in o for o in out.splitlines())
    assert f"3 NFLOG packets written to {capture}" in err, err
    # As FORWARD sees them: the TTL one less, the checksum with it.
    forwarded = [_forwarded(packet) for packet in packets]
    records = rdpcap(str(capture))
    assert [bytes(record) for record in records] == [forwarded[0], forwarded[0][:24], forwarded[1]]
    assert [record.wirelen for record in records] == [len(packets[0])] * 2 + [len(packets[1])]
    assert all(started - 1 < float(record.time) < time.time() + 1 for record in records)


def _forwarded(packet: bytes) -> bytes:
    """The packet as FORWARD has it: the TTL one less and the header checksum with it."""
    header = IP(packet)
    header.ttl -= 1
    del header.chksum
    return bytes(header)


def _kernel_nflog(path: Path) -> list[tuple[str, bytes]]:
    """(prefix, payload) of each message of a tcpdump capture on nflog:GROUP (linktype NFLOG:
    a 4-byte header, then TLVs of host-order length and type, each padded to 4 bytes)."""
    from scapy.utils import RawPcapReader

    found = []
    for data, _ in RawPcapReader(str(path)):
        prefix, payload, at = "", b"", 4
        while at + 4 <= len(data):
            length, kind = struct.unpack_from("<HH", data, at)
            if length < 4:
                break
            value = data[at + 4 : at + length]
            if kind == 10:  # NFULA_PREFIX
                prefix = value.rstrip(b"\0").decode()
            elif kind == 9:  # NFULA_PAYLOAD
                payload = value
            at += (length + 3) & ~3
        found.append((prefix, payload))
    return found


NFLOG_GROUP = 7
NFLOG_CASES = [
    ("forward", IP(src=CLIENT, dst=SERVER, id=61, ttl=20) / UDP(sport=7, dport=8) / (b"u" * 40)),
    ("forward", IP(src=CLIENT, dst=SERVER, id=62, ttl=9) / TCP(sport=9, dport=10, flags="S")),
    ("input", IP(src=CLIENT, dst=ROUTER, id=63, options=RECORD_ROUTE) / UDP(sport=1, dport=2)),
    ("output", IP(src=ROUTER, dst=CLIENT, id=64) / ICMP(type=0, id=1, seq=2) / b"pong"),
]


@pytest.mark.parametrize("backend", ["bytecode", "c"])
def test_nflog_packets_are_the_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    """The packets our NFLOG rules pass on (`bpflab log --pcap`) are the payloads the kernel's
    NFLOG hands nfnetlink_log (read with tcpdump -i nflog:N from the twin), byte for byte:
    the TTL and checksum FORWARD sees, Record Route filled in at INPUT, --nflog-size's cut."""
    text = f"""*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -s {CLIENT}/32 -i eth0 -j NFLOG --nflog-group {NFLOG_GROUP} --nflog-prefix in
-A INPUT -s {CLIENT}/32 -i eth0 -j DROP
-A FORWARD -i eth0 -j NFLOG --nflog-group {NFLOG_GROUP} --nflog-prefix fwd
-A FORWARD -i eth0 -p udp -j NFLOG --nflog-group {NFLOG_GROUP} --nflog-size 24
-A FORWARD -i eth0 -j DROP
-A OUTPUT -m mark --mark 0x{MARK:x} -j NFLOG --nflog-group {NFLOG_GROUP} --nflog-prefix out
-A OUTPUT -m mark --mark 0x{MARK:x} -j DROP
COMMIT
"""
    from scapy.utils import rdpcap

    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is needed to read the kernel's NFLOG messages")
    if backend == "c":
        pytest.importorskip("bcc", reason="the C backend needs bcc")
    expected = 5  # FORWARD's UDP twice, its TCP once, INPUT's and OUTPUT's once each
    with ExitStack() as stack:
        twin, ours = Lab(stack), Lab(stack)
        restore(twin.topology.router.namespace, text, tmp_path)
        apply(text, "nflog.rules", ours.router, backend=backend)
        stack.callback(flush, ours.router)
        kernel_capture = tmp_path / "kernel.pcap"
        tcpdump = subprocess.Popen(
            ["ip", "netns", "exec", twin.router, "tcpdump", "-i", f"nflog:{NFLOG_GROUP}"]
            + ["-w", str(kernel_capture), "-c", str(expected), "-U"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stack.callback(_stop, tcpdump)
        assert tcpdump.stderr is not None
        said = [tcpdump.stderr.readline() for _ in range(1)]
        while "listening on" not in said[-1] and said[-1] and len(said) < 5:
            said.append(tcpdump.stderr.readline())
        assert "listening on" in said[-1], said
        for where, layer in NFLOG_CASES:
            twin.send(where, bytes(layer))
            ours.send(where, bytes(layer))
        tcpdump.wait(timeout=30)
        ours_capture = tmp_path / "ours.pcap"
        assert main(["log", "--netns", ours.router, "--pcap", str(ours_capture)]) == 0
        capsys.readouterr()
    kernel = [payload for _, payload in _kernel_nflog(kernel_capture)]
    assert len(kernel) == expected
    assert [bytes(record) for record in rdpcap(str(ours_capture))] == kernel


def _stop(process: subprocess.Popen) -> None:
    """End a tcpdump we started, by its pid, if it is still running."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
