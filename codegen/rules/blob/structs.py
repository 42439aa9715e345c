"""The UAPI of the kernel's IPv4 filter table, as ctypes mirrors of
<linux/netfilter_ipv4/ip_tables.h> and <linux/netfilter/x_tables.h>: the entry, the match and
target headers, the standard and ERROR targets, the getsockopt/setsockopt requests, and the
error every blob layer raises. Each match extension keeps its own data struct in its module
(codegen.rules.extensions). ctypes lays the structs out with the C compiler's rules for this
machine, which is what the kernel expects from a native (not compat) process; the unit tests
compare their sizes and offsets with what a C compiler says about the headers.
"""

from __future__ import annotations

import ctypes

from codegen.rules.names import BUILTIN_CHAINS

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


class NfInetAddr(ctypes.Union):
    """union nf_inet_addr (<linux/netfilter.h>), shared by the payloads of several matches:
    an IPv4 address is its first four bytes, in network order."""

    _fields_ = [("all", ctypes.c_uint32 * 4), ("bytes", ctypes.c_uint8 * 16)]


def ipv4_of(address: NfInetAddr) -> int:
    return int.from_bytes(bytes(address.bytes[:4]), "big")


def set_ipv4(address: NfInetAddr, value: int) -> None:
    address.bytes[:4] = list(value.to_bytes(4, "big"))


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


ENTRY_SIZE = ctypes.sizeof(IptEntry)
MATCH_HEADER_SIZE = ctypes.sizeof(XtEntryMatch)
STANDARD_TARGET_SIZE = xt_align(ctypes.sizeof(XtStandardTarget))
ERROR_TARGET_SIZE = xt_align(ctypes.sizeof(XtErrorTarget))
# libiptc's IPTCB_CHAIN_START_SIZE / IPTCB_CHAIN_FOOT_SIZE / IPTCB_CHAIN_ERROR_SIZE.
CHAIN_START_SIZE = ENTRY_SIZE + ERROR_TARGET_SIZE
CHAIN_FOOT_SIZE = ENTRY_SIZE + STANDARD_TARGET_SIZE
CHAIN_ERROR_SIZE = CHAIN_START_SIZE


def name_bytes(text: str, size: int, what: str) -> bytes:
    """`text` for a NUL-terminated char field of `size` bytes; BlobError if it does not fit."""
    data = text.encode("utf-8", "surrogateescape")
    # The kernel reads these as NUL-terminated strings: keep room for the NUL.
    if len(data) >= size or b"\0" in data:
        raise BlobError(f"{what} '{text}' does not fit the kernel's {size}-byte field")
    return data


def cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def field_bytes(struct: ctypes.Structure, name: str) -> bytes:
    """The raw bytes of a field: a c_char array field reads back cut at its first NUL."""
    descriptor = getattr(type(struct), name)
    return bytes(struct)[descriptor.offset : descriptor.offset + descriptor.size]
