"""A byte-level TLS relay in front of the harness' Dovecot IMAPS that fails on cue.

It accepts TCP, terminates TLS with a certificate that can be swapped between
connections (`use_certificate`), opens implicit TLS to Dovecot's IMAPS port and
copies bytes both ways. Everything the client sent after a completed handshake is
kept in `received`. `cut_on`: when the client's bytes contain this marker, the relay
forwards the bytes up to and including it (plus `cut_extra` more bytes) and then
closes both sides, as if the provider died right there. With `cut_reply = True` the
command goes through whole and the provider's answer is cut after `cut_extra` bytes
instead (a FETCH dying mid-literal).

How it dies (`close_style`): "close_notify" (an orderly TLS shutdown), "no_close_notify"
(TCP closed under TLS, as a crashed server or a middlebox does) or "rst" (a TCP
reset). `trickle`: the provider's bytes reach the client in pieces of this many bytes,
1 ms apart (a slow or fragmenting network).

A provider that stalls instead: with `stall_greeting` the relay completes the TLS
handshake and then never sends a byte (it does not even reach Dovecot); with `stall_on`
it relays normally until the client's bytes contain that marker, then swallows the
client's bytes from the marker on and the provider's from then on, holding both
connections open (`stalls` counts either); with `stall_reads` as well it stops reading
the client's bytes there, so the client's sends block once the buffers are full (a
provider that takes no more data). `drop_connections()` ends every open
connection right now, by `close_style` (the provider dies while the client is idle).

`TlsFaultRelay` is the front both this relay and `SmtpFaultRelay` share: TLS
termination with a swappable certificate, handshake counts, and the close style.
`BackgroundLoop` runs such relays on an event loop of their own in a thread, so a
`localproxy run` subprocess can be pointed at them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

from localproxy.sandbox.provider import Provider

T = TypeVar("T")
CloseStyle = Literal["close_notify", "no_close_notify", "rst"]


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class TlsFaultRelay:
    """Accepts TCP on 127.0.0.1, terminates TLS with the current certificate, hands the
    connection to `_relay`, and closes it by `close_style` however `_relay` ended."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.port = 0
        self.connections = 0  # TCP connections accepted
        self.handshakes = 0  # TLS handshakes completed
        self.handshake_failures = 0
        self.close_style: CloseStyle = "close_notify"
        self._ctx = self._context(provider.ca.cert_file, provider.ca.key_file)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _context(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def use_certificate(self, cert: Path, key: Path) -> None:
        """Serve this certificate from the next connection on."""
        self._ctx = self._context(cert, key)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                await writer.start_tls(self._ctx)
            except (OSError, ssl.SSLError):
                self.handshake_failures += 1
                return
            self.handshakes += 1
            await self._relay(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            close_as(writer, self.close_style)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ImapFaultRelay(TlsFaultRelay):
    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.received = b""  # what clients sent after a completed handshake
        self.cut_on: bytes | None = None
        self.cut_extra = 0
        self.cut_reply = False
        self.trickle: int | None = None
        self.cuts = 0
        self.stall_greeting = False
        self.stall_on: bytes | None = None
        self.stall_reads = False
        self.stalls = 0

    async def drop_connections(self) -> int:
        """Close every open connection now (each by `close_style`); how many there were."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stall_greeting:
            self.stalls += 1
            while data := await reader.read(65536):  # never a greeting, never an answer
                self.received += data
            return
        up_reader, up_writer = await asyncio.open_connection(
            self.provider.host,
            self.provider.imaps_port,
            ssl=self.provider.ssl_context(),
            server_hostname=self.provider.hostname,
        )
        reply_cut = asyncio.Event()  # the client sent the marker: cut the answer
        stalled = asyncio.Event()  # the client sent `stall_on`: nothing passes any more
        down = asyncio.create_task(self._down(up_reader, writer, reply_cut, stalled))
        up = asyncio.create_task(self._up(reader, up_writer, reply_cut, stalled))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task_ in (up, down):
                task_.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            up_writer.close()

    async def _up(
        self,
        reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        reply_cut: asyncio.Event,
        stalled: asyncio.Event,
    ) -> None:
        seen = b""  # this connection's client bytes
        pending = b""  # bytes after the marker, while cutting
        cutting = False
        while data := await reader.read(65536):
            self.received += data
            start = len(seen)
            seen += data
            if stalled.is_set():
                continue
            if self.stall_on is not None and (at := seen.find(self.stall_on)) >= 0:
                stalled.set()
                self.stalls += 1
                if at > start:
                    up_writer.write(data[: at - start])
                    await up_writer.drain()
                if self.stall_reads:
                    await asyncio.Event().wait()  # until close() cancels it
                continue
            if not cutting and self.cut_on is not None and (at := seen.find(self.cut_on)) >= 0:
                if self.cut_reply:
                    reply_cut.set()
                else:
                    cutting = True
                    head_end = at + len(self.cut_on) - start
                    up_writer.write(data[:head_end])
                    data = data[head_end:]
            if not cutting:
                up_writer.write(data)
                await up_writer.drain()
                continue
            pending += data
            if len(pending) >= self.cut_extra:
                up_writer.write(pending[: self.cut_extra])
                with contextlib.suppress(ConnectionError):
                    await up_writer.drain()
                self.cuts += 1
                return  # the provider "dies" here

    async def _down(
        self,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply_cut: asyncio.Event,
        stalled: asyncio.Event,
    ) -> None:
        passed = 0  # bytes of the answer since the marker
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await up_reader.read(65536):
                if stalled.is_set():
                    continue
                if reply_cut.is_set():
                    if passed + len(data) >= self.cut_extra:
                        await self._deliver(writer, data[: self.cut_extra - passed])
                        self.cuts += 1
                        return  # the provider "dies" mid-answer
                    passed += len(data)
                await self._deliver(writer, data)

    async def _deliver(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        step = self.trickle or len(data) or 1
        for start in range(0, len(data), step):
            writer.write(data[start : start + step])
            await writer.drain()
            if self.trickle:
                await asyncio.sleep(0.001)


def close_as(writer: asyncio.StreamWriter, style: CloseStyle) -> None:
    """Close the connection to the client the way `style` says."""
    if style == "close_notify":
        writer.close()
        return
    if style == "rst":
        raw = writer.get_extra_info("socket")
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # no TLS close_notify; with SO_LINGER 0 a reset
