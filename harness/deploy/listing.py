"""`bpflab list`: the applied rules exactly as `iptables -L -n -x` prints them (`-v` adds
counters and devices); tests/net/test_list_format.py holds it to iptables-legacy's output."""

from __future__ import annotations

from codegen.rules.extensions import extension_of, target_extension_of
from codegen.rules.model import (
    IP_PART,
    Accept,
    Address,
    Chain,
    Drop,
    ExtensionTarget,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    Ruleset,
)
from codegen.rules.syntax import format_ip, ipmask_to_numeric


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
    if isinstance(target, ExtensionTarget):
        return target_extension_of(target).name
    return ""


def _first(rule: Rule, kind: type, direction: str | None = None):
    for match in rule.matches:
        if isinstance(match, kind) and getattr(match, "direction", direction) == direction:
            return match
    return None


def _address(match: Address | None) -> str:
    if match is None:
        return " " + "0.0.0.0/0"
    text = format_ip(match.address) + ipmask_to_numeric(match.mask)
    return ("!" if match.negated else " ") + text


def _interface(match: Interface | None) -> str:
    if match is None:
        return "*"
    return ("!" if match.negated else "") + match.name


def _match(match: Match) -> str:
    """One match as the extension's print function writes it with -n."""
    if isinstance(match, IP_PART):
        return ""
    return extension_of(match).describe(match)


def list_table(ruleset: Ruleset, *, verbose: bool) -> str:
    """The filter table as `iptables -L -n -x` prints it (`-v`: with counters and devices)."""
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
    # Column widths are iptables' own (print_header and print_firewall in iptables.c).
    columns = f"{'pkts':>8} {'bytes':>10} " if verbose else ""
    columns += f"{'target':<9}  prot opt"
    if verbose:
        columns += f" {'in':<6} {'out':<6} "
    columns += f" {'source':<19}  {'destination':<19} "
    lines = [head, columns]
    for rule in chain.rules:
        row = f"{rule.packets:>8} {rule.bytes:>8} " if verbose else ""
        protocol = _first(rule, Protocol)
        fragment = _first(rule, Fragment)
        row += f"{_target(rule):<9} "
        row += "!" if protocol is not None and protocol.negated else " "
        row += f"{(protocol.number if protocol is not None else 0):<5}"
        row += "!" if fragment is not None and fragment.negated else "-"
        row += ("f" if fragment is not None else "-") + " "
        if verbose:
            row += f" {_interface(_first(rule, Interface, 'in')):<6} "
            row += f"{_interface(_first(rule, Interface, 'out')):<6} "
        row += f"{_address(_first(rule, Address, 'src')):<20} "
        row += f"{_address(_first(rule, Address, 'dst')):<20} "
        if isinstance(rule.target, Goto):
            row += "[goto] "
        row += "".join(_match(match) for match in rule.matches)
        if isinstance(rule.target, ExtensionTarget):
            row += target_extension_of(rule.target).describe(rule.target)
        lines.append(row)
    return lines
