"""IMAP wire forms of strings (RFC 3501 section 4.3, RFC 9051 section 4.3).

Everything the proxy generates in a response goes through these, so quoting
is decided in one place.
"""

from __future__ import annotations

# Characters allowed in a quoted string besides the escaped '"' and '\\'.
_QUOTABLE = frozenset(range(0x20, 0x7F))


def literal(data: bytes) -> bytes:
    """A synchronizing literal as a server sends it: {N}CRLF followed by the bytes."""
    return b"{%d}\r\n" % len(data) + data


def string(value: bytes | str) -> bytes:
    """A quoted string when possible, otherwise a literal (8-bit, CR, LF, long)."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if len(data) <= 1024 and all(b in _QUOTABLE for b in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return literal(data)


def nstring(value: bytes | str | None) -> bytes:
    """NIL or a string."""
    return b"NIL" if value is None else string(value)


def number(value: int) -> bytes:
    return str(value).encode("ascii")


def plist(items: list[bytes]) -> bytes:
    """A parenthesized list of already-encoded items; NIL for an empty optional list
    is the caller's choice."""
    return b"(" + b" ".join(items) + b")"
