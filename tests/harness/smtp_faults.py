"""An SMTP relay in front of the harness' Postfix that fails on cue.

It terminates implicit TLS with the harness' own server certificate (so the
proxy under test verifies it as usual; `use_certificate` swaps it), opens implicit
TLS to Postfix's submissions port, and relays line by line, so it can see SMTP and
fail at an exact point. After N accepted messages, the next transaction fails by mode:

- "drop": close both sides at MAIL;
- "drop-at-auth": close both sides when the client sends AUTH;
- "451": answer MAIL with 451;
- "drop-in-data": pass MAIL, RCPT and part of the message, then close both sides;
- "stall": pass the message but hold back its final "." and never answer, until
  the client gives up and closes (Postfix then discards the partial message);
- "drop-after-data": pass the whole message with its final "." and let Postfix
  accept it, then close both sides instead of passing the 250 on;
- "stall-after-data": the same, but keep the 250 and stay silent until the client
  gives up and closes (Postfix has stored the message all the same).

The relay hides CHUNKING from the client unless `chunking` is set; with it, a BDAT
chunk fails the same ways ("drop-in-data": part of it; "stall": all but its last
octet; the after-data modes: a whole BDAT ... LAST chunk, then Postfix's reply is
kept back). While "down", every connection is closed right after the handshake.
Every message body the relay saw (complete or not) is kept in `data_seen`, so tests
can check what went out. How the connection to the client ends (`close_style`:
"close_notify", "no_close_notify", "rst") and the handshake counts come from
`TlsFaultRelay` (tcp_faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

from localproxy.sandbox.provider import Provider
from tests.harness.tcp_faults import TlsFaultRelay

Mode = Literal[
    "drop", "drop-at-auth", "451", "drop-in-data", "stall", "drop-after-data", "stall-after-data"
]
IN_DATA_MODES = ("drop-in-data", "stall")
AFTER_DATA_MODES = ("drop-after-data", "stall-after-data")
DROP_AFTER_BYTES = 512  # "drop-in-data" forwards about this much of the message


class SmtpFaultRelay(TlsFaultRelay):
    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.accepted = 0  # messages Postfix accepted through this relay
        self.fail_after: int | None = None  # fail the transaction after this many
        self.mode: Mode = "drop"  # see the module docstring
        self.down = False  # close every new connection at once
        self.chunking = False  # pass the provider's CHUNKING (BDAT) on to the client
        self.verbs: list[bytes] = []  # every command verb the client sent
        self.faults = 0  # how many times a fault was injected
        self.data_seen: list[bytes] = []  # each message body received from the client

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            return
        up_reader, up_writer = await asyncio.open_connection(
            self.provider.host,
            self.provider.submissions_port,
            ssl=self.provider.ssl_context(),
            server_hostname=self.provider.hostname,
        )
        try:
            await self._smtp(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    async def _smtp(
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
                    failing = self._failing()
                    if failing and self.mode in IN_DATA_MODES:
                        self.faults += 1
                        await self._fail_in_data(reader, up_writer)
                        return
                    self.data_seen.append(await _copy_data(reader, up_writer))
                    final = await _reply(up_reader)
                    self.accepted += final.startswith(b"250")
                    if failing and self.mode in AFTER_DATA_MODES:
                        await self._fail_after_data(reader)
                        return
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
        failing, last = self._failing(), b"LAST" in line.upper()
        if failing and self.mode in IN_DATA_MODES:
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
        self.accepted += reply.startswith(b"250") and last
        if failing and last and self.mode in AFTER_DATA_MODES:
            await self._fail_after_data(reader)
            return False
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

    async def _fail_after_data(self, reader: asyncio.StreamReader) -> None:
        """Postfix answered the end of the data; the client never hears it."""
        self.faults += 1
        if self.mode == "stall-after-data":
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
