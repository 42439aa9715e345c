"""iptables filter-table rule sets: the model, the iptables-save text format, the kernel's
binary table, and a reference evaluator that says what the kernel's netfilter would do with one
packet. Match extensions are one module each under codegen.rules.extensions.

Nothing here knows about BPF; the generators read `Ruleset` and the tests use `evaluate` as the
oracle.
"""

from codegen.rules.iptables_save import ParseError, parse, write
from codegen.rules.model import (
    Accept,
    Address,
    Chain,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    RuleError,
    Ruleset,
    Source,
    Target,
)
from codegen.rules.packet import Connection, ConnectionTuple, PacketError
from codegen.rules.reference import Evaluation, FlowEvaluation, FlowStep, evaluate, evaluate_flow
from codegen.rules.tracking import ConnectionTable, TrackingError
from codegen.rules.validation import validate

__all__ = [
    "Accept",
    "Address",
    "Chain",
    "Connection",
    "ConnectionTable",
    "ConnectionTuple",
    "Drop",
    "Evaluation",
    "FlowEvaluation",
    "FlowStep",
    "Fragment",
    "Goto",
    "Interface",
    "Jump",
    "Match",
    "PacketError",
    "ParseError",
    "Protocol",
    "Return",
    "Rule",
    "RuleError",
    "Ruleset",
    "Source",
    "Target",
    "TrackingError",
    "evaluate",
    "evaluate_flow",
    "parse",
    "validate",
    "write",
]
