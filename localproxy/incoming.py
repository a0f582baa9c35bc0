"""What the IMAP relay shows for a stored message, and what it stores for APPEND.

The transformer receives a stored message that may be encrypted, signed or
carry a forged status header, and returns the bytes the client sees: forged
``X-LocalProxy-*`` headers removed, the message decrypted and verified when
it is whole-message OpenPGP, and exactly one ``X-LocalProxy-Security``
header saying what was done, or why it could not be. Autocrypt headers teach
the key store about correspondents.

The APPEND side encrypts copies saved to Sent and Drafts to the account's own
key, so the provider holds only ciphertext there too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import logging
import re
from collections.abc import Callable
from typing import Any

from localproxy.config import Account, Config, normalize_address
from localproxy.crypto.errors import CryptoError
from localproxy.crypto.openpgp import OpenPGPEngine, SignatureResult
from localproxy.crypto.pgpmime import (
    Kind,
    Unwrapped,
    classify,
    encrypt_message,
    strip_headers,
    unwrap,
)
from localproxy.keys.store import KeyStore
from localproxy.mime import CRLF, parse_entity, split_header_body

log = logging.getLogger(__name__)

STATUS_HEADER = "X-LocalProxy-Security"
EventSink = Callable[[str, dict[str, Any]], None]


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
        self.on_event = on_event or (lambda kind, data: None)

    # ----------------------------------------------------------------------- FETCH view

    async def transform(self, raw: bytes, context: object = None) -> bytes:
        return await asyncio.to_thread(self.view_of, raw)

    def view_of(self, raw: bytes) -> bytes:
        stored = strip_headers(raw)
        if self.autocrypt:  # before verifying, so a new correspondent's first mail verifies
            learn_autocrypt(self.store, stored, "autocrypt")
        secret_keys = [secret for _stored, secret in self.store.own_keys(self.account.name)]
        result = unwrap(
            stored, self.engine, secret_keys, self.store.certs_for_ids, max_output=self.max_output
        )
        if self.autocrypt and result.decrypted:
            learn_autocrypt(self.store, result.message, "autocrypt-gossip", gossip=True)
        self._count(result)
        status = status_value(result)
        return add_header(result.message, STATUS_HEADER, status) if status else result.message

    def _count(self, result: Unwrapped) -> None:
        if result.kind == Kind.PLAIN:
            return
        if result.error:
            self.on_event("received-failed", {"kind": str(result.kind), "error": result.error})
        elif result.decrypted:
            self.on_event("received-decrypted", {"kind": str(result.kind)})
        if any(s.valid for s in result.signatures):
            self.on_event("received-verified", {"kind": str(result.kind)})

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
            raise CryptoError(
                f"account {self.account.name!r} has no usable own key to encrypt "
                "Sent/Drafts copies (`localproxy keys generate "
                f"{self.account.name}`)"
            )
        return encrypt_message(strip_headers(raw), self.engine, own)


# --------------------------------------------------------------------------- status header


def status_value(result: Unwrapped) -> str | None:
    """One line saying what localproxy did; None for plain mail (nothing to say)."""
    if result.kind == Kind.PLAIN:
        return None
    if result.error:
        verb = "not-decrypted" if _is_encrypted(result.kind) else "not-verified"
        return f'{verb}; reason="{_quote(result.error)}"'
    parts = ["decrypted" if result.decrypted else "signed"]
    if result.decrypted_with:
        parts.append(f"key={result.decrypted_with}")
    parts += _signature_parts(result.signatures)
    if result.protected_headers:
        parts.append("headers=protected")
    return "; ".join(parts)


def _is_encrypted(kind: Kind) -> bool:
    return kind in (Kind.PGP_ENCRYPTED, Kind.INLINE_ENCRYPTED, Kind.SMIME)


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


def learn_autocrypt(store: KeyStore, raw: bytes, source: str, gossip: bool = False) -> int:
    """Import keys from Autocrypt (or Autocrypt-Gossip) headers; returns how many were new
    or updated. Level 1 rules: addr must be the From address (gossip: any addr, but the
    key must carry it), unknown critical attributes make a header invalid."""
    header, _sep, _body = split_header_body(raw)
    entity = parse_entity(header + CRLF)
    sender = _from_address(entity)
    name = "Autocrypt-Gossip" if gossip else "Autocrypt"
    fields = entity.get_all(name)
    if not gossip and len(fields) != 1:
        return 0  # none, or ambiguous: Level 1 ignores all of them
    learned = 0
    for field in fields:
        parsed = _parse_autocrypt(field.value)
        if parsed is None:
            continue
        addr, keydata = parsed
        if not gossip and addr != sender:
            continue
        learned += _import_for(store, keydata, addr, source)
    return learned


def _from_address(entity) -> str | None:
    field = entity.get("From")
    address = email.utils.parseaddr(field.value)[1] if field else ""
    return normalize_address(address) if "@" in address else None


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


def _import_for(store: KeyStore, keydata: bytes, addr: str, source: str) -> int:
    try:
        certs = store.engine.parse_certs(keydata)
        if (
            len(certs) != 1
            or certs[0].has_secret
            or addr not in {normalize_address(e) for e in certs[0].emails}
        ):
            return 0
        outcomes = store.import_keys(store.engine.public_only(certs[0].data), source)
    except CryptoError as exc:
        log.info("ignored an unusable Autocrypt key for %s: %s", addr, exc)
        return 0
    return sum(o.action in ("added", "updated") for o in outcomes)
