"""`-m state --state LIST` (libxt_conntrack.c's state alias): iptables-legacy writes it as a
conntrack revision 3 match (xt_conntrack.c) whose match_flags are STATE and STATE_ALIAS, and
reads such a match back as `-m state`. Its meaning is --ctstate's.
"""

from __future__ import annotations

from dataclasses import dataclass

from codegen.rules.blob.structs import BlobError
from codegen.rules.extensions import ctinfo
from codegen.rules.extensions.base import MatchExtension
from codegen.rules.model import ExtensionMatch, Rule, check_uint
from codegen.rules.packet import Packet
from codegen.rules.syntax import OptionContext, SingleMatchParser

# The states `--state` knows (no SNAT or DNAT), in the order libxt_conntrack tries them.
STATE_NAMES = (
    ("INVALID", ctinfo.STATE_INVALID),
    ("NEW", ctinfo.STATE_NEW),
    ("ESTABLISHED", ctinfo.STATE_ESTABLISHED),
    ("RELATED", ctinfo.STATE_RELATED),
    ("UNTRACKED", ctinfo.STATE_UNTRACKED),
)
_ALL = sum(bit for _, bit in STATE_NAMES)
_FLAGS = ctinfo.XT_CONNTRACK_STATE | ctinfo.XT_CONNTRACK_STATE_ALIAS


@dataclass(frozen=True, slots=True)
class State(ExtensionMatch):
    """`-m state --state LIST`: the packet's state (STATE_* bits of ctinfo.py) is one of
    `states`, or none of them when negated."""

    states: int
    negated: bool = False

    def __post_init__(self) -> None:
        check_uint(self.states, 16, "states")


class StateParser(SingleMatchParser):
    name = "state"
    options = {"state": ("state", True)}
    invertible = frozenset({"state"})
    required = "--state"

    def parse(self, key: str, ctx: OptionContext) -> None:
        self.once(key, ctx, "--state")
        self.match = State(ctinfo.parse_names(STATE_NAMES, ctx, "state: state"), ctx.negated)


def _options(match: State) -> list[tuple[bool, str, str]]:
    return [(match.negated, "state", ctinfo.format_names(match.states, ctinfo.STATE_PRINT_ORDER))]


class StateExtension(MatchExtension):
    name = "state"
    blob_name = "conntrack"  # type: ignore[assignment]  # libxtables' real_name
    revision = 3
    model = State
    data = ctinfo.XtConntrackMtinfo3
    parser = StateParser
    examples = (
        "-m state --state NEW,ESTABLISHED",
        "-m state ! --state INVALID",
        "-m state --state INVALID,NEW,RELATED,ESTABLISHED,UNTRACKED",
    )

    def claims(self, data: ctinfo.XtConntrackMtinfo3) -> bool:
        return bool(data.match_flags & ctinfo.XT_CONNTRACK_STATE_ALIAS)

    def save(self, match: State) -> list[str]:
        return ctinfo.save_words("state", _options(match))

    def describe(self, match: State) -> str:
        return ctinfo.describe_words(_options(match))

    def check(self, match: State, rule: Rule, chain: str) -> None:
        ctinfo.check_states(match.states, _ALL, "--state")

    def encode(self, match: State) -> ctinfo.XtConntrackMtinfo3:
        inverted = ctinfo.XT_CONNTRACK_STATE if match.negated else 0
        return ctinfo.XtConntrackMtinfo3(
            match_flags=_FLAGS, invert_flags=inverted, state_mask=match.states
        )

    def decode(self, data: ctinfo.XtConntrackMtinfo3) -> State:
        if data.match_flags != _FLAGS or data.invert_flags & ~ctinfo.XT_CONNTRACK_STATE:
            raise BlobError(
                f"state match (conntrack flags 0x{data.match_flags:x}, inverted"
                f" 0x{data.invert_flags:x}) has options --state does not"
            )
        if data.state_mask & ~_ALL or not data.state_mask:
            raise BlobError(f"state match: states 0x{data.state_mask:x} are not --state's")
        return State(data.state_mask, bool(data.invert_flags))

    def matches(self, match: State, packet: Packet) -> bool:
        states = ctinfo.AnyOf(match.states, match.negated)
        return states.matches(ctinfo.state_bits(packet.connection))


EXTENSION = StateExtension()
