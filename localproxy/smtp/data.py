"""Receiving SMTP DATA in blocks rather than lines (RFC 5321 4.5.2): sans-IO.

aiosmtpd reads DATA one line at a time and keeps every line as its own bytearray:
per message about 300 awaits for 20 KB, and for 25 MB half a million objects
that weigh as much as the message again. The listener instead reads up to each
``END_MARK`` (or a buffer full) and feeds the pieces here, which finds the end of
the data, enforces the size and line limits, and undoes the dot-stuffing once.
"""

from __future__ import annotations

import enum

END_MARK = b".\r\n"  # wait for this; it ends the data only at the start of a line
_END = b"\r\n.\r\n"  # the line before the mark counts: DATA follows the command's CRLF
LINE_LIMIT = 1000  # octets per line including CRLF (RFC 5321 4.5.3.1.6)


class DataProblem(enum.Enum):
    TOO_MUCH = "too much mail data"
    TOO_LONG = "line too long"


class DataReceiver:
    """One DATA transfer, fed in pieces cut anywhere.

    After a problem the rest is still read (the client is mid-transfer, RFC 5321
    4.2.5 answers after the end) but no longer kept.
    """

    def __init__(self, size_limit: int | None, line_limit: int = LINE_LIMIT) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.problem: DataProblem | None = None
        # One growing buffer, not a list of pieces: freed pieces of a large message
        # would stay in the allocator's heap (RSS) long after the message is gone.
        self._data = bytearray()
        self._size = 0
        self._tail = b"\r\n"  # the last (up to) four octets seen
        self._line = 0  # octets of the line not yet ended

    def feed(self, piece: bytes) -> int | None:
        """Take the next octets; once the data ended, how many of them were data (any
        rest belongs to the next command)."""
        seam = (self._tail + piece[:4]).find(_END)
        if seam >= 0:
            end: int | None = seam + len(_END) - len(self._tail)
        else:
            found = piece.find(_END)
            end = found + len(_END) if found >= 0 else None
        data = piece if end is None or end == len(piece) else piece[:end]
        self._take(data)
        return end

    def _take(self, data: bytes) -> None:
        self._tail = (self._tail + data[-4:])[-4:]
        self._size += len(data)
        if self.problem is None:
            self._check_lines(data)
        limit = self.size_limit
        if self.problem is None and limit and self._size > limit + len(END_MARK):
            self.problem = DataProblem.TOO_MUCH  # the end mark is not message data
        if self.problem is None:
            self._data += data
        else:
            self._data = bytearray()  # free the memory now, not at the end

    def _check_lines(self, data: bytes) -> None:
        lines = data.split(b"\n")
        if len(lines) == 1:
            self._line += len(data)
            longest = 0  # the line has not ended yet; only its length so far counts
        else:
            inner = max(map(len, lines[1:-1]), default=0)
            longest = max(self._line + len(lines[0]), inner) + 1
            self._line = len(lines[-1])
        if max(longest, self._line) > self.line_limit:
            self.problem = DataProblem.TOO_LONG

    def content(self) -> bytes:
        """The message as the client meant it: without the end mark, dots unstuffed."""
        assert self.problem is None, self.problem
        data, self._data = self._data, bytearray()
        del data[len(data) - len(END_MARK) :]
        if data.startswith(b"."):
            del data[:1]
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n")
        return bytes(data)
