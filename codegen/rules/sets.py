"""ipset sets as `-m set` sees them: the model and what each set answers for a packet
(codegen.rules.set_model), `ipset save` text read into it (codegen.rules.sets_text), and the
stand-in sets of test runs. Callers import from here."""

from __future__ import annotations

from codegen.rules.set_model import BITMAP_PORT as BITMAP_PORT
from codegen.rules.set_model import DIMENSIONS as DIMENSIONS
from codegen.rules.set_model import HASH_IP as HASH_IP
from codegen.rules.set_model import HASH_IP_PORT as HASH_IP_PORT
from codegen.rules.set_model import HASH_NET as HASH_NET
from codegen.rules.set_model import HASH_NET_IFACE as HASH_NET_IFACE
from codegen.rules.set_model import HASH_NET_PORT as HASH_NET_PORT
from codegen.rules.set_model import ICMP_NAMES as ICMP_NAMES
from codegen.rules.set_model import LIST_SET as LIST_SET
from codegen.rules.set_model import LIST_SIZE as LIST_SIZE
from codegen.rules.set_model import MAXELEM as MAXELEM
from codegen.rules.set_model import MEMBERS_MAX as MEMBERS_MAX
from codegen.rules.set_model import NAME_MAX as NAME_MAX
from codegen.rules.set_model import PORT_HEADERS as PORT_HEADERS
from codegen.rules.set_model import PORT_NAMES as PORT_NAMES
from codegen.rules.set_model import TYPES as TYPES
from codegen.rules.set_model import WITH_NOMATCH as WITH_NOMATCH
from codegen.rules.set_model import WITH_PORT as WITH_PORT
from codegen.rules.set_model import IpSet as IpSet
from codegen.rules.set_model import Member as Member
from codegen.rules.set_model import SetError as SetError
from codegen.rules.set_model import SetTable as SetTable
from codegen.rules.set_model import looked_up as looked_up
from codegen.rules.sets_text import LineReader as LineReader
from codegen.rules.sets_text import added_members as added_members
from codegen.rules.sets_text import full_message as full_message
from codegen.rules.sets_text import member_identity as member_identity
from codegen.rules.sets_text import parse_sets as parse_sets
from codegen.rules.sets_text import split_words as split_words

# What -m set looks up when no sets are given (the reference evaluator, test runs, the
# extension's examples), as STANDIN_ROUTES is for -m addrtype.
STANDIN_SETS_TEXT = """\
create hosts hash:ip family inet
add hosts 198.18.0.5
add hosts 198.18.1.1
create nets hash:net family inet
add nets 198.18.0.0/16
add nets 198.18.1.0/24 nomatch
add nets 198.18.1.1
create ports bitmap:port range 0-1024
add ports 22
add ports 53
create services hash:ip,port family inet
add services 198.18.1.1,tcp:22
add services 198.18.0.5,udp:53
create netports hash:net,port family inet
add netports 198.18.0.0/24,tcp:22
add netports 198.18.0.0/28,tcp:22 nomatch
"""
STANDIN_SETS = parse_sets(STANDIN_SETS_TEXT, "<stand-in sets>")
