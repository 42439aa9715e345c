"""The line `-j LOG` writes for an IPv4 packet: nf_log_ip_packet of the kernel's
net/netfilter/nf_log_syslog.c (dump_mac_header, dump_ipv4_packet and its TCP, UDP and ICMP
parts, one level into the packet an ICMP error quotes), as a pure function of what the hook
sees: the packet, the devices, the mark and the rule's Log target.

It lives beside the LOG family's rule-layer module (log.py) because both sides of every
comparison use it: the reference evaluator's fired LOG rules become lines with it, and so do
the records the generated programs write into their ring buffer (codegen.tc.log,
harness.log_reader). It knows nothing of BPF.

The kernel reads every header with skb_header_pointer against skb->len, which on the IP
layer is the datagram as ip_rcv trimmed it to its total length; `LoggedPacket.ip` is those
bytes. The line has no syslog level (the kernel's KERN_SOH prefix): `SYSLOG_LEVELS` names it.
Not modelled: `--log-uid` (a socket's owner; the bytecode backend refuses it), VLAN tags
(VPROTO=/VID=), and SIT tunnels' `TUNNEL=`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from codegen.rules.extensions.log import Log
from codegen.rules.model import Ruleset

# XT_LOG_* bits of Log.flags
TCP_SEQUENCE, TCP_OPTIONS, IP_OPTIONS, UID, MAC_DECODE = 0x01, 0x02, 0x04, 0x08, 0x20
SYSLOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")

_IP_CE, _IP_DF, _IP_MF, _IP_OFFSET = 0x8000, 0x4000, 0x2000, 0x1FFF
_TCP, _UDP, _UDPLITE, _ICMP, _AH, _ESP = 6, 17, 136, 1, 51, 50
# ICMP types and the bytes after the IP header each needs (nf_log_syslog.c's required_len).
_ECHOREPLY, _DEST_UNREACH, _SOURCE_QUENCH, _REDIRECT, _ECHO = 0, 3, 4, 5, 8
_TIME_EXCEEDED, _PARAMETERPROB, _FRAG_NEEDED = 11, 12, 4
_NR_ICMP_TYPES = 18
_REQUIRED = {0: 4, 3: 28, 4: 28, 5: 28, 8: 4, 11: 28, 12: 28, 13: 20, 14: 20, 17: 12, 18: 12}
# TCP flag bits of the header's bytes 12-13 (doff, reserved, AE; then CWR ... FIN)
_TCP_FLAGS = (
    ("AE", 0x0100),
    ("CWR", 0x80),
    ("ECE", 0x40),
    ("URG", 0x20),
    ("ACK", 0x10),
    ("PSH", 0x08),
    ("RST", 0x04),
    ("SYN", 0x02),
    ("FIN", 0x01),
)


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """A packet as the LOG target sees it at its hook.

    `ip`: the IP datagram from its header on, as long as skb->len there: bytes past its total
    length (an Ethernet frame's padding) are cut off, as ip_rcv does. `mac`: the link-layer
    header the frame came with (MAC=, only printed for a packet with an in-device), None if it
    has none; `ethernet`: whether the in-device is an Ethernet one (ARPHRD_ETHER:
    `--log-macdecode` decodes its header). `mark`: skb->mark. `phys_in`, `phys_out`: the
    bridge ports of a packet a bridge handed to iptables (br_netfilter's), "" for none."""

    ip: bytes
    in_device: str = ""
    out_device: str = ""
    mac: bytes | None = None
    ethernet: bool = True
    mark: int = 0
    phys_in: str = ""
    phys_out: str = ""


def log_line(target: Log, packet: LoggedPacket) -> str:
    """The text the kernel's LOG target prints for `packet` (every field ends with a space),
    without the syslog level in front."""
    parts = [f"{target.prefix}IN={packet.in_device} OUT={packet.out_device} "]
    # nf_log_dump_packet_common: a bridge port, unless it is the hook's device itself.
    for name, port, device in (
        ("PHYSIN", packet.phys_in, packet.in_device),
        ("PHYSOUT", packet.phys_out, packet.out_device),
    ):
        if port and port != device:
            parts.append(f"{name}={port} ")
    if packet.in_device:
        parts.append(_mac_header(target.flags, packet))
    data = packet.ip
    if len(data) >= 4 and int.from_bytes(data[2:4], "big") < len(data):
        data = data[: int.from_bytes(data[2:4], "big")]  # ip_rcv's trim (padding, say)
    parts.append(_ipv4(target.flags, data, 0, packet.mark))
    return "".join(parts)


def _mac_header(flags: int, packet: LoggedPacket) -> str:
    mac = packet.mac
    if flags & MAC_DECODE and packet.ethernet:
        if mac is None or len(mac) < 14:
            return ""
        return f"MACSRC={_mac(mac[6:12])} MACDST={_mac(mac[0:6])} MACPROTO={mac[12:14].hex()} "
    if not mac:
        return "MAC= "
    return f"MAC={':'.join(f'{byte:02x}' for byte in mac)} "


def _mac(raw: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in raw)


def _ipv4(flags: int, data: bytes, offset: int, mark: int) -> str:
    """dump_ipv4_packet for the header at `offset` of `data` (0: the packet; else the one an
    ICMP error quotes, which stops there)."""
    if len(data) - offset < 20:
        return "TRUNCATED"
    header = data[offset : offset + 20]
    tos, total_length, identification, fragment = (
        header[1],
        *struct.unpack_from("!HHH", header, 2),
    )
    ttl, protocol = header[8], header[9]
    ihl = (header[0] & 0x0F) * 4
    out = [
        f"SRC={socket.inet_ntoa(header[12:16])} DST={socket.inet_ntoa(header[16:20])} ",
        f"LEN={total_length} TOS=0x{tos & 0x1E:02X} PREC=0x{tos & 0xE0:02X} TTL={ttl} "
        f"ID={identification} ",
    ]
    for name, bit in (("CE", _IP_CE), ("DF", _IP_DF), ("MF", _IP_MF)):
        if fragment & bit:
            out.append(f"{name} ")
    later = fragment & _IP_OFFSET
    if later:
        out.append(f"FRAG:{later} ")
    if flags & IP_OPTIONS and ihl > 20:
        options = data[offset + 20 : offset + ihl]
        if len(options) < ihl - 20:
            return "".join(out) + "TRUNCATED"
        out.append(f"OPT ({options.hex().upper()}) ")
    transport = offset + ihl
    stop = False
    if protocol == _TCP:
        text, stop = _tcp(flags, data, transport, later)
        out.append(text)
    elif protocol in (_UDP, _UDPLITE):
        text, stop = _udp(protocol, data, transport, later)
        out.append(text)
    elif protocol == _ICMP:
        out.append(_icmp(flags, data, offset, transport, later))
    elif protocol == _AH:
        if not later:
            out.append("PROTO=AH ")
            out.append(_spi(data, transport, 4))
    elif protocol == _ESP:
        out.append("PROTO=ESP ")
        if not later:
            out.append(_spi(data, transport, 0))
    else:
        out.append(f"PROTO={protocol} ")
    if stop:
        return "".join(out)
    if offset == 0 and mark:
        out.append(f"MARK=0x{mark:x} ")
    return "".join(out)


def _incomplete(data: bytes, at: int) -> str:
    return f"INCOMPLETE [{len(data) - at} bytes] "


def _spi(data: bytes, at: int, spi_offset: int) -> str:
    """AH (8-byte header, SPI at 4) or ESP (SPI at 0, 8-byte header)."""
    size = 12 if spi_offset == 4 else 8
    if len(data) - at < size:
        return _incomplete(data, at)
    (spi,) = struct.unpack_from("!I", data, at + spi_offset)
    return f"SPI=0x{spi:x} "


def _tcp(flags: int, data: bytes, at: int, later: int) -> tuple[str, bool]:
    """nf_log_dump_tcp_header: its text and whether dump_ipv4_packet stops after it."""
    out = ["PROTO=TCP "]
    if later:
        return out[0], False
    if len(data) - at < 20:
        return out[0] + _incomplete(data, at), True
    sport, dport, sequence, acknowledgement, bits, window, _, urgent = struct.unpack_from(
        "!HHIIHHHH", data, at
    )
    out.append(f"SPT={sport} DPT={dport} ")
    if flags & TCP_SEQUENCE:
        out.append(f"SEQ={sequence} ACK={acknowledgement} ")
    out.append(f"WINDOW={window} ")
    # (ntohl(tcp_flag_word) & TCP_RESERVED_BITS) >> 22: the 3 bits between doff and AE
    out.append(f"RES=0x{(bits >> 8 & 0x0E) << 2:02x} ")
    out.extend(f"{name} " for name, bit in _TCP_FLAGS if bits & bit)
    out.append(f"URGP={urgent} ")
    size = (bits >> 12) * 4
    if flags & TCP_OPTIONS and size > 20:
        options = data[at + 20 : at + size]
        if len(options) < size - 20:
            return "".join(out) + "OPT (TRUNCATED)", True
        out.append(f"OPT ({options.hex().upper()}) ")
    return "".join(out), False


def _udp(protocol: int, data: bytes, at: int, later: int) -> tuple[str, bool]:
    head = "PROTO=UDP " if protocol == _UDP else "PROTO=UDPLITE "
    if later:
        return head, False
    if len(data) - at < 8:
        return head + _incomplete(data, at), True
    sport, dport, length = struct.unpack_from("!HHH", data, at)
    return f"{head}SPT={sport} DPT={dport} LEN={length} ", False


def _icmp(flags: int, data: bytes, offset: int, at: int, later: int) -> str:
    out = ["PROTO=ICMP "]
    if later:
        return out[0]
    if len(data) - at < 8:
        return out[0] + _incomplete(data, at)
    kind, code = data[at], data[at + 1]
    out.append(f"TYPE={kind} CODE={code} ")
    # skb->len - iphoff - ihl*4: the bytes after the header whose ICMP this is
    if kind <= _NR_ICMP_TYPES and _REQUIRED.get(kind) and len(data) - at < _REQUIRED[kind]:
        return "".join(out) + _incomplete(data, at)
    rest = data[at + 4 : at + 8]
    if kind in (_ECHOREPLY, _ECHO):
        identifier, sequence = struct.unpack("!HH", rest)
        out.append(f"ID={identifier} SEQ={sequence} ")
    elif kind == _PARAMETERPROB:
        out.append(f"PARAMETER={rest[0]} ")
    elif kind in (_REDIRECT, _DEST_UNREACH, _SOURCE_QUENCH, _TIME_EXCEEDED):
        if kind == _REDIRECT:
            out.append(f"GATEWAY={socket.inet_ntoa(rest)} ")
        if offset == 0:
            out.append(f"[{_ipv4(flags, data, at + 8, 0)}] ")
        if kind == _DEST_UNREACH and code == _FRAG_NEEDED:
            out.append(f"MTU={struct.unpack('!H', rest[2:4])[0]} ")
    return "".join(out)


def logged_lines(
    ruleset: Ruleset,
    logged: Iterable[tuple[str, int | str]],
    packet: LoggedPacket,
    marks: Sequence[int] = (),
) -> list[str]:
    """The lines of the LOG rules among `logged` (an Evaluation's, in order) for `packet`;
    the others (NFLOG) write no line. `marks`: the mark each of them saw (the Evaluation's
    logged_marks, which `-j MARK` rules before them changed); empty: the packet's own."""
    lines = []
    for number, (chain, index) in enumerate(logged):
        assert isinstance(index, int)
        target = ruleset.chains[chain].rules[index - 1].target
        if isinstance(target, Log):
            seen = replace(packet, mark=marks[number]) if marks else packet
            lines.append(log_line(target, seen))
    return lines
