"""A fast path for the rule lines big generated rule sets are made of: `-A CHAIN [-s NET]
[-d NET] [-i IF] [-o IF] [-p tcp|udp [-m tcp|udp] [--sport P[:Q]] [--dport P[:Q]]] -j
ACCEPT|DROP`, in the order and spelling iptables-save prints them (dotted quads without
leading zeros, prefix lengths, decimal ports). Such a line is read with one regular expression
into the same model the full parser (codegen.rules.command_line) makes, about three times
faster; any other line, and any line this path is not sure of (a chain not yet made, a range
that ends before it starts, a rule validate_rule refuses), is left to the full parser, which
reads it, or says what is wrong with it, as it always has. tests/unit/test_fast_lines.py
holds both paths to the same model on generated lines.
"""

from __future__ import annotations

import re

from codegen.rules.extensions.ports import PortRange
from codegen.rules.extensions.tcp import TcpMatch
from codegen.rules.extensions.udp import UdpMatch
from codegen.rules.model import (
    Accept,
    Address,
    Drop,
    Interface,
    Match,
    Protocol,
    Rule,
    RuleError,
    Ruleset,
)
from codegen.rules.syntax import Line
from codegen.rules.validation import validate_rule

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_NET = rf"({_OCTET})\.({_OCTET})\.({_OCTET})\.({_OCTET})(?:/(3[0-2]|[12]?\d))?"
_PORT = r"(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}|0)"
_NAME = r"([A-Za-z0-9_.:@-]{1,15})"  # no '+' (a wildcard) and within IFNAMSIZ
_RULE = re.compile(
    r"-A (\S+)"
    rf"(?: -s {_NET})?"
    rf"(?: -d {_NET})?"
    rf"(?: -i {_NAME})?"
    rf"(?: -o {_NAME})?"
    rf"(?: -p (tcp|udp)( -m (?:tcp|udp))?"
    rf"(?: --sport {_PORT}(?::{_PORT})?)?"
    rf"(?: --dport {_PORT}(?::{_PORT})?)?)?"
    r" -j (ACCEPT|DROP)"
)
_PROTOCOLS = {"tcp": (6, TcpMatch), "udp": (17, UdpMatch)}
_TARGETS = {"ACCEPT": Accept(), "DROP": Drop()}


def _address(groups: tuple[str | None, ...]) -> tuple[int, int]:
    """(address masked, mask) of a _NET's five groups; (0, 0) for none or a /0."""
    if groups[0] is None:
        return 0, 0
    prefix = 32 if groups[4] is None else int(groups[4])
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    value = 0
    for octet in groups[:4]:
        value = value << 8 | int(octet)  # type: ignore[arg-type]
    return value & mask, mask


def _ports(first: str | None, last: str | None) -> PortRange | None:
    """The range of `P` or `P:Q`; the default for none; None if it ends before it starts."""
    if first is None:
        return PortRange()
    low = int(first)
    high = low if last is None else int(last)
    return PortRange(low, high) if low <= high else None


def read_rule(
    line: Line, text: str, column: int, ruleset: Ruleset, counters: tuple[int, int]
) -> bool:
    """Append the rule of `text` (a rule line from `column` on, after its counters) to its
    chain in `ruleset` and say True, if it has the shape this path reads; False (nothing
    changed) for the full parser to read it."""
    found = _RULE.fullmatch(text)
    if found is None:
        return False
    groups = found.groups()
    chain = ruleset.chains.get(groups[0])
    if chain is None:
        return False
    matches: list[Match] = []
    for direction, start in (("src", 1), ("dst", 6)):
        address, mask = _address(groups[start : start + 5])
        if mask:
            matches.append(Address(direction, address, mask, False))  # type: ignore[arg-type]
    for direction, name in (("in", groups[11]), ("out", groups[12])):
        if name is not None:
            matches.append(Interface(direction, name, False))  # type: ignore[arg-type]
    protocol, explicit = groups[13], groups[14]
    if protocol is not None:
        number, model = _PROTOCOLS[protocol]
        matches.append(Protocol(number, False))
        if explicit is not None and explicit[4:] != protocol:
            return False  # `-p tcp -m udp`: the full parser says what iptables says
        sport, dport = _ports(groups[15], groups[16]), _ports(groups[17], groups[18])
        if sport is None or dport is None:
            return False
        if explicit is not None or groups[15] is not None or groups[17] is not None:
            matches.append(model(sport=sport, dport=dport))
    rule = Rule(tuple(matches), _TARGETS[groups[19]], counters[0], counters[1], line.source(column))
    try:
        validate_rule(rule, chain.name, ruleset)
    except RuleError:
        return False
    chain.rules.append(rule)
    return True
