"""S/MIME end to end: alice (an S/MIME identity) sends through the SMTP proxy, Dovecot
keeps application/pkcs7-mime, OpenSSL opens and verifies it, and bob reads it in clear
through the IMAP proxy; mixed recipient lists, Drafts and mail for someone else."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from localproxy.config import Config, LocalListen
from localproxy.crypto import smime
from localproxy.imap.relay import ImapProxy
from localproxy.incoming import STATUS_HEADER, IncomingProcessor
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity
from localproxy.sandbox.provider import Provider
from localproxy.smtp.server import SmtpHandler, SmtpProxy
from tests.crypto.test_smime import ca, make_user
from tests.e2e.test_pipeline import (
    ENGINE,
    Person,
    account_config,
    fetch,
    imap_login,
    letter,
    send,
)
from tests.harness.running import ProxyThread

pytestmark = pytest.mark.e2e
PEM = serialization.Encoding.PEM


def smime_config(provider: Provider, name: str, tmp_path: Path) -> Config:
    config = account_config(provider, name, tmp_path / name)
    roots = tmp_path / "smime-roots.pem"
    roots.write_bytes(ca().cert.public_bytes(PEM))
    return replace(config, policy=replace(config.policy, smime_ca_file=roots))


def start(provider: Provider, name: str, tmp_path: Path, openpgp: bool) -> Person:
    """A person whose account has an S/MIME identity, and an OpenPGP key if asked."""
    config = smime_config(provider, name, tmp_path)
    account = config.accounts[0]
    store = KeyStore(config.proxy.data_dir)
    user = make_user(provider.users[name].address)
    store.import_identity(smime.SmimeIdentity(user.key, user.cert, (ca().cert,)), name, "p12:test")
    if openpgp:
        store.generate(name, account.addresses)
    events: list[tuple[str, dict]] = []
    sink = lambda kind, data: events.append((kind, data))  # noqa: E731
    incoming = IncomingProcessor(account, config, store, ENGINE, on_event=sink)
    listen = replace(account, local=LocalListen(imap_port=0, smtp_port=0))
    imap = ImapProxy(listen, incoming.transform, append_transformer=incoming.encrypt_for_self)
    handler = SmtpHandler(account, config, store, ENGINE, None, on_event=sink)
    imap_thread = ProxyThread(imap).__enter__()
    smtp_thread = ProxyThread(SmtpProxy(handler, host="127.0.0.1", port=0)).__enter__()
    return Person(name, config, store, imap_thread, smtp_thread, events)


@pytest.fixture
def people(clean_provider: Provider, tmp_path: Path) -> Iterator[dict[str, Person]]:
    started = {
        "alice": start(clean_provider, "alice", tmp_path, openpgp=False),
        "bob": start(clean_provider, "bob", tmp_path, openpgp=False),
        "carol": start(clean_provider, "carol", tmp_path, openpgp=True),
    }
    alice, bob, carol = started["alice"].store, started["bob"].store, started["carol"].store
    # alice knows bob's S/MIME certificate and carol's OpenPGP key; nothing for dave.
    (bob_identity,) = bob.smime_identities("bob")
    alice.import_x509(bob_identity.cert.public_bytes(PEM), "import:bob.pem")
    alice.import_keys(carol.export_public([carol.own_keys("carol")[0][0].fingerprint]), "import")
    yield started
    for person in started.values():
        person.imap.__exit__()
        person.smtp.__exit__()
        person.store.close()


def openssl(*args: str, data: bytes) -> bytes:
    done = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def latest_view(provider: Provider, person: Person, mailbox: str = "INBOX") -> bytes:
    conn = imap_login(provider, person)
    conn.select(mailbox)
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    view = fetch(conn, uid, "(BODY.PEEK[])")[0][1]
    conn.logout()
    return view


def test_alice_to_bob_in_smime(clean_provider, people, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    send(clean_provider, people["alice"], letter(), ["bob@example.org"])
    (stored,) = clean_provider.wait_for_messages("bob", 1)
    assert b"Meet at the usual place" not in stored
    outer = parse_entity(stored)
    assert outer.content_type == "application/pkcs7-mime"
    assert outer.params["smime-type"] == "enveloped-data"
    # OpenSSL opens it with bob's key and verifies alice's signature inside.
    (identity,) = people["bob"].store.smime_identities("bob")
    key, cert = tmp_path / "bob.key", tmp_path / "bob.crt"
    key.write_bytes(
        identity.key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert.write_bytes(identity.cert.public_bytes(PEM))
    signed = openssl(
        "cms",
        "-decrypt",
        "-inkey",
        str(key),
        "-recip",
        str(cert),
        "-inform",
        "SMIME",
        data=stored,
    )
    assert parse_entity(signed).content_type == "multipart/signed"
    roots = people["bob"].config.policy.smime_ca_file
    content = openssl("cms", "-verify", "-CAfile", str(roots), "-inform", "SMIME", data=signed)
    assert b"Meet at the usual place." in content
    # bob reads it through the proxy: decrypted, signature valid, alice's cert collected.
    view = latest_view(clean_provider, people["bob"])
    assert b"Meet at the usual place." in view and b"anhang.txt" in view
    header = parse_entity(view)
    assert header.get("Subject").value == "Plans for Friday"
    assert header.content_type == "multipart/mixed"
    status = header.get(STATUS_HEADER).value
    (alice_identity,) = people["alice"].store.smime_identities("alice")
    alice_fpr = alice_identity.fingerprint
    assert status.startswith(f"decrypted; method=smime; key={identity.fingerprint}")
    assert f"signature=valid; signer={alice_fpr}" in status.replace("\r\n", "")
    (collected,) = people["bob"].store.x509_certs("alice@example.org")
    assert collected.source == "collected" and collected.fingerprint == alice_fpr
    assert collected.signing_time is not None
    kinds = [k for k, _ in people["bob"].events]
    assert "received-decrypted" in kinds and "received-verified" in kinds
    assert_consistent_view(clean_provider, people["bob"], view)


def assert_consistent_view(provider: Provider, person: Person, view: bytes) -> None:
    """What Thunderbird relies on: RFC822.SIZE is the size of what is served, chunked
    partial fetches put it back together exactly, and section sizes match BODYSTRUCTURE."""
    conn = imap_login(provider, person)
    conn.select("INBOX", readonly=True)
    uid = conn.uid("SEARCH", "ALL")[1][0].split()[-1]
    head = fetch(conn, uid, "(UID RFC822.SIZE BODYSTRUCTURE)")[0]
    head = head if isinstance(head, bytes) else head[0]
    assert int(re.search(rb"RFC822.SIZE (\d+)", head).group(1)) == len(view)
    chunks = b""
    while len(chunks) < len(view):
        chunks += fetch(conn, uid, f"(UID BODY.PEEK[]<{len(chunks)}.4096>)")[0][1]
    assert chunks == view
    first = fetch(conn, uid, "(BODY.PEEK[1])")[0][1]
    sizes = [
        int(n) for n in re.findall(rb'"(?:7bit|8bit|base64|quoted-printable)" (\d+)', head, re.I)
    ]
    assert len(first) == sizes[0]
    conn.logout()


def test_mixed_recipients_get_one_copy_per_method(clean_provider, people):
    raw = letter().replace(
        b"To: bob@example.org", b"To: bob@example.org, carol@example.org\r\nCc: dave@example.org"
    )
    send(
        clean_provider,
        people["alice"],
        raw,
        ["bob@example.org", "carol@example.org", "dave@example.org"],
    )
    (for_bob,) = clean_provider.wait_for_messages("bob", 1)
    (for_carol,) = clean_provider.wait_for_messages("carol", 1)
    (for_dave,) = clean_provider.wait_for_messages("dave", 1)
    assert parse_entity(for_bob).content_type == "application/pkcs7-mime"
    assert parse_entity(for_carol).content_type == "multipart/encrypted"
    assert b"Meet at the usual place." in for_dave
    ids = {parse_entity(m).get("Message-ID").value for m in (for_bob, for_carol, for_dave)}
    assert len(ids) == 1
    sent = [k for k, _ in people["alice"].events if k.startswith("sent-")]
    assert sorted(sent) == ["sent-encrypted", "sent-encrypted", "sent-plain"]
    carol_view = latest_view(clean_provider, people["carol"])
    assert b"Meet at the usual place." in carol_view


def test_smime_only_draft_is_stored_encrypted(clean_provider, people):
    conn = imap_login(clean_provider, people["bob"])
    conn.list()
    draft = letter(subject="Unfinished thoughts", body="Draft text, not sent.\n")
    typ, data = conn.append("Drafts", r"(\Draft)", None, draft)
    assert typ == "OK", data
    conn.logout()
    (stored,) = clean_provider.stored_messages("bob", "Drafts")
    assert b"Draft text, not sent." not in stored
    assert parse_entity(stored).content_type == "application/pkcs7-mime"
    view = latest_view(clean_provider, people["bob"], "Drafts")
    assert b"Draft text, not sent." in view
    assert parse_entity(view).get(STATUS_HEADER).value.startswith("decrypted; method=smime")


def test_smime_for_someone_else_is_served_as_stored(clean_provider, people):
    stranger = make_user("stranger@example.net")
    body = smime.encrypt(b"Content-Type: text/plain\r\n\r\nnot for bob\r\n", [stranger.cert])
    raw = b"From: stranger@example.net\r\nTo: bob@example.org\r\nSubject: wrong\r\n" + body
    clean_provider.append("bob", raw)
    view = latest_view(clean_provider, people["bob"])
    status = parse_entity(view).get(STATUS_HEADER).value
    assert status.startswith('not-decrypted; method=smime; reason="')
    assert "not encrypted to any of our certificates" in status.replace("\r\n", "")
    assert view.endswith(raw.split(b"\r\n\r\n", 1)[1]), "body unaltered"
    assert "received-failed" in [k for k, _ in people["bob"].events]
