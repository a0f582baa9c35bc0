"""Encryption at rest: store key handling, sealed records, passphrase archives."""

from __future__ import annotations

import stat

import keyring
import pytest
from keyring.backend import KeyringBackend

from localproxy.secretbox import (
    KEY_FILE_NAME,
    SecretBox,
    SecretBoxError,
    load_store_key,
    open_with_passphrase,
    seal_with_passphrase,
)


class MemoryKeyring(KeyringBackend):
    # Negative priority: keyring auto-discovers subclasses, and this one must
    # never be chosen unless a test installs it.
    priority = -1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.entries.pop((service, username), None)


@pytest.fixture
def memory_keyring():
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_sealed_records_open_only_with_their_context():
    box = SecretBox(b"k" * 32)
    sealed = box.seal(b"secret key material", b"own-key:ABCD")
    assert b"secret key material" not in sealed
    assert box.open(sealed, b"own-key:ABCD") == b"secret key material"
    with pytest.raises(SecretBoxError, match="does not open"):
        box.open(sealed, b"own-key:EFGH")  # a record moved to another row must not open


def test_every_seal_uses_a_fresh_nonce():
    box = SecretBox(b"k" * 32)
    assert box.seal(b"same", b"c") != box.seal(b"same", b"c")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1],
        lambda b: b[:10],
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:],
    ],
)
def test_tampered_or_truncated_records_are_refused(mangle):
    box = SecretBox(b"k" * 32)
    with pytest.raises(SecretBoxError):
        box.open(mangle(box.seal(b"payload", b"c")), b"c")


def test_wrong_store_key_is_refused():
    sealed = SecretBox(b"a" * 32).seal(b"payload", b"c")
    with pytest.raises(SecretBoxError):
        SecretBox(b"b" * 32).open(sealed, b"c")


def test_without_keyring_the_key_falls_back_to_a_0600_file_with_a_warning(tmp_path):
    key = load_store_key(tmp_path / "data")
    path = tmp_path / "data" / KEY_FILE_NAME
    assert key.location == str(path)
    assert key.warning and "no OS keyring" in key.warning
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_store_key(tmp_path / "data").key == key.key, "the same key every time"


def test_loose_key_file_permissions_are_tightened(tmp_path):
    load_store_key(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    path.chmod(0o644)
    load_store_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keyring_holds_the_key_when_available(tmp_path, memory_keyring):
    key = load_store_key(tmp_path / "a")
    assert key.location == "keyring" and key.warning is None
    assert not (tmp_path / "a" / KEY_FILE_NAME).exists(), "nothing on disk"
    assert load_store_key(tmp_path / "a").key == key.key
    assert load_store_key(tmp_path / "b").key != key.key, "one key per data dir"


def test_lost_keyring_entry_is_reported_with_the_recovery_path(tmp_path, memory_keyring):
    load_store_key(tmp_path)
    memory_keyring.entries.clear()
    with pytest.raises(SecretBoxError, match="keys restore"):
        load_store_key(tmp_path, create=False)


def test_passphrase_archive_round_trip_and_wrong_passphrase():
    archive = seal_with_passphrase(b"the whole key store", "correct horse")
    assert b"the whole key store" not in archive
    assert open_with_passphrase(archive, "correct horse") == b"the whole key store"
    with pytest.raises(SecretBoxError, match="wrong passphrase"):
        open_with_passphrase(archive, "wrong horse")
    with pytest.raises(SecretBoxError, match="not a localproxy backup"):
        open_with_passphrase(b"garbage", "correct horse")
    with pytest.raises(SecretBoxError, match="truncated"):
        open_with_passphrase(archive[:30], "correct horse")
    with pytest.raises(ValueError):
        seal_with_passphrase(b"x", "")
