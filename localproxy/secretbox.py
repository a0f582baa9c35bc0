"""Encryption at rest: one random store key, kept in the OS keyring.

Everything localproxy keeps that must not sit on disk in clear (own secret
keys, queued outgoing mail, cached decrypted messages) is sealed with
AES-256-GCM under a random 256-bit store key. The store key lives in the OS
keyring; on a machine without one it falls back to a 0600 file beside the data
and says so loudly. Backups use a separate, passphrase-derived key (scrypt),
so they survive the loss of the keyring entry.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

log = logging.getLogger(__name__)

KEYRING_SERVICE = "localproxy"
KEY_FILE_NAME = "store.key"
_SEAL_VERSION = b"LPS1"  # record format: version, 12-byte nonce, ciphertext+tag
_ARCHIVE_MAGIC = b"LOCALPROXY-BACKUP-1\n"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**17, 8, 1  # ~128 MiB, ~0.3 s: a passphrase per backup


class SecretBoxError(Exception):
    """A sealed record could not be opened (wrong key, tampered, truncated)."""


@dataclass(frozen=True)
class StoreKey:
    """The store key and where it came from (shown in `status`)."""

    key: bytes
    location: str  # "keyring" or the path of the fallback file
    warning: str | None = None


class SecretBox:
    """AES-256-GCM with a fresh nonce per record; the record's id is bound as AAD."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("store key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return _SEAL_VERSION + nonce + self._aead.encrypt(nonce, plaintext, context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        if len(sealed) < 4 + 12 + 16 or not sealed.startswith(_SEAL_VERSION):
            raise SecretBoxError("not a sealed record (truncated or wrong format)")
        nonce, body = sealed[4:16], sealed[16:]
        try:
            return self._aead.decrypt(nonce, body, context)
        except InvalidTag:
            raise SecretBoxError(
                "sealed record does not open with this store key "
                "(tampered, or the store key changed)"
            ) from None


# --------------------------------------------------------------------------- the store key


def _keyring_user(data_dir: Path) -> str:
    # One entry per data dir, so test runs and several profiles never collide.
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return f"store-key:{digest}"


def load_store_key(data_dir: Path, create: bool = True) -> StoreKey:
    """The store key for a data dir: from the keyring, else from a 0600 file."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_file = data_dir / KEY_FILE_NAME
    if key_file.exists():
        return StoreKey(_read_key_file(key_file), str(key_file), _file_warning(key_file))
    from_keyring = _keyring_get(data_dir)
    if from_keyring is not None:
        return StoreKey(from_keyring, "keyring")
    if not create:
        raise SecretBoxError(
            "no store key in the OS keyring nor in "
            f"{key_file}; restore your keys from a backup "
            "(`localproxy keys restore FILE`)"
        )
    key = secrets.token_bytes(32)
    if _keyring_set(data_dir, key):
        return StoreKey(key, "keyring")
    _write_key_file(key_file, key)
    return StoreKey(key, str(key_file), _file_warning(key_file))


def _file_warning(path: Path) -> str:
    return (
        f"no OS keyring available: the store key is in {path} (mode 0600); anyone who "
        "can read your files can read your secret keys"
    )


def _keyring_get(data_dir: Path) -> bytes | None:
    try:
        import keyring

        value = keyring.get_password(KEYRING_SERVICE, _keyring_user(data_dir))
    except Exception as exc:  # any backend failure means "no usable keyring"
        log.debug("keyring unavailable: %s", exc.__class__.__name__)
        return None
    if value is None:
        return None
    try:
        key = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return key if len(key) == 32 else None


def _keyring_set(data_dir: Path, key: bytes) -> bool:
    try:
        import keyring

        keyring.set_password(
            KEYRING_SERVICE, _keyring_user(data_dir), base64.b64encode(key).decode()
        )
    except Exception as exc:  # fall back to the file; the caller warns
        log.debug("cannot store key in keyring: %s", exc.__class__.__name__)
        return False
    return _keyring_get(data_dir) == key


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)  # tighten rather than refuse: the data is ours
        log.warning("%s was readable by others (mode %o); set to 0600", path, mode)
    key = path.read_bytes()
    if len(key) != 32:
        raise SecretBoxError(f"{path} is not a localproxy store key (wrong length)")
    return key


def _write_key_file(path: Path, key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)


# --------------------------------------------------------------------------- passphrase archives


def _derive(passphrase: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return kdf.derive(passphrase.encode())


def seal_with_passphrase(plaintext: bytes, passphrase: str) -> bytes:
    """Archive format: magic, 16-byte salt, 12-byte nonce, AES-256-GCM(ciphertext+tag)."""
    if not passphrase:
        raise ValueError("a backup needs a non-empty passphrase")
    salt, nonce = os.urandom(16), os.urandom(12)
    body = AESGCM(_derive(passphrase, salt)).encrypt(nonce, plaintext, _ARCHIVE_MAGIC)
    return _ARCHIVE_MAGIC + salt + nonce + body


def open_with_passphrase(archive: bytes, passphrase: str) -> bytes:
    if not archive.startswith(_ARCHIVE_MAGIC):
        raise SecretBoxError("not a localproxy backup file")
    rest = archive[len(_ARCHIVE_MAGIC) :]
    if len(rest) < 16 + 12 + 16:
        raise SecretBoxError("backup file is truncated")
    salt, nonce, body = rest[:16], rest[16:28], rest[28:]
    try:
        return AESGCM(_derive(passphrase, salt)).decrypt(nonce, body, _ARCHIVE_MAGIC)
    except InvalidTag:
        raise SecretBoxError("wrong passphrase, or the backup file is damaged") from None
