"""The identity records, leftover and storage messages of issue 16 (harness.deploy.identity,
.leftovers, .lifecycle), without privileges."""

from __future__ import annotations

import errno
import os

import pytest

from harness.deploy import state
from harness.deploy.identity import Identity
from harness.deploy.leftovers import Leftover, summary


@pytest.mark.parametrize(
    "recorded",
    [
        Identity("cookie", (4096,)),
        Identity("cookie", (2**64 - 1,)),
        Identity("inode", (4, 4026532)),
    ],
)
def test_an_identity_reads_back_as_written(recorded):
    assert Identity.from_json(recorded.to_json()) == recorded
    assert Identity.from_bytes(recorded.to_bytes()) == recorded


@pytest.mark.parametrize(
    "saved",
    [None, "4096", {}, {"cookie": "x"}, {"dev": 4}, [4096]],
)
def test_a_state_without_a_readable_identity_has_none(saved):
    assert Identity.from_json(saved) is None


def test_a_cookie_and_an_inode_never_compare_equal():
    assert Identity("cookie", (7,)) != Identity("inode", (7, 0))
    assert Identity.from_bytes(Identity("inode", (7, 0)).to_bytes()).kind == "inode"
    assert Identity.from_bytes(bytes(24)) is None  # an identity map never written


@pytest.mark.parametrize(
    "names, expected",
    [
        ([], None),
        (
            ["blA"],
            "warning: 1 namespace that is gone left pins or state (blA): run `bpflab cleanup`",
        ),
        (
            ["a", "b"],
            "warning: 2 namespaces that are gone left pins or state (a, b): run `bpflab cleanup`",
        ),
        (
            [f"n{i}" for i in range(7)],
            "warning: 7 namespaces that are gone left pins or state (n0, n1, n2, n3, n4 and 2 "
            "more): run `bpflab cleanup`",
        ),
    ],
)
def test_doctor_says_what_is_left_in_one_sentence(names, expected):
    assert summary([Leftover(name, "no longer exists") for name in names]) == expected


def test_cleanup_says_what_it_removed_and_why():
    leftover = Leftover("ns1", "is now another namespace", ["a", "b", "c"])
    assert leftover.line() == (
        "removed what namespace ns1 left (3 pins and state files): it is now another namespace"
    )


@pytest.mark.parametrize(
    "error, expected",
    [
        (
            errno.ENOSPC,
            "no space left for /run/bpflab/rulesets/x.journal.tmp (the filesystem of "
            "/run/bpflab/rulesets is full): nothing was changed; free some space there and "
            "apply again",
        ),
        (
            errno.EROFS,
            "cannot write /run/bpflab/rulesets/x.journal.tmp: Read-only file system; nothing "
            "was changed",
        ),
    ],
)
def test_a_state_file_that_cannot_be_written_is_one_sentence(error, expected):
    path = state.STATE_ROOT / "x.journal.tmp"
    assert state.storage_error(path, OSError(error, os.strerror(error))) == expected


def test_a_bpffs_that_is_not_mounted_is_one_sentence(monkeypatch):
    from harness import environment

    monkeypatch.setattr(environment, "missing_bpf", lambda: None)
    monkeypatch.setattr(environment.os.path, "ismount", lambda path: False)
    assert environment.missing_bpffs.__wrapped__() == (
        "bpffs is not mounted at /sys/fs/bpf: run `sudo scripts/bootstrap` or "
        "`mount -t bpf bpf /sys/fs/bpf`"
    )
    monkeypatch.setattr(environment.os.path, "ismount", lambda path: True)
    assert environment.missing_bpffs.__wrapped__() is None
