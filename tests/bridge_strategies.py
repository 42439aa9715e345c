"""Rule sets aimed at a bridge host (netns.bridge's names): a few rules per built-in chain, each
with devices, -p udp and -m physdev as drawn, valid in iptables-legacy (an output port in
OUTPUT only beside --physdev-is-bridged, as the kernel insists)."""

from __future__ import annotations

from hypothesis import strategies as st

PORT_NAMES = ("port1", "port2", "port+", "br0", "eth1", "p+")
_PORT_NAMES = st.sampled_from(PORT_NAMES)
_FLAG = st.sampled_from((None, True, False))


@st.composite
def _physdev(draw: st.DrawFn, chain: str) -> str:
    words: list[str] = []

    def flag(name: str) -> None:
        given = draw(_FLAG)
        if given is not None:
            words.extend([*([] if given else ["!"]), name])

    def port(name: str) -> None:
        if draw(st.booleans()):
            words.extend([*(["!"] if draw(st.booleans()) else []), name, draw(_PORT_NAMES)])

    flag("--physdev-is-in")
    port("--physdev-in")
    bridged = draw(_FLAG)
    # The kernel refuses an output port in OUTPUT unless the rule asks for bridged packets.
    if chain != "OUTPUT" or bridged is True:
        flag("--physdev-is-out")
        port("--physdev-out")
    if bridged is not None:
        words.extend([*([] if bridged else ["!"]), "--physdev-is-bridged"])
    return " ".join(["-m", "physdev", *words]) if words else "-m physdev --physdev-is-in"


@st.composite
def _rule(draw: st.DrawFn, chain: str, probing: bool) -> str:
    parts = [f"-A {chain}"]
    if chain != "OUTPUT" and draw(st.integers(0, 3 if probing else 1)) == 0:
        device = draw(st.sampled_from(("br0", "eth1")))
        parts.append(f"{'! ' if draw(st.booleans()) else ''}-i {device}")
    if chain != "INPUT" and draw(st.integers(0, 3 if probing else 1)) == 0:
        parts.append(f"-o {draw(st.sampled_from(('br0', 'eth1', 'port1')))}")
    if not probing:
        parts.append(draw(st.sampled_from(("", "", "-p udp", "-p tcp"))))
    if probing or draw(st.booleans()):
        parts.append(draw(_physdev(chain)))
    targets = ("", "", "", "", "-j ACCEPT", "-j DROP") if probing else ("", "-j ACCEPT", "-j DROP")
    parts.append(draw(st.sampled_from(targets)))
    return " ".join(part for part in parts if part)


@st.composite
def bridge_rulesets(draw: st.DrawFn, *, probing: bool = False) -> str:
    """With `probing`, every rule has a -m physdev and most only count (no target): each
    packet's counters then tell what every physdev match made of it."""
    lines = ["*filter"]
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        lines.append(f":{chain} {draw(st.sampled_from(('ACCEPT', 'DROP')))} [0:0]")
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        lines += draw(st.lists(_rule(chain, probing), max_size=8 if probing else 4))
    return "\n".join([*lines, "COMMIT", ""])
