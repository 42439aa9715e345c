"""What the port matches share (tcp, udp; libxt_tcp.c and libxt_udp.c each carry a copy in
iptables): the port range model, its option syntax, its save and print forms and its blob pair.
Not a family of its own.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from codegen.rules.model import RuleError, check_uint
from codegen.rules.syntax import MatchParser, OptionContext, Token, parse_port


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive port range; the default, 0:65535, is what iptables stores for no option."""

    first: int = 0
    last: int = 0xFFFF
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.first, 16, "port")
        check_uint(self.last, 16, "port")

    @property
    def is_default(self) -> bool:
        return self.first == 0 and self.last == 0xFFFF and not self.negated

    def matches(self, port: int) -> bool:
        return (self.first <= port <= self.last) != self.negated


FULL_NEGATED = PortRange(0, 0xFFFF, negated=True)


def parse_range(text: str, protocol: str, ctx: OptionContext, negated: bool) -> PortRange:
    """`PORT`, `FIRST:LAST`, `:LAST` or `FIRST:` (xtables_parse_service ports or names)."""
    low_text, colon, high_text = text.partition(":")
    if colon:
        low = parse_port(low_text, protocol) if low_text else 0
        high = parse_port(high_text, protocol) if high_text else 0xFFFF
        bad = low_text if low is None else high_text
    else:
        low = high = parse_port(text, protocol)
        bad = text
    if low is None or high is None:
        raise ctx.error(f"invalid port/service '{bad}' (ports are 0-65535)", at_value=True)
    if low > high:
        raise ctx.error(f"invalid port range '{text}' (min > max)", at_value=True)
    return PortRange(low, high, negated)


class PortsParser(MatchParser):
    """`--sport`/`--source-port` and `--dport`/`--destination-port`, each once."""

    options = {
        "source-port": ("sport", True),
        "sport": ("sport", True),
        "destination-port": ("dport", True),
        "dport": ("dport", True),
    }
    invertible = frozenset({"sport", "dport"})

    def __init__(self, token: Token, implicit: bool) -> None:
        super().__init__(token, implicit)
        self.sport = PortRange()
        self.dport = PortRange()

    def parse(self, key: str, ctx: OptionContext) -> None:
        label = "--source-port" if key == "sport" else "--destination-port"
        self.once(key, ctx, label)
        assert ctx.value is not None
        ports = parse_range(ctx.value.text, self.name, ctx, ctx.negated)
        if key == "sport":
            self.sport = ports
        else:
            self.dport = ports


def check_ports(ports: PortRange, option: str) -> None:
    if ports.first > ports.last:
        raise RuleError(f"{option} {ports.first}:{ports.last}: invalid range (min > max)")


def save_ports(option: str, ports: PortRange) -> list[str]:
    # iptables-save leaves out a full range even when negated (and so loses `! --dport
    # 0:65535`, which never matches); we print it so the round trip keeps it.
    if ports.is_default:
        return []
    text = f"{ports.first}" if ports.first == ports.last else f"{ports.first}:{ports.last}"
    return (["!"] if ports.negated else []) + [option, text]


def describe_ports(name: str, ports: PortRange) -> str:
    """print_ports of libxt_tcp/libxt_udp with -n: ` spt:22`, ` dpts:!1:1023`."""
    if ports.is_default:
        return ""
    inverse = "!" if ports.negated else ""
    if ports.first == ports.last:
        return f" {name}:{inverse}{ports.first}"
    return f" {name}s:{inverse}{ports.first}:{ports.last}"


def as_saved(ports: PortRange) -> PortRange:
    """iptables-legacy-save prints nothing for `! 0:65535`, which reads back as no option."""
    return PortRange() if ports == FULL_NEGATED else ports


def pair(ports: PortRange) -> ctypes.Array[ctypes.c_uint16]:
    """The `__u16 spts[2]` of xt_tcp and xt_udp."""
    return (ctypes.c_uint16 * 2)(ports.first, ports.last)


def from_pair(ports: ctypes.Array[ctypes.c_uint16], negated: bool) -> PortRange:
    return PortRange(ports[0], ports[1], negated)


def ports_of(header: bytes) -> tuple[int, int]:
    """(source, destination) of a transport header that starts with the two ports."""
    return int.from_bytes(header[0:2], "big"), int.from_bytes(header[2:4], "big")
