"""The SMTP proxy under hostile or broken conditions, against real Postfix and Dovecot.

Local TLS (STARTTLS, implicit TLS, AUTH only after TLS off loopback), the limits
(size, recipients, sessions, line length), bad input from the client, and a
provider that drops the connection or stalls in the middle of DATA. The rule
throughout: every case has a defined outcome, and nothing reaches a recipient in
clear that policy says must be encrypted. Pure versions of the bad-input cases are
in tests/smtp/test_compose.py.

Blocking smtplib clients run in threads (asyncio.to_thread): the proxy shares the
test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import shutil
import smtplib
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from localproxy.config import Config, parse_config
from localproxy.crypto.openpgp import DecryptResult, default_engine
from localproxy.keys.store import KeyStore
from localproxy.localtls import LocalCertificate, ensure_local_certificate, server_context
from localproxy.mime import parse_entity
from localproxy.sandbox.provider import Provider
from localproxy.secretbox import SecretBox
from localproxy.smtp.outbox import Outbox
from localproxy.smtp.server import ENCRYPTION_GROWTH, MAX_SESSIONS, SmtpHandler, SmtpProxy
from tests.harness.smtp_faults import SmtpFaultRelay

pytestmark = pytest.mark.e2e
ENGINE = default_engine()
BOB_KEY = ENGINE.generate_key(["Bob <bob@example.org>"])
SECRET = b"SECRET-BODY-TEXT-4711"
BOB_ALWAYS = {"address": {"bob@example.org": {"encrypt": "always"}}}


@dataclass
class Rig:
    provider: Provider
    proxy: SmtpProxy
    config: Config
    store: KeyStore
    outbox: Outbox
    events: list[tuple[str, dict]] = field(default_factory=list)

    def connect(self, host: str = "127.0.0.1") -> smtplib.SMTP:
        return smtplib.SMTP(host, self.proxy.port, local_hostname="localhost", timeout=30)

    def client(self) -> smtplib.SMTP:
        smtp = self.connect()
        alice = self.provider.users["alice"]
        smtp.login(alice.login, alice.password)
        return smtp

    def send(self, raw: bytes, to: list[str], sender: str = "alice@example.org") -> dict:
        with self.client() as smtp:
            return smtp.sendmail(sender, to, raw)

    async def close(self) -> None:
        await self.proxy.close()
        self.store.close()


async def start_rig(
    provider: Provider,
    tmp_path: Path,
    *,
    policy: dict | None = None,
    upstream: dict | None = None,
    proxy: dict | None = None,
    **settings: Any,
) -> Rig:
    """A proxy for alice; `upstream` overrides upstream.smtp keys, `proxy` SmtpProxy's
    arguments, `settings` the [proxy] table."""
    data_dir = tmp_path / f"data-{len(list(tmp_path.glob('data-*')))}"
    smtp = {
        "host": provider.hostname,
        "port": provider.submission_port,
        "security": "starttls",
        "ca_file": str(provider.ca_file),
    }
    imap = smtp | {"port": provider.imaps_port, "security": "tls"}
    config = parse_config(
        {
            "proxy": {"data_dir": str(data_dir), **settings},
            "policy": policy or {},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": imap, "smtp": smtp | (upstream or {})},
                }
            ],
        }
    )
    store = KeyStore(config.proxy.data_dir)
    store.generate("alice", ("alice@example.org",))
    store.import_keys(ENGINE.public_only(BOB_KEY.data), "import:test")
    outbox = Outbox(config.proxy.data_dir / "outbox.sqlite", SecretBox(store.store_key.key))
    events: list[tuple[str, dict]] = []
    handler = SmtpHandler(
        config.accounts[0],
        config,
        store,
        ENGINE,
        outbox,
        on_event=lambda k, d: events.append((k, d)),
    )
    listener = SmtpProxy(handler, **({"host": "127.0.0.1", "port": 0} | (proxy or {})))
    await listener.start()
    return Rig(provider, listener, config, store, outbox, events)


@pytest.fixture
async def rig(clean_provider: Provider, tmp_path: Path) -> AsyncIterator[Rig]:
    running = await start_rig(clean_provider, tmp_path, policy=BOB_ALWAYS)
    yield running
    await running.close()


@pytest.fixture
def local_cert(tmp_path: Path) -> LocalCertificate:
    return ensure_local_certificate(tmp_path / "local")


def client_context(cert: LocalCertificate, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert.cert_path))
    context.check_hostname = check_hostname
    return context


def mail(
    body: bytes = SECRET,
    to: str = "Bob <bob@example.org>, carol@example.org",
    sender: str = "Alice <alice@example.org>",
    subject: str = "hardening",
) -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n".encode()
    return head + b"\r\n" + body + b"\r\n"


def decrypt(raw: bytes, verify: list[bytes] | None = None) -> DecryptResult:
    entity = parse_entity(raw)
    assert entity.content_type == "multipart/encrypted", raw[:400]
    return ENGINE.decrypt(entity.parts[1].body, [BOB_KEY.data], verify_certs=verify or [])


async def stored(provider: Provider, user: str, count: int = 1) -> list[bytes]:
    return await asyncio.to_thread(provider.wait_for_messages, user, count)


async def assert_nothing_delivered(provider: Provider, *users: str) -> None:
    """Deliver a sentinel straight through Postfix and wait for it: anything the proxy
    handed over before would have arrived first."""
    sentinel = b"Subject: sentinel\r\n\r\nsentinel\r\n"
    await asyncio.to_thread(provider.send, "alice", list(users), sentinel)
    for user in users:
        messages = await stored(provider, user)
        assert len(messages) == 1 and b"sentinel" in messages[0], messages


# --------------------------------------------------------------------------- local TLS


async def test_starttls_with_the_local_certificate(clean_provider, tmp_path, local_cert):
    rig = await start_rig(
        clean_provider, tmp_path, proxy={"tls_context": server_context(local_cert)}
    )

    def session() -> tuple[bool, str]:
        with rig.connect() as smtp:
            smtp.ehlo()
            offered = smtp.has_extn("starttls")
            smtp.starttls(context=client_context(local_cert))
            peer = smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            alice = rig.provider.users["alice"]
            smtp.login(alice.login, alice.password)
            smtp.sendmail("alice@example.org", ["bob@example.org"], mail(to="bob@example.org"))
            return offered, hashlib.sha256(peer).hexdigest()

    try:
        offered, fingerprint = await asyncio.to_thread(session)
    finally:
        await rig.close()
    assert offered
    assert fingerprint.upper() == local_cert.sha256_fingerprint.replace(":", "")
    (raw,) = await stored(clean_provider, "bob")
    assert SECRET in decrypt(raw).plaintext


async def test_implicit_tls_listener_allows_auth_even_off_loopback(
    clean_provider, tmp_path, local_cert
):
    """An smtps listener: TLS from the first byte, so AUTH needs no STARTTLS (which
    is not offered), even where AUTH requires TLS."""
    implicit = {"implicit_tls": server_context(local_cert), "require_tls_for_auth": True}
    rig = await start_rig(clean_provider, tmp_path, proxy=implicit)

    def session() -> tuple[bool, bool]:
        context = client_context(local_cert)
        with smtplib.SMTP_SSL(
            "127.0.0.1", rig.proxy.port, local_hostname="localhost", context=context, timeout=30
        ) as smtp:
            smtp.ehlo()
            features = smtp.has_extn("starttls"), smtp.has_extn("auth")
            alice = rig.provider.users["alice"]
            smtp.login(alice.login, alice.password)
            smtp.sendmail("alice@example.org", ["bob@example.org"], mail(to="bob@example.org"))
            return features

    try:
        starttls, auth = await asyncio.to_thread(session)
    finally:
        await rig.close()
    assert (starttls, auth) == (False, True)
    (raw,) = await stored(clean_provider, "bob")
    assert SECRET in decrypt(raw).plaintext


async def test_remote_listener_refuses_auth_before_starttls(clean_provider, tmp_path, local_cert):
    """127.0.0.2 stands in for a remote address (allow_remote = true)."""
    remote = {
        "host": "127.0.0.2",
        "tls_context": server_context(local_cert),
        "require_tls_for_auth": True,
    }
    rig = await start_rig(clean_provider, tmp_path, proxy=remote)
    alice = clean_provider.users["alice"]
    plain = base64.b64encode(f"\0{alice.login}\0{alice.password}".encode()).decode()

    def session() -> tuple[bool, tuple[int, bytes], tuple[int, bytes]]:
        with rig.connect("127.0.0.2") as smtp:
            smtp.ehlo()
            advertised = smtp.has_extn("auth")
            before = smtp.docmd("AUTH", f"PLAIN {plain}")
            # The local certificate names 127.0.0.1 and localhost only; the chain is checked.
            smtp.starttls(context=client_context(local_cert, check_hostname=False))
            smtp.ehlo()
            return advertised, before, smtp.docmd("AUTH", f"PLAIN {plain}")

    try:
        advertised, before, after = await asyncio.to_thread(session)
    finally:
        await rig.close()
    assert not advertised
    assert before[0] == 538 and before[1].startswith(b"5.7.11")
    assert after[0] == 235


def test_a_listener_off_loopback_without_tls_is_a_configuration_error():
    handler = SmtpHandler(None, None, None, ENGINE, None)  # type: ignore[arg-type]
    for host in ("0.0.0.0", "192.0.2.10"):
        with pytest.raises(ValueError, match="AUTH requires TLS"):
            SmtpProxy(handler, host=host, port=0)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert not SmtpProxy(handler, host=host, port=0).require_tls_for_auth


# --------------------------------------------------------------------------- limits


async def test_size_is_advertised_from_config_then_from_the_provider(clean_provider, tmp_path):
    rig = await start_rig(clean_provider, tmp_path)

    def ehlo_size(login: bool) -> int:
        with rig.connect() as smtp:
            smtp.ehlo()
            if login:
                alice = rig.provider.users["alice"]
                smtp.login(alice.login, alice.password)
            return int(smtp.esmtp_features["size"])

    try:
        first = await asyncio.to_thread(ehlo_size, True)
        second = await asyncio.to_thread(ehlo_size, False)
    finally:
        await rig.close()
    assert first == 50 * 1024 * 1024, "the default before the provider's SIZE is known"
    assert second == int(clean_provider.message_size_limit / ENCRYPTION_GROWTH)


async def test_oversize_message_is_refused_552_and_nothing_stored(clean_provider, tmp_path):
    rig = await start_rig(clean_provider, tmp_path, max_message_size=64 * 1024)
    big = mail(body=b"x" * 76 + b"\r\n") * 1000

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with rig.client() as smtp:
            declared = smtp.mail("alice@example.org", [f"SIZE={len(big)}"])
            smtp.rset()
            smtp.mail("alice@example.org")
            smtp.rcpt("carol@example.org")
            return declared, smtp.data(big)

    try:
        declared, data = await asyncio.to_thread(session)
    finally:
        await rig.close()
    for code, text in (declared, data):
        assert code == 552 and text == f"5.3.4 Message too big: at most {64 * 1024} bytes".encode()
    await assert_nothing_delivered(clean_provider, "carol")


async def test_the_101st_recipient_gets_452(rig):
    def session() -> tuple[list[int], tuple[int, bytes], tuple[int, bytes]]:
        with rig.client() as smtp:
            smtp.mail("alice@example.org")
            accepted = [smtp.rcpt("carol@example.org")[0] for _ in range(100)]
            return accepted, smtp.rcpt("carol@example.org"), smtp.data(mail(to="carol"))

    accepted, refused, data = await asyncio.to_thread(session)
    assert accepted == [250] * 100
    assert refused[0] == 452 and refused[1].startswith(b"4.5.3 Too many recipients")
    assert data[0] == 250, "the first 100 still get the message"
    (raw,) = await stored(rig.provider, "carol")
    assert SECRET in raw


async def test_the_21st_concurrent_session_gets_421(rig, caplog):
    def sessions() -> tuple[int, bytes, int]:
        clients = [rig.connect() for _ in range(MAX_SESSIONS)]
        try:
            with pytest.raises(smtplib.SMTPConnectError) as refused:
                rig.connect()
            clients.pop().quit()
            deadline = time.monotonic() + 5
            while rig.proxy.sessions.active >= MAX_SESSIONS and time.monotonic() < deadline:
                time.sleep(0.01)
            with rig.connect() as again:
                code = again.noop()[0]
        finally:
            for client in clients:
                client.close()
        return refused.value.smtp_code, refused.value.smtp_error, code

    code, text, later = await asyncio.to_thread(sessions)
    assert code == 421 and text.startswith(b"4.7.0 localproxy: too many connections")
    assert later == 250, "a freed slot is usable again"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "clean teardown"


async def test_line_longer_than_1000_is_refused_500_and_nothing_stored(rig):
    long_line = mail(body=b"y" * 1500, to="carol@example.org")

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with rig.client() as smtp:
            command = smtp.docmd("NOOP", "z" * 600)
            smtp.mail("alice@example.org")
            smtp.rcpt("carol@example.org")
            return command, smtp.data(long_line)

    command, data = await asyncio.to_thread(session)
    assert command == (500, b"5.5.2 Command line too long")
    assert data[0] == 500 and data[1].startswith(b"5.5.2 Line too long")
    await assert_nothing_delivered(rig.provider, "carol")


# --------------------------------------------------------------------------- bad input


async def test_malformed_mime_goes_out_encrypted_as_it_is(rig):
    """Outcome: not repaired, not refused. Broken multipart (no closing boundary,
    undecodable base64) is encrypted byte for byte; a line that is no header field
    ends the header section (the first message), so it never lands in the outer,
    unencrypted header."""
    broken = (
        b"From: alice@example.org\r\nTo: bob@example.org, carol@example.org\r\n"
        b"Subject: broken\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n'
        b"--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n!!! not base64 " + SECRET + b"\r\n--wrong\r\n"
    )
    headless = b"From: alice@example.org\r\nTo: bob@example.org\r\n" + SECRET + b" no blank\r\n"
    await asyncio.to_thread(rig.send, headless, ["bob@example.org"])
    await asyncio.to_thread(rig.send, broken, ["bob@example.org", "carol@example.org"])
    first, second = await stored(rig.provider, "bob", 2)
    (carol,) = await stored(rig.provider, "carol")
    for raw in (first, second):
        assert SECRET not in raw
        assert SECRET in decrypt(raw).plaintext
    assert broken.split(b"\r\n\r\n", 1)[1] in decrypt(second).plaintext
    assert carol.endswith(broken.split(b"\r\n\r\n", 1)[1])


async def test_missing_from_is_sent_unsigned(rig):
    """Outcome: sent, encrypted per policy, but not signed and without Autocrypt (no
    From address for the key to vouch for). Postfix does not add a From (it is
    submitted from outside its local_header_rewrite_clients)."""
    raw = b"To: bob@example.org\r\nSubject: who?\r\n\r\n" + SECRET + b"\r\n"
    await asyncio.to_thread(rig.send, raw, ["bob@example.org"])
    (got,) = await stored(rig.provider, "bob")
    outer = parse_entity(got)
    assert outer.get("Autocrypt") is None
    assert SECRET not in got
    result = decrypt(got)
    assert SECRET in result.plaintext and result.signatures == ()


async def test_eight_bit_headers_pass_and_the_subject_stays_hidden(rig):
    """Outcome: raw UTF-8 and even invalid 8-bit header bytes are accepted by the
    proxy and Postfix unchanged; the encrypted copy hides the Subject."""
    raw = (
        (
            "From: Jörg <alice@example.org>\r\nTo: Bob <bob@example.org>, carol@example.org\r\n"
            "Subject: Grüße 🎉\r\n"
        ).encode()
        + b"X-Legacy: caf\xe9\r\n\r\n"
        + SECRET
        + b"\r\n"
    )
    await asyncio.to_thread(rig.send, raw, ["bob@example.org", "carol@example.org"])
    (bob,) = await stored(rig.provider, "bob")
    (carol,) = await stored(rig.provider, "carol")
    assert "Grüße".encode() not in bob and SECRET not in bob
    inner = decrypt(bob).plaintext
    assert "Subject: Grüße 🎉".encode() in inner and b"X-Legacy: caf\xe9" in inner
    assert "Subject: Grüße 🎉".encode() in carol and b"X-Legacy: caf\xe9" in carol


async def test_bare_lf_is_normalised_and_cannot_smuggle_a_second_message(rig):
    """Outcome: accepted; bare LF becomes CRLF; a "\\n.\\n" inside DATA is no end of
    data, so the "MAIL FROM ... DATA" after it stays body text of the one message."""
    smuggle = (
        b"From: alice@example.org\nTo: bob@example.org, carol@example.org\nSubject: lf\n\n"
        b"first\n.\nMAIL FROM:<alice@example.org>\nRCPT TO:<dave@example.org>\nDATA\n"
        b"Subject: smuggled\n\n" + SECRET + b"\n.\n"
    )

    def session() -> tuple[int, bytes]:
        with rig.client() as smtp:
            smtp.mail("alice@example.org")
            smtp.rcpt("bob@example.org")
            smtp.rcpt("carol@example.org")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(smuggle + b"\r\n.\r\n")  # raw bytes: smtplib.data() would fix the LFs
            return smtp.getreply()

    code, _ = await asyncio.to_thread(session)
    assert code == 250
    (carol,) = await stored(rig.provider, "carol")
    (bob,) = await stored(rig.provider, "bob")
    assert b"\r\nfirst\r\n.\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<dave@" in carol
    assert SECRET not in bob and SECRET in decrypt(bob).plaintext
    await assert_nothing_delivered(rig.provider, "dave")


async def test_non_ascii_addresses(rig):
    """Outcome: without SMTPUTF8 the proxy refuses a non-ASCII address with 553 5.6.7
    (RFC 6531). With it, the provider decides: Postfix refuses the unknown jörg@ with
    550 5.1.1, and answers 250 to a non-ASCII sender, also for each copy when one
    message becomes several (alice: encrypted, dave: plain). What Postfix does next
    with those varies here (the harness' Dovecot LMTP lacks SMTPUTF8), so only its 250
    is asserted. The session goes on throughout."""

    def session() -> list[tuple[int, bytes]]:
        with rig.client() as smtp:
            smtp.ehlo()
            assert smtp.has_extn("smtputf8")
            smtp.mail("alice@example.org")
            smtp.send("RCPT TO:<jörg@example.org>\r\n".encode())
            replies = [smtp.getreply()]
            smtp.rset()
            smtp.mail("alice@example.org", ["SMTPUTF8"])
            replies.append(smtp.rcpt("jörg@example.org"))
            smtp.rcpt("bob@example.org")
            smtp.rcpt("carol@example.org")
            replies.append(smtp.data(mail()))
            smtp.mail("jörg@example.org", ["SMTPUTF8"])
            smtp.rcpt("alice@example.org")
            smtp.rcpt("dave@example.org")
            replies.append(smtp.data(mail(to="alice@example.org, dave@example.org")))
            return replies

    without, unknown, ascii_sender, utf8_sender = await asyncio.to_thread(session)
    assert without[0] == 553 and without[1].startswith(b"5.6.7")
    assert unknown[0] == 550 and unknown[1].startswith(b"5.1.1")
    assert ascii_sender[0] == 250 and utf8_sender[0] == 250
    assert sorted(kind for kind, _ in rig.events) == ["sent-encrypted"] * 2 + ["sent-plain"] * 2
    (bob,) = await stored(rig.provider, "bob")
    (carol,) = await stored(rig.provider, "carol")
    assert SECRET in carol and SECRET not in bob and SECRET in decrypt(bob).plaintext
    await asyncio.to_thread(wait_for_empty_queue, rig.provider)  # no late mail in later tests


def wait_for_empty_queue(provider: Provider, timeout: float = 10) -> None:
    etc = provider.root / "postfix" / "etc"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(
            ["postqueue", "-c", str(etc), "-p"], capture_output=True, timeout=30, check=False
        )
        if b"queue is empty" in listing.stdout + listing.stderr:
            return
        time.sleep(0.1)
    raise TimeoutError(f"Postfix queue not empty after {timeout} s")


async def test_foreign_from_is_sent_but_never_signed(clean_provider, tmp_path):
    """Outcome: sent as the provider allows; encrypted per policy; never signed with
    the account's key, not even under sign = "always", and no Autocrypt header."""
    rig = await start_rig(clean_provider, tmp_path, policy={"sign": "always"})
    raw = mail(sender="Boss <boss@elsewhere.example>")
    try:
        await asyncio.to_thread(rig.send, raw, ["bob@example.org", "carol@example.org"])
    finally:
        await rig.close()
    (bob,) = await stored(clean_provider, "bob")
    (carol,) = await stored(clean_provider, "carol")
    assert parse_entity(carol).content_type == "text/plain", "not multipart/signed"
    for got in (bob, carol):
        assert parse_entity(got).get("Autocrypt") is None
    assert decrypt(bob).signatures == ()


async def test_recipient_key_expired_since_import(clean_provider, tmp_path, gnupg_home):
    """Outcome: encrypt = "always" -> refused at RCPT (550 5.7.1) once the key has
    expired; "opportunistic" -> sent plain, like any recipient without a usable key."""
    cert = gpg_key_expiring_in_3s(gnupg_home, "Carol <carol@example.org>")
    always = await start_rig(
        clean_provider, tmp_path, policy={"address": {"carol@example.org": {"encrypt": "always"}}}
    )
    opportunistic = await start_rig(clean_provider, tmp_path)
    try:
        for rig in (always, opportunistic):
            (outcome,) = rig.store.import_keys(cert, "import:carol.asc")
            assert outcome.action == "added" and rig.store.encryption_cert("carol@example.org")
        await asyncio.sleep(4)
        assert always.store.encryption_cert("carol@example.org") is None
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(
                always.send, mail(to="carol@example.org"), ["carol@example.org"]
            )
        code, text = refused.value.recipients["carol@example.org"]
        assert code == 550 and b"5.7.1" in text and b"no usable key" in text
        await asyncio.to_thread(
            opportunistic.send, mail(to="carol@example.org"), ["carol@example.org"]
        )
    finally:
        await always.close()
        await opportunistic.close()
    (raw,) = await stored(clean_provider, "carol")
    assert parse_entity(raw).content_type == "text/plain" and SECRET in raw


def gpg_key_expiring_in_3s(home: Path, user_id: str) -> bytes:
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    base = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    run = {"capture_output": True, "check": True, "timeout": 60}
    subprocess.run(
        [
            *base,
            "--passphrase",
            "",
            "--quick-gen-key",
            user_id,
            "ed25519",
            "sign,cert",
            "seconds=3",
        ],
        **run,
    )
    listing = subprocess.run([*base, "--with-colons", "--list-keys"], **run).stdout.decode()
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    subprocess.run(
        [*base, "--passphrase", "", "--quick-add-key", fpr, "cv25519", "encr", "seconds=3"], **run
    )
    return subprocess.run([*base, "--export"], **run).stdout


# --------------------------------------------------------------------------- provider faults


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("mode", ["drop-in-data", "stall"])
async def test_provider_fails_mid_data_client_gets_4xx_and_nothing_leaks(
    clean_provider, tmp_path, mode, chunking
):
    """Outcome: the client gets 451 (it keeps the message and retries), nothing is
    stored, nothing is queued, no plaintext went towards the provider for bob (policy
    always), and the proxy serves the next session; with DATA, and with BDAT when the
    provider offers CHUNKING."""
    relay = SmtpFaultRelay(clean_provider)
    relay.chunking = chunking
    await relay.start()
    upstream = {"port": relay.port, "security": "tls", "timeout": 1.5}
    rig = await start_rig(clean_provider, tmp_path, policy=BOB_ALWAYS, upstream=upstream)
    relay.fail_after, relay.mode = 0, mode
    try:
        started = time.monotonic()
        # The secret in the Subject too: the part cut off mid-data is the header.
        message = mail(subject=SECRET.decode())
        with pytest.raises(smtplib.SMTPDataError) as failed:
            await asyncio.to_thread(rig.send, message, ["bob@example.org", "carol@example.org"])
        elapsed = time.monotonic() - started
        assert failed.value.smtp_code == 451 and failed.value.smtp_error.startswith(b"4.4.2")
        assert relay.faults == 1 and elapsed < 10
        assert (b"BDAT" in relay.verbs, b"DATA" in relay.verbs) == (chunking, not chunking)
        assert relay.data_seen and all(SECRET not in data for data in relay.data_seen)
        assert rig.outbox.stats()[:2] == (0, 0)
        await assert_nothing_delivered(clean_provider, "bob", "carol")
        relay.fail_after = None
        await asyncio.to_thread(rig.send, mail(subject="again"), ["bob@example.org"])
    finally:
        await rig.close()
        await relay.close()
    (_sentinel, again) = await stored(clean_provider, "bob", 2)
    assert SECRET in decrypt(again).plaintext


async def test_provider_dies_during_auth_client_gets_a_temporary_454(clean_provider, tmp_path):
    """A dropped connection says nothing about the password: 454 (try again later),
    never 535 or another 5xx that makes a client ask for the password again."""
    relay = SmtpFaultRelay(clean_provider)
    await relay.start()
    upstream = {"port": relay.port, "security": "tls", "timeout": 1.5}
    rig = await start_rig(clean_provider, tmp_path, upstream=upstream)
    relay.fail_after, relay.mode = 0, "drop-at-auth"
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            await asyncio.to_thread(rig.client)
        assert relay.faults >= 1  # smtplib tries PLAIN, then LOGIN
        assert failed.value.smtp_code == 454, failed.value
        assert failed.value.smtp_error.startswith(b"4.7.0 localproxy: "), failed.value
        relay.fail_after = None
        await asyncio.to_thread(rig.send, mail(), ["carol@example.org"])
    finally:
        await rig.close()
        await relay.close()
    assert len(await stored(clean_provider, "carol")) == 1


# --------------------------------------------------------------------------- credentials


async def test_no_credentials_or_message_text_in_logs_at_debug(rig, caplog):
    """Even with every logger turned up to DEBUG: aiosmtpd masks AUTH lines itself, and
    its DEBUG records (raw SASL answers, "DATA readline" with the message text) are
    filtered out by localproxy.smtp.server."""
    caplog.set_level(logging.DEBUG)
    for name in ("mail.log", "aiosmtplib", "localproxy"):
        caplog.set_level(logging.DEBUG, logger=name)
    alice = rig.provider.users["alice"]
    wrong = "Wrong-" + alice.password

    def sessions() -> None:
        with rig.connect() as smtp:  # AUTH PLAIN with initial response
            smtp.login(alice.login, alice.password)
            smtp.sendmail("alice@example.org", ["carol@example.org"], mail(to="carol"))
        with rig.connect() as smtp:  # AUTH LOGIN: user and password as 334 answers
            smtp.ehlo()
            smtp.user, smtp.password = alice.login, alice.password
            smtp.auth("LOGIN", smtp.auth_login, initial_response_ok=False)
        with rig.connect() as smtp, pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login(alice.login, wrong)

    await asyncio.to_thread(sessions)
    logged = caplog.text + repr([(r.msg, r.args) for r in caplog.records]) + repr(rig.events)
    assert any(r.name == "mail.log" for r in caplog.records), "aiosmtpd's logs were captured"
    assert SECRET.decode() not in logged
    for password in (alice.password, wrong):
        for secret in secret_forms(alice.login, password):
            assert secret not in logged


def secret_forms(login: str, password: str) -> list[str]:
    plain = f"\0{login}\0{password}".encode()
    return [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(plain).decode(),
        repr(plain)[2:-1],
    ]
