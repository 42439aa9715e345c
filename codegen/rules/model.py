"""The filter table as iptables sees it: chains of rules, each rule a list of matches and a target.

The model mirrors what the kernel stores (struct ipt_entry and its matches) rather than the text
the user typed: an address is kept already masked, a port match keeps its full range when the
user gave none, and `-i +` is no match at all. Two rule sets that the kernel cannot tell apart
therefore compare equal, which is what the round trip through iptables-save text relies on.
"""

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from codegen.rules.names import BUILTIN_CHAINS, STANDARD_TARGETS

UINT32_MAX = 0xFFFFFFFF
# Kernel limits: IFNAMSIZ - 1, XT_EXTENSION_MAXNAMELEN - 1.
INTERFACE_NAME_MAX = 15
CHAIN_NAME_MAX = 28


@dataclass(frozen=True, slots=True)
class Source:
    """Where a rule or chain came from: enough to point a user at the text."""

    file: str
    line: int
    column: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class RuleError(Exception):
    """A rule set iptables would refuse. `str()` gives `FILE:LINE:COL: error: MESSAGE` and the
    offending line under it. `match` is the match at fault, when one is."""

    def __init__(
        self, message: str, source: Source | None = None, match: object | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.source = source
        self.match = match

    def __str__(self) -> str:
        if self.source is None:
            return f"error: {self.message}"
        return f"{self.source}: error: {self.message}\n{self.source.text}"


def check_uint(value: int, bits: int, what: str) -> None:
    # bool is an int subclass: refuse it so that a swapped argument cannot pass silently.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{what} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")


def set_field(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


# ---------------------------------------------------------------------------------------------
# Matches of the IP header part (struct ipt_ip): printed first, in this order, by iptables-save.


@dataclass(frozen=True, slots=True)
class Address:
    """`-s` / `-d`. The mask may be any 32-bit value (iptables accepts 255.0.255.0); the
    address is stored masked, as the kernel compares `(ip & mask) == address`."""

    direction: Literal["src", "dst"]
    address: int
    mask: int = UINT32_MAX
    negated: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("src", "dst"):
            raise ValueError(f"address direction must be 'src' or 'dst', got {self.direction!r}")
        check_uint(self.address, 32, "address")
        check_uint(self.mask, 32, "mask")
        set_field(self, "address", self.address & self.mask)

    @classmethod
    def from_network(
        cls,
        direction: Literal["src", "dst"],
        network: str | ipaddress.IPv4Network,
        negated: bool = False,
    ) -> "Address":
        net = ipaddress.IPv4Network(network, strict=False)
        return cls(direction, int(net.network_address), int(net.netmask), negated)

    @property
    def network(self) -> ipaddress.IPv4Network | None:
        """The network, or None when the mask is not a prefix (e.g. 255.0.255.0)."""
        try:
            return ipaddress.IPv4Network((self.address, str(ipaddress.IPv4Address(self.mask))))
        except ValueError:
            return None

    def matches(self, ip: int) -> bool:
        return ((ip & self.mask) == self.address) != self.negated


@dataclass(frozen=True, slots=True)
class Interface:
    """`-i` / `-o`. A trailing `+` makes the name a prefix (`eth+`); `+` alone matches any
    device and is dropped by the parser, as the kernel cannot tell it from no match."""

    direction: Literal["in", "out"]
    name: str
    negated: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("in", "out"):
            raise ValueError(f"interface direction must be 'in' or 'out', got {self.direction!r}")

    @property
    def wildcard(self) -> bool:
        return self.name.endswith("+")

    def matches(self, device: str | None) -> bool:
        # The kernel compares IFNAMSIZ bytes under a mask; a missing device is all zero bytes.
        device = device or ""
        if self.wildcard:
            hit = device.startswith(self.name[:-1])
        else:
            hit = device == self.name
        return hit != self.negated


@dataclass(frozen=True, slots=True)
class Protocol:
    """`-p`; 0 means any protocol (`-p all`)."""

    number: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.number, 8, "protocol")


@dataclass(frozen=True, slots=True)
class Fragment:
    """`-f`: second and later fragments (fragment offset != 0); `! -f` the others."""

    negated: bool = False


# ---------------------------------------------------------------------------------------------
# Extension matches (`-m NAME`), printed in the order given. Each family is a module of
# codegen.rules.extensions; its model classes derive from ExtensionMatch.


class ExtensionMatch:
    """Base of the model classes of match extensions (frozen dataclasses, one family each).
    The registry in codegen.rules.extensions maps each such class to its extension."""

    __slots__ = ()


Match = Address | Interface | Protocol | Fragment | ExtensionMatch
IP_PART = (Address, Interface, Protocol, Fragment)


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True, slots=True)
class Accept:
    pass


@dataclass(frozen=True, slots=True)
class Drop:
    pass


@dataclass(frozen=True, slots=True)
class Return:
    pass


@dataclass(frozen=True, slots=True)
class Jump:
    """`-j CHAIN`: evaluation comes back after this rule when CHAIN returns."""

    chain: str


@dataclass(frozen=True, slots=True)
class Goto:
    """`-g CHAIN`: no way back; a RETURN in CHAIN returns to whoever jumped to us."""

    chain: str


class ExtensionTarget:
    """Base of the model classes of target extensions (`-j NAME` with a module of its own in
    codegen.rules.extensions, such as REJECT); the registry there maps each such class to its
    extension."""

    __slots__ = ()


Target = Accept | Drop | Return | Jump | Goto | ExtensionTarget


@dataclass(slots=True)
class Rule:
    """One rule. `target` None is a rule with no `-j`: it only counts and falls through."""

    matches: tuple[Match, ...] = ()
    target: Target | None = None
    packets: int = 0
    bytes: int = 0
    source: Source | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.matches = tuple(self.matches)

    def ip_part(self, kind: type, direction: str | None = None) -> Match | None:
        """The first match of an IP-header kind (Address, Interface, Protocol, Fragment)."""
        for match in self.matches:
            if isinstance(match, kind) and (
                direction is None or getattr(match, "direction", None) == direction
            ):
                return match
        return None

    @property
    def protocol(self) -> Protocol | None:
        found = self.ip_part(Protocol)
        assert found is None or isinstance(found, Protocol)
        return found


@dataclass(slots=True)
class Chain:
    """A chain. Built-in chains have a policy (ACCEPT or DROP) with its own counters; user
    chains have policy None."""

    name: str
    policy: Literal["ACCEPT", "DROP"] | None = None
    packets: int = 0
    bytes: int = 0
    rules: list[Rule] = field(default_factory=list)
    source: Source | None = field(default=None, compare=False)

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_CHAINS


def _builtin_chains() -> dict[str, Chain]:
    return {name: Chain(name, "ACCEPT") for name in BUILTIN_CHAINS}


@dataclass(slots=True)
class Ruleset:
    """The filter table: INPUT, FORWARD and OUTPUT (policy ACCEPT unless set) and user chains
    in the order they were created."""

    chains: dict[str, Chain] = field(default_factory=_builtin_chains)

    def __getitem__(self, name: str) -> Chain:
        return self.chains[name]

    def __contains__(self, name: object) -> bool:
        return name in self.chains

    def first_with(self, kinds: type | tuple[type, ...]) -> tuple[str, int, Rule] | None:
        """The first rule (chain by chain, in order) with a match or target of `kinds`: its
        chain, 1-based index and itself; None if there is none."""
        found = [place for kind, place in _first_of_kinds(self).items() if issubclass(kind, kinds)]
        return min(found, key=lambda place: place[0])[1:] if found else None

    def matches_of(self, kind: type) -> Iterator[tuple[str, int, Rule, int, Match]]:
        """Every match of `kind`, in rule-set order: its chain, its rule's 1-based index, the
        rule, its place among the rule's matches and itself. A rule set without one is not
        walked (first_with's cache answers)."""
        if self.first_with(kind) is None:
            return
        for chain in self.chains.values():
            for index, rule in enumerate(chain.rules, 1):
                for number, match in enumerate(rule.matches):
                    if isinstance(match, kind):
                        yield chain.name, index, rule, number, match

    def first_rule(self, wanted: Callable[[Rule], bool]) -> tuple[str, int, Rule] | None:
        """The first rule (chain by chain, in order) for which `wanted` holds: its chain,
        1-based index and itself; None if there is none."""
        for chain in self.chains.values():
            for index, rule in enumerate(chain.rules, 1):
                if wanted(rule):
                    return chain.name, index, rule
        return None

    @property
    def user_chains(self) -> list[Chain]:
        return [chain for chain in self.chains.values() if not chain.builtin]

    def add_chain(self, name: str, source: Source | None = None) -> Chain:
        """Create a user chain; raises RuleError as iptables would for a bad or taken name."""
        check_chain_name(name, source)
        if name in self.chains:
            raise RuleError(f"chain '{name}' already exists", source)
        chain = Chain(name, source=source)
        self.chains[name] = chain
        return chain


def check_chain_name(name: str, source: Source | None = None) -> None:
    if not name:
        raise RuleError("chain name is empty", source)
    if len(name) > CHAIN_NAME_MAX:
        raise RuleError(
            f"chain name '{name}' is too long ({len(name)} characters, {CHAIN_NAME_MAX} max)",
            source,
        )
    if any(c.isspace() for c in name):
        raise RuleError(f"chain name '{name}' contains white space", source)
    if name in BUILTIN_CHAINS:
        raise RuleError(f"'{name}' is a built-in chain", source)
    if name in STANDARD_TARGETS:
        raise RuleError(f"chain name '{name}' is reserved for the verdict {name}", source)


# The first rule with each kind of match and target of the last rule sets asked about, by the
# identity of their chains and rules (held here, so no other rule can take a cached one's
# id): code generation asks a rule set of 100,000 rules a dozen times what it uses.
_KINDS: dict[tuple, tuple[list[Rule], dict[type, tuple[int, str, int, Rule]]]] = {}
KINDS_CACHED = 4


def _first_of_kinds(ruleset: Ruleset) -> dict[type, tuple[int, str, int, Rule]]:
    key = tuple(
        item for name, chain in ruleset.chains.items() for item in (name, *map(id, chain.rules))
    )
    cached = _KINDS.get(key)
    if cached is not None:
        return cached[1]
    first: dict[type, tuple[int, str, int, Rule]] = {}
    held: list[Rule] = []
    order = 0
    for chain in ruleset.chains.values():
        held += chain.rules
        for index, rule in enumerate(chain.rules, 1):
            for kind in {type(rule.target), *map(type, rule.matches)}:
                if kind not in first:
                    first[kind] = (order, chain.name, index, rule)
            order += 1
    if len(_KINDS) >= KINDS_CACHED:
        del _KINDS[next(iter(_KINDS))]
    _KINDS[key] = (held, first)
    return first
