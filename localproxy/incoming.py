"""What the IMAP relay shows for a stored message, and what it stores for APPEND.

The transformer receives a stored message that may be encrypted, signed or
carry a forged status header, and returns the bytes the client sees: forged
``X-LocalProxy-*`` headers removed, the message decrypted and verified when
it is whole-message OpenPGP, and exactly one ``X-LocalProxy-Security``
header saying what was done, or why it could not be. Autocrypt headers teach
the key store about correspondents.

S/MIME (RFC 8551) is handled here too: a top-level application/pkcs7-mime
enveloped-data is opened with the account's S/MIME identities and shown like
PGP/MIME (outer non-content headers + the decrypted entity, its signature checked
and unwrapped); opaque signed-data is unwrapped and verified; multipart/signed
with application/pkcs7-signature is verified and shown as it is. The signer's
certificate of a valid signature is collected into the key store.

The APPEND side encrypts copies saved to Sent and Drafts to the account's own
key (OpenPGP, else the S/MIME certificate), so the provider holds only
ciphertext there too.

Autocrypt (Level 1, "Updating Autocrypt Peer State") is learned from the whole stored
message on the view path and, through `observe_headers`, from the header fields the
relay probes for every message a client fetches, plain mail included. The key store
keeps every key and prefers user-imported keys, then the newest; the spec's per-peer
`autocrypt_timestamp` is kept per account in memory only (see AutocryptPeers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from localproxy.config import Account, Config, normalize_address
from localproxy.crypto import smime
from localproxy.crypto.errors import CryptoError, MalformedData, NeedsWorker, NoUsableKey
from localproxy.crypto.openpgp import (
    OpenPGPEngine,
    SignatureResult,
    inline_budget,
    inline_only,
)
from localproxy.crypto.pgpmime import (
    Kind,
    Unwrapped,
    classify,
    encrypt_message,
    strip_headers,
    transport_fields,
    unwrap,
)
from localproxy.imap.relay import MessageContext
from localproxy.keys.store import KeyStore, load_trust_roots
from localproxy.mime import (
    CRLF,
    Entity,
    header_field,
    is_content_header,
    parse_entity,
    split_header_body,
    to_crlf,
)
from localproxy.secretbox import SecretBoxError

log = logging.getLogger(__name__)

STATUS_HEADER = "X-LocalProxy-Security"
EventSink = Callable[[str, dict[str, Any]], None]
INLINE_VIEW = 64 * 1024  # stored octets: views of smaller messages are built on the loop
AUTOCRYPT_MAX_HEADER = 10 * 1024  # Level 1: larger headers are treated as invalid
OBSERVED_LIMIT = 10_000  # messages remembered as already observed, per account


class IncomingProcessor:
    """Per account: the relay's transformer and APPEND transformer."""

    def __init__(
        self,
        account: Account,
        config: Config,
        store: KeyStore,
        engine: OpenPGPEngine,
        on_event: EventSink | None = None,
    ) -> None:
        self.account = account
        self.store = store
        self.engine = engine
        self.max_output = 2 * config.proxy.max_message_size
        self.autocrypt = config.policy.setting("autocrypt", account.policy)
        self.smime_ca_file = config.policy.smime_ca_file
        self.on_event = on_event or (lambda kind, data: None)
        self.peers = AutocryptPeers()
        self.seen = SeenKeys()
        self._observed: OrderedDict[tuple[str, str, int, int], None] = OrderedDict()

    # ----------------------------------------------------------------------- FETCH view

    async def transform(self, raw: bytes, context: object = None) -> bytes:
        # Handing a small message to a worker thread costs more than decrypting it (the
        # cold download ran 40% slower): it is decrypted here, unless it turns out to
        # need more than a small budget, which would stall every session.
        if len(raw) <= INLINE_VIEW:
            try:
                with inline_only():
                    return self.view_of(raw)
            except NeedsWorker:
                pass
        return await asyncio.to_thread(self.view_of, raw)

    def view_of(self, raw: bytes) -> bytes:
        stored = strip_headers(raw)
        if self.autocrypt:  # before verifying, so a new correspondent's first mail verifies
            # No date check here: an older message needs its (older) signing key to verify,
            # and the store never lets an older key displace a newer one.
            learn_autocrypt(self.store, stored, "autocrypt", seen=self.seen)
        entity = parse_entity(stored)
        if classify(entity) == Kind.SMIME:
            if inline_budget() is not None:
                raise NeedsWorker("S/MIME is decrypted in a worker")
            result = self._unwrap_smime(stored)
        else:
            result = self._unwrap_openpgp(entity, stored)
        if self.autocrypt and result.decrypted:
            learn_autocrypt(
                self.store, result.message, "autocrypt-gossip", gossip=True, seen=self.seen
            )
        self._count(result)
        status = status_value(result)
        return add_header(result.message, STATUS_HEADER, status) if status else result.message

    def _unwrap_openpgp(self, entity: Entity, stored: bytes) -> Unwrapped:
        try:
            secret_keys, locked = self.store.own_secrets(self.account.name), None
        except SecretBoxError as exc:  # keyring entry lost: show the mail as stored, and why
            secret_keys, locked = [], f"own keys are locked: {exc}"
        result = unwrap(
            stored,
            self.engine,
            secret_keys,
            self.store.certs_for_ids,
            max_output=self.max_output,
            parsed=entity,
        )
        if locked and result.error and not result.decrypted:
            result.error = locked
        return result

    async def observe_headers(self, header: bytes, context: MessageContext) -> None:
        """The relay's header observer: Autocrypt from the probed header fields of any
        fetched message, once per stored message (IMAP messages never change)."""
        if not self.autocrypt or b"autocrypt" not in header.lower():
            return
        key = (context.account, context.mailbox, context.uidvalidity, context.uid)
        if key in self._observed:
            return
        self._observed[key] = None
        if len(self._observed) > OBSERVED_LIMIT:
            self._observed.popitem(last=False)
        learned = await asyncio.to_thread(
            learn_autocrypt, self.store, header, "autocrypt", peers=self.peers
        )
        if learned:
            log.info("learned %d key(s) from an Autocrypt header (uid %d)", learned, context.uid)

    def _count(self, result: Unwrapped) -> None:
        if result.kind == Kind.PLAIN:
            return
        if result.error:
            self.on_event("received-failed", {"kind": str(result.kind), "error": result.error})
        elif result.decrypted:
            self.on_event("received-decrypted", {"kind": str(result.kind)})
        if any(s.valid for s in result.signatures):
            self.on_event("received-verified", {"kind": str(result.kind)})

    # ----------------------------------------------------------------------- S/MIME

    def _unwrap_smime(self, raw: bytes) -> Unwrapped:
        """Like pgpmime.unwrap for S/MIME: never raises for bad mail, the reason is in
        .error and .message is then the original bytes."""
        message = parse_entity(raw)
        kind = smime.classify(message)
        try:
            if kind == smime.SmimeKind.ENVELOPED:
                return self._decrypt_smime(message)
            if kind == smime.SmimeKind.SIGNED_OPAQUE:
                content, result = self._verify_smime(message, raw)
                return Unwrapped(Kind.SMIME, _view(message, content), signatures=(result,))
            if kind == smime.SmimeKind.SIGNED_DETACHED:
                _content, result = self._verify_smime(message, raw)
                return Unwrapped(Kind.SMIME, raw, signatures=(result,))
            raise MalformedData(f"S/MIME {kind} is not supported")
        except (CryptoError, SecretBoxError) as exc:
            return Unwrapped(Kind.SMIME, raw, error=str(exc))

    def _decrypt_smime(self, message: Entity) -> Unwrapped:
        identities = self.store.smime_identities(self.account.name)
        if not identities:
            raise NoUsableKey(
                f"account {self.account.name!r} has no S/MIME identity "
                "(`localproxy keys import-p12 FILE --account NAME`)"
            )
        opened = smime.decrypt(smime.decode_body(message), identities, self.max_output)
        inner = to_crlf(opened.plaintext)
        signatures: tuple[SignatureResult, ...] = ()
        if smime.classify(parse_entity(inner)) in _SIGNED:
            # Signed, then encrypted (RFC 8551 3.7): show the signed content, checked.
            inner, result = self._verify_smime(message, inner)
            signatures = (result,)
        return Unwrapped(
            Kind.SMIME,
            _view(message, inner),
            decrypted=True,
            decrypted_with=smime.fingerprint(opened.recipient),
            signatures=signatures,
        )

    def _verify_smime(self, outer: Entity, signed: bytes) -> tuple[bytes, SignatureResult]:
        """(signed content, result) of a signed entity; the signer must be From (of the
        outer message: S/MIME leaves the headers outside). A valid signer's certificate
        is collected (RFC 8551 2.7.1)."""
        sender = _from_address(outer) or ""  # "": no From, so no certificate can match
        known = [c.cert for c in self.store.x509_certs(sender)] if sender else []
        roots = load_trust_roots(self.smime_ca_file)
        content, result = smime.verify_entity(
            signed, roots, address=sender, known_certs=known, max_output=self.max_output
        )
        if result.valid and result.signer is not None:
            self.store.collect_smime_cert(
                result.signer,
                result.signing_time,
                result.capabilities,
                sender,
                result.certificates,
            )
        return to_crlf(content), result.signature

    # ----------------------------------------------------------------------- APPEND

    async def encrypt_for_self(self, mailbox: str, raw: bytes) -> bytes:
        return await asyncio.to_thread(self.sealed_copy, raw)

    def sealed_copy(self, raw: bytes) -> bytes:
        """A Sent/Drafts copy encrypted to the account's own key (already protected mail
        is stored as it is). Raises CryptoError when the account has no usable key."""
        if classify(parse_entity(raw)) != Kind.PLAIN:
            return raw
        own = [
            stored.info.data
            for stored, _secret in self.store.own_keys(self.account.name)
            if stored.info.can_encrypt
        ]
        if not own:
            identities = self.store.smime_identities(self.account.name)
            if identities:
                return _smime_sealed(strip_headers(raw), [i.cert for i in identities[:1]])
            raise CryptoError(
                f"account {self.account.name!r} has no usable own key to encrypt "
                "Sent/Drafts copies (`localproxy keys generate "
                f"{self.account.name}`)"
            )
        return encrypt_message(strip_headers(raw), self.engine, own)


_SIGNED = (smime.SmimeKind.SIGNED_OPAQUE, smime.SmimeKind.SIGNED_DETACHED)


def _view(outer: Entity, inner: bytes) -> bytes:
    """Outer transport headers + the decrypted or unwrapped entity (its content fields)."""
    entity = parse_entity(inner)
    fields = transport_fields(outer)
    fields += [h for h in entity.headers if is_content_header(h)]
    header = b"".join(h.raw if h.raw.endswith(CRLF) else h.raw.rstrip() + CRLF for h in fields)
    return header + CRLF + entity.body


def _smime_sealed(raw: bytes, certs: list) -> bytes:
    """A message enveloped (AES-256-CBC) to certs: headers outside, content inside."""
    message = parse_entity(to_crlf(raw))
    content = [h.raw for h in message.headers if is_content_header(h)]
    inner = b"".join(content) + CRLF + message.body
    outer = [
        h.raw
        for h in message.headers
        if not is_content_header(h) and h.name.lower() != "mime-version"
    ]
    return b"".join(outer) + header_field("MIME-Version", "1.0") + smime.encrypt(inner, certs)


# --------------------------------------------------------------------------- status header


def status_value(result: Unwrapped) -> str | None:
    """One line saying what localproxy did; None for plain mail (nothing to say)."""
    if result.kind == Kind.PLAIN:
        return None
    if result.error:
        verb = "not-decrypted" if _is_encrypted(result) else "not-verified"
        method = "method=smime; " if result.kind == Kind.SMIME else ""
        return f'{verb}; {method}reason="{_quote(result.error)}"'
    parts = ["decrypted" if result.decrypted else "signed"]
    if result.kind == Kind.SMIME:
        parts.append("method=smime")
    if result.decrypted_with:
        parts.append(f"key={result.decrypted_with}")
    parts += _signature_parts(result.signatures)
    if result.protected_headers:
        parts.append("headers=protected")
    return "; ".join(parts)


def _is_encrypted(result: Unwrapped) -> bool:
    if result.kind == Kind.SMIME:
        # A signed S/MIME message that failed is "not-verified"; only those are signed.
        return smime.classify(parse_entity(result.message)) not in _SIGNED
    return result.kind in (Kind.PGP_ENCRYPTED, Kind.INLINE_ENCRYPTED)


def _signature_parts(signatures: tuple[SignatureResult, ...]) -> list[str]:
    if not signatures:
        return ["signature=none"]
    best = next((s for s in signatures if s.valid), signatures[0])
    parts = [f"signature={best.status}"]
    if best.fingerprint:
        parts.append(f"signer={best.fingerprint}")
    return parts


def _quote(text: str) -> str:
    flat = re.sub(r"[\r\n\t]+", " ", text).replace("\\", "\\\\").replace('"', '\\"')
    return flat.encode("ascii", "replace").decode()[:300]


def add_header(raw: bytes, name: str, value: str) -> bytes:
    """Add a header field at the top, folded at '; ' to stay under 78 columns."""
    words = value.split("; ")
    lines, current = [], f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + len(word) + 2 > 76:
            lines.append(current + ";")
            current = f" {word}"
        else:
            current += f"; {word}"
    lines.append(current)
    return "\r\n".join(lines).encode("ascii", "replace") + CRLF + raw


# --------------------------------------------------------------------------- Autocrypt


class AutocryptPeers:
    """Per peer address (the Level 1 "peers" table, in part): `autocrypt_timestamp`, the
    effective date of the youngest message whose Autocrypt header was taken, and a digest
    of that header's key, so the same key met again (every mail of a sender carries it)
    costs no OpenPGP work. In memory, bounded, shared by the relay's threads; after a
    restart every header counts as new again."""

    def __init__(self, limit: int = 10_000) -> None:
        self._peers: OrderedDict[str, tuple[datetime, bytes]] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def outdated(self, addr: str, effective: datetime) -> bool:
        """Is this message older than the youngest Autocrypt header already taken?"""
        with self._lock:
            known = self._peers.get(addr)
        return known is not None and effective < known[0]

    def known_key(self, addr: str, keydata: bytes) -> bool:
        with self._lock:
            known = self._peers.get(addr)
        return known is not None and known[1] == hashlib.sha256(keydata).digest()

    def record(self, addr: str, effective: datetime, keydata: bytes) -> None:
        with self._lock:
            known = self._peers.get(addr)
            if known is None or effective >= known[0]:
                self._peers[addr] = (effective, hashlib.sha256(keydata).digest())
            self._peers.move_to_end(addr)
            if len(self._peers) > self._limit:
                self._peers.popitem(last=False)


class SeenKeys:
    """(address, key) pairs already offered to the key store: every mail of a sender
    carries the same Autocrypt key, and importing it again (parsing, merging, a
    transaction) cost more than decrypting the message. Bounded, shared by threads."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def known(self, addr: str, keydata: bytes) -> bool:
        pair = (addr, hashlib.sha256(keydata).digest())
        with self._lock:
            if pair in self._seen:
                self._seen.move_to_end(pair)
                return True
        return False

    def remember(self, addr: str, keydata: bytes) -> None:
        """After the import: a thread that skips it then finds the key in the store."""
        with self._lock:
            self._seen[(addr, hashlib.sha256(keydata).digest())] = None
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)


def _import_once(
    store: KeyStore, keydata: bytes, addr: str, source: str, seen: SeenKeys | None
) -> int | None:
    """_import_for, skipped for a key already offered for this address."""
    if seen is not None and seen.known(addr, keydata):
        return 0
    learned = _import_for(store, keydata, addr, source)
    if seen is not None:
        seen.remember(addr, keydata)
    return learned


def learn_autocrypt(
    store: KeyStore,
    raw: bytes,
    source: str,
    gossip: bool = False,
    peers: AutocryptPeers | None = None,
    seen: SeenKeys | None = None,
) -> int:
    """Import keys from Autocrypt (or Autocrypt-Gossip) headers of a message or of just
    its header block; returns how many were new or updated.

    Level 1 rules: auto-replies, reports and mail with several From addresses are
    ignored; a header is valid when it is at most 10 KiB, has no unknown critical
    attribute and its addr is the From address; exactly one valid header is taken
    (several: all discarded). With `peers`, a message older than the youngest header
    already taken from that sender changes nothing, nor does a key taken before. With
    `seen`, a key already offered for an address is not imported again.
    Gossip: each addr must be a recipient (To, Cc, Reply-To) and the key must carry it."""
    header, _sep, _body = split_header_body(raw)
    if b"autocrypt" not in header.lower():  # most mail: no parsing at all
        return 0
    entity = parse_entity(header + CRLF)
    if gossip:
        return _learn_gossip(store, entity, source, seen)
    sender = _from_address(entity)
    if sender is None or _ignored_for_autocrypt(entity):
        return 0
    valid = [parsed for parsed in _autocrypt_headers(entity, "Autocrypt") if parsed[0] == sender]
    if len(valid) != 1:
        return 0  # none, or ambiguous: Level 1 ignores all of them
    keydata = valid[0][1]
    if peers is None:
        return _import_once(store, keydata, sender, source, seen) or 0
    effective = _effective_date(entity)
    if peers.outdated(sender, effective):
        return 0
    learned = 0 if peers.known_key(sender, keydata) else _import_for(store, keydata, sender, source)
    if learned is not None:
        peers.record(sender, effective, keydata)
    return learned or 0


def _learn_gossip(store: KeyStore, entity: Entity, source: str, seen: SeenKeys | None) -> int:
    recipients = _addresses(entity, "To", "Cc", "Reply-To")
    learned = 0
    for addr, keydata in _autocrypt_headers(entity, "Autocrypt-Gossip"):
        if addr in recipients:
            learned += _import_once(store, keydata, addr, source, seen) or 0
    return learned


def _ignored_for_autocrypt(entity: Entity) -> bool:
    """Auto-replies and reports (RFC 3834, RFC 3798) say nothing about the sender's MUA."""
    submitted = entity.get("Auto-Submitted")
    if submitted is not None and submitted.value.lower().startswith("auto-replied"):
        return True
    return entity.content_type == "multipart/report"


def _autocrypt_headers(entity: Entity, name: str) -> list[tuple[str, bytes]]:
    """(addr, keydata) of each syntactically valid header called name."""
    found = []
    for field in entity.get_all(name):
        parsed = _parse_autocrypt(field.value) if len(field.raw) <= AUTOCRYPT_MAX_HEADER else None
        if parsed is not None:
            found.append(parsed)
    return found


def _effective_date(entity: Entity) -> datetime:
    """The Date header, or now when it is missing, unreadable or in the future."""
    now = datetime.now(UTC)
    field = entity.get("Date")
    try:
        date = email.utils.parsedate_to_datetime(field.value) if field else None
    except (TypeError, ValueError):
        date = None
    if date is None:
        return now
    if date.tzinfo is None:  # "-0000": UTC, local zone unknown (RFC 5322 3.3)
        date = date.replace(tzinfo=UTC)
    return min(date, now)


def _from_address(entity: Entity) -> str | None:
    """The one From address; None when there is none or more than one."""
    fields = entity.get_all("From")
    if len(fields) != 1:
        return None
    found = [a for _name, a in email.utils.getaddresses([fields[0].value]) if "@" in a]
    return normalize_address(found[0]) if len(found) == 1 else None


def _addresses(entity: Entity, *names: str) -> set[str]:
    values = [field.value for name in names for field in entity.get_all(name)]
    return {normalize_address(a) for _name, a in email.utils.getaddresses(values) if "@" in a}


def _parse_autocrypt(value: str) -> tuple[str, bytes] | None:
    attributes: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if not sep:
            return None
        attributes[key.strip().lower()] = val.strip()
    critical = {k for k in attributes if not k.startswith("_")}
    if not {"addr", "keydata"} <= critical or critical - {"addr", "keydata", "prefer-encrypt"}:
        return None
    try:
        keydata = base64.b64decode(re.sub(r"\s+", "", attributes["keydata"]), validate=True)
    except (binascii.Error, ValueError):
        return None
    return normalize_address(attributes["addr"]), keydata


def _import_for(store: KeyStore, keydata: bytes, addr: str, source: str) -> int | None:
    """How many keys were added or updated; None when keydata is not a usable key."""
    try:
        certs = store.engine.parse_certs(keydata)
        if (
            len(certs) != 1
            or certs[0].has_secret
            or addr not in {normalize_address(e) for e in certs[0].emails}
        ):
            return None
        outcomes = store.import_keys(store.engine.public_only(certs[0].data), source)
    except CryptoError as exc:
        log.info("ignored an unusable Autocrypt key for %s: %s", addr, exc)
        return None
    if all(o.action == "skipped" for o in outcomes):
        return None
    return sum(o.action in ("added", "updated") for o in outcomes)
