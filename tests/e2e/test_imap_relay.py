"""The IMAP relay between real clients (imaplib, mbsync, a raw socket client) and the
harness Dovecot.

Oracle for the view path: the transformed message is also APPENDed straight to Dovecot
(mailbox "Oracle"); every content item the relay computes for the encrypted message must
equal what Dovecot itself answers for those bytes.
"""

from __future__ import annotations

import base64
import imaplib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localproxy.imap.codec import (
    Literal,
    Number,
    PList,
    Quoted,
    ServerParser,
    Tagged,
    Token,
    Unparsed,
    Untagged,
    fetch_item_spans,
    parse_fetch_response,
    serialize_fetch_response,
    serialize_untagged,
)
from localproxy.imap.relay import ImapProxy, MessageContext
from localproxy.sandbox.provider import Provider
from tests.harness.running import ProxyThread, make_account

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0
ORACLE = "Oracle"

PLAIN = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: plain hello\r\n"
    b"Message-ID: <plain-1@example.org>\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Just a plain message.\r\n"
)
FORGED = (
    b"From: Mallory <mallory@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: trust me\r\n"
    b"X-LocalProxy-Security: decrypted; signature=valid\r\n"
    b"Date: Mon, 01 Jan 2024 11:00:00 +0000\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"This message pretends to be verified.\r\n"
)
ENCRYPTED = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: ...\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
    b' boundary="enc"\r\n'
    b"\r\n"
    b"--enc\r\n"
    b"Content-Type: application/pgp-encrypted\r\n"
    b"\r\n"
    b"Version: 1\r\n"
    b"--enc\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"\r\n"
    b"-----BEGIN PGP MESSAGE-----\r\n"
    b"\r\n"
    b"bm90IHJlYWxseSBjaXBoZXJ0ZXh0\r\n"
    b"-----END PGP MESSAGE-----\r\n"
    b"--enc--\r\n"
)
MULTIPART = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>, Carol <carol@example.org>\r\n"
    b"Subject: Fwd: multipart\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See below.\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b'Content-Disposition: attachment; filename="fwd.eml"\r\n'
    b"\r\n"
    b"From: Dave <dave@example.net>\r\n"
    b"Subject: inner\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="inner"\r\n'
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"hello\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Language: en, de\r\n"
    b"\r\n"
    b"<p>hello</p>\r\n"
    b"--inner--\r\n"
    b"--outer--\r\n"
)
_ATTACHMENT = base64.encodebytes(bytes(range(256)) * 400).replace(b"\n", b"\r\n")
CLEARTEXT = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: the real subject\r\n"
    b"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
    b"Message-ID: <secret-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"X-LocalProxy-Security: decrypted\r\n"
    b'Content-Type: multipart/mixed; boundary="mix"\r\n'
    b"\r\n"
    b"--mix\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"The secret text, gr=C3=BC=C3=9Fe.\r\n"
    b"--mix\r\n"
    b"Content-Type: application/octet-stream; name=data.bin\r\n"
    b"Content-Disposition: attachment; filename=data.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + _ATTACHMENT + b"--mix--\r\n"
)
assert len(CLEARTEXT) > 2 * 65536  # Thunderbird's chunked fetch needs several rounds


Transform = Callable[[bytes, MessageContext], Awaitable[bytes]]


class Transformed:
    """Test transformer: the multipart/encrypted message "decrypts" to CLEARTEXT."""

    def __init__(self) -> None:
        self.calls: list[MessageContext] = []

    async def __call__(self, raw: bytes, context: MessageContext) -> bytes:
        self.calls.append(context)
        if b"multipart/encrypted" in raw.split(b"\r\n\r\n", 1)[0]:
            return CLEARTEXT
        from localproxy.imap.relay import strip_status_headers

        return strip_status_headers(raw)


@pytest.fixture
def transformer() -> Transformed:
    return Transformed()


@pytest.fixture
def relay(clean_provider: Provider, transformer: Transformed) -> Iterator[ProxyThread]:
    proxy = ImapProxy(make_account(clean_provider), transformer)
    with ProxyThread(proxy) as running:
        yield running


def relay_login(relay: ProxyThread, provider: Provider) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", relay.port, timeout=TIMEOUT)
    user = provider.users["alice"]
    conn.login(user.login, user.password)
    return conn


# --------------------------------------------------------------------------- raw client


class RawImap:
    """Just enough of an IMAP client to see responses as the codec parses them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.parser = ServerParser()
        self.counter = 0
        self.greeting = self.event()

    @classmethod
    def to_relay(cls, relay: ProxyThread) -> RawImap:
        return cls(socket.create_connection(("127.0.0.1", relay.port)))

    @classmethod
    def to_dovecot(cls, provider: Provider) -> RawImap:
        raw = socket.create_connection((provider.host, provider.imaps_port))
        return cls(provider.ssl_context().wrap_socket(raw, server_hostname=provider.hostname))

    def close(self) -> None:
        self.sock.close()

    def event(self) -> Any:
        while (event := self.parser.next_event()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.parser.feed(data)
        return event

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: bytes) -> tuple[list[Any], Tagged]:
        self.counter += 1
        tag = b"r%d" % self.counter
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def until_tagged(self, tag: bytes) -> tuple[list[Any], Tagged]:
        events = []
        while True:
            event = self.event()
            if isinstance(event, Tagged) and event.tag == tag:
                return events, event
            events.append(event)

    def ok(self, text: bytes) -> list[Any]:
        events, tagged = self.command(text)
        assert tagged.status == b"OK", tagged.raw
        return events

    def login(self, provider: Provider) -> RawImap:
        user = provider.users["alice"]
        self.ok(b'LOGIN "%s" "%s"' % (user.login.encode(), user.password.encode()))
        return self

    def fetch(self, text: bytes) -> list[dict[bytes, Token]]:
        """FETCH responses as {item name: value}, raw bytes under b"RAW"."""
        out = []
        for event in self.ok(text):
            assert not isinstance(event, Unparsed), event  # multipart BODYSTRUCTUREs included
            if isinstance(event, Untagged) and event.status is None and event.name == b"FETCH":
                items = {name.upper(): value for name, value in parse_fetch_response(event).items}
                out.append(items | {b"RAW": event.raw})
        return out


def data(value: Token) -> bytes:
    if isinstance(value, Literal):
        return value.data
    if isinstance(value, Quoted):
        return value.value
    raise AssertionError(f"not a string: {value!r}")


def uid_of(conn: imaplib.IMAP4, message_id: str) -> str:
    typ, found = conn.uid("SEARCH", "HEADER", "Message-ID", message_id)
    assert typ == "OK" and found[0], found
    return found[0].split()[-1].decode()


def last_uid(raw: RawImap, mailbox: bytes = b"INBOX") -> int:
    raw.ok(b"EXAMINE " + mailbox)
    responses = raw.fetch(b"FETCH * (UID)")
    value = responses[-1][b"UID"]
    assert isinstance(value, Number)
    return value.value


# --------------------------------------------------------------------------- pass-through


def test_plain_session_is_identical_to_direct_access(relay: ProxyThread, clean_provider: Provider):
    clean_provider.append("alice", PLAIN)
    clean_provider.append("alice", PLAIN.replace(b"plain-1", b"plain-2"), flags="\\Flagged")
    items = "(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[])"
    with clean_provider.imap("alice") as first:
        first.select("INBOX")  # takes \Recent, which only the first session would see
    results = []
    for conn in (relay_login(relay, clean_provider), clean_provider.imap("alice")):
        with conn:
            typ, mailboxes = conn.list()
            assert typ == "OK"
            typ, exists = conn.select("INBOX")
            assert typ == "OK" and exists == [b"2"]
            results.append(
                (mailboxes, conn.fetch("1:*", items), conn.uid("FETCH", "1:*", "(FLAGS)"))
            )
    via_relay, direct = results
    assert via_relay == direct
    assert via_relay[1][1][0][1] == PLAIN  # the literal, byte for byte


def test_multipart_bodystructure_is_parsed_and_passed_on_exactly(
    relay: ProxyThread, clean_provider: Provider
):
    clean_provider.append("alice", MULTIPART)
    items = b"(UID ENVELOPE BODY BODYSTRUCTURE)"
    via_relay = RawImap.to_relay(relay).login(clean_provider)
    direct = RawImap.to_dovecot(clean_provider).login(clean_provider)
    try:
        answers = []
        for conn in (via_relay, direct):
            conn.ok(b"EXAMINE INBOX")
            events, tagged = conn.command(b"FETCH 1 " + items)
            assert tagged.status == b"OK"
            (event,) = events
            assert isinstance(event, Untagged), event  # the codec reads Dovecot's form
            answers.append(event)
    finally:
        via_relay.close()
        direct.close()
    relayed, dovecot = answers
    # sub-bodies and addresses back to back; rfc822 envelope and body, dsp and lang spaced
    for form in (b' 0)("message" ', b'.org")("Carol" ', b"NIL) ((", b'NIL ("en" "de") NIL)'):
        assert form in dovecot.raw, form
    assert relayed.raw == dovecot.raw  # probes removed, every item spliced byte for byte
    assert serialize_untagged(dovecot.tokens) == dovecot.raw
    assert serialize_fetch_response(*parse_fetch_response(dovecot)) == dovecot.raw
    spans = fetch_item_spans(dovecot)
    assert [s.name for s in spans] == [b"UID", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE"]
    assert b" ".join(s.name + b" " + s.raw for s in spans) == dovecot.raw[len(b"* 1 FETCH (") : -3]


def test_greeting_and_capabilities_are_filtered(relay: ProxyThread, clean_provider: Provider):
    raw = RawImap.to_relay(relay)
    try:
        # The provider's greeting capabilities travelled before STARTTLS: void, dropped
        assert raw.greeting.raw.startswith(b"* OK ") and b"CAPABILITY" not in raw.greeting.raw
        events = raw.ok(b"CAPABILITY")
        caps = events[0].raw.upper().split()
        assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
        assert b"IMAP4REV1" in caps and b"IDLE" in caps and b"AUTH=PLAIN" in caps
        user = clean_provider.users["alice"]
        _, tagged = raw.command(b'LOGIN "%s" "%s"' % (user.login.encode(), user.password.encode()))
        assert tagged.status == b"OK"
        assert b"COMPRESS" not in tagged.raw.upper() and b"STARTTLS" not in tagged.raw.upper()
        # Dovecot offers COMPRESS=DEFLATE after login; the relay never passes it on
        _, tagged = raw.command(b"COMPRESS DEFLATE")
        assert tagged.status == b"BAD"
        assert raw.ok(b"NOOP") == []  # the session is still plain text and usable
    finally:
        raw.close()


def test_implicit_tls_greeting_keeps_filtered_capabilities(clean_provider: Provider):
    proxy = ImapProxy(make_account(clean_provider, implicit_tls=True))
    with ProxyThread(proxy) as running:
        raw = RawImap.to_relay(running)
        try:
            greeting = raw.greeting.raw.upper()
            assert greeting.startswith(b"* OK [CAPABILITY IMAP4REV1 ") and b" IDLE" in greeting
            assert b"STARTTLS" not in greeting and b"LOGINDISABLED" not in greeting
            raw.login(clean_provider)
        finally:
            raw.close()


def test_append_with_literal_keeps_flags_and_reports_appenduid(
    relay: ProxyThread, clean_provider: Provider
):
    with relay_login(relay, clean_provider) as conn:
        date = imaplib.Time2Internaldate(time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1)))
        typ, data_ = conn.append("INBOX", "(\\Flagged $Work)", date, PLAIN)
        assert typ == "OK" and b"APPENDUID" in data_[0]
        conn.select("INBOX")
        typ, flags = conn.fetch("1", "(FLAGS INTERNALDATE)")
        assert b"\\Flagged" in flags[0] and b"$Work" in flags[0] and b"02-Jan-2024" in flags[0]
    assert clean_provider.stored_messages("alice") == [PLAIN]


def test_idle_reports_a_message_delivered_meanwhile(relay: ProxyThread, clean_provider: Provider):
    raw = RawImap.to_relay(relay).login(clean_provider)
    try:
        raw.ok(b"SELECT INBOX")
        raw.send(b"i1 IDLE\r\n")
        assert raw.event().raw.startswith(b"+")
        clean_provider.append("alice", PLAIN)
        deadline = time.monotonic() + TIMEOUT
        while True:
            event = raw.event()
            if isinstance(event, Untagged) and event.name == b"EXISTS":
                break
            assert time.monotonic() < deadline
        raw.send(b"DONE\r\n")
        _, tagged = raw.until_tagged(b"i1")
        assert tagged.status == b"OK"
        assert raw.fetch(b"FETCH 1 (BODY.PEEK[])")[0][b"BODY[]"] == Literal(PLAIN)
    finally:
        raw.close()


# --------------------------------------------------------------------------- the view path


def test_forged_status_header_is_stripped(relay: ProxyThread, clean_provider: Provider):
    clean_provider.append("alice", FORGED)
    stripped = FORGED.replace(b"X-LocalProxy-Security: decrypted; signature=valid\r\n", b"")
    _create_oracle(clean_provider, stripped)
    items = b"(UID RFC822.SIZE BODYSTRUCTURE ENVELOPE BODY.PEEK[] BODY.PEEK[HEADER])"
    served = _fetch_via_relay(relay, clean_provider, b"INBOX", items)
    assert data(served[b"BODY[]"]) == stripped
    assert served[b"RFC822.SIZE"] == Number(len(stripped))
    assert b"LOCALPROXY" not in data(served[b"BODY[HEADER]"]).upper()
    _assert_same_as_oracle(served, _fetch_oracle(clean_provider, items))


def test_encrypted_message_is_served_from_the_view_in_every_form(
    relay: ProxyThread, clean_provider: Provider, transformer: Transformed
):
    clean_provider.append("alice", ENCRYPTED)
    _create_oracle(clean_provider, CLEARTEXT)
    forms = [
        b"(UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY FLAGS INTERNALDATE)",
        b"(BODY.PEEK[] BODY.PEEK[HEADER] BODY.PEEK[TEXT] BODY.PEEK[1] BODY.PEEK[2])",
        b"(BODY.PEEK[1.MIME] BODY.PEEK[2.MIME] BODY.PEEK[HEADER.FIELDS (Subject From)])",
        b"(BODY.PEEK[HEADER.FIELDS.NOT (Subject)] BODY.PEEK[]<0.100> BODY.PEEK[2]<10.50>)",
        b"(BODY.PEEK[]<99999999.10>)",
        b"(BINARY.PEEK[1] BINARY.PEEK[2] BINARY.SIZE[1] BINARY.SIZE[2])",
    ]
    for items in forms:
        served = _fetch_via_relay(relay, clean_provider, b"INBOX", items)
        _assert_same_as_oracle(served, _fetch_oracle(clean_provider, items))
    assert data(served.get(b"BINARY[2]", Literal(b""))) == bytes(range(256)) * 400
    # RFC822 and friends set \Seen: compare them on their own, after the PEEK forms
    items = b"(RFC822.SIZE RFC822.HEADER RFC822.TEXT RFC822)"
    served = _fetch_via_relay(relay, clean_provider, b"INBOX", items)
    _assert_same_as_oracle(served, _fetch_oracle(clean_provider, items))
    assert data(served[b"RFC822"]) == CLEARTEXT
    assert served[b"RFC822.SIZE"] == Number(len(CLEARTEXT))
    envelope = _fetch_via_relay(relay, clean_provider, b"INBOX", b"(ENVELOPE)")[b"ENVELOPE"]
    assert isinstance(envelope, PList) and envelope.items[1] == Quoted(b"the real subject")
    # one stored fetch and one transformation, however many FETCH commands
    assert len(transformer.calls) == 1
    assert transformer.calls[0].mailbox == "INBOX" and transformer.calls[0].account == "alice"


def test_thunderbird_chunked_fetch_yields_the_whole_view(
    relay: ProxyThread, clean_provider: Provider
):
    clean_provider.append("alice", ENCRYPTED)
    raw = RawImap.to_relay(relay).login(clean_provider)
    try:
        uid = last_uid(raw)
        raw.ok(b"SELECT INBOX")
        chunks, offset, size = [], 0, None
        while size is None or offset < size:
            (response,) = raw.fetch(
                b"UID FETCH %d (UID RFC822.SIZE BODY.PEEK[]<%d.65536>)" % (uid, offset)
            )
            assert response[b"RAW"].startswith(b"* 1 FETCH (UID %d " % uid)
            size_value = response[b"RFC822.SIZE"]
            assert isinstance(size_value, Number)
            size = size_value.value
            chunk = data(response[b"BODY[]<%d>" % offset])
            assert chunk, "no progress"
            chunks.append(chunk)
            offset += len(chunk)
        assert len(chunks) == 3
        assert b"".join(chunks) == CLEARTEXT and size == len(CLEARTEXT)
    finally:
        raw.close()


def test_non_peek_fetch_sets_seen_upstream_and_reports_flags(
    relay: ProxyThread, clean_provider: Provider
):
    clean_provider.append("alice", ENCRYPTED)
    raw = RawImap.to_relay(relay).login(clean_provider)
    try:
        uid = last_uid(raw)
        raw.ok(b"SELECT INBOX")
        (response,) = raw.fetch(b"UID FETCH %d (BODY[])" % uid)
        assert data(response[b"BODY[]"]) == CLEARTEXT
        assert response[b"FLAGS"] == PList((Quoted(b"\\Seen"),)) or b"\\Seen" in response[b"RAW"]
    finally:
        raw.close()
    with clean_provider.imap("alice") as direct:
        direct.select("INBOX", readonly=True)
        typ, flags = direct.uid("FETCH", str(uid), "(FLAGS)")
        assert typ == "OK" and b"\\Seen" in flags[0]
    # the stored message is untouched: the provider keeps the ciphertext
    assert clean_provider.stored_messages("alice") == [ENCRYPTED]


def test_plain_fetch_without_uid_does_not_grow_a_uid(relay: ProxyThread, clean_provider: Provider):
    clean_provider.append("alice", PLAIN)
    raw = RawImap.to_relay(relay).login(clean_provider)
    direct = RawImap.to_dovecot(clean_provider).login(clean_provider)
    try:
        answers = []
        for conn in (raw, direct):
            conn.ok(b"EXAMINE INBOX")
            answers.append(conn.fetch(b"FETCH 1 (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (Subject)])"))
        assert answers[0] == answers[1]
        assert b"UID" not in answers[0][0]
    finally:
        raw.close()
        direct.close()


def test_known_plain_messages_pass_through_on_the_next_fetch(
    relay: ProxyThread, clean_provider: Provider, caplog: pytest.LogCaptureFixture
):
    for message in (PLAIN, ENCRYPTED, PLAIN):
        clean_provider.append("alice", message)
    conn = relay_login(relay, clean_provider)
    caplog.set_level("DEBUG", logger="localproxy.imap.relay")
    try:
        answers = []
        for _ in range(3):
            conn.select("INBOX", readonly=True)
            answers.append(conn.fetch("1:*", "(FLAGS ENVELOPE RFC822.SIZE)"))
        conn.select("INBOX", readonly=True)
        answers.append(conn.fetch("1,3", "(FLAGS ENVELOPE RFC822.SIZE)"))
    finally:
        conn.logout()
    assert answers[0] == answers[1] == answers[2]
    assert answers[3][1] == [answers[0][1][0], answers[0][1][2]]
    plain = relay.proxy.cache._plain  # the first FETCH taught the relay both plain UIDs
    (uids,) = plain.values()
    assert len(uids) == 2 and max(uids) - min(uids) == 2  # the 1st and 3rd message only
    passed = [r.getMessage() for r in caplog.records if "without probes" in r.getMessage()]
    # 1:* names 3 messages, 2 known plain: probed each time; 1,3 (fresh EXAMINE, no map
    # yet) gets UID added and no probes
    assert ["mostly plain" in m for m in passed] == [True]


def test_store_responses_pass_through(relay: ProxyThread, clean_provider: Provider):
    clean_provider.append("alice", ENCRYPTED)
    with relay_login(relay, clean_provider) as conn:
        conn.select("INBOX")
        typ, answer = conn.store("1", "+FLAGS", "(\\Flagged)")
        assert typ == "OK" and b"\\Flagged" in answer[0]


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) not installed")
def test_mbsync_gets_the_transformed_message(
    relay: ProxyThread, clean_provider: Provider, tmp_path: Path
):
    clean_provider.append("alice", PLAIN)
    clean_provider.append("alice", ENCRYPTED)
    user = clean_provider.users["alice"]
    maildir = tmp_path / "mail"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(f"""\
IMAPAccount proxy
Host 127.0.0.1
Port {relay.port}
User {user.login}
Pass {user.password}
SSLType None
AuthMechs LOGIN

IMAPStore proxy-remote
Account proxy

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel sync
Far :proxy-remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
""")
    result = subprocess.run(
        ["mbsync", "-c", str(config), "-a"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    files = sorted((maildir / "INBOX").glob("*/*"))
    # mbsync stores LF line ends and adds its own X-TUID header while syncing
    bodies = sorted(re.sub(rb"X-TUID: .*\n", b"", f.read_bytes()) for f in files)
    expected = sorted(m.replace(b"\r\n", b"\n") for m in (PLAIN, CLEARTEXT))
    assert bodies == expected


# --------------------------------------------------------------------------- helpers


def _create_oracle(provider: Provider, message: bytes) -> None:
    with provider.imap("alice") as conn:
        conn.create(ORACLE)  # fails harmlessly when it exists
        _, count = conn.select(ORACLE)
        if int(count[0]):
            conn.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")
            conn.expunge()
    provider.append("alice", message, mailbox=ORACLE)


def _fetch_via_relay(
    relay: ProxyThread, provider: Provider, mailbox: bytes, items: bytes
) -> dict[bytes, Token]:
    raw = RawImap.to_relay(relay).login(provider)
    try:
        uid = last_uid(raw, mailbox)
        raw.ok(b"SELECT " + mailbox)
        (response,) = raw.fetch(b"UID FETCH %d %s" % (uid, items))
        return response
    finally:
        raw.close()


def _fetch_oracle(provider: Provider, items: bytes) -> dict[bytes, Token]:
    raw = RawImap.to_dovecot(provider).login(provider)
    try:
        uid = last_uid(raw, ORACLE.encode())
        raw.ok(b"SELECT " + ORACLE.encode())
        (response,) = raw.fetch(b"UID FETCH %d %s" % (uid, items))
        return response
    finally:
        raw.close()


def _assert_same_as_oracle(served: dict[bytes, Token], oracle: dict[bytes, Token]) -> None:
    metadata = {b"UID", b"FLAGS", b"INTERNALDATE", b"RAW"}
    assert set(served) == set(oracle)
    for name in set(served) - metadata:
        assert _normal(served[name]) == _normal(oracle[name]), name


def _normal(value: Token) -> Any:
    """Quoted and literal strings are the same string."""
    if isinstance(value, Literal | Quoted):
        return ("string", data(value))
    if isinstance(value, PList):
        return tuple(_normal(item) for item in value.items)
    return value


# --------------------------------------------------------------------------- fast paths


def test_known_plain_fetch_is_byte_identical_to_dovecot(
    relay: ProxyThread, clean_provider: Provider
):
    """The second FETCH of known plain messages is framed, never tokenized, and
    forwarded in one write per read: the bytes must still be Dovecot's."""
    for index in range(3):
        clean_provider.append("alice", PLAIN.replace(b"plain-1", b"plain-%d" % index))
    raw = RawImap.to_relay(relay).login(clean_provider)
    direct = RawImap.to_dovecot(clean_provider).login(clean_provider)
    command = b"FETCH 1:* (FLAGS ENVELOPE RFC822.SIZE BODY.PEEK[])"
    try:
        answers = []
        for conn in (raw, raw, direct):  # the relay's second time is the fast path
            conn.ok(b"EXAMINE INBOX")
            answers.append([r[b"RAW"] for r in conn.fetch(command)])
        assert answers[0] == answers[1] == answers[2]
        assert len(relay.proxy.cache.plain_uids("alice", b"INBOX", _uidvalidity(raw))) == 3
    finally:
        raw.close()
        direct.close()


def _uidvalidity(raw: RawImap) -> int:
    events = raw.ok(b"EXAMINE INBOX")
    for event in events:
        code = event.code if isinstance(event, Untagged) else None
        if code is not None and code.name == b"UIDVALIDITY":
            value = code.args[0]
            assert isinstance(value, Number)
            return value.value
    raise AssertionError("no UIDVALIDITY")


def test_cached_view_is_served_from_a_one_octet_stand_in(
    relay: ProxyThread,
    clean_provider: Provider,
    transformer: Transformed,
    caplog: pytest.LogCaptureFixture,
):
    clean_provider.append("alice", ENCRYPTED)
    served = _fetch_via_relay(relay, clean_provider, b"INBOX", b"(BODY.PEEK[])")
    assert data(served[b"BODY[]"]) == CLEARTEXT  # the view is cached now
    caplog.set_level("DEBUG", logger="localproxy.imap.relay")
    forms = {
        b"(UID BODY.PEEK[])": b"BODY[]",
        b"(BODY.PEEK[] BODY.PEEK[]<0.10>)": b"BODY[]",  # ambiguous: no stand-in
        b"(RFC822.SIZE RFC822)": b"RFC822",
    }
    for items, name in forms.items():
        served = _fetch_via_relay(relay, clean_provider, b"INBOX", items)
        assert data(served[name]) == CLEARTEXT, items
    assert data(served.get(b"RFC822", Literal(b""))) == CLEARTEXT
    stand_ins = [r for r in caplog.records if "served from cached views" in r.getMessage()]
    assert len(stand_ins) == 2
    assert len(transformer.calls) == 1


def test_non_peek_fetch_of_a_cached_view_still_sets_seen(
    relay: ProxyThread, clean_provider: Provider, caplog: pytest.LogCaptureFixture
):
    clean_provider.append("alice", ENCRYPTED)
    _fetch_via_relay(relay, clean_provider, b"INBOX", b"(BODY.PEEK[])")  # caches the view
    caplog.set_level("DEBUG", logger="localproxy.imap.relay")
    served = _fetch_via_relay(relay, clean_provider, b"INBOX", b"(BODY[])")
    assert data(served[b"BODY[]"]) == CLEARTEXT
    assert b"\\Seen" in served[b"RAW"]
    assert b"BODY[]<0>" not in served[b"RAW"]
    assert any("served from cached views" in r.getMessage() for r in caplog.records)
    with clean_provider.imap("alice") as direct:
        direct.select("INBOX", readonly=True)
        typ, flags = direct.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"\\Seen" in flags[0]
    assert clean_provider.stored_messages("alice") == [ENCRYPTED]
