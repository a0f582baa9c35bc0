"""An SMTP relay in front of the harness' Postfix that fails on cue.

It terminates implicit TLS with the harness' own server certificate (so the
proxy under test verifies it as usual), opens implicit TLS to Postfix's
submissions port, and relays line by line, so it can see SMTP and fail at an
exact point. After N accepted messages, the next transaction fails by mode:

- "drop": close both sides at MAIL;
- "drop-at-auth": close both sides when the client sends AUTH;
- "451": answer MAIL with 451;
- "drop-in-data": pass MAIL, RCPT and part of the message, then close both sides;
- "stall": pass the message but hold back its final "." and never answer, until
  the client gives up and closes (Postfix then discards the partial message).

The relay hides CHUNKING from the client unless `chunking` is set; with it, a BDAT
chunk fails the same ways ("drop-in-data": part of it; "stall": all but its last
octet). While "down", every connection is refused. Every message body the relay saw
(complete or not) is kept in `data_seen`, so tests can check what went out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Literal

from localproxy.sandbox.provider import Provider

Mode = Literal["drop", "drop-at-auth", "451", "drop-in-data", "stall"]
IN_DATA_MODES = ("drop-in-data", "stall")
DROP_AFTER_BYTES = 512  # "drop-in-data" forwards about this much of the message


class SmtpFaultRelay:
    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.accepted = 0  # messages Postfix accepted through this relay
        self.fail_after: int | None = None  # fail the transaction after this many
        self.mode: Mode = "drop"  # see the module docstring
        self.down = False  # refuse every new connection
        self.chunking = False  # pass the provider's CHUNKING (BDAT) on to the client
        self.verbs: list[bytes] = []  # every command verb the client sent
        self.faults = 0  # how many times a fault was injected
        self.data_seen: list[bytes] = []  # each message body received from the client
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.provider.ca.cert_file, self.provider.ca.key_file)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.provider.host,
                self.provider.submissions_port,
                ssl=self.provider.ssl_context(),
                server_hostname=self.provider.hostname,
            )
            await self._relay(reader, writer, up_reader, up_writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, locals().get("up_writer")):
                if w is not None:
                    w.close()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        writer.write(await _reply(up_reader))  # greeting
        while line := await reader.readline():
            verb = line[:4].upper()
            self.verbs.append(verb)
            if verb == b"AUTH" and self._failing() and self.mode == "drop-at-auth":
                self.faults += 1
                return
            if verb == b"MAIL" and self._failing() and self.mode in ("drop", "451"):
                self.faults += 1
                if self.mode == "451":
                    writer.write(b"451 4.3.0 simulated temporary failure\r\n")
                    continue
                return  # "drop": the provider vanishes mid-session
            if verb == b"BDAT":
                if not await self._bdat(line, reader, writer, up_reader, up_writer):
                    return
                continue
            up_writer.write(line)
            if verb == b"EHLO" and not self.chunking:
                writer.write(_without_chunking(await _reply(up_reader)))
                continue
            if verb == b"DATA":
                reply = await _reply(up_reader)
                writer.write(reply)
                if reply.startswith(b"354"):
                    if self._failing() and self.mode in IN_DATA_MODES:
                        self.faults += 1
                        await self._fail_in_data(reader, up_writer)
                        return
                    self.data_seen.append(await _copy_data(reader, up_writer))
                    final = await _reply(up_reader)
                    self.accepted += final.startswith(b"250")
                    writer.write(final)
                continue
            writer.write(await _reply(up_reader))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    async def _bdat(
        self,
        line: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> bool:
        """Relay one BDAT chunk; False once the connection is to end."""
        chunk = await reader.readexactly(int(line.split()[1]))
        if self._failing() and self.mode in IN_DATA_MODES:
            self.faults += 1
            keep = DROP_AFTER_BYTES if self.mode == "drop-in-data" else len(chunk) - 1
            up_writer.write(line + chunk[:keep])  # never the whole chunk: nothing is stored
            self.data_seen.append(chunk[:keep])
            with contextlib.suppress(ConnectionError):
                await up_writer.drain()
            if self.mode == "stall":
                await _silent_until_closed(reader)
            return False
        up_writer.write(line + chunk)
        self.data_seen.append(chunk)
        reply = await _reply(up_reader)
        self.accepted += reply.startswith(b"250") and b"LAST" in line.upper()
        writer.write(reply)
        return True

    def _failing(self) -> bool:
        return self.fail_after is not None and self.accepted >= self.fail_after

    async def _fail_in_data(
        self, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> None:
        """Forward part ("drop-in-data") or all but the end ("stall") of the message."""
        limit = DROP_AFTER_BYTES if self.mode == "drop-in-data" else None
        seen = await _copy_data(reader, up_writer, limit=limit, send_end=False)
        self.data_seen.append(seen)
        with contextlib.suppress(ConnectionError):
            await up_writer.drain()
        if self.mode == "stall":
            await _silent_until_closed(reader)


async def _silent_until_closed(reader: asyncio.StreamReader) -> None:
    """A provider that took the message and never answers: read until the client quits."""
    while await reader.read(65536):
        pass


def _without_chunking(reply: bytes) -> bytes:
    """An EHLO reply as from a provider that does not offer CHUNKING."""
    lines = [x for x in reply.split(b"\r\n") if x and x[4:].upper() != b"CHUNKING"]
    last = lines[-1]
    lines[-1] = last[:3] + b" " + last[4:]
    return b"".join(x + b"\r\n" for x in lines)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One complete (possibly multi-line) SMTP reply."""
    lines = b""
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(lines, None)
        lines += line
        if len(line) < 4 or line[3:4] != b"-":
            return lines


async def _copy_data(
    reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    limit: int | None = None,
    send_end: bool = True,
) -> bytes:
    """Relay message lines up to the final "." (or `limit` bytes); return what was read."""
    seen = b""
    while limit is None or len(seen) < limit:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(seen, None)
        if line == b".\r\n":
            if send_end:
                up_writer.write(line)
            return seen
        seen += line
        up_writer.write(line)
    return seen
