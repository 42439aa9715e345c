"""The kernel's binary filter table (IPv4 `ip_tables`), read and written as iptables-legacy does.

`read_table` asks the kernel of the calling thread's network namespace for the `filter` table
(IPT_SO_GET_INFO, then IPT_SO_GET_ENTRIES) and decodes it into a `Ruleset`; `write_table`
encodes a `Ruleset` into a `struct ipt_replace` with the layout libiptc's TC_COMMIT builds
(IPT_SO_SET_REPLACE), then sets every counter (IPT_SO_SET_ADD_COUNTERS), as
`iptables-legacy-restore -c` does. `encode_table` and `decode_table` do the same in memory.

The work is in codegen.rules.blob: `structs` (the UAPI), `encode`, `decode` and `kernel` (the
socket options); each match's payload is its extension's (codegen.rules.extensions).
"""

from codegen.rules.blob.decode import decode_entries, decode_table
from codegen.rules.blob.encode import encode_counters, encode_table
from codegen.rules.blob.kernel import TableInfo, read_entries, read_table, write_table
from codegen.rules.blob.structs import BlobError

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
