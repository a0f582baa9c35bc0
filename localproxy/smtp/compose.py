"""Turn one submitted message into the copies that go upstream (no I/O).

- To/Cc recipients with a usable key: one copy encrypted to all of them and to
  the sender's own key (so the Sent copy stays readable).
- Bcc recipients (envelope recipients not in To/Cc) with a key: one copy each,
  so no recipient's key id is revealed to another.
- S/MIME (RFC 8551): recipients with a valid certificate and no usable OpenPGP key
  (or whose rule says method = "smime") get their own copies in the same way:
  signed with the account's S/MIME identity (SHA-256), then enveloped
  (AES-256-CBC) to them and to the sender's own certificate.
- Recipients without a key: one plain copy (signed if policy says "always").
- Mail the client already encrypted or signed passes through untouched.
All copies keep the same Message-ID and headers; no copy carries a Bcc header.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509

from localproxy.config import Account, Policy, normalize_address
from localproxy.crypto import smime
from localproxy.crypto.openpgp import OpenPGPEngine
from localproxy.crypto.pgpmime import (
    Kind,
    classify,
    encrypt_entity,
    seven_bit_entity,
    sign_entity,
)
from localproxy.keys.store import KeyStore, load_trust_roots
from localproxy.mime import (
    CRLF,
    Entity,
    Header,
    entity_with_body,
    header_field,
    is_content_header,
    locate_body,
    parse_entity,
    parse_headers,
    split_header_body,
    to_crlf,
)
from localproxy.secretbox import SecretBoxError

AUTOCRYPT_MAX = 10 * 1024  # Autocrypt Level 1: the header must stay below 10 KiB


class PolicyRefusal(Exception):
    """Policy forbids sending this message as it is; str() is the SMTP reply text."""


@dataclass(frozen=True)
class Copy:
    recipients: tuple[str, ...]
    message: bytes | bytearray  # an encrypted copy is built in place (see pgpmime)
    kind: str  # "encrypted", "signed", "plain" or "passthrough"


@dataclass
class Sender:
    """The account's own key, when the From address is the account's."""

    address: str | None
    secret: bytes | None = None
    public: bytes | None = None
    smime: smime.SmimeIdentity | None = None
    locked: str | None = None  # why the account's own keys cannot be unlocked


@dataclass
class _Plan:
    main: list[tuple[str, bytes]] = field(default_factory=list)  # To/Cc with keys
    bcc: list[tuple[str, bytes]] = field(default_factory=list)
    smime_main: list[tuple[str, x509.Certificate]] = field(default_factory=list)
    smime_bcc: list[tuple[str, x509.Certificate]] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)
    sign_encrypted: bool = False
    sign_plain: bool = False

    def needs_own_keys(self) -> bool:
        """Whether any copy is encrypted or must be signed."""
        encrypted = self.main or self.bcc or self.smime_main or self.smime_bcc
        return bool(encrypted) or (self.sign_plain and bool(self.plain))


def refusal_for_recipient(
    recipient: str, account: Account, policy: Policy, store: KeyStore
) -> str | None:
    """At RCPT time: the 550 text when policy demands encryption but no key is usable."""
    encrypt, _sign = policy.decide(recipient, account.policy)
    if encrypt != "always" or _recipient_key(recipient, account, policy, store) is not None:
        return None
    return (
        f"550 5.7.1 <{recipient}>: policy requires encryption to this recipient, but no "
        "usable key is known (add one with `localproxy keys import FILE`)"
    )


def compose(
    raw: bytes,
    recipients: Sequence[str],
    *,
    account: Account,
    policy: Policy,
    store: KeyStore,
    engine: OpenPGPEngine,
) -> list[Copy]:
    """The copies to send, first copy first. Raises PolicyRefusal."""
    entity = prepared_entity(to_crlf(raw), account.addresses[0].rpartition("@")[2])
    if classify(entity) != Kind.PLAIN:
        return [Copy(tuple(recipients), entity.raw, "passthrough")]
    sender = own_sender(entity, account, store)
    plan = _plan(entity, recipients, account, policy, store)
    if sender.locked and plan.needs_own_keys():
        # Encrypted copies are signed (and readable in Sent) only with the own keys; a
        # plain copy that policy allows anyway still goes out.
        raise PolicyRefusal(
            f"451 4.7.0 localproxy: the account's own keys cannot be unlocked "
            f"({sender.locked}); nothing was sent"
        )
    if sender.public is not None and policy.setting("autocrypt", account.policy):
        entity = autocrypt_entity(entity, sender, policy.setting("prefer_encrypt", account.policy))
    return _build(entity, plan, sender, engine) + _build_smime(entity, plan, sender)


def _recipient_key(
    recipient: str, account: Account, policy: Policy, store: KeyStore
) -> bytes | x509.Certificate | None:
    """The OpenPGP certificate (bytes) or S/MIME certificate to encrypt to, per the
    recipient's method rule; without one, OpenPGP first."""
    method = policy.method(recipient, account.policy)
    if method != "smime":
        stored = store.encryption_cert(recipient)
        if stored is not None:
            return stored.info.data
    if method != "openpgp" and store.x509_certs(recipient):  # roots only when needed
        roots = load_trust_roots(policy.smime_ca_file)
        found = store.smime_cert(recipient, roots)
        if found is not None:
            return found.cert
    return None


def _plan(
    entity, recipients: Sequence[str], account: Account, policy: Policy, store: KeyStore
) -> _Plan:
    visible = _visible_recipients(entity)
    plan = _Plan()
    for recipient in recipients:
        encrypt, sign = policy.decide(recipient, account.policy)
        key = _recipient_key(recipient, account, policy, store) if encrypt != "never" else None
        if key is None:
            if encrypt == "always":
                raise PolicyRefusal(
                    f"554 5.7.1 <{recipient}>: policy requires encryption, but "
                    "no usable key is known any more; nothing was sent"
                )
            plan.plain.append(recipient)
            plan.sign_plain |= sign == "always"
            continue
        shown = normalize_address(recipient) in visible
        if isinstance(key, x509.Certificate):
            (plan.smime_main if shown else plan.smime_bcc).append((recipient, key))
        else:
            (plan.main if shown else plan.bcc).append((recipient, key))
        plan.sign_encrypted |= sign != "never"
    return plan


def _visible_recipients(entity) -> set[str]:
    fields = [h.value for name in ("To", "Cc") for h in entity.get_all(name)]
    return {normalize_address(addr) for _name, addr in email.utils.getaddresses(fields) if addr}


def _build(entity: Entity, plan: _Plan, sender: Sender, engine: OpenPGPEngine) -> list[Copy]:
    own = [sender.public] if sender.public else []
    signer = sender.secret if plan.sign_encrypted else None
    copies = []
    if plan.main:
        keys = [key for _r, key in plan.main] + own
        copies.append(
            Copy(
                tuple(r for r, _k in plan.main),
                encrypt_entity(entity, engine, keys, signer=signer),
                "encrypted",
            )
        )
    if plan.plain:
        if plan.sign_plain and sender.secret:
            copies.append(
                Copy(tuple(plan.plain), sign_entity(entity, engine, sender.secret), "signed")
            )
        elif plan.sign_plain and sender.smime:
            copies.append(Copy(tuple(plan.plain), smime_signed(entity, sender.smime), "signed"))
        else:
            copies.append(Copy(tuple(plan.plain), entity.raw, "plain"))
    for recipient, key in plan.bcc:
        message = encrypt_entity(entity, engine, [key, *own], signer=signer)
        copies.append(Copy((recipient,), message, "encrypted"))
    return copies


def _build_smime(entity: Entity, plan: _Plan, sender: Sender) -> list[Copy]:
    """One S/MIME copy for To/Cc, one per Bcc recipient (a recipient info names the
    certificate, so a shared copy would reveal Bcc recipients)."""
    signer = sender.smime if plan.sign_encrypted else None
    own = [sender.smime.cert] if sender.smime else []
    groups = [plan.smime_main] if plan.smime_main else []
    groups += [[pair] for pair in plan.smime_bcc]
    copies = []
    for group in groups:
        certs = [cert for _r, cert in group] + own
        message = smime_encrypted(entity, certs, signer)
        copies.append(Copy(tuple(r for r, _c in group), message, "encrypted"))
    return copies


def smime_encrypted(
    entity: Entity, recipients: Sequence[x509.Certificate], signer: smime.SmimeIdentity | None
) -> bytes:
    """The message as application/pkcs7-mime enveloped-data, signed inside (detached,
    multipart/signed) when a signer is given. The outer header is the client's minus
    its content fields: the Subject stays readable, as S/MIME clients expect."""
    inner = _content_entity(entity)
    if signer is not None:
        inner = smime.sign(seven_bit_entity(entity), signer.cert, signer.key, signer.chain)
    return _outer_header(entity) + smime.encrypt(inner, recipients)


def smime_signed(entity: Entity, signer: smime.SmimeIdentity) -> bytes:
    """The message as S/MIME multipart/signed (SHA-256, detached)."""
    signed = smime.sign(seven_bit_entity(entity), signer.cert, signer.key, signer.chain)
    return _outer_header(entity) + signed


def _content_entity(entity: Entity) -> bytes:
    content = [h.raw for h in entity.headers if is_content_header(h)]
    return b"".join(content) + CRLF + bytes(entity.body_view)


def _outer_header(entity: Entity) -> bytes:
    kept = [
        h.raw
        for h in entity.headers
        if not is_content_header(h) and h.name.lower() not in ("mime-version", "bcc")
    ]
    return b"".join(kept) + header_field("MIME-Version", "1.0")


# --------------------------------------------------------------------------- headers


def prepare_headers(raw: bytes, default_domain: str = "localhost") -> bytes:
    """Drop Bcc; add Message-ID and Date when missing so every copy shares them.

    The Message-ID's domain is From's, else the account's: never the machine's own
    name (socket.getfqdn() would tell every recipient, and can stall on DNS).
    """
    fields, sep, body = header_section(raw)
    return _prepared_header(fields, default_domain) + (sep or CRLF) + body


def _prepared_header(fields: list[Header], default_domain: str) -> bytes:
    fields = [h for h in fields if h.name.lower() != "bcc"]
    names = {h.name.lower() for h in fields}
    extra = b""
    if "message-id" not in names:
        domain = _from_domain(fields) or default_domain
        extra += header_field("Message-ID", f"<{secrets.token_hex(16)}@{domain}>")
    if "date" not in names:
        extra += header_field("Date", email.utils.formatdate(localtime=True))
    return b"".join(h.raw for h in fields) + extra


def prepared_entity(raw: bytes, default_domain: str = "localhost") -> Entity:
    """parse_entity(prepare_headers(raw)), with the body left in place in raw: the
    message is parsed once, and a large one is not copied for new header lines."""
    header_end, sep, body_start = locate_body(raw)
    fields = parse_headers(raw[:header_end])
    header = _prepared_header(fields, default_domain)
    if any(not h.name for h in fields) or not header.endswith(CRLF) or sep == b"\n":
        # Lines that are no header field move to the body (header_section), a last
        # field without line end, bare LF: rare, so the exact slow path.
        return parse_entity(prepare_headers(raw, default_domain))
    return entity_with_body(header, CRLF, raw, body_start)


def header_section(raw: bytes) -> tuple[list[Header], bytes, bytes]:
    """(header fields, blank line, body), where the first line that is no header field
    starts the body, as in Postfix.

    Without this, such a line (and with no blank line, the whole body) would be
    kept as a "header" and copied to the unencrypted outer header of an encrypted
    copy: plaintext in clear.
    """
    header, sep, body = split_header_body(raw)
    fields = parse_headers(header)
    first_bad = next((i for i, h in enumerate(fields) if not h.name), None)
    if first_bad is None:
        return fields, sep, body
    rest = b"".join(h.raw for h in fields[first_bad:])
    return fields[:first_bad], CRLF, rest + sep + body


def _from_domain(fields) -> str | None:
    value = next((h.value for h in fields if h.name.lower() == "from"), "")
    address = email.utils.parseaddr(value)[1]
    return address.rpartition("@")[2] or None


def own_sender(entity, account: Account, store: KeyStore) -> Sender:
    """The account's key if From is one of its addresses; never sign as someone else."""
    from_field = entity.get("From")
    address = email.utils.parseaddr(from_field.value)[1] if from_field else ""
    if not address or normalize_address(address) not in account.addresses:
        return Sender(address or None)
    try:
        identity = own_identity(store, account.name, address)
        own = store.own_keys(account.name)
    except SecretBoxError as exc:
        return Sender(normalize_address(address), locked=str(exc))
    usable = [
        (stored, secret)
        for stored, secret in own
        if stored.info.can_sign and stored.info.can_encrypt
    ]
    if not usable:
        return Sender(normalize_address(address), smime=identity)
    stored, secret = max(usable, key=lambda pair: pair[0].info.created)
    return Sender(normalize_address(address), secret, stored.info.data, identity)


def own_identity(store: KeyStore, account: str, address: str) -> smime.SmimeIdentity | None:
    """The account's newest S/MIME identity that can sign and encrypt for this address
    (a certificate for another address would fail every recipient's e-mail check)."""
    wanted = normalize_address(address)
    for identity in store.smime_identities(account):
        info = smime.cert_info(identity.cert)
        current = info.not_before <= datetime.now(UTC) < info.not_after
        if wanted in info.emails and info.can_sign and info.can_encrypt and current:
            return identity
    return None


def add_autocrypt(raw: bytes, sender: Sender, prefer_encrypt: bool) -> bytes:
    """Autocrypt Level 1 header (keydata last), replacing one the client set."""
    field_bytes = autocrypt_field(sender, prefer_encrypt)
    if field_bytes is None:
        return raw
    header, sep, body = split_header_body(raw)
    return _with_autocrypt(header, field_bytes) + sep + body


def autocrypt_entity(entity: Entity, sender: Sender, prefer_encrypt: bool) -> Entity:
    """add_autocrypt() on a parsed message, its body and parts left as they are."""
    field_bytes = autocrypt_field(sender, prefer_encrypt)
    if field_bytes is None:
        return entity
    header = _with_autocrypt(entity.header, field_bytes)
    return Entity(header, entity.separator, entity.body_view, parse_headers(header), entity.parts)


def _with_autocrypt(header: bytes, field_bytes: bytes) -> bytes:
    kept = [h.raw for h in parse_headers(header) if h.name.lower() != "autocrypt"]
    return b"".join(kept) + field_bytes


@functools.lru_cache(maxsize=16)
def _autocrypt_field(address: str, public: bytes, prefer_encrypt: bool) -> bytes | None:
    keydata = base64.b64encode(public).decode()
    value = f"addr={address}; " + ("prefer-encrypt=mutual; " if prefer_encrypt else "")
    folded = "\r\n ".join(keydata[i : i + 72] for i in range(0, len(keydata), 72))
    field_bytes = f"Autocrypt: {value}keydata=\r\n {folded}\r\n".encode()
    return None if len(field_bytes) > AUTOCRYPT_MAX else field_bytes


def autocrypt_field(sender: Sender, prefer_encrypt: bool) -> bytes | None:
    """The header field, None when too big; cached, as it is the same for every message."""
    assert sender.public is not None and sender.address is not None
    return _autocrypt_field(sender.address, sender.public, prefer_encrypt)
