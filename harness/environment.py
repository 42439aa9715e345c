"""What this machine can do: root, BPF, bpffs, namespaces, llvm-mc, bcc.

Each probe returns None when the capability is there, or one sentence saying what is missing and
how to get it. Tests skip (or, under BPFLAB_REQUIRE_PRIVILEGED=1, fail) with that sentence, and the
CLI prints it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")
REQUIRE_PRIVILEGED = "BPFLAB_REQUIRE_PRIVILEGED"
_BOOTSTRAP_HINT = "run `sudo scripts/bootstrap`"


def require_privileged() -> bool:
    return os.environ.get(REQUIRE_PRIVILEGED) == "1"


def _not_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN): run with sudo"
    return None


@cache
def missing_bpf() -> str | None:
    """Can this process load a BPF program? Tried, not guessed from capabilities."""
    if reason := _not_root():
        return reason
    from codegen.bpf.insn import exit_, mov64
    from codegen.bpf.isa import R0
    from codegen.bpf.loader import load
    from codegen.bpf.syscall import BpfError

    try:
        load([mov64(R0, 0), exit_()], name="probe").close()
    except BpfError as error:
        return f"cannot load BPF programs here: {error}"
    return None


@cache
def missing_bpffs() -> str | None:
    if reason := missing_bpf():
        return reason
    if not os.path.ismount(BPFFS):
        return f"bpffs is not mounted at {BPFFS}: {_BOOTSTRAP_HINT} or `mount -t bpf bpf {BPFFS}`"
    return None


@cache
def missing_netns() -> str | None:
    if reason := _not_root():
        return reason
    if shutil.which("ip") is None:
        return f"the `ip` command (iproute2) is missing: {_BOOTSTRAP_HINT}"
    return None


@cache
def llvm_mc() -> str | None:
    """Path of an llvm-mc that knows BPF cpu v4, or None."""
    for name in ("llvm-mc-19", "llvm-mc-20", "llvm-mc-18", "llvm-mc-17", "llvm-mc"):
        path = shutil.which(name) or shutil.which(name, path="/usr/lib/llvm-19/bin")
        if path is None:
            continue
        probe = subprocess.run(
            [path, "-triple", "bpfel", "-mcpu=v4", "-show-encoding"],
            input="r1 = (s8)r2\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return path
    return None


def missing_llvm() -> str | None:
    if llvm_mc() is None:
        return f"no llvm-mc with BPF cpu v4 support (LLVM >= 17): {_BOOTSTRAP_HINT}"
    return None


@cache
def missing_tracker() -> str | None:
    """Why the connection tracker (codegen/conntrack) cannot be built for the bytecode
    backend here, if it cannot: it needs clang for the BPF target."""
    from codegen.conntrack import TrackerUnavailable, bytecode_functions

    try:
        bytecode_functions()
    except TrackerUnavailable as error:
        return f"the connection tracker cannot be built: {error}"
    return None


@cache
def missing_bcc() -> str | None:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return (
            "bcc is not importable: it comes from the distribution (python3-bpfcc); "
            f"{_BOOTSTRAP_HINT} and use the project's .venv"
        )
    build = Path("/lib/modules") / os.uname().release / "build"
    if not (build / "Makefile").exists():
        return f"bcc needs kernel headers at {build}: {_BOOTSTRAP_HINT}"
    return None


def missing_exec() -> str | None:
    """Why `bpflab exec` (seccomp user notification) cannot run here, None if it can."""
    from .exec.seccomp import missing_user_notification

    return missing_user_notification()


def leftover_state() -> str | None:
    """What namespaces that are gone left (pins, rule-set state), as a warning, or None."""
    if _not_root() is not None or not BPFFS.is_dir():
        return None  # nothing we could have left, or nothing we could judge
    from .deploy import leftovers

    return leftovers.summary(leftovers.find())


WARNINGS = {"leftovers": leftover_state}

PROBES = {
    "privileged": missing_bpffs,
    "netns": lambda: missing_netns() or missing_bpf(),
    "clang": missing_llvm,
    "conntrack": missing_tracker,
    "bcc": lambda: missing_bcc() or missing_bpf(),
    "exec": missing_exec,
}
