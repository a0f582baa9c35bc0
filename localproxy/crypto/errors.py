"""Errors raised by the message-protection engines (OpenPGP today, S/MIME later).

Every error carries a precise, human-readable message that can be shown to the user
or put into a status header as is. The classes say what kind of problem it is, so
callers can react (skip a recipient, ask for a passphrase, serve a message as stored)
without parsing messages. They are method-neutral: "key" means an OpenPGP key or an
X.509 certificate, "fingerprint" whatever identifies it uniquely.
"""

from __future__ import annotations

from collections.abc import Sequence


class CryptoError(Exception):
    """Base class: the operation failed; str(error) says why, in plain words."""


class MalformedData(CryptoError):
    """Input is not what it claims to be: garbage, truncated, unsupported structure."""


class NoUsableKey(CryptoError):
    """A key cannot be used for the operation (e.g. no valid encryption-capable subkey)."""

    def __init__(self, message: str, fingerprint: str | None = None) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class KeyExpired(NoUsableKey):
    """The key (or every subkey able to do the job) has expired."""


class KeyRevoked(NoUsableKey):
    """The key has been revoked by its owner."""


class KeyLocked(CryptoError):
    """Secret key material is passphrase-protected and must be unlocked first."""

    def __init__(self, message: str, fingerprint: str | None = None) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class BadPassphrase(CryptoError):
    """The passphrase does not unlock the secret key."""


class DecryptionFailed(CryptoError):
    """The message cannot be decrypted with the keys we have (e.g. not encrypted to us).

    ``recipients`` names the keys the message was encrypted to (OpenPGP key IDs,
    S/MIME issuer and serial), so the user can see which key would be needed.
    """

    def __init__(self, message: str, recipients: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.recipients = tuple(recipients)


class IntegrityError(CryptoError):
    """Integrity protection is missing or failed; no plaintext is ever released."""


class OutputTooLarge(CryptoError):
    """The plaintext (after decompression) exceeds the caller's limit."""

    def __init__(self, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class NeedsWorker(Exception):
    """Not a failure: decrypting was asked to stay cheap (inline_only), and this message
    needs more. Do it again in a worker thread, without the budget."""
