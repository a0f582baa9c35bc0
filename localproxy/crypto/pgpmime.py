"""PGP/MIME (RFC 3156) and inline PGP: build and unwrap whole messages.

Building never re-renders content: the signed or encrypted entity is the
client's own bytes with canonical CRLF line endings (and, for multipart/signed
only, 8-bit leaves re-encoded as quoted-printable, as RFC 3156 section 5
requires). Unwrapping follows the EFAIL lessons: only a message whose
top-level entity is the encrypted object is decrypted, and plaintext that
failed its integrity check is never released (the engine refuses it).
"""

from __future__ import annotations

import quopri
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from localproxy.crypto.errors import CryptoError, MalformedData
from localproxy.crypto.openpgp import DecryptResult, OpenPGPEngine, SignatureResult
from localproxy.mime import (
    CRLF,
    Entity,
    Header,
    header_field,
    is_7bit_safe,
    is_content_header,
    parse_entity,
    parse_headers,
    replace_parts,
    split_header_body,
    to_crlf,
)

PROTECTED_SUBJECT = "[...]"
# Header fields that describe the message's structure, not its meaning.
_STRUCTURAL = {"mime-version", "bcc"}
# RFC 9788 hcp_baseline: obscure Subject, drop these outside.
_DROPPED_OUTSIDE = {"keywords", "comments"}
STATUS_HEADER_PREFIX = "x-localproxy-"

_ARMORED_MESSAGE = re.compile(
    rb"\A\s*(-----BEGIN PGP MESSAGE-----\r?\n.*?-----END PGP MESSAGE-----)\s*\Z", re.S
)
_CLEARSIGNED = re.compile(
    rb"\A\s*(-----BEGIN PGP SIGNED MESSAGE-----\r?\n.*?-----END PGP SIGNATURE-----)\s*\Z", re.S
)


class Kind(StrEnum):
    """What protection a message's top-level entity carries."""

    PGP_ENCRYPTED = "pgp-mime-encrypted"
    PGP_SIGNED = "pgp-mime-signed"
    INLINE_ENCRYPTED = "inline-pgp-encrypted"
    INLINE_SIGNED = "inline-pgp-signed"
    SMIME = "smime"
    PLAIN = "plain"


@dataclass
class Unwrapped:
    """A message as the reader should see it, with what was verified."""

    kind: Kind
    message: bytes  # the decrypted view, or the original bytes when nothing was undone
    decrypted: bool = False
    decrypted_with: str | None = None
    signatures: tuple[SignatureResult, ...] = ()
    error: str | None = None  # why it could not be decrypted or verified
    protected_headers: bool = False
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- classify


def classify(message: Entity) -> Kind:
    """Only the top-level entity counts (EFAIL: never splice nested ciphertext)."""
    ctype, params = message.content_type, message.params
    protocol = params.get("protocol", "").lower()
    if ctype == "multipart/encrypted" and protocol == "application/pgp-encrypted":
        return Kind.PGP_ENCRYPTED
    if ctype == "multipart/signed" and protocol == "application/pgp-signature":
        return Kind.PGP_SIGNED
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") or (
        ctype == "multipart/signed" and "pkcs7-signature" in protocol
    ):
        return Kind.SMIME
    if ctype == "text/plain":
        body = _decoded_body(message)
        if body is not None and _ARMORED_MESSAGE.match(body):
            return Kind.INLINE_ENCRYPTED
        if body is not None and _CLEARSIGNED.match(body):
            return Kind.INLINE_SIGNED
    return Kind.PLAIN


def _decoded_body(entity: Entity) -> bytes | None:
    cte = entity.transfer_encoding
    if cte in ("7bit", "8bit", "binary"):
        return entity.body
    if cte == "quoted-printable":
        return quopri.decodestring(entity.body)
    if cte == "base64":
        import base64
        import binascii

        try:
            return base64.b64decode(entity.body)
        except (binascii.Error, ValueError):
            return None
    return None


# --------------------------------------------------------------------------- build


def encrypt_message(
    raw: bytes,
    engine: OpenPGPEngine,
    recipients: Sequence[bytes],
    signer: bytes | None = None,
    protect_headers: bool = True,
) -> bytearray:
    """RFC 3156 multipart/encrypted of a whole message, signed inside when signer is given."""
    return encrypt_entity(parse_entity(to_crlf(raw)), engine, recipients, signer, protect_headers)


def encrypt_entity(
    message: Entity,
    engine: OpenPGPEngine,
    recipients: Sequence[bytes],
    signer: bytes | None = None,
    protect_headers: bool = True,
) -> bytearray:
    """encrypt_message() of a message parsed already (with CRLF line endings).

    Built in one buffer around the engine's armor: a large message is then held once
    in plaintext (the client's) and once encrypted, not in a copy per step."""
    outer_fields = [
        h for h in message.headers if not is_content_header(h) and h.name.lower() not in _STRUCTURAL
    ]
    boundary = _boundary()
    head = b"".join(
        [
            *(h.raw for h in _outer_fields(outer_fields, protect_headers)),
            header_field("MIME-Version", "1.0"),
            header_field(
                "Content-Type",
                f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"',
            ),
            CRLF,
            b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n",
            f"--{boundary}\r\n".encode(),
            b"Content-Type: application/pgp-encrypted\r\n",
            b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n",
            f"--{boundary}\r\n".encode(),
            b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n',
            b"Content-Description: OpenPGP encrypted message\r\n",
            b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n',
        ]
    )
    inner = _inner_entity(message, outer_fields, protect_headers)
    built = engine.encrypt_armored(inner, recipients, signer=signer, prefix=head)
    while built[-1:] in (b"\r", b"\n"):  # the armor's own line end: one CRLF follows
        del built[-1:]
    built += CRLF + f"--{boundary}--\r\n".encode()
    return built


def _without_final_newlines(data: bytes) -> memoryview:
    """data.rstrip(CRLF) as a view, without a copy."""
    end = len(data)
    while end and data[end - 1] in (0x0D, 0x0A):
        end -= 1
    return memoryview(data)[:end]


def _inner_entity(
    message: Entity, outer_fields: list[Header], protect: bool
) -> list[bytes | memoryview]:
    """The entity that gets encrypted, in pieces (the body is the client's, not a copy):
    the client's content, headers copied in when protected."""
    content = [h for h in message.headers if is_content_header(h)]
    if not protect:
        return [*(h.raw for h in content), CRLF, message.body_view]
    ctype = message.get("Content-Type")
    marked = _with_hp_params(
        ctype.raw if ctype else b"Content-Type: text/plain; charset=us-ascii\r\n"
    )
    others = [h.raw for h in content if h.name.lower() != "content-type"]
    copies = [
        _ensure_crlf(h.raw)
        for h in outer_fields
        if not h.name.lower().startswith(STATUS_HEADER_PREFIX)
    ]
    hp_outer = [b"HP-Outer: " + _ensure_crlf(h.raw) for h in _outer_fields(outer_fields, True)]
    return [marked, *others, *copies, *hp_outer, CRLF, message.body_view]


def _with_hp_params(content_type_field: bytes) -> bytes:
    value = content_type_field.rstrip(b"\r\n")
    return value + b'; protected-headers="v1"; hp="cipher"' + CRLF


def _outer_fields(fields: list[Header], protect: bool) -> list[Header]:
    if not protect:
        return fields
    kept = []
    for h in fields:
        name = h.name.lower()
        if name in _DROPPED_OUTSIDE:
            continue
        if name == "subject":
            h = Header(h.name, f"{h.name}: {PROTECTED_SUBJECT}".encode() + CRLF)
        kept.append(h)
    return kept


def _ensure_crlf(raw: bytes) -> bytes:
    return raw if raw.endswith(CRLF) else raw.rstrip(b"\r\n") + CRLF


def _boundary() -> str:
    return f"lp-{secrets.token_hex(12)}"


def sign_message(raw: bytes, engine: OpenPGPEngine, signer: bytes) -> bytes:
    """RFC 3156 multipart/signed; the signature covers the exact canonical part bytes."""
    return sign_entity(parse_entity(to_crlf(raw)), engine, signer)


def sign_entity(message: Entity, engine: OpenPGPEngine, signer: bytes) -> bytes:
    """sign_message() of a message parsed already (with CRLF line endings)."""
    outer = [
        h for h in message.headers if not is_content_header(h) and h.name.lower() not in _STRUCTURAL
    ]
    part = seven_bit_entity(message)
    signature = engine.sign_detached(part, signer, armor=True)
    boundary = _boundary()
    return b"".join(
        [
            *(h.raw for h in outer),
            header_field("MIME-Version", "1.0"),
            header_field(
                "Content-Type",
                f"multipart/signed; micalg={engine.micalg(signature)}; "
                f'protocol="application/pgp-signature"; boundary="{boundary}"',
            ),
            CRLF,
            b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)\r\n",
            f"--{boundary}\r\n".encode(),
            part,
            CRLF,
            f"--{boundary}\r\n".encode(),
            b'Content-Type: application/pgp-signature; name="signature.asc"\r\n',
            b"Content-Description: OpenPGP digital signature\r\n",
            b'Content-Disposition: attachment; filename="signature.asc"\r\n\r\n',
            _without_final_newlines(to_crlf(signature)),
            CRLF,
            f"--{boundary}--\r\n".encode(),
        ]
    )


def seven_bit_entity(message: Entity) -> bytes:
    """The message's content entity, each 8-bit leaf re-encoded quoted-printable.

    RFC 3156 section 5: signed data must be 7-bit so no relay can alter it.
    Leaves that are already 7-bit keep their exact bytes.
    """
    content = [h for h in message.headers if is_content_header(h)]
    entity = Entity(
        b"".join(h.raw for h in content), CRLF, message.body_view, content, message.parts
    )
    return _seven_bit(entity)


def _seven_bit(entity: Entity) -> bytes:
    if entity.parts:
        return replace_parts(entity, {i: _seven_bit(p) for i, p in enumerate(entity.parts)})
    if is_7bit_safe(entity.body) and entity.transfer_encoding in (
        "7bit",
        "quoted-printable",
        "base64",
    ):
        return entity.raw
    encoded = quopri.encodestring(entity.body.replace(CRLF, b"\n"), quotetabs=False)
    encoded = re.sub(rb"^From ", b"=46rom ", encoded, flags=re.M)
    fields = [h.raw for h in entity.headers if h.name.lower() != "content-transfer-encoding"]
    header = b"".join(fields) + header_field("Content-Transfer-Encoding", "quoted-printable")
    return header + CRLF + to_crlf(encoded)


# --------------------------------------------------------------------------- unwrap


def unwrap(
    raw: bytes,
    engine: OpenPGPEngine,
    secret_keys: Sequence[bytes],
    verify_certs: Sequence[bytes] = (),
    max_output: int | None = None,
    *,
    parsed: Entity | None = None,
) -> Unwrapped:
    """Decrypt and/or verify a whole message. Never raises for bad mail: the reason is in
    .error and .message is then the original bytes. `parsed`: parse_entity(raw), when
    the caller has it already."""
    message = parsed if parsed is not None else parse_entity(raw)
    kind = classify(message)
    try:
        if kind == Kind.PGP_ENCRYPTED:
            return _unwrap_pgp_mime(message, raw, engine, secret_keys, verify_certs, max_output)
        if kind == Kind.INLINE_ENCRYPTED:
            return _unwrap_inline(message, raw, engine, secret_keys, verify_certs, max_output)
        if kind == Kind.PGP_SIGNED:
            return _verify_pgp_mime(message, raw, engine, verify_certs)
        if kind == Kind.INLINE_SIGNED:
            return _verify_inline(message, raw, engine, verify_certs)
    except CryptoError as exc:
        return Unwrapped(kind, raw, error=str(exc))
    return Unwrapped(kind, raw)


def _unwrap_pgp_mime(
    message: Entity,
    raw: bytes,
    engine: OpenPGPEngine,
    secret_keys: Sequence[bytes],
    verify_certs: Sequence[bytes],
    max_output: int | None,
) -> Unwrapped:
    if len(message.parts) != 2:
        raise MalformedData(f"PGP/MIME message has {len(message.parts)} parts instead of 2")
    control, payload = message.parts
    if control.content_type != "application/pgp-encrypted":
        raise MalformedData("first PGP/MIME part is not application/pgp-encrypted")
    ciphertext = _decoded_body(payload)
    if not ciphertext:
        raise MalformedData("PGP/MIME encrypted part is empty or badly encoded")
    result = engine.decrypt(ciphertext, secret_keys, verify_certs, max_output=max_output)
    inner = parse_entity(to_crlf(result.plaintext))
    view, protected = _view(message, inner)
    return _decrypted(Kind.PGP_ENCRYPTED, view, result, protected)


def _decrypted(kind: Kind, view: bytes, result: DecryptResult, protected: bool) -> Unwrapped:
    return Unwrapped(
        kind,
        view,
        decrypted=True,
        decrypted_with=result.decrypted_with,
        signatures=result.signatures,
        protected_headers=protected,
    )


def _view(outer: Entity, inner: Entity) -> tuple[bytes, bool]:
    """Outer transport headers + the decrypted entity; protected inner headers win."""
    ctype_params = inner.params
    protected = "protected-headers" in ctype_params or "hp" in ctype_params
    inner_content = [h for h in inner.headers if is_content_header(h)]
    inner_fields = [
        h for h in inner.headers if not is_content_header(h) and h.name.lower() != "hp-outer"
    ]
    outer_fields = transport_fields(outer)
    if protected:
        replaced = {h.name.lower() for h in inner_fields}
        outer_fields = [h for h in outer_fields if h.name.lower() not in replaced]
        fields = outer_fields + inner_fields
    else:
        fields = outer_fields
    header = b"".join(_ensure_crlf(h.raw) for h in fields + inner_content)
    return header + CRLF + inner.body, protected


def transport_fields(message: Entity) -> list[Header]:
    """The stored header fields a decrypted view keeps: all but the content fields and
    lines without a field name. Such a line (garbage, or the "\\r\\n" left by splitting
    "X: a\\r\\r\\n") would end the view's header or start its body, and the forgeable
    lines after it would be shown as part of the decrypted, signed content."""
    return [h for h in message.headers if h.name and not is_content_header(h)]


def _unwrap_inline(
    message: Entity,
    raw: bytes,
    engine: OpenPGPEngine,
    secret_keys: Sequence[bytes],
    verify_certs: Sequence[bytes],
    max_output: int | None,
) -> Unwrapped:
    body = _decoded_body(message) or b""
    block = _ARMORED_MESSAGE.match(body)
    assert block is not None  # classify() matched it
    result = engine.decrypt(block.group(1), secret_keys, verify_certs, max_output=max_output)
    text = to_crlf(result.plaintext)
    view = _replace_text_body(message, text, message.params.get("charset", "utf-8"))
    return _decrypted(Kind.INLINE_ENCRYPTED, view, result, False)


def _replace_text_body(message: Entity, text: bytes, charset: str) -> bytes:
    fields = [h.raw for h in transport_fields(message)]
    cte = "7bit" if is_7bit_safe(text) else "8bit"
    content = header_field("Content-Type", f'text/plain; charset="{charset}"') + header_field(
        "Content-Transfer-Encoding", cte
    )
    return b"".join(_ensure_crlf(f) for f in fields) + content + CRLF + text


def _verify_pgp_mime(
    message: Entity, raw: bytes, engine: OpenPGPEngine, verify_certs: Sequence[bytes]
) -> Unwrapped:
    if len(message.parts) != 2:
        raise MalformedData(f"PGP/MIME signed message has {len(message.parts)} parts, not 2")
    signed, signature_part = message.parts
    signature = _decoded_body(signature_part)
    if signature_part.content_type != "application/pgp-signature" or not signature:
        raise MalformedData("second part of a PGP/MIME signed message is not a signature")
    results = engine.verify_detached(to_crlf(signed.raw), signature, verify_certs)
    return Unwrapped(Kind.PGP_SIGNED, raw, signatures=results)


def _verify_inline(
    message: Entity, raw: bytes, engine: OpenPGPEngine, verify_certs: Sequence[bytes]
) -> Unwrapped:
    body = _decoded_body(message) or b""
    block = _CLEARSIGNED.match(body)
    assert block is not None
    _text, results = engine.verify_inline(block.group(1), verify_certs)
    return Unwrapped(Kind.INLINE_SIGNED, raw, signatures=results)


def strip_headers(raw: bytes, prefix: str = STATUS_HEADER_PREFIX) -> bytes:
    """Remove every header field whose name starts with prefix (forged status headers)."""
    header, sep, body = split_header_body(raw)
    kept = [h.raw for h in parse_headers(header) if not h.name.lower().startswith(prefix)]
    return b"".join(kept) + sep + body
