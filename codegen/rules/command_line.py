"""The command line of one rule (`-A CHAIN -s ... -m tcp --dport 22 -j ACCEPT`), read as
iptables' getopt_long loop reads it: its own options first, then those of the newest `-m`,
unique prefixes, `--opt=value`, `!` before an option, and the match `-p NAME` loads when it
meets an option it does not know. What the words mean is left to codegen.rules.restore; the
options of each match and of a target extension (`-j REJECT --reject-with ...`) to its
extension's parser.
"""

from dataclasses import dataclass, field

from codegen.rules.extensions import BY_NAME, TARGETS_BY_NAME, supported_matches, supported_targets
from codegen.rules.model import (
    INTERFACE_NAME_MAX,
    Accept,
    Drop,
    Goto,
    Jump,
    Return,
    Ruleset,
    Target,
)
from codegen.rules.names import (
    BUILTIN_CHAINS,
    EXTENSION_TARGETS,
    PROTOCOL_NAMES,
    STANDARD_TARGETS,
)
from codegen.rules.syntax import (
    Line,
    MatchParser,
    OptionContext,
    TargetParser,
    Token,
    parse_addresses,
    parse_protocol,
    strtoui,
)

SUPPORTED_TARGETS = supported_targets()
SUPPORTED_COMMANDS = "-A, -I, -N, -P, -F, -X, -Z"
# Match extensions iptables has that we refuse by name, so the message says "not supported"
# rather than "unknown".
_PROTOCOL_MATCHES = frozenset({"sctp", "dccp", "esp", "ah", "icmp6", "mh"})

# long name -> short letter; `src`/`dst` are synonyms, as in iptables.
_LONG_OPTIONS: tuple[tuple[str, str], ...] = (
    ("append", "A"),
    ("delete", "D"),
    ("check", "C"),
    ("insert", "I"),
    ("replace", "R"),
    ("list", "L"),
    ("list-rules", "S"),
    ("flush", "F"),
    ("zero", "Z"),
    ("new-chain", "N"),
    ("delete-chain", "X"),
    ("rename-chain", "E"),
    ("policy", "P"),
    ("source", "s"),
    ("destination", "d"),
    ("src", "s"),
    ("dst", "d"),
    ("protocol", "p"),
    ("in-interface", "i"),
    ("jump", "j"),
    ("table", "t"),
    ("match", "m"),
    ("numeric", "n"),
    ("out-interface", "o"),
    ("verbose", "v"),
    ("wait", "w"),
    ("wait-interval", "W"),
    ("exact", "x"),
    ("fragments", "f"),
    ("version", "V"),
    ("help", "h"),
    ("line-numbers", "0"),
    ("modprobe", "M"),
    ("set-counters", "c"),
    ("goto", "g"),
    ("ipv4", "4"),
    ("ipv6", "6"),
)
# Letters whose option takes a required argument (getopt "A:C:..."); F, X, Z, L, S take an
# optional one that iptables reads from the next word itself.
_WITH_ARGUMENT = frozenset("ACDRIENPMospdjitmcg")
_KNOWN_LETTERS = frozenset("ACDRILSMFZNXEPVhopsdjifbvwWntmxcg046")
_COMMANDS = frozenset("ADCRILSFZNXEP")
_RULE_OPTIONS = frozenset("sdiopfjgmc")
_NEGATABLE = frozenset("sdiopf")
_UNSUPPORTED_OPTIONS = {
    "t": "the -t option cannot be used in a rule file: the table is set by '*filter'",
    "M": "--modprobe is not supported in rule files",
    "6": "this is IPv4 (iptables), not IPv6",
}


@dataclass
class RuleLine:
    """What one `-A ...` style line said."""

    command: str = ""
    command_token: Token | None = None
    chain: str = ""
    chain_token: Token | None = None
    argument: Token | None = None  # -I rule number, -P policy
    sources: list[tuple[int, int]] | None = None
    source_token: Token | None = None
    destinations: list[tuple[int, int]] | None = None
    destination_token: Token | None = None
    negated: dict[str, bool] = field(default_factory=dict)
    interfaces: dict[str, str] = field(default_factory=dict)
    protocol: int | None = None
    protocol_text: str = ""
    fragment: bool = False
    matches: list[MatchParser] = field(default_factory=list)
    implicit_loaded: bool = False
    target: Target | None = None
    target_token: Token | None = None
    # A target extension's options, read after its `-j` (whose options then come after those of
    # the matches loaded before it, in getopt's table) and built by `finish` at the end.
    target_parser: TargetParser | None = None
    target_position: int = 0  # how many matches were loaded before the `-j`
    counters: tuple[int, int] | None = None
    seen: dict[str, Token] = field(default_factory=dict)


class RuleParser:
    def __init__(self, line: Line, tokens: list[Token], ruleset: Ruleset) -> None:
        self.line = line
        self.tokens = tokens
        self.ruleset = ruleset
        self.index = 0
        self.state = RuleLine()

    # getopt helpers

    def _next_word(self) -> Token | None:
        """The next word if it can be an argument iptables reads on its own (xs_has_arg)."""
        if self.index < len(self.tokens):
            token = self.tokens[self.index]
            if not token.text.startswith(("-", "!")):
                self.index += 1
                return token
        return None

    def _required(self, option: Token, attached: str | None, column: int) -> Token:
        if attached is not None:
            return Token(attached, column)
        if self.index >= len(self.tokens):
            raise self.line.error(f"option '{option.text}' requires an argument", option.column)
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _lookup_long(self, name: str, token: Token) -> tuple[str, MatchParser | None, bool]:
        """getopt_long: an exact name wins, else a unique prefix; iptables' options come
        first, then those of the newest match."""
        table: list[tuple[str, str, MatchParser | None, bool]] = [
            (long, letter, None, letter in _WITH_ARGUMENT) for long, letter in _LONG_OPTIONS
        ]
        for parser in reversed(self._option_holders()):
            for long, (key, takes) in parser.options.items():
                table.append((long, key, parser, takes))
        for long, key, parser, takes in table:
            if long == name:
                return key, parser, takes
        found = [entry for entry in table if entry[0].startswith(name)]
        if not found:
            raise KeyError(name)
        first = found[0]
        for entry in found[1:]:
            if (entry[1], id(entry[2])) != (first[1], id(first[2])):
                names = ", ".join(f"--{e[0]}" for e in found)
                raise self.line.error(
                    f"option '--{name}' is ambiguous (could be {names})", token.column
                )
        return first[1], first[2], first[3]

    def _option_holders(self) -> list[MatchParser]:
        """The matches and the target extension whose options getopt knows, oldest first."""
        state = self.state
        holders = list(state.matches)
        if state.target_parser is not None:
            holders.insert(state.target_position, state.target_parser)
        return holders

    def _load_implicit(self, token: Token) -> bool:
        """iptables loads the match named after `-p` when it meets an option it does not
        know, once per rule (`-p tcp --dport 22`)."""
        state = self.state
        if state.protocol_text == "" or state.implicit_loaded:
            return False
        name = state.protocol_text
        number = strtoui(name, 255)
        if number is not None:
            name = PROTOCOL_NAMES.get(number, "")
        if name in _PROTOCOL_MATCHES:
            raise self.line.error(
                f"option '{token.text}' needs the {name} match, which is not supported"
                f" (supported matches: {supported_matches()})",
                token.column,
            )
        extension = BY_NAME.get(name)
        if extension is None or not extension.implicit:
            return False
        state.matches.append(extension.parser(token, implicit=True))
        state.implicit_loaded = True
        return True

    # the main loop

    def parse(self) -> RuleLine:
        negate_token: Token | None = None
        while self.index < len(self.tokens):
            token = self.tokens[self.index]
            self.index += 1
            text = token.text
            if text == "!":
                if negate_token is not None:
                    raise self.line.error("multiple consecutive '!' not allowed", token.column)
                negate_token = token
                continue
            if text.startswith("--") and len(text) > 2:
                self._long_option(token, negate_token)
            elif text.startswith("-") and len(text) == 2 and text != "--":
                self._short_option(token, text[1], None, negate_token)
            elif text.startswith("-") and len(text) > 2 and text[1] in _WITH_ARGUMENT:
                raise self.line.error(
                    f"write the option and its argument as two words: '{text[:2]} {text[2:]}'",
                    token.column,
                )
            elif text.startswith("-") and len(text) > 2:
                raise self.line.error(f"unknown option '{text}'", token.column)
            else:
                raise self.line.error(f"bad argument '{text}'", token.column)
            negate_token = None
        if negate_token is not None:
            raise self.line.error("nothing appropriate following '!'", negate_token.column)
        return self.state

    def _long_option(self, token: Token, negate: Token | None) -> None:
        name, equals, attached_text = token.text[2:].partition("=")
        attached = attached_text if equals else None
        column = token.column + 3 + len(name)
        while True:
            try:
                key, parser, takes = self._lookup_long(name, token)
            except KeyError:
                if self._load_implicit(token):
                    continue
                raise self.line.error(
                    f"unknown option '--{name}'" + self._option_hint(), token.column
                ) from None
            break
        if parser is None:
            self._short_option(token, key, attached, negate, column)
            return
        if not takes and attached is not None:
            raise self.line.error(f"option '--{name}' takes no argument", token.column)
        value = self._required(token, attached, column) if takes else None
        ctx = OptionContext(
            self.line, token, value, negate is not None, self._next_word, self.state.protocol
        )
        parser.option(key, ctx)

    def _option_hint(self) -> str:
        if self.state.protocol_text == "":
            return " (options like --dport need '-p tcp' or '-p udp' before them)"
        return ""

    def _short_option(
        self,
        token: Token,
        letter: str,
        attached: str | None,
        negate: Token | None,
        column: int = 0,
    ) -> None:
        line, state = self.line, self.state
        if letter not in _KNOWN_LETTERS:
            raise line.error(f"unknown option '{token.text}'" + self._option_hint(), token.column)
        if letter in _UNSUPPORTED_OPTIONS:
            raise line.error(_UNSUPPORTED_OPTIONS[letter], token.column)
        if letter in "VhLS0nvxwWb4":
            raise line.error(
                f"option '{token.text}' has no place in a rule file"
                f" (supported commands: {SUPPORTED_COMMANDS})",
                token.column,
            )
        if negate is not None and letter not in _NEGATABLE:
            if letter == "m":
                raise line.error(
                    "unexpected '!' before -m (negate the match's options)", negate.column
                )
            raise line.error(f"cannot have '!' before {token.text}", negate.column)
        negated = negate is not None
        if letter in _COMMANDS:
            self._command(token, letter, attached, column)
            return
        if letter not in _WITH_ARGUMENT:
            if attached is not None:
                raise line.error(f"option '{token.text}' takes no argument", token.column)
            value = Token("", token.column)
        else:
            value = self._required(token, attached, column)
        if value.text == "!" and letter in "sdiop":
            raise line.error(
                f"'!' after the option is old syntax: write '! {token.text} VALUE'", value.column
            )
        if letter == "m":
            self._match(token, value)
            return
        if letter in state.seen and letter != "m":
            raise line.error(f"multiple {token.text} options not allowed", token.column)
        if letter == "g" and "j" in state.seen or letter == "j" and "g" in state.seen:
            raise line.error("only one of -j and -g allowed", token.column)
        state.seen[letter] = token
        if letter in "sd":
            addresses = parse_addresses(line, value)
            state.negated[letter] = negated
            if letter == "s":
                state.sources, state.source_token = addresses, value
            else:
                state.destinations, state.destination_token = addresses, value
        elif letter in "io":
            name = value.text
            if name == "":
                raise line.error(f"empty interface name after {token.text}", value.column)
            if len(name) > INTERFACE_NAME_MAX:
                raise line.error(
                    f"interface name '{name}' must be shorter than IFNAMSIZ"
                    f" ({INTERFACE_NAME_MAX} characters max)",
                    value.column,
                )
            state.interfaces[letter] = name
            state.negated[letter] = negated
        elif letter == "p":
            number = parse_protocol(value.text)
            if number is None:
                raise line.error(f"unknown protocol '{value.text}'", value.column)
            if number == 0 and negate is not None:
                raise line.error("'! -p all' would never match", negate.column)
            state.protocol = number
            state.protocol_text = value.text.lower()
            state.negated["p"] = negated
        elif letter == "f":
            state.fragment = True
            state.negated["f"] = negated
        elif letter in "jg":
            state.target_token = token
            extension = TARGETS_BY_NAME.get(value.text) if letter == "j" else None
            if extension is not None:
                # iptables looks a target extension up before user chains of that name.
                state.target_parser = extension.parser(token, implicit=False)
                state.target_position = len(state.matches)
            else:
                state.target = self._target(letter, value)
        elif letter == "c":
            packets = value.text
            count = self._required(token, None, column)
            if not packets.isdigit() or not count.text.isdigit():
                raise line.error("-c needs two decimal numbers: packets and bytes", token.column)
            state.counters = (int(packets), int(count.text))

    def _command(self, token: Token, letter: str, attached: str | None, column: int) -> None:
        line, state = self.line, self.state
        if state.command:
            raise line.error(
                f"only one command per line: -{letter} and -{state.command}", token.column
            )
        if letter not in "AINPFXZ":
            raise line.error(
                f"command '{token.text}' is not supported in rule files"
                f" (supported: {SUPPORTED_COMMANDS})",
                token.column,
            )
        state.command, state.command_token = letter, token
        if letter in "AINP":
            chain = self._required(token, attached, column)
        else:
            chain = Token(attached, column) if attached is not None else self._next_word()
        if chain is not None:
            state.chain, state.chain_token = chain.text, chain
        if letter == "I":
            state.argument = self._next_word()
        elif letter == "P":
            state.argument = self._next_word()
            if state.argument is None:
                raise line.error("-P needs a chain and a policy", token.column)

    def _match(self, token: Token, value: Token) -> None:
        extension = BY_NAME.get(value.text)
        if extension is None:
            raise self.line.error(
                f"match '-m {value.text}' is not supported"
                f" (supported matches: {supported_matches()})",
                token.column,
            )
        self.state.matches.append(extension.parser(token, implicit=False))

    def _target(self, letter: str, value: Token) -> Target:
        name = value.text
        line = self.line
        chain = self.ruleset.chains.get(name)
        if chain is not None and not chain.builtin:
            return Jump(name) if letter == "j" else Goto(name)
        if name in BUILTIN_CHAINS:
            verb = "jump to" if letter == "j" else "goto"
            raise line.error(f"cannot {verb} built-in chain '{name}'", value.column)
        if letter == "g":
            raise line.error(f"goto '{name}' is not a user-defined chain", value.column)
        if name == "ACCEPT":
            return Accept()
        if name == "DROP":
            return Drop()
        if name == "RETURN":
            return Return()
        if name == "":
            raise line.error("empty target name after -j", value.column)
        if name in STANDARD_TARGETS or name in EXTENSION_TARGETS:
            raise line.error(
                f"target '{name}' is not supported (supported targets: {SUPPORTED_TARGETS})",
                value.column,
            )
        raise line.error(
            f"chain or target '{name}' does not exist (chains must be declared before use;"
            f" supported targets: {SUPPORTED_TARGETS})",
            value.column,
        )
