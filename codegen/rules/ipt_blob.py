"""The kernel's binary filter table (IPv4 `ip_tables`), read and written as iptables-legacy does.

`read_table` asks the kernel of the calling thread's network namespace for the `filter` table
(IPT_SO_GET_INFO, then IPT_SO_GET_ENTRIES) and decodes it into a `Ruleset`; `write_table`
encodes a `Ruleset` into a `struct ipt_replace` with the layout libiptc's TC_COMMIT builds
(IPT_SO_SET_REPLACE), then sets every counter (IPT_SO_SET_ADD_COUNTERS), as
`iptables-legacy-restore -c` does. `encode_table` and `decode_table` do the same in memory.

Layout (libiptc's iptcc_compile_table): INPUT, FORWARD and OUTPUT, each its rules then its
policy entry (an unconditional standard target, the hook's underflow); then the user chains
sorted bytewise by name, each an ERROR entry carrying the chain name, its rules, and an
unconditional RETURN; then one ERROR entry named "ERROR". A jump's verdict is the byte offset
of the entry after the target chain's ERROR entry; a rule without a target jumps to the entry
after itself; `-g` is a jump with IPT_F_GOTO in ipt_ip.flags.

The structs are ctypes mirrors of the UAPI headers <linux/netfilter_ipv4/ip_tables.h> and
<linux/netfilter/x_tables.h> and of each match's header; the unit tests compare their sizes and
offsets with what a C compiler says about the headers.

Decoding gives matches in the order the iptables-save parser does: -s, -d, -i, -o, -p, -f, then
the match extensions in table order. Callers enter the namespace (`Namespace.enter()`) or pass a
socket created in it: nothing here changes namespaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from codegen.rules.model import (
    Accept,
    Address,
    AddressRange,
    Chain,
    Comment,
    Drop,
    Fragment,
    Goto,
    IcmpMatch,
    Interface,
    IpRange,
    Jump,
    Length,
    Mark,
    Match,
    Multiport,
    PktType,
    PortRange,
    Protocol,
    Return,
    Rule,
    Ruleset,
    Target,
    TcpFlags,
    TcpMatch,
    Ttl,
    UdpMatch,
    validate,
)
from codegen.rules.names import BUILTIN_CHAINS, PKT_TYPES

__all__ = [
    "BlobError",
    "TableInfo",
    "decode_entries",
    "decode_table",
    "encode_counters",
    "encode_table",
    "read_entries",
    "read_table",
    "write_table",
]

# <linux/in.h>, <linux/netfilter_ipv4/ip_tables.h>
SOL_IP = 0
IPT_SO_SET_REPLACE = 64
IPT_SO_SET_ADD_COUNTERS = 65
IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65

TABLE_NAME = "filter"
XT_TABLE_MAXNAMELEN = 32
XT_EXTENSION_MAXNAMELEN = 29
XT_FUNCTION_MAXNAMELEN = 30
IFNAMSIZ = 16
NF_INET_NUMHOOKS = 5
XT_MULTI_PORTS = 15
XT_MAX_COMMENT_LEN = 256

# Hook numbers (enum nf_inet_hooks) of the filter table's chains, in the order libiptc lays
# them out.
HOOKS: tuple[tuple[int, str], ...] = ((1, "INPUT"), (2, "FORWARD"), (3, "OUTPUT"))
FILTER_VALID_HOOKS = sum(1 << hook for hook, _ in HOOKS)
assert tuple(name for _, name in HOOKS) == BUILTIN_CHAINS

IPT_F_FRAG = 0x01
IPT_F_GOTO = 0x02  # ip_tables.h; IP6T_F_GOTO is 0x04 and ebtables has none
IPT_F_MASK = 0x03
IPT_INV_VIA_IN = 0x01
IPT_INV_VIA_OUT = 0x02
IPT_INV_TOS = 0x04
IPT_INV_SRCIP = 0x08
IPT_INV_DSTIP = 0x10
IPT_INV_FRAG = 0x20
IPT_INV_PROTO = 0x40
IPT_INV_MASK = 0x7F

# Standard target verdicts: a negative number is -verdict - 1 (<linux/netfilter.h>).
NF_DROP = 0
NF_ACCEPT = 1
NF_QUEUE = 3
NF_REPEAT = 4
VERDICT_DROP = -NF_DROP - 1
VERDICT_ACCEPT = -NF_ACCEPT - 1
VERDICT_QUEUE = -NF_QUEUE - 1
XT_RETURN = -NF_REPEAT - 1

STANDARD_TARGET = ""
ERROR_TARGET = "ERROR"

XT_TCP_INV_SRCPT = 0x01
XT_TCP_INV_DSTPT = 0x02
XT_TCP_INV_FLAGS = 0x04
XT_TCP_INV_OPTION = 0x08
XT_TCP_INV_MASK = 0x0F
XT_UDP_INV_SRCPT = 0x01
XT_UDP_INV_DSTPT = 0x02
XT_UDP_INV_MASK = 0x03
IPT_ICMP_INV = 0x01
XT_MULTIPORT_SOURCE = 0
XT_MULTIPORT_DESTINATION = 1
XT_MULTIPORT_EITHER = 2
IPRANGE_SRC = 0x01
IPRANGE_DST = 0x02
IPRANGE_SRC_INV = 0x10
IPRANGE_DST_INV = 0x20
IPT_TTL_EQ = 0
IPT_TTL_NE = 1
IPT_TTL_LT = 2
IPT_TTL_GT = 3

# GET_ENTRIES fails with EAGAIN when the table changed size since GET_INFO: ask again, a few
# times only, so that a table rewritten in a loop by someone else cannot hang us.
READ_ATTEMPTS = 5


class BlobError(Exception):
    """The kernel's table cannot be read, written or decoded into the model. `str()` is one
    sentence; `offset` is the byte offset of the entry at fault, when there is one."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset

    def __str__(self) -> str:
        if self.offset is None:
            return self.message
        return f"filter table entry at offset {self.offset}: {self.message}"


# ---------------------------------------------------------------------------------------------
# The UAPI structs. ctypes lays them out with the C compiler's rules for this machine, which is
# what the kernel expects from a native (not compat) process.


class _XtAlign(ctypes.Structure):
    # struct _xt_align: XT_ALIGN rounds to the alignment of the largest of these (8 on x86_64).
    _fields_ = [
        ("u8", ctypes.c_uint8),
        ("u16", ctypes.c_uint16),
        ("u32", ctypes.c_uint32),
        ("u64", ctypes.c_uint64),
    ]


XT_ALIGNMENT = ctypes.alignment(_XtAlign)


def xt_align(size: int) -> int:
    return (size + XT_ALIGNMENT - 1) & ~(XT_ALIGNMENT - 1)


class IptIp(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint8 * 4),  # network byte order, as are the other three
        ("dst", ctypes.c_uint8 * 4),
        ("smsk", ctypes.c_uint8 * 4),
        ("dmsk", ctypes.c_uint8 * 4),
        ("iniface", ctypes.c_char * IFNAMSIZ),
        ("outiface", ctypes.c_char * IFNAMSIZ),
        ("iniface_mask", ctypes.c_uint8 * IFNAMSIZ),
        ("outiface_mask", ctypes.c_uint8 * IFNAMSIZ),
        ("proto", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("invflags", ctypes.c_uint8),
    ]


class XtCounters(ctypes.Structure):
    _fields_ = [("pcnt", ctypes.c_uint64), ("bcnt", ctypes.c_uint64)]


class IptEntry(ctypes.Structure):
    _fields_ = [
        ("ip", IptIp),
        ("nfcache", ctypes.c_uint),
        ("target_offset", ctypes.c_uint16),
        ("next_offset", ctypes.c_uint16),
        ("comefrom", ctypes.c_uint),
        ("counters", XtCounters),
    ]


class _XtEntryUser(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint16),
        ("name", ctypes.c_char * XT_EXTENSION_MAXNAMELEN),
        ("revision", ctypes.c_uint8),
    ]


class _XtEntryKernel(ctypes.Structure):
    # Only here to give the union the kernel pointer's alignment, as in the header: it is what
    # makes sizeof(struct xt_standard_target) 40 rather than 36.
    _fields_ = [("size", ctypes.c_uint16), ("pointer", ctypes.c_void_p)]


class _XtEntryUnion(ctypes.Union):
    _fields_ = [("user", _XtEntryUser), ("kernel", _XtEntryKernel), ("size", ctypes.c_uint16)]


class XtEntryMatch(ctypes.Structure):
    """struct xt_entry_match, and struct xt_entry_target, which has the same layout."""

    _fields_ = [("u", _XtEntryUnion)]


XtEntryTarget = XtEntryMatch


class XtStandardTarget(ctypes.Structure):
    _fields_ = [("target", XtEntryTarget), ("verdict", ctypes.c_int)]


class XtErrorTarget(ctypes.Structure):
    _fields_ = [("target", XtEntryTarget), ("errorname", ctypes.c_char * XT_FUNCTION_MAXNAMELEN)]


class IptGetinfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * XT_TABLE_MAXNAMELEN),
        ("valid_hooks", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("underflow", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
    ]


class IptGetEntries(ctypes.Structure):
    # The empty entrytable member carries struct ipt_entry's alignment: the entries start at
    # offset 40, not 36, and the kernel insists on that length.
    _fields_ = [
        ("name", ctypes.c_char * XT_TABLE_MAXNAMELEN),
        ("size", ctypes.c_uint),
        ("entrytable", IptEntry * 0),
    ]


class IptReplace(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * XT_TABLE_MAXNAMELEN),
        ("valid_hooks", ctypes.c_uint),
        ("num_entries", ctypes.c_uint),
        ("size", ctypes.c_uint),
        ("hook_entry", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("underflow", ctypes.c_uint * NF_INET_NUMHOOKS),
        ("num_counters", ctypes.c_uint),
        ("counters", ctypes.c_void_p),
        ("entries", IptEntry * 0),
    ]


class XtCountersInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * XT_TABLE_MAXNAMELEN),
        ("num_counters", ctypes.c_uint),
        ("counters", XtCounters * 0),
    ]


# Match data, one struct per supported match and revision.


class XtTcp(ctypes.Structure):
    _fields_ = [
        ("spts", ctypes.c_uint16 * 2),
        ("dpts", ctypes.c_uint16 * 2),
        ("option", ctypes.c_uint8),
        ("flg_mask", ctypes.c_uint8),
        ("flg_cmp", ctypes.c_uint8),
        ("invflags", ctypes.c_uint8),
    ]


class XtUdp(ctypes.Structure):
    _fields_ = [
        ("spts", ctypes.c_uint16 * 2),
        ("dpts", ctypes.c_uint16 * 2),
        ("invflags", ctypes.c_uint8),
    ]


class IptIcmp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("code", ctypes.c_uint8 * 2),
        ("invflags", ctypes.c_uint8),
    ]


class XtMultiportV1(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint8),
        ("count", ctypes.c_uint8),
        ("ports", ctypes.c_uint16 * XT_MULTI_PORTS),
        ("pflags", ctypes.c_uint8 * XT_MULTI_PORTS),
        ("invert", ctypes.c_uint8),
    ]


class NfInetAddr(ctypes.Union):
    _fields_ = [("all", ctypes.c_uint32 * 4), ("bytes", ctypes.c_uint8 * 16)]


class XtIprangeMtinfo(ctypes.Structure):
    _fields_ = [
        ("src_min", NfInetAddr),
        ("src_max", NfInetAddr),
        ("dst_min", NfInetAddr),
        ("dst_max", NfInetAddr),
        ("flags", ctypes.c_uint8),
    ]


class XtLengthInfo(ctypes.Structure):
    _fields_ = [("min", ctypes.c_uint16), ("max", ctypes.c_uint16), ("invert", ctypes.c_uint8)]


class IptTtlInfo(ctypes.Structure):
    _fields_ = [("mode", ctypes.c_uint8), ("ttl", ctypes.c_uint8)]


class XtPkttypeInfo(ctypes.Structure):
    _fields_ = [("pkttype", ctypes.c_int), ("invert", ctypes.c_int)]


class XtMarkMtinfo1(ctypes.Structure):
    _fields_ = [("mark", ctypes.c_uint32), ("mask", ctypes.c_uint32), ("invert", ctypes.c_uint8)]


class XtCommentInfo(ctypes.Structure):
    _fields_ = [("comment", ctypes.c_char * XT_MAX_COMMENT_LEN)]


ENTRY_SIZE = ctypes.sizeof(IptEntry)
MATCH_HEADER_SIZE = ctypes.sizeof(XtEntryMatch)
STANDARD_TARGET_SIZE = xt_align(ctypes.sizeof(XtStandardTarget))
ERROR_TARGET_SIZE = xt_align(ctypes.sizeof(XtErrorTarget))
# libiptc's IPTCB_CHAIN_START_SIZE / IPTCB_CHAIN_FOOT_SIZE / IPTCB_CHAIN_ERROR_SIZE.
CHAIN_START_SIZE = ENTRY_SIZE + ERROR_TARGET_SIZE
CHAIN_FOOT_SIZE = ENTRY_SIZE + STANDARD_TARGET_SIZE
CHAIN_ERROR_SIZE = CHAIN_START_SIZE

# (name, revision) -> data struct; the revisions iptables-legacy 1.8 picks on current kernels
# (the highest both know): multiport, iprange and mark have an older layout at revision 0.
MATCH_STRUCTS: dict[tuple[str, int], type[ctypes.Structure]] = {
    ("tcp", 0): XtTcp,
    ("udp", 0): XtUdp,
    ("icmp", 0): IptIcmp,
    ("multiport", 1): XtMultiportV1,
    ("iprange", 1): XtIprangeMtinfo,
    ("length", 0): XtLengthInfo,
    ("ttl", 0): IptTtlInfo,
    ("pkttype", 0): XtPkttypeInfo,
    ("mark", 1): XtMarkMtinfo1,
    ("comment", 0): XtCommentInfo,
}
_SUPPORTED_MATCHES = ", ".join(f"{name} (revision {rev})" for name, rev in MATCH_STRUCTS)
PacketType = Literal["unicast", "broadcast", "multicast", "otherhost"]
_PKT_TYPE_NAMES: dict[int, PacketType] = {
    0: "unicast",
    1: "broadcast",
    2: "multicast",
    3: "otherhost",
}
assert {name: number for number, name in _PKT_TYPE_NAMES.items()} == PKT_TYPES
_MULTIPORT_FLAGS: dict[Literal["src", "dst", "any"], int] = {
    "src": XT_MULTIPORT_SOURCE,
    "dst": XT_MULTIPORT_DESTINATION,
    "any": XT_MULTIPORT_EITHER,
}
_MULTIPORT_DIRECTIONS = {flag: direction for direction, flag in _MULTIPORT_FLAGS.items()}
_TTL_MODES: dict[tuple[Literal["eq", "lt", "gt"], bool], int] = {
    ("eq", False): IPT_TTL_EQ,
    ("eq", True): IPT_TTL_NE,
    ("lt", False): IPT_TTL_LT,
    ("gt", False): IPT_TTL_GT,
}
_TTL_OPS = {mode: op for op, mode in _TTL_MODES.items()}
_VERDICTS: dict[int, Target] = {
    VERDICT_ACCEPT: Accept(),
    VERDICT_DROP: Drop(),
    XT_RETURN: Return(),
}


@dataclass(frozen=True, slots=True)
class TableInfo:
    """struct ipt_getinfo: where each hook's chain starts and where its policy entry is."""

    name: str
    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    size: int


# ---------------------------------------------------------------------------------------------
# Encoding


def _name_bytes(text: str, size: int, what: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    # The kernel reads these as NUL-terminated strings: keep room for the NUL.
    if len(data) >= size or b"\0" in data:
        raise BlobError(f"{what} '{text}' does not fit the kernel's {size}-byte field")
    return data


def _ipv4_bytes(value: int) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * 4)(*value.to_bytes(4, "big"))


def _set_interface(ip: IptIp, match: Interface) -> None:
    name = _name_bytes(match.name, IFNAMSIZ, "interface name")
    # xtables_parse_interface: a wildcard's mask covers the prefix before `+` (so `+` alone
    # is an all-zero mask, any device); an exact name's mask covers its NUL terminator too.
    covered = len(name) - 1 if match.wildcard else len(name) + 1
    mask = (ctypes.c_uint8 * IFNAMSIZ)(*([0xFF] * covered))
    if match.direction == "in":
        ip.iniface, ip.iniface_mask = name, mask
        ip.invflags |= IPT_INV_VIA_IN if match.negated else 0
    else:
        ip.outiface, ip.outiface_mask = name, mask
        ip.invflags |= IPT_INV_VIA_OUT if match.negated else 0


def _encode_ip(rule: Rule) -> tuple[IptIp, list[Match]]:
    """The ipt_ip part of `rule` and its other matches, in order."""
    ip = IptIp()
    extensions: list[Match] = []
    for match in rule.matches:
        if isinstance(match, Address):
            if match.direction == "src":
                ip.src, ip.smsk = _ipv4_bytes(match.address), _ipv4_bytes(match.mask)
                ip.invflags |= IPT_INV_SRCIP if match.negated else 0
            else:
                ip.dst, ip.dmsk = _ipv4_bytes(match.address), _ipv4_bytes(match.mask)
                ip.invflags |= IPT_INV_DSTIP if match.negated else 0
        elif isinstance(match, Interface):
            _set_interface(ip, match)
        elif isinstance(match, Protocol):
            ip.proto = match.number
            ip.invflags |= IPT_INV_PROTO if match.negated else 0
        elif isinstance(match, Fragment):
            ip.flags |= IPT_F_FRAG
            ip.invflags |= IPT_INV_FRAG if match.negated else 0
        else:
            extensions.append(match)
    return ip, extensions


def _ports(ports: PortRange) -> ctypes.Array[ctypes.c_uint16]:
    return (ctypes.c_uint16 * 2)(ports.first, ports.last)


def _encode_match_data(match: Match) -> tuple[str, int, ctypes.Structure]:
    """(name, revision, data) of one match extension, as libxt_NAME fills it in."""
    if isinstance(match, TcpMatch):
        inv = (
            (XT_TCP_INV_SRCPT if match.sport.negated else 0)
            | (XT_TCP_INV_DSTPT if match.dport.negated else 0)
            | (XT_TCP_INV_FLAGS if match.flags.negated else 0)
        )
        tcp = XtTcp(
            _ports(match.sport), _ports(match.dport), 0, match.flags.mask, match.flags.compare, inv
        )
        return "tcp", 0, tcp
    if isinstance(match, UdpMatch):
        inv = (XT_UDP_INV_SRCPT if match.sport.negated else 0) | (
            XT_UDP_INV_DSTPT if match.dport.negated else 0
        )
        return "udp", 0, XtUdp(_ports(match.sport), _ports(match.dport), inv)
    if isinstance(match, IcmpMatch):
        codes = (ctypes.c_uint8 * 2)(match.code_min, match.code_max)
        return "icmp", 0, IptIcmp(match.type, codes, IPT_ICMP_INV if match.negated else 0)
    if isinstance(match, Multiport):
        # libxt_multiport parse_multi_ports_v1: a range takes two slots, its first flagged.
        info = XtMultiportV1(flags=_MULTIPORT_FLAGS[match.direction], invert=match.negated)
        slot = 0
        for first, last in match.ports:
            if slot + (1 if first == last else 2) > XT_MULTI_PORTS:
                raise BlobError(f"multiport: more than {XT_MULTI_PORTS} port slots")
            info.ports[slot] = first
            if first != last:
                info.pflags[slot] = 1
                slot += 1
                info.ports[slot] = last
            slot += 1
        info.count = slot
        return "multiport", 1, info
    if isinstance(match, IpRange):
        info = XtIprangeMtinfo()
        for side, present, inverted in (
            ("src", IPRANGE_SRC, IPRANGE_SRC_INV),
            ("dst", IPRANGE_DST, IPRANGE_DST_INV),
        ):
            bounds: AddressRange | None = getattr(match, side)
            if bounds is None:
                continue
            info.flags |= present | (inverted if bounds.negated else 0)
            # union nf_inet_addr: an IPv4 address is its first four bytes, network order.
            getattr(info, f"{side}_min").bytes[:4] = list(bounds.first.to_bytes(4, "big"))
            getattr(info, f"{side}_max").bytes[:4] = list(bounds.last.to_bytes(4, "big"))
        return "iprange", 1, info
    if isinstance(match, Length):
        return "length", 0, XtLengthInfo(match.min, match.max, match.negated)
    if isinstance(match, Ttl):
        mode = _TTL_MODES.get((match.op, match.negated))
        if mode is None:
            raise BlobError(f"ttl: --ttl-{match.op} cannot be negated")
        return "ttl", 0, IptTtlInfo(mode, match.value)
    if isinstance(match, PktType):
        return "pkttype", 0, XtPkttypeInfo(PKT_TYPES[match.type], int(match.negated))
    if isinstance(match, Mark):
        return "mark", 1, XtMarkMtinfo1(match.value, match.mask, match.negated)
    if isinstance(match, Comment):
        text = _name_bytes(match.text, XT_MAX_COMMENT_LEN, "comment")
        return "comment", 0, XtCommentInfo(text)
    raise BlobError(f"cannot encode match {match!r}")


def _extension(name: str, revision: int, data: bytes) -> bytes:
    size = MATCH_HEADER_SIZE + xt_align(len(data))
    header = XtEntryMatch()
    header.u.user.size = size
    header.u.user.name = name.encode()
    header.u.user.revision = revision
    return bytes(header) + data.ljust(size - MATCH_HEADER_SIZE, b"\0")


def _standard_target(verdict: int) -> bytes:
    return _extension(STANDARD_TARGET, 0, bytes(ctypes.c_int(verdict)))


def _error_target(name: str) -> bytes:
    errorname = _name_bytes(name, XT_FUNCTION_MAXNAMELEN, "chain name")
    return _extension(ERROR_TARGET, 0, errorname.ljust(XT_FUNCTION_MAXNAMELEN, b"\0"))


def _entry(ip: IptIp, matches: bytes, target: bytes, counters: tuple[int, int]) -> bytes:
    entry = IptEntry(ip=ip)
    entry.target_offset = ENTRY_SIZE + len(matches)
    entry.next_offset = entry.target_offset + len(target)
    entry.counters.pcnt, entry.counters.bcnt = counters
    return bytes(entry) + matches + target


@dataclass(slots=True)
class _PlacedRule:
    rule: Rule
    ip: IptIp  # without the goto flag, which needs the layout
    matches: bytes
    offset: int = 0

    @property
    def size(self) -> int:
        return ENTRY_SIZE + len(self.matches) + STANDARD_TARGET_SIZE


@dataclass(slots=True)
class _PlacedChain:
    chain: Chain
    rules: list[_PlacedRule]
    head: int = 0  # offset of a user chain's ERROR entry
    foot: int = 0  # offset of the policy (built-in) or RETURN (user) entry

    @property
    def entry(self) -> int:
        """Where the hook or a jump enters: the first rule, or the foot when there is none."""
        if not self.chain.builtin:
            return self.head + CHAIN_START_SIZE
        return self.rules[0].offset if self.rules else self.foot


def _ordered_chains(ruleset: Ruleset) -> list[Chain]:
    builtins = [ruleset.chains[name] for name in BUILTIN_CHAINS]
    # libiptc keeps user chains sorted by strcmp, i.e. bytewise.
    users = sorted(ruleset.user_chains, key=lambda chain: chain.name.encode("utf-8"))
    return builtins + users


def _layout(ruleset: Ruleset) -> tuple[list[_PlacedChain], int, int]:
    """Every chain and rule with its offset (libiptc's first compile pass), the size of the
    entries and their number."""
    placed: list[_PlacedChain] = []
    offset = count = 0
    for chain in _ordered_chains(ruleset):
        rules: list[_PlacedRule] = []
        for rule in chain.rules:
            ip, extensions = _encode_ip(rule)
            matches = b"".join(
                _extension(name, revision, bytes(data))
                for name, revision, data in map(_encode_match_data, extensions)
            )
            rules.append(_PlacedRule(rule, ip, matches))
        item = _PlacedChain(chain, rules)
        if not chain.builtin:
            item.head = offset
            offset += CHAIN_START_SIZE
            count += 1
        for placed_rule in rules:
            placed_rule.offset = offset
            offset += placed_rule.size
            count += 1
        item.foot = offset
        offset += CHAIN_FOOT_SIZE
        count += 1
        placed.append(item)
    return placed, offset + CHAIN_ERROR_SIZE, count + 1


def _verdict(placed: _PlacedRule, entries: dict[str, int]) -> tuple[int, int]:
    """(verdict, extra ipt_ip flags) of a rule's standard target."""
    target = placed.rule.target
    if target is None:
        # libiptc's IPTCC_R_FALLTHROUGH: continue with the next entry.
        return placed.offset + placed.size, 0
    if isinstance(target, Accept):
        return VERDICT_ACCEPT, 0
    if isinstance(target, Drop):
        return VERDICT_DROP, 0
    if isinstance(target, Return):
        return XT_RETURN, 0
    return entries[target.chain], IPT_F_GOTO if isinstance(target, Goto) else 0


def _encode_entries(placed: list[_PlacedChain]) -> bytes:
    entries = {item.chain.name: item.entry for item in placed}
    parts: list[bytes] = []
    for item in placed:
        chain = item.chain
        if not chain.builtin:
            parts.append(_entry(IptIp(), b"", _error_target(chain.name), (0, 0)))
        for rule in item.rules:
            verdict, flags = _verdict(rule, entries)
            rule.ip.flags |= flags
            counters = (rule.rule.packets, rule.rule.bytes)
            parts.append(_entry(rule.ip, rule.matches, _standard_target(verdict), counters))
        if chain.builtin:
            verdict = VERDICT_ACCEPT if chain.policy == "ACCEPT" else VERDICT_DROP
            foot = (chain.packets, chain.bytes)
        else:
            verdict, foot = XT_RETURN, (0, 0)
        parts.append(_entry(IptIp(), b"", _standard_target(verdict), foot))
    parts.append(_entry(IptIp(), b"", _error_target(ERROR_TARGET), (0, 0)))
    return b"".join(parts)


def encode_counters(ruleset: Ruleset) -> list[tuple[int, int]]:
    """(packets, bytes) for every entry of the encoded table, in table order: each rule's,
    each policy's, and zero for the ERROR and user-chain RETURN entries."""
    counters: list[tuple[int, int]] = []
    for chain in _ordered_chains(ruleset):
        if not chain.builtin:
            counters.append((0, 0))
        counters.extend((rule.packets, rule.bytes) for rule in chain.rules)
        counters.append((chain.packets, chain.bytes) if chain.builtin else (0, 0))
    counters.append((0, 0))
    return counters


def encode_table(ruleset: Ruleset) -> bytes:
    """The struct ipt_replace (header then entries) for `ruleset`, byte for byte what
    `iptables-legacy-restore -c` hands the kernel, except `num_counters` and the `counters`
    pointer (zero here), which only the kernel call needs.

    Raises RuleError (from the model's `validate`) for a rule set iptables would refuse and
    BlobError for one the kernel's fields cannot hold."""
    validate(ruleset)
    placed, size, num_entries = _layout(ruleset)
    header = IptReplace(name=TABLE_NAME.encode(), valid_hooks=FILTER_VALID_HOOKS)
    header.num_entries = num_entries
    header.size = size
    by_name = {item.chain.name: item for item in placed}
    for hook, name in HOOKS:
        header.hook_entry[hook] = by_name[name].entry
        header.underflow[hook] = by_name[name].foot
    entries = _encode_entries(placed)
    assert len(entries) == size
    return bytes(header) + entries


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, slots=True)
class _Extension:
    offset: int
    name: str
    revision: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    entry: IptEntry
    matches: tuple[_Extension, ...]
    target: _Extension

    @property
    def unconditional(self) -> bool:
        # The kernel's unconditional(): an all-zero ipt_ip and no matches.
        return not self.matches and bytes(self.entry.ip) == bytes(IptIp())

    @property
    def end(self) -> int:
        return self.offset + self.entry.next_offset


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _read_extension(entries: bytes, offset: int, limit: int, what: str, entry: int) -> _Extension:
    if offset + MATCH_HEADER_SIZE > limit:
        raise BlobError(f"{what} header runs past the end of the entry", entry)
    header = XtEntryMatch.from_buffer_copy(entries, offset)
    size = header.u.user.size
    if size < MATCH_HEADER_SIZE or offset + size > limit:
        raise BlobError(f"{what} size {size} does not fit the entry", entry)
    name = _cstring(bytes(entries[offset + 2 : offset + 2 + XT_EXTENSION_MAXNAMELEN]))
    data = bytes(entries[offset + MATCH_HEADER_SIZE : offset + size])
    return _Extension(offset, name, header.u.user.revision, data)


def _split_entries(entries: bytes) -> Iterator[_Entry]:
    offset = 0
    while offset < len(entries):
        if offset + ENTRY_SIZE > len(entries):
            raise BlobError("entry header runs past the end of the table", offset)
        entry = IptEntry.from_buffer_copy(entries, offset)
        target_offset, next_offset = entry.target_offset, entry.next_offset
        if not ENTRY_SIZE <= target_offset <= next_offset - MATCH_HEADER_SIZE:
            raise BlobError(
                f"bad target_offset {target_offset} for next_offset {next_offset}", offset
            )
        if offset + next_offset > len(entries) or next_offset % XT_ALIGNMENT:
            raise BlobError(f"bad next_offset {next_offset}", offset)
        matches: list[_Extension] = []
        position = offset + ENTRY_SIZE
        while position < offset + target_offset:
            match = _read_extension(entries, position, offset + target_offset, "match", offset)
            matches.append(match)
            position += len(match.data) + MATCH_HEADER_SIZE
        target = _read_extension(
            entries, offset + target_offset, offset + next_offset, "target", offset
        )
        yield _Entry(offset, entry, tuple(matches), target)
        offset += next_offset


def _struct_from(
    extension: _Extension, struct: type[ctypes.Structure], what: str, entry: int
) -> ctypes.Structure:
    if len(extension.data) != xt_align(ctypes.sizeof(struct)):
        raise BlobError(
            f"{what} has {len(extension.data)} bytes of data, expected"
            f" {xt_align(ctypes.sizeof(struct))}",
            entry,
        )
    return struct.from_buffer_copy(extension.data)


def _verdict_of(entry: _Entry) -> int | None:
    """The verdict of a standard target, None for any other target."""
    target = entry.target
    if target.name != STANDARD_TARGET:
        return None
    if len(target.data) < ctypes.sizeof(ctypes.c_int):
        raise BlobError("standard target too short for its verdict", entry.offset)
    return ctypes.c_int.from_buffer_copy(target.data).value


def _field_bytes(struct: ctypes.Structure, name: str) -> bytes:
    # A c_char array field reads back cut at its first NUL: take the raw bytes instead.
    descriptor = getattr(type(struct), name)
    return bytes(struct)[descriptor.offset : descriptor.offset + descriptor.size]


_ADDRESS_FIELDS: tuple[tuple[Literal["src", "dst"], str, str, int], ...] = (
    ("src", "src", "smsk", IPT_INV_SRCIP),
    ("dst", "dst", "dmsk", IPT_INV_DSTIP),
)
_INTERFACE_FIELDS: tuple[tuple[Literal["in", "out"], str, int], ...] = (
    ("in", "iniface", IPT_INV_VIA_IN),
    ("out", "outiface", IPT_INV_VIA_OUT),
)


def _interface(
    direction: Literal["in", "out"], name: bytes, mask: bytes, negated: bool
) -> Interface | None:
    if mask[0] == 0:
        # An empty mask matches every device: only its negation is worth keeping (it never
        # matches), which the parser writes as `! -i +`.
        return Interface(direction, "+", True) if negated else None
    # iptables-save's print_iface: the name under the mask, and `+` when the mask stops
    # before the name's NUL.
    text = bytearray()
    for index in range(IFNAMSIZ):
        if mask[index]:
            if name[index]:
                text.append(name[index])
        else:
            if name[index - 1]:
                text.extend(b"+")
            break
    return Interface(direction, text.decode("utf-8", "surrogateescape"), negated)


def _decode_ip(entry: _Entry) -> list[Match]:
    ip = entry.entry.ip
    if ip.flags & ~IPT_F_MASK or ip.invflags & ~IPT_INV_MASK:
        raise BlobError(
            f"unknown ipt_ip flags 0x{ip.flags:02x} or invflags 0x{ip.invflags:02x}", entry.offset
        )
    if ip.invflags & IPT_INV_TOS:
        raise BlobError("the TOS inversion flag is set, which iptables never does", entry.offset)
    inv = ip.invflags
    matches: list[Match] = []
    for side, address_field, mask_field, flag in _ADDRESS_FIELDS:
        mask = int.from_bytes(_field_bytes(ip, mask_field), "big")
        if mask or inv & flag:
            address = int.from_bytes(_field_bytes(ip, address_field), "big")
            matches.append(Address(side, address, mask, bool(inv & flag)))
    for direction, field, flag in _INTERFACE_FIELDS:
        name = _field_bytes(ip, field)
        interface = _interface(direction, name, _field_bytes(ip, f"{field}_mask"), bool(inv & flag))
        if interface is not None:
            matches.append(interface)
    if ip.proto or inv & IPT_INV_PROTO:
        if ip.proto > 0xFF:
            raise BlobError(f"protocol {ip.proto} is not an IP protocol number", entry.offset)
        matches.append(Protocol(ip.proto, bool(inv & IPT_INV_PROTO)))
    if ip.flags & IPT_F_FRAG:
        matches.append(Fragment(bool(inv & IPT_INV_FRAG)))
    return matches


def _port_range(ports: Sequence[int], negated: bool) -> PortRange:
    return PortRange(ports[0], ports[1], negated)


def _ipv4(address: NfInetAddr) -> int:
    return int.from_bytes(bytes(address.bytes[:4]), "big")


def _decode_match(extension: _Extension, entry: int) -> Match:
    key = (extension.name, extension.revision)
    struct = MATCH_STRUCTS.get(key)
    if struct is None:
        revisions = [rev for name, rev in MATCH_STRUCTS if name == extension.name]
        if revisions:
            raise BlobError(
                f"match '{extension.name}' revision {extension.revision} is not supported"
                f" (only revision {revisions[0]}, the one iptables-legacy uses)",
                entry,
            )
        raise BlobError(
            f"match '{extension.name}' is not supported (supported: {_SUPPORTED_MATCHES})", entry
        )
    info = _struct_from(extension, struct, f"match '{extension.name}'", entry)
    if isinstance(info, XtTcp):
        if info.option or info.invflags & XT_TCP_INV_OPTION:
            raise BlobError("tcp match: --tcp-option is not supported", entry)
        if info.invflags & ~XT_TCP_INV_MASK:
            raise BlobError(f"tcp match: unknown invflags 0x{info.invflags:02x}", entry)
        return TcpMatch(
            _port_range(info.spts, bool(info.invflags & XT_TCP_INV_SRCPT)),
            _port_range(info.dpts, bool(info.invflags & XT_TCP_INV_DSTPT)),
            TcpFlags(info.flg_mask, info.flg_cmp, bool(info.invflags & XT_TCP_INV_FLAGS)),
        )
    if isinstance(info, XtUdp):
        if info.invflags & ~XT_UDP_INV_MASK:
            raise BlobError(f"udp match: unknown invflags 0x{info.invflags:02x}", entry)
        return UdpMatch(
            _port_range(info.spts, bool(info.invflags & XT_UDP_INV_SRCPT)),
            _port_range(info.dpts, bool(info.invflags & XT_UDP_INV_DSTPT)),
        )
    if isinstance(info, IptIcmp):
        return IcmpMatch(info.type, info.code[0], info.code[1], bool(info.invflags & IPT_ICMP_INV))
    if isinstance(info, XtMultiportV1):
        return _decode_multiport(info, entry)
    if isinstance(info, XtIprangeMtinfo):
        sides: dict[str, AddressRange | None] = {"src": None, "dst": None}
        for side, present, inverted in (
            ("src", IPRANGE_SRC, IPRANGE_SRC_INV),
            ("dst", IPRANGE_DST, IPRANGE_DST_INV),
        ):
            if info.flags & present:
                first = _ipv4(getattr(info, f"{side}_min"))
                last = _ipv4(getattr(info, f"{side}_max"))
                sides[side] = AddressRange(first, last, bool(info.flags & inverted))
        if sides["src"] is None and sides["dst"] is None:
            raise BlobError("iprange match has neither a source nor a destination range", entry)
        return IpRange(sides["src"], sides["dst"])
    if isinstance(info, XtLengthInfo):
        return Length(info.min, info.max, bool(info.invert))
    if isinstance(info, IptTtlInfo):
        found = _TTL_OPS.get(info.mode)
        if found is None:
            raise BlobError(f"ttl match: unknown mode {info.mode}", entry)
        return Ttl(found[0], info.ttl, found[1])
    if isinstance(info, XtPkttypeInfo):
        name = _PKT_TYPE_NAMES.get(info.pkttype)
        if name is None:
            raise BlobError(
                f"pkttype match: packet type {info.pkttype} is not one of"
                " unicast, broadcast, multicast, otherhost",
                entry,
            )
        return PktType(name, bool(info.invert))
    if isinstance(info, XtMarkMtinfo1):
        return Mark(info.mark, info.mask, bool(info.invert))
    assert isinstance(info, XtCommentInfo)
    return Comment(_cstring(_field_bytes(info, "comment")))


def _decode_multiport(info: XtMultiportV1, entry: int) -> Multiport:
    direction = _MULTIPORT_DIRECTIONS.get(info.flags)
    if direction is None:
        raise BlobError(f"multiport match: unknown flags {info.flags}", entry)
    if info.count > XT_MULTI_PORTS:
        raise BlobError(f"multiport match: {info.count} ports, {XT_MULTI_PORTS} max", entry)
    ports: list[tuple[int, int]] = []
    slot = 0
    while slot < info.count:
        # The kernel reads a range from a flagged slot and the next one.
        if info.pflags[slot] and slot + 1 < info.count:
            ports.append((info.ports[slot], info.ports[slot + 1]))
            slot += 2
        else:
            ports.append((info.ports[slot], info.ports[slot]))
            slot += 1
    return Multiport(direction, tuple(ports), bool(info.invert))


def _decode_target(entry: _Entry, chain_starts: dict[int, str]) -> Target | None:
    target = entry.target
    if target.name == ERROR_TARGET:
        raise BlobError("an ERROR entry in the middle of a chain", entry.offset)
    verdict = _verdict_of(entry)
    if verdict is None:
        raise BlobError(
            f"target '{target.name}' is not supported"
            " (supported: ACCEPT, DROP, RETURN, jumps and gotos to user chains)",
            entry.offset,
        )
    goto = bool(entry.entry.ip.flags & IPT_F_GOTO)
    if verdict < 0:
        found = _VERDICTS.get(verdict)
        if found is None:
            name = "QUEUE" if verdict == VERDICT_QUEUE else f"verdict {verdict}"
            raise BlobError(f"{name} is not supported", entry.offset)
        if goto:
            raise BlobError(f"goto flag on a {type(found).__name__} verdict", entry.offset)
        return found
    if verdict == entry.end and not goto:
        return None
    chain = chain_starts.get(verdict)
    if chain is None:
        raise BlobError(
            f"jumps to offset {verdict}, which is not the start of a user chain",
            entry.offset,
        )
    return Goto(chain) if goto else Jump(chain)


def _policy(entry: _Entry, chain: Chain) -> None:
    verdict = _verdict_of(entry)
    if not entry.unconditional or verdict not in (VERDICT_ACCEPT, VERDICT_DROP):
        raise BlobError(
            f"the policy entry of {chain.name} is not an unconditional ACCEPT or DROP",
            entry.offset,
        )
    chain.policy = "ACCEPT" if verdict == VERDICT_ACCEPT else "DROP"
    chain.packets = entry.entry.counters.pcnt
    chain.bytes = entry.entry.counters.bcnt


def _error_name(entry: _Entry) -> str:
    data = entry.target.data
    return _cstring(data[:XT_FUNCTION_MAXNAMELEN])


def decode_entries(
    entries: bytes,
    hook_entry: Sequence[int],
    underflow: Sequence[int],
    valid_hooks: int = FILTER_VALID_HOOKS,
    num_entries: int | None = None,
) -> Ruleset:
    """The Ruleset of a filter table's entries, given where each hook starts and where its
    policy entry is (from ipt_getinfo or ipt_replace). Rule and policy counters come from the
    entries. Raises BlobError for anything the model cannot hold or that is not laid out as
    libiptc lays tables out."""
    if valid_hooks != FILTER_VALID_HOOKS:
        raise BlobError(
            f"valid hooks 0x{valid_hooks:x} are not the filter table's"
            f" 0x{FILTER_VALID_HOOKS:x} (INPUT, FORWARD, OUTPUT)"
        )
    parsed = list(_split_entries(entries))
    if num_entries is not None and num_entries != len(parsed):
        raise BlobError(f"the table says {num_entries} entries but holds {len(parsed)}")
    if not parsed or parsed[-1].target.name != ERROR_TARGET or _error_name(parsed[-1]) != "ERROR":
        raise BlobError("the table does not end with the ERROR entry")
    starts = {hook_entry[hook]: name for hook, name in HOOKS}
    policies = {name: underflow[hook] for hook, name in HOOKS}
    if len(starts) != len(HOOKS):
        raise BlobError("two built-in chains start at the same entry")
    offsets = {entry.offset for entry in parsed}
    for hook, name in HOOKS:
        if hook_entry[hook] not in offsets or underflow[hook] not in offsets:
            raise BlobError(f"the entry or policy offset of {name} is not an entry boundary")

    # First pass: user chains, so that jumps forward and backward resolve alike.
    chain_starts: dict[int, str] = {}
    user_names: list[tuple[int, str]] = []
    seen_names: set[str] = set()
    for entry in parsed[:-1]:
        if entry.target.name == ERROR_TARGET:
            name = _error_name(entry)
            if name in BUILTIN_CHAINS or name in seen_names:
                raise BlobError(f"chain name '{name}' appears twice", entry.offset)
            user_names.append((entry.offset, name))
            seen_names.add(name)
            chain_starts[entry.end] = name

    ruleset = Ruleset()
    for _, name in user_names:
        ruleset.chains[name] = Chain(name)
    current: Chain | None = None
    finished: set[str] = set()
    for index, entry in enumerate(parsed[:-1]):
        if entry.offset in starts:
            if current is not None:
                raise BlobError(
                    f"chain {current.name} runs into the start of {starts[entry.offset]}",
                    entry.offset,
                )
            current = ruleset.chains[starts[entry.offset]]
        if entry.target.name == ERROR_TARGET:
            if current is not None:
                raise BlobError(f"chain {current.name} has no end", entry.offset)
            if not entry.unconditional:
                raise BlobError("a user chain's ERROR entry has matches", entry.offset)
            current = ruleset.chains[_error_name(entry)]
            continue
        if current is None:
            raise BlobError("the entry belongs to no chain", entry.offset)
        if current.builtin and entry.offset == policies[current.name]:
            _policy(entry, current)
            finished.add(current.name)
            current = None
            continue
        if not current.builtin and parsed[index + 1].target.name == ERROR_TARGET:
            # libiptc ends each user chain with an unconditional RETURN before the next ERROR.
            if not entry.unconditional or _verdict_of(entry) != XT_RETURN:
                raise BlobError(
                    f"user chain {current.name} does not end with an unconditional RETURN",
                    entry.offset,
                )
            current = None
            continue
        try:
            matches = _decode_ip(entry)
            matches.extend(_decode_match(match, entry.offset) for match in entry.matches)
            target = _decode_target(entry, chain_starts)
        except BlobError as error:
            where = f"chain {current.name} rule {len(current.rules) + 1}"
            raise BlobError(f"{where}: {error.message}", entry.offset) from None
        counters = entry.entry.counters
        current.rules.append(Rule(tuple(matches), target, counters.pcnt, counters.bcnt))
    if current is not None:
        raise BlobError(f"chain {current.name} has no end before the final ERROR entry")
    for _, name in HOOKS:
        if name not in finished:
            raise BlobError(f"built-in chain {name} has no policy entry")
    return ruleset


def decode_table(blob: bytes) -> Ruleset:
    """The Ruleset of a struct ipt_replace blob, as encode_table makes it."""
    header_size = ctypes.sizeof(IptReplace)
    if len(blob) < header_size:
        raise BlobError(f"an ipt_replace blob is at least {header_size} bytes, got {len(blob)}")
    header = IptReplace.from_buffer_copy(blob)
    if len(blob) != header_size + header.size:
        raise BlobError(
            f"the ipt_replace header says {header.size} bytes of entries, got"
            f" {len(blob) - header_size}"
        )
    return decode_entries(
        blob[header_size:],
        tuple(header.hook_entry),
        tuple(header.underflow),
        header.valid_hooks,
        header.num_entries,
    )


# ---------------------------------------------------------------------------------------------
# The kernel: getsockopt/setsockopt on a raw socket in the calling thread's namespace.

_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_getsockopt.restype = ctypes.c_int
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_setsockopt.restype = ctypes.c_int


def kernel_error(action: str, number: int) -> BlobError:
    """One sentence for an errno from the ip_tables socket options."""
    if number in (errno.EPERM, errno.EACCES):
        return BlobError(f"{action} needs root (CAP_NET_ADMIN)")
    if number == errno.ENOPROTOOPT:
        return BlobError(
            f"{action} failed: this kernel has no legacy iptables (load the ip_tables module)"
        )
    if number == errno.ENOENT:
        return BlobError(
            f"{action} failed: there is no filter table in this network namespace, or the"
            " kernel lacks a match or target module the table uses (ENOENT); running"
            " `iptables-legacy -L -n` in the namespace loads iptable_filter"
        )
    if number == errno.ELOOP:
        return BlobError(f"{action} failed: the kernel found a loop among the chains (ELOOP)")
    if number == errno.EINVAL:
        return BlobError(f"{action} failed: the kernel refused the table as malformed (EINVAL)")
    return BlobError(f"{action} failed: {os.strerror(number)} ({errno.errorcode.get(number)})")


def _open_socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as error:
        raise kernel_error("opening a raw socket for the filter table", error.errno or 0) from None


def _get(sock: socket.socket, option: int, buffer: ctypes.Array[ctypes.c_char]) -> int:
    """getsockopt with `buffer` as input and output; the errno on failure, else 0."""
    length = ctypes.c_uint32(len(buffer))
    if _getsockopt(sock.fileno(), SOL_IP, option, buffer, ctypes.byref(length)) != 0:
        return ctypes.get_errno()
    return 0


def _get_info(sock: socket.socket) -> TableInfo:
    request = IptGetinfo(name=TABLE_NAME.encode())
    buffer = ctypes.create_string_buffer(bytes(request), ctypes.sizeof(request))
    number = _get(sock, IPT_SO_GET_INFO, buffer)
    if number:
        raise kernel_error("reading the filter table's info (IPT_SO_GET_INFO)", number)
    info = IptGetinfo.from_buffer_copy(buffer.raw)
    return TableInfo(
        _cstring(_field_bytes(info, "name")),
        info.valid_hooks,
        tuple(info.hook_entry),
        tuple(info.underflow),
        info.num_entries,
        info.size,
    )


def read_entries(sock: socket.socket | None = None) -> tuple[TableInfo, bytes]:
    """The live filter table of the calling thread's namespace (or of `sock`'s): its
    ipt_getinfo and its entries exactly as IPT_SO_GET_ENTRIES returns them."""
    own = sock is None
    sock = _open_socket() if sock is None else sock
    try:
        for _ in range(READ_ATTEMPTS):
            info = _get_info(sock)
            header_size = ctypes.sizeof(IptGetEntries)
            request = IptGetEntries(name=TABLE_NAME.encode(), size=info.size)
            buffer = ctypes.create_string_buffer(bytes(request), header_size + info.size)
            number = _get(sock, IPT_SO_GET_ENTRIES, buffer)
            if number == errno.EAGAIN:
                continue  # replaced between the two calls: its size changed
            if number:
                raise kernel_error("reading the filter table (IPT_SO_GET_ENTRIES)", number)
            return info, buffer.raw[header_size:]
        raise BlobError(
            f"the filter table kept changing while being read ({READ_ATTEMPTS} attempts)"
        )
    finally:
        if own:
            sock.close()


def read_table(sock: socket.socket | None = None) -> Ruleset:
    """The live filter table of the calling thread's network namespace (or of the namespace
    `sock`, a raw AF_INET socket, was created in), with rule and policy counters."""
    info, entries = read_entries(sock)
    return decode_entries(
        entries, info.hook_entry, info.underflow, info.valid_hooks, info.num_entries
    )


def write_table(ruleset: Ruleset, sock: socket.socket | None = None) -> None:
    """Replace the filter table of the calling thread's namespace (or `sock`'s) with
    `ruleset`, then set every rule's and policy's counters from the model, as
    `iptables-legacy-restore -c` does. Raises RuleError for a rule set iptables would refuse,
    BlobError when the kernel refuses."""
    # Encode first: a rule set we refuse never reaches the kernel.
    blob = bytearray(encode_table(ruleset))
    own = sock is None
    sock = _open_socket() if sock is None else sock
    try:
        old = _get_info(sock)
        # The kernel hands back the old table's counters here; libiptc uses them to carry
        # counters over, we only need room for them.
        old_counters = (XtCounters * max(old.num_entries, 1))()
        header = IptReplace.from_buffer(blob)
        header.num_counters = old.num_entries
        header.counters = ctypes.addressof(old_counters)
        buffer = (ctypes.c_char * len(blob)).from_buffer(blob)
        if _setsockopt(sock.fileno(), SOL_IP, IPT_SO_SET_REPLACE, buffer, len(blob)) != 0:
            raise kernel_error(
                "replacing the filter table (IPT_SO_SET_REPLACE)", ctypes.get_errno()
            )
        counters = encode_counters(ruleset)
        info = XtCountersInfo(name=TABLE_NAME.encode(), num_counters=len(counters))
        values = (XtCounters * len(counters))(*counters)
        payload = bytes(info) + bytes(values)
        counters_buffer = ctypes.create_string_buffer(payload, len(payload))
        if _setsockopt(
            sock.fileno(), SOL_IP, IPT_SO_SET_ADD_COUNTERS, counters_buffer, len(payload)
        ):
            raise kernel_error(
                "setting the filter table's counters (IPT_SO_SET_ADD_COUNTERS)", ctypes.get_errno()
            )
    finally:
        if own:
            sock.close()
