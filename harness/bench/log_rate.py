"""How many LOG events a second reach `bpflab log --follow` before the ring buffer drops some.

The INPUT chain program of one `-j LOG` rule writes a record per packet into a ring of the size
an applied rule set gets (codegen.tc.log.RING_SIZE); the reader is the one `bpflab log` runs
(harness/log_reader: take the records, decode each, write its kernel-format line; printing
aside). Measured:

- capacity: the records a full ring holds (one BPF_PROG_TEST_RUN call fires more events than
  it can take; the rest are counted as dropped, the packets go on);
- reader: how fast the reader turns those records into lines, which is what `--follow` keeps
  up with (it waits on the ring, and the kernel wakes it when a record is committed);
- then events fired for RUN_SECONDS at fractions of that rate, in bursts every BURST_SECONDS,
  with the follow loop draining beside them: how many arrived and how many were dropped.
"""

from __future__ import annotations

import threading
import time

from codegen.bpf.testrun import prog_test_run
from codegen.rules import parse
from codegen.tc.layout import CounterLayout
from codegen.tc.log import RING_SIZE

from ..log_reader import POLL_SECONDS, LogRecord, record_event
from ..runner import ChainRunner, frame_for
from .extensions import PACKET, RULE
from .report import _table
from .settings import Progress

RULES = f"*filter\n:INPUT ACCEPT [0:0]\n{RULE} -j LOG --log-prefix rate\nCOMMIT\n"
FRACTIONS = (0.25, 0.5, 2.0)  # of the reader's rate
RUN_SECONDS = 1.0
BURST_SECONDS = 0.005


def _lines(runner: ChainRunner, layout: CounterLayout) -> int:
    """Drain the ring as `bpflab log` does: every record decoded and written as its line."""
    assert runner.logging is not None
    count = 0
    for raw in runner.logging.ring.records():
        event = record_event(LogRecord.decode(raw), runner.ruleset, layout, {})
        count += event.line is not None
    return count


def _fire(fd: int, rate: float, seconds: float) -> None:
    """`rate` events a second for `seconds`, a burst every BURST_SECONDS."""
    per_burst = max(1, round(rate * BURST_SECONDS))
    start = time.monotonic()
    bursts = int(seconds / BURST_SECONDS)
    for burst in range(bursts):
        prog_test_run(fd, frame_for(PACKET), repeat=per_burst)
        pause = start + (burst + 1) * BURST_SECONDS - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def _follow(runner: ChainRunner, layout: CounterLayout, rate: float) -> dict:
    """Fire at `rate` while a reader drains every POLL_SECONDS; what arrived, what was lost."""
    program = runner.program("INPUT")
    dropped_before = runner.log_drops()
    done = threading.Event()
    arrived = 0

    def read() -> None:
        nonlocal arrived
        assert runner.logging is not None
        while not done.is_set():
            arrived += _lines(runner, layout)
            runner.logging.ring.wait(POLL_SECONDS)
        arrived += _lines(runner, layout)

    reader = threading.Thread(target=read, name="bench-log-reader")
    reader.start()
    try:
        _fire(program.fd, rate, RUN_SECONDS)
    finally:
        done.set()
        reader.join(timeout=30)
    dropped = runner.log_drops() - dropped_before
    return {"rate": rate, "arrived": arrived, "dropped": dropped}


def measure(progress: Progress) -> dict:
    ruleset = parse(RULES, "bench-log-rate.rules")
    layout = CounterLayout.of(ruleset)
    with ChainRunner(ruleset, log_ring_size=RING_SIZE) as runner:
        program = runner.program("INPUT")
        fired = RING_SIZE // 64  # more than a full ring holds: no record is that short
        prog_test_run(program.fd, frame_for(PACKET), repeat=fired)
        held = fired - runner.log_drops()
        started = time.perf_counter()
        lines = _lines(runner, layout)
        reader_s = time.perf_counter() - started
        if lines != held:
            raise RuntimeError(f"the reader took {lines} records of the {held} the ring held")
        reader_rate = held / reader_s
        progress(
            f"log ring   {RING_SIZE // 1024} KiB holds {held:,} events; the reader formats"
            f" {reader_rate:,.0f} events/s"
        )
        runs = []
        for fraction in FRACTIONS:
            run = _follow(runner, layout, reader_rate * fraction)
            runs.append(run)
            progress(
                f"log ring   {run['rate']:,.0f} events/s for {RUN_SECONDS:g} s:"
                f" {run['arrived']:,} arrived, {run['dropped']:,} dropped"
            )
    return {
        "ring_bytes": RING_SIZE,
        "held": held,
        "reader_events_per_s": reader_rate,
        "runs": runs,
    }


def report_lines(results: dict) -> list[str]:
    entry = results.get("log_rate")
    if not entry:
        return []
    lines = [
        "## LOG events through the ring buffer (bpflab log --follow)",
        "",
        f"A ring of {entry['ring_bytes'] // 1024} KiB (an applied rule set's) holds "
        f"{entry['held']:,} records of a 46-byte UDP datagram; the reader (`--follow`, woken by "
        f"the kernel as records arrive) decodes and formats "
        f"{entry['reader_events_per_s']:,.0f} events/s. Events fired faster than it reads, for "
        "longer than the ring can absorb, are dropped and counted; packets never are.",
        "",
    ]
    rows = [
        [f"{run['rate']:,.0f}", f"{run['arrived']:,}", f"{run['dropped']:,}"]
        for run in entry["runs"]
    ]
    header = [f"events/s fired for {RUN_SECONDS:g} s", "arrived", "dropped"]
    return lines + _table(header, rows)
