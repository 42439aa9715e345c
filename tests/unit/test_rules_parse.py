"""Parsing iptables-save text: tables of single rule lines, each checked once against
iptables-legacy-restore + iptables-legacy-save 1.8.9 (the expected output is what the real tool
printed), then file-level behaviour and the errors we give where iptables would refuse or where
we refuse on purpose."""

import pytest

from codegen.rules import Address, Interface, Jump, ParseError, Protocol, RuleError, parse, write
from codegen.rules.extensions.tcp import TcpMatch

HEAD = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    ":u - [0:0]\n:v - [0:0]\n"
)
RULE_LINE = 7  # the line number of the rule under test inside HEAD + rule + COMMIT


def rules_of(text: str) -> list[str]:
    return [line for line in write(parse(text, "t.rules")).splitlines() if line.startswith("-A")]


# (rule line, the -A lines iptables-legacy-save printed after loading it)
VALID = [
    ("-A INPUT -p tcp --dport 0x16", ["-A INPUT -p tcp -m tcp --dport 22"]),
    ("-A INPUT -p tcp --dport 026", ["-A INPUT -p tcp -m tcp --dport 22"]),
    ("-A INPUT -p tcp --dport :100", ["-A INPUT -p tcp -m tcp --dport 0:100"]),
    ("-A INPUT -p tcp --dport 100:", ["-A INPUT -p tcp -m tcp --dport 100:65535"]),
    ("-A INPUT -p tcp --dport ssh", ["-A INPUT -p tcp -m tcp --dport 22"]),
    ("-A INPUT -p tcp --dport 0:65535", ["-A INPUT -p tcp -m tcp"]),
    ("-A INPUT -p tcp --dport 22:22", ["-A INPUT -p tcp -m tcp --dport 22"]),
    (
        "-A INPUT -p tcp ! --dport 22 ! --sport 3 --syn",
        ["-A INPUT -p tcp -m tcp ! --sport 3 ! --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN"],
    ),
    ("-A INPUT -p tcp ! --syn", ["-A INPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"]),
    (
        "-A INPUT -p tcp --tcp-flags ALL NONE",
        ["-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG NONE"],
    ),
    ("-A INPUT -p tcp --tcp-flags syn,ack syn", ["-A INPUT -p tcp -m tcp --tcp-flags SYN,ACK SYN"]),
    ("-A INPUT -p tcp --tcp-flags SYN,SYN SYN", ["-A INPUT -p tcp -m tcp --tcp-flags SYN SYN"]),
    ("-A INPUT -p tcp --tcp-flags NONE NONE", ["-A INPUT -p tcp -m tcp"]),
    ("-A INPUT -p tcp --tcp-flags SYN ACK", ["-A INPUT -p tcp -m tcp --tcp-flags SYN ACK"]),
    (
        "-A INPUT -p tcp --tcp-flags ACK,URG,PSH URG",
        ["-A INPUT -p tcp -m tcp --tcp-flags PSH,ACK,URG URG"],
    ),
    ("-A INPUT -p tcp -m tcp", ["-A INPUT -p tcp -m tcp"]),
    ("-A INPUT -p tcp -m tcp -m tcp --dport 3", ["-A INPUT -p tcp -m tcp -m tcp --dport 3"]),
    ("-A INPUT -p 6 --dport 3", ["-A INPUT -p tcp -m tcp --dport 3"]),
    ("-A INPUT -p TCP --dport 3", ["-A INPUT -p tcp -m tcp --dport 3"]),
    ("-A INPUT -p Tcp --dport 3", ["-A INPUT -p tcp -m tcp --dport 3"]),
    ("-A INPUT -p 255", ["-A INPUT -p 255"]),
    ("-A INPUT -p ipv6", ["-A INPUT -p ipv6"]),
    ("-A INPUT -p icmp --icmp-type echo-req", ["-A INPUT -p icmp -m icmp --icmp-type 8"]),
    ("-A INPUT -p icmp --icmp-type ECHO-REQUEST", ["-A INPUT -p icmp -m icmp --icmp-type 8"]),
    ("-A INPUT -p icmp --icmp-type 255", ["-A INPUT -p icmp -m icmp --icmp-type any"]),
    ("-A INPUT -p icmp --icmp-type 255/3", ["-A INPUT -p icmp -m icmp --icmp-type any"]),
    ("-A INPUT -p icmp --icmp-type 0x8", ["-A INPUT -p icmp -m icmp --icmp-type 8"]),
    (
        "-A INPUT -p icmp --icmp-type network-unreachable",
        ["-A INPUT -p icmp -m icmp --icmp-type 3/0"],
    ),
    ("-A INPUT -p icmp --icmp-type ping", ["-A INPUT -p icmp -m icmp --icmp-type 8"]),
    ("-A INPUT -p icmp", ["-A INPUT -p icmp"]),
    (
        "-A INPUT -p tcp --dport 1 -m tcp --sport 2",
        ["-A INPUT -p tcp -m tcp --dport 1 -m tcp --sport 2"],
    ),
    ("-A INPUT -s 10", ["-A INPUT -s 10.0.0.0/32"]),
    ("-A INPUT -s 10.1/8", ["-A INPUT -s 10.0.0.0/8"]),
    ("-A INPUT -s 010.0x10.1.1", ["-A INPUT -s 8.16.1.1/32"]),
    ("-A INPUT -s 1.2.3.4/0", ["-A INPUT"]),
    ("-A INPUT ! -s 1.2.3.4/0", ["-A INPUT ! -s 0.0.0.0/0"]),
    ("-A INPUT -s foo/0", ["-A INPUT"]),
    (
        "-A INPUT -s 1.2.3.4,5.6.7.8/24 -d 9.9.9.9,8.8.8.8",
        [
            "-A INPUT -s 1.2.3.4/32 -d 9.9.9.9/32",
            "-A INPUT -s 1.2.3.4/32 -d 8.8.8.8/32",
            "-A INPUT -s 5.6.7.0/24 -d 9.9.9.9/32",
            "-A INPUT -s 5.6.7.0/24 -d 8.8.8.8/32",
        ],
    ),
    (
        "-I INPUT 1 -s 1.2.3.4,5.6.7.8 -j ACCEPT",
        ["-A INPUT -s 5.6.7.8/32 -j ACCEPT", "-A INPUT -s 1.2.3.4/32 -j ACCEPT"],
    ),
    ('-A INPUT -s "1.2.3.4, 5.6.7.8"', ["-A INPUT -s 1.2.3.4/32", "-A INPUT -s 5.6.7.8/32"]),
    ("-A INPUT -s 1.2.3.4/255.255.255.255", ["-A INPUT -s 1.2.3.4/32"]),
    ("-A INPUT -s 1.2.3.4/255.255.255.254", ["-A INPUT -s 1.2.3.4/31"]),
    ("-A INPUT -s 1.2.3.4/128.0.0.0", ["-A INPUT -s 0.0.0.0/1"]),
    ("-A INPUT -d 1.2.3.4/255.0.255.0", ["-A INPUT -d 1.0.3.0/255.0.255.0"]),
    ("-A INPUT -i +", ["-A INPUT"]),
    ("-A INPUT -i eth0+x", ["-A INPUT -i eth0+x"]),
    ("-A INPUT ! -i eth+", ["-A INPUT ! -i eth+"]),
    ("-A INPUT -i abcdefghijklmno", ["-A INPUT -i abcdefghijklmno"]),
    ("-A INPUT -i eth/0", ["-A INPUT -i eth/0"]),
    ("-A FORWARD -i eth0 -o eth1", ["-A FORWARD -i eth0 -o eth1"]),
    ("-A u -i eth0 -o eth1", ["-A u -i eth0 -o eth1"]),
    ("-A INPUT -f -p tcp", ["-A INPUT -p tcp -f"]),
    ("-A INPUT -p tcp -f --dport 3", ["-A INPUT -p tcp -f -m tcp --dport 3"]),
    ("-A INPUT -j u", ["-A INPUT -j u"]),
    ("-A INPUT -g u", ["-A INPUT -g u"]),
    ("-A INPUT -j RETURN", ["-A INPUT -j RETURN"]),
    ("-A INPUT --jump u", ["-A INPUT -j u"]),
    ("-A INPUT --goto u", ["-A INPUT -g u"]),
    (
        "-A INPUT --source 1.1.1.1 --destination 2.2.2.2 --in-interface a"
        " --protocol tcp --fragment",
        ["-A INPUT -s 1.1.1.1/32 -d 2.2.2.2/32 -i a -p tcp -f"],
    ),
    ("-A INPUT --src 1.1.1.1 --dst 2.2.2.2", ["-A INPUT -s 1.1.1.1/32 -d 2.2.2.2/32"]),
    ("-A INPUT --sour 1.1.1.1", ["-A INPUT -s 1.1.1.1/32"]),
    ("-A INPUT -p tcp --dp 22", ["-A INPUT -p tcp -m tcp --dport 22"]),
    (
        "-A INPUT -p tcp --destination-port 22 --source-port 1",
        ["-A INPUT -p tcp -m tcp --sport 1 --dport 22"],
    ),
    ("-A INPUT -p tcp --dpo 22", ["-A INPUT -p tcp -m tcp --dport 22"]),
    (
        '-A INPUT -m comment --comment "a\\"b\\\\c\'d" -j DROP',
        ['-A INPUT -m comment --comment "a\\"b\\\\c\\\'d" -j DROP'],
    ),
    (
        "-A INPUT -m comment --comment a\\b -j DROP",
        ['-A INPUT -m comment --comment "a\\\\b" -j DROP'],
    ),
    ('-A INPUT -m comment --comment "" -j DROP', ['-A INPUT -m comment --comment "" -j DROP']),
    (
        '-A INPUT -m comment --comment "a\tb" -j DROP',
        ['-A INPUT -m comment --comment "a\tb" -j DROP'],
    ),
    ('-A INPUT -m comment --comment "a"', ["-A INPUT -m comment --comment a"]),
    ('-A INPUT -m comment --comment "x\\y"', ["-A INPUT -m comment --comment xy"]),
    ('-A INPUT -m comment --comment "x"  -j ACCEPT', ["-A INPUT -m comment --comment x -j ACCEPT"]),
    ('-A INPUT -m comment --comment "--x"', ["-A INPUT -m comment --comment --x"]),
    ('-A INPUT -m comment --comment "!"', ['-A INPUT -m comment --comment "!"']),
    ('-A INPUT -m comment --comment "é$`x"', ['-A INPUT -m comment --comment "é$`x"']),
    (
        '-A INPUT -m comment --comment "a" -m comment --comment "b"',
        ["-A INPUT -m comment --comment a -m comment --comment b"],
    ),
    (
        '-A INPUT -m comment --comment "a.b/c:d,e@f+g=h"',
        ['-A INPUT -m comment --comment "a.b/c:d,e@f+g=h"'],
    ),
    ("-A INPUT -m comment --comment 'x'", ["-A INPUT -m comment --comment \"\\'x\\'\""]),
    (
        "-A INPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        ["-A INPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"],
    ),
    (
        "-A INPUT -p tcp -m multiport --dports 1:2,3,4,5,6,7,8,9,10,11,12,13,14,15",
        ["-A INPUT -p tcp -m multiport --dports 1:2,3,4,5,6,7,8,9,10,11,12,13,14,15"],
    ),
    (
        "-A INPUT -p tcp -m multiport --dports 1:2,3,4,5,6,7,8,9,10,11,12,13,14",
        ["-A INPUT -p tcp -m multiport --dports 1:2,3,4,5,6,7,8,9,10,11,12,13,14"],
    ),
    (
        "-A INPUT -p tcp -m multiport --dports ssh,http",
        ["-A INPUT -p tcp -m multiport --dports 22,80"],
    ),
    ("-A INPUT -p tcp -m multiport --dports 1,1", ["-A INPUT -p tcp -m multiport --dports 1,1"]),
    ("-A INPUT -p tcp -m multiport --dports 0x10", ["-A INPUT -p tcp -m multiport --dports 16"]),
    ("-A INPUT -p sctp -m multiport --ports 1", ["-A INPUT -p sctp -m multiport --ports 1"]),
    (
        "-A INPUT -p tcp -m multiport ! --source-ports 1",
        ["-A INPUT -p tcp -m multiport ! --sports 1"],
    ),
    (
        "-A INPUT -p tcp -m multiport --dports 0:65535",
        ["-A INPUT -p tcp -m multiport --dports 0:65535"],
    ),
    (
        "-A INPUT -m iprange --src-range 1.2.3.4",
        ["-A INPUT -m iprange --src-range 1.2.3.4-1.2.3.4"],
    ),
    (
        "-A INPUT -m iprange --src-range 1.2.3.9-1.2.3.4",
        ["-A INPUT -m iprange --src-range 1.2.3.9-1.2.3.4"],
    ),
    (
        "-A INPUT -m iprange --src-range 1.2.3.4-1.2.3.4",
        ["-A INPUT -m iprange --src-range 1.2.3.4-1.2.3.4"],
    ),
    (
        "-A INPUT -m iprange --src-range 10-11",
        ["-A INPUT -m iprange --src-range 10.0.0.0-11.0.0.0"],
    ),
    (
        "-A INPUT -m iprange ! --dst-range 1.1.1.1-1.1.1.2 --src-range 2.2.2.2-2.2.2.3",
        ["-A INPUT -m iprange --src-range 2.2.2.2-2.2.2.3 ! --dst-range 1.1.1.1-1.1.1.2"],
    ),
    ("-A INPUT -m length --length 10", ["-A INPUT -m length --length 10"]),
    ("-A INPUT -m length --length :10", ["-A INPUT -m length --length 0:10"]),
    ("-A INPUT -m length --length 10:", ["-A INPUT -m length --length 10:65535"]),
    ("-A INPUT -m length --length 20:10", ["-A INPUT -m length --length 20:10"]),
    ("-A INPUT -m length --length 0:65535", ["-A INPUT -m length --length 0:65535"]),
    ("-A INPUT -m length --length 0x10", ["-A INPUT -m length --length 16"]),
    ("-A INPUT -m ttl --ttl-lt 0", ["-A INPUT -m ttl --ttl-lt 0"]),
    ("-A INPUT -m ttl --ttl-gt 255", ["-A INPUT -m ttl --ttl-gt 255"]),
    ("-A INPUT -m pkttype --pkt-type BROADCAST", ["-A INPUT -m pkttype --pkt-type broadcast"]),
    ("-A INPUT -m pkttype --pkt-type bcast", ["-A INPUT -m pkttype --pkt-type broadcast"]),
    ("-A INPUT -m pkttype --pkt-type mcast", ["-A INPUT -m pkttype --pkt-type multicast"]),
    ("-A INPUT -m pkttype --pkt-type otherhost", ["-A INPUT -m pkttype --pkt-type otherhost"]),
    ("-A INPUT -m mark --mark 0xffffffff", ["-A INPUT -m mark --mark 0xffffffff"]),
    ("-A INPUT -m mark --mark 10/0xf0", ["-A INPUT -m mark --mark 0xa/0xf0"]),
    ("-A INPUT -m mark --mark 0/0", ["-A INPUT -m mark --mark 0x0/0x0"]),
    ("-A INPUT -m mark --mark 0", ["-A INPUT -m mark --mark 0x0"]),
    ("-A INPUT -m mark --mark 0x1/0xffffffff", ["-A INPUT -m mark --mark 0x1"]),
    ("-A INPUT -m mark --mark 017", ["-A INPUT -m mark --mark 0xf"]),
    ("-A INPUT -m pkttype --pkt-type host", ["-A INPUT -m pkttype --pkt-type unicast"]),
    ("-A INPUT ! -i eth0 ! -s 0/0", ["-A INPUT ! -s 0.0.0.0/0 ! -i eth0"]),
    ("-A INPUT -p udp ! --sport 1:2 --dport 3", ["-A INPUT -p udp -m udp ! --sport 1:2 --dport 3"]),
    ("-A INPUT -p udplite", ["-A INPUT -p udplite"]),
    ("-A INPUT -p 136 -m multiport --dports 1", ["-A INPUT -p udplite -m multiport --dports 1"]),
    ("-A INPUT -p 33 -m multiport --dports 1", ["-A INPUT -p dccp -m multiport --dports 1"]),
    ("-A INPUT -p esp", ["-A INPUT -p esp"]),
    ("-A INPUT -p 2", ["-A INPUT -p igmp"]),
    ("-A INPUT -p 4", ["-A INPUT -p ipencap"]),
    ("-A INPUT -p 200", ["-A INPUT -p 200"]),
    ("-A INPUT -p icmpv6", ["-A INPUT -p ipv6-icmp"]),
    ("-A INPUT -p mh", ["-A INPUT -p mobility-header"]),
    ("-A INPUT -p ICMP --icmp-type 0", ["-A INPUT -p icmp -m icmp --icmp-type 0"]),
    ("-A INPUT -p tcp --tcp-flags SYN, SYN", ["-A INPUT -p tcp -m tcp --tcp-flags SYN SYN"]),
    (
        "-A INPUT -p tcp --tcp-flags ALL ALL",
        ["-A INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG FIN,SYN,RST,PSH,ACK,URG"],
    ),
    ("-A INPUT -p tcp --dport=22", ["-A INPUT -p tcp -m tcp --dport 22"]),
    ("-A INPUT -j DROP -s 1.2.3.4", ["-A INPUT -s 1.2.3.4/32 -j DROP"]),
    ("-A INPUT -c 1 2 -j DROP", ["-A INPUT -j DROP"]),
    (
        "-A INPUT -m tcp -p tcp ! --syn",
        ["-A INPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN"],
    ),
    ("-A INPUT -p all", ["-A INPUT"]),
    ("-A INPUT -p ALL", ["-A INPUT"]),
    ("-A INPUT -d 1.2.3.4/32 -s 1.2.3.4", ["-A INPUT -s 1.2.3.4/32 -d 1.2.3.4/32"]),
    ("-A INPUT -m length ! --length 5:5", ["-A INPUT -m length ! --length 5"]),
    ("-A INPUT -m mark ! --mark 1/1", ["-A INPUT -m mark ! --mark 0x1/0x1"]),
    ("-A INPUT -m ttl --ttl-eq 0x10", ["-A INPUT -m ttl --ttl-eq 16"]),
    ("-A INPUT -m pkttype ! --pkt-type broadcast", ["-A INPUT -m pkttype ! --pkt-type broadcast"]),
    ("-A INPUT -m tcp -p tcp --dport 3", ["-A INPUT -p tcp -m tcp --dport 3"]),
    (
        "-A INPUT -p tcp -m tcp --dport 1 -m tcp --dport 2",
        ["-A INPUT -p tcp -m tcp --dport 1 -m tcp --dport 2"],
    ),
    ("-N x", []),
    ("-P INPUT DROP", []),
    ("-A INPUT -p udp --sp 5", ["-A INPUT -p udp -m udp --sport 5"]),
    ("-A INPUT -p icmp --icmp 8", ["-A INPUT -p icmp -m icmp --icmp-type 8"]),
    ("-A INPUT -p 17 --dport 5", ["-A INPUT -p udp -m udp --dport 5"]),
    ("-A INPUT -p 1 --icmp-type 5", ["-A INPUT -p icmp -m icmp --icmp-type 5"]),
    ("-A INPUT ! -f", ["-A INPUT ! -f"]),
    ("-A INPUT -m length --length +5", ["-A INPUT -m length --length 5"]),
    ("-A INPUT -p tcp --dport +22", ["-A INPUT -p tcp -m tcp --dport 22"]),
    ('-A INPUT -p tcp --dport " 22"', ["-A INPUT -p tcp -m tcp --dport 22"]),
    (
        "-A INPUT -p tcp -m tcp --dport 22 ! --syn",
        ["-A INPUT -p tcp -m tcp --dport 22 ! --tcp-flags FIN,SYN,RST,ACK SYN"],
    ),
    ("-I INPUT 1 -j DROP", ["-A INPUT -j DROP"]),
    ("-I INPUT -j DROP", ["-A INPUT -j DROP"]),
    (
        "-A INPUT -p tcp --sport 1 --dport 2 --tcp-flags SYN,ACK,FIN ACK -j u",
        ["-A INPUT -p tcp -m tcp --sport 1 --dport 2 --tcp-flags FIN,SYN,ACK ACK -j u"],
    ),
]

ERRORS = [
    ("-A INPUT -p tcp --dport 99999", 25, "invalid port/service '99999' (ports are 0-65535)"),
    ("-A INPUT -p tcp --dport 5:3", 25, "invalid port range '5:3' (min > max)"),
    (
        "-A INPUT -p tcp --dport ! 22",
        25,
        "'!' after the option is old syntax: write '! --dport VALUE'",
    ),
    (
        "-A INPUT -p tcp --syn --tcp-flags SYN SYN",
        23,
        "tcp: only one of --syn or --tcp-flags allowed",
    ),
    ("-A INPUT -p tcp --dport 1 --dport 2", 27, "tcp: only one --destination-port allowed"),
    ("-A INPUT -m tcp --dport 1", 10, "tcp match needs '-p tcp' (not negated)"),
    ("-A INPUT ! -p tcp -m tcp --dport 1", 19, "tcp match needs '-p tcp' (not negated)"),
    ("-A INPUT ! -p tcp --dport 1", 19, "tcp match needs '-p tcp' (not negated)"),
    ("-A INPUT -p udp --dport 1 -m tcp --dport 3", 27, "tcp match needs '-p tcp' (not negated)"),
    ("-A INPUT -p tcp -m udp --dport 3", 17, "udp match needs '-p udp' (not negated)"),
    ("-A INPUT -p all --dport 3", 17, "unknown option '--dport'"),
    ("-A INPUT ! -p all", 10, "'! -p all' would never match"),
    ("-A INPUT ! -p 0", 10, "'! -p all' would never match"),
    ("-A INPUT -p 256", 13, "unknown protocol '256'"),
    (
        "-A INPUT -p icmp --icmp-type echo",
        30,
        "ambiguous ICMP type 'echo': 'echo-reply' or 'echo-request'?",
    ),
    (
        "-A INPUT -p icmp --icmp-type timestamp",
        30,
        "ambiguous ICMP type 'timestamp': 'timestamp-request' or 'tim",
    ),
    ("-A INPUT -p icmp --icmp-type 3/300", 30, "unknown ICMP code '3/300'"),
    ("-A INPUT -p icmp --icmp-type 256", 30, "unknown ICMP type '256'"),
    ("-A INPUT -p icmp --icmp-type 3/", 30, "unknown ICMP code '3/'"),
    ("-A INPUT -s 1.2.3.4/33", 13, "invalid mask '33' in '1.2.3.4/33'"),
    ("-A INPUT -s 1.2.3.4/255.255.0", 13, "invalid mask '255.255.0' in '1.2.3.4/255.255.0'"),
    ("-A INPUT -s 1.2.3.4/0xff", 13, "invalid mask '0xff' in '1.2.3.4/0xff'"),
    (
        "-A INPUT ! -s 1.2.3.4,5.6.7.8",
        15,
        "'!' not allowed with multiple source or destination addresse",
    ),
    (
        "-A INPUT -s 1.2.3.4, 5.6.7.8",
        13,
        "host/network '' is not an IPv4 address (host names are not s",
    ),
    ("-A INPUT -s 1.2.3.4,", 13, "host/network '' is not an IPv4 address (host names are not s"),
    ("-A INPUT -s 1.2.3.4 -s 2.2.2.2", 21, "multiple -s options not allowed"),
    ("-A INPUT -s 1.2.3.256", 13, "host/network '1.2.3.256' is not an IPv4 address (host names "),
    ("-A INPUT -s 1.2.3.4.5", 13, "host/network '1.2.3.4.5' is not an IPv4 address (host names "),
    ('-A INPUT -i ""', 13, "empty interface name after -i"),
    (
        "-A INPUT -i abcdefghijklmnop",
        13,
        "interface name 'abcdefghijklmnop' must be shorter than IFNAM",
    ),
    ("-A OUTPUT -i eth0", 11, "can't use -i with OUTPUT"),
    ("-A INPUT -o eth0", 10, "can't use -o with INPUT"),
    ("-A INPUT -j INPUT", 13, "cannot jump to built-in chain 'INPUT'"),
    ("-A INPUT -g INPUT", 13, "cannot goto built-in chain 'INPUT'"),
    ("-A INPUT -j nope", 13, "chain or target 'nope' does not exist (chains must be declar"),
    ("-A INPUT -g RETURN", 13, "goto 'RETURN' is not a user-defined chain"),
    ("-A INPUT -g ACCEPT", 13, "goto 'ACCEPT' is not a user-defined chain"),
    ("-A INPUT -j ACCEPT -j DROP", 20, "multiple -j options not allowed"),
    ("-A INPUT -j", 10, "option '-j' requires an argument"),
    ("-A INPUT -m comment", 10, "comment: --comment must be specified"),
    ("-A INPUT -m comment --comment a --comment b", 33, "comment: only one --comment allowed"),
    (
        "-A INPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16",
        39,
        "too many ports: 15 max, a range counts as two",
    ),
    ("-A INPUT -p tcp -m multiport --dports 5:3", 39, "invalid port range '5:3' (min >= max)"),
    ("-A INPUT -p tcp -m multiport --dports 3:3", 39, "invalid port range '3:3' (min >= max)"),
    ("-A INPUT -p tcp -m multiport --dports :3", 39, "invalid port/service '' (ports are 0-65535)"),
    ("-A INPUT -p tcp -m multiport --dports 3:", 39, "invalid port/service '' (ports are 0-65535)"),
    ("-A INPUT -p tcp -m multiport --dports 1,", 39, "invalid port/service '' (ports are 0-65535)"),
    (
        "-A INPUT -p tcp -m multiport --dports 99999",
        39,
        "invalid port/service '99999' (ports are 0-65535)",
    ),
    (
        "-A INPUT -p tcp -m multiport --sports 1 --dports 2",
        41,
        "multiport: --dports cannot be used together with --sports",
    ),
    (
        "-A INPUT -p tcp -m multiport --ports 1 --dports 2",
        40,
        "multiport: --dports cannot be used together with --ports",
    ),
    (
        "-A INPUT -m multiport --ports 1",
        23,
        "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' ",
    ),
    (
        "-A INPUT ! -p tcp -m multiport --ports 1",
        19,
        "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' ",
    ),
    (
        "-A INPUT -p icmp -m multiport --ports 1",
        31,
        "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' ",
    ),
    (
        "-A INPUT -p tcp -m multiport",
        17,
        "multiport: one of --sports, --dports or --ports must be spec",
    ),
    (
        "-A INPUT -p udp -m multiport --dports 3 --dport 4",
        41,
        "multiport: --dports can only be used once",
    ),
    (
        "-A INPUT -m iprange --src-range 1.2.3.4-1.2.3.5 --src-range 1.2.3.4-1.2.3.5",
        49,
        "iprange: only one --src-range allowed",
    ),
    ("-A INPUT -m iprange", 10, "iprange: --src-range or --dst-range must be specified"),
    ("-A INPUT -m length --length 65536", 29, "length: bad value '65536' (0-65535 or MIN:MAX)"),
    ("-A INPUT -m length", 10, "length: --length must be specified"),
    ("-A INPUT -m ttl --ttl-eq 256", 26, "ttl: bad value '256' (0-255)"),
    (
        "-A INPUT -m ttl --ttl-eq 0 --ttl-lt 3",
        28,
        "ttl: --ttl-lt cannot be used together with --ttl-eq",
    ),
    ("-A INPUT -m ttl ! --ttl-lt 3", 19, "ttl: option '--ttl-lt' cannot be negated"),
    ("-A INPUT -m ttl", 10, "ttl: one of --ttl-eq, --ttl-lt or --ttl-gt must be specified"),
    (
        "-A INPUT -m pkttype --pkt-type 3",
        32,
        "bad packet type '3' (unicast, broadcast, multicast, otherhos",
    ),
    ("-A INPUT -m pkttype", 10, "pkttype: --pkt-type must be specified"),
    (
        "-A INPUT -m mark --mark 0x100000000",
        25,
        "mark: bad value '0x100000000' (VALUE[/MASK], 32-bit)",
    ),
    ("-A INPUT -m mark --mark 0x1/", 25, "mark: bad value '0x1/' (VALUE[/MASK], 32-bit)"),
    ("-A INPUT -m mark", 10, "mark: --mark must be specified"),
    ("-A INPUT -m foo", 10, "match '-m foo' is not supported (supported matches: tcp, udp"),
    ("-A INPUT -m tcp", 10, "tcp match needs '-p tcp' (not negated)"),
    (
        "-A INPUT -m pkttype --pkt-type outgoing",
        32,
        "bad packet type 'outgoing' (unicast, broadcast, multicast, o",
    ),
    ("-A INPUT -p udp --syn", 17, "unknown option '--syn'"),
    ("-A INPUT -p icmp -m icmp", 18, "icmp: --icmp-type must be specified"),
    ("-A INPUT -p icmp --icmp-type 3 --icmp-type 4", 32, "icmp: only one --icmp-type allowed"),
    (
        "-A INPUT -p tcp --tcp-flags SYN",
        17,
        "--tcp-flags needs two arguments: MASK COMP, e.g. SYN,ACK SYN",
    ),
    (
        "-A INPUT -p tcp --tcp-flags FOO SYN",
        29,
        "unknown TCP flag 'FOO' (flags: FIN SYN RST PSH ACK URG ALL N",
    ),
    (
        '-A INPUT -p tcp --tcp-flags "SYN ACK" SYN',
        29,
        "unknown TCP flag 'SYN ACK' (flags: FIN SYN RST PSH ACK URG A",
    ),
    ("-A INPUT -p tcp --dport 22 -p udp", 28, "multiple -p options not allowed"),
    ("-A INPUT -c 1 -j DROP", 10, "-c needs two decimal numbers: packets and bytes"),
    ("-A INPUT -c 1 x -j DROP", 10, "-c needs two decimal numbers: packets and bytes"),
    ("-A INPUT -j DROP extra", 18, "bad argument 'extra'"),
    ('-A INPUT -p ""', 13, "unknown protocol ''"),
    (
        "-A INPUT -p tcp -m tcp ! --dport 22 --dport 2",
        37,
        "tcp: only one --destination-port allowed",
    ),
    ("-A INPUT -p tcp --sport 80 --source-port 81", 28, "tcp: only one --source-port allowed"),
    (
        "-A INPUT -m multiport --dports 1 -p tcp",
        23,
        "multiport needs '-p tcp', '-p udp', '-p udplite', '-p sctp' ",
    ),
    (
        "-A INPUT -t filter -j DROP",
        10,
        "the -t option cannot be used in a rule file: the table is se",
    ),
    ("-A INPUT ! -j DROP", 10, "cannot have '!' before -j"),
    ("-A INPUT ! ! -s 1.1.1.1", 12, "multiple consecutive '!' not allowed"),
    ("-A INPUT -s 1.1.1.1 !", 21, "nothing appropriate following '!'"),
    (
        "-A INPUT -p tcp ! -m tcp --dport 3",
        17,
        "unexpected '!' before -m (negate the match's options)",
    ),
    ("-A INPUT -I INPUT", 10, "only one command per line: -I and -A"),
    ("-N -x", 4, "chain name not allowed to start with '-'"),
    ("-N LOG", 4, "chain name 'LOG' may not clash with a target name"),
    ("-P u DROP", 4, "-P works only on built-in chains, not 'u'"),
    ("-A INPUT -p tcp --d 22", 17, "option '--d' is ambiguous (could be --delete, --delete-chain"),
    ("-A INPUT -p tcp --de 22", 17, "option '--de' is ambiguous (could be --delete, --delete-chai"),
    (
        "-A INPUT -p tcp --dport 1 --de 22",
        27,
        "option '--de' is ambiguous (could be --delete, --delete-chai",
    ),
    ("-A INPUT --d 1.2.3.4", 10, "option '--d' is ambiguous (could be --delete, --delete-chain"),
    ("-A INPUT --s 1.2.3.4", 10, "option '--s' is ambiguous (could be --source, --src, --set-c"),
    ("-A INPUT --in eth0", 10, "option '--in' is ambiguous (could be --insert, --in-interfac"),
    ("-A INPUT -m mark --ma 1", 18, "option '--ma' is ambiguous (could be --match, --mark)"),
    ('-A INPUT -m comment --comment "x"y', 34, "bad argument 'y'"),
    ("-A INPUT -p tcp --syn=1", 17, "option '--syn' takes no argument"),
    (
        "-A INPUT -p tcp ! --tcp-flags SYN --dport 4",
        19,
        "--tcp-flags needs two arguments: MASK COMP, e.g. SYN,ACK SYN",
    ),
    (
        "-A INPUT -p tcp --tcp-flags SYN ! --dport 4",
        17,
        "--tcp-flags needs two arguments: MASK COMP, e.g. SYN,ACK SYN",
    ),
    ("-A INPUT -m iprange --src-range 1.2.3.4-", 33, "iprange: bad IP address ''"),
    ("-A INPUT -m iprange --src-range localhost", 33, "iprange: bad IP address 'localhost'"),
    ("-A INPUT -i eth0 -i eth1", 18, "multiple -i options not allowed"),
    ("-A INPUT -f -f", 13, "multiple -f options not allowed"),
    ("-A INPUT -m length --length 1:2:3", 29, "length: bad value '1:2:3' (0-65535 or MIN:MAX)"),
    ("-A INPUT -m length --length -1", 29, "length: bad value '-1' (0-65535 or MIN:MAX)"),
    ("-A INPUT -m mark --mark -1", 25, "mark: bad value '-1' (VALUE[/MASK], 32-bit)"),
    ("-A INPUT -p tcp --dport -1", 25, "invalid port/service '-1' (ports are 0-65535)"),
    ("-I INPUT 2 -j DROP", 10, "cannot insert at 2: chain 'INPUT' has 0 rules"),
    ("-I INPUT 0 -j DROP", 10, "invalid rule number '0'"),
    ("-I INPUT x -j DROP", 10, "invalid rule number 'x'"),
]


@pytest.mark.parametrize(("line", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_line_prints_as_iptables_save(line: str, expected: list[str]) -> None:
    assert rules_of(HEAD + line + "\nCOMMIT\n") == expected


@pytest.mark.parametrize(("line", "column", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_invalid_line_is_refused_where_it_goes_wrong(line: str, column: int, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(HEAD + line + "\nCOMMIT\n", "t.rules")
    error = caught.value
    assert error.source is not None
    assert (error.source.file, error.source.line, error.source.column) == (
        "t.rules",
        RULE_LINE,
        column,
    )
    assert message in error.message
    assert str(error) == f"t.rules:{RULE_LINE}:{column}: error: {error.message}\n{line}"


# Refused on purpose, where iptables-restore would accept (and so absent from the tables above).
REFUSED = [
    ("-A INPUT -j TCPMSS --clamp-mss-to-pmtu", 13, "target 'TCPMSS' is not supported"),
    ("-A INPUT -j TEE --gateway 198.18.0.1", 13, "target 'TEE' is not supported"),
    ("-A INPUT -j QUEUE", 13, "target 'QUEUE' is not supported"),
    ("-A INPUT -j MASQUERADE", 13, "supported targets: ACCEPT, DROP, RETURN"),
    ("-A INPUT -m set --match-set x src --packets-gt 1", 35, "compares a member's counters"),
    ("-A INPUT -m string --algo bm --string x", 10, "supported matches: tcp, udp, icmp"),
    ("-A INPUT -p sctp --dport 1", 18, "needs the sctp match, which is not supported"),
    ("-A INPUT -p tcp --tcp-option 2", 17, "--tcp-option is not supported"),
    ("-A INPUT -s localhost", 13, "host names are not supported"),
    ("-A INPUT -d example.org", 13, "host names are not supported"),
    ("-A INPUT -m comment --comment " + "a" * 256, 31, "256 bytes long, 255 max"),
    ("-A INPUT -ptcp", 10, "two words: '-p tcp'"),
    ("-A INPUT -fv", 10, "unknown option '-fv'"),
    ("-A INPUT -p tcp --dport 22 -v", 28, "no place in a rule file"),
    ("-D INPUT 1", 1, "command '-D' is not supported"),
    ("-A INPUT -p tcp -m tcp --dport ! 22", 32, "old syntax: write '! --dport VALUE'"),
    ("-A INPUT -s ! 1.2.3.4", 13, "old syntax: write '! -s VALUE'"),
    ('-A INPUT -m comment --comment "open', 31, "unterminated quoted string"),
]


@pytest.mark.parametrize(("line", "column", "message"), REFUSED, ids=[r[0][:40] for r in REFUSED])
def test_unsupported_is_refused_never_ignored(line: str, column: int, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse(HEAD + line + "\nCOMMIT\n", "t.rules")
    assert caught.value.source is not None
    assert (caught.value.source.line, caught.value.source.column) == (RULE_LINE, column)
    assert message in caught.value.message


# Whole files: (text, expected output of write, or None and (line, column, message) of the error)
FILES = [
    (
        "comma expansion is source-major, one rule per pair",
        "*filter\n-A INPUT -s 198.18.0.1,198.18.0.2 -d 198.19.0.1,198.19.0.0/16 -j DROP\nCOMMIT\n",
        [
            "-A INPUT -s 198.18.0.1/32 -d 198.19.0.1/32 -j DROP",
            "-A INPUT -s 198.18.0.1/32 -d 198.19.0.0/16 -j DROP",
            "-A INPUT -s 198.18.0.2/32 -d 198.19.0.1/32 -j DROP",
            "-A INPUT -s 198.18.0.2/32 -d 198.19.0.0/16 -j DROP",
        ],
        None,
    ),
    (
        "-I inserts expanded rules one by one at the same place: reversed",
        "*filter\n-A INPUT -j ACCEPT\n-I INPUT -s 198.18.0.1,198.18.0.2 -j DROP\nCOMMIT\n",
        [
            "-A INPUT -s 198.18.0.2/32 -j DROP",
            "-A INPUT -s 198.18.0.1/32 -j DROP",
            "-A INPUT -j ACCEPT",
        ],
        None,
    ),
    (
        "-I with a position, -N, -P, -F, -X and -Z on rule lines",
        "*filter\n-N a\n-N gone\n-P FORWARD DROP\n-A INPUT -j a\n-A INPUT -j DROP\n"
        "-I INPUT 2 -j ACCEPT\n-A a -j RETURN\n-A gone -j DROP\n-F gone\n-X gone\n-Z\nCOMMIT\n",
        ["-A INPUT -j a", "-A INPUT -j ACCEPT", "-A INPUT -j DROP", "-A a -j RETURN"],
        None,
    ),
    (
        "a second *filter replaces the first but keeps its policies",
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n*filter\n-A OUTPUT -j DROP\n"
        "COMMIT\n",
        ["-A OUTPUT -j DROP"],
        None,
    ),
    (
        "comments, blank lines, leading blanks and a missing final newline",
        "# Generated by iptables-save\n\n*filter\n# a comment\n  -A INPUT -j DROP\nCOMMIT",
        ["-A INPUT -j DROP"],
        None,
    ),
    ("no table at all is an empty filter table", "", [], None),
    ("only other tables", "*nat\nCOMMIT\n", None, (1, 1, "no *filter table here (only nat)")),
    ("other table left open", "*filter\nCOMMIT\n*mangle\n", None, (4, 1, "*mangle table is open")),
    ("not a table", "*filters\nCOMMIT\n", None, (1, 1, "table 'filters' is not an iptables")),
    ("table inside another", "*nat\n*filter\nCOMMIT\n", None, (2, 1, "COMMIT expected first")),
    ("missing COMMIT", "*filter\n-A INPUT -j DROP\n", None, (3, 1, "COMMIT expected")),
    ("rule before *filter", "-A INPUT -j DROP\n", None, (1, 1, "'*filter' expected first")),
    ("COMMIT with trailing blank", "*filter\nCOMMIT \n", None, (2, 1, "bad argument 'COMMIT'")),
    ("table inside table", "*filter\n*filter\nCOMMIT\n", None, (2, 1, "COMMIT expected first")),
    ("blank-only line in a table", "*filter\n   \nCOMMIT\n", None, (2, 1, "no command")),
    ("DOS line ends", "*filter\r\nCOMMIT\r\n", None, (1, 8, "carriage return")),
    ("duplicate chain", "*filter\n:a - [0:0]\n:a - [0:0]\nCOMMIT\n", None, (3, 2, "already")),
    ("duplicate -N", "*filter\n-N a\n-N a\nCOMMIT\n", None, (3, 4, "already exists")),
    ("policy on a user chain", "*filter\n:a DROP [0:0]\nCOMMIT\n", None, (2, 4, "policy")),
    ("-P on a user chain", "*filter\n-N a\n-P a DROP\nCOMMIT\n", None, (3, 4, "built-in")),
    ("bad policy", "*filter\n:INPUT RETURN [0:0]\nCOMMIT\n", None, (2, 8, "bad policy")),
    ("reserved chain name", "*filter\n:ACCEPT - [0:0]\nCOMMIT\n", None, (2, 2, "reserved")),
    (
        "chain name too long",
        "*filter\n:" + "c" * 29 + " - [0:0]\nCOMMIT\n",
        None,
        (2, 2, "28 characters max"),
    ),
    ("-N clashing with a target", "*filter\n-N LOG\nCOMMIT\n", None, (2, 4, "clash")),
    (
        "jump to a chain declared later",
        "*filter\n-A INPUT -j later\n:later - [0:0]\nCOMMIT\n",
        None,
        (2, 13, "does not exist"),
    ),
    ("rule in unknown chain", "*filter\n-A nope -j DROP\nCOMMIT\n", None, (2, 4, "nope")),
    (
        "loop reachable from a built-in chain, reported at the rule closing it",
        "*filter\n:a - [0:0]\n:b - [0:0]\n-A INPUT -j a\n-A a -j b\n-A b -g a\nCOMMIT\n",
        None,
        (6, 1, "loop in the chain graph: a -> b -> a"),
    ),
    (
        "deleting a chain still referred to",
        "*filter\n-N a\n-A INPUT -j a\n-X a\nCOMMIT\n",
        None,
        (4, 4, "refers to it"),
    ),
    (
        "deleting a non-empty chain",
        "*filter\n-N a\n-A a -j DROP\n-X\nCOMMIT\n",
        None,
        (4, 1, "not empty"),
    ),
    (
        "insert past the end",
        "*filter\n-I INPUT 2 -j DROP\nCOMMIT\n",
        None,
        (2, 10, "has 0 rules"),
    ),
    ("bad counters", "*filter\n[1:x] -A INPUT\nCOMMIT\n", None, (2, 1, "invalid counters")),
]


@pytest.mark.parametrize(("name", "text", "expected", "error"), FILES, ids=[f[0] for f in FILES])
def test_files(
    name: str, text: str, expected: list[str] | None, error: tuple[int, int, str] | None
) -> None:
    if error is None:
        assert rules_of(text) == expected
        return
    with pytest.raises(ParseError) as caught:
        parse(text, "f.rules")
    line, column, message = error
    assert caught.value.source is not None
    assert (caught.value.source.line, caught.value.source.column) == (line, column)
    assert message in caught.value.message
    assert str(caught.value).startswith(f"f.rules:{line}:{column}: error: ")


def test_loops_among_unreachable_chains_load_as_in_the_kernel() -> None:
    # mark_source_chains only walks from the hooks: iptables-restore accepts this.
    text = "*filter\n:a - [0:0]\n:b - [0:0]\n-A a -j b\n-A b -j a\nCOMMIT\n"
    assert rules_of(text) == ["-A a -j b", "-A b -j a"]


def test_implicit_protocol_match_is_the_same_as_an_explicit_one() -> None:
    implicit = parse("*filter\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    explicit = parse("*filter\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n")
    assert implicit == explicit
    (rule,) = implicit["INPUT"].rules
    assert rule.matches == (Protocol(6), TcpMatch(dport=TcpMatch().dport.__class__(22, 22)))


def test_model_of_a_rule() -> None:
    ruleset = parse(
        "*filter\n:INPUT DROP [3:180]\n:u - [0:0]\n"
        "[7:420] -A INPUT ! -s 198.18.0.0/255.255.0.255 -i veth+ -j u\nCOMMIT\n",
        "m.rules",
    )
    chain = ruleset["INPUT"]
    assert (chain.policy, chain.packets, chain.bytes) == ("DROP", 3, 180)
    (rule,) = chain.rules
    assert rule.matches == (
        Address("src", 0xC6120000, 0xFFFF00FF, negated=True),
        Interface("in", "veth+"),
    )
    assert rule.target == Jump("u")
    assert (rule.packets, rule.bytes) == (7, 420)
    assert rule.source is not None
    assert (rule.source.file, rule.source.line, rule.source.column) == ("m.rules", 4, 9)
    assert ruleset["u"].policy is None


def test_set_counters_option_overrides_the_prefix() -> None:
    (rule,) = parse("*filter\n[1:2] -A INPUT -c 5 6 -j DROP\nCOMMIT\n")["INPUT"].rules
    assert (rule.packets, rule.bytes) == (5, 6)


def test_parse_error_is_a_rule_error() -> None:
    assert issubclass(ParseError, RuleError)


@pytest.mark.parametrize("parsed", [False, True])
def test_a_jump_read_later_makes_a_user_chain_refuse_what_its_hooks_refuse(parsed) -> None:
    # Each rule is fine as the parser reads it: the owner match is in a chain nothing reaches
    # yet. The jump read after it brings INPUT to that chain, where -m owner is refused; the
    # whole-set check finds it with or without the per-rule checks the parser already made.
    from codegen.rules import validate
    from codegen.rules.iptables_save import parse_dump

    text = (
        "*filter\n:mine - [0:0]\n-A mine -m owner --uid-owner 0 -j DROP\n-A INPUT -j mine\nCOMMIT\n"
    )
    ruleset = parse_dump(text, "f.rules").ruleset
    with pytest.raises(RuleError) as caught:
        validate(ruleset, parsed=parsed)
    assert "(chain mine is reached from INPUT)" in caught.value.message
    assert caught.value.source is not None and caught.value.source.line == 3
