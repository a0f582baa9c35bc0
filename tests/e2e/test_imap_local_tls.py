"""The IMAP relay's local side with TLS (STARTTLS, implicit TLS, LOGINDISABLED) and the
header observer that learns Autocrypt keys from plain mail, against the harness Dovecot
with real clients (imaplib, raw sockets)."""

from __future__ import annotations

import base64
import imaplib
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from localproxy.config import Account, LocalListen, parse_config
from localproxy.crypto.openpgp import default_engine
from localproxy.imap.codec import ServerParser, Tagged, Untagged
from localproxy.imap.relay import ImapProxy
from localproxy.incoming import IncomingProcessor
from localproxy.keys.store import KeyStore
from localproxy.localtls import LocalCertificate, ensure_local_certificate, server_context
from localproxy.sandbox.provider import Provider
from tests.harness.running import ProxyThread, make_account

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0
ENGINE = default_engine()
PLAIN = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: Alice <alice@example.org>\r\n"
    b"Subject: over local TLS\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <tls-1@example.org>\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Read through STARTTLS.\r\n"
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def local_cert(tmp_path: Path) -> LocalCertificate:
    return ensure_local_certificate(tmp_path / "local")


def trusting(cert: LocalCertificate) -> ssl.SSLContext:
    """A client context that trusts exactly the exported local certificate."""
    return ssl.create_default_context(cafile=str(cert.cert_path))


def tls_account(provider: Provider, host: str = "127.0.0.1") -> Account:
    local = LocalListen(host=host, imap_port=0, imaps_port=0)
    return replace(make_account(provider), local=local)


@pytest.fixture
def tls_relay(clean_provider: Provider, local_cert: LocalCertificate) -> Iterator[ProxyThread]:
    proxy = ImapProxy(tls_account(clean_provider), tls_context=server_context(local_cert))
    with ProxyThread(proxy) as running:
        yield running


def credentials(provider: Provider) -> tuple[str, str]:
    user = provider.users["alice"]
    return user.login, user.password


def second_starttls(conn: imaplib.IMAP4) -> bytes:
    """The relay's answer to STARTTLS on a TLS session (imaplib would not send it)."""
    tag = conn._new_tag()
    conn.send(tag + b" STARTTLS\r\n")
    return conn.readline().removeprefix(tag + b" ").rstrip()


class Raw:
    """Responses as the codec parses them, over a plain or TLS socket."""

    def __init__(self, sock: socket.socket, greeting: bool = True) -> None:
        sock.settimeout(TIMEOUT)
        self.sock = sock
        self.parser = ServerParser()
        self.greeting = self.event() if greeting else None

    @classmethod
    def connect(cls, host: str, port: int) -> Raw:
        return cls(socket.create_connection((host, port), timeout=TIMEOUT))

    def event(self) -> Any:
        while (event := self.parser.next_event()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self.parser.feed(data)
        return event

    def until(self, tag: bytes) -> tuple[list[Any], Tagged]:
        events = []
        while not (isinstance(event := self.event(), Tagged) and event.tag == tag):
            events.append(event)
        return events, event

    def command(self, tag: bytes, text: bytes) -> tuple[list[Any], Tagged]:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def capabilities(self) -> set[bytes]:
        events, tagged = self.command(b"cap", b"CAPABILITY")
        assert tagged.status == b"OK", tagged.raw
        (line,) = [e for e in events if isinstance(e, Untagged) and e.name == b"CAPABILITY"]
        return set(line.raw.upper().split()[2:])

    def starttls(self, context: ssl.SSLContext, hostname: str = "localhost") -> Raw:
        _, tagged = self.command(b"tls", b"STARTTLS")
        assert tagged.status == b"OK", tagged.raw
        assert self.parser.next_event() is None
        return Raw(context.wrap_socket(self.sock, server_hostname=hostname), greeting=False)

    def login(self, provider: Provider) -> Tagged:
        user, password = credentials(provider)
        return self.command(b"login", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))[1]

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- STARTTLS


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_starttls_then_login_select_fetch(
    tls_relay: ProxyThread, clean_provider: Provider, local_cert: LocalCertificate, hostname: str
):
    clean_provider.append("alice", PLAIN)
    with imaplib.IMAP4(hostname, tls_relay.port, timeout=TIMEOUT) as conn:
        assert "STARTTLS" in conn.capabilities and "LOGINDISABLED" not in conn.capabilities
        typ, _ = conn.starttls(trusting(local_cert))  # verifies the name it connected to
        assert typ == "OK"
        assert "STARTTLS" not in conn.capabilities, "re-read after TLS: no longer offered"
        assert "IMAP4REV1" in conn.capabilities and "IDLE" in conn.capabilities
        conn.login(*credentials(clean_provider))
        typ, exists = conn.select("INBOX")
        assert typ == "OK" and exists == [b"1"]
        typ, data = conn.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == PLAIN
        assert second_starttls(conn) == b"BAD TLS is already active"


def test_starttls_fails_for_a_client_that_does_not_trust_the_certificate(
    tls_relay: ProxyThread, clean_provider: Provider
):
    raw = Raw.connect("127.0.0.1", tls_relay.port)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            raw.starttls(ssl.create_default_context())  # the system's trust store only
    finally:
        raw.close()


def test_implicit_tls_port(tls_relay: ProxyThread, clean_provider: Provider, local_cert):
    clean_provider.append("alice", PLAIN)
    port = tls_relay.proxy.imaps_port
    with imaplib.IMAP4_SSL(
        "localhost", port, ssl_context=trusting(local_cert), timeout=TIMEOUT
    ) as conn:
        assert "STARTTLS" not in conn.capabilities and "LOGINDISABLED" not in conn.capabilities
        assert second_starttls(conn) == b"BAD TLS is already active"
        conn.login(*credentials(clean_provider))
        conn.select("INBOX")
        typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == PLAIN


def test_commands_pipelined_after_starttls_are_never_executed(
    tls_relay: ProxyThread, clean_provider: Provider, local_cert: LocalCertificate
):
    """STARTTLS command injection: whatever follows STARTTLS in the clear-text stream is
    dropped; here it is a LOGIN with valid credentials."""
    user, password = credentials(clean_provider)
    raw = Raw.connect("127.0.0.1", tls_relay.port)
    try:
        injected = b'b LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode())
        raw.sock.sendall(b"a STARTTLS\r\n" + injected)  # one packet
        _, tagged = raw.until(b"a")
        assert tagged.status == b"OK" and tagged.raw == b"a OK Begin TLS negotiation now\r\n"
        assert raw.parser.next_event() is None, "nothing else before the handshake"
        secure = Raw(trusting(local_cert).wrap_socket(raw.sock, server_hostname="localhost"), False)
        events, tagged = secure.command(b"c", b"CAPABILITY")
        assert tagged.status == b"OK"
        assert not any(isinstance(e, Tagged) for e in events), "no answer to b"
        _, tagged = secure.command(b"d", b"SELECT INBOX")
        assert tagged.status != b"OK", "the injected LOGIN did not log the session in"
        assert secure.login(clean_provider).status == b"OK"
        secure.close()
    finally:
        raw.close()


def test_without_a_certificate_starttls_is_neither_offered_nor_accepted(
    clean_provider: Provider,
):
    proxy = ImapProxy(make_account(clean_provider))
    with ProxyThread(proxy) as running:
        raw = Raw.connect("127.0.0.1", running.port)
        try:
            caps = raw.capabilities()
            assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
            _, tagged = raw.command(b"t", b"STARTTLS")
            assert tagged.status == b"BAD"
            assert raw.login(clean_provider).status == b"OK", "loopback: clear-text login"
        finally:
            raw.close()


# --------------------------------------------------------------------------- LOGINDISABLED


def test_listener_off_loopback_refuses_login_until_tls(
    clean_provider: Provider, local_cert: LocalCertificate
):
    # 127.0.0.2 stands in for a network address; the flag is what the host check decides
    proxy = ImapProxy(
        tls_account(clean_provider, host="127.0.0.2"),
        tls_context=server_context(local_cert),
        login_requires_tls=True,
    )
    with ProxyThread(proxy) as running:
        raw = Raw.connect("127.0.0.2", running.port)
        try:
            assert {b"STARTTLS", b"LOGINDISABLED"} <= raw.capabilities()
            tagged = raw.login(clean_provider)
            assert tagged.status == b"NO" and b"[PRIVACYREQUIRED]" in tagged.raw
            _, tagged = raw.command(b"auth", b"AUTHENTICATE PLAIN AGFsaWNlAHB3")
            assert tagged.status == b"NO" and b"[PRIVACYREQUIRED]" in tagged.raw
            secure = raw.starttls(trusting(local_cert), hostname="localhost")
            caps = secure.capabilities()
            assert b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps
            assert secure.login(clean_provider).status == b"OK"
            secure.close()
        finally:
            raw.close()


def test_default_login_policy_follows_the_listen_address(clean_provider: Provider):
    assert not ImapProxy(make_account(clean_provider)).login_requires_tls
    remote = replace(make_account(clean_provider), local=LocalListen(host="192.0.2.10"))
    assert ImapProxy(remote).login_requires_tls


# --------------------------------------------------------------------------- Autocrypt

BOB_KEY = ENGINE.public_only(ENGINE.generate_key(["Bob <bob@example.org>"]).data)
BOB_FINGERPRINT = ENGINE.parse_certs(BOB_KEY)[0].fingerprint
THUNDERBIRD_HEADERS = (
    "(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date "
    "Message-ID Priority X-Priority References Newsgroups In-Reply-To Content-Type "
    "Reply-To)])"
)


def autocrypt_field(addr: str, keydata: bytes) -> bytes:
    data = base64.b64encode(keydata).decode()
    folded = "\r\n ".join(data[i : i + 72] for i in range(0, len(data), 72))
    return f"Autocrypt: addr={addr}; keydata=\r\n {folded}\r\n".encode()


def plain_mail(number: int, *fields: bytes, sender: str = "bob@example.org") -> bytes:
    return (
        f"From: {sender}\r\nTo: alice@example.org\r\nSubject: hello {number}\r\n"
        f"Date: Mon, 01 Jan 2024 10:0{number}:00 +0000\r\n"
        f"Message-ID: <ac-{number}@example.org>\r\n".encode()
        + b"".join(fields)
        + b"Content-Type: text/plain\r\n\r\nFirst contact, in clear.\r\n"
    )


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "data", ENGINE) as store:
        yield store


def learning_relay(provider: Provider, store: KeyStore, data: Path) -> ImapProxy:
    upstream = {"host": provider.hostname, "port": provider.imap_port, "security": "starttls"}
    config = parse_config(
        {
            "proxy": {"data_dir": str(data)},
            "account": [
                {
                    "name": "alice",
                    "addresses": [provider.users["alice"].address],
                    "upstream": {"imap": upstream, "smtp": upstream},
                }
            ],
        }
    )
    incoming = IncomingProcessor(config.accounts[0], config, store, ENGINE)
    return ImapProxy(
        make_account(provider), incoming.transform, header_observer=incoming.observe_headers
    )


def wait_for_key(store: KeyStore, address: str) -> list[tuple[str, str]]:
    deadline = time.monotonic() + TIMEOUT
    while not (found := store.find(address)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [(c.fingerprint, c.source) for c in found]


def test_thunderbird_header_listing_learns_autocrypt_from_plain_mail(
    clean_provider: Provider, keys: KeyStore, tmp_path: Path
):
    clean_provider.append("alice", plain_mail(1, autocrypt_field("bob@example.org", BOB_KEY)))
    relay = learning_relay(clean_provider, keys, tmp_path / "data")
    with (
        ProxyThread(relay) as running,
        imaplib.IMAP4("127.0.0.1", running.port, timeout=TIMEOUT) as conn,
    ):
        conn.login(*credentials(clean_provider))
        conn.select("INBOX", readonly=True)
        typ, data = conn.uid("FETCH", "1:*", THUNDERBIRD_HEADERS)
        assert typ == "OK" and b"Subject: hello 1" in data[0][1]
        assert wait_for_key(keys, "bob@example.org") == [(BOB_FINGERPRINT, "autocrypt")]
    with clean_provider.imap("alice") as direct:
        direct.select("INBOX", readonly=True)
        assert direct.uid("FETCH", "1:*", THUNDERBIRD_HEADERS) == (typ, data)
    assert b"Autocrypt" not in data[0][1], "the probe's extra fields stay with the relay"


def test_unusable_autocrypt_headers_teach_nothing_and_fetch_stays_exact(
    clean_provider: Provider, keys: KeyStore, tmp_path: Path
):
    messages = [
        plain_mail(1, autocrypt_field("mallory@example.org", BOB_KEY)),  # addr is not From
        plain_mail(2, *[autocrypt_field("bob@example.org", BOB_KEY)] * 2),  # two headers
        plain_mail(3, autocrypt_field("bob@example.org", b"\x99garbage keydata")),
        plain_mail(4),  # no header at all
    ]
    for raw in messages:
        clean_provider.append("alice", raw)
    requests = [THUNDERBIRD_HEADERS, "(UID RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY.PEEK[])"]
    answers = []
    with ProxyThread(learning_relay(clean_provider, keys, tmp_path / "data")) as running:
        relay = imaplib.IMAP4("127.0.0.1", running.port, timeout=TIMEOUT)
        relay.login(*credentials(clean_provider))
        for conn in (relay, clean_provider.imap("alice")):
            with conn:
                conn.select("INBOX", readonly=True)
                for request in requests:
                    typ, data = conn.uid("FETCH", "1:*", request)
                    assert typ == "OK"
                    answers.append(data)
    # leaving the block closed the relay, which waits for its observers
    assert answers[:2] == answers[2:], "the relay's answers are Dovecot's, byte for byte"
    assert [part[1] for part in answers[1] if isinstance(part, tuple)] == messages
    assert keys.find("bob@example.org") == [] and keys.find("mallory@example.org") == []


def test_starttls_refused_after_login_or_behind_other_commands(
    tls_relay: ProxyThread, clean_provider: Provider
):
    raw = Raw.connect("127.0.0.1", tls_relay.port)
    try:
        raw.sock.sendall(b"a NOOP\r\nb STARTTLS\r\n")
        answers: dict[bytes, Tagged] = {}
        while len(answers) < 2:
            if isinstance(event := raw.event(), Tagged):
                answers[event.tag] = event
        assert answers[b"b"].status == b"BAD" and b"before it are complete" in answers[b"b"].raw
        assert answers[b"a"].status == b"OK", "the session goes on in clear"
        assert raw.login(clean_provider).status == b"OK"  # loopback: allowed in clear
        _, tagged = raw.command(b"c", b"STARTTLS")
        assert tagged.status == b"BAD" and b"before login" in tagged.raw
        _, tagged = raw.command(b"d", b"CAPABILITY")
        assert tagged.status == b"OK"
    finally:
        raw.close()
