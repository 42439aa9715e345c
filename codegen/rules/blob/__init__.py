"""The kernel's binary filter table: its structs, encoding, decoding and the socket options
that read and replace it (codegen.rules.ipt_blob is the public face)."""
