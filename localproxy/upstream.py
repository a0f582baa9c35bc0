"""Opening upstream IMAP and SMTP connections: always TLS, verified, no downgrade.

Every upstream connection of the proxy, and `localproxy check`, goes through
connect_imap() or connect_smtp(), so what `check` reports is exactly what the
proxy will do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
from dataclasses import dataclass

import aiosmtplib

from localproxy.config import UpstreamServer
from localproxy.tls import Failure, TLSInfo, UpstreamError, classify, client_context, verify_session

MAX_PRE_TLS_LINE = 8192  # a greeting or capability line; anything longer is hostile


@dataclass
class ImapUpstream:
    """A TLS-protected IMAP connection, greeting consumed, ready for the next command."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    greeting: bytes  # the server's first line, as received
    tls: TLSInfo

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


# --------------------------------------------------------------------------- IMAP


async def connect_imap(server: UpstreamServer, stream_limit: int = 2**20) -> ImapUpstream:
    """Connect to an upstream IMAP server with implicit TLS or mandatory STARTTLS."""
    try:
        async with asyncio.timeout(server.timeout):  # not wait_for: see aio.py
            return await _connect_imap(server, stream_limit)
    except UpstreamError:
        raise
    except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise classify(exc, server) from exc


async def _connect_imap(server: UpstreamServer, stream_limit: int) -> ImapUpstream:
    ctx = client_context(server)
    if server.security == "tls":
        reader, writer = await asyncio.open_connection(
            server.host, server.port, ssl=ctx, server_hostname=server.host, limit=stream_limit
        )
        tls = _session_info(writer, server, starttls=False)
        greeting = await _read_greeting(reader, server)
        return ImapUpstream(reader, writer, greeting, tls)
    sock = await _tcp_connect(server)
    try:
        greeting = await _imap_starttls_dialogue(sock, server)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname=server.host, limit=stream_limit
        )
    except BaseException:
        sock.close()
        raise
    return ImapUpstream(reader, writer, greeting, _session_info(writer, server, starttls=True))


def _session_info(writer: asyncio.StreamWriter, server: UpstreamServer, starttls: bool) -> TLSInfo:
    ssl_object = writer.get_extra_info("ssl_object")
    try:
        return verify_session(ssl_object, server, starttls=starttls)
    except UpstreamError:
        writer.close()
        raise


async def _read_greeting(reader: asyncio.StreamReader, server: UpstreamServer) -> bytes:
    line = await reader.readline()
    if not line:
        raise UpstreamError(
            Failure.PROTOCOL,
            server.host,
            server.port,
            "the server closed the connection before greeting",
        )
    if not line.startswith((b"* OK", b"* PREAUTH")):
        raise UpstreamError(
            Failure.PROTOCOL, server.host, server.port, f"not an IMAP greeting: {_show(line)}"
        )
    return line


async def _tcp_connect(server: UpstreamServer) -> socket.socket:
    """A plain TCP socket, used only for the pre-STARTTLS exchange."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"no address for {server.host}")


class _PlainLines:
    """Line reader over a raw socket that keeps its buffer visible.

    After the server's OK to STARTTLS nothing may follow until the handshake;
    bytes already buffered then were injected in clear (CVE-2011-0411 class)
    and must never be read later as if they had arrived over TLS.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    async def line(self) -> bytes:
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_PRE_TLS_LINE:
                raise ValueError("line too long")
            chunk = await loop.sock_recv(self.sock, 4096)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)


async def _imap_starttls_dialogue(sock: socket.socket, server: UpstreamServer) -> bytes:
    def fail(failure: Failure, detail: str) -> UpstreamError:
        return UpstreamError(failure, server.host, server.port, detail)

    lines = _PlainLines(sock)
    try:
        greeting = await lines.line()
        if greeting.startswith(b"* PREAUTH"):
            raise fail(
                Failure.STARTTLS_NOT_OFFERED,
                "the server pre-authenticated the connection in clear; STARTTLS "
                "is impossible, refusing to continue without TLS",
            )
        if not greeting.startswith(b"* OK"):
            raise fail(Failure.PROTOCOL, f"not an IMAP greeting: {_show(greeting)}")
        await lines.send(b"LP1 CAPABILITY\r\n")
        capabilities = await _imap_tagged(lines, b"LP1")
        if b"STARTTLS" not in (greeting + capabilities).upper().split():
            raise fail(
                Failure.STARTTLS_NOT_OFFERED,
                "the server does not offer STARTTLS; refusing to continue without "
                'TLS (use security = "tls" if it has an implicit-TLS port)',
            )
        await lines.send(b"LP2 STARTTLS\r\n")
        answer = await _imap_tagged(lines, b"LP2")
    except ValueError:
        raise fail(Failure.PROTOCOL, "overlong line before STARTTLS") from None
    if not answer.startswith(b"LP2 OK"):
        raise fail(
            Failure.STARTTLS_REFUSED,
            f"the server refused STARTTLS ({_show(answer)}); not continuing in clear",
        )
    if lines.buffer:
        raise fail(
            Failure.PROTOCOL,
            "data arrived in clear after the STARTTLS answer "
            "(possible injection attack); connection dropped",
        )
    return greeting


async def _imap_tagged(lines: _PlainLines, tag: bytes) -> bytes:
    """Read until the tagged answer; untagged lines are collected in front of it."""
    collected = b""
    while True:
        line = await lines.line()
        if line.startswith(tag + b" "):
            return line if not collected else collected + line
        collected += line


def _show(line: bytes) -> str:
    return line.decode("utf-8", "replace").strip()[:200]


# --------------------------------------------------------------------------- SMTP


async def connect_smtp(
    server: UpstreamServer, local_hostname: str | None = None
) -> tuple[aiosmtplib.SMTP, TLSInfo]:
    """Connect to an upstream SMTP server; EHLO done over TLS, ready for AUTH."""
    smtp = aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        use_tls=server.security == "tls",
        start_tls=False,
        tls_context=client_context(server),
        timeout=server.timeout,
        local_hostname=local_hostname or "localhost",
    )
    try:
        await smtp.connect()
        if server.security == "starttls":
            await _smtp_starttls(smtp, server)
        info = verify_session(
            smtp.get_transport_info("ssl_object"), server, starttls=server.security == "starttls"
        )
        await smtp.ehlo()
    except BaseException as exc:
        smtp.close()
        if isinstance(exc, UpstreamError | asyncio.CancelledError):
            raise
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            raise UpstreamError(
                Failure.PROTOCOL,
                server.host,
                server.port,
                f"the server answered {exc.code} {exc.message}",
            ) from exc
        raise classify(exc, server) from exc
    return smtp, info


async def _smtp_starttls(smtp: aiosmtplib.SMTP, server: UpstreamServer) -> None:
    await smtp.ehlo()
    if not smtp.supports_extension("starttls"):
        raise UpstreamError(
            Failure.STARTTLS_NOT_OFFERED,
            server.host,
            server.port,
            "the server does not offer STARTTLS; refusing to continue "
            'without TLS (use security = "tls" if it has port 465)',
        )
    try:
        await smtp.starttls()
    except aiosmtplib.SMTPResponseException as exc:
        raise UpstreamError(
            Failure.STARTTLS_REFUSED,
            server.host,
            server.port,
            f"the server refused STARTTLS ({exc.code} {exc.message}); not continuing in clear",
        ) from exc


# --------------------------------------------------------------------------- login (check --login)


class LoginFailed(Exception):
    """The provider rejected the credentials; the message is the provider's own."""


async def imap_login(conn: ImapUpstream, username: str, password: str) -> str:
    """imap_authenticate(), then LOGOUT: a login check."""
    answer = await imap_authenticate(conn, username, password)
    conn.writer.write(b"LP5 LOGOUT\r\n")
    return answer


async def imap_authenticate(conn: ImapUpstream, username: str, password: str) -> str:
    """Authenticate with AUTHENTICATE PLAIN when offered, else LOGIN; return the OK text."""
    conn.writer.write(b"LP3 CAPABILITY\r\n")
    caps = (await _stream_tagged(conn.reader, b"LP3")).upper().split()
    if b"AUTH=PLAIN" in caps:
        token = base64.b64encode(f"\0{username}\0{password}".encode())
        if b"SASL-IR" in caps:
            conn.writer.write(b"LP4 AUTHENTICATE PLAIN " + token + b"\r\n")
        else:
            conn.writer.write(b"LP4 AUTHENTICATE PLAIN\r\n")
            if not (await conn.reader.readline()).startswith(b"+"):
                raise LoginFailed("the server did not accept AUTHENTICATE PLAIN")
            conn.writer.write(token + b"\r\n")
    elif b"LOGINDISABLED" in caps:
        raise LoginFailed("the server disables LOGIN and offers no AUTH=PLAIN")
    elif not _quotable(username) or not _quotable(password):
        raise LoginFailed(
            "the user name or password has characters IMAP LOGIN cannot carry "
            "as a quoted string, and the server offers no AUTH=PLAIN"
        )
    else:
        conn.writer.write(b"LP4 LOGIN " + _quoted(username) + b" " + _quoted(password) + b"\r\n")
    return await _tagged_ok(conn, b"LP4", LoginFailed)


async def imap_authenticate_xoauth2(conn: ImapUpstream, username: str, token: str) -> str:
    """AUTHENTICATE XOAUTH2 (Gmail, Microsoft 365) with an OAuth access token."""
    blob = base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())
    conn.writer.write(b"LP4 AUTHENTICATE XOAUTH2 " + blob + b"\r\n")
    first = await conn.reader.readline()
    if first.startswith(b"+"):  # error details as a challenge (RFC 7628 3.2.2): end it
        conn.writer.write(b"\r\n")
        first = b""
    return await _tagged_ok(conn, b"LP4", LoginFailed, first=first)


async def imap_append(conn: ImapUpstream, mailbox: bytes, message: bytes) -> str:
    """APPEND one message (CRLF line ends) to a mailbox after authentication; the OK
    text, or UpstreamReply with the server's refusal."""
    conn.writer.write(b"LP6 APPEND %s {%d}\r\n" % (_quoted(mailbox.decode()), len(message)))
    line = await conn.reader.readline()
    while line.startswith(b"* "):  # untagged news before the continuation
        line = await conn.reader.readline()
    if not line.startswith(b"+"):
        return await _tagged_ok(conn, b"LP6", UpstreamReply, first=line)
    conn.writer.write(message + b"\r\n")
    return await _tagged_ok(conn, b"LP6", UpstreamReply)


class UpstreamReply(Exception):
    """The server refused a command; str() is its answer."""


async def _tagged_ok(
    conn: ImapUpstream, tag: bytes, error: type[Exception], first: bytes = b""
) -> str:
    collected = first
    if not first.startswith(tag + b" "):
        collected += await _stream_tagged(conn.reader, tag)
    answer = collected.splitlines()[-1].removeprefix(tag + b" ")
    if not answer.startswith(b"OK"):
        raise error(_show(answer))
    return _show(answer)


def _quotable(value: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in value)


def _quoted(value: str) -> bytes:
    return b'"' + value.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


async def _stream_tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    collected = b""
    while True:
        line = await reader.readline()
        if not line:
            raise LoginFailed("the server closed the connection")
        collected += line
        if line.startswith(tag + b" "):
            return collected


async def smtp_login(smtp: aiosmtplib.SMTP, username: str, password: str) -> str:
    try:
        response = await smtp.login(username, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise LoginFailed(f"{exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise LoginFailed(str(exc)) from None
    return f"{response.code} {response.message}"
