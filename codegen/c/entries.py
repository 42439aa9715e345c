"""What a C unit is asked for: its entries (one program each: a hook, and for the test-run
flavour a built-in chain), and the error for anything that stops a unit from being made.

Kept apart from the writers so that every module of the backend can raise CCompileError and
read an Entry without importing the unit that assembles them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from codegen.rules.names import BUILTIN_CHAINS
from codegen.tc.generator import CompileError

Hook = Literal["ingress", "egress", "chain", "bridged", "port_ingress"]


class CCompileError(CompileError):
    """The C backend cannot make a program: a rule set it cannot express, bcc missing, or bcc's
    compiler refusing the C. One sentence; names the rule when the fault is in a rule's code."""


@dataclass(frozen=True)
class Entry:
    """One program of a translation unit: a hook, and for `chain` the built-in chain."""

    hook: Hook
    chain: str | None = None

    def __post_init__(self) -> None:
        if self.hook == "chain":
            if self.chain not in BUILTIN_CHAINS:
                raise CCompileError(f"only a built-in chain can run on its own, not {self.chain!r}")
        elif self.hook in ("ingress", "egress", "bridged", "port_ingress"):
            if self.chain is not None:
                raise CCompileError(f"the {self.hook} program takes no chain ({self.chain!r})")
        else:
            raise CCompileError(
                f"unknown hook {self.hook!r}: ingress, egress, bridged, port_ingress or chain"
            )

    @property
    def function(self) -> str:
        """The C function, which is also the program's name (at most 15 characters)."""
        if self.hook == "chain":
            return f"bpflab_{self.chain}"
        return "bpflab_port_in" if self.hook == "port_ingress" else f"bpflab_{self.hook}"

    @property
    def builtins(self) -> tuple[str, ...]:
        if self.hook == "ingress":
            return ("INPUT", "FORWARD")
        if self.hook == "egress":
            return ("OUTPUT",)
        if self.hook == "bridged":
            return ("FORWARD",)
        if self.hook == "port_ingress":
            return ()
        assert self.chain is not None
        return (self.chain,)
