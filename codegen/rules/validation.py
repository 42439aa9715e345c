"""What iptables refuses, userspace and the kernel's checkentry alike: the core's rules for the
IP header part, targets and chains, and each extension's own `check` (codegen.rules.extensions).
"""

from collections.abc import Iterator

from codegen.rules.extensions import MATCHES, extension_of, target_extension_of
from codegen.rules.model import (
    INTERFACE_NAME_MAX,
    IP_PART,
    Accept,
    Address,
    Drop,
    ExtensionTarget,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Return,
    Rule,
    RuleError,
    Ruleset,
    check_chain_name,
    check_uint,
)
from codegen.rules.names import BUILTIN_CHAINS


def validate_rule(rule: Rule, chain: str, ruleset: Ruleset | None = None) -> None:
    """Raise RuleError if iptables would refuse `rule` in `chain`; the error's `match` is
    the match (or extension target) at fault, if one is."""
    source = rule.source
    seen: set[tuple[type, str | None]] = set()
    for match in rule.matches:
        if isinstance(match, IP_PART):
            key = (type(match), getattr(match, "direction", None))
            if key in seen:
                raise RuleError(f"more than one {_ip_part_name(match)} in one rule", source, match)
            seen.add(key)
        try:
            _check_match(match, rule, chain)
        except RuleError as error:
            raise RuleError(error.message, source, match) from None
    _check_match_hooks(rule, chain, ruleset)
    target = rule.target
    if isinstance(target, Jump | Goto):
        _check_jump(rule, ruleset)
    elif isinstance(target, ExtensionTarget):
        try:
            extension = target_extension_of(target)
        except TypeError:
            raise RuleError(f"unknown target {target!r}", source) from None
        try:
            extension.check(target, rule, chain)
        except RuleError as error:
            raise RuleError(error.message, source, target) from None
    elif target is not None and not isinstance(target, Accept | Drop | Return):
        raise RuleError(f"unknown target {target!r}", source)
    check_uint(rule.packets, 64, "packet counter")
    check_uint(rule.bytes, 64, "byte counter")


def _check_jump(rule: Rule, ruleset: Ruleset | None) -> None:
    """A jump or goto names a user chain that is there."""
    target = rule.target
    assert isinstance(target, Jump | Goto)
    verb = "jump to" if isinstance(target, Jump) else "goto"
    if target.chain in BUILTIN_CHAINS:
        raise RuleError(f"cannot {verb} built-in chain '{target.chain}'", rule.source)
    if ruleset is not None and target.chain not in ruleset.chains:
        raise RuleError(f"{verb} unknown chain '{target.chain}'", rule.source)


def _check_in_ruleset(rule: Rule, chain: str, ruleset: Ruleset) -> None:
    """What validate_rule checks that rules read later can change: the hooks that reach
    `chain`, and that a jump's chain is there."""
    _check_match_hooks(rule, chain, ruleset)
    if isinstance(rule.target, Jump | Goto):
        _check_jump(rule, ruleset)


def _check_match_hooks(rule: Rule, chain: str, ruleset: Ruleset | None) -> None:
    """What xt_check_match refuses by the hook mask: a match restricted to some hooks in a
    chain that others reach (a user chain takes every built-in chain that jumps or goes to
    it, directly or not; one that none reaches has no hooks, and takes anything)."""
    reaching: frozenset[str] | None = None
    for match in rule.matches:
        if isinstance(match, IP_PART):
            continue
        extension = extension_of(match)
        allowed = extension.hooks(match)
        if allowed >= frozenset(BUILTIN_CHAINS):
            continue
        if reaching is None:
            if chain in BUILTIN_CHAINS:
                reaching = frozenset({chain})
            elif ruleset is None:
                return
            else:
                reaching = hooks_reaching(ruleset, chain)
        for hook in BUILTIN_CHAINS:
            if hook in reaching and hook not in allowed:
                message = extension.hook_refusal(match, hook)
                if hook != chain:
                    message += f" (chain {chain} is reached from {hook})"
                raise RuleError(message, rule.source, match)


def hooks_reaching(ruleset: Ruleset, chain: str) -> frozenset[str]:
    """The built-in chains from which jumps and gotos lead to `chain` (mark_source_chains'
    comefrom bits)."""
    found = set()
    for root in BUILTIN_CHAINS:
        if root not in ruleset.chains:
            continue
        seen, todo = {root}, [root]
        while todo:
            name = todo.pop()
            if name == chain:
                found.add(root)
                break
            for rule in ruleset.chains[name].rules:
                target = rule.target
                if isinstance(target, Jump | Goto) and target.chain in ruleset.chains:
                    if target.chain not in seen:
                        seen.add(target.chain)
                        todo.append(target.chain)
    return frozenset(found)


def _ip_part_name(match: Match) -> str:
    if isinstance(match, Address):
        return "-s" if match.direction == "src" else "-d"
    if isinstance(match, Interface):
        return "-i" if match.direction == "in" else "-o"
    if isinstance(match, Protocol):
        return "-p"
    return "-f"


def _check_match(match: Match, rule: Rule, chain: str) -> None:
    if isinstance(match, Interface):
        if not match.name:
            raise RuleError("empty interface name")
        if len(match.name) > INTERFACE_NAME_MAX:
            raise RuleError(
                f"interface name '{match.name}' is longer than {INTERFACE_NAME_MAX} characters"
            )
        if match.direction == "in" and chain == "OUTPUT":
            raise RuleError("can't use -i with OUTPUT")
        if match.direction == "out" and chain == "INPUT":
            raise RuleError("can't use -o with INPUT")
    elif isinstance(match, Protocol):
        if match.number == 0 and match.negated:
            raise RuleError("'! -p all' would never match")
    elif not isinstance(match, IP_PART):
        try:
            extension = extension_of(match)
        except TypeError:
            raise RuleError(f"unknown match {match!r}") from None
        extension.check(match, rule, chain)


def validate(ruleset: Ruleset, *, parsed: bool = False) -> None:
    """Raise the first RuleError iptables would report for this rule set, in file order;
    loops are reported last, at the rule that closes them. `parsed`: the rule set comes from
    the parser (codegen.rules.restore), which checked each rule as it read it; only what
    depends on the rest of the rule set is checked again (`_check_in_ruleset`)."""
    for name in BUILTIN_CHAINS:
        chain = ruleset.chains.get(name)
        if chain is None:
            raise RuleError(f"built-in chain {name} is missing")
        if chain.policy not in ("ACCEPT", "DROP"):
            raise RuleError(
                f"policy of built-in chain {name} must be ACCEPT or DROP, not {chain.policy!r}",
                chain.source,
            )
    for key, chain in ruleset.chains.items():
        if key != chain.name:
            raise RuleError(f"chain '{chain.name}' is stored under the name '{key}'", chain.source)
        if not chain.builtin:
            check_chain_name(chain.name, chain.source)
            if chain.policy is not None:
                raise RuleError(
                    f"user-defined chain '{chain.name}' cannot have a policy", chain.source
                )
        check_uint(chain.packets, 64, "packet counter")
        check_uint(chain.bytes, 64, "byte counter")
        for rule in chain.rules:
            if parsed:
                _check_in_ruleset(rule, chain.name, ruleset)
            else:
                validate_rule(rule, chain.name, ruleset)
    for extension in MATCHES:  # what a family refuses across rules (hashlimit's names)
        extension.check_ruleset(ruleset)
    loop = find_loop(ruleset)
    if loop is not None:
        path, rule = loop
        raise RuleError(f"loop in the chain graph: {' -> '.join(path)}", rule.source)


def find_loop(ruleset: Ruleset) -> tuple[list[str], Rule] | None:
    """A cycle of jumps/gotos reachable from a built-in chain, as the kernel's
    mark_source_chains finds them (cycles among unreachable chains load fine), with the rule
    that closes it; None when there is none."""
    on_path: set[str] = set()
    finished: set[str] = set()

    def calls(name: str) -> Iterator[Rule]:
        for rule in ruleset.chains[name].rules:
            if isinstance(rule.target, Jump | Goto) and rule.target.chain in ruleset.chains:
                yield rule

    for root in BUILTIN_CHAINS:
        if root not in ruleset.chains or root in finished:
            continue
        # Iterative depth-first walk: rule sets with thousands of nested chains must not hit
        # Python's recursion limit.
        path = [root]
        on_path.add(root)
        stack = [calls(root)]
        while stack:
            for rule in stack[-1]:
                assert isinstance(rule.target, Jump | Goto)
                callee = rule.target.chain
                if callee in on_path:
                    return path[path.index(callee) :] + [callee], rule
                if callee not in finished:
                    path.append(callee)
                    on_path.add(callee)
                    stack.append(calls(callee))
                    break
            else:
                stack.pop()
                done = path.pop()
                on_path.discard(done)
                finished.add(done)
    return None
