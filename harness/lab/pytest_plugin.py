"""The pytest plugin (entry point `pytest11`): lab fixtures, and packet scripts as tests.

Fixtures:
- `netns`: a throwaway namespace;
- `veth_pair`: a client and a host joined by a veth pair (`HostTopology`);
- `topology`: a `Lab` ready for traffic, "host" unless the test says
  `@pytest.mark.topology("router")`;
- `ruleset`: a function that parses iptables-save text into a validated `Ruleset`.

Every `*.toml` file in a directory named `scripts` under the test paths is a packet script and
runs as one test per backend. Names are unique per process and xdist worker, so `pytest -n auto`
is safe.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from codegen.rules.model import Ruleset


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "topology(kind): the lab the `topology` fixture builds")


@pytest.fixture
def netns():
    from netns import Namespace

    with Namespace() as namespace:
        yield namespace


@pytest.fixture
def veth_pair():
    from netns import HostTopology

    with HostTopology(ipv6=False) as topology:
        yield topology


@pytest.fixture
def topology(request: pytest.FixtureRequest):
    from .traffic import Lab

    marker = request.node.get_closest_marker("topology")
    kind = marker.args[0] if marker else "host"
    with Lab(kind) as lab:
        yield lab


@pytest.fixture
def ruleset() -> Callable[[str], Ruleset]:
    from codegen.rules import parse, validate

    def make(text: str, filename: str = "<test>") -> Ruleset:
        parsed = parse(text, filename)
        validate(parsed)
        return parsed

    return make


def _backends() -> list[str]:
    return ["bytecode", "c"] if importlib.util.find_spec("codegen.c") else ["bytecode"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix == ".toml" and file_path.parent.name == "scripts":
        return ScriptFile.from_parent(parent, path=file_path)
    return None


class ScriptFile(pytest.File):
    def collect(self) -> Iterator[pytest.Item]:
        for backend in _backends():
            item = ScriptItem.from_parent(self, name=f"{self.path.stem}[{backend}]")
            item.backend = backend
            for marker in ("netns", "privileged", *(["bcc"] if backend == "c" else [])):
                item.add_marker(marker)
            yield item


class ScriptMismatch(AssertionError):
    pass


class ScriptItem(pytest.Item):
    backend = "bytecode"

    def runtest(self) -> None:
        from .replay import replay
        from .scripts import load_script

        report = replay(load_script(self.path), backend=self.backend)  # type: ignore[arg-type]
        if not report.ok:
            raise ScriptMismatch(report.render())

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, ScriptMismatch):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"packet script {self.path.name} ({self.backend})"
