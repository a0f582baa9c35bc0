"""The IMAP relay against an in-process fake provider (TLS, scripted IMAP).

The fake answers FETCH from `MessageView` of its stored messages, which is enough to
follow the relay's protocol moves; whether the values match a real server is checked in
tests/e2e/test_imap_relay.py against Dovecot.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme

from localproxy.config import Account, LocalListen, UpstreamServer
from localproxy.imap.codec import (
    Atom,
    ClientParser,
    Command,
    ContinuationLine,
    ContinuationNeeded,
    IdleDone,
    Literal,
    LiteralForm,
    Number,
    PList,
    SequenceSet,
    ServerParser,
    Tagged,
    Unparsed,
    Untagged,
    astring_value,
    parse_fetch_request,
    parse_fetch_response,
    serialize,
    serialize_fetch_response,
)
from localproxy.imap.relay import (
    Credentials,
    ImapProxy,
    MessageContext,
    _may_be_armored,
    _needs_view,
    _response_items,
    strip_status_headers,
    view_value,
)
from localproxy.imap.view import MessageView

TIMEOUT = 5.0
UIDVALIDITY = 42
CAPS = b"IMAP4rev1 LITERAL+ SASL-IR AUTH=PLAIN AUTH=XOAUTH2 IDLE ENABLE CONDSTORE"
HOSTILE_CAPS = (
    b"IMAP4rev1 STARTTLS LOGINDISABLED AUTH=SCRAM-SHA-256-PLUS AUTH=PLAIN COMPRESS=DEFLATE "
    b"IMAP4rev2 UTF8=ACCEPT X-SECRET-EXTENSION IDLE ENABLE CONDSTORE NOTIFY"
)
PLAIN = b"From: a@example.org\r\nSubject: plain\r\n\r\nhello\r\n"
ENCRYPTED = (
    b"From: b@example.org\r\nSubject: ...\r\n"
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=x\r\n'
    b"\r\n--x\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    b"--x\r\nContent-Type: application/octet-stream\r\n\r\n"
    b"-----BEGIN PGP MESSAGE-----\r\nZmFrZQ==\r\n-----END PGP MESSAGE-----\r\n--x--\r\n"
)
CLEARTEXT = b"From: b@example.org\r\nSubject: the secret subject\r\n\r\nsecret body\r\n"


# --------------------------------------------------------------------------- fake provider

Hook = Callable[["FakeConnection", Command], Awaitable[None]]


class FakeConnection:
    def __init__(self, server: FakeUpstream, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.parser = ClientParser()
        self.pending_auth: bytes | None = None
        self.idle_tag: bytes | None = None

    def send(self, data: bytes) -> None:
        self.writer.write(data)


class FakeUpstream:
    """A TLS IMAP server with one mailbox; records every command it receives."""

    def __init__(self, ca: trustme.CA, ca_file: Path, caps: bytes = CAPS) -> None:
        self.ca_file = ca_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.caps = caps
        self.messages: dict[int, bytes] = {}
        self.flags: dict[int, set[bytes]] = {}
        self.received: list[bytes] = []
        self.connections = 0
        self.gate: asyncio.Event | None = None
        self.idle_allowed = True
        self.hooks: dict[bytes, Hook] = {}
        self.list_lines = b'* LIST (\\HasNoChildren) "/" INBOX\r\n'
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def server_config(self) -> UpstreamServer:
        return UpstreamServer("127.0.0.1", self.port, "tls", ca_file=self.ca_file, timeout=3)

    def add(self, raw: bytes) -> int:
        uid = max(self.messages, default=0) + 1
        self.messages[uid] = raw
        self.flags[uid] = set()
        return uid

    def commands(self, verb: bytes) -> list[bytes]:
        """Received commands whose name (after the tag) starts with verb."""
        return [c for c in self.received if c.split(b" ", 1)[1].upper().startswith(verb)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = FakeConnection(self, writer)
        try:
            if self.gate is not None:
                await self.gate.wait()
            conn.send(b"* OK [CAPABILITY " + self.caps + b"] fake ready\r\n")
            while data := await reader.read(65536):
                conn.parser.feed(data)
                for event in conn.parser:
                    await self._on_event(conn, event)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _on_event(self, conn: FakeConnection, event: object) -> None:
        if isinstance(event, ContinuationNeeded):
            conn.send(b"+ go ahead\r\n")
        elif isinstance(event, IdleDone):
            self.received.append(b"(idle) " + event.raw)
            assert conn.idle_tag is not None
            conn.send(conn.idle_tag + b" OK idle done\r\n")
        elif isinstance(event, ContinuationLine):
            self.received.append(b"(sasl) " + event.raw)
            assert conn.pending_auth is not None
            conn.send(conn.pending_auth + b" OK [CAPABILITY " + self.caps + b"] welcome\r\n")
        elif isinstance(event, Command):
            self.received.append(event.raw)
            hook = self.hooks.get(event.verb)
            await (hook or self._default)(conn, event)

    async def _default(self, conn: FakeConnection, command: Command) -> None:
        tag, verb = command.tag, command.verb
        if verb == b"CAPABILITY":
            conn.send(b"* CAPABILITY " + self.caps + b"\r\n" + tag + b" OK done\r\n")
        elif verb == b"LOGIN":
            conn.send(tag + b" OK [CAPABILITY " + self.caps + b"] logged in\r\n")
        elif verb == b"AUTHENTICATE":
            self._authenticate(conn, command)
        elif verb in (b"SELECT", b"EXAMINE"):
            conn.send(
                b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n" % (len(self.messages), UIDVALIDITY)
            )
            conn.send(tag + b" OK [READ-WRITE] selected\r\n")
        elif verb in (b"FETCH", b"UID FETCH"):
            self._fetch(conn, command)
        elif verb == b"APPEND":
            assert isinstance(command.args[-1], Literal)
            uid = self.add(command.args[-1].data)
            conn.send(tag + b" OK [APPENDUID %d %d] appended\r\n" % (UIDVALIDITY, uid))
        elif verb == b"IDLE":
            if self.idle_allowed:
                conn.idle_tag = tag
                conn.parser.expect_done()
                conn.send(b"+ idling\r\n")
            else:
                conn.send(tag + b" NO IDLE is switched off\r\n")
        elif verb == b"LIST":
            conn.send(self.list_lines + tag + b" OK listed\r\n")
        elif verb == b"ENABLE":
            conn.send(b"* ENABLED " + serialize(command.args) + b"\r\n" + tag + b" OK\r\n")
        elif verb == b"STORE":
            conn.send(b"* 1 FETCH (FLAGS (\\Flagged))\r\n" + tag + b" OK stored\r\n")
        elif verb == b"LOGOUT":
            conn.send(b"* BYE bye\r\n" + tag + b" OK logged out\r\n")
        elif verb == b"NOOP":
            conn.send(tag + b" OK noop\r\n")
        else:
            conn.send(tag + b" BAD unknown command\r\n")

    def _authenticate(self, conn: FakeConnection, command: Command) -> None:
        if len(command.args) > 1:
            conn.send(command.tag + b" OK [CAPABILITY " + self.caps + b"] welcome\r\n")
            return
        conn.pending_auth = command.tag
        conn.parser.expect_continuation_line()
        conn.send(b"+ \r\n")

    def _fetch(self, conn: FakeConnection, command: Command) -> None:
        request = parse_fetch_request(command.args)
        uids = sorted(self.messages)
        if request.sequence_set.saved:  # no SEARCH ... SAVE yet: $ is empty (RFC 5182)
            uids = []
        for sequence, uid in enumerate(uids, 1):
            number = uid if command.subcommand else sequence
            if not request.sequence_set.contains(
                number, uids[-1] if command.subcommand else len(uids)
            ):
                continue
            conn.send(self._fetch_response(sequence, uid, request.items, bool(command.subcommand)))
        conn.send(command.tag + b" OK fetched\r\n")

    def _fetch_response(self, sequence: int, uid: int, items: list, uid_command: bool) -> bytes:
        view = MessageView(self.messages[uid])
        parts: list[bytes] = [b"UID %d" % uid] if uid_command else []
        if any(item.sets_seen for item in items):
            self.flags[uid].add(b"\\Seen")
        for item in items:
            if item.name == "UID":
                if not uid_command:
                    parts.append(b"UID %d" % uid)
            elif item.name == "INTERNALDATE":
                parts.append(b'INTERNALDATE "01-Jan-2024 10:00:00 +0000"')
            elif item.name == "FLAGS":
                parts.append(b"FLAGS (" + b" ".join(sorted(self.flags[uid])) + b")")
            else:
                value = view_value(view, item)
                assert value is not None, item
                parts.append(item.response_name() + b" " + serialize([value]))
        return b"* %d FETCH (%s)\r\n" % (sequence, b" ".join(parts))


# --------------------------------------------------------------------------- client


class Client:
    """A raw client: bytes out, codec events in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = ServerParser()

    @classmethod
    async def connect(cls, proxy: ImapProxy) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        return cls(reader, writer)

    async def event(self, timeout: float = TIMEOUT) -> object:
        while (event := self.parser.next_event()) is None:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise EOFError("closed")
            self.parser.feed(data)
        return event

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def until(self, tag: bytes) -> tuple[list, Tagged]:
        events = []
        while True:
            event = await self.event()
            if isinstance(event, Tagged) and event.tag == tag:
                return events, event
            events.append(event)

    async def command(self, tag: bytes, text: bytes) -> tuple[list, Tagged]:
        await self.send(tag + b" " + text + b"\r\n")
        return await self.until(tag)

    async def login(self) -> Client:
        await self.event()  # greeting
        _, tagged = await self.command(b"L", b'LOGIN "alice" "s3cret pass"')
        assert tagged.status == b"OK", tagged.raw
        return self

    async def closed(self) -> bool:
        """True once the proxy closed the connection (draining what is left)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), TIMEOUT):
                pass
        except ConnectionError:
            return True  # reset: closed with our unread bytes still in flight
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()


def fetched(events: list) -> list[dict[bytes, object]]:
    out = []
    for event in events:
        assert not isinstance(event, Unparsed), event  # multipart BODYSTRUCTUREs included
        if isinstance(event, Untagged) and event.status is None and event.name == b"FETCH":
            out.append({name.upper(): value for name, value in parse_fetch_response(event).items})
    return out


def one_response(raw: bytes) -> Untagged:
    parser = ServerParser()
    parser.feed(raw)
    (event,) = list(parser)
    assert isinstance(event, Untagged), event
    return event


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture
async def upstream(ca: tuple[trustme.CA, Path]) -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(*ca)
    await fake.start()
    yield fake
    await fake.close()


def account_for(server: UpstreamServer) -> Account:
    return Account(
        name="alice",
        addresses=("alice@example.org",),
        local=LocalListen(host="127.0.0.1", imap_port=0),
        imap=server,
        smtp=server,
    )


class Recorder:
    """A transformer that decrypts ENCRYPTED to CLEARTEXT and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[MessageContext] = []
        self.fail = False

    async def __call__(self, raw: bytes, context: MessageContext) -> bytes:
        self.calls.append(context)
        await asyncio.sleep(0.01)  # let concurrent requests meet in the cache
        if self.fail:
            raise RuntimeError("no key")
        return CLEARTEXT if raw == ENCRYPTED else strip_status_headers(raw)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def proxy(upstream: FakeUpstream, recorder: Recorder) -> AsyncIterator[ImapProxy]:
    relay = ImapProxy(account_for(upstream.server_config()), recorder)
    await relay.start()
    yield relay
    await relay.close()


# --------------------------------------------------------------------------- connection


async def test_greeting_only_after_upstream_is_up(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.gate = asyncio.Event()
    client = await Client.connect(proxy)
    with pytest.raises(TimeoutError):
        await client.event(timeout=0.3)
    upstream.gate.set()
    greeting = await client.event()
    assert isinstance(greeting, Untagged) and greeting.raw.startswith(b"* OK [CAPABILITY IMAP4rev1")
    client.close()


async def test_bye_with_reason_when_upstream_is_down(ca: tuple[trustme.CA, Path]):
    with socket_closed_port() as port:
        server = UpstreamServer("127.0.0.1", port, "tls", ca_file=ca[1], timeout=3)
    relay = ImapProxy(account_for(server))
    await relay.start()
    try:
        client = await Client.connect(relay)
        bye = await client.event()
        assert isinstance(bye, Untagged) and bye.status == b"BYE"
        assert bye.code is not None and bye.code.name == b"UNAVAILABLE"
        assert b"connection refused" in bye.text and b"127.0.0.1:%d" % port in bye.text
        assert await client.closed()
    finally:
        await relay.close()


def socket_closed_port():  # a port nothing listens on
    import contextlib
    import socket

    @contextlib.contextmanager
    def port():
        with socket.create_server(("127.0.0.1", 0)) as sock:
            number = sock.getsockname()[1]
        yield number

    return port()


async def test_upstream_disconnect_sends_bye(upstream: FakeUpstream, proxy: ImapProxy):
    async def vanish(conn: FakeConnection, command: Command) -> None:
        conn.writer.close()

    upstream.hooks[b"NOOP"] = vanish
    client = await (await Client.connect(proxy)).login()
    await client.send(b"n NOOP\r\n")
    bye = await client.event()
    assert isinstance(bye, Untagged) and bye.status == b"BYE"
    assert await client.closed()


# --------------------------------------------------------------------------- capabilities


async def test_capabilities_are_filtered_everywhere(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.caps = HOSTILE_CAPS
    client = Client(*await asyncio.open_connection("127.0.0.1", proxy.port))
    greeting = await client.event()
    events, _ = await client.command(b"c", b"CAPABILITY")
    _, login = await client.command(b"l", b"LOGIN alice secret")
    for raw in (greeting.raw, events[0].raw, login.raw):
        words = set(raw.upper().replace(b"]", b" ").split())
        assert {b"IMAP4REV1", b"AUTH=PLAIN", b"IDLE", b"CONDSTORE"} <= words, raw
        forbidden = {b"STARTTLS", b"LOGINDISABLED", b"COMPRESS=DEFLATE", b"IMAP4REV2"}
        forbidden |= {b"UTF8=ACCEPT", b"X-SECRET-EXTENSION", b"AUTH=SCRAM-SHA-256-PLUS"}
        assert not words & forbidden, raw
    events, tagged = await client.command(b"e", b"ENABLE CONDSTORE UTF8=ACCEPT")
    assert tagged.status == b"OK" and events[0].raw == b"* ENABLED CONDSTORE\r\n"
    assert upstream.commands(b"ENABLE") == [b"e ENABLE CONDSTORE\r\n"]
    events, tagged = await client.command(b"f", b"ENABLE IMAP4rev2")
    assert tagged.status == b"OK" and events[0].raw == b"* ENABLED\r\n"
    assert len(upstream.commands(b"ENABLE")) == 1  # answered by the relay itself
    for blocked in (b"STARTTLS", b"COMPRESS DEFLATE", b"NOTIFY NONE"):
        _, tagged = await client.command(b"b", blocked)
        assert tagged.status == b"BAD"
    assert not upstream.commands(b"COMPRESS") and not upstream.commands(b"STARTTLS")
    client.close()


# --------------------------------------------------------------------------- literals


@pytest.mark.parametrize("literal_plus", [True, False])
async def test_client_literal_is_collected_and_reannounced(
    upstream: FakeUpstream, proxy: ImapProxy, literal_plus: bool
):
    if not literal_plus:
        upstream.caps = upstream.caps.replace(b" LITERAL+", b"")
    client = await (await Client.connect(proxy)).login()
    await client.send(b"a APPEND INBOX (\\Seen) {5}\r\n")
    continuation = await client.event()
    assert continuation.raw.startswith(b"+ ")  # from the relay, before anything went up
    await client.send(b"hello\r\n")
    events, tagged = await client.until(b"a")
    assert tagged.status == b"OK" and b"[APPENDUID 42 1]" in tagged.raw
    assert events == []  # the provider's own "+" never reaches the client
    (sent,) = upstream.commands(b"APPEND")
    announce = b"{5+}" if literal_plus else b"{5}"
    assert sent == b"a APPEND INBOX (\\Seen) " + announce + b"\r\nhello\r\n"
    assert upstream.messages[1] == b"hello"
    client.close()


async def test_non_synchronizing_client_literal(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.caps = upstream.caps.replace(b" LITERAL+", b"")
    client = await (await Client.connect(proxy)).login()
    await client.send(b"a APPEND INBOX {5+}\r\nhello\r\n")
    events, tagged = await client.until(b"a")
    assert tagged.status == b"OK" and events == []
    assert upstream.commands(b"APPEND") == [b"a APPEND INBOX {5}\r\nhello\r\n"]
    client.close()


# --------------------------------------------------------------------------- IDLE


async def test_idle_accepted(upstream: FakeUpstream, proxy: ImapProxy):
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.send(b"i IDLE\r\n")
    assert (await client.event()).raw == b"+ idling\r\n"
    await client.send(b"DONE\r\n")
    _, tagged = await client.until(b"i")
    assert tagged.status == b"OK"
    assert upstream.commands(b"IDLE") == [b"i IDLE\r\n"]
    assert b"(idle) DONE\r\n" in upstream.received
    _, tagged = await client.command(b"n", b"NOOP")  # back to commands
    assert tagged.status == b"OK"
    client.close()


async def test_idle_rejected_reaches_the_client(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.idle_allowed = False
    client = await (await Client.connect(proxy)).login()
    events, tagged = await client.command(b"i", b"IDLE")
    assert events == [] and tagged.status == b"NO" and b"switched off" in tagged.raw
    _, tagged = await client.command(b"n", b"NOOP")  # not stuck waiting for DONE
    assert tagged.status == b"OK"
    client.close()


# --------------------------------------------------------------------------- failures


async def test_upstream_dies_mid_fetch_literal(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(PLAIN)

    async def die(conn: FakeConnection, command: Command) -> None:
        conn.send(b"* 1 FETCH (UID 1 BODY[] {1000}\r\n" + b"x" * 400)
        await conn.writer.drain()
        conn.writer.close()

    upstream.hooks[b"FETCH"] = die
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.send(b"f FETCH 1 (BODY[])\r\n")
    bye = await client.event()
    assert isinstance(bye, Untagged) and bye.status == b"BYE", bye
    assert await client.closed()
    assert client.parser.next_event() is None  # no partial FETCH was presented


async def test_hostile_client_input(upstream: FakeUpstream, proxy: ImapProxy):
    client = await (await Client.connect(proxy)).login()
    _, tagged = await client.command(b"a1", b"APPEND INBOX {2147483648}")
    assert tagged.status == b"BAD" and b"TOOBIG" in tagged.raw
    _, tagged = await client.command(b"a2", b"NOOP ((( \x01garbage")
    assert tagged.status == b"BAD"
    _, tagged = await client.command(b"a3", b'LOGIN "\xff\xfe" "x"')
    assert tagged.status == b"BAD" and b"UTF-8" in tagged.raw
    _, tagged = await client.command(b"a4", b"NOOP")
    assert tagged.status == b"OK"  # still serving after the BADs
    await client.send(b"a5 NOOP " + b"x" * (1024 * 1024) + b"\r\n")
    bye = await client.event()
    assert isinstance(bye, Untagged) and bye.status == b"BYE"
    assert await client.closed()
    other = await (await Client.connect(proxy)).login()  # other sessions unaffected
    _, tagged = await other.command(b"n", b"NOOP")
    assert tagged.status == b"OK"
    other.close()
    assert not upstream.commands(b"APPEND")


async def test_huge_non_synchronizing_literal_ends_the_session(
    upstream: FakeUpstream, proxy: ImapProxy
):
    client = await (await Client.connect(proxy)).login()
    await client.send(b"a APPEND INBOX {4294967296+}\r\nabc")
    bye = await client.event()
    assert isinstance(bye, Untagged) and bye.status == b"BYE"
    assert await client.closed()


# --------------------------------------------------------------------------- FETCH rewriting


async def test_plain_fetch_is_forwarded_without_probes(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1 (RFC822.SIZE BODY.PEEK[])")
    assert tagged.status == b"OK"
    assert [e.raw for e in events] == [
        b"* 1 FETCH (RFC822.SIZE %d BODY[] {%d}\r\n%s)\r\n" % (len(PLAIN), len(PLAIN), PLAIN)
    ]
    (sent,) = upstream.commands(b"FETCH")
    assert sent.startswith(b"f FETCH 1 (RFC822.SIZE BODY.PEEK[] UID BODY.PEEK[HEADER.FIELDS (")
    assert sent.endswith(b"BODY.PEEK[TEXT]<0.128>)\r\n")
    assert upstream.connections == 1  # no side session for plain mail
    client.close()


async def test_known_plain_messages_are_fetched_again_without_probes(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(PLAIN)
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    first, _ = await client.command(b"f1", b"FETCH 1:* (FLAGS RFC822.SIZE)")
    again, tagged = await client.command(b"f2", b"FETCH 1:* (FLAGS RFC822.SIZE)")
    by_uid, _ = await client.command(b"f3", b"UID FETCH 1:* (RFC822.SIZE)")
    assert tagged.status == b"OK"
    assert [e.raw for e in again] == [e.raw for e in first]
    assert [e.raw for e in by_uid] == [
        b"* %d FETCH (UID %d RFC822.SIZE %d)\r\n" % (n, n, len(PLAIN)) for n in (1, 2)
    ]
    sent = upstream.commands(b"FETCH") + upstream.commands(b"UID FETCH")
    assert b"HEADER.FIELDS" in sent[0]
    assert sent[1:] == [
        b"f2 FETCH 1:* (FLAGS RFC822.SIZE)\r\n",
        b"f3 UID FETCH 1:* (RFC822.SIZE)\r\n",
    ]
    client.close()


async def test_saved_search_result_is_left_to_the_provider(
    upstream: FakeUpstream, proxy: ImapProxy
):
    """FETCH $ (RFC 5182): only the provider knows what $ holds, so the relay never
    resolves it locally, even where it knows every message of the mailbox (a fuzzing
    target once resolved it and raised)."""
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.command(b"f1", b"FETCH 1:* (FLAGS)")
    for command in (b"FETCH $ (BODY.PEEK[])", b"UID FETCH $ (FLAGS)"):
        _events, tagged = await client.command(b"f2", command)
        assert tagged.status in (b"OK", b"NO", b"BAD")
        assert upstream.commands(command.split(b" $")[0])[-1].startswith(b"f2 " + command[:-1])
    _events, alive = await client.command(b"n", b"NOOP")
    assert alive.status == b"OK"
    client.close()


async def test_new_message_brings_the_probes_back(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.command(b"f1", b"FETCH 1:* (RFC822.SIZE)")
    upstream.add(ENCRYPTED)

    async def noop(conn: FakeConnection, command: Command) -> None:
        conn.send(b"* 2 EXISTS\r\n" + command.tag + b" OK noop\r\n")

    upstream.hooks[b"NOOP"] = noop
    await client.command(b"n", b"NOOP")
    events, tagged = await client.command(b"f2", b"FETCH 1:* (RFC822.SIZE)")
    assert tagged.status == b"OK"
    assert [e.raw for e in events] == [
        b"* 1 FETCH (RFC822.SIZE %d)\r\n" % len(PLAIN),
        b"* 2 FETCH (RFC822.SIZE %d)\r\n" % len(CLEARTEXT),
    ]
    assert b"HEADER.FIELDS" in upstream.commands(b"FETCH")[-1]
    client.close()


async def test_expunge_renumbers_the_known_messages(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(ENCRYPTED)
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.command(b"f1", b"FETCH 1:* (RFC822.SIZE)")
    del upstream.messages[1]

    async def expunge(conn: FakeConnection, command: Command) -> None:
        conn.send(b"* 1 EXPUNGE\r\n" + command.tag + b" OK expunged\r\n")

    upstream.hooks[b"EXPUNGE"] = expunge
    await client.command(b"e", b"EXPUNGE")
    events, tagged = await client.command(b"f2", b"FETCH 1 (RFC822.SIZE)")
    assert tagged.status == b"OK"
    assert [e.raw for e in events] == [b"* 1 FETCH (RFC822.SIZE %d)\r\n" % len(PLAIN)]
    assert upstream.commands(b"FETCH")[-1] == b"f2 FETCH 1 (RFC822.SIZE)\r\n"
    client.close()


MULTIPART = (
    b"From: a@example.org\r\nSubject: alt\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    b"--b\r\nContent-Type: text/html\r\n\r\n<p>hello</p>\r\n--b--\r\n"
)


async def test_multipart_bodystructure_is_spliced_byte_for_byte(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(MULTIPART)
    view = MessageView(MULTIPART)
    assert b")(" in view.bodystructure()  # the parts back to back, as Dovecot writes them
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"UID FETCH 1 (BODYSTRUCTURE BODY)")
    assert tagged.status == b"OK"
    # the provider's answer minus the probes, each kept item exactly as the provider sent it
    assert [e.raw for e in events] == [
        b"* 1 FETCH (UID 1 BODYSTRUCTURE %s BODY %s)\r\n"
        % (view.bodystructure(), view.bodystructure(extensible=False))
    ]
    assert isinstance(events[0], Untagged)
    client.close()


@pytest.mark.parametrize(
    "broken",
    [
        b'* 1 FETCH (UID 1 BODY[] "a""b")\r\n',  # Unparsed
        b"* 1 FETCH (UID 1 BODY[] NIL RFC822.SIZE)\r\n",  # tokens, but not FETCH data
    ],
)
async def test_unreadable_fetch_response_is_withheld(
    upstream: FakeUpstream, proxy: ImapProxy, broken: bytes
):
    upstream.add(ENCRYPTED)

    async def garble(conn: FakeConnection, command: Command) -> None:
        conn.send(broken + command.tag + b" OK fetched\r\n")

    upstream.hooks[b"FETCH"] = garble
    upstream.hooks[b"NOOP"] = garble
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1 (BODY.PEEK[])")
    assert events == [] and tagged.status == b"NO" and b"[UNAVAILABLE]" in tagged.raw
    assert b"unreadable FETCH response" in tagged.raw
    events, tagged = await client.command(b"n", b"NOOP")  # unsolicited: passed on as it came
    assert [e.raw for e in events] == [broken] and tagged.status == b"OK"
    client.close()


async def test_metadata_fetch_and_store_pass_through_untouched(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(ENCRYPTED)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.command(b"f", b"UID FETCH 1:* (FLAGS)")
    assert upstream.commands(b"UID FETCH") == [b"f UID FETCH 1:* (FLAGS)\r\n"]
    events, _ = await client.command(b"t", b"STORE 1 +FLAGS (\\Flagged)")
    assert [e.raw for e in events] == [b"* 1 FETCH (FLAGS (\\Flagged))\r\n"]
    client.close()


async def test_pipelined_uid_fetch_keeps_its_uid_during_a_rewritten_fetch(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(PLAIN)

    async def slow(conn: FakeConnection, command: Command) -> None:
        await asyncio.sleep(0.2)  # answered while the rewritten FETCH is in flight
        await upstream._default(conn, command)

    upstream.hooks[b"UID FETCH"] = slow
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.send(b"a UID FETCH 1 (FLAGS)\r\nb FETCH 1 (BODY.PEEK[])\r\n")
    events, _ = await client.until(b"a")
    assert [e.raw for e in events] == [b"* 1 FETCH (UID 1 FLAGS ())\r\n"]
    events, _ = await client.until(b"b")
    assert fetched(events) == [{b"BODY[]": Literal(PLAIN)}]
    client.close()


async def test_encrypted_message_served_from_the_view(
    upstream: FakeUpstream, proxy: ImapProxy, recorder: Recorder, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    upstream.add(PLAIN)
    upstream.add(ENCRYPTED)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(
        b"f", b"FETCH 1:2 (FLAGS RFC822.SIZE ENVELOPE BODY[] BODY.PEEK[]<5.10>)"
    )
    assert tagged.status == b"OK"
    plain, secret = fetched(events)
    assert plain[b"BODY[]"] == Literal(PLAIN)
    assert secret[b"BODY[]"] == Literal(CLEARTEXT)
    assert secret[b"RFC822.SIZE"] == Number(len(CLEARTEXT))
    assert secret[b"BODY[]<5>"] == Literal(CLEARTEXT[5:15])
    assert b"the secret subject" in serialize([secret[b"ENVELOPE"]])
    assert secret[b"FLAGS"] == PList((Atom(b"\\Seen"),))  # the provider set it, we kept it
    assert b"UID" not in secret  # the client did not ask for it
    assert [c.uid for c in recorder.calls] == [2] and recorder.calls[0].uidvalidity == 42
    assert upstream.connections == 1  # BODY[] carried the whole message: no side session
    events, tagged = await client.command(b"g", b"FETCH 2 (BODY.PEEK[]<0.10>)")
    assert len(recorder.calls) == 1  # cached
    upstream.add(ENCRYPTED)
    events, tagged = await client.command(b"h", b"FETCH 3 (BODY.PEEK[TEXT])")
    assert fetched(events)[0][b"BODY[TEXT]"] == Literal(b"secret body\r\n")
    # the side session logged in like the client and fetched by UID, read-only
    assert upstream.connections == 2
    assert upstream.commands(b"LOGIN")[1].endswith(b' LOGIN "alice" "s3cret pass"\r\n')
    assert any(c.endswith(b' EXAMINE "INBOX"\r\n') for c in upstream.received)
    assert any(c.endswith(b" UID FETCH 3 BODY.PEEK[]\r\n") for c in upstream.received)
    assert "s3cret" not in caplog.text and "secret body" not in caplog.text
    assert "logged in (LOGIN)" in caplog.text and "built the view of uid 3" in caplog.text
    client.close()


async def test_fetch_macro_is_spelled_out_for_the_provider(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(ENCRYPTED)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1 ALL")
    assert tagged.status == b"OK"
    (response,) = fetched(events)
    assert set(response) == {b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"}
    assert response[b"RFC822.SIZE"] == Number(len(CLEARTEXT))
    (sent,) = upstream.commands(b"FETCH")
    assert sent.startswith(b"f FETCH 1 (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE UID BODY.PEEK[")
    client.close()


async def test_unsolicited_content_fetch_is_rewritten_or_trimmed(
    upstream: FakeUpstream, proxy: ImapProxy
):
    upstream.add(ENCRYPTED)

    async def chatty(conn: FakeConnection, command: Command) -> None:
        conn.send(b"* 1 FETCH (FLAGS (\\Seen) RFC822.SIZE 999)\r\n")  # content, no UID
        conn.send(b"* 1 FETCH (UID 1 RFC822.SIZE 999)\r\n")  # content, with a UID
        conn.send(b"* 1 FETCH (FLAGS (\\Seen) RFC822.SIZE 999)\r\n")  # now placed by seq
        conn.send(command.tag + b" OK noop\r\n")

    upstream.hooks[b"NOOP"] = chatty
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, _ = await client.command(b"n", b"NOOP")
    assert [e.raw for e in events] == [
        b"* 1 FETCH (FLAGS (\\Seen))\r\n",  # cannot be placed without a UID: trimmed
        b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % len(CLEARTEXT),
        # the session learned that sequence number 1 is UID 1
        b"* 1 FETCH (FLAGS (\\Seen) RFC822.SIZE %d)\r\n" % len(CLEARTEXT),
    ]
    client.close()


async def test_logout_ends_with_the_providers_bye_only(upstream: FakeUpstream, proxy: ImapProxy):
    async def logout(conn: FakeConnection, command: Command) -> None:
        conn.send(b"* BYE bye\r\n" + command.tag + b" OK logged out\r\n")
        await conn.writer.drain()
        conn.writer.close()

    upstream.hooks[b"LOGOUT"] = logout
    client = await (await Client.connect(proxy)).login()
    events, tagged = await client.command(b"o", b"LOGOUT")
    assert [e.raw for e in events] == [b"* BYE bye\r\n"] and tagged.status == b"OK"
    assert await client.closed()
    assert client.parser.next_event() is None  # no second BYE from the relay


async def test_uid_first_in_rewritten_responses(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(ENCRYPTED)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, _ = await client.command(b"f", b"UID FETCH 1 (RFC822.SIZE BODY.PEEK[]<0.20>)")
    assert events[0].raw.startswith(b"* 1 FETCH (UID 1 RFC822.SIZE %d " % len(CLEARTEXT))
    client.close()


async def test_view_failure_withholds_the_message_and_says_no(
    upstream: FakeUpstream, proxy: ImapProxy, recorder: Recorder
):
    upstream.add(PLAIN)
    upstream.add(ENCRYPTED)
    recorder.fail = True
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1:2 (BODY.PEEK[])")
    assert tagged.status == b"NO" and b"[UNAVAILABLE]" in tagged.raw
    assert b"RuntimeError" in tagged.raw and b"no key" not in tagged.raw
    assert [f[b"BODY[]"] for f in fetched(events)] == [Literal(PLAIN)]
    recorder.fail = False  # a later attempt succeeds: nothing wrong was cached
    events, tagged = await client.command(b"g", b"FETCH 2 (BODY.PEEK[])")
    assert tagged.status == b"OK" and fetched(events)[0][b"BODY[]"] == Literal(CLEARTEXT)
    client.close()


async def test_forged_status_header_on_plain_message(upstream: FakeUpstream, proxy: ImapProxy):
    forged = b"X-LocalProxy-Status: verified\r\n" + PLAIN
    upstream.add(forged)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    events, _ = await client.command(b"f", b"FETCH 1 (RFC822.SIZE BODY.PEEK[HEADER])")
    (response,) = fetched(events)
    assert b"LocalProxy" not in serialize([response[b"BODY[HEADER]"]])
    assert response[b"RFC822.SIZE"] == Number(len(PLAIN))
    client.close()


async def test_two_sessions_share_one_view_build(
    upstream: FakeUpstream, proxy: ImapProxy, recorder: Recorder
):
    upstream.add(ENCRYPTED)
    clients = [await (await Client.connect(proxy)).login() for _ in range(2)]
    for client in clients:
        await client.command(b"s", b"SELECT INBOX")
    results = await asyncio.gather(
        *(client.command(b"f", b"UID FETCH 1 (BODY.PEEK[])") for client in clients)
    )
    for events, tagged in results:
        assert tagged.status == b"OK" and fetched(events)[0][b"BODY[]"] == Literal(CLEARTEXT)
    assert len(recorder.calls) == 1
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- credentials


async def test_authenticate_plain_continuation_is_replayed(
    upstream: FakeUpstream, proxy: ImapProxy, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    upstream.caps = upstream.caps.replace(b" SASL-IR", b"")
    upstream.add(ENCRYPTED)
    token = base64.b64encode(b"\0alice\0pa55word")
    client = Client(*await asyncio.open_connection("127.0.0.1", proxy.port))
    await client.event()
    await client.send(b"a AUTHENTICATE PLAIN\r\n")
    assert (await client.event()).raw.startswith(b"+")
    await client.send(token + b"\r\n")
    _, tagged = await client.until(b"a")
    assert tagged.status == b"OK"
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1 (BODY.PEEK[TEXT])")  # needs the side
    assert tagged.status == b"OK"
    assert fetched(events)[0][b"BODY[TEXT]"] == Literal(b"secret body\r\n")
    assert upstream.received.count(b"(sasl) " + token + b"\r\n") == 2  # client, then side
    assert b"pa55word" not in caplog.text.encode() and token not in caplog.text.encode()
    client.close()


async def test_xoauth2_initial_response_is_replayed(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(ENCRYPTED)
    token = base64.b64encode(b"user=alice\x01auth=Bearer ya29.token\x01\x01")
    client = Client(*await asyncio.open_connection("127.0.0.1", proxy.port))
    await client.event()
    _, tagged = await client.command(b"a", b"AUTHENTICATE XOAUTH2 " + token)
    assert tagged.status == b"OK"
    await client.command(b"s", b"SELECT INBOX")
    events, tagged = await client.command(b"f", b"FETCH 1 (BODY.PEEK[TEXT])")  # needs the side
    assert tagged.status == b"OK"
    assert fetched(events)[0][b"BODY[TEXT]"] == Literal(b"secret body\r\n")
    replays = [c for c in upstream.commands(b"AUTHENTICATE") if c.endswith(token + b"\r\n")]
    assert len(replays) == 2
    client.close()


def test_credentials_never_show_in_repr():
    credentials = Credentials(None, (b"alice", b"hunter2"))
    assert "hunter2" not in repr(credentials) and "alice" not in repr(credentials)


# --------------------------------------------------------------------------- APPEND hook


async def test_append_to_sent_goes_through_the_append_transformer(upstream: FakeUpstream):
    upstream.list_lines = b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"\r\n'
    seen: list[tuple[str, bytes]] = []

    async def protect(mailbox: str, message: bytes) -> bytes:
        seen.append((mailbox, message))
        return b"PROTECTED " + message

    relay = ImapProxy(account_for(upstream.server_config()), append_transformer=protect)
    await relay.start()
    try:
        client = await (await Client.connect(relay)).login()
        await client.command(b"l", b'LIST "" "*"')
        for tag, mailbox in ((b"a", b"INBOX"), (b"b", b'"Sent Items"')):
            await client.send(
                tag + b" APPEND " + mailbox + b' (\\Seen) "01-Jan-2024 10:00:00 +0000" {5}\r\n'
            )
            await client.event()
            await client.send(b"hello\r\n")
            _, tagged = await client.until(tag)
            assert tagged.status == b"OK" and b"APPENDUID" in tagged.raw
        assert seen == [("Sent Items", b"hello")]
        assert list(upstream.messages.values()) == [b"hello", b"PROTECTED hello"]
        assert upstream.commands(b"APPEND")[1].startswith(
            b'b APPEND "Sent Items" (\\Seen) "01-Jan-2024 10:00:00 +0000" {15+}'
        )
        client.close()
    finally:
        await relay.close()


# --------------------------------------------------------------------------- pure helpers


def test_response_items_keep_every_item_exact():
    raw = (
        b'* 3 FETCH (UID 9 BODYSTRUCTURE (("text" "plain" NIL NIL NIL "7bit" 1 1)'
        b'("text" "html" NIL NIL NIL "7bit" 2 1) "alternative") '
        b'BODY[HEADER.FIELDS (SUBJECT "X-A")] {13}\r\nSubject: )(\r\n '
        b'ENVELOPE ("d" "quote \\" ) in" NIL NIL NIL NIL NIL NIL NIL NIL)  '
        b"BODY[]<0> ~{2}\r\n\x00))\r\n"
    )
    sequence, items = _response_items(one_response(raw))  # type: ignore[misc]
    assert sequence == 3
    assert [i.name for i in items] == [
        b"UID",
        b"BODYSTRUCTURE",
        b'BODY[HEADER.FIELDS (SUBJECT "X-A")]',
        b"ENVELOPE",
        b"BODY[]<0>",
    ]
    assert [i.key is not None for i in items] == [True] * 5
    assert items[1].value.endswith(b'"alternative")') and items[2].value.endswith(b")(\r\n")
    assert items[2].token == Literal(b"Subject: )(\r\n")
    assert items[4].token == Literal(b"\x00)", LiteralForm.BINARY)
    # what the relay sends when it drops an item: the others spliced byte for byte
    kept = [(i.name, i.value) for i in items if i.name != b"ENVELOPE"]
    assert serialize_fetch_response(sequence, kept) == raw.replace(
        b'ENVELOPE ("d" "quote \\" ) in" NIL NIL NIL NIL NIL NIL NIL NIL)  ', b""
    )
    assert _response_items(one_response(b"* 3 FETCH (UID 9 BODY[])\r\n")) is None


@pytest.mark.parametrize(
    ("header", "text", "expected"),
    [
        (b"Content-Type: text/plain\r\n\r\n", b"hello", False),
        (b"Content-Type: text/html\r\n\r\n", b"-----BEGIN PGP MESSAGE-----", False),
        (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n", b"--x", False),
        (b"Content-Type: multipart/encrypted; boundary=x\r\n\r\n", b"", True),
        (b"Content-Type: multipart/signed; boundary=x\r\n\r\n", b"", True),
        (b"Content-Type: application/pkcs7-mime\r\n\r\n", b"", True),
        (b"\r\n", b"\r\n  -----BEGIN PGP MESSAGE-----\r\n", True),
        (b"X-LocalProxy-Security: decrypted\r\n\r\n", b"hi", True),
        (b"Content-Type: text/plain\r\n\r\n", b"-----BEGIN PGP SIGNED MESSAGE-----\r\n", True),
        (None, b"hello", True),  # no probe: served from the view to be safe
    ],
)
def test_needs_view(header: bytes | None, text: bytes, expected: bool):
    values = [(b"BODY[TEXT]<0>", Literal(text))]
    if header is not None:
        fields = b"CONTENT-TYPE CONTENT-TRANSFER-ENCODING X-LOCALPROXY-SECURITY X-LOCALPROXY-STATUS"
        values.append((b"BODY[HEADER.FIELDS (" + fields + b")]", Literal(header)))
    parsed = _response_items(one_response(serialize_fetch_response(1, values)))
    assert parsed is not None
    assert _needs_view(parsed[1]) is expected


def test_armor_detection_decodes_transfer_encodings():
    armored = b"\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA" + b"x" * 100
    assert _may_be_armored(base64.encodebytes(armored)[:128], "base64")
    assert _may_be_armored(b"=20\r\n-----BEGIN PGP MESSAGE-----", "quoted-printable")
    assert not _may_be_armored(base64.encodebytes(b"just text" * 20)[:128], "base64")
    assert _may_be_armored(b" " * 128, "7bit")  # cut off inside leading whitespace
    assert _may_be_armored(b" " * 121 + b"-----BE", "7bit")
    assert not _may_be_armored(b"-----BE", "7bit")  # the whole body: not armored


def test_strip_status_headers():
    raw = b"X-LocalProxy-Security: x\r\nSubject: s\r\nx-localproxy-other: y\r\n folded\r\n\r\nb"
    assert strip_status_headers(raw) == b"Subject: s\r\n\r\nb"


def test_astring_helpers_stay_compatible():
    # the relay reads LOGIN/SELECT arguments through the codec's astring_value
    assert astring_value(Literal(b"INBOX")) == b"INBOX"
    assert SequenceSet.parse(b"1:*").contains(5, 7)


# --------------------------------------------------------------------------- header observer

AUTOCRYPT_PLAIN = (
    b"From: b@example.org\r\nSubject: hi\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Autocrypt: addr=b@example.org; keydata=Zm9v\r\n\r\nhello\r\n"
)


class Observed:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[bytes, MessageContext]] = []
        self.fail = fail

    async def __call__(self, header: bytes, context: MessageContext) -> None:
        self.calls.append((header, context))
        if self.fail:
            raise RuntimeError("observer broke")

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.calls) < count:
                await asyncio.sleep(0.01)


async def observed_proxy(upstream: FakeUpstream, observer: Observed) -> ImapProxy:
    relay = ImapProxy(account_for(upstream.server_config()), header_observer=observer)
    await relay.start()
    return relay


@pytest.mark.parametrize("fail", [False, True], ids=["observer-ok", "observer-raises"])
async def test_header_observer_sees_probed_fields_the_client_does_not(
    upstream: FakeUpstream, proxy: ImapProxy, fail: bool
):
    upstream.add(AUTOCRYPT_PLAIN)
    observer = Observed(fail)
    relay = await observed_proxy(upstream, observer)
    request = b"UID FETCH 1 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
    try:
        answers = []
        for target in (relay, proxy):  # with and without an observer
            client = await (await Client.connect(target)).login()
            await client.command(b"s", b"SELECT INBOX")
            events, tagged = await client.command(b"f", request)
            assert tagged.status == b"OK"
            answers.append([e.raw for e in events if isinstance(e, Untagged)])
            client.close()
        await observer.wait(1)
    finally:
        await relay.close()
    assert answers[0] == answers[1]
    assert answers[0][-1] == (
        b"* 1 FETCH (UID 1 FLAGS () BODY[HEADER.FIELDS (SUBJECT)] {15}\r\nSubject: hi\r\n\r\n)\r\n"
    )
    (header, context), *_ = observer.calls
    assert context == MessageContext("alice", "INBOX", UIDVALIDITY, 1)
    assert b"From: b@example.org\r\n" in header and b"Autocrypt: addr=b@example.org" in header
    assert b"Date: Mon, 01 Jan 2024" in header
    first, _second = upstream.commands(b"UID FETCH")
    assert b" FROM DATE AUTO-SUBMITTED AUTOCRYPT)]" in first


async def test_no_observer_no_extra_probe_fields(upstream: FakeUpstream, proxy: ImapProxy):
    upstream.add(PLAIN)
    client = await (await Client.connect(proxy)).login()
    await client.command(b"s", b"SELECT INBOX")
    await client.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER])")
    (sent,) = upstream.commands(b"FETCH")
    assert b"AUTOCRYPT" not in sent and b"FROM" not in sent
    client.close()
