"""compose() choosing between OpenPGP and S/MIME per recipient, in process.

bob has both an OpenPGP key and an S/MIME certificate, carol and erin only S/MIME
certificates, dave nothing. alice (the account) has an OpenPGP key and an S/MIME
identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from localproxy.config import Config, parse_config
from localproxy.crypto import smime
from localproxy.crypto.errors import DecryptionFailed
from localproxy.crypto.openpgp import default_engine
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity
from localproxy.smtp.compose import Copy, PolicyRefusal, compose, refusal_for_recipient
from tests.crypto.test_smime import alice, ca, make_user

ENGINE = default_engine()
PEM = serialization.Encoding.PEM
BOB = "bob@example.net"
CAROL = "carol@example.net"
DAVE = "dave@example.net"
ERIN = "erin@example.net"
BOB_PGP = ENGINE.generate_key([f"Bob <{BOB}>"])
SECRET = b"SECRET-BODY-TEXT-0815"
PGP = "multipart/encrypted"
CMS = "application/pkcs7-mime"


@cache
def user(address: str) -> smime.SmimeIdentity:
    return make_user(address).identity


def message(to: str, sender: str = "Alice <alice@example.org>") -> bytes:
    return (
        (
            f"From: {sender}\r\nTo: {to}\r\nSubject: methods\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        ).encode()
        + SECRET
        + b"\r\n"
    )


def make_config(tmp_path: Path, policy: dict | None = None) -> Config:
    roots = tmp_path / "roots.pem"
    roots.write_bytes(ca().cert.public_bytes(PEM))
    server = {"host": "mail.example.org", "port": 465, "security": "tls"}
    return parse_config(
        {
            "proxy": {"data_dir": str(tmp_path / "data")},
            "policy": {"smime_ca_file": str(roots)} | (policy or {}),
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": server | {"port": 993}, "smtp": server},
                }
            ],
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "data") as keys:
        keys.generate("alice", ("alice@example.org",))
        keys.import_identity(alice().identity, "alice", "p12:alice.p12")
        keys.import_keys(ENGINE.public_only(BOB_PGP.data), "import:bob.asc")
        for address in (BOB, CAROL, ERIN):
            keys.import_x509(user(address).cert.public_bytes(PEM), f"import:{address}.pem")
        yield keys


def run(
    store: KeyStore,
    tmp_path: Path,
    raw: bytes,
    recipients: list[str],
    policy: dict | None = None,
) -> list[Copy]:
    config = make_config(tmp_path, policy)
    return compose(
        raw,
        recipients,
        account=config.accounts[0],
        policy=config.policy,
        store=store,
        engine=ENGINE,
    )


def method_rule(address: str, method: str, **more: str) -> dict:
    return {"address": {address: {"method": method, **more}}}


def kinds(copies: list[Copy]) -> dict[tuple[str, ...], str]:
    """recipients -> content type of the copy (or "plain")."""
    found = {}
    for copy in copies:
        ctype = parse_entity(copy.message).content_type
        found[copy.recipients] = ctype if copy.kind == "encrypted" else copy.kind
    return found


def open_smime(copy: Copy, identity: smime.SmimeIdentity) -> bytes:
    assert SECRET not in copy.message
    return smime.decrypt(copy.message, [identity]).plaintext


def test_default_prefers_openpgp_then_smime(store, tmp_path):
    copies = run(store, tmp_path, message(f"{BOB}, {CAROL}, {DAVE}"), [BOB, CAROL, DAVE])
    assert kinds(copies) == {(BOB,): PGP, (CAROL,): CMS, (DAVE,): "plain"}
    (smime_copy,) = [c for c in copies if c.recipients == (CAROL,)]
    assert SECRET in open_smime(smime_copy, user(CAROL))
    with pytest.raises(DecryptionFailed):
        smime.decrypt(smime_copy.message, [user(BOB)])


def test_method_smime_wins_over_an_openpgp_key(store, tmp_path):
    copies = run(store, tmp_path, message(BOB), [BOB], method_rule(BOB, "smime"))
    assert kinds(copies) == {(BOB,): CMS}
    assert SECRET in open_smime(copies[0], user(BOB))


def test_method_smime_without_certificate_is_plain_or_refused(store, tmp_path):
    copies = run(store, tmp_path, message(DAVE), [DAVE], method_rule(DAVE, "smime"))
    assert kinds(copies) == {(DAVE,): "plain"}
    with pytest.raises(PolicyRefusal, match="requires encryption"):
        run(store, tmp_path, message(DAVE), [DAVE], method_rule(DAVE, "smime", encrypt="always"))


def test_method_openpgp_never_falls_back_to_smime(store, tmp_path):
    copies = run(store, tmp_path, message(CAROL), [CAROL], method_rule(CAROL, "openpgp"))
    assert kinds(copies) == {(CAROL,): "plain"}, "opportunistic: no OpenPGP key, so plain"
    assert SECRET in copies[0].message
    policy = method_rule(CAROL, "openpgp", encrypt="always")
    with pytest.raises(PolicyRefusal, match="requires encryption"):
        run(store, tmp_path, message(CAROL), [CAROL], policy)
    config = make_config(tmp_path, policy)
    refusal = refusal_for_recipient(CAROL, config.accounts[0], config.policy, store)
    assert refusal is not None and refusal.startswith("550")
    # Where an OpenPGP key exists, "openpgp" uses it as the default would.
    copies = run(store, tmp_path, message(BOB), [BOB], method_rule(BOB, "openpgp"))
    assert kinds(copies) == {(BOB,): PGP}


def test_each_bcc_recipient_gets_its_own_copy_per_method(store, tmp_path):
    recipients = [DAVE, BOB, CAROL, ERIN]
    raw = message(DAVE).replace(b"Subject:", f"Bcc: {BOB}, {CAROL}, {ERIN}\r\nSubject:".encode())
    copies = run(store, tmp_path, raw, recipients)
    assert kinds(copies) == {(DAVE,): "plain", (BOB,): PGP, (CAROL,): CMS, (ERIN,): CMS}
    assert all(b"\nBcc:" not in b"\n" + c.message.split(b"\r\n\r\n")[0] for c in copies)
    by_recipient = {c.recipients: c for c in copies}
    carol_copy, erin_copy = by_recipient[(CAROL,)], by_recipient[(ERIN,)]
    assert SECRET in open_smime(carol_copy, user(CAROL))
    assert SECRET in open_smime(erin_copy, user(ERIN))
    # A copy names only its own recipient (and the sender): nobody learns of the others.
    with pytest.raises(DecryptionFailed):
        smime.decrypt(carol_copy.message, [user(ERIN)])
    with pytest.raises(DecryptionFailed):
        smime.decrypt(erin_copy.message, [user(CAROL)])


def test_to_and_cc_smime_recipients_share_one_copy(store, tmp_path):
    raw = message(CAROL).replace(b"Subject:", f"Cc: {ERIN}\r\nSubject:".encode())
    (copy,) = run(store, tmp_path, raw, [CAROL, ERIN])
    assert copy.recipients == (CAROL, ERIN)
    assert SECRET in open_smime(copy, user(CAROL)) and SECRET in open_smime(copy, user(ERIN))


def test_smime_copy_is_encrypted_to_the_sender_and_signed_by_its_identity(store, tmp_path):
    (copy,) = run(store, tmp_path, message(CAROL), [CAROL])
    inner = open_smime(copy, alice().identity)
    assert SECRET in inner
    assert parse_entity(inner).content_type == "multipart/signed"
    content, result = smime.verify_entity(inner, [ca().cert], address="alice@example.org")
    assert result.valid and result.signer == alice().cert
    assert SECRET in content
    assert b"Subject: methods" in parse_entity(copy.message).header, "outer header kept"


def test_no_smime_signature_or_own_copy_when_from_is_someone_else(store, tmp_path):
    raw = message(CAROL, sender="Mallory <mallory@example.com>")
    (copy,) = run(store, tmp_path, raw, [CAROL])
    inner = open_smime(copy, user(CAROL))
    assert SECRET in inner
    assert parse_entity(inner).content_type == "text/plain", "not signed"
    with pytest.raises(DecryptionFailed):
        smime.decrypt(copy.message, [alice().identity])


def test_sign_never_leaves_the_smime_copy_unsigned(store, tmp_path):
    (copy,) = run(store, tmp_path, message(CAROL), [CAROL], {"sign": "never"})
    inner = open_smime(copy, alice().identity)
    assert parse_entity(inner).content_type == "text/plain"
