"""iptables-restore for the filter table: `parse` reads iptables-save text into a Ruleset.

It follows iptables-restore 1.8 (legacy and nft print the same text): tables and COMMIT, chain
lines with policies and counters, `[PACKETS:BYTES]` before a rule, the commands -A -I -N -P -F
-X -Z, comma-separated addresses expanded into several rules, and the checks its userspace and
the kernel make. Where iptables would silently change a value (`--dport 99999`, an over-long
comment) or needs the network (host names), we refuse instead. Anything outside the supported
matches and targets is refused, never ignored. One rule's words are read by
codegen.rules.command_line, each match's options by its extension.

A full dump (iptables-save with no `-t`) holds other tables too: `parse_dump` takes the filter
table and names the others it left out (their lines are not read, only their COMMIT looked for).
A refused rule does not stop the reading: every rule line's error is collected and raised at the
end as one ParseErrors, so that a user sees all that stands in the way at once.
"""

import gc
from dataclasses import dataclass

from codegen.rules.command_line import SUPPORTED_COMMANDS, RuleLine, RuleParser
from codegen.rules.fast_lines import read_rule
from codegen.rules.model import (
    CHAIN_NAME_MAX,
    Address,
    Chain,
    Fragment,
    Goto,
    Interface,
    Jump,
    Match,
    Protocol,
    Rule,
    RuleError,
    Ruleset,
)
from codegen.rules.names import BUILTIN_CHAINS, EXTENSION_TARGETS, STANDARD_TARGETS
from codegen.rules.syntax import Line, ParseError, Token, strtoui, tokenize
from codegen.rules.validation import find_loop, validate_rule

# The tables iptables-legacy knows besides filter (iptable_*): a dump may hold them.
OTHER_TABLES = ("nat", "mangle", "raw", "security")


class ParseErrors(ParseError):
    """Several refused lines of one file, in line order; `str()` gives each as ParseError
    does. Its message and source are the first one's, so a caller that wants one gets it."""

    def __init__(self, errors: list[ParseError]) -> None:
        super().__init__(errors[0].message, errors[0].source, errors[0].match)
        self.errors = tuple(errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


@dataclass(frozen=True)
class Dump:
    """What a file held: its filter table, and the other tables it had that were left out."""

    ruleset: Ruleset
    left_out: tuple[str, ...]


class _Parser:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.committed: Ruleset | None = None
        self.staging: Ruleset | None = None
        self.table_line: Line | None = None
        self.skipping: str | None = None  # the other table whose lines are being passed over
        self.left_out: dict[str, Line] = {}
        self.errors: list[ParseError] = []

    def parse(self, text: str) -> Dump:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for number, raw in enumerate(lines, 1):
            self._line(Line(self.filename, number, raw))
        open_table = "filter" if self.staging is not None else self.skipping
        if open_table is not None:
            end = Line(self.filename, len(lines) + 1, "")
            message = f"COMMIT expected at end of input (the *{open_table} table is open)"
            self.errors.append(end.error(message, 1))
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ParseErrors(self.errors)
        if self.committed is None and self.left_out:
            first = next(iter(self.left_out.values()))
            raise first.error(
                f"no *filter table here (only {', '.join(self.left_out)}): this tool takes the "
                "filter table",
                1,
            )
        ruleset = self.committed if self.committed is not None else Ruleset()
        return Dump(ruleset, tuple(self.left_out))

    def _line(self, line: Line) -> None:
        raw = line.text
        for bad, what in (("\r", "a carriage return (DOS line end?)"), ("\0", "a NUL byte")):
            if bad in raw:
                raise line.error(f"line contains {what}", raw.index(bad) + 1)
        if raw == "" or raw.startswith("#"):
            return
        if self.skipping is not None:
            if raw.startswith("*"):
                raise line.error("new table inside the open one: COMMIT expected first", 1)
            if raw == "COMMIT":
                self.skipping = None
            return
        if self.staging is None:
            if raw.startswith("*"):
                self._table(line)
                return
            if raw == "COMMIT" or raw.startswith(":"):
                raise line.error(f"'{raw.split()[0]}' outside a table: '*filter' expected", 1)
            raise line.error("rule outside a table: '*filter' expected first", 1)
        if raw == "COMMIT":
            self._commit(line)
        elif raw.startswith(":"):
            self._chain_line(line)
        else:
            try:
                self._rule_line(line)
            except ParseError as error:  # the next lines may hold more: report them all
                self.errors.append(error)

    def _table(self, line: Line) -> None:
        name = line.text[1:].split()[0] if line.text[1:].split() else ""
        if name in OTHER_TABLES:
            self.skipping = name
            self.left_out.setdefault(name, line)
            return
        if name != "filter":
            known = ", ".join(("filter", *OTHER_TABLES))
            raise line.error(f"table '{name}' is not an iptables table ({known})", 1)
        fresh = Ruleset()
        if self.committed is not None:
            # iptables-restore flushes the table but keeps the built-in policies.
            for builtin in BUILTIN_CHAINS:
                old = self.committed.chains[builtin]
                chain = fresh.chains[builtin]
                chain.policy, chain.packets, chain.bytes = old.policy, old.packets, old.bytes
        for chain in fresh.chains.values():
            chain.source = line.source(1)
        self.staging = fresh
        self.table_line = line

    def _commit(self, line: Line) -> None:
        assert self.staging is not None
        loop = find_loop(self.staging)
        if loop is not None:
            path, rule = loop
            source = rule.source or line.source(1)
            self.errors.append(ParseError(f"loop in the chain graph: {' -> '.join(path)}", source))
        self.committed = self.staging
        self.staging = None

    def _chain_line(self, line: Line) -> None:
        assert self.staging is not None
        raw = line.text
        words: list[Token] = []
        i = 1
        while i < len(raw):
            if raw[i] in " \t":
                i += 1
                continue
            start = i
            while i < len(raw) and raw[i] not in " \t":
                i += 1
            words.append(Token(raw[start:i], start + 1))
        if not words:
            raise line.error("chain name missing after ':'", 1)
        name_token = words[0]
        name = name_token.text
        if len(name) > CHAIN_NAME_MAX:
            raise line.error(
                f"invalid chain name '{name}' ({CHAIN_NAME_MAX} characters max)",
                name_token.column,
            )
        ruleset = self.staging
        builtin = name in BUILTIN_CHAINS
        if not builtin:
            if name in STANDARD_TARGETS:
                raise line.error(
                    f"chain name '{name}' is reserved for the verdict {name}", name_token.column
                )
            if name in ruleset.chains:
                raise line.error(f"chain '{name}' already exists", name_token.column)
            ruleset.add_chain(name, line.source(1))
        if len(words) < 2:
            raise line.error(f"policy missing for chain '{name}' (ACCEPT, DROP or -)", len(raw) + 1)
        policy = words[1]
        if policy.text == "-":
            return
        if not builtin:
            raise line.error(
                f"user-defined chain '{name}' cannot have a policy (write '-')", policy.column
            )
        if policy.text not in ("ACCEPT", "DROP"):
            raise line.error(
                f"bad policy '{policy.text}' for {name} (ACCEPT or DROP)", policy.column
            )
        chain = ruleset.chains[name]
        chain.policy = policy.text  # type: ignore[assignment]
        chain.source = line.source(1)
        if len(words) > 2:
            counters = _parse_counters(words[2].text)
            if counters is None:
                raise line.error(
                    f"invalid policy counters '{words[2].text}' ([PACKETS:BYTES] expected)",
                    words[2].column,
                )
            chain.packets, chain.bytes = counters
        if len(words) > 3:
            raise line.error(f"unexpected '{words[3].text}' after the counters", words[3].column)

    def _rule_line(self, line: Line) -> None:
        assert self.staging is not None
        raw = line.text
        start = 0
        counters: tuple[int, int] | None = None
        if raw.startswith("["):
            end = raw.find("]")
            if end < 0:
                raise line.error("counters '[' without ']'", 1)
            counters = _parse_counters(raw[: end + 1])
            if counters is None:
                raise line.error(
                    f"invalid counters '{raw[: end + 1]}' ([PACKETS:BYTES] expected)", 1
                )
            start = end + 1
        # The shape of big generated rule sets is read in one step (codegen.rules.fast_lines).
        if counters is None:
            fast = read_rule(line, raw, 1, self.staging, (0, 0))
        else:
            fast = raw[start : start + 4] == " -A " and read_rule(
                line, raw[start + 1 :], start + 2, self.staging, counters
            )
        if fast:
            return
        tokens = tokenize(line, start)
        if not tokens:
            raise line.error("no command on this line", 1)
        if raw.lstrip().startswith("*"):
            raise line.error("new table inside the open one: COMMIT expected first", 1)
        state = RuleParser(line, tokens, self.staging).parse()
        if state.counters is not None:
            counters = state.counters
        _apply(line, tokens[0].column, state, self.staging, counters or (0, 0))


def _parse_counters(text: str) -> tuple[int, int] | None:
    if not (text.startswith("[") and text.endswith("]")):
        return None
    packets, colon, count = text[1:-1].partition(":")
    if not colon or not packets.isdigit() or not count.isdigit():
        return None
    if not packets.isascii() or not count.isascii():
        return None
    values = int(packets), int(count)
    if max(values) >= 1 << 64:
        return None
    return values


def _apply(
    line: Line, column: int, state: RuleLine, ruleset: Ruleset, counters: tuple[int, int]
) -> None:
    command = state.command
    if not command:
        raise line.error(f"no command specified (supported: {SUPPORTED_COMMANDS})", column)
    assert state.command_token is not None
    command_token = state.command_token
    if command not in "AI":
        for token in state.seen.values():
            raise line.error(f"option {token.text} cannot be used with -{command}", token.column)
        if state.matches:
            token = state.matches[0].token
            raise line.error(f"option {token.text} cannot be used with -{command}", token.column)
    chain_token = state.chain_token
    chain_column = chain_token.column if chain_token else command_token.column
    name = state.chain
    if command == "N":
        if name.startswith("-"):
            raise line.error("chain name not allowed to start with '-'", chain_column)
        if name in EXTENSION_TARGETS or name in STANDARD_TARGETS:
            raise line.error(f"chain name '{name}' may not clash with a target name", chain_column)
        if len(name) > CHAIN_NAME_MAX:
            raise line.error(
                f"chain name '{name}' too long ({CHAIN_NAME_MAX} characters max)", chain_column
            )
        if name in ruleset.chains:
            raise line.error(f"chain '{name}' already exists", chain_column)
        try:
            ruleset.add_chain(name, line.source(command_token.column))
        except RuleError as error:
            raise line.error(error.message, chain_column) from None
        return
    if name and name not in ruleset.chains:
        raise line.error(f"chain '{name}' does not exist", chain_column)
    if command == "P":
        assert state.argument is not None
        chain = ruleset.chains[name]
        if not chain.builtin:
            raise line.error(f"-P works only on built-in chains, not '{name}'", chain_column)
        if state.argument.text not in ("ACCEPT", "DROP"):
            raise line.error(
                f"bad policy '{state.argument.text}' (ACCEPT or DROP)", state.argument.column
            )
        chain.policy = state.argument.text  # type: ignore[assignment]
        return
    targets = [ruleset.chains[name]] if name else list(ruleset.chains.values())
    if command == "F":
        for chain in targets:
            chain.rules.clear()
        return
    if command == "Z":
        for chain in targets:
            chain.packets = chain.bytes = 0
            for rule in chain.rules:
                rule.packets = rule.bytes = 0
        return
    if command == "X":
        _delete_chains(line, ruleset, [c for c in targets if not c.builtin], name, chain_column)
        return
    _add_rules(line, column, state, ruleset, counters)


def _delete_chains(
    line: Line, ruleset: Ruleset, chains: list[Chain], name: str, column: int
) -> None:
    if name and name in BUILTIN_CHAINS:
        raise line.error(f"cannot delete built-in chain '{name}'", column)
    doomed = {chain.name for chain in chains}
    for chain in chains:
        if chain.rules:
            raise line.error(f"cannot delete chain '{chain.name}': it is not empty", column)
    for chain in ruleset.chains.values():
        for rule in chain.rules:
            target = rule.target
            if isinstance(target, Jump | Goto) and target.chain in doomed:
                raise line.error(
                    f"cannot delete chain '{target.chain}': '{chain.name}' refers to it", column
                )
    for chain in chains:
        del ruleset.chains[chain.name]


def _add_rules(
    line: Line, column: int, state: RuleLine, ruleset: Ruleset, counters: tuple[int, int]
) -> None:
    chain = ruleset.chains[state.chain]
    sources = state.sources or [(0, 0)]
    destinations = state.destinations or [(0, 0)]
    if (len(sources) > 1 or len(destinations) > 1) and (
        state.negated.get("s") or state.negated.get("d")
    ):
        token = state.source_token if len(sources) > 1 else state.destination_token
        assert token is not None
        raise line.error(
            "'!' not allowed with multiple source or destination addresses", token.column
        )
    extensions: list[Match] = []
    tokens: dict[int, Token] = {}  # id of an extension's match -> its `-m`
    for parser in state.matches:
        extensions.append(parser.finish(line))
        tokens[id(extensions[-1])] = parser.token
    target = state.target
    if state.target_parser is not None:
        target = state.target_parser.finish(line)
        tokens[id(target)] = state.target_parser.token
    position = len(chain.rules)
    if state.command == "I":
        position = 0
        if state.argument is not None:
            number = strtoui(state.argument.text, 2**31 - 1, minimum=1)
            if number is None:
                raise line.error(
                    f"invalid rule number '{state.argument.text}'", state.argument.column
                )
            if number > len(chain.rules) + 1:
                raise line.error(
                    f"cannot insert at {number}: chain '{chain.name}' has {len(chain.rules)} rules",
                    state.argument.column,
                )
            position = number - 1
    new_rules: list[Rule] = []
    for src_address, src_mask in sources:
        for dst_address, dst_mask in destinations:
            matches: list[Match] = []
            if src_mask or state.negated.get("s"):
                matches.append(Address("src", src_address, src_mask, state.negated.get("s", False)))
            if dst_mask or state.negated.get("d"):
                matches.append(Address("dst", dst_address, dst_mask, state.negated.get("d", False)))
            for letter, direction in (("i", "in"), ("o", "out")):
                name = state.interfaces.get(letter)
                negated = state.negated.get(letter, False)
                # `-i +` matches any device: the kernel sees no match, so the model has none.
                if name is not None and (name != "+" or negated):
                    matches.append(Interface(direction, name, negated))  # type: ignore[arg-type]
            if state.protocol:
                matches.append(Protocol(state.protocol, state.negated.get("p", False)))
            if state.fragment:
                matches.append(Fragment(state.negated.get("f", False)))
            matches.extend(extensions)
            rule = Rule(tuple(matches), target, counters[0], counters[1], line.source(column))
            try:
                validate_rule(rule, chain.name, ruleset)
            except RuleError as error:
                raise _located(line, error, state, tokens) from None
            new_rules.append(rule)
    if state.command == "I":
        # iptables inserts each expanded rule at the same position: they end up reversed.
        for rule in new_rules:
            chain.rules.insert(position, rule)
    else:
        chain.rules.extend(new_rules)


def _located(line: Line, error: RuleError, state: RuleLine, tokens: dict[int, Token]) -> ParseError:
    """Point a model-level complaint at the word that caused it: the match's `-m` (or `-i`,
    `-o`, or a target extension's `-j`) when the error names one, else where the model's
    source points."""
    token: Token | None = None
    match = error.match
    if match is not None:
        token = tokens.get(id(match))
        if token is None and isinstance(match, Interface):
            token = state.seen.get("i" if match.direction == "in" else "o")
    column = token.column if token is not None else (error.source.column if error.source else 1)
    return line.error(error.message, column)


def parse_dump(text: str, filename: str = "<stdin>") -> Dump:
    """Read iptables-save text: its filter table, and which other tables it left out; raises
    ParseError (ParseErrors when several rule lines are refused)."""
    # A big rule set is hundreds of thousands of objects and no reference cycles: the cyclic
    # collector's passes over them would be 40% of the time (100,000 rules).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _Parser(filename).parse(text)
    finally:
        if collecting:
            gc.enable()


def parse(text: str, filename: str = "<stdin>") -> Ruleset:
    """Read iptables-save text (the filter table) into a Ruleset; raises ParseError."""
    return parse_dump(text, filename).ruleset


def left_out_note(left_out: tuple[str, ...]) -> str | None:
    """The one sentence a user needs about the tables a dump held beside filter, None if none."""
    if not left_out:
        return None
    tables = ", ".join(f"*{name}" for name in left_out)
    return (
        f"note: took the filter table and left out {tables}: TC ingress sees packets before "
        "nat PREROUTING and mangle, so rules written for post-DNAT addresses or marks that "
        "mangle sets (Docker, kube-proxy) will not match as they do in netfilter"
    )
