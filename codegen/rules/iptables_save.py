"""The iptables-save / iptables-restore text format of the filter table: `parse`
(codegen.rules.restore) and `write` (codegen.rules.save), in one place for callers."""

from codegen.rules.restore import Dump, ParseErrors, left_out_note, parse, parse_dump
from codegen.rules.save import write, write_rule
from codegen.rules.syntax import ParseError

__all__ = [
    "Dump",
    "ParseError",
    "ParseErrors",
    "left_out_note",
    "parse",
    "parse_dump",
    "write",
    "write_rule",
]
