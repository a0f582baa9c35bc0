"""The upstream session after login: reply parsing (sans-IO) and pipelined commands."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from localproxy.smtp.pipe import MAX_REPLY_LINE, SMALL_MESSAGE, Pipe, ReplyError, ReplyParser

REPLIES = (
    b"250 2.1.0 Ok\r\n",
    b"250-first\r\n250-second\r\n250 third\r\n",
    b"550 5.1.1 <x@example.org>: Recipient address rejected\r\n",
    b"354 End data with <CR><LF>.<CR><LF>\n",  # a bare LF ending is taken too
    b"221 2.0.0 Bye\r\n",
)
EXPECTED = [
    (250, "2.1.0 Ok"),
    (250, "first\nsecond\nthird"),
    (550, "5.1.1 <x@example.org>: Recipient address rejected"),
    (354, "End data with <CR><LF>.<CR><LF>"),
    (221, "2.0.0 Bye"),
]


@given(st.lists(st.integers(1, 40), max_size=30))
def test_replies_are_the_same_however_the_bytes_arrive(cuts: list[int]) -> None:
    stream, parser, found, position = b"".join(REPLIES), ReplyParser(), [], 0
    for size in [*cuts, len(stream)]:
        found += parser.feed(stream[position : position + size])
        position += size
    assert [(r.code, r.message) for r in found] == EXPECTED


@pytest.mark.parametrize(
    "garbage",
    [b"hello\r\n", b"25 short\r\n", b"250x2.0.0\r\n", b"250-a\r\n251 b\r\n", b"2" * 3000],
)
def test_malformed_replies_end_the_session(garbage: bytes) -> None:
    with pytest.raises(ReplyError) as raised:
        ReplyParser().feed(garbage)
    assert isinstance(raised.value, aiosmtplib.SMTPServerDisconnected)


def test_a_line_at_the_limit_is_fine() -> None:
    line = b"250 " + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n"
    assert ReplyParser().feed(line)[0].code == 250


# --------------------------------------------------------------------------- Pipe


class FakeTransport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.writes = 0
        self.closed = False
        self.protocol: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]


class LoggedIn:
    """What Pipe takes from aiosmtplib.SMTP once it is logged in."""

    def __init__(self, extensions: dict[str, str], timeout: float = 5.0) -> None:
        self.transport = FakeTransport()
        self.esmtp_extensions = extensions
        self.timeout = timeout


def pipe(**extensions: str) -> tuple[Pipe, FakeTransport]:
    smtp = LoggedIn({"pipelining": "", **extensions})
    return Pipe(smtp), smtp.transport  # type: ignore[arg-type]


async def answer(pipe: Pipe, *replies: bytes, step: int = 3) -> None:
    await asyncio.sleep(0)
    stream = b"".join(replies)
    for start in range(0, len(stream), step):
        pipe.data_received(stream[start : start + step])
        await asyncio.sleep(0)


async def test_commands_go_in_one_write_and_replies_pair_in_order() -> None:
    upstream, transport = pipe()
    task = asyncio.ensure_future(upstream.commands(b"RSET", b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>"))
    await answer(upstream, b"250 reset\r\n", b"250 sender\r\n", b"550 no such user\r\n")
    replies = await task
    assert transport.written == b"RSET\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
    assert [(r.code, r.message) for r in replies] == [
        (250, "reset"),
        (250, "sender"),
        (550, "no such user"),
    ]


async def test_without_pipelining_commands_wait_for_each_reply() -> None:
    smtp = LoggedIn({})
    upstream, transport = Pipe(smtp), smtp.transport  # type: ignore[arg-type]
    task = asyncio.ensure_future(upstream.commands(b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>"))
    await asyncio.sleep(0)
    assert transport.written == b"MAIL FROM:<a@x>\r\n"
    await answer(upstream, b"250 ok\r\n")
    assert transport.written.endswith(b"RCPT TO:<b@y>\r\n")
    await answer(upstream, b"250 ok\r\n")
    assert len(await task) == 2


async def test_refusal_keeps_the_providers_code_and_text() -> None:
    upstream, _ = pipe()
    task = asyncio.ensure_future(upstream.command(b"MAIL FROM:<a@x>"))
    await answer(upstream, b"553-5.7.1 not yours\r\n553 5.7.1 really\r\n")
    with pytest.raises(aiosmtplib.SMTPResponseException) as raised:
        await task
    assert raised.value.code == 553 and raised.value.message == "5.7.1 not yours\n5.7.1 really"
    assert upstream.is_connected


async def test_lost_connection_fails_every_pending_reply() -> None:
    upstream, transport = pipe()
    task = asyncio.ensure_future(upstream.commands(b"MAIL FROM:<a@x>", b"RCPT TO:<b@y>"))
    await answer(upstream, b"250 ok\r\n")
    upstream.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="reset by peer"):
        await task
    assert not upstream.is_connected and transport.closed
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await upstream.command(b"RSET")


async def test_unasked_reply_ends_the_session() -> None:
    upstream, transport = pipe()
    upstream.data_received(b"421 4.4.2 idle too long, closing\r\n")
    assert transport.closed and not upstream.is_connected
    with pytest.raises(aiosmtplib.SMTPServerDisconnected, match=r"421 4\.4\.2 idle too long"):
        await upstream.command(b"RSET")


async def test_silent_provider_times_out_and_the_session_ends() -> None:
    smtp = LoggedIn({"pipelining": ""}, timeout=0.05)
    upstream = Pipe(smtp)  # type: ignore[arg-type]
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await upstream.command(b"RSET")
    assert smtp.transport.closed and not upstream.is_connected


async def test_line_breaks_in_a_command_are_refused() -> None:
    upstream, transport = pipe()
    with pytest.raises(ValueError):
        await upstream.commands(b"RCPT TO:<a@x>\r\nRCPT TO:<evil@x>")
    assert transport.written == b""


async def test_message_goes_as_bdat_last_when_chunking_is_offered() -> None:
    upstream, transport = pipe(chunking="")
    message = b"Subject: x\r\n\r\n.dot\r\n"
    task = asyncio.ensure_future(upstream.send_message(message))
    await answer(upstream, b"250 2.0.0 queued\r\n")
    assert (await task).code == 250
    assert transport.written == b"BDAT %d LAST\r\n" % len(message) + message
    assert transport.writes == 1, "a small message goes with its command in one write"


async def test_a_large_message_goes_in_pieces_after_its_bdat_command() -> None:
    upstream, transport = pipe(chunking="")
    message = b"x" * (SMALL_MESSAGE + 10) + b"\r\n"
    task = asyncio.ensure_future(upstream.send_message(message))
    await answer(upstream, b"250 2.0.0 queued\r\n")
    assert (await task).code == 250
    assert transport.written == b"BDAT %d LAST\r\n" % len(message) + message
    assert transport.writes > 1, "not copied into one buffer with the command"


async def test_message_goes_as_dot_stuffed_data_otherwise() -> None:
    upstream, transport = pipe()
    task = asyncio.ensure_future(upstream.send_message(b"Subject: x\r\n\r\n.dot\r\n"))
    await answer(upstream, b"354 go ahead\r\n")
    await answer(upstream, b"552 5.3.4 too big\r\n")
    with pytest.raises(aiosmtplib.SMTPResponseException) as raised:
        await task
    assert raised.value.code == 552
    assert transport.written == b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\n"


async def test_a_writer_waiting_to_drain_learns_of_the_lost_connection() -> None:
    upstream, _ = pipe(chunking="")
    upstream.pause_writing()  # the provider stopped reading
    big = b"x" * (3 << 20) + b"\r\n"
    task = asyncio.ensure_future(upstream.send_message(big))
    await asyncio.sleep(0)
    upstream.connection_lost(ConnectionResetError("gone"))
    with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="gone"):
        await task
