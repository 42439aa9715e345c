"""A rule file as it comes from disk: bytes that must be UTF-8 text before the parser sees them.

Readers decode here rather than with `read_text()` so that a file that is not text fails with a
`ParseError` naming `FILE:LINE:COL` and the byte offset, as every other rule error does, instead
of a `UnicodeDecodeError` that says neither.
"""

from __future__ import annotations

from codegen.rules.iptables_save import ParseError
from codegen.rules.model import Source


def decode_rules(data: bytes, filename: str) -> str:
    """The text of a rule file: UTF-8, without NUL bytes. Raises `ParseError` at the first byte
    that breaks either, its offset counted from 0 as `cmp` and `xxd -s` count."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad, reason = error.start, error.reason
    else:
        bad, reason = len(data), None
    # A NUL byte is valid UTF-8, so one before the first invalid byte is the first fault.
    nul = data.find(b"\0", 0, bad)
    if nul >= 0:
        raise _error(data, nul, filename, f"line contains a NUL byte at offset {nul}")
    if reason is not None:
        message = f"not valid UTF-8: byte 0x{data[bad]:02x} at offset {bad} ({reason})"
        raise _error(data, bad, filename, message)
    return text


def _error(data: bytes, offset: int, filename: str, message: str) -> ParseError:
    """The error at `offset`, located as the parser locates its own: lines split at LF only,
    columns in characters. Everything before `offset` is valid UTF-8, so the column is exact."""
    start = data.rfind(b"\n", 0, offset) + 1
    end = data.find(b"\n", offset)
    end = len(data) if end < 0 else end
    line = data.count(b"\n", 0, offset) + 1
    column = len(data[start:offset].decode("utf-8")) + 1
    # The line as it is shown under the message: undecodable bytes and NULs as \xNN escapes, so
    # that nothing unprintable reaches the terminal.
    shown = data[start:end].decode("utf-8", "backslashreplace").replace("\0", "\\x00")
    return ParseError(message, Source(filename, line, column, shown))
