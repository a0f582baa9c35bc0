"""The key store: lookup by address, merging, validity at query time, sealing, backups."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from localproxy.crypto.errors import CryptoError
from localproxy.crypto.openpgp import default_engine
from localproxy.keys.store import DB_NAME, KeyStore
from localproxy.secretbox import KEY_FILE_NAME, SecretBoxError

ENGINE = default_engine()


@pytest.fixture
def store(tmp_path: Path):
    with KeyStore(tmp_path / "data") as s:
        yield s


def friend(address: str = "Bob@Example.ORG") -> bytes:
    """A correspondent's public certificate."""
    return ENGINE.public_only(ENGINE.generate_key([f"Bob <{address}>"]).data)


def gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    home.mkdir(mode=0o700, exist_ok=True)
    result = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout


# --------------------------------------------------------------------------- lookup


def test_lookup_is_case_insensitive_in_the_domain_only(store):
    (outcome,) = store.import_keys(friend(), "import:bob.asc")
    assert outcome.action == "added" and outcome.addresses == ("Bob@example.org",)
    assert store.encryption_cert("Bob@EXAMPLE.org").fingerprint == outcome.fingerprint
    assert store.encryption_cert("bob@example.org") is None, "local parts are case-sensitive"
    assert store.encryption_cert("carol@example.org") is None


def test_keyring_with_many_certificates(store):
    ring = friend("a@example.org") + friend("b@example.org") + friend("c@example.org")
    outcomes = store.import_keys(ENGINE.armor(ring, kind="public-key"), "import:ring.asc")
    assert [o.action for o in outcomes] == ["added"] * 3
    assert {c.info.emails[0] for c in store.certs()} == {
        "a@example.org",
        "b@example.org",
        "c@example.org",
    }


def test_reimport_is_unchanged_and_source_is_kept(store):
    cert = friend()
    store.import_keys(cert, "import:first.asc")
    (again,) = store.import_keys(cert, "autocrypt")
    assert again.action == "unchanged"
    assert store.certs()[0].source == "import:first.asc"


# --------------------------------------------------------------------------- bad keys


def test_garbage_raises_and_leaves_the_store_unchanged(store):
    store.import_keys(friend(), "import:bob.asc")
    before = store.certs()
    with pytest.raises(CryptoError):
        store.import_keys(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n", "import:bad")
    assert [c.fingerprint for c in store.certs()] == [c.fingerprint for c in before]


def test_user_id_without_email_is_skipped(store, tmp_path, gnupg_home):
    home = gnupg_home
    gpg(home, "--quick-gen-key", "Just A Name", "ed25519", "sign,cert", "never")
    gpg(home, "--quick-add-key", _first_fpr(home), "cv25519", "encr", "never")
    (outcome,) = store.import_keys(gpg(home, "--export"), "import:noemail.asc")
    assert outcome.action == "skipped"
    assert "no user ID with an e-mail address" in outcome.reason
    assert store.certs() == []


def test_key_without_encryption_subkey_is_skipped(store, tmp_path, gnupg_home):
    home = gnupg_home
    gpg(home, "--quick-gen-key", "Sig Only <sig@example.org>", "ed25519", "sign,cert", "never")
    (outcome,) = store.import_keys(gpg(home, "--export"), "import:sig.asc")
    assert outcome.action == "skipped"
    assert "no valid encryption-capable subkey" in outcome.reason


def test_expired_certificate_is_skipped_and_expiry_is_judged_at_query_time(
    store, tmp_path, gnupg_home
):
    import time

    home = gnupg_home
    gpg(home, "--quick-gen-key", "Soon <soon@example.org>", "ed25519", "sign,cert", "seconds=3")
    gpg(home, "--quick-add-key", _first_fpr(home), "cv25519", "encr", "seconds=3")
    cert = gpg(home, "--export")
    (outcome,) = store.import_keys(cert, "import:soon.asc")
    assert outcome.action == "added"
    assert store.encryption_cert("soon@example.org") is not None
    time.sleep(4)
    assert store.encryption_cert("soon@example.org") is None, "expired since import"
    with KeyStore(tmp_path / "other") as fresh:
        (late,) = fresh.import_keys(cert, "import:soon.asc")
        assert late.action == "skipped" and "expired" in late.reason


def test_revocation_is_merged_not_replaced(store, tmp_path, gnupg_home):
    home = gnupg_home
    gpg(home, "--quick-gen-key", "Rev <rev@example.org>", "ed25519", "sign,cert", "never")
    fpr = _first_fpr(home)
    gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "never")
    store.import_keys(gpg(home, "--export"), "import:rev.asc")
    revocation = (
        (home / "openpgp-revocs.d" / f"{fpr}.rev").read_bytes().replace(b":-----", b"-----")
    )
    gpg(home, "--import", stdin=revocation)
    (outcome,) = store.import_keys(gpg(home, "--export"), "import:rev-update.asc")
    assert outcome.action == "updated" and "now revoked" in outcome.reason
    assert store.encryption_cert("rev@example.org") is None
    assert store.cert(fpr).info.revoked


def test_new_subkey_is_merged(store, tmp_path, gnupg_home):
    home = gnupg_home
    gpg(home, "--quick-gen-key", "Sub <sub@example.org>", "ed25519", "sign,cert", "never")
    store_fpr = _first_fpr(home)
    gpg(home, "--quick-add-key", store_fpr, "cv25519", "encr", "never")
    store.import_keys(gpg(home, "--export"), "import:sub.asc")
    gpg(home, "--quick-add-key", store_fpr, "cv25519", "encr", "never")
    (outcome,) = store.import_keys(gpg(home, "--export"), "import:sub2.asc")
    assert outcome.action == "updated"
    assert len(store.cert(store_fpr).info.data) > 0


def _first_fpr(home: Path) -> str:
    listing = gpg(home, "--with-colons", "--list-keys").decode()
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))


# --------------------------------------------------------------------------- own keys


def test_generated_key_is_sealed_at_rest(store):
    info = store.generate("personal", ("alice@example.org",))
    ((stored, secret),) = store.own_keys("personal")
    assert stored.fingerprint == info.fingerprint and stored.is_own
    assert ENGINE.parse_certs(secret)[0].has_secret
    db = sqlite3.connect(store.path)
    (sealed,) = db.execute("SELECT sealed FROM own_keys").fetchone()
    assert sealed.startswith(b"LPS1")
    with pytest.raises(CryptoError):
        ENGINE.parse_certs(sealed)
    assert (store.path.stat().st_mode & 0o777) == 0o600


def test_own_secrets_match_own_keys(store):
    store.generate("personal", ("alice@example.org",))
    store.generate("work", ("alice@work.example",))
    assert store.own_secrets("personal") == [s for _c, s in store.own_keys("personal")]
    assert store.own_secrets("nobody") == []


def test_own_keys_follow_changes_from_this_and_other_connections(store, tmp_path):
    """own_keys is remembered per account (every outgoing message asks), but a change
    made here or by another process (`localproxy keys`) shows at the next call."""
    assert store.own_keys("personal") == []
    first = store.generate("personal", ("alice@example.org",))
    assert [c.fingerprint for c, _ in store.own_keys("personal")] == [first.fingerprint]
    with KeyStore(store.data_dir) as other:  # as the CLI would, while the daemon runs
        second = other.generate("personal", ("alice@example.org",))
    seen = {c.fingerprint for c, _ in store.own_keys("personal")}
    assert seen == {first.fingerprint, second.fingerprint}
    with KeyStore(store.data_dir) as other:
        assert other.remove(second.fingerprint)
    assert [c.fingerprint for c, _ in store.own_keys("personal")] == [first.fingerprint]
    assert store.remove(first.fingerprint)
    assert store.own_keys("personal") == []


def test_certs_for_ids_follows_changes_to_the_store(store):
    info = store.generate("personal", ("alice@example.org",))
    ids = [info.fingerprint[-16:], *info.subkey_fingerprints]
    for wanted in ([ids[0]], [ids[-1]], [info.fingerprint]):
        assert store.certs_for_ids(wanted) == [store.cert(info.fingerprint).info.data]
    assert store.certs_for_ids(["0123456789ABCDEF"]) == []
    assert store.remove(info.fingerprint)
    assert store.certs_for_ids([info.fingerprint]) == []


def test_passphrase_protected_secret_key_import(store):
    protected = ENGINE.generate_key(["Alice <alice@example.org>"], passphrase="hunter2")
    asked = []

    def prompt(info):
        asked.append(info.fingerprint)
        return "wrong"

    (bad,) = store.import_keys(protected.data, "import:a.asc", prompt, lambda i: "personal")
    assert bad.action == "skipped" and asked == [protected.fingerprint]
    assert store.certs() == [], "store unchanged after a wrong passphrase"
    (good,) = store.import_keys(
        protected.data, "import:a.asc", lambda i: "hunter2", lambda i: "personal"
    )
    assert good.action == "added"
    ((_, secret),) = store.own_keys()
    assert not ENGINE.parse_certs(secret)[0].secret_locked, "kept unlocked, sealed by the store"


def test_secret_key_for_no_account_is_skipped(store):
    key = ENGINE.generate_key(["Mallory <mallory@example.org>"])
    (outcome,) = store.import_keys(key.data, "import:m.asc", account_for=lambda i: None)
    assert outcome.action == "skipped" and "--account" in outcome.reason


def test_lost_store_key_is_reported_not_replaced(tmp_path):
    data = tmp_path / "data"
    with KeyStore(data) as store:
        store.generate("personal", ("alice@example.org",))
    (data / KEY_FILE_NAME).unlink()
    with KeyStore(data) as store, pytest.raises(SecretBoxError, match="keys restore"):
        store.own_keys()
    assert not (data / KEY_FILE_NAME).exists()


def test_backup_restores_into_a_fresh_store_with_another_store_key(tmp_path):
    with KeyStore(tmp_path / "old") as old:
        own = old.generate("personal", ("alice@example.org",))
        old.import_keys(friend(), "import:bob.asc")
        archive = old.backup("correct horse")
        old_secret = old.own_keys()[0][1]
    assert b"alice@example.org" not in archive
    with KeyStore(tmp_path / "new") as new:
        outcomes = new.restore(archive, "correct horse")
        assert sorted(o.action for o in outcomes) == ["added", "added"]
        ((stored, secret),) = new.own_keys("personal")
        assert stored.fingerprint == own.fingerprint and secret == old_secret
        assert new.store_key.key != KeyStore(tmp_path / "old").store_key.key
        with pytest.raises(SecretBoxError, match="wrong passphrase"):
            new.restore(archive, "wrong")


def test_remove(store):
    (outcome,) = store.import_keys(friend(), "import:bob.asc")
    assert store.remove(outcome.fingerprint)
    assert not store.remove(outcome.fingerprint)
    assert store.certs() == []


def test_concurrent_writers_from_two_processes_worth_of_connections(tmp_path):
    certs = [friend(f"user{i}@example.org") for i in range(12)]
    errors: list[BaseException] = []

    def work(chunk: list[bytes]) -> None:
        try:
            with KeyStore(tmp_path / "data") as mine:
                for cert in chunk:
                    mine.import_keys(cert, "import:concurrent")
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(certs[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with KeyStore(tmp_path / "data") as check:
        assert len(check.certs()) == 12
    assert (tmp_path / "data" / DB_NAME).exists()
