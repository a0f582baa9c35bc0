"""Proof that the real-provider harness behaves like the provider the proxy will face."""

from __future__ import annotations

import base64
import imaplib
import shutil
import smtplib
import socket
import ssl
import tempfile
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from localproxy.sandbox import provider as harness
from localproxy.sandbox.provider import Provider, ProviderError, session_members, start_provider

pytestmark = pytest.mark.e2e


def make_message(sender: str, recipient: str, subject: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@example.org>\r\n\r\nbody of {subject}\r\n"
    ).encode()


def issuer_of(sock: ssl.SSLSocket) -> dict[str, str]:
    cert = sock.getpeercert()
    assert cert is not None
    return {key: value for rdn in cert["issuer"] for key, value in rdn}


def auth_plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


# --- IMAP ----------------------------------------------------------------------------------


def test_imap_starttls_is_advertised_and_login_works_after_it(provider: Provider) -> None:
    alice = provider.users["alice"]
    with imaplib.IMAP4(provider.host, provider.imap_port, timeout=10) as conn:
        assert "STARTTLS" in conn.capabilities
        conn.starttls(ssl_context=provider.ssl_context())
        typ, _ = conn.login(alice.login, alice.password)
        assert typ == "OK"


def test_imap_on_strict_host_refuses_login_before_starttls(provider: Provider) -> None:
    # Client 127.0.0.1 -> server 127.0.0.2 is not "local" to Dovecot, so ssl=required applies.
    alice = provider.users["alice"]
    with imaplib.IMAP4(provider.strict_host, provider.imap_port, timeout=10) as conn:
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(alice.login, alice.password)
        conn.starttls(ssl_context=provider.ssl_context())
        assert conn.login(alice.login, alice.password)[0] == "OK"


def test_imaps_login_and_certificate_issued_by_test_ca(provider: Provider) -> None:
    with provider.imap("alice") as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert issuer_of(conn.sock)["organizationName"] == provider.ca_name
        assert provider.ca_name in provider.ca.subject


def test_imap_extensions_are_offered(provider: Provider) -> None:
    with provider.imap("alice") as conn:
        _, data = conn.capability()
    capabilities = set(data[0].decode().upper().split())
    assert {"IDLE", "UIDPLUS", "SPECIAL-USE", "CONDSTORE", "LITERAL+", "MOVE"} <= capabilities


def test_special_use_mailboxes_exist(provider: Provider) -> None:
    mailboxes = provider.mailboxes("carol")
    for name, flag in {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash"}.items():
        assert flag in mailboxes[name]
    assert "\\Junk" in mailboxes["Junk"]
    assert "INBOX" in mailboxes


def test_append_stores_and_clear_removes(clean_provider: Provider) -> None:
    raw = make_message("carol@example.org", "carol@example.org", "draft")
    clean_provider.append("carol", raw, mailbox="Drafts", flags="\\Draft \\Seen")
    stored = clean_provider.stored_messages("carol", "Drafts")
    assert len(stored) == 1
    assert message_from_bytes(stored[0])["Subject"] == "draft"
    clean_provider.clear("carol")
    assert clean_provider.stored_messages("carol", "Drafts") == []


# --- SMTP ----------------------------------------------------------------------------------


def test_submission_refuses_auth_before_starttls(provider: Provider) -> None:
    alice = provider.users["alice"]
    with smtplib.SMTP(
        provider.host, provider.submission_port, local_hostname="localhost", timeout=10
    ) as conn:
        conn.ehlo()
        assert conn.has_extn("starttls")
        assert not conn.has_extn("auth")
        code, _ = conn.docmd("AUTH", "PLAIN " + auth_plain(alice.login, alice.password))
        assert 500 <= code < 600
        code, _ = conn.docmd("MAIL", "FROM:<alice@example.org>")
        assert code == 530  # "Must issue a STARTTLS command first"


def test_submission_offers_auth_and_size_after_starttls(provider: Provider) -> None:
    with provider.smtp() as conn:
        conn.ehlo()
        assert conn.has_extn("auth")
        assert int(conn.esmtp_features["size"]) == provider.message_size_limit
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert issuer_of(conn.sock)["organizationName"] == provider.ca_name


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["submission", "submissions"])
def test_submitted_mail_is_delivered_to_bob(clean_provider: Provider, implicit_tls: bool) -> None:
    subject = f"hello {uuid.uuid4()}"
    raw = make_message("alice@example.org", "bob@example.org", subject)
    with clean_provider.smtp("alice", implicit_tls=implicit_tls) as conn:
        assert conn.sendmail("alice@example.org", ["bob@example.org"], raw) == {}
    (stored,) = clean_provider.wait_for_messages("bob", 1)
    assert message_from_bytes(stored)["Subject"] == subject
    assert raw.split(b"\r\n\r\n", 1)[1] in stored


def test_send_helper_delivers_to_several_users(clean_provider: Provider) -> None:
    raw = make_message("alice@example.org", "bob@example.org, carol@example.org", "both")
    clean_provider.send("alice", ["bob@example.org", "carol@example.org"], raw)
    assert len(clean_provider.wait_for_messages("bob", 1)) == 1
    assert len(clean_provider.wait_for_messages("carol", 1)) == 1


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["submission", "submissions"])
def test_unauthenticated_submission_is_refused(provider: Provider, implicit_tls: bool) -> None:
    raw = make_message("alice@example.org", "bob@example.org", "forged")
    with (
        provider.smtp(None, implicit_tls=implicit_tls) as conn,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        conn.sendmail("alice@example.org", ["bob@example.org"], raw)
    code, _ = refused.value.recipients["bob@example.org"]
    assert 500 <= code < 600


def test_mail_to_external_domain_is_not_relayed(provider: Provider) -> None:
    raw = make_message("alice@example.org", "dave@elsewhere.test", "leak")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        provider.send("alice", ["dave@elsewhere.test"], raw)
    code, text = refused.value.recipients["dave@elsewhere.test"]
    assert code == 554
    assert b"Relay access denied" in text


def test_unknown_local_user_is_refused(provider: Provider) -> None:
    raw = make_message("alice@example.org", "nobody@example.org", "who")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        provider.send("alice", ["nobody@example.org"], raw)


def test_wrong_password_is_refused(provider: Provider) -> None:
    # One mechanism only: each failure costs ~0.5 s (Dovecot's failure-delay timer granularity).
    with provider.smtp() as conn:
        code, _ = conn.docmd("AUTH", "PLAIN " + auth_plain(provider.users["alice"].login, "wrong"))
    assert code == 535


# --- lifecycle -----------------------------------------------------------------------------


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="localproxy-provider-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def started_daemons(monkeypatch: pytest.MonkeyPatch) -> list[harness.Daemon]:
    """Every server process the harness launches during the test."""
    started: list[harness.Daemon] = []

    class RecordingDaemon(harness.Daemon):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(harness, "Daemon", RecordingDaemon)
    return started


def test_second_provider_starts_and_stops_without_leftovers(
    scratch_root: Path, started_daemons: list[harness.Daemon]
) -> None:
    provider = start_provider(scratch_root)
    sessions = {daemon.pid for daemon in started_daemons}
    assert len(sessions) == 2
    assert session_members(sessions)
    provider.stop()
    provider.stop()  # idempotent
    assert session_members(sessions) == []


def test_failed_start_reports_server_logs_and_cleans_up(
    scratch_root: Path, started_daemons: list[harness.Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real_free_ports = harness.free_ports
        # The IMAP port is already in use, so Dovecot cannot bind it and exits.
        monkeypatch.setattr(harness, "free_ports", lambda n: [taken, *real_free_ports(n - 1)])
        with pytest.raises(ProviderError) as failed:
            start_provider(scratch_root)
    message = str(failed.value)
    assert "dovecot exited" in message
    assert "Address already in use" in message
    assert session_members({daemon.pid for daemon in started_daemons}) == []
