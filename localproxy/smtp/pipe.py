"""The provider's SMTP connection after login: commands pipelined, replies in order.

aiosmtplib opens the connection (verified TLS, STARTTLS without downgrade, AUTH), then
:class:`Pipe` takes over its transport. aiosmtplib waits for one reply per command
and drops a reply that arrives while the previous one is not yet picked up, so it
cannot pipeline (RFC 2920); and its per-command machinery cost about as much CPU as
the rest of the relay. Here a command batch is one write, and the replies are matched
to it in order by the sans-IO :class:`ReplyParser`.

Errors keep aiosmtplib's types, so callers handle both alike: a refusal is an
``SMTPResponseException`` with the provider's code and text, a lost connection
``SMTPServerDisconnected``, a silent provider ``SMTPReadTimeoutError``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable, Iterator

import aiosmtplib
from aiosmtplib import SMTPResponse

CRLF = b"\r\n"
MAX_REPLY_LINE = 2048  # RFC 5321 4.5.3.1.5 allows 512; be lenient, not unbounded
MAX_REPLY_LINES = 200
DATA_CHUNK = 1 << 20  # octets written before waiting for the connection to drain
SMALL_MESSAGE = 256 * 1024  # octets: sent with its BDAT command in one write


class ReplyError(aiosmtplib.SMTPServerDisconnected):
    """The provider sent something that is not an SMTP reply: the session cannot go on."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"malformed reply from the provider: {detail}")


class ReplyParser:
    """Bytes in, complete replies out (RFC 5321 4.2: ``code-text`` lines, then
    ``code text``). Multi-line texts are joined with newlines, as aiosmtplib does."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._code = b""

    def feed(self, data: bytes) -> list[SMTPResponse]:
        self._buffer += data
        replies = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        if len(self._buffer) > MAX_REPLY_LINE:
            raise ReplyError(f"a line longer than {MAX_REPLY_LINE} octets")
        return replies

    def _line(self, line: bytes) -> SMTPResponse | None:
        code, separator = line[:3], line[3:4]
        if len(line) > MAX_REPLY_LINE:
            raise ReplyError(f"a line longer than {MAX_REPLY_LINE} octets")
        if not code.isdigit() or separator not in (b"-", b" ", b"\r", b"\n"):
            raise ReplyError(repr(line[:80]))
        if self._lines and code != self._code:
            raise ReplyError(f"reply code changed within a reply: {line[:80]!r}")
        self._code = code
        self._lines.append(line[4:].strip(b" \t\r\n"))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ReplyError(f"a reply of more than {MAX_REPLY_LINES} lines")
        if separator == b"-":
            return None
        text = b"\n".join(self._lines).decode("utf-8", "surrogateescape")
        self._lines = []
        return SMTPResponse(int(code), text)


class Pipe(asyncio.Protocol):
    """One upstream SMTP session, already logged in. Not for concurrent use: the
    SMTP session is a sequence, and the caller owns it."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("the provider closed the connection")
        self.extensions = dict(smtp.esmtp_extensions)
        self.timeout = smtp.timeout
        self._parser = ReplyParser()
        self._waiting: collections.deque[asyncio.Future[SMTPResponse]] = collections.deque()
        self._drained: asyncio.Future[None] | None = None
        self._lost: Exception | None = None
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        transport.set_protocol(self)

    # ------------------------------------------------------------------ protocol

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ReplyError as exc:
            self._fail(exc)
            return
        for reply in replies:
            if not self._waiting:
                # Unasked for (421 before a shutdown, or out of step): the session is over.
                text = f"the provider said {reply.code} {reply.message}"
                self._fail(aiosmtplib.SMTPServerDisconnected(text))
                return
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f" ({exc})" if exc else ""
        self._fail(aiosmtplib.SMTPServerDisconnected(f"the provider closed the connection{detail}"))

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def _fail(self, error: Exception) -> None:
        self._lost = self._lost or error
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # marked seen: a writer that failed first never awaits it
        self.resume_writing()  # a writer waiting to drain wakes and finds _lost set
        self.transport.close()

    # ------------------------------------------------------------------ API

    @property
    def is_connected(self) -> bool:
        return self._lost is None and not self.transport.is_closing()

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self.extensions

    def close(self) -> None:
        self._lost = self._lost or aiosmtplib.SMTPServerDisconnected("connection closed")
        self.transport.close()

    async def commands(self, *lines: bytes) -> list[SMTPResponse]:
        """Each line's reply, in order. Written back to back when the provider offers
        PIPELINING, else one after the other."""
        for line in lines:
            if b"\r" in line or b"\n" in line:
                raise ValueError("an SMTP command must not contain CR or LF")
        if len(lines) > 1 and not self.supports_extension("pipelining"):
            return [reply for line in lines for reply in await self.commands(line)]
        waiters = self._expect(len(lines))
        self.transport.write(b"".join(line + CRLF for line in lines))
        return await self._replies(waiters)

    async def command(self, line: bytes, expected: Iterable[int] = (250,)) -> SMTPResponse:
        """One command; SMTPResponseException unless its reply code is expected."""
        (reply,) = await self.commands(line)
        return checked(reply, expected)

    async def send_message(self, message: bytes) -> SMTPResponse:
        """The message (CRLF line endings) as one BDAT ... LAST when the provider offers
        CHUNKING (RFC 3030: no dot-stuffing, one round trip less), else DATA."""
        if self.supports_extension("chunking") and message.endswith(CRLF):
            waiters = self._expect(1)
            command = b"BDAT %d LAST\r\n" % len(message)
            if len(message) <= SMALL_MESSAGE:
                # One write, one TLS record run, one wake-up of the provider: a
                # separate command write costs a send() and a context switch.
                self.transport.write(command + message)
            else:
                self.transport.write(command)
                await self._write_flowing(_pieces(message))
        else:
            await self.command(b"DATA", expected=(354,))
            waiters = self._expect(1)
            await self._write_flowing(dot_stuffed(message))
            self.transport.write(b".\r\n" if message.endswith(CRLF) else b"\r\n.\r\n")
        (reply,) = await self._replies(waiters)
        return checked(reply, (250,))

    # ------------------------------------------------------------------ helpers

    def _expect(self, count: int) -> list[asyncio.Future[SMTPResponse]]:
        if self._lost is not None:
            raise self._lost
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in range(count)]
        self._waiting.extend(waiters)
        return waiters

    async def _replies(self, waiters: list[asyncio.Future[SMTPResponse]]) -> list[SMTPResponse]:
        try:
            async with asyncio.timeout(self.timeout):
                return [await waiter for waiter in waiters]
        except TimeoutError:
            # A reply still owed would pair with the next command: this session is over.
            error = aiosmtplib.SMTPReadTimeoutError("timed out waiting for the provider's reply")
            self._fail(error)
            raise error from None

    async def _write_flowing(self, pieces: Iterator[memoryview | bytes]) -> None:
        written = 0
        for piece in pieces:
            self.transport.write(piece)
            written += len(piece)
            if written >= DATA_CHUNK:
                written = 0
                await self._drain()

    async def _drain(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._drained is not None:
            async with asyncio.timeout(self.timeout):
                await self._drained
            if self._lost is not None:
                raise self._lost


def checked(reply: SMTPResponse, expected: Iterable[int]) -> SMTPResponse:
    if reply.code not in expected:
        raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
    return reply


def _pieces(message: bytes) -> Iterator[memoryview]:
    view = memoryview(message)
    return (view[i : i + DATA_CHUNK] for i in range(0, len(view), DATA_CHUNK))


def dot_stuffed(message: bytes) -> Iterator[memoryview | bytes]:
    """The message in pieces of about DATA_CHUNK octets, a "." added before each line
    that starts with one (RFC 5321 4.5.2)."""
    view, position = memoryview(message), 0
    if message.startswith(b"."):
        yield b"."
    while position < len(message):
        # +2: a line start just past the chunk's end is found here, not missed at the seam
        dot = message.find(b"\r\n.", position, position + DATA_CHUNK + 2)
        stop = dot + 2 if dot >= 0 else min(position + DATA_CHUNK, len(message))
        yield view[position:stop]
        if dot >= 0:
            yield b"."
        position = stop
