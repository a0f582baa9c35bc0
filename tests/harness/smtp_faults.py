"""An SMTP relay in front of the harness' Postfix that fails on cue.

It terminates implicit TLS with the harness' own server certificate (so the
proxy under test verifies it as usual), opens implicit TLS to Postfix's
submissions port, and relays line by line, so it can see SMTP and fail at an
exact point: after N accepted messages, drop the connection or answer 451 to
the next MAIL; or refuse every connection while "down".
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from tests.harness.provider import Provider


class SmtpFaultRelay:
    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.accepted = 0  # messages Postfix accepted through this relay
        self.fail_after: int | None = None  # fail the transaction after this many
        self.mode = "drop"  # "drop": close both sides; "451": answer MAIL with 451
        self.down = False  # refuse every new connection
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
            if verb == b"MAIL" and self._failing():
                if self.mode == "451":
                    writer.write(b"451 4.3.0 simulated temporary failure\r\n")
                    continue
                return  # "drop": the provider vanishes mid-session
            up_writer.write(line)
            if verb == b"DATA":
                reply = await _reply(up_reader)
                writer.write(reply)
                if reply.startswith(b"354"):
                    await _copy_data(reader, up_writer)
                    final = await _reply(up_reader)
                    self.accepted += final.startswith(b"250")
                    writer.write(final)
                continue
            writer.write(await _reply(up_reader))
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    def _failing(self) -> bool:
        return self.fail_after is not None and self.accepted >= self.fail_after


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


async def _copy_data(reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        up_writer.write(line)
        if line == b".\r\n":
            return
