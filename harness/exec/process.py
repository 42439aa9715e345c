"""`bpflab exec --netns NS -- COMMAND ...`: run an unmodified iptables (or a script calling
it) in NS with its filter-table socket options answered from the rule set bpflab applied
there, as the bpfilter usermode helper answered them, with no kernel patch.

Why seccomp user notification: it is the one way to answer another process's system calls
with no kernel module, no LD_PRELOAD (which a static binary escapes) and no ptrace stop on
every call: only the six ip_tables socket options stop, and the filter is inherited by
everything a script starts. Every other call runs at full speed. The filter
(harness.exec.seccomp) returns SECCOMP_RET_USER_NOTIF for getsockopt/setsockopt at SOL_IP
with options 64..67, and the supervisor (this process) answers each from the target's
memory (process_vm_readv/writev), or lets it through to the kernel
(SECCOMP_USER_NOTIF_FLAG_CONTINUE) when it is not ours: another table (`-t nat`), another
socket family, a socket of another namespace, or a request malformed in a way the kernel
itself answers. ctypes over libc is enough: nothing to
install (python3-seccomp would only build the same ten-instruction filter).

The child path, between fork and exec, is short and does no work but system calls: enter
NS (setns), restore the signal dispositions Python changed, PR_SET_NO_NEW_PRIVS, install the
filter with SECCOMP_FILTER_FLAG_NEW_LISTENER, send the listener fd to the supervisor over a
socketpair made before fork (SCM_RIGHTS), exec. The supervisor is single-threaded when it
forks. It serves until the child exits, then returns the child's exit status (128 + N for a
signal N). Processes the child left running keep the filter; once the supervisor has gone
their intercepted calls fail with ENOSYS, never hang.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TextIO

from codegen.rules.blob.kernel import read_entries
from codegen.rules.blob.structs import BlobError
from netns.namespace import CLONE_NEWNET, Namespace

from . import seccomp
from .supervisor import Supervisor, exit_status, identity

HANDSHAKE_WAIT = 10.0  # seconds the child has to send its listener
EXIT_EXEC_FAILED = 127


def run(
    netns: str,
    command: Sequence[str],
    *,
    backend: str = "bytecode",
    fastpath: bool = False,
    log: TextIO = sys.stderr,
) -> int:
    """Run `command` (not empty; harness.exec.command checks it) in `netns` with its
    filter-table calls answered by bpflab; its exit status (128 + N when a signal N ended
    it). Tables it sends are applied with `backend`, and with the fast path when `fastpath`
    or when the rule set applied in `netns` had it. Raises NamespaceError when `netns` does
    not exist."""
    namespace = Namespace.existing(netns)  # NamespaceError: one sentence
    _instantiate_filter(namespace)
    namespace_fd = os.open(namespace.path, os.O_RDONLY | os.O_CLOEXEC)
    ours_identity = identity(namespace_fd)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        ours.close()
        _child(namespace_fd, theirs, list(command))
    os.close(namespace_fd)
    theirs.close()
    listener = _handshake(ours)
    ours.close()
    if listener is None:  # the child failed before exec and said why on stderr
        return exit_status(os.waitpid(pid, 0)[1])
    supervisor = Supervisor(netns, ours_identity, backend, log, fastpath=fastpath)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the child's to take
    try:
        return supervisor.serve(listener, pid)
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(listener)


def _instantiate_filter(namespace: Namespace) -> None:
    """Make the kernel create NS's (empty, all-ACCEPT) filter table if it has none yet, so
    that /proc/net/ip_tables_names lists it: iptables-legacy-save reads the table names there,
    and our answers never reach the kernel to create it. Its rules stay empty: every
    SET_REPLACE of the filter table is ours."""
    try:
        with namespace.enter():
            read_entries()
    except BlobError:
        pass  # no ip_tables in this kernel: iptables-legacy-save lists nothing, as it would


def _child(namespace_fd: int, channel: socket.socket, command: list[str]) -> None:
    """Between fork and exec: system calls only, then exec; any failure ends the child."""
    stage = "entering the namespace"
    try:
        if seccomp._libc.setns(namespace_fd, CLONE_NEWNET) != 0:
            raise OSError(seccomp.ctypes.get_errno(), "setns")
        os.close(namespace_fd)
        # exec keeps ignored signals ignored: give the command the dispositions a shell would.
        for number in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        stage = "installing the seccomp filter"
        listener = seccomp.install_listener()
        socket.send_fds(channel, [b"L"], [listener])
        os.close(listener)
        channel.close()
        stage = f"running {command[0]}"
        os.execvp(command[0], command)
    except OSError as error:
        message = f"bpflab: error: {stage} failed: {error.strerror or error}\n"
        os.write(2, message.encode(errors="replace"))
    finally:
        os._exit(EXIT_EXEC_FAILED)


def _handshake(channel: socket.socket) -> int | None:
    channel.settimeout(HANDSHAKE_WAIT)
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    except (OSError, TimeoutError):
        return None
    return fds[0] if fds else None
