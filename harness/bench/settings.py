"""What a bench run measures and how long it may take: the settings of the full and the quick
bench, and the progress callback every section reports to.

Below every other module of the package: the run chooses settings, the sections read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Small sets first: most real filter tables hold 10 to 200 rules.
DEFAULT_SIZES = (1, 10, 50, 100, 200, 1000, 2048, 5000)
QUICK_SIZES = (1, 10, 100)
# The shapes of big rule sets (block lists, generated ACLs, port lists) start where they do.
SHAPE_SIZES = (1000, 10_000, 100_000)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TimingSettings:
    """BPF_PROG_TEST_RUN trials of one program on one packet."""

    trials: int
    repeat: int  # repeats per trial, unless that would exceed the budget
    budget_s: float  # at most this long per trial: large rule sets get fewer repeats


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    largest: bool  # also find and measure the largest rule set that loads
    quick: bool
    testrun: TimingSettings
    throughput_trials: int
    warmup_s: float
    window_s: float
    slow_load_budget_s: float  # skip a C-backend size predicted to take longer to load
    # One rule added to and deleted from tables of these sizes (bench/one_rule.py)
    one_rule_sizes: tuple[int, ...]
    one_rule_trials: int
    # Rule sets of real shapes, each at these sizes (bench/shaped.py)
    shape_sizes: tuple[int, ...]


FULL = Settings(
    sizes=DEFAULT_SIZES,
    largest=True,
    quick=False,
    testrun=TimingSettings(trials=5, repeat=100_000, budget_s=0.5),
    # Many short windows rather than a few long ones: a median over rounds shrugs off a burst
    # of other work on the machine.
    throughput_trials=5,
    warmup_s=0.2,
    window_s=0.6,
    slow_load_budget_s=180.0,
    one_rule_sizes=(1000, 10_000),
    one_rule_trials=3,
    shape_sizes=SHAPE_SIZES,
)
QUICK = Settings(
    sizes=QUICK_SIZES,
    largest=False,
    quick=True,
    testrun=TimingSettings(trials=3, repeat=10_000, budget_s=0.05),
    throughput_trials=1,  # a smoke run of every case: one window each
    warmup_s=0.1,
    window_s=0.2,
    slow_load_budget_s=30.0,
    one_rule_sizes=(100,),
    one_rule_trials=1,
    shape_sizes=(1000,),
)
