"""`bpflab list`: the applied rules in the layout of `iptables -L -n -x` (`-v` adds counters).

Columns are iptables' own; what iptables prints after the addresses in each match's own words
(`tcp dpt:22`) is printed here as the rule's iptables-save options, which say the same thing.
"""

from __future__ import annotations

import ipaddress

from codegen.rules.iptables_save import write_rule
from codegen.rules.model import (
    Accept,
    Address,
    Chain,
    Drop,
    Fragment,
    Goto,
    Interface,
    Jump,
    Protocol,
    Return,
    Rule,
    Ruleset,
)


def _target(rule: Rule) -> str:
    target = rule.target
    if isinstance(target, Accept):
        return "ACCEPT"
    if isinstance(target, Drop):
        return "DROP"
    if isinstance(target, Return):
        return "RETURN"
    if isinstance(target, Jump | Goto):
        return target.chain
    return ""


def _address(rule: Rule, direction: str) -> str:
    for match in rule.matches:
        if isinstance(match, Address) and match.direction == direction:
            network = match.network
            text = (
                str(network)
                if network is not None
                else f"{ipaddress.IPv4Address(match.address)}/{ipaddress.IPv4Address(match.mask)}"
            )
            return ("!" if match.negated else "") + text
    return "0.0.0.0/0"


def _interface(rule: Rule, direction: str) -> str:
    for match in rule.matches:
        if isinstance(match, Interface) and match.direction == direction:
            return ("!" if match.negated else "") + match.name
    return "*"


def _protocol(rule: Rule) -> str:
    for match in rule.matches:
        if isinstance(match, Protocol):
            return ("!" if match.negated else "") + str(match.number)
    return "0"


def _option(rule: Rule) -> str:
    for match in rule.matches:
        if isinstance(match, Fragment):
            return "!f" if match.negated else "-f"
    return "--"


def _extras(chain: str, rule: Rule) -> str:
    """The rule's options beyond the columns, as iptables-save writes them."""
    words = write_rule(chain, rule).split()
    skip = {"-A": 1, "-s": 1, "-d": 1, "-i": 1, "-o": 1, "-p": 1, "-j": 1, "-g": 1, "-f": 0}
    out: list[str] = []
    index = 2
    while index < len(words):
        word = words[index]
        if word == "!" and index + 1 < len(words) and words[index + 1] in skip:
            index += 1
            continue
        if word in skip:
            index += 1 + skip[word]
            continue
        out.append(word)
        index += 1
    return " ".join(out)


def list_table(ruleset: Ruleset, *, verbose: bool) -> str:
    lines: list[str] = []
    for chain in ruleset.chains.values():
        lines += _chain(chain, ruleset, verbose)
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def _chain(chain: Chain, ruleset: Ruleset, verbose: bool) -> list[str]:
    if chain.builtin:
        counts = f" {chain.packets} packets, {chain.bytes} bytes" if verbose else ""
        head = f"Chain {chain.name} (policy {chain.policy}{counts})"
    else:
        references = sum(
            1
            for other in ruleset.chains.values()
            for rule in other.rules
            if isinstance(rule.target, Jump | Goto) and rule.target.chain == chain.name
        )
        head = f"Chain {chain.name} ({references} references)"
    columns = f"{'target':10} {'prot':4} {'opt':3} "
    if verbose:
        columns = f"{'pkts':>8} {'bytes':>8} " + columns + f"{'in':6} {'out':6} "
    columns += f"{'source':20} {'destination':20}"
    lines = [head, columns.rstrip()]
    for rule in chain.rules:
        row = f"{_target(rule):10} {_protocol(rule):4} {_option(rule):3} "
        if verbose:
            row = (
                f"{rule.packets:>8} {rule.bytes:>8} "
                + row
                + f"{_interface(rule, 'in'):6} {_interface(rule, 'out'):6} "
            )
        row += f"{_address(rule, 'src'):20} {_address(rule, 'dst'):20} {_extras(chain.name, rule)}"
        lines.append(row.rstrip())
    return lines
