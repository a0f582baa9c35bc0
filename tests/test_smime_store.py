"""S/MIME certificates and identities in the key store, and `localproxy keys` for them."""

from __future__ import annotations

import json
import sqlite3
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from localproxy.crypto import smime
from localproxy.crypto.openpgp import default_engine
from localproxy.keys.store import DB_NAME, KeyStore, KeyStoreError, load_trust_roots
from localproxy.secretbox import seal_with_passphrase
from tests.crypto.test_smime import NOW, alice, bob, ca, make_user, other_ca
from tests.test_keys_cli import config, keys, listing  # noqa: F401 (fixture)

ENGINE = default_engine()
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM


@pytest.fixture
def store(tmp_path: Path):
    with KeyStore(tmp_path / "data") as s:
        yield s


def pem(*certs) -> bytes:
    return b"".join(c.public_bytes(PEM) for c in certs)


def test_x509_cert_stored_by_address_and_validated(store: KeyStore) -> None:
    (outcome,) = store.import_x509(pem(bob().cert, ca().cert), "import:bob.pem")
    assert outcome.action == "added" and outcome.addresses == ("bob@example.net",)
    (stored,) = store.x509_certs("bob@example.net")
    assert stored.cert == bob().cert and stored.chain == (ca().cert,)
    assert stored.fingerprint == bob().cert.fingerprint(hashes.SHA256()).hex().upper()
    assert store.smime_cert("bob@example.net", [ca().cert]).cert == bob().cert
    assert store.smime_cert("bob@example.net", [other_ca().cert]) is None, "untrusted root"
    later = NOW + timedelta(days=400)
    assert store.smime_cert("bob@example.net", [ca().cert], at=later) is None, "expired then"
    assert store.smime_cert("carol@example.net", [ca().cert]) is None
    again = store.import_x509(bob().cert.public_bytes(DER), "import:bob.der")
    assert again[0].action == "unchanged"


def test_import_skips_ca_only_and_unusable(store: KeyStore) -> None:
    (only_ca,) = store.import_x509(pem(ca().cert), "import:ca.pem")
    assert only_ca.action == "skipped" and "smime_ca_file" in only_ca.reason
    nobody = make_user(None)
    (skipped,) = store.import_x509(pem(nobody.cert), "import:x.pem")
    assert skipped.action == "skipped" and "e-mail" in skipped.reason


def test_openpgp_queries_ignore_x509_rows(store: KeyStore) -> None:
    store.import_x509(pem(alice().cert), "import:alice.pem")
    info = store.generate("personal", ("alice@example.org",))
    assert [c.fingerprint for c in store.certs()] == [info.fingerprint]
    assert [c.fingerprint for c in store.find("alice@example.org")] == [info.fingerprint]
    assert store.encryption_cert("alice@example.org").fingerprint == info.fingerprint
    assert store.cert(store.x509_certs()[0].fingerprint) is None
    assert len(store.own_keys("personal")) == 1 and len(store.own_secrets("personal")) == 1
    assert store.certs_for_ids([info.fingerprint])


def test_own_identity_sealed_at_rest(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "data") as store:
        outcome = store.import_identity(alice().identity, "personal", "p12:alice.p12")
        assert outcome.action == "added"
        (identity,) = store.smime_identities("personal")
        assert identity.cert == alice().cert and identity.chain == (ca().cert,)
        assert identity.key_der == alice().identity.key_der
        assert store.smime_identities("other") == []
        assert store.own_keys("personal") == [], "no OpenPGP key for the account"
        assert store.x509_certs()[0].is_own
    raw = (tmp_path / "data" / DB_NAME).read_bytes()
    assert alice().identity.key_der[-64:] not in raw
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as db:
        (sealed,) = db.execute("SELECT sealed FROM own_keys").fetchone()
    assert alice().identity.key_der not in sealed


def test_collect_replaces_only_with_newer_signing_time(store: KeyStore) -> None:
    first = make_user("carol@example.com", not_before=NOW - timedelta(days=3))
    second = make_user("carol@example.com", usage="both", not_before=NOW - timedelta(days=2))
    assert first.cert != second.cert
    assert store.collect_smime_cert(
        first.cert, NOW - timedelta(hours=5), ["aes256"], "carol@example.com"
    )
    # An older message's certificate does not replace the one from a newer message.
    assert not store.collect_smime_cert(
        second.cert, NOW - timedelta(hours=6), (), "carol@example.com"
    )
    (kept,) = store.x509_certs("carol@example.com")
    assert kept.cert == first.cert and kept.source == "collected"
    assert kept.info.capabilities == ("aes256",)
    assert store.collect_smime_cert(second.cert, NOW - timedelta(hours=1), (), "carol@example.com")
    (newer,) = store.x509_certs("carol@example.com")
    assert newer.cert == second.cert
    assert not store.collect_smime_cert(first.cert, None, (), "carol@example.com")
    # Never for an address the certificate does not carry; never over an imported one.
    assert not store.collect_smime_cert(bob().cert, NOW, (), "carol@example.com")
    store.import_x509(pem(bob().cert), "import:bob.pem")
    assert not store.collect_smime_cert(bob().cert, NOW, (), "bob@example.net")
    assert store.x509_certs("bob@example.net")[0].source == "import:bob.pem"


def test_imported_beats_collected(store: KeyStore) -> None:
    collected = make_user("dave@example.com", not_before=NOW - timedelta(hours=1))
    imported = make_user("dave@example.com", usage="encrypt")
    store.collect_smime_cert(collected.cert, NOW, (), "dave@example.com")
    store.import_x509(pem(imported.cert), "import:dave.pem")
    assert store.smime_cert("dave@example.com", [ca().cert]).cert == imported.cert


def test_trust_roots_from_file_and_system(tmp_path: Path) -> None:
    bundle = tmp_path / "roots.pem"
    bundle.write_bytes(pem(ca().cert, other_ca().cert))
    assert load_trust_roots(bundle) == (ca().cert, other_ca().cert)
    assert isinstance(load_trust_roots(None), tuple)


def test_cli_import_p12_pem_bundle_and_list(config: Path, tmp_path: Path) -> None:  # noqa: F811
    p12 = tmp_path / "alice.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"alice",
            alice().key,
            alice().cert,
            [ca().cert],
            serialization.BestAvailableEncryption(b"sesame"),
        )
    )
    wrong = keys(
        config,
        "import-p12",
        str(p12),
        "--account",
        "personal",
        env={"LOCALPROXY_P12_PASSPHRASE": "nope"},
    )
    assert wrong.returncode == 1 and "passphrase" in wrong.stderr + wrong.stdout
    done = keys(
        config,
        "import-p12",
        str(p12),
        "--account",
        "personal",
        env={"LOCALPROXY_P12_PASSPHRASE": "sesame"},
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "added" in done.stdout
    bundle = tmp_path / "bob.pem"
    bundle.write_bytes(pem(bob().cert, ca().cert))
    imported = keys(config, "import", str(bundle))
    assert imported.returncode == 0, imported.stderr + imported.stdout
    assert "bob@example.net" in imported.stdout
    pgp = tmp_path / "carol.asc"
    pgp.write_bytes(ENGINE.public_only(ENGINE.generate_key(["carol@example.com"]).data))
    assert keys(config, "import", str(pgp)).returncode == 0
    rows = listing(config)
    kinds = {(r.get("kind", "openpgp"), tuple(r["addresses"]), r["own"]) for r in rows}
    assert kinds == {
        ("x509", ("alice@example.org",), True),
        ("x509", ("bob@example.net",), False),
        ("openpgp", ("carol@example.com",), False),
    }
    bob_row = next(r for r in rows if r["addresses"] == ["bob@example.net"])
    assert bob_row["issuer"] == ca().cert.subject.rfc4514_string()
    assert bob_row["status"] == "usable" and bob_row["source"] == "import:bob.pem"
    table = keys(config, "list")
    assert table.returncode == 0 and "S/MIME certificates (2)" in table.stdout
    garbage = tmp_path / "junk.txt"
    garbage.write_bytes(b"neither kind of key")
    assert keys(config, "import", str(garbage)).returncode == 1


def test_backup_and_restore_keep_smime_identities_and_certs(tmp_path: Path) -> None:
    carol = make_user("carol@example.com", usage="both")
    with KeyStore(tmp_path / "data") as store:
        store.import_identity(alice().identity, "personal", "p12:alice.p12")
        store.import_x509(pem(bob().cert, ca().cert), "import:bob.pem")
        store.collect_smime_cert(
            carol.cert, NOW - timedelta(hours=2), ["aes256"], "carol@example.com"
        )
        pgp = store.generate("personal", ("alice@example.org",))
        dave = ENGINE.generate_key(["Dave <dave@example.org>"])
        store.import_keys(ENGINE.public_only(dave.data), "import:dave.asc")
        archive = store.backup("correct horse")
    assert alice().identity.key_der not in archive, "sealed with the passphrase"
    with KeyStore(tmp_path / "fresh") as restored:
        outcomes = restored.restore(archive, "correct horse")
        assert {o.action for o in outcomes} == {"added"}, outcomes
        assert len(outcomes) == 5
        (identity,) = restored.smime_identities("personal")
        assert identity.cert == alice().cert and identity.chain == (ca().cert,)
        message = smime.encrypt(b"Content-Type: text/plain\r\n\r\nhi\r\n", [alice().cert])
        assert smime.decrypt(message, [identity]).plaintext.endswith(b"hi\r\n")
        rows = {c.cert: c for c in restored.x509_certs()}
        assert rows[alice().cert].account == "personal"
        assert rows[alice().cert].source == "p12:alice.p12"
        assert rows[bob().cert].source == "import:bob.pem" and rows[bob().cert].chain == (
            ca().cert,
        )
        collected = rows[carol.cert]
        assert collected.source == "collected" and collected.info.capabilities == ("aes256",)
        assert collected.signing_time == NOW - timedelta(hours=2)
        assert {c.fingerprint for c in restored.certs()} == {pgp.fingerprint, dave.fingerprint}
        assert len(restored.own_keys("personal")) == 1
        assert restored.count_recipients() == 3, "bob, carol (X.509) and dave (OpenPGP)"
        again = restored.restore(archive, "correct horse")
        assert {o.action for o in again} == {"unchanged"}


def test_restore_reads_version_1_archives_and_refuses_unknown(tmp_path: Path) -> None:
    key = ENGINE.generate_key(["Alice <alice@example.org>"])
    record = {"fingerprint": key.fingerprint, "source": "generated", "added": "2024-01-01"}
    record |= {"data": key.data.hex(), "account": "personal", "secret": key.data.hex()}
    old = {"format": "localproxy-keys", "version": 1, "records": [record]}
    with KeyStore(tmp_path / "data") as store:
        (outcome,) = store.restore(seal_with_passphrase(json.dumps(old).encode(), "pw"), "pw")
        assert outcome.action == "added" and len(store.own_keys("personal")) == 1
        future = seal_with_passphrase(json.dumps(old | {"version": 99}).encode(), "pw")
        with pytest.raises(KeyStoreError, match="version 99"):
            store.restore(future, "pw")


def test_cli_export_x509_pem_and_pkcs12(config: Path, tmp_path: Path) -> None:  # noqa: F811
    p12 = tmp_path / "alice.p12"
    encryption = serialization.BestAvailableEncryption(b"sesame")
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"alice", alice().key, alice().cert, [ca().cert], encryption
        )
    )
    env = {"LOCALPROXY_P12_PASSPHRASE": "sesame"}
    assert keys(config, "import-p12", str(p12), "--account", "personal", env=env).returncode == 0
    bundle = tmp_path / "bob.pem"
    bundle.write_bytes(pem(bob().cert, ca().cert))
    assert keys(config, "import", str(bundle)).returncode == 0
    rows = {r["addresses"][0]: r for r in listing(config)}
    by_address = keys(config, "export", "bob@example.net")
    assert by_address.returncode == 0, by_address.stderr
    assert by_address.stdout.encode() == pem(bob().cert, ca().cert)
    by_fingerprint = keys(config, "export", rows["alice@example.org"]["fingerprint"])
    assert by_fingerprint.stdout.encode() == pem(alice().cert, ca().cert)
    # Both kinds for one address: the OpenPGP block, then the PEM certificates.
    assert keys(config, "generate", "personal").returncode == 0
    both = keys(config, "export", "alice@example.org").stdout
    assert both.index("BEGIN PGP PUBLIC KEY BLOCK") < both.index("BEGIN CERTIFICATE")
    assert "PRIVATE KEY" not in both
    # --secret: only for an own identity, only when confirmed, only with a passphrase.
    fpr = rows["alice@example.org"]["fingerprint"]
    refused = keys(config, "export", fpr, "--secret", env=env)
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    no_pass = keys(config, "export", fpr, "--secret", "--yes", "-o", str(tmp_path / "x.p12"))
    assert no_pass.returncode == 1 and "LOCALPROXY_P12_PASSPHRASE" in no_pass.stderr
    not_own = keys(config, "export", rows["bob@example.net"]["fingerprint"], "--secret", "--yes")
    assert not_own.returncode == 1 and "no own S/MIME identity" in not_own.stderr
    out = tmp_path / "exported.p12"
    new_env = {"LOCALPROXY_P12_PASSPHRASE": "new secret"}
    done = keys(config, "export", fpr, "--secret", "--yes", "-o", str(out), env=new_env)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key, cert, extra = pkcs12.load_key_and_certificates(out.read_bytes(), b"new secret")
    assert cert == alice().cert and extra == [ca().cert]
    assert key.private_numbers() == alice().key.private_numbers()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(out.read_bytes(), b"sesame")
