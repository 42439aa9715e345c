"""The filter table as iptables sees it: chains of rules, each rule a list of matches and a target.

The model mirrors what the kernel stores (struct ipt_entry and its matches) rather than the text
the user typed: an address is kept already masked, a port match keeps its full range when the
user gave none, and `-i +` is no match at all. Two rule sets that the kernel cannot tell apart
therefore compare equal, which is what the round trip through iptables-save text relies on.
"""

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from codegen.rules.names import (
    BUILTIN_CHAINS,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MULTIPORT_PROTOCOLS,
    PKT_TYPES,
    STANDARD_TARGETS,
)

UINT32_MAX = 0xFFFFFFFF
# Kernel limits: IFNAMSIZ - 1, XT_EXTENSION_MAXNAMELEN - 1, XT_MAX_COMMENT_LEN - 1,
# XT_MULTI_PORTS.
INTERFACE_NAME_MAX = 15
CHAIN_NAME_MAX = 28
COMMENT_MAX = 255
MULTIPORT_SLOTS = 15


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
    offending line under it."""

    def __init__(self, message: str, source: Source | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source

    def __str__(self) -> str:
        if self.source is None:
            return f"error: {self.message}"
        return f"{self.source}: error: {self.message}\n{self.source.text}"


def _check_uint(value: int, bits: int, what: str) -> None:
    # bool is an int subclass: refuse it so that a swapped argument cannot pass silently.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{what} must be an integer in 0..{(1 << bits) - 1}, got {value!r}")


def _set(obj: object, name: str, value: object) -> None:
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
        _check_uint(self.address, 32, "address")
        _check_uint(self.mask, 32, "mask")
        _set(self, "address", self.address & self.mask)

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
        _check_uint(self.number, 8, "protocol")


@dataclass(frozen=True, slots=True)
class Fragment:
    """`-f`: second and later fragments (fragment offset != 0); `! -f` the others."""

    negated: bool = False


# ---------------------------------------------------------------------------------------------
# Extension matches (`-m NAME`), printed in the order given.


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive port range; the default, 0:65535, is what iptables stores for no option."""

    first: int = 0
    last: int = 0xFFFF
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.first, 16, "port")
        _check_uint(self.last, 16, "port")

    @property
    def is_default(self) -> bool:
        return self.first == 0 and self.last == 0xFFFF and not self.negated

    def matches(self, port: int) -> bool:
        return (self.first <= port <= self.last) != self.negated


@dataclass(frozen=True, slots=True)
class TcpFlags:
    """`--tcp-flags MASK COMP`: matches when `flags & mask == comp`. Mask and comp 0 (the
    default) with no negation matches every packet; mask 0 with a comp matches none."""

    mask: int = 0
    compare: int = 0
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.mask, 8, "tcp flags mask")
        _check_uint(self.compare, 8, "tcp flags")

    @classmethod
    def syn(cls, negated: bool = False) -> "TcpFlags":
        """`--syn`, which iptables stores as `--tcp-flags FIN,SYN,RST,ACK SYN`."""
        return cls(0x17, 0x02, negated)

    @property
    def is_default(self) -> bool:
        # `--tcp-flags NONE FIN` (mask 0, compare set) never matches: not the default.
        return self.mask == 0 and self.compare == 0 and not self.negated


@dataclass(frozen=True, slots=True)
class TcpMatch:
    """`-m tcp` (also loaded implicitly by `-p tcp --dport ...`)."""

    sport: PortRange = PortRange()
    dport: PortRange = PortRange()
    flags: TcpFlags = TcpFlags()


@dataclass(frozen=True, slots=True)
class UdpMatch:
    """`-m udp`."""

    sport: PortRange = PortRange()
    dport: PortRange = PortRange()


@dataclass(frozen=True, slots=True)
class IcmpMatch:
    """`-m icmp --icmp-type TYPE[/CODE]`; type 255 is `any`. Codes are a single code or the
    whole 0..255 range, the only two things iptables can express."""

    type: int = 0xFF
    code_min: int = 0
    code_max: int = 0xFF
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.type, 8, "icmp type")
        _check_uint(self.code_min, 8, "icmp code")
        _check_uint(self.code_max, 8, "icmp code")
        if self.type == 0xFF:
            # The kernel ignores the codes for `any`; keep one spelling of it.
            _set(self, "code_min", 0)
            _set(self, "code_max", 0xFF)


@dataclass(frozen=True, slots=True)
class Multiport:
    """`-m multiport --sports|--dports|--ports LIST`: up to 15 slots, a range takes two.
    Each entry is `(first, last)`; a single port has first == last."""

    direction: Literal["src", "dst", "any"]
    ports: tuple[tuple[int, int], ...]
    negated: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("src", "dst", "any"):
            raise ValueError(f"multiport direction must be src, dst or any: {self.direction!r}")
        _set(self, "ports", tuple((int(a), int(b)) for a, b in self.ports))
        for first, last in self.ports:
            _check_uint(first, 16, "port")
            _check_uint(last, 16, "port")

    @property
    def slots(self) -> int:
        return sum(1 if first == last else 2 for first, last in self.ports)

    def matches(self, sport: int, dport: int) -> bool:
        for first, last in self.ports:
            if self.direction in ("src", "any") and first <= sport <= last:
                return not self.negated
            if self.direction in ("dst", "any") and first <= dport <= last:
                return not self.negated
        return self.negated


@dataclass(frozen=True, slots=True)
class AddressRange:
    """One side of `-m iprange`: inclusive, and empty when first > last (iptables allows it)."""

    first: int
    last: int
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.first, 32, "address")
        _check_uint(self.last, 32, "address")

    def matches(self, ip: int) -> bool:
        return (self.first <= ip <= self.last) != self.negated


@dataclass(frozen=True, slots=True)
class IpRange:
    """`-m iprange --src-range A-B --dst-range C-D` (at least one of them)."""

    src: AddressRange | None = None
    dst: AddressRange | None = None


@dataclass(frozen=True, slots=True)
class Length:
    """`-m length --length MIN[:MAX]` on the IP total length."""

    min: int
    max: int
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.min, 16, "length")
        _check_uint(self.max, 16, "length")

    def matches(self, total_length: int) -> bool:
        return (self.min <= total_length <= self.max) != self.negated


@dataclass(frozen=True, slots=True)
class Ttl:
    """`-m ttl --ttl-eq|--ttl-lt|--ttl-gt N`; only `--ttl-eq` can be negated."""

    op: Literal["eq", "lt", "gt"]
    value: int
    negated: bool = False

    def __post_init__(self) -> None:
        if self.op not in ("eq", "lt", "gt"):
            raise ValueError(f"ttl op must be eq, lt or gt, got {self.op!r}")
        _check_uint(self.value, 8, "ttl")

    def matches(self, ttl: int) -> bool:
        if self.op == "eq":
            return (ttl == self.value) != self.negated
        if self.op == "lt":
            return ttl < self.value
        return ttl > self.value


@dataclass(frozen=True, slots=True)
class PktType:
    """`-m pkttype --pkt-type unicast|broadcast|multicast|otherhost`."""

    type: Literal["unicast", "broadcast", "multicast", "otherhost"]
    negated: bool = False

    def __post_init__(self) -> None:
        if self.type not in PKT_TYPES:
            raise ValueError(f"packet type must be one of {', '.join(PKT_TYPES)}: {self.type!r}")


@dataclass(frozen=True, slots=True)
class Mark:
    """`-m mark --mark VALUE[/MASK]`: matches when `skb->mark & mask == value` (the value is
    not masked, as in the kernel: 0x10/0x1 never matches)."""

    value: int
    mask: int = UINT32_MAX
    negated: bool = False

    def __post_init__(self) -> None:
        _check_uint(self.value, 32, "mark")
        _check_uint(self.mask, 32, "mark mask")

    def matches(self, mark: int) -> bool:
        return ((mark & self.mask) == self.value) != self.negated


@dataclass(frozen=True, slots=True)
class Comment:
    """`-m comment --comment TEXT`: always matches."""

    text: str


Match = (
    Address
    | Interface
    | Protocol
    | Fragment
    | TcpMatch
    | UdpMatch
    | IcmpMatch
    | Multiport
    | IpRange
    | Length
    | Ttl
    | PktType
    | Mark
    | Comment
)
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


Target = Accept | Drop | Return | Jump | Goto


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

    def validate(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------
# Validation: what iptables (userspace and the kernel's checkentry) refuses.


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


def _require_protocol(
    rule: Rule, allowed: frozenset[int], what: str, source: Source | None
) -> None:
    proto = rule.protocol
    if proto is None or proto.number not in allowed or proto.negated:
        raise RuleError(what, source)


def _check_ports(ports: PortRange, option: str, source: Source | None) -> None:
    if ports.first > ports.last:
        raise RuleError(f"{option} {ports.first}:{ports.last}: invalid range (min > max)", source)


def validate_rule(rule: Rule, chain: str, ruleset: Ruleset | None = None) -> None:
    """Raise RuleError if iptables would refuse `rule` in `chain`."""
    source = rule.source
    seen: set[tuple[type, str | None]] = set()
    for match in rule.matches:
        if isinstance(match, IP_PART):
            key = (type(match), getattr(match, "direction", None))
            if key in seen:
                raise RuleError(f"more than one {_ip_part_name(match)} in one rule", source)
            seen.add(key)
        _validate_match(match, rule, chain, source)
    target = rule.target
    if isinstance(target, Jump | Goto):
        verb = "jump to" if isinstance(target, Jump) else "goto"
        if target.chain in BUILTIN_CHAINS:
            raise RuleError(f"cannot {verb} built-in chain '{target.chain}'", source)
        if ruleset is not None and target.chain not in ruleset.chains:
            raise RuleError(f"{verb} unknown chain '{target.chain}'", source)
    elif target is not None and not isinstance(target, Accept | Drop | Return):
        raise RuleError(f"unknown target {target!r}", source)
    _check_uint(rule.packets, 64, "packet counter")
    _check_uint(rule.bytes, 64, "byte counter")


def _ip_part_name(match: Match) -> str:
    if isinstance(match, Address):
        return "-s" if match.direction == "src" else "-d"
    if isinstance(match, Interface):
        return "-i" if match.direction == "in" else "-o"
    if isinstance(match, Protocol):
        return "-p"
    return "-f"


def _validate_match(match: Match, rule: Rule, chain: str, source: Source | None) -> None:
    if isinstance(match, Interface):
        if not match.name:
            raise RuleError("empty interface name", source)
        if len(match.name) > INTERFACE_NAME_MAX:
            raise RuleError(
                f"interface name '{match.name}' is longer than {INTERFACE_NAME_MAX} characters",
                source,
            )
        if match.direction == "in" and chain == "OUTPUT":
            raise RuleError("can't use -i with OUTPUT", source)
        if match.direction == "out" and chain == "INPUT":
            raise RuleError("can't use -o with INPUT", source)
    elif isinstance(match, Protocol):
        if match.number == 0 and match.negated:
            raise RuleError("'! -p all' would never match", source)
    elif isinstance(match, TcpMatch):
        _require_protocol(
            rule, frozenset({IPPROTO_TCP}), "tcp match needs '-p tcp' (not negated)", source
        )
        _check_ports(match.sport, "--sport", source)
        _check_ports(match.dport, "--dport", source)
        if match.flags.mask > 0x3F or match.flags.compare > 0x3F:
            raise RuleError("--tcp-flags: only FIN,SYN,RST,PSH,ACK,URG can be matched", source)
    elif isinstance(match, UdpMatch):
        _require_protocol(
            rule, frozenset({IPPROTO_UDP}), "udp match needs '-p udp' (not negated)", source
        )
        _check_ports(match.sport, "--sport", source)
        _check_ports(match.dport, "--dport", source)
    elif isinstance(match, IcmpMatch):
        _require_protocol(
            rule, frozenset({IPPROTO_ICMP}), "icmp match needs '-p icmp' (not negated)", source
        )
        full = (match.code_min, match.code_max) == (0, 0xFF)
        if not full and match.code_min != match.code_max:
            raise RuleError("--icmp-type: a code range other than 0-255 cannot be written", source)
    elif isinstance(match, Multiport):
        _require_protocol(
            rule,
            MULTIPORT_PROTOCOLS,
            "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' or '-p dccp'"
            " (not negated)",
            source,
        )
        if not match.ports:
            raise RuleError("multiport needs at least one port", source)
        if match.slots > MULTIPORT_SLOTS:
            raise RuleError(
                f"multiport: too many ports ({match.slots} slots, a range counts as two;"
                f" {MULTIPORT_SLOTS} max)",
                source,
            )
        for first, last in match.ports:
            if first > last:
                raise RuleError(f"multiport: invalid port range {first}:{last}", source)
    elif isinstance(match, IpRange):
        if match.src is None and match.dst is None:
            raise RuleError("iprange needs --src-range or --dst-range", source)
    elif isinstance(match, Ttl):
        if match.negated and match.op != "eq":
            raise RuleError(f"--ttl-{match.op} cannot be negated", source)
    elif isinstance(match, Comment):
        encoded = match.text.encode()
        if len(encoded) > COMMENT_MAX:
            raise RuleError(f"comment is {len(encoded)} bytes long, {COMMENT_MAX} max", source)
        if "\n" in match.text or "\0" in match.text:
            raise RuleError("comment cannot contain a newline or NUL", source)
    elif not isinstance(match, Address | Fragment | Length | PktType | Mark):
        raise RuleError(f"unknown match {match!r}", source)


def validate(ruleset: Ruleset) -> None:
    """Raise the first RuleError iptables would report for this rule set, in file order;
    loops are reported last, at the rule that closes them."""
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
        _check_uint(chain.packets, 64, "packet counter")
        _check_uint(chain.bytes, 64, "byte counter")
        for rule in chain.rules:
            validate_rule(rule, chain.name, ruleset)
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
