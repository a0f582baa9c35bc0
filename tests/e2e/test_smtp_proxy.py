"""The SMTP proxy end to end: real clients -> localproxy -> real Postfix -> Dovecot.

Assertions read what Dovecot stored directly (not through the proxy), and
decrypt it with the real GnuPG and RNP command-line tools.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import shutil
import smtplib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from localproxy.config import Config, parse_config
from localproxy.crypto.openpgp import CertInfo, default_engine
from localproxy.crypto.pgpmime import PROTECTED_SUBJECT
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity, to_crlf
from localproxy.sandbox.provider import Provider
from localproxy.secretbox import SecretBox
from localproxy.smtp.outbox import Outbox, OutboxWorker
from localproxy.smtp.server import SmtpHandler, SmtpProxy, outbox_sender
from tests.harness.smtp_faults import SmtpFaultRelay

pytestmark = pytest.mark.e2e
ENGINE = default_engine()
BOB_KEY = ENGINE.generate_key(["Bob <bob@example.org>"])
DAVE_KEY = ENGINE.generate_key(["Dave <dave@example.org>"])


@dataclass
class Rig:
    provider: Provider
    proxy: SmtpProxy
    config: Config
    store: KeyStore
    outbox: Outbox
    alice_key: CertInfo
    events: list[tuple[str, dict]]

    def client(self, user: str = "alice", password: str | None = None) -> smtplib.SMTP:
        account = self.provider.users[user]
        smtp = smtplib.SMTP("127.0.0.1", self.proxy.port, timeout=60)
        smtp.login(account.login, password or account.password)
        return smtp

    def send(self, message: EmailMessage | bytes, to: list[str], **kwargs) -> dict:
        with self.client() as smtp:
            raw = (
                message.as_bytes(policy=email.policy.SMTP)
                if isinstance(message, EmailMessage)
                else message
            )
            return smtp.sendmail("alice@example.org", to, raw, **kwargs)


def make_config(
    provider: Provider, tmp_path: Path, smtp_port: int, security: str, policy: dict | None = None
) -> Config:
    return parse_config(
        {
            "proxy": {"data_dir": str(tmp_path / "data")},
            "policy": policy or {},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {
                        "imap": {
                            "host": provider.hostname,
                            "port": provider.imaps_port,
                            "security": "tls",
                            "ca_file": str(provider.ca_file),
                        },
                        "smtp": {
                            "host": provider.hostname,
                            "port": smtp_port,
                            "security": security,
                            "ca_file": str(provider.ca_file),
                        },
                    },
                }
            ],
        }
    )


async def start_rig(
    provider: Provider,
    tmp_path: Path,
    *,
    smtp_port: int | None = None,
    security: str = "starttls",
    policy: dict | None = None,
) -> Rig:
    config = make_config(
        provider, tmp_path, smtp_port or provider.submission_port, security, policy
    )
    store = KeyStore(config.proxy.data_dir)
    alice_key = store.generate("alice", ("alice@example.org",))
    for key in (BOB_KEY, DAVE_KEY):
        store.import_keys(ENGINE.public_only(key.data), "import:test")
    outbox = Outbox(config.proxy.data_dir / "outbox.sqlite", SecretBox(store.store_key.key))
    events: list[tuple[str, dict]] = []
    handler = SmtpHandler(
        config.accounts[0],
        config,
        store,
        ENGINE,
        outbox,
        on_event=lambda kind, data: events.append((kind, data)),
    )
    proxy = SmtpProxy(handler, host="127.0.0.1", port=0)
    await proxy.start()
    return Rig(provider, proxy, config, store, outbox, alice_key, events)


@pytest.fixture
async def rig(clean_provider: Provider, tmp_path: Path) -> AsyncIterator[Rig]:
    running = await start_rig(clean_provider, tmp_path)
    yield running
    await running.proxy.close()
    running.store.close()


def message(
    to: str = "Bob <bob@example.org>",
    cc: str | None = None,
    subject: str = "Budget 2027",
    body: str = "The numbers are attached.\n",
    sender: str = "Alice <alice@example.org>",
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    if cc:
        msg["Cc"] = cc
    msg.set_content(body)
    msg.add_attachment(
        b"\x00\x01binary attachment\xff",
        maintype="application",
        subtype="octet-stream",
        filename="numbers.bin",
    )
    return msg


async def stored(provider: Provider, user: str, count: int = 1) -> list[bytes]:
    return await asyncio.to_thread(provider.wait_for_messages, user, count)


def ciphertext_of(raw: bytes) -> bytes:
    entity = parse_entity(raw)
    assert entity.content_type == "multipart/encrypted", raw[:400]
    return entity.parts[1].body


def gpg_decrypt(home: Path, secret: bytes, *pubs: bytes, data: bytes) -> tuple[bytes, bytes]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    base = [
        "gpg",
        "--homedir",
        str(home),
        "--batch",
        "--yes",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
    ]
    for key in (secret, *pubs):
        subprocess.run([*base, "--import"], input=key, capture_output=True, check=True, timeout=60)
    done = subprocess.run(
        [*base, "--status-fd", "2", "--decrypt"], input=data, capture_output=True, timeout=60
    )
    # gpg exits 2 when it cannot check a signature (no public key) even though
    # decryption succeeded; the status lines say what happened.
    assert b"DECRYPTION_OKAY" in done.stderr and b"GOODMDC" in done.stderr, done.stderr.decode(
        errors="replace"
    )
    return done.stdout, done.stderr


def recipients_of(data: bytes) -> set[str]:
    """Key ids a message is encrypted to, as `gpg --list-packets` reports them."""
    done = subprocess.run(
        ["gpg", "--batch", "--list-packets"], input=data, capture_output=True, timeout=60
    )
    text = (done.stdout + done.stderr).decode(errors="replace")
    return {
        line.split("keyid ")[1].split()[0].upper()
        for line in text.splitlines()
        if "pubkey enc packet" in line
    }


# --------------------------------------------------------------------------- encryption


async def test_known_recipient_gets_pgp_mime_that_gpg_and_rnp_read(rig, gnupg_home, tmp_path):
    msg = message()
    await asyncio.to_thread(rig.send, msg, ["bob@example.org"])
    (raw,) = await stored(rig.provider, "bob")
    entity = parse_entity(raw)
    assert entity.get("Subject").value == PROTECTED_SUBJECT
    assert b"The numbers are attached" not in raw and b"Budget 2027" not in raw
    plaintext, status = gpg_decrypt(
        gnupg_home,
        ENGINE.armor(BOB_KEY.data, kind="secret-key"),
        ENGINE.armor(rig.alice_key.data, kind="public-key"),
        data=ciphertext_of(raw),
    )
    assert f"VALIDSIG {rig.alice_key.fingerprint}".encode() in status
    inner = parse_entity(plaintext)
    assert inner.get("Subject").value == "Budget 2027"
    assert b"The numbers are attached." in plaintext
    assert base64.b64encode(b"\x00\x01binary attachment\xff") in plaintext
    assert _rnp_decrypts(tmp_path, BOB_KEY.data, ciphertext_of(raw)) == plaintext
    assert [k for k, _ in rig.events] == ["sent-encrypted"]


def _rnp_decrypts(tmp_path: Path, secret: bytes, data: bytes) -> bytes:
    if shutil.which("rnp") is None:
        pytest.skip("rnp not installed")
    home = tmp_path / "rnp"
    home.mkdir()
    key_file, msg_file = tmp_path / "key.asc", tmp_path / "msg.asc"
    key_file.write_bytes(ENGINE.armor(secret, kind="secret-key"))
    msg_file.write_bytes(data)
    subprocess.run(
        ["rnpkeys", "--homedir", str(home), "--import", str(key_file)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    done = subprocess.run(
        ["rnp", "--homedir", str(home), "--decrypt", str(msg_file), "--output", "-"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


async def test_sender_can_read_its_own_copy(rig, gnupg_home):
    await asyncio.to_thread(rig.send, message(), ["bob@example.org"])
    (raw,) = await stored(rig.provider, "bob")
    ((_, alice_secret),) = rig.store.own_keys("alice")
    plaintext, _ = gpg_decrypt(
        gnupg_home, ENGINE.armor(alice_secret, kind="secret-key"), data=ciphertext_of(raw)
    )
    assert b"The numbers are attached." in plaintext


async def test_mixed_to_cc_bcc_each_copy_is_what_policy_says(rig, gnupg_home):
    msg = message(to="Bob <bob@example.org>", cc="Carol <carol@example.org>")
    await asyncio.to_thread(
        rig.send, msg, ["bob@example.org", "carol@example.org", "dave@example.org"]
    )
    (bob_raw,) = await stored(rig.provider, "bob")
    (carol_raw,) = await stored(rig.provider, "carol")
    (dave_raw,) = await stored(rig.provider, "dave")
    # carol has no key: plain, readable, no Bcc anywhere, same Message-ID for all.
    assert b"The numbers are attached." in carol_raw
    for raw in (bob_raw, carol_raw, dave_raw):
        assert parse_entity(raw).get("Bcc") is None
    for raw in (bob_raw, carol_raw):
        assert b"dave@example.org" not in raw, "the Bcc recipient is invisible to the others"
    ids = {parse_entity(raw).get("Message-ID").value for raw in (bob_raw, carol_raw, dave_raw)}
    assert len(ids) == 1
    # dave (Bcc) gets his own ciphertext; his key id is in no other copy.
    dave_ids = set(DAVE_KEY.key_ids)
    assert recipients_of(ciphertext_of(dave_raw)) & dave_ids
    assert not recipients_of(ciphertext_of(bob_raw)) & dave_ids
    assert recipients_of(ciphertext_of(bob_raw)) & set(BOB_KEY.key_ids)
    plaintext, _ = gpg_decrypt(
        gnupg_home, ENGINE.armor(DAVE_KEY.data, kind="secret-key"), data=ciphertext_of(dave_raw)
    )
    assert b"The numbers are attached." in plaintext
    assert sorted(k for k, _ in rig.events) == ["sent-encrypted", "sent-encrypted", "sent-plain"]


async def test_autocrypt_header_carries_the_senders_key(rig):
    await asyncio.to_thread(rig.send, message(), ["bob@example.org"])
    (raw,) = await stored(rig.provider, "bob")
    value = parse_entity(raw).get("Autocrypt").value
    assert value.startswith("addr=alice@example.org; keydata=")
    keydata = base64.b64decode(value.split("keydata=")[1].replace(" ", ""))
    (cert,) = ENGINE.parse_certs(keydata)
    assert cert.fingerprint == rig.alice_key.fingerprint and not cert.has_secret


async def test_foreign_from_is_sent_but_not_signed(rig, gnupg_home):
    msg = message(sender="Someone Else <other@example.net>")
    await asyncio.to_thread(rig.send, msg, ["bob@example.org"])
    (raw,) = await stored(rig.provider, "bob")
    assert parse_entity(raw).get("Autocrypt") is None
    plaintext, status = gpg_decrypt(
        gnupg_home, ENGINE.armor(BOB_KEY.data, kind="secret-key"), data=ciphertext_of(raw)
    )
    assert b"SIG" not in status.replace(b"NO_PUBKEY", b"")
    assert b"The numbers are attached." in plaintext


async def test_already_encrypted_mail_passes_through_untouched(rig):
    armored = ENGINE.encrypt(
        b"Content-Type: text/plain\r\n\r\nclient did it\r\n", [ENGINE.public_only(BOB_KEY.data)]
    )
    raw = (
        b"From: alice@example.org\r\nTo: carol@example.org\r\nSubject: own crypto\r\n"
        b"Message-ID: <own@example.org>\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; "
        b'protocol="application/pgp-encrypted"; boundary=x\r\n\r\n--x\r\n'
        b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--x\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + armored + b"\r\n--x--\r\n"
    )
    await asyncio.to_thread(rig.send, raw, ["carol@example.org"])
    (got,) = await stored(rig.provider, "carol")
    assert got.endswith(to_crlf(raw.split(b"\r\n\r\n", 1)[1])), "body untouched"
    assert parse_entity(got).get("Subject").value == "own crypto"


async def test_swaks_as_the_client(rig):
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed")
    alice = rig.provider.users["alice"]
    done = await asyncio.to_thread(
        subprocess.run,
        [
            "swaks",
            "--server",
            f"127.0.0.1:{rig.proxy.port}",
            "--auth",
            "LOGIN",
            "--auth-user",
            alice.login,
            "--auth-password",
            alice.password,
            "--from",
            "alice@example.org",
            "--to",
            "bob@example.org",
            "--header",
            "From: alice@example.org",
            "--header",
            "Subject: swaks test",
            "--body",
            "sent by swaks",
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace")
    (raw,) = await stored(rig.provider, "bob")
    assert parse_entity(raw).content_type == "multipart/encrypted"


# --------------------------------------------------------------------------- policy and refusals


async def test_policy_always_refuses_a_recipient_without_key_at_rcpt(clean_provider, tmp_path):
    rig = await start_rig(
        clean_provider, tmp_path, policy={"address": {"carol@example.org": {"encrypt": "always"}}}
    )
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await asyncio.to_thread(
                rig.send, message(to="carol@example.org"), ["carol@example.org"]
            )
        code, text = refused.value.recipients["carol@example.org"]
        assert code == 550 and b"policy requires encryption" in text
        assert b"localproxy keys import" in text
    finally:
        await rig.proxy.close()
        rig.store.close()
    assert clean_provider.stored_messages("carol") == []


async def test_authentication_is_the_providers_verdict(rig):
    with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
        await asyncio.to_thread(rig.client, "alice", "wrong password")
    assert failed.value.smtp_code == 535

    def unauthenticated_mail() -> int:
        with smtplib.SMTP("127.0.0.1", rig.proxy.port, timeout=30) as smtp:
            smtp.ehlo()
            return smtp.mail("alice@example.org")[0]

    assert await asyncio.to_thread(unauthenticated_mail) == 530, "never an open relay"


POSTFIX_SAYS = b"Invalid authentication mechanism"


async def test_a_long_oauth_token_reaches_the_provider(rig):
    """Real OAuth bearer tokens run to a few KB: both as an initial response (RFC 4954
    allows 12288 octets on the AUTH line) and after a 334, the provider decides (the
    harness' provider offers no XOAUTH2), not a local line limit."""
    token = "ya29." + "x" * 3000  # 4 KB once in base64
    blob = base64.b64encode(f"user=alice@example.org\x01auth=Bearer {token}\x01\x01".encode())

    def attempts() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", rig.proxy.port, timeout=30) as smtp:
            smtp.ehlo()
            initial = smtp.docmd("AUTH", "XOAUTH2 " + blob.decode())
            challenge = smtp.docmd("AUTH", "XOAUTH2")
            answer = smtp.docmd(blob.decode())
            return [initial, challenge, answer]

    initial, challenge, answer = await asyncio.to_thread(attempts)
    assert challenge[0] == 334
    for code, text in (initial, answer):
        assert (code, text) == (535, b"5.7.8 Error: authentication failed: " + POSTFIX_SAYS)


async def test_provider_rejections_keep_their_codes(rig):
    def dialogue() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with rig.client() as smtp:
            smtp.ehlo()
            smtp.mail("alice@example.org")
            return smtp.rcpt("nobody@example.org"), smtp.rcpt("someone@elsewhere.example")

    (code, text), (relay_code, _) = await asyncio.to_thread(dialogue)
    assert code == 550 and b"nobody@example.org" in text
    assert relay_code == 554, "relay denied by the provider, passed on as is"


async def test_size_rejection_stays_552(rig):
    big = b"x" * 76 + b"\r\n"
    raw = b"From: alice@example.org\r\nTo: carol@example.org\r\nSubject: big\r\n\r\n" + big * (
        rig.provider.message_size_limit // len(big) + 1000
    )
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await asyncio.to_thread(rig.send, raw, ["carol@example.org"])
    assert refused.value.smtp_code == 552
    assert clean_list(rig.provider, "carol") == []


def clean_list(provider: Provider, user: str) -> list[bytes]:
    return provider.stored_messages(user)


# --------------------------------------------------------------------------- nothing lost


async def test_provider_dies_after_first_copy_outbox_delivers_after_restart(
    clean_provider, tmp_path
):
    relay = SmtpFaultRelay(clean_provider)
    await relay.start()
    rig = await start_rig(clean_provider, tmp_path, smtp_port=relay.port, security="tls")
    relay.fail_after, relay.mode = 1, "drop"
    try:
        msg = message(to="Bob <bob@example.org>", cc="Carol <carol@example.org>")
        refused = await asyncio.to_thread(rig.send, msg, ["bob@example.org", "carol@example.org"])
        assert refused == {}, "the client's message was accepted"
        assert len(await stored(clean_provider, "bob")) == 1
        assert clean_provider.stored_messages("carol") == []
        queued, failed, oldest = rig.outbox.stats()
        assert (queued, failed) == (1, 0) and oldest is not None
        relay.down = True
    finally:
        await rig.proxy.close()
        rig.store.close()
    # "Restart": a new outbox and worker on the same file; the provider is back.
    relay.down, relay.fail_after = False, None
    store = KeyStore(tmp_path / "data")
    outbox = Outbox(tmp_path / "data" / "outbox.sqlite", SecretBox(store.store_key.key))
    worker = OutboxWorker(
        outbox, outbox_sender({"alice": rig.config.accounts[0]}), on_failed=_never_fails
    )
    assert await worker.flush() == 1
    (carol_raw,) = await stored(clean_provider, "carol")
    assert b"The numbers are attached." in carol_raw
    assert parse_entity(carol_raw).get("Bcc") is None
    assert outbox.stats()[0] == 0
    await relay.close()
    store.close()


async def _never_fails(item) -> None:
    raise AssertionError(f"outbox item failed: {item.last_error}")


async def test_first_copy_failure_reaches_the_client_and_nothing_is_sent(clean_provider, tmp_path):
    relay = SmtpFaultRelay(clean_provider)
    await relay.start()
    rig = await start_rig(clean_provider, tmp_path, smtp_port=relay.port, security="tls")
    relay.fail_after, relay.mode = 0, "451"

    def mail() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with rig.client() as smtp:
            return smtp.mail("alice@example.org"), smtp.rcpt("bob@example.org")

    try:
        # MAIL goes upstream with the first RCPT: the provider's verdict on the
        # sender is that RCPT's answer (as Postfix's own smtpd_delay_reject does).
        (mail_code, _), (code, text) = await asyncio.to_thread(mail)
        assert mail_code == 250
        assert code == 451 and b"simulated temporary failure" in text
    finally:
        await rig.proxy.close()
        rig.store.close()
        await relay.close()
    assert clean_provider.stored_messages("bob") == []
