"""The running kernel's HZ, which `-m limit` counts in: xt_limit's credits per jiffy, costs and
caps depend on it, and so do the programs that count as it does (codegen.tc.matches.limit).

Found once per process: CONFIG_HZ in /proc/config.gz or /boot/config-RELEASE, else measured,
`bpf_jiffies64()` under BPF_PROG_TEST_RUN against CLOCK_MONOTONIC over a quarter of a second,
rounded to the nearest of the values a kernel can be built with. `BPFLAB_HZ` overrides both
(a machine whose kernel can neither be read nor measured, or a test).
"""

from __future__ import annotations

import gzip
import os
import re
import time
from functools import cache
from pathlib import Path

KERNEL_HZ = (100, 250, 300, 1000)
_CONFIG_LINE = re.compile(rb"^CONFIG_HZ=(\d+)$", re.M)
MEASURE_SECONDS = 0.25


class HzUnknown(RuntimeError):
    """The kernel's HZ could not be found."""


def _from_config() -> int | None:
    release = os.uname().release
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = path.read_bytes()
            text = gzip.decompress(raw) if path.suffix == ".gz" else raw
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        found = _CONFIG_LINE.search(text)
        if found:
            return int(found.group(1))
    return None


def jiffies_now() -> int:
    """The low 32 bits of bpf_jiffies64(), from a two-instruction program's test run."""
    from codegen.bpf import insn as I
    from codegen.bpf.isa import R0
    from codegen.bpf.loader import load
    from codegen.bpf.testrun import prog_test_run

    with load([I.call("jiffies64"), I.mov32(R0, R0), I.exit_()], name="bpflab_hz") as program:
        return prog_test_run(program.fd, bytes(64)).retval


def measure_hz() -> int:
    """HZ from jiffies counted against CLOCK_MONOTONIC, rounded to a kernel's HZ value."""
    start, first = time.monotonic(), jiffies_now()
    time.sleep(MEASURE_SECONDS)
    end, second = time.monotonic(), jiffies_now()
    rate = ((second - first) & 0xFFFF_FFFF) / (end - start)
    nearest = min(KERNEL_HZ, key=lambda hz: abs(hz - rate))
    if abs(nearest - rate) > nearest * 0.2:
        raise HzUnknown(f"jiffies advanced at {rate:.0f} per second, which is no kernel's HZ")
    return nearest


@cache
def kernel_hz() -> int:
    """The running kernel's HZ; HzUnknown (one sentence) when it cannot be found."""
    given = os.environ.get("BPFLAB_HZ")
    if given:
        if not given.isdigit() or int(given) not in KERNEL_HZ:
            raise HzUnknown(f"BPFLAB_HZ={given!r} is not one of {', '.join(map(str, KERNEL_HZ))}")
        return int(given)
    found = _from_config()
    if found is not None:
        return found
    try:
        return measure_hz()
    except HzUnknown:
        raise
    except Exception as error:  # no BPF here: not root, no test-run
        raise HzUnknown(
            "the kernel's HZ, which -m limit counts in, is not in /proc/config.gz or "
            f"/boot/config-{os.uname().release}, and measuring it with bpf_jiffies64 failed "
            f"({error}); set BPFLAB_HZ"
        ) from error
