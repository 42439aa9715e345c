"""Packet scripts: a rule set, a topology, packets and what should become of them (TOML).

The format is documented in docs/packet-scripts.md. Reading checks everything a run would trip
over (unknown keys, impossible paths, packet specs that do not parse, counters of rules that do
not exist), so that a bad script fails at once with `FILE:LINE: error: MESSAGE`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from codegen.rules import parse
from codegen.rules.extensions.set import bind_sets
from codegen.rules.iptables_save import ParseError
from codegen.rules.model import RuleError, Ruleset
from codegen.rules.sets import SetError, parse_sets
from codegen.rules.text_file import decode_rules
from codegen.rules.validation import validate
from netns.namespace import NamespaceError

from .commands import CommandError, argv_of, kernel_table
from .errors import ScriptError
from .packets import SpecError, parse_packet

TOPOLOGIES = {
    "host": ("client", "host"),
    "router": ("client", "router", "server"),
    "bridge": ("client1", "client2", "host", "server"),  # netns.bridge: the host bridges
}
RULE_HOLDER = {"host": "host", "router": "router", "bridge": "host"}
EXPECTATIONS = ("pass", "drop", "netfilter")
EXCHANGES = ("tcp", "udp", "ping")  # real connections through the kernels' own stacks
OUTCOMES = ("connects", "refused", "times out")
EXCHANGE_EXPECTATIONS = (*OUTCOMES, "netfilter")
TOP_KEYS = {
    "description",
    "topology",
    "fastpath",
    "rules",
    "rules_file",
    "commands",
    "sets",
    "packets",
    "counters",
}
PACKET_KEYS = {"from", "to", "packet", "pcap", "keep_addresses", "expect", "count", "description"}
EXCHANGE_KEYS = {"from", "to", "exchange", "port", "listen", "expect", "description"}
MAX_COUNT = 1000  # packets per entry: every traffic loop is bounded


@dataclass
class PacketEntry:
    number: int  # 1-based position among [[packets]]
    line: int
    source: str
    destination: str
    expect: str
    count: int = 1
    spec: str | None = None
    pcap: Path | None = None
    keep_addresses: bool = False
    description: str = ""
    path: str = ""  # the script, as errors name it
    exchange: str | None = None  # "tcp", "udp" or "ping": a real connection, not a packet
    port: int | None = None  # tcp and udp: the destination port
    listen: bool = True  # tcp and udp: whether a listener runs on the `to` node

    @property
    def chain(self) -> str:
        """The chain of the rule holder (host or router) this packet goes through."""
        holder = {"host", "router"}
        if self.destination in holder:
            return "INPUT"
        if self.source in holder:
            return "OUTPUT"
        return "FORWARD"


@dataclass
class CounterExpectation:
    line: int
    chain: str
    index: int | str  # 1-based rule number, or "policy"
    packets: int | None = None
    bytes: int | None = None


@dataclass
class Script:
    path: Path
    description: str
    topology: str
    fastpath: bool
    rules_text: str
    rules_name: str
    ruleset: Ruleset
    packets: list[PacketEntry]
    counters: list[CounterExpectation] = field(default_factory=list)
    sets_text: str = ""  # ipsets made in the rule holder's namespace (and the twin's) first
    # The rules as iptables commands (harness.lab.commands), each an argv; rules_text is then
    # the table they give on the kernel.
    commands: list[list[str]] = field(default_factory=list)

    @property
    def holder(self) -> str:
        return RULE_HOLDER[self.topology]


class _Lines:
    """Line numbers for keys: tomllib gives values, not positions."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.packet_starts = [
            i + 1 for i, line in enumerate(self.lines) if line.strip().startswith("[[packets]]")
        ]

    def key(self, key: str, start: int = 1, end: int | None = None) -> int:
        pattern = re.compile(rf'^\s*"?{re.escape(key)}"?\s*=')
        for number in range(start, (end or len(self.lines)) + 1):
            if pattern.match(self.lines[number - 1]):
                return number
        return start

    def packet(self, index: int) -> tuple[int, int]:
        start = self.packet_starts[index] if index < len(self.packet_starts) else 1
        following = [s for s in self.packet_starts if s > start] + [len(self.lines) + 1]
        return start, following[0] - 1


def load_script(path: str | Path) -> Script:
    path = Path(path)
    name = str(path)
    try:
        text = decode_rules(path.read_bytes(), name)
    except OSError as error:
        raise ScriptError(name, 0, f"cannot read the script: {error.strerror}") from None
    except ParseError as error:
        assert error.source is not None
        raise ScriptError(name, error.source.line, error.message) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = getattr(error, "lineno", None) or _line_of(str(error), text)
        raise ScriptError(name, line, f"not valid TOML: {str(error).split(' (at')[0]}") from None
    lines = _Lines(text)

    def fail(key: str, message: str, start: int = 1, end: int | None = None) -> ScriptError:
        return ScriptError(name, lines.key(key, start, end), message)

    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    topology = data.get("topology", "host")
    if topology not in TOPOLOGIES:
        known = ", ".join(f"'{name}'" for name in TOPOLOGIES)
        raise fail("topology", f"topology must be one of {known}, not {topology!r}")
    fastpath = data.get("fastpath", False)
    if not isinstance(fastpath, bool):
        raise fail("fastpath", "fastpath must be true or false")
    if fastpath and topology != "router":
        raise fail("fastpath", "fastpath only applies to the router topology")
    commands = _commands(data, lines, name)
    if commands:
        rules_text, rules_name = _kernel_table(commands, data, lines, name), str(path)
    else:
        rules_text, rules_name = _rules(data, path, fail)
    try:
        ruleset = parse(rules_text, rules_name)
        validate(ruleset)
    except RuleError as error:
        if "rules" in data and error.source is not None:
            # Point into the script: the rules start on the line after `rules = """`.
            line = _rules_first_line(lines) + error.source.line - 1
            raise ScriptError(name, line, error.message) from None
        raise ScriptError(name, lines.key("rules_file"), str(error).splitlines()[0]) from None
    sets_text = _sets(data, ruleset, lines, name)
    raw_packets = data.get("packets")
    if not isinstance(raw_packets, list) or not raw_packets:
        raise fail("packets", "the script needs at least one [[packets]] table")
    packets = [
        _packet(entry, index, topology, path, lines, name)
        for index, entry in enumerate(raw_packets)
    ]
    counters = _counters(data.get("counters", {}), ruleset, lines, name)
    return Script(
        path,
        str(data.get("description", "")),
        topology,
        fastpath,
        rules_text,
        rules_name,
        ruleset,
        packets,
        counters,
        sets_text,
        commands,
    )


def _commands(data: dict, lines: _Lines, name: str) -> list[list[str]]:
    """The script's `commands` as argvs ([] without the key)."""
    if "commands" not in data:
        return []
    given = data["commands"]
    if "rules" in data or "rules_file" in data:
        raise ScriptError(name, lines.key("commands"), "give one of rules, rules_file or commands")
    if not isinstance(given, list) or not given:
        message = "commands must be a list of iptables command lines"
        raise ScriptError(name, lines.key("commands"), message)
    try:
        return [argv_of(index, command) for index, command in enumerate(given)]
    except CommandError as error:
        raise ScriptError(name, _command_line(lines, given, error.index), str(error)) from None


def _kernel_table(commands: list[list[str]], data: dict, lines: _Lines, name: str) -> str:
    try:
        return kernel_table(commands)
    except CommandError as error:
        line = _command_line(lines, data["commands"], error.index)
        raise ScriptError(name, line, str(error)) from None
    except (NamespaceError, OSError) as error:
        message = f"commands run on the kernel first, which needs root and namespaces: {error}"
        raise ScriptError(name, lines.key("commands"), message) from None


def _command_line(lines: _Lines, given: list, index: int) -> int:
    """The script line of command `index`: the first line after `commands =` holding it."""
    start = lines.key("commands")
    text = given[index] if isinstance(given[index], str) else None
    for number in range(start, len(lines.lines) + 1):
        if text is not None and text in lines.lines[number - 1]:
            if number > start or index == 0:
                return number
    return start


def _sets(data: dict, ruleset: Ruleset, lines: _Lines, name: str) -> str:
    """The script's `sets` (ipset save text): read, and holding every set the rules name."""
    text = data.get("sets", "")
    if not isinstance(text, str):
        raise ScriptError(name, lines.key("sets"), "sets must be `ipset save` text in a string")
    try:
        bind_sets(ruleset, parse_sets(text, name))
    except SetError as error:
        assert error.source is not None
        line = _rules_first_line(lines, "sets") + error.source.line - 1
        raise ScriptError(name, line, error.message) from None
    except RuleError as error:
        where = "give it in `sets`" if "sets" not in data else "add it to `sets`"
        raise ScriptError(name, lines.key("sets"), f"{error.message}: {where}") from None
    return text


def _rules_first_line(lines: _Lines, key: str = "rules") -> int:
    """The script line holding the first line of `rules` (or `key`): TOML drops a newline right
    after the opening quotes, so the text starts on the next line unless it starts on the same
    one."""
    line = lines.key(key)
    opening = lines.lines[line - 1]
    for quotes in ('"""', "'''"):
        if quotes in opening:
            return line if opening.split(quotes, 1)[1].strip() else line + 1
    return line


def _line_of(message: str, text: str) -> int:
    found = re.search(r"line (\d+)", message)
    if found:
        return int(found.group(1))
    return max(1, len(text.splitlines())) if "end of document" in message else 1


def _rules(data: dict, path: Path, fail) -> tuple[str, str]:
    if ("rules" in data) == ("rules_file" in data):
        raise fail(
            "rules",
            "give exactly one of `rules` (text), `rules_file` (a path) or `commands` (iptables"
            " command lines)",
        )
    if "rules" in data:
        if not isinstance(data["rules"], str):
            raise fail("rules", "rules must be iptables-save text in a string")
        return data["rules"], str(path)
    target = path.parent / str(data["rules_file"])
    try:
        raw = target.read_bytes()
    except OSError as error:
        raise fail("rules_file", f"cannot read {target}: {error.strerror}") from None
    try:
        return decode_rules(raw, str(target)), str(target)
    except ParseError as error:  # as load_script reports a parse error in the file
        raise fail("rules_file", str(error).splitlines()[0]) from None


def _packet(entry: object, index: int, topology: str, path: Path, lines: _Lines, name: str):
    start, end = lines.packet(index)

    def fail(key: str, message: str) -> ScriptError:
        return ScriptError(name, lines.key(key, start, end) if key else start, message)

    if not isinstance(entry, dict):
        raise fail("", "each [[packets]] entry must be a table")
    known = EXCHANGE_KEYS if "exchange" in entry else PACKET_KEYS
    unknown = sorted(set(entry) - known)
    if unknown:
        key = unknown[0]
        if "exchange" in entry and key in PACKET_KEYS:
            reason = "one exchange per entry" if key == "count" else "that is for crafted packets"
            raise fail(key, f"`{key}` does not go with `exchange` ({reason})")
        if key in EXCHANGE_KEYS:
            raise fail(key, f"`{key}` only goes with `exchange` (a real connection)")
        raise fail(key, f"unknown key {key!r} in [[packets]] (known: {', '.join(sorted(known))})")
    nodes = TOPOLOGIES[topology]
    source, destination = entry.get("from"), entry.get("to")
    for key, value in (("from", source), ("to", destination)):
        if value not in nodes:
            raise fail(
                key,
                f"`{key}` must be one of {', '.join(nodes)} in the {topology} "
                f"topology, not {value!r}",
            )
    if source == destination:
        raise fail("to", "a packet must go to another node")
    holder = RULE_HOLDER[topology]
    if holder not in (source, destination) and topology == "host":
        raise fail("to", "in the host topology, packets go between client and host")
    if "exchange" in entry:
        return _exchange(entry, index, start, source, destination, fail, name)
    expect = entry.get("expect")
    if expect not in EXPECTATIONS:
        hint = " (that outcome needs `exchange`, a real connection)" if expect in OUTCOMES else ""
        raise fail(
            "expect", f"expect must be one of {', '.join(EXPECTATIONS)}, not {expect!r}{hint}"
        )
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
        raise fail("count", f"count must be a whole number from 1 to {MAX_COUNT}")
    if ("packet" in entry) == ("pcap" in entry):
        raise fail(
            "packet",
            "give exactly one of `packet` (a scapy spec), `pcap` (a file) or `exchange`",
        )
    result = PacketEntry(
        index + 1,
        start,
        source,
        destination,
        expect,
        count,
        keep_addresses=bool(entry.get("keep_addresses", False)),
        description=str(entry.get("description", "")),
        path=name,
    )
    if "packet" in entry:
        try:
            packet = parse_packet(str(entry["packet"]))
        except SpecError as error:
            raise fail("packet", f"packet: {error}") from None
        problem = unobservable(packet, destination)
        if problem:
            raise fail("packet", f"packet: {problem}")
        result.spec = str(entry["packet"])
    else:
        result.pcap = path.parent / str(entry["pcap"])
        if not result.pcap.is_file():
            raise fail("pcap", f"no capture file {result.pcap}")
    return result


def _exchange(entry: dict, index: int, start: int, source, destination, fail, name: str):
    """A [[packets]] entry with `exchange`: a real connection between two nodes."""
    kind = entry["exchange"]
    if kind not in EXCHANGES:
        raise fail("exchange", f"exchange must be one of {', '.join(EXCHANGES)}, not {kind!r}")
    expect = entry.get("expect")
    if expect not in EXCHANGE_EXPECTATIONS:
        raise fail(
            "expect",
            f"with `exchange`, expect must be one of {', '.join(map(repr, EXCHANGE_EXPECTATIONS))}"
            f", not {expect!r}",
        )
    port = entry.get("port")
    listen = entry.get("listen", True)
    if kind == "ping":
        for key in ("port", "listen"):
            if key in entry:
                raise fail(key, f"`{key}` does not apply to a ping exchange")
    else:
        if port is None:
            raise fail("exchange", f"a {kind} exchange needs `port` (1 to 65535)")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise fail("port", "port must be a whole number from 1 to 65535")
        if not isinstance(listen, bool):
            raise fail("listen", "listen must be true or false")
    return PacketEntry(
        index + 1,
        start,
        source,
        destination,
        expect,
        description=str(entry.get("description", "")),
        path=name,
        exchange=kind,
        port=port,
        listen=listen,
    )


def _counters(raw: object, ruleset: Ruleset, lines: _Lines, name: str):
    if not isinstance(raw, dict):
        raise ScriptError(name, lines.key("counters"), "[counters] must be a table")
    expectations = []
    for key, value in raw.items():
        line = lines.key(key)
        chain, _, index_text = key.partition(":")
        if chain not in ruleset.chains:
            raise ScriptError(name, line, f"counter {key!r}: no chain {chain!r} in the rules")
        if index_text == "policy":
            if not ruleset.chains[chain].builtin:
                raise ScriptError(name, line, f"counter {key!r}: user chains have no policy")
            index: int | str = "policy"
        elif index_text.isdigit() and 1 <= int(index_text) <= len(ruleset.chains[chain].rules):
            index = int(index_text)
        else:
            raise ScriptError(
                name, line, f"counter {key!r}: want CHAIN:N (a rule number) or CHAIN:policy"
            )
        if not isinstance(value, dict) or not value or set(value) - {"packets", "bytes"}:
            raise ScriptError(name, line, f"counter {key!r}: want {{ packets = N, bytes = N }}")
        for field_name, number in value.items():
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise ScriptError(name, line, f"counter {key!r}: {field_name} must be >= 0")
        expectations.append(
            CounterExpectation(line, chain, index, value.get("packets"), value.get("bytes"))
        )
    return expectations


def unobservable(packet, destination: str) -> str:
    """Why the lab could not watch `packet` (a scapy packet, maybe above IP) arrive at
    `destination`, or "": it must carry IPv4, and a packet to the rule holder needs an IP
    protocol that a raw socket receives (not 0 nor IPPROTO_RAW)."""
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    if Ether in packet and IP not in packet:
        return f"the packet must be IPv4 (the rules are IPv4 rules), not {packet.summary()}"
    if IP in packet and destination in ("host", "router") and packet[IP].proto in (0, 255):
        return (
            f"IP protocol {packet[IP].proto} to the {destination}: no raw socket receives it, "
            "so its delivery cannot be watched; use another protocol number"
        )
    return ""
