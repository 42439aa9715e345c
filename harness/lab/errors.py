"""The packet lab's input error, in a module of its own so that the command line can catch it
without importing the lab (scapy and all) for commands that never run one."""

from __future__ import annotations


class ScriptError(ValueError):
    """A script that cannot run; `str()` is `FILE:LINE: error: MESSAGE`."""

    def __init__(self, path: str, line: int, message: str):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: error: {message}")
