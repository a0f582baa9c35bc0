"""The key store: recipients' certificates and the accounts' own secret keys.

SQLite in the data dir, WAL mode, one short transaction per change, so the
daemon and the CLI can use it at the same time. Certificates are indexed by
every e-mail address in their valid user IDs (domain lowercased, local part
exact). Validity (expiry, revocation, usable subkeys) is judged at query
time, so a key that expired since import is never used. Own secret keys are
sealed with the store key (see secretbox.py) and never touch the disk in clear.

S/MIME certificates live in the same tables with kind 'x509' (fingerprint: SHA-256
of the DER, data: the DER), indexed by their e-mail addresses; the OpenPGP queries
never see them. Their chain and, for certificates collected from signed mail, the
signing time are in x509_meta. Trust (chain to a root, validity, key usage) is
judged at query time too.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from localproxy.config import normalize_address
from localproxy.crypto import smime
from localproxy.crypto.errors import BadPassphrase, CryptoError, MalformedData
from localproxy.crypto.openpgp import CertInfo, OpenPGPEngine, default_engine
from localproxy.secretbox import (
    SecretBox,
    StoreKey,
    load_store_key,
    open_with_passphrase,
    seal_with_passphrase,
)
from localproxy.sqlite import immediate, retry_locked

DB_NAME = "keys.sqlite"
SCHEMA_VERSION = 1
BACKUP_VERSION = 2  # 1: OpenPGP only; 2: with S/MIME certificates and identities

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certs (
    fingerprint TEXT PRIMARY KEY,
    kind        TEXT NOT NULL DEFAULT 'openpgp',
    data        BLOB NOT NULL,              -- public certificate, binary
    source      TEXT NOT NULL,              -- where it came from: import:FILE, generated, ...
    added       TEXT NOT NULL,
    updated     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cert_addresses (
    fingerprint TEXT NOT NULL REFERENCES certs(fingerprint) ON DELETE CASCADE,
    address     TEXT NOT NULL,
    PRIMARY KEY (fingerprint, address)
);
CREATE INDEX IF NOT EXISTS cert_addresses_by_address ON cert_addresses(address);
CREATE TABLE IF NOT EXISTS own_keys (
    fingerprint TEXT PRIMARY KEY REFERENCES certs(fingerprint) ON DELETE CASCADE,
    account     TEXT NOT NULL,
    sealed      BLOB NOT NULL               -- SecretBox(store key): unlocked secret key
);
CREATE TABLE IF NOT EXISTS x509_meta (     -- only for certs of kind 'x509'
    fingerprint  TEXT PRIMARY KEY REFERENCES certs(fingerprint) ON DELETE CASCADE,
    chain        BLOB NOT NULL DEFAULT x'', -- DER intermediates that came with it, concatenated
    signing_time TEXT,                      -- collected certs: signingTime of that message
    capabilities TEXT NOT NULL DEFAULT ''   -- SMIMECapabilities names, space-separated
);
"""

log = logging.getLogger(__name__)
T = TypeVar("T")
PassphrasePrompt = Callable[[CertInfo], str | None]
COLLECTED = "collected"  # source of S/MIME certificates learned from signed mail
_OLDEST = datetime.min.replace(tzinfo=UTC)
# Debian/Ubuntu, Fedora/RHEL, Alpine/Arch (same as Debian), macOS with Homebrew OpenSSL.
_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
# Certificates whose key names (fingerprints) are remembered; past this the memory starts over.
MAX_NAME_CACHE = 10_000
# Seconds a parsed certificate's verdict (usable, expired) is reused. Expiry of the
# whole certificate is exact; a subkey or binding that lapses is noticed within this.
INFO_TTL = 60.0


class KeyStoreError(Exception):
    """A key store operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class StoredCert:
    info: CertInfo  # parsed now: expiry and revocation are current
    source: str
    added: datetime
    updated: datetime
    account: str | None  # set for the accounts' own keys

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def is_own(self) -> bool:
        return self.account is not None


@dataclass(frozen=True)
class StoredX509:
    """An S/MIME certificate in the store; validity and trust are judged at query time."""

    cert: x509.Certificate
    info: smime.SmimeCertInfo
    chain: tuple[x509.Certificate, ...]  # intermediates that came with it
    source: str  # import:FILE, p12:FILE, collected
    added: datetime
    updated: datetime
    account: str | None  # set for the accounts' own identities
    signing_time: datetime | None  # collected: the signingTime of the message it came in

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    @property
    def is_own(self) -> bool:
        return self.account is not None


@dataclass(frozen=True)
class ImportOutcome:
    fingerprint: str | None
    addresses: tuple[str, ...]
    action: str  # "added", "updated", "unchanged" or "skipped"
    reason: str = ""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _addresses(info: CertInfo) -> tuple[str, ...]:
    return tuple(sorted({normalize_address(e) for e in info.emails}))


class KeyStore:
    """Certificates and own keys of one data dir."""

    def __init__(
        self, data_dir: Path, engine: OpenPGPEngine | None = None, store_key: StoreKey | None = None
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = data_dir / DB_NAME
        self.data_dir = data_dir
        self.engine = engine or default_engine()
        self._store_key = store_key
        # Stored certificate bytes -> (its primary and subkey fingerprints, the parsed
        # certificate's bytes). Unlike expiry or revocation these never depend on the
        # time of the query, so they can be kept; keyed by the bytes, a changed
        # certificate is simply a new entry.
        self._names: dict[bytes, tuple[frozenset[str], bytes]] = {}
        # Stored certificate bytes -> (monotonic deadline, parsed CertInfo): every
        # message asks for the sender's and recipients' keys, and parsing dominates.
        # Whether a key is usable depends on the time, so an entry lasts at most
        # INFO_TTL and never past the certificate's own expiry.
        self._infos: dict[bytes, tuple[float, CertInfo]] = {}
        # Own keys per account, unsealed, as long as the database is unchanged (see
        # _generation) and at most INFO_TTL: every outgoing message asks for them.
        self._own: dict[tuple[str, str | None], tuple[tuple[int, int], float, list[Any]]] = {}
        self._writes = 0  # our own commits; data_version counts only other connections'
        # One connection shared by the event loop and worker threads (crypto runs in
        # threads); the lock serializes statements and keeps transactions whole.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, timeout=10, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("PRAGMA foreign_keys=ON")
        retry_locked(self._setup)
        self.path.chmod(0o600)

    def _setup(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # executescript() runs its own transaction; every statement is idempotent.
        self._db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: a concurrent writer waits
        # (busy_timeout) instead of failing half-way through a merge.
        try:
            with immediate(self._db, self._lock) as db:
                yield db
        finally:
            self._writes += 1  # even a rollback: being wrong costs one extra query

    def _rows(self, query: str, args: tuple[str, ...] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    @property
    def store_key(self) -> StoreKey:
        if self._store_key is None:
            # Sealed keys exist: a missing store key is a loss to report, never a
            # reason to mint a new key that cannot open them.
            has_sealed = self._rows("SELECT 1 FROM own_keys LIMIT 1")
            self._store_key = load_store_key(self.data_dir, create=not has_sealed)
        return self._store_key

    def _box(self) -> SecretBox:
        return SecretBox(self.store_key.key)

    # ----------------------------------------------------------------------- queries

    def certs(self) -> list[StoredCert]:
        rows = self._rows(
            "SELECT c.data, c.source, c.added, c.updated, o.account FROM certs c "
            "LEFT JOIN own_keys o USING (fingerprint) WHERE c.kind = 'openpgp' "
            "ORDER BY o.account IS NULL, c.added"
        )
        return [self._stored(*row) for row in rows]

    def count_recipients(self) -> int:
        """Other people's certificates, OpenPGP and S/MIME (X.509), whatever their state."""
        ((count,),) = self._rows(
            "SELECT COUNT(*) FROM certs c LEFT JOIN own_keys o USING (fingerprint) "
            "WHERE o.fingerprint IS NULL"
        )
        return count

    def cert(self, fingerprint: str) -> StoredCert | None:
        rows = self._rows(
            "SELECT c.data, c.source, c.added, c.updated, o.account FROM certs c "
            "LEFT JOIN own_keys o USING (fingerprint) WHERE c.fingerprint = ? "
            "AND c.kind = 'openpgp'",
            (fingerprint.upper().replace(" ", ""),),
        )
        return self._stored(*rows[0]) if rows else None

    def find(self, address: str) -> list[StoredCert]:
        """Every certificate with a valid user ID for this address, newest first."""
        rows = self._rows(
            "SELECT c.data, c.source, c.added, c.updated, o.account FROM certs c "
            "JOIN cert_addresses a USING (fingerprint) "
            "LEFT JOIN own_keys o USING (fingerprint) WHERE a.address = ? "
            "AND c.kind = 'openpgp'",
            (normalize_address(address),),
        )
        found = [self._stored(*row) for row in rows]
        return sorted(found, key=lambda c: c.info.created, reverse=True)

    def encryption_cert(self, address: str) -> StoredCert | None:
        """The certificate to encrypt to this address now: usable, and among those the
        ones the user imported before ones learned from Autocrypt, newest first. A
        forged Autocrypt header can then never displace a key the user chose."""
        wanted = normalize_address(address)
        candidates = sorted(self.find(address), key=lambda c: c.source.startswith("autocrypt"))
        for stored in candidates:
            info = stored.info
            if info.can_encrypt and not info.revoked and wanted in _addresses(info):
                return stored
        return None

    def certs_for_ids(self, ids: Sequence[str]) -> list[bytes]:
        """Certificates matching key IDs or (sub)key fingerprints, for signature checks."""
        wanted = {i.upper().replace(" ", "") for i in ids}
        return [
            parsed
            for names, parsed in self._remembered(("names", None), self._all_key_names)
            if any(n in wanted or n[-16:] in wanted for n in names)
        ]

    def _all_key_names(self) -> list[tuple[frozenset[str], bytes]]:
        """Every certificate's (sub)key fingerprints, own keys first, then by age."""
        rows = self._rows(
            "SELECT c.data FROM certs c LEFT JOIN own_keys o USING (fingerprint) "
            "WHERE c.kind = 'openpgp' ORDER BY o.account IS NULL, c.added"
        )
        return [self._key_names(data) for (data,) in rows]

    def _key_names(self, data: bytes) -> tuple[frozenset[str], bytes]:
        """Parsing a certificate costs far more than the query: done once per version."""
        known = self._names.get(data)
        if known is None:
            (info,) = self.engine.parse_certs(data)
            known = frozenset((info.fingerprint, *info.subkey_fingerprints)), info.data
            with self._lock:
                if len(self._names) >= MAX_NAME_CACHE:
                    self._names.clear()
                self._names[data] = known
        return known

    def _info(self, data: bytes) -> CertInfo:
        now = time.monotonic()
        cached = self._infos.get(data)
        if cached is not None and now < cached[0]:
            return cached[1]
        (info,) = self.engine.parse_certs(data)
        deadline = now + INFO_TTL
        if info.expires is not None:
            left = (info.expires - datetime.now(UTC)).total_seconds()
            deadline = min(deadline, now + max(0.0, left))
        with self._lock:
            if len(self._infos) >= MAX_NAME_CACHE:
                self._infos.clear()
            self._infos[data] = deadline, info
        return info

    def own_secrets(self, account: str) -> list[bytes]:
        """The account's secret keys, unsealed, without parsing them (for decryption,
        which judges the keys itself)."""
        return self._remembered(("secrets", account), lambda: self._own_secrets(account))

    def _own_secrets(self, account: str) -> list[bytes]:
        box = self._box()
        rows = self._rows(
            "SELECT o.fingerprint, o.sealed FROM own_keys o JOIN certs c USING (fingerprint) "
            "WHERE o.account = ? AND c.kind = 'openpgp'",
            (account,),
        )
        return [box.open(sealed, f"own-key:{fpr}".encode()) for fpr, sealed in rows]

    def _generation(self) -> tuple[int, int]:
        """Moves whenever the database may have changed: another process's commit moves
        SQLite's data_version, ours move _writes."""
        with self._lock:
            ((version,),) = self._db.execute("PRAGMA data_version").fetchall()
        return version, self._writes

    def _remembered(
        self,
        key: tuple[str, str | None],
        load: Callable[[], list[T]],
        expiry: Callable[[T], datetime | None] = lambda item: None,
    ) -> list[T]:
        """load(), again only once the database changed, INFO_TTL passed, or one of
        the items expired (whether a key is usable depends on the time)."""
        generation, now = self._generation(), time.monotonic()
        cached = self._own.get(key)
        if cached is not None and cached[0] == generation and now < cached[1]:
            return list(cached[2])
        value = load()
        deadline = now + INFO_TTL
        for expires in filter(None, map(expiry, value)):
            deadline = min(deadline, now + max(0.0, (expires - datetime.now(UTC)).total_seconds()))
        with self._lock:
            self._own[key] = generation, deadline, value
        return list(value)

    def own_keys(self, account: str | None = None) -> list[tuple[StoredCert, bytes]]:
        """The accounts' secret keys, unsealed for in-memory use."""
        return self._remembered(
            ("openpgp", account), lambda: self._own_keys(account), lambda own: own[0].info.expires
        )

    def _own_keys(self, account: str | None) -> list[tuple[StoredCert, bytes]]:
        query = (
            "SELECT c.data, c.source, c.added, c.updated, o.account, o.sealed, "
            "o.fingerprint FROM own_keys o JOIN certs c USING (fingerprint) "
            "WHERE c.kind = 'openpgp'"
        )
        args: tuple[str, ...] = ()
        if account is not None:
            query += " AND o.account = ?"
            args = (account,)
        box = self._box()
        result = []
        for data, source, added, updated, acct, sealed, fpr in self._rows(query, args):
            secret = box.open(sealed, f"own-key:{fpr}".encode())
            result.append((self._stored(data, source, added, updated, acct), secret))
        return result

    def _stored(
        self, data: bytes, source: str, added: str, updated: str, account: str | None
    ) -> StoredCert:
        info = self._info(data)
        return StoredCert(
            info, source, datetime.fromisoformat(added), datetime.fromisoformat(updated), account
        )

    # ----------------------------------------------------------------------- changes

    def import_keys(
        self,
        data: bytes,
        source: str,
        passphrase: PassphrasePrompt | None = None,
        account_for: Callable[[CertInfo], str | None] | None = None,
    ) -> list[ImportOutcome]:
        """Import every certificate (and secret key) in data; each one added, merged or
        skipped with a reason. Raises CryptoError when data holds no OpenPGP at all."""
        outcomes = []
        for info in self.engine.parse_certs(data):
            try:
                outcomes.append(self._import_one(info, source, passphrase, account_for))
            except CryptoError as exc:
                outcomes.append(
                    ImportOutcome(info.fingerprint, _addresses(info), "skipped", str(exc))
                )
        return outcomes

    def _import_one(
        self,
        info: CertInfo,
        source: str,
        passphrase: PassphrasePrompt | None,
        account_for: Callable[[CertInfo], str | None] | None,
    ) -> ImportOutcome:
        addresses = _addresses(info)
        existing = self.cert(info.fingerprint)
        secret, account = None, None
        if info.has_secret:
            account = account_for(info) if account_for else None
            if account is None:
                return ImportOutcome(
                    info.fingerprint,
                    addresses,
                    "skipped",
                    "secret key matches no configured account (use --account NAME)",
                )
            secret = self._unlocked(info, passphrase)
        if existing is None:
            if problem := _unusable_reason(info):
                return ImportOutcome(info.fingerprint, addresses, "skipped", problem)
            self._write(info, self.engine.public_only(info.data), source, secret, account)
            return ImportOutcome(info.fingerprint, addresses, "added")
        return self._merge(existing, info, source, secret, account)

    def _unlocked(self, info: CertInfo, passphrase: PassphrasePrompt | None) -> bytes:
        if not info.secret_locked:
            return info.data
        given = passphrase(info) if passphrase else None
        if given is None:
            raise BadPassphrase(
                f"secret key {info.fingerprint} is passphrase-protected and no passphrase was given"
            )
        return self.engine.unlock(info.data, given)

    def _merge(
        self,
        existing: StoredCert,
        info: CertInfo,
        source: str,
        secret: bytes | None,
        account: str | None,
    ) -> ImportOutcome:
        old_public = existing.info.data
        merged = self.engine.merge(old_public, self.engine.public_only(info.data))
        new_public = self.engine.public_only(merged.data)
        gains_secret = secret is not None and not existing.is_own
        if new_public == old_public and not gains_secret:
            return ImportOutcome(
                info.fingerprint, _addresses(merged), "unchanged", "already known, nothing new"
            )
        self._write(
            merged,
            new_public,
            existing.source if not gains_secret else source,
            secret,
            account or existing.account,
            added=existing.added,
        )
        what = _describe_change(existing.info, merged, gains_secret)
        return ImportOutcome(info.fingerprint, _addresses(merged), "updated", what)

    def _write(
        self,
        info: CertInfo,
        public: bytes,
        source: str,
        secret: bytes | None,
        account: str | None,
        added: datetime | None = None,
    ) -> None:
        now = _now()
        sealed = (
            self._box().seal(secret, f"own-key:{info.fingerprint}".encode())
            if secret is not None
            else None
        )
        with self._transaction() as db:
            db.execute(
                "INSERT INTO certs (fingerprint, data, source, added, updated) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(fingerprint) DO UPDATE SET "
                "data = excluded.data, source = excluded.source, updated = excluded.updated",
                (info.fingerprint, public, source, added.isoformat() if added else now, now),
            )
            db.execute("DELETE FROM cert_addresses WHERE fingerprint = ?", (info.fingerprint,))
            db.executemany(
                "INSERT INTO cert_addresses VALUES (?, ?)",
                [(info.fingerprint, a) for a in _addresses(info)],
            )
            if sealed is not None:
                db.execute(
                    "INSERT OR REPLACE INTO own_keys VALUES (?, ?, ?)",
                    (info.fingerprint, account, sealed),
                )

    def generate(self, account: str, addresses: tuple[str, ...]) -> CertInfo:
        """A fresh own key for an account, one user ID per address."""
        info = self.engine.generate_key(list(addresses))
        self._write(info, self.engine.public_only(info.data), "generated", info.data, account)
        return info

    def remove(self, fingerprint: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM certs WHERE fingerprint = ?", (fingerprint.upper().replace(" ", ""),)
            )
        return cursor.rowcount > 0

    # ----------------------------------------------------------------------- S/MIME (X.509)

    def x509_certs(self, address: str | None = None) -> list[StoredX509]:
        """S/MIME certificates (own first), or those for one address, newest first."""
        query = (
            "SELECT c.data, c.source, c.added, c.updated, o.account, m.chain, m.signing_time, "
            "m.capabilities FROM certs c LEFT JOIN x509_meta m USING (fingerprint) "
            "LEFT JOIN own_keys o USING (fingerprint) WHERE c.kind = 'x509'"
        )
        args: tuple[str, ...] = ()
        if address is not None:
            query += (
                " AND c.fingerprint IN (SELECT fingerprint FROM cert_addresses WHERE address = ?)"
            )
            args = (normalize_address(address),)
        found = [_stored_x509(*row) for row in self._rows(query, args)]
        found.sort(key=lambda c: c.info.not_before, reverse=True)
        return sorted(found, key=lambda c: c.account is None)

    def x509_cert(self, fingerprint: str) -> StoredX509 | None:
        wanted = fingerprint.upper().replace(" ", "").replace(":", "")
        return next((c for c in self.x509_certs() if c.fingerprint == wanted), None)

    def smime_cert(
        self,
        address: str,
        trust_roots: Sequence[x509.Certificate],
        at: datetime | None = None,
    ) -> StoredX509 | None:
        """The certificate to encrypt to this address now: valid for encryption, for this
        address, chaining to a trusted root. Imported ones win over collected ones (a
        signed mail from a stranger must not displace the user's choice), then newest."""
        candidates = sorted(self.x509_certs(address), key=lambda c: c.source == COLLECTED)
        for stored in candidates:
            try:
                smime.validate(stored.cert, trust_roots, stored.chain, address, "encrypt", at)
            except CryptoError as exc:
                log.debug("S/MIME certificate %s not usable: %s", stored.fingerprint, exc)
                continue
            return stored
        return None

    def smime_identities(self, account: str) -> list[smime.SmimeIdentity]:
        """The account's own S/MIME identities, keys unsealed for in-memory use."""
        load = functools.partial(self._identities, "o.account = ?", account)
        return self._remembered(("x509", account), load, lambda own: own.cert.not_valid_after_utc)

    def smime_identity(self, fingerprint: str) -> smime.SmimeIdentity | None:
        """The own S/MIME identity with this certificate fingerprint, key unsealed."""
        wanted = fingerprint.upper().replace(" ", "").replace(":", "")
        found = self._identities("o.fingerprint = ?", wanted)
        return found[0] if found else None

    def _identities(self, where: str, arg: str) -> list[smime.SmimeIdentity]:
        box = self._box()
        rows = self._rows(
            "SELECT o.fingerprint, o.sealed, c.data, m.chain FROM own_keys o "
            "JOIN certs c USING (fingerprint) LEFT JOIN x509_meta m USING (fingerprint) "
            f"WHERE {where} AND c.kind = 'x509' ORDER BY c.added DESC",
            (arg,),
        )
        identities = []
        for fpr, sealed, data, chain in rows:
            key = smime.load_private_key(box.open(sealed, f"own-key:{fpr}".encode()))
            cert = x509.load_der_x509_certificate(data)
            identities.append(smime.SmimeIdentity(key, cert, _chain(chain)))
        return identities

    def import_x509(self, data: bytes, source: str) -> list[ImportOutcome]:
        """Import the end-entity certificates of a PEM/DER/PKCS#7 bundle; the CA
        certificates in it are kept as their chain. Raises MalformedData."""
        certs = smime.parse_certificates(data)
        cas = tuple(c for c in certs if smime.cert_info(c).is_ca)
        leaves = [c for c in certs if c not in cas]
        if not leaves:
            return [
                ImportOutcome(
                    smime.fingerprint(c),
                    (),
                    "skipped",
                    "a CA certificate: to trust it, add it to policy.smime_ca_file",
                )
                for c in cas
            ]
        return [self._import_x509_one(cert, cas, source) for cert in leaves]

    def _import_x509_one(
        self, cert: x509.Certificate, chain: tuple[x509.Certificate, ...], source: str
    ) -> ImportOutcome:
        info = smime.cert_info(cert)
        existing = self.x509_cert(info.fingerprint)
        if existing is not None:
            return ImportOutcome(info.fingerprint, info.emails, "unchanged", "already known")
        if problem := _x509_unusable_reason(info):
            return ImportOutcome(info.fingerprint, info.emails, "skipped", problem)
        self._write_x509(cert, chain, source)
        return ImportOutcome(info.fingerprint, info.emails, "added")

    def import_identity(
        self, identity: smime.SmimeIdentity, account: str, source: str
    ) -> ImportOutcome:
        """An own S/MIME identity (from PKCS#12): the key sealed with the store key."""
        info = smime.cert_info(identity.cert)
        existing = self.x509_cert(info.fingerprint)
        action = "added" if existing is None else "updated"
        if existing is not None and existing.account == account:
            return ImportOutcome(info.fingerprint, info.emails, "unchanged", "already known")
        self._write_x509(identity.cert, identity.chain, source, (identity.key_der, account))
        return ImportOutcome(info.fingerprint, info.emails, action)

    def collect_smime_cert(
        self,
        cert: x509.Certificate,
        signing_time: datetime | None,
        capabilities: Sequence[str],
        address: str,
        chain: Sequence[x509.Certificate] = (),
    ) -> bool:
        """Remember the certificate of a validly signed message (RFC 8551 2.7.1): it
        replaces the one collected for the address only when this message's signing
        time is newer. Imported and own certificates are never replaced. True when stored."""
        address = normalize_address(address)
        info = smime.cert_info(cert, capabilities)
        when = signing_time or _OLDEST  # no signingTime: never newer than anything
        known = self.x509_certs(address)
        if address not in info.emails or any(
            c.fingerprint == info.fingerprint and c.source != COLLECTED for c in known
        ):
            return False
        collected = [c for c in known if c.source == COLLECTED]
        if any((c.signing_time or _OLDEST) >= when for c in collected):
            return False
        ca_chain = tuple(c for c in chain if smime.cert_info(c).is_ca)
        with self._transaction() as db:
            for old in collected:
                db.execute("DELETE FROM certs WHERE fingerprint = ?", (old.fingerprint,))
        self._write_x509(cert, ca_chain, COLLECTED, signing_time=signing_time, caps=capabilities)
        return True

    def _write_x509(
        self,
        cert: x509.Certificate,
        chain: Sequence[x509.Certificate],
        source: str,
        own: tuple[bytes, str] | None = None,
        signing_time: datetime | None = None,
        caps: Sequence[str] = (),
    ) -> None:
        fpr = smime.fingerprint(cert)
        sealed = self._box().seal(own[0], f"own-key:{fpr}".encode()) if own else None
        pem_chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        now = _now()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO certs (fingerprint, kind, data, source, added, updated) "
                "VALUES (?, 'x509', ?, ?, ?, ?) ON CONFLICT(fingerprint) DO UPDATE SET "
                "data = excluded.data, source = excluded.source, updated = excluded.updated",
                (fpr, cert.public_bytes(serialization.Encoding.DER), source, now, now),
            )
            db.execute(
                "INSERT OR REPLACE INTO x509_meta VALUES (?, ?, ?, ?)",
                (
                    fpr,
                    pem_chain,
                    signing_time.isoformat() if signing_time else None,
                    " ".join(caps),
                ),
            )
            db.execute("DELETE FROM cert_addresses WHERE fingerprint = ?", (fpr,))
            db.executemany(
                "INSERT INTO cert_addresses VALUES (?, ?)",
                [(fpr, a) for a in smime.cert_emails(cert)],
            )
            if own is not None:
                db.execute(
                    "INSERT OR REPLACE INTO own_keys VALUES (?, ?, ?)", (fpr, own[1], sealed)
                )

    # ----------------------------------------------------------------------- export, backup

    def export_public(self, fingerprints: list[str]) -> bytes:
        blobs = []
        for fpr in fingerprints:
            stored = self.cert(fpr)
            if stored is None:
                raise KeyStoreError(f"no certificate with fingerprint {fpr}")
            blobs.append(stored.info.data)
        return self.engine.armor(b"".join(blobs), kind="public-key")

    def export_secret(self, fingerprint: str) -> bytes:
        for stored, secret in self.own_keys():
            if stored.fingerprint == fingerprint.upper():
                return self.engine.armor(secret, kind="secret-key")
        raise KeyStoreError(f"no own secret key with fingerprint {fingerprint}")

    def export_x509(self, fingerprints: list[str]) -> bytes:
        """S/MIME certificates as PEM, each followed by the chain stored with it."""
        blobs: list[bytes] = []
        for fpr in fingerprints:
            stored = self.x509_cert(fpr)
            if stored is None:
                raise KeyStoreError(f"no S/MIME certificate with fingerprint {fpr}")
            for cert in (stored.cert, *stored.chain):
                blob = cert.public_bytes(serialization.Encoding.PEM)
                if blob not in blobs:
                    blobs.append(blob)
        return b"".join(blobs)

    def export_pkcs12(self, fingerprint: str, passphrase: str) -> bytes:
        """An own S/MIME identity (key, certificate, chain) as PKCS#12 under a passphrase."""
        identity = self.smime_identity(fingerprint)
        if identity is None:
            raise KeyStoreError(f"no own S/MIME identity with fingerprint {fingerprint}")
        if not passphrase:
            raise KeyStoreError("an empty passphrase would not protect the PKCS#12 file")
        emails = smime.cert_emails(identity.cert)
        return pkcs12.serialize_key_and_certificates(
            emails[0].encode() if emails else None,
            identity.key,
            identity.cert,
            list(identity.chain) or None,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )

    def backup(self, passphrase: str) -> bytes:
        """The whole store (certificates and unsealed own keys, OpenPGP and S/MIME) under
        a passphrase."""
        own = {stored.fingerprint: (stored.account, secret) for stored, secret in self.own_keys()}
        records = []
        for stored in self.certs():
            record = {
                "fingerprint": stored.fingerprint,
                "source": stored.source,
                "added": stored.added.isoformat(),
                "data": stored.info.data.hex(),
            }
            if stored.fingerprint in own:
                record["account"], secret = own[stored.fingerprint]
                record["secret"] = secret.hex()
            records.append(record)
        payload = json.dumps(
            {
                "format": "localproxy-keys",
                "version": BACKUP_VERSION,
                "records": records,
                "x509": self._x509_records(),
            }
        )
        return seal_with_passphrase(payload.encode(), passphrase)

    def _x509_records(self) -> list[dict[str, str | None]]:
        box = self._box() if self._rows("SELECT 1 FROM own_keys LIMIT 1") else None
        rows = self._rows(
            "SELECT c.fingerprint, c.data, c.source, c.added, m.chain, m.signing_time, "
            "m.capabilities, o.account, o.sealed FROM certs c "
            "LEFT JOIN x509_meta m USING (fingerprint) LEFT JOIN own_keys o USING (fingerprint) "
            "WHERE c.kind = 'x509' ORDER BY o.account IS NULL, c.added"
        )
        records = []
        for fpr, data, source, added, chain, signing_time, caps, account, sealed in rows:
            record = {
                "fingerprint": fpr,
                "source": source,
                "added": added,
                "data": data.hex(),
                "chain": (chain or b"").hex(),
                "signing_time": signing_time,
                "capabilities": caps or "",
            }
            if account is not None and box is not None:
                record["account"] = account
                record["secret"] = box.open(sealed, f"own-key:{fpr}".encode()).hex()
            records.append(record)
        return records

    def restore(self, archive: bytes, passphrase: str) -> list[ImportOutcome]:
        """Merge a backup into this store (re-sealing own keys with this store's key).
        Reads format version 1 (OpenPGP only) and 2 (with S/MIME)."""
        payload = json.loads(open_with_passphrase(archive, passphrase))
        if payload.get("format") != "localproxy-keys":
            raise KeyStoreError("not a localproxy key backup")
        version = payload.get("version")
        if version not in (1, BACKUP_VERSION):
            raise KeyStoreError(
                f"key backup format version {version!r} is not one this localproxy reads "
                f"(1 to {BACKUP_VERSION})"
            )
        outcomes = []
        for record in payload["records"]:
            data = bytes.fromhex(record.get("secret") or record["data"])
            account = record.get("account")
            outcomes += self.import_keys(
                data, record["source"], account_for=lambda _info, a=account: a
            )
        for record in payload.get("x509", []) if version >= 2 else []:
            outcomes.append(self._restore_x509(record))
        return outcomes

    def _restore_x509(self, record: dict[str, str | None]) -> ImportOutcome:
        cert = x509.load_der_x509_certificate(bytes.fromhex(record["data"] or ""))
        chain = _chain(bytes.fromhex(record.get("chain") or ""))
        source = record["source"] or COLLECTED
        info = smime.cert_info(cert)
        if record.get("secret") and record.get("account"):
            key = smime.load_private_key(bytes.fromhex(record["secret"] or ""))
            identity = smime.SmimeIdentity(key, cert, chain)
            return self.import_identity(identity, record["account"] or "", source)
        if self.x509_cert(info.fingerprint) is not None:
            return ImportOutcome(info.fingerprint, info.emails, "unchanged", "already known")
        if source != COLLECTED:
            return self._import_x509_one(cert, chain, source)
        when = datetime.fromisoformat(record["signing_time"]) if record["signing_time"] else None
        caps = (record.get("capabilities") or "").split()
        # As when collected from mail: a newer collected certificate for the address wins.
        stored = [self.collect_smime_cert(cert, when, caps, a, chain) for a in info.emails]
        if any(stored):
            return ImportOutcome(info.fingerprint, info.emails, "added")
        return ImportOutcome(
            info.fingerprint,
            info.emails,
            "unchanged",
            "a certificate collected from newer mail is known",
        )


def _unusable_reason(info: CertInfo) -> str | None:
    if info.has_secret:
        return None  # own keys are kept whatever their state; `keys list` shows it
    if not info.emails:
        return "no user ID with an e-mail address: mail could never be encrypted to it"
    if info.revoked:
        return "the certificate is revoked"
    if info.expires is not None and info.expires <= datetime.now(UTC):
        return f"the certificate expired on {info.expires:%Y-%m-%d}"
    if not info.can_encrypt:
        return "no valid encryption-capable subkey"
    return None


def _describe_change(old: CertInfo, new: CertInfo, gained_secret: bool) -> str:
    changes = []
    if gained_secret:
        changes.append("secret key added")
    if new.revoked and not old.revoked:
        changes.append("now revoked")
    if new.expires != old.expires:
        changes.append(f"expiry now {new.expires:%Y-%m-%d}" if new.expires else "no expiry")
    if set(new.user_ids) != set(old.user_ids):
        changes.append("user IDs changed")
    if new.can_encrypt != old.can_encrypt:
        changes.append("encryption subkey " + ("added" if new.can_encrypt else "no longer usable"))
    return ", ".join(changes) or "new signatures or subkeys merged"


# --------------------------------------------------------------------------- S/MIME helpers


def _stored_x509(
    data: bytes,
    source: str,
    added: str,
    updated: str,
    account: str | None,
    chain: bytes | None,
    signing_time: str | None,
    capabilities: str | None,
) -> StoredX509:
    cert = x509.load_der_x509_certificate(data)
    return StoredX509(
        cert,
        smime.cert_info(cert, (capabilities or "").split()),
        _chain(chain),
        source,
        datetime.fromisoformat(added),
        datetime.fromisoformat(updated),
        account,
        datetime.fromisoformat(signing_time) if signing_time else None,
    )


def _chain(pem: bytes | None) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_pem_x509_certificates(pem)) if pem else ()


def _x509_unusable_reason(info: smime.SmimeCertInfo) -> str | None:
    if not info.emails:
        return "no e-mail address in the certificate: mail could never be encrypted to it"
    if info.not_after <= datetime.now(UTC):
        return f"the certificate expired on {info.not_after:%Y-%m-%d}"
    if not (info.can_encrypt or info.can_sign):
        return "its key usage allows neither encryption nor signing"
    return None


def system_ca_file() -> Path | None:
    """The system's PEM trust bundle: OpenSSL's default file, else a well-known path."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *_SYSTEM_BUNDLES):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def load_trust_roots(ca_file: Path | None = None) -> tuple[x509.Certificate, ...]:
    """The roots S/MIME chains must reach: ca_file, else the system bundle. Cached per
    file version, as every message and recipient needs them."""
    path = ca_file or system_ca_file()
    if path is None:
        return ()
    try:
        stat = path.stat()
    except OSError as exc:
        raise MalformedData(f"cannot read the S/MIME trust file {path}: {exc.strerror}") from exc
    return _roots_of(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _roots_of(path: Path, _mtime: int, _size: int) -> tuple[x509.Certificate, ...]:
    data = path.read_bytes()
    roots = []
    # One by one: a system bundle may hold a certificate cryptography cannot read,
    # and that one must not make every other root unusable.
    for block in data.split(b"-----END CERTIFICATE-----")[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        try:
            pem = block[start:] + b"-----END CERTIFICATE-----\n"
            with warnings.catch_warnings():  # old roots with a negative serial: still roots
                warnings.simplefilter("ignore")
                roots.append(x509.load_pem_x509_certificate(pem))
        except ValueError:
            log.debug("skipped an unreadable certificate in %s", path)
    return tuple(roots)
