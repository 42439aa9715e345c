"""iptables-save for the filter table: `write` prints what iptables-legacy-save prints, header
comments aside. The IP header part and the standard targets are written here, in iptables'
order; each match and target extension by its extension (codegen.rules.extensions).
"""

from codegen.rules.extensions import extension_of, target_extension_of
from codegen.rules.model import (
    IP_PART,
    Accept,
    Address,
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
from codegen.rules.names import BUILTIN_CHAINS, PROTOCOL_NAMES
from codegen.rules.syntax import format_ip, ipmask_to_numeric


def _write_ip(option: str, match: Address) -> str:
    # iptables-save prints a host's /32, which `-L` (ipmask_to_numeric) leaves out.
    mask = ipmask_to_numeric(match.mask) or "/32"
    return f"{'! ' if match.negated else ''}{option} {format_ip(match.address)}{mask}"


def write_rule(chain: str, rule: Rule) -> str:
    """One `-A CHAIN ...` line, without counters, as iptables-legacy-save prints it."""
    words = ["-A", chain]
    ip_part: dict[str, Match] = {}
    for match in rule.matches:
        if isinstance(match, Address):
            ip_part.setdefault(match.direction, match)
        elif isinstance(match, Interface):
            ip_part.setdefault(match.direction, match)
        elif isinstance(match, Protocol):
            ip_part.setdefault("p", match)
        elif isinstance(match, Fragment):
            ip_part.setdefault("f", match)
    for key, option in (("src", "-s"), ("dst", "-d")):
        address = ip_part.get(key)
        if isinstance(address, Address) and (address.mask or address.negated):
            words.append(_write_ip(option, address))
    for key, option in (("in", "-i"), ("out", "-o")):
        interface = ip_part.get(key)
        if isinstance(interface, Interface):
            words += (["!"] if interface.negated else []) + [option, interface.name]
    protocol = ip_part.get("p")
    if isinstance(protocol, Protocol) and protocol.number:
        name = PROTOCOL_NAMES.get(protocol.number, str(protocol.number))
        words += (["!"] if protocol.negated else []) + ["-p", name]
    fragment = ip_part.get("f")
    if isinstance(fragment, Fragment):
        words += (["!"] if fragment.negated else []) + ["-f"]
    for match in rule.matches:
        if not isinstance(match, IP_PART):
            words += extension_of(match).save(match)
    target = rule.target
    if isinstance(target, Accept):
        words += ["-j", "ACCEPT"]
    elif isinstance(target, Drop):
        words += ["-j", "DROP"]
    elif isinstance(target, Return):
        words += ["-j", "RETURN"]
    elif isinstance(target, Jump):
        words += ["-j", target.chain]
    elif isinstance(target, Goto):
        words += ["-g", target.chain]
    elif isinstance(target, ExtensionTarget):
        words += target_extension_of(target).save(target)
    return " ".join(words)


def write(ruleset: Ruleset, counters: bool = False) -> str:
    """The filter table as iptables-legacy-save prints it (without its `#` header lines):
    built-in chains first, then user chains sorted by name (bytewise, as libiptc keeps them).
    Policy counters are always printed, rule counters only with `counters=True` (`-c`)."""
    lines = ["*filter"]
    builtins = [ruleset.chains[name] for name in BUILTIN_CHAINS if name in ruleset.chains]
    users = sorted(ruleset.user_chains, key=lambda chain: chain.name.encode())
    for chain in builtins:
        lines.append(f":{chain.name} {chain.policy} [{chain.packets}:{chain.bytes}]")
    for chain in users:
        lines.append(f":{chain.name} - [0:0]")
    for chain in builtins + users:
        for rule in chain.rules:
            text = write_rule(chain.name, rule)
            lines.append(f"[{rule.packets}:{rule.bytes}] {text}" if counters else text)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
