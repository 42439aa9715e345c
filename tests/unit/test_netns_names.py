"""Namespace names: no root needed, nothing is created."""

import os
import re

import pytest

from netns.namespace import MAX_NAME_LENGTH, NamespaceError, format_name, new_name

PID_MAX_LIMIT = 4194304  # the largest pid_max Linux allows: pids stay below it

NAME_CASES = [
    # pid, PYTEST_XDIST_WORKER, counter, expected name
    (1, None, 0, "bl1-m-0"),
    (35, "gw0", 35, "blz-0-z"),
    (36, "gw12", 36, "bl10-12-10"),
    (PID_MAX_LIMIT - 1, "gw99", 36**4 - 1, "bl2hwcf-99-zzzz"),
]


@pytest.mark.parametrize(("pid", "worker", "counter", "expected"), NAME_CASES)
def test_format_name(pid: int, worker: str | None, counter: int, expected: str) -> None:
    name = format_name(pid, worker, counter)
    assert name == expected
    assert len(name) <= MAX_NAME_LENGTH
    # The owner can be read back from the name alone.
    match = re.fullmatch(r"bl([0-9a-z]+)-(m|[0-9]+)-([0-9a-z]+)", name)
    assert match is not None
    assert int(match[1], 36) == pid
    assert match[2] == ("m" if worker is None else worker.removeprefix("gw"))
    assert int(match[3], 36) == counter


@pytest.mark.parametrize(
    ("pid", "worker", "counter", "error"),
    [
        (1, "master", 0, "unexpected pytest-xdist worker id 'master'"),
        (1, "gw", 0, "unexpected pytest-xdist worker id 'gw'"),
        (PID_MAX_LIMIT - 1, "gw99", 36**4, "longer than 15 characters"),
        (PID_MAX_LIMIT - 1, "gw123", 36**3, "longer than 15 characters"),
    ],
)
def test_format_name_refuses(pid: int, worker: str, counter: int, error: str) -> None:
    with pytest.raises(NamespaceError, match=error):
        format_name(pid, worker, counter)


def test_new_names_are_unique_short_and_prefixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    names = [new_name() for _ in range(1000)]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"bl[0-9a-z]+-m-[0-9a-z]+", name), name
        assert len(name) <= MAX_NAME_LENGTH
        assert int(name[2:].split("-")[0], 36) == os.getpid()


def test_new_name_carries_the_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw7")
    assert new_name().split("-")[1] == "7"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw8")
    assert new_name().split("-")[1] == "8"
