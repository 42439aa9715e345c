"""Name tables iptables uses, copied so that parsing and printing do not depend on the host.

The protocol table is Debian's netbase /etc/protocols (what iptables-legacy-save prints through
getprotobynumber on the machines this project runs on) followed by libxtables' own fallback
names. Tables that belong to one match extension live in its module (codegen.rules.extensions).
"""

# (name, number) in /etc/protocols order; the first name for a number is the one printed.
NETBASE_PROTOCOLS: tuple[tuple[str, int], ...] = (
    ("ip", 0),
    ("hopopt", 0),
    ("icmp", 1),
    ("igmp", 2),
    ("ggp", 3),
    ("ipencap", 4),
    ("st", 5),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("pup", 12),
    ("udp", 17),
    ("hmp", 20),
    ("xns-idp", 22),
    ("rdp", 27),
    ("iso-tp4", 29),
    ("dccp", 33),
    ("xtp", 36),
    ("ddp", 37),
    ("idpr-cmtp", 38),
    ("ipv6", 41),
    ("ipv6-route", 43),
    ("ipv6-frag", 44),
    ("idrp", 45),
    ("rsvp", 46),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("skip", 57),
    ("ipv6-icmp", 58),
    ("ipv6-nonxt", 59),
    ("ipv6-opts", 60),
    ("rspf", 73),
    ("vmtp", 81),
    ("eigrp", 88),
    ("ospf", 89),
    ("ax.25", 93),
    ("ipip", 94),
    ("etherip", 97),
    ("encap", 98),
    ("pim", 103),
    ("ipcomp", 108),
    ("vrrp", 112),
    ("l2tp", 115),
    ("isis", 124),
    ("sctp", 132),
    ("fc", 133),
    ("mobility-header", 135),
    ("udplite", 136),
    ("mpls-in-ip", 137),
    ("manet", 138),
    ("hip", 139),
    ("shim6", 140),
    ("wesp", 141),
    ("rohc", 142),
    ("ethernet", 143),
)

# libxtables' xtables_chain_protos: used when /etc/protocols has no entry for a name.
XTABLES_PROTOCOLS: tuple[tuple[str, int], ...] = (
    ("tcp", 6),
    ("sctp", 132),
    ("udp", 17),
    ("udplite", 136),
    ("icmp", 1),
    ("icmpv6", 58),
    ("ipv6-icmp", 58),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-mh", 135),
    ("mh", 135),
    ("all", 0),
)

PROTOCOL_NUMBERS: dict[str, int] = {}
for _name, _number in NETBASE_PROTOCOLS + XTABLES_PROTOCOLS:
    PROTOCOL_NUMBERS.setdefault(_name, _number)

PROTOCOL_NAMES: dict[int, str] = {}
for _name, _number in NETBASE_PROTOCOLS + XTABLES_PROTOCOLS:
    PROTOCOL_NAMES.setdefault(_number, _name)

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

# libxt_pkttype: printed name and the kernel's PACKET_* number; aliases map onto these.
PKT_TYPES: dict[str, int] = {
    "unicast": 0,
    "broadcast": 1,
    "multicast": 2,
    "otherhost": 3,
}
PKT_TYPE_ALIASES: dict[str, str] = {"host": "unicast", "bcast": "broadcast", "mcast": "multicast"}

BUILTIN_CHAINS: tuple[str, ...] = ("INPUT", "FORWARD", "OUTPUT")

# Verdict names libiptc reserves: no chain may take them.
STANDARD_TARGETS = frozenset({"ACCEPT", "DROP", "QUEUE", "RETURN"})

# Target extensions shipped with iptables 1.8: named in errors, and `-N` refuses them as chain
# names the way iptables does ("chain name may not clash with target name").
EXTENSION_TARGETS = frozenset(
    """
    AUDIT CHECKSUM CLASSIFY CLUSTERIP CONNMARK CONNSECMARK CT DNAT
    DNPT DSCP ECN HL HMARK IDLETIMER LED LOG MARK MASQUERADE
    NETMAP NFLOG NFQUEUE NOTRACK RATEEST REDIRECT REJECT SECMARK
    SET SNAT SNPT SYNPROXY TCPMSS TCPOPTSTRIP TEE TOS TPROXY
    TRACE TTL ULOG
    """.split()
)
