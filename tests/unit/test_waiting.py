"""harness.lab.waiting.until: reads until the condition holds, never past its bound."""

from __future__ import annotations

import pytest

from harness.lab.waiting import until


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(
    ("ready_at", "timeout", "want_value", "want_reads"),
    [
        (1, 10.0, 1, 1),  # already there: one read, no sleep
        (4, 10.0, 4, 4),  # comes on the fourth read
        (10**6, 1.0, 12, 12),  # never comes: stops after the bound, with a last read past it
    ],
)
def test_until_reads_until_done_or_the_bound(
    ready_at: int, timeout: float, want_value: int, want_reads: int
) -> None:
    clock = FakeClock()
    reads = []

    def read() -> int:
        reads.append(clock.now)
        return len(reads)

    value = until(
        read, lambda n: n >= ready_at, timeout=timeout, interval=0.1, clock=clock, sleep=clock.sleep
    )
    assert value == want_value
    assert len(reads) == want_reads
    assert len(clock.slept) == want_reads - 1
    assert clock.now <= timeout + 0.1 + 1e-9
