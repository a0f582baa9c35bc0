"""S/MIME (RFC 8551, CMS RFC 5652): identities, certificates, encrypt, sign, decrypt, verify.

Who does what, and why (cryptography 50, asn1crypto 1.5):

* ``cryptography`` loads PKCS#12 and certificates, builds EnvelopedData
  (AES-128/256-CBC, RSA PKCS#1 v1.5 key transport, recipients named by
  issuerAndSerialNumber) and SignedData (signed attributes: contentType,
  signingTime, messageDigest, SMIMECapabilities), decrypts EnvelopedData with
  AES-128/256-CBC, and builds certificate chains (``x509.verification``).
* ``cryptography`` has no CMS signature *verification*, so SignedData is parsed
  with ``asn1crypto.cms`` and checked here: signer lookup, messageDigest, the
  signature over the DER of the signed attributes (re-tagged as SET OF), then the
  chain, key usage and e-mail address of the signer.
* cryptography's verifier has no S/MIME policy: its client verifier demands the
  clientAuth EKU with the Web PKI end-entity profile. We keep the Web PKI profile
  for CAs, permit anything in the end-entity certificate, and check validity,
  e-mail SAN, keyUsage and extendedKeyUsage ourselves, so every refusal has a precise
  reason (:class:`CertProblem`).

Safe defaults (DESIGN.md): EnvelopedData with AES-256-CBC, never AuthEnvelopedData
(Outlook cannot read AES-GCM), SHA-256 signatures. Decryption refuses every content
type but EnvelopedData and returns the plaintext only after the padding check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, NamedTuple, ParamSpec, TypeAlias, TypeVar

from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from localproxy.crypto.errors import (
    BadPassphrase,
    CryptoError,
    DecryptionFailed,
    KeyExpired,
    MalformedData,
    NoUsableKey,
    OutputTooLarge,
)
from localproxy.crypto.openpgp import SignatureResult, SignatureStatus
from localproxy.mime import CRLF, Entity, header_field, parse_entity, to_crlf

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
Purpose: TypeAlias = Literal["encrypt", "sign"]

SMIME_MIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")
SIGNATURE_MIME_TYPES = ("application/pkcs7-signature", "application/x-pkcs7-signature")
DEFAULT_MAX_INPUT = 256 << 20  # CMS larger than this is refused before parsing
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_ANY_EKU = x509.ObjectIdentifier("2.5.29.37.0")
_B64_LINE = 76

# ============================================================================ results


class CertProblem(StrEnum):
    """Why a certificate cannot be used (``CertificateRejected.problem``)."""

    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    UNTRUSTED = "untrusted"  # no chain to a trusted root (unknown root, bad CA)
    EMAIL_MISMATCH = "email-mismatch"
    KEY_USAGE = "key-usage"  # keyUsage or extendedKeyUsage forbid the purpose
    UNSUPPORTED_KEY = "unsupported-key"


class CertificateRejected(NoUsableKey):
    """validate() refused the certificate; ``problem`` says which rule failed."""

    def __init__(self, message: str, problem: CertProblem, fingerprint: str | None = None):
        super().__init__(message, fingerprint)
        self.problem = problem


class CertificateExpired(CertificateRejected, KeyExpired):
    """Expired: also a KeyExpired, like an expired OpenPGP key."""


@dataclass(frozen=True)
class SmimeIdentity:
    """Our own S/MIME identity: private key, certificate and the chain to send along."""

    key: PrivateKey = field(repr=False)
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER; the key store protects it at rest."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)


@dataclass(frozen=True)
class SmimeCertInfo:
    fingerprint: str  # SHA-256 of the DER certificate, upper-case hex
    subject: str  # RFC 4514
    issuer: str
    serial: str  # upper-case hex
    emails: tuple[str, ...]  # SAN rfc822Name, else subject emailAddress; domain lower-cased
    not_before: datetime
    not_after: datetime
    algorithm: str  # e.g. "RSA-2048", "EC-secp256r1"
    can_encrypt: bool  # key usage and EKU allow it (validity and trust are not checked)
    can_sign: bool
    is_ca: bool
    capabilities: tuple[str, ...] = ()  # SMIMECapabilities, when the caller knows them

    @property
    def issuer_serial(self) -> str:
        """How CMS names this certificate (issuerAndSerialNumber), in words."""
        return f"{self.issuer} / serial {self.serial}"


@dataclass(frozen=True)
class SmimeVerifyResult:
    """One signature check, with what the caller needs to collect the certificate."""

    signature: SignatureResult
    signer: x509.Certificate | None = None
    signing_time: datetime | None = None
    capabilities: tuple[str, ...] = ()  # SMIMECapabilities names (RFC 8551 2.5.2)
    certificates: tuple[x509.Certificate, ...] = ()  # every certificate in the message

    @property
    def status(self) -> SignatureStatus:
        return self.signature.status

    @property
    def valid(self) -> bool:
        return self.signature.valid


class Decrypted(NamedTuple):
    plaintext: bytes  # the decrypted MIME entity
    recipient: x509.Certificate  # our certificate whose key opened it


# ============================================================================ errors

P = ParamSpec("P")
R = TypeVar("R")
# What cryptography raises on a malformed certificate, at load time or (extensions are
# parsed lazily, and again on every access) when the extensions are first read.
_CERT_ERRORS = (
    ValueError,
    x509.InvalidVersion,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
# What asn1crypto (lazy parsing) and cryptography's loaders raise on malformed input.
_PARSE_ERRORS = (*_CERT_ERRORS, TypeError, KeyError, IndexError, OverflowError)


def _parse_guard(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn parser exceptions from deep inside asn1crypto into MalformedData."""

    def wrap(func: Callable[P, R]) -> Callable[P, R]:
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return func(*args, **kwargs)
            except CryptoError:
                raise
            except _PARSE_ERRORS as exc:
                raise MalformedData(f"malformed {what}: {exc}") from exc

        guarded.__name__, guarded.__doc__ = func.__name__, func.__doc__
        return guarded

    return wrap


# ============================================================================ certificates


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def issuer_serial(cert: x509.Certificate) -> str:
    return f"{cert.issuer.rfc4514_string()} / serial {cert.serial_number:X}"


def load_pkcs12(data: bytes, passphrase: str | bytes | None) -> SmimeIdentity:
    """Our identity from a PKCS#12 file. BadPassphrase, or MalformedData naming what is missing."""
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    try:
        p12 = pkcs12.load_pkcs12(data, secret or None)
    except ValueError as exc:
        # cryptography says "Invalid password or PKCS12 data": tell the two apart.
        if _looks_like_pkcs12(data):
            raise BadPassphrase("the passphrase does not open this PKCS#12 file") from exc
        raise MalformedData(f"not a PKCS#12 file: {exc}") from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise MalformedData(f"unsupported PKCS#12 file: {exc}") from exc
    if p12.key is None:
        raise MalformedData("the PKCS#12 file holds no private key")
    if p12.cert is None:
        raise MalformedData("the PKCS#12 file holds no certificate for its private key")
    key = p12.key
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise NoUsableKey(f"unsupported private key type {type(key).__name__} (RSA or EC only)")
    cert = p12.cert.certificate
    if not _key_matches(key, cert):
        raise MalformedData("the PKCS#12 certificate does not belong to its private key")
    chain = tuple(c.certificate for c in p12.additional_certs)
    return SmimeIdentity(key, cert, chain)


def _key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    public = _public_key(cert)
    return public is not None and key.public_key().public_bytes(*spki) == public.public_bytes(*spki)  # type: ignore[attr-defined]


def _looks_like_pkcs12(data: bytes) -> bool:
    from asn1crypto import pkcs12 as asn1_pkcs12

    try:
        pfx = asn1_pkcs12.Pfx.load(data)
        return pfx["version"].native == "v3" and pfx["auth_safe"]["content_type"].native == "data"
    except _PARSE_ERRORS:
        return False


def load_private_key(data: bytes, passphrase: str | bytes | None = None) -> PrivateKey:
    """A PEM or DER private key (as SmimeIdentity.key_der stores it)."""
    secret = passphrase.encode() if isinstance(passphrase, str) else passphrase
    loader = (
        serialization.load_pem_private_key
        if data.lstrip().startswith(b"-----")
        else serialization.load_der_private_key
    )
    try:
        key = loader(data, secret)
    except TypeError as exc:
        raise BadPassphrase(f"private key: {exc}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # cryptography cannot tell a wrong passphrase from bad data: guess by whether one was given.
        error = BadPassphrase if secret else MalformedData
        raise error(f"cannot load the private key: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise NoUsableKey(f"unsupported private key type {type(key).__name__}")
    return key


def parse_certificates(data: bytes) -> list[x509.Certificate]:
    """Certificates from PEM (certificates or PKCS#7 blocks), DER, or a DER PKCS#7 bundle."""
    try:
        if b"-----BEGIN" in data:
            return [_readable(c) for c in _parse_pem(data)]
        if data[:1] != b"\x30":
            raise MalformedData("neither PEM nor DER certificate data")
        try:
            return [_readable(x509.load_der_x509_certificate(data))]
        except ValueError:
            return [_readable(c) for c in pkcs7.load_der_pkcs7_certificates(data)]
    except _CERT_ERRORS as exc:
        raise MalformedData(f"cannot read certificates: {exc}") from exc


def _readable(cert: x509.Certificate) -> x509.Certificate:
    """The certificate, once its extensions parse (duplicates raise on every later read)."""
    cert.extensions  # noqa: B018
    return cert


def _parse_pem(data: bytes) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    if b"-----BEGIN CERTIFICATE-----" in data:
        certs.extend(x509.load_pem_x509_certificates(data))
    if b"-----BEGIN PKCS7-----" in data:
        for block in data.split(b"-----END PKCS7-----")[:-1]:
            start = block.find(b"-----BEGIN PKCS7-----")
            certs.extend(pkcs7.load_pem_pkcs7_certificates(block[start:] + b"-----END PKCS7-----"))
    if not certs:
        raise MalformedData("no certificate found in the PEM data")
    return certs


def cert_emails(cert: x509.Certificate) -> tuple[str, ...]:
    """SAN rfc822Name addresses; the subject emailAddress only when there is no SAN address."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = san.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        found = []
    if not found:
        found = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    return tuple(dict.fromkeys(normalize_address(a) for a in found))


def normalize_address(address: str) -> str:
    """Domain lower-cased, local part kept (RFC 5321 says it may be case-sensitive)."""
    local, at, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}" if at else address.strip()


def cert_info(cert: x509.Certificate, capabilities: Sequence[str] = ()) -> SmimeCertInfo:
    return SmimeCertInfo(
        fingerprint=fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:X}",
        emails=cert_emails(cert),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        algorithm=_algorithm(cert),
        can_encrypt=_usage_problem(cert, "encrypt") is None,
        can_sign=_usage_problem(cert, "sign") is None,
        is_ca=_is_ca(cert),
        capabilities=tuple(capabilities),
    )


def _public_key(cert: x509.Certificate) -> object:
    """The certificate's public key, or None when cryptography cannot read its type."""
    try:
        return cert.public_key()
    except (UnsupportedAlgorithm, ValueError):
        return None


def _algorithm(cert: x509.Certificate) -> str:
    key = _public_key(cert)
    if key is None:
        return f"unknown key type {cert.public_key_algorithm_oid.dotted_string}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC-{key.curve.name}"
    return type(key).__name__


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _usage_problem(cert: x509.Certificate, purpose: Purpose) -> str | None:
    """Why keyUsage / extendedKeyUsage forbid the purpose, or None when they allow it."""
    key = _public_key(cert)
    if purpose == "encrypt" and not isinstance(key, rsa.RSAPublicKey):
        return f"{_algorithm(cert)} keys cannot receive S/MIME mail here (RSA key transport only)"
    if purpose == "sign" and not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return f"{_algorithm(cert)} keys cannot sign S/MIME mail here"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and purpose == "encrypt" and not ku.key_encipherment:
        return "its key usage does not allow keyEncipherment (encryption)"
    if ku is not None and purpose == "sign" and not (ku.digital_signature or ku.content_commitment):
        return "its key usage allows neither digitalSignature nor nonRepudiation (signing)"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if ExtendedKeyUsageOID.EMAIL_PROTECTION in eku or _ANY_EKU in eku:
        return None
    return "its extended key usage does not include emailProtection"


# ============================================================================ validation


def validate(
    cert: x509.Certificate,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    address: str | None = None,
    purpose: Purpose = "encrypt",
    at: datetime | None = None,
) -> list[x509.Certificate]:
    """Check a correspondent's certificate for a purpose; return the chain (leaf first).

    Raises CertificateRejected (CertificateExpired for expiry) with ``problem`` set.
    ``address`` (the e-mail address it must be for) is skipped when None.
    """
    when = at or datetime.now(UTC)
    fpr = fingerprint(cert)
    _check_period(cert, when, fpr)
    problem = _usage_problem(cert, purpose)
    if problem is not None:
        kind = CertProblem.UNSUPPORTED_KEY if "keys cannot" in problem else CertProblem.KEY_USAGE
        raise CertificateRejected(f"certificate {_label(cert)}: {problem}", kind, fpr)
    if address is not None and normalize_address(address) not in cert_emails(cert):
        names = ", ".join(cert_emails(cert)) or "no e-mail address"
        raise CertificateRejected(
            f"certificate {_label(cert)} is for {names}, not {address}",
            CertProblem.EMAIL_MISMATCH,
            fpr,
        )
    return _build_chain(cert, trust_roots, intermediates, when, fpr)


def _label(cert: x509.Certificate) -> str:
    emails = cert_emails(cert)
    return emails[0] if emails else cert.subject.rfc4514_string() or fingerprint(cert)[:16]


def _check_period(cert: x509.Certificate, when: datetime, fpr: str) -> None:
    if when > cert.not_valid_after_utc:
        raise CertificateExpired(
            f"certificate {_label(cert)} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            CertProblem.EXPIRED,
            fpr,
        )
    if when < cert.not_valid_before_utc:
        raise CertificateRejected(
            f"certificate {_label(cert)} is not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            CertProblem.NOT_YET_VALID,
            fpr,
        )


def _build_chain(
    cert: x509.Certificate,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    when: datetime,
    fpr: str,
) -> list[x509.Certificate]:
    if not trust_roots:
        raise CertificateRejected("no trusted root certificates given", CertProblem.UNTRUSTED, fpr)
    # Web PKI rules for the CAs; the end entity's extensions were checked above, and the
    # client verifier's default end-entity profile would demand the clientAuth EKU.
    verifier = (
        PolicyBuilder()
        .store(Store(list(trust_roots)))
        .time(when)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(cert, list(intermediates)).chain)
    except VerificationError as exc:
        raise CertificateRejected(
            f"certificate {_label(cert)} does not chain to a trusted root: {_short(exc)}",
            CertProblem.UNTRUSTED,
            fpr,
        ) from exc


def _short(exc: Exception) -> str:
    text = str(exc).removeprefix("validation failed: ")
    return text.split(" (encountered processing", 1)[0]


# ============================================================================ outgoing


def encrypt(
    entity: bytes,
    recipients: Sequence[x509.Certificate],
    cipher: type[algorithms.AES256] | type[algorithms.AES128] = algorithms.AES256,
) -> bytes:
    """An application/pkcs7-mime enveloped-data entity (content headers + base64 body).

    ``entity`` is the MIME entity to protect; it is encrypted with CRLF line endings.
    The caller adds the message headers (From, To, Subject, ...) in front.
    """
    return smime_entity(encrypt_der(entity, recipients, cipher), "enveloped-data")


def encrypt_der(
    entity: bytes,
    recipients: Sequence[x509.Certificate],
    cipher: type[algorithms.AES256] | type[algorithms.AES128] = algorithms.AES256,
) -> bytes:
    """The EnvelopedData ContentInfo, DER."""
    if not recipients:
        raise NoUsableKey("no recipient certificates to encrypt to")
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(to_crlf(entity))
    for cert in recipients:
        if not isinstance(_public_key(cert), rsa.RSAPublicKey):
            raise CertificateRejected(
                f"certificate {_label(cert)}: only RSA certificates can receive S/MIME mail here",
                CertProblem.UNSUPPORTED_KEY,
                fingerprint(cert),
            )
        builder = builder.add_recipient(cert)
    builder = builder.set_content_encryption_algorithm(cipher)
    # Binary: the entity is canonical already; OpenSSL must not touch its line endings.
    return builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])


def sign(
    entity: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    chain: Sequence[x509.Certificate] = (),
    detached: bool = True,
) -> bytes:
    """multipart/signed (detached) or application/pkcs7-mime signed-data (opaque) entity.

    The signature covers ``entity`` with CRLF line endings, byte for byte. For the
    detached form the caller should pass a 7-bit entity (pgpmime.seven_bit_entity):
    relays may re-encode 8-bit parts of multipart/signed and break the signature.
    """
    content = to_crlf(entity)
    der = sign_der(content, cert, key, chain, detached)
    if not detached:
        return smime_entity(der, "signed-data")
    boundary = f"----=_smime_{secrets.token_hex(12)}"
    return b"".join(
        [
            header_field(
                "Content-Type",
                'multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256; '
                f'boundary="{boundary}"',
            ),
            CRLF,
            b"This is an S/MIME signed message\r\n",
            f"--{boundary}\r\n".encode(),
            content,
            CRLF,
            f"--{boundary}\r\n".encode(),
            b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n',
            b"Content-Transfer-Encoding: base64\r\n",
            b'Content-Disposition: attachment; filename="smime.p7s"\r\n',
            b"Content-Description: S/MIME Cryptographic Signature\r\n",
            CRLF,
            _base64_lines(der),
            f"--{boundary}--\r\n".encode(),
        ]
    )


def sign_der(
    content: bytes,
    cert: x509.Certificate,
    key: PrivateKey,
    chain: Sequence[x509.Certificate] = (),
    detached: bool = True,
) -> bytes:
    """SignedData over the exact bytes, SHA-256, with signing time and SMIMECapabilities."""
    problem = _usage_problem(cert, "sign")
    if problem is not None:
        raise CertificateRejected(
            f"certificate {_label(cert)}: {problem}", CertProblem.KEY_USAGE, fingerprint(cert)
        )
    if not _key_matches(key, cert):
        raise NoUsableKey("the private key does not belong to the signing certificate")
    # Order matters: set_data() and add_signer() drop certificates added before them.
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content)
    builder = builder.add_signer(cert, key, hashes.SHA256())
    for extra in chain:
        if extra != cert:
            builder = builder.add_certificate(extra)
    options = [pkcs7.PKCS7Options.Binary]
    if detached:
        options.append(pkcs7.PKCS7Options.DetachedSignature)
    return builder.sign(serialization.Encoding.DER, options)


def smime_entity(der: bytes, smime_type: str) -> bytes:
    """An application/pkcs7-mime entity around a CMS object."""
    return b"".join(
        [
            header_field(
                "Content-Type",
                f'application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"',
            ),
            b"Content-Transfer-Encoding: base64\r\n",
            b'Content-Disposition: attachment; filename="smime.p7m"\r\n',
            CRLF,
            _base64_lines(der),
        ]
    )


def _base64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i : i + _B64_LINE] + CRLF for i in range(0, len(text), _B64_LINE))


# ============================================================================ incoming: CMS input


def cms_der(data: bytes, max_input: int = DEFAULT_MAX_INPUT) -> bytes:
    """DER CMS from raw DER, PEM, or an application/pkcs7-mime entity (base64 body)."""
    if len(data) > max_input:
        raise OutputTooLarge(f"S/MIME object larger than {max_input} bytes", max_input)
    if data[:1] == b"\x30":
        return data
    if data.lstrip().startswith(b"-----BEGIN"):
        return _pem_body(data)
    entity = parse_entity(data)
    if entity.content_type not in (*SMIME_MIME_TYPES, *SIGNATURE_MIME_TYPES):
        ctype = entity.content_type or "no content type"
        raise MalformedData(f"not an S/MIME object ({ctype})")
    return decode_body(entity)


def decode_body(entity: Entity) -> bytes:
    """The transfer-decoded body of an S/MIME part (base64, or binary as is)."""
    cte = entity.transfer_encoding
    if cte in ("binary", "8bit", "7bit"):
        return entity.body
    if cte != "base64":
        raise MalformedData(f"unexpected Content-Transfer-Encoding {cte} for an S/MIME part")
    try:
        return base64.b64decode(b"".join(entity.body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedData(f"S/MIME part is not valid base64: {exc}") from exc


def _pem_body(data: bytes) -> bytes:
    lines = [ln for ln in data.strip().splitlines() if not ln.startswith(b"-----")]
    try:
        return base64.b64decode(b"".join(lines), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedData(f"PEM S/MIME object is not valid base64: {exc}") from exc


def _content_info(der: bytes, expected: str) -> cms.ContentInfo:
    info = cms.ContentInfo.load(der, strict=True)
    ctype = info["content_type"].native
    if ctype != expected:
        raise MalformedData(f"expected CMS {expected}, found {ctype}")
    return info


# ============================================================================ decrypt


@_parse_guard("S/MIME encrypted message")
def decrypt(
    data: bytes,
    identities: Iterable[tuple[PrivateKey, x509.Certificate] | SmimeIdentity],
    max_output: int | None = None,
) -> Decrypted:
    """Open EnvelopedData with the first of our identities it is addressed to.

    ``data`` is the application/pkcs7-mime entity, PEM or DER. Only enveloped-data is
    accepted (no AuthEnvelopedData, no signed or compressed data). DecryptionFailed
    names the recipients when none of our keys match.
    """
    der = cms_der(data)
    info = _content_info(der, "enveloped_data")
    enveloped = info["content"]
    recipients = _recipient_ids(enveloped)
    encrypted = enveloped["encrypted_content_info"]
    body = encrypted["encrypted_content"].native
    if body is None:
        raise MalformedData("the encrypted content is missing (detached EnvelopedData)")
    if max_output is not None and len(body) > max_output + 16:  # CBC: plaintext <= ciphertext
        raise OutputTooLarge(f"decrypted message larger than {max_output} bytes", max_output)
    cipher = encrypted["content_encryption_algorithm"]["algorithm"].native
    for key, cert in _pairs(identities):
        if _addressed_to(enveloped, cert):
            # cryptography reads DER only; GnuPG and streaming OpenSSL write BER
            # (indefinite lengths, chunked octet strings): re-encode through asn1crypto.
            canonical = info.dump(force=True)
            return Decrypted(_open(canonical, cert, key, cipher, max_output), cert)
    names = "; ".join(r for r in recipients) or "no recipient"
    raise DecryptionFailed(
        f"the message is not encrypted to any of our certificates; it is for: {names}",
        recipients,
    )


def _pairs(
    identities: Iterable[tuple[PrivateKey, x509.Certificate] | SmimeIdentity],
) -> Iterable[tuple[PrivateKey, x509.Certificate]]:
    for item in identities:
        yield (item.key, item.cert) if isinstance(item, SmimeIdentity) else item


def _recipient_ids(enveloped: cms.EnvelopedData) -> list[str]:
    """Who the message is for, in words: "issuer / serial N" or "subject key identifier X"."""
    names = []
    for info in enveloped["recipient_infos"]:
        if info.name != "ktri":
            names.append(f"({info.name} recipient, not supported)")
            continue
        rid = info.chosen["rid"]
        if rid.name == "issuer_and_serial_number":
            issuer = rid.chosen["issuer"].human_friendly
            names.append(f"{issuer} / serial {rid.chosen['serial_number'].native:X}")
        else:
            names.append(f"subject key identifier {rid.chosen.native.hex().upper()}")
    return names


def _addressed_to(enveloped: cms.EnvelopedData, cert: x509.Certificate) -> bool:
    """Is there a key-transport recipient info for this certificate?"""
    ours = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    for info in enveloped["recipient_infos"]:
        if info.name != "ktri":
            continue
        rid = info.chosen["rid"]
        if rid.name == "issuer_and_serial_number":
            # asn1crypto compares names the RFC 5280 way (case and space folded).
            if rid.chosen["serial_number"].native == ours.serial_number and (
                rid.chosen["issuer"] == ours.issuer
            ):
                return True
        elif ours.key_identifier is not None and rid.chosen.native == ours.key_identifier:
            return True
    return False


def _open(
    der: bytes, cert: x509.Certificate, key: PrivateKey, cipher: str, max_output: int | None
) -> bytes:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise NoUsableKey("only RSA keys can decrypt S/MIME mail here", fingerprint(cert))
    try:
        plaintext = pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    except UnsupportedAlgorithm as exc:
        raise DecryptionFailed(
            f"unsupported content encryption algorithm {cipher} (AES-128/256-CBC only)"
        ) from exc
    except ValueError as exc:
        # A recipient named by subject key identifier, or a key/padding failure.
        raise DecryptionFailed(f"cannot decrypt with {_label(cert)}: {exc}") from exc
    if max_output is not None and len(plaintext) > max_output:
        raise OutputTooLarge(f"decrypted message larger than {max_output} bytes", max_output)
    return plaintext


# ============================================================================ verify


class SmimeKind(StrEnum):
    ENVELOPED = "enveloped-data"
    AUTH_ENVELOPED = "authEnveloped-data"  # AES-GCM: recognised, not supported
    SIGNED_OPAQUE = "signed-data"
    SIGNED_DETACHED = "multipart-signed"
    CERTS_ONLY = "certs-only"
    COMPRESSED = "compressed-data"
    OTHER = "other"  # not S/MIME, or an unknown smime-type


_SMIME_TYPES = {k.value.lower(): k for k in SmimeKind}
_CMS_KINDS = {
    "enveloped_data": SmimeKind.ENVELOPED,
    "authenticated_enveloped_data": SmimeKind.AUTH_ENVELOPED,
    "signed_data": SmimeKind.SIGNED_OPAQUE,
    "compressed_data": SmimeKind.COMPRESSED,
}


def classify(entity: Entity) -> SmimeKind:
    """What an entity (the top-level one, EFAIL) carries; the smime-type parameter, or the
    CMS content type when the parameter is missing (older clients omit it)."""
    ctype, params = entity.content_type, entity.params
    if ctype == "multipart/signed":
        protocol = params.get("protocol", "").lower()
        return SmimeKind.SIGNED_DETACHED if protocol in SIGNATURE_MIME_TYPES else SmimeKind.OTHER
    if ctype not in SMIME_MIME_TYPES:
        return SmimeKind.OTHER
    declared = params.get("smime-type", "").lower()
    if declared:
        return _SMIME_TYPES.get(declared, SmimeKind.OTHER)
    try:
        return _CMS_KINDS.get(
            cms.ContentInfo.load(decode_body(entity))["content_type"].native, SmimeKind.OTHER
        )
    except (CryptoError, *_PARSE_ERRORS):
        return SmimeKind.OTHER


@_parse_guard("S/MIME signature")
def verify_detached(
    content: bytes,
    signature: bytes,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    address: str | None = None,
    at: datetime | None = None,
    known_certs: Sequence[x509.Certificate] = (),
) -> SmimeVerifyResult:
    """Check a detached signature (the application/pkcs7-signature part, DER or base64 entity)
    over ``content``, the exact bytes of the first part of the multipart/signed.

    ``address`` is the From address the signer's certificate must name; ``known_certs``
    are collected certificates for signatures that do not carry their signer's.
    """
    signed = _content_info(cms_der(signature), "signed_data")["content"]
    return _verify_signed(signed, content, trust_roots, intermediates, address, at, known_certs)


@_parse_guard("S/MIME signed message")
def verify_opaque(
    data: bytes,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    address: str | None = None,
    at: datetime | None = None,
    known_certs: Sequence[x509.Certificate] = (),
    max_output: int | None = None,
) -> tuple[bytes, SmimeVerifyResult]:
    """(content, result) of signed-data that carries its content (application/pkcs7-mime;
    smime-type=signed-data). The content is returned whatever the result: the caller
    decides whether to show it (a signature is not an integrity gate like decryption)."""
    signed = _content_info(cms_der(data), "signed_data")["content"]
    content = signed["encap_content_info"]["content"].native
    if content is None:
        raise MalformedData("the signed-data carries no content (it is a detached signature)")
    if not isinstance(content, bytes):
        raise MalformedData("the signed content is not data")
    if max_output is not None and len(content) > max_output:
        raise OutputTooLarge(f"signed content larger than {max_output} bytes", max_output)
    result = _verify_signed(signed, content, trust_roots, intermediates, address, at, known_certs)
    return content, result


def verify_entity(
    raw: bytes,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    address: str | None = None,
    at: datetime | None = None,
    known_certs: Sequence[x509.Certificate] = (),
    max_output: int | None = None,
) -> tuple[bytes, SmimeVerifyResult]:
    """(signed entity, result) of a multipart/signed or opaque signed-data entity."""
    entity = parse_entity(raw)
    kind = classify(entity)
    if kind is SmimeKind.SIGNED_OPAQUE:
        return verify_opaque(
            decode_body(entity), trust_roots, intermediates, address, at, known_certs, max_output
        )
    if kind is not SmimeKind.SIGNED_DETACHED:
        raise MalformedData(f"not an S/MIME signed entity ({entity.content_type})")
    if len(entity.parts) != 2 or entity.parts[1].content_type not in SIGNATURE_MIME_TYPES:
        raise MalformedData("multipart/signed needs exactly a content part and a signature part")
    content = entity.parts[0].raw
    signature = decode_body(entity.parts[1])
    result = verify_detached(
        content, signature, trust_roots, intermediates, address, at, known_certs
    )
    return content, result


def _verify_signed(
    signed: cms.SignedData,
    content: bytes,
    trust_roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    address: str | None,
    at: datetime | None,
    known_certs: Sequence[x509.Certificate],
) -> SmimeVerifyResult:
    carried = _message_certs(signed)
    candidates = [*carried, *((_asn1_cert(c), c) for c in known_certs)]
    econtent_type = signed["encap_content_info"]["content_type"].native
    if econtent_type != "data":
        raise MalformedData(f"signed content of type {econtent_type}, not data")
    signer_infos = list(signed["signer_infos"])
    if not signer_infos:
        raise MalformedData("the signed-data has no signer")
    context = _Context(
        content, candidates, trust_roots, [*intermediates, *(c for _, c in carried)], address, at
    )
    results = [_check_signer(si, context) for si in signer_infos]
    # Several signers: the first good one counts, else the first (RFC 5652 5.6 leaves it open).
    best = next((r for r in results if r.valid), results[0])
    return SmimeVerifyResult(
        best.signature,
        best.signer,
        best.signing_time,
        best.capabilities,
        tuple(c for _, c in carried),
    )


@dataclass
class _Context:
    content: bytes
    certs: list[tuple[asn1_x509.Certificate, x509.Certificate]]
    trust_roots: Sequence[x509.Certificate]
    intermediates: list[x509.Certificate]
    address: str | None
    at: datetime | None


def _message_certs(signed: cms.SignedData) -> list[tuple[asn1_x509.Certificate, x509.Certificate]]:
    found = []
    for choice in signed["certificates"] or ():
        if choice.name != "certificate":
            continue  # attribute certificates and the like play no part here
        try:
            cert = _readable(x509.load_der_x509_certificate(choice.chosen.dump()))
            found.append((choice.chosen, cert))
        except _CERT_ERRORS:
            continue  # an unreadable extra certificate does not spoil the signature
    return found


def _asn1_cert(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))


def _find_signer(
    sid: cms.SignerIdentifier, certs: list[tuple[asn1_x509.Certificate, x509.Certificate]]
) -> x509.Certificate | None:
    for parsed, cert in certs:
        if sid.name == "issuer_and_serial_number":
            if (
                sid.chosen["serial_number"].native == parsed.serial_number
                and sid.chosen["issuer"] == parsed.issuer
            ):
                return cert
        elif parsed.key_identifier is not None and sid.chosen.native == parsed.key_identifier:
            return cert
    return None


def _attributes(si: cms.SignerInfo) -> dict[str, list[object]] | None:
    attrs = si["signed_attrs"]
    if attrs.native is None or len(attrs) == 0:
        return None
    found: dict[str, list[object]] = {}
    for attr in attrs:
        values = attr["values"]
        found.setdefault(attr["type"].native, []).extend(values.native)
    return found


def _capabilities(attrs: dict[str, list[object]] | None) -> tuple[str, ...]:
    names: list[str] = []
    for value in (attrs or {}).get("smime_capabilities", []):
        for cap in value or ():  # type: ignore[attr-defined]
            names.append(str(cap["capability_id"]))
    return tuple(names)


def _check_signer(si: cms.SignerInfo, ctx: _Context) -> SmimeVerifyResult:
    attrs = _attributes(si)
    times = (attrs or {}).get("signing_time", [])
    signing_time = times[0] if len(times) == 1 and isinstance(times[0], datetime) else None
    signer = _find_signer(si["sid"], ctx.certs)

    def outcome(status: SignatureStatus, detail: str) -> SmimeVerifyResult:
        fpr = fingerprint(signer) if signer is not None else None
        result = SignatureResult(status, fpr, None, signing_time, detail)
        return SmimeVerifyResult(result, signer, signing_time, _capabilities(attrs))

    problem = _math_problem(si, attrs, ctx.content, signer)
    if problem is not None:
        return outcome(*problem)
    assert signer is not None  # _math_problem reports a missing signer
    try:
        validate(signer, ctx.trust_roots, ctx.intermediates, ctx.address, "sign", ctx.at)
    except CertificateRejected as exc:
        status = _CERT_STATUS.get(exc.problem, SignatureStatus.INVALID)
        return outcome(status, f"the signature matches, but {exc}")
    return outcome(SignatureStatus.VALID, f"good signature by {_label(signer)}")


_CERT_STATUS = {
    CertProblem.EXPIRED: SignatureStatus.EXPIRED,
    CertProblem.UNTRUSTED: SignatureStatus.UNKNOWN_KEY,
}


def _math_problem(
    si: cms.SignerInfo,
    attrs: dict[str, list[object]] | None,
    content: bytes,
    signer: x509.Certificate | None,
) -> tuple[SignatureStatus, str] | None:
    """Digest and signature checks; None when both hold."""
    digest_name = si["digest_algorithm"]["algorithm"].native
    if digest_name not in _HASHES:
        return SignatureStatus.INVALID, f"digest algorithm {digest_name} is not accepted"
    if signer is None:
        return SignatureStatus.UNKNOWN_KEY, "the signer's certificate is not in the message"
    digest = hashlib.new(digest_name, content).digest()
    if attrs is None:
        signed_bytes = content  # no signed attributes: the signature covers the content
    else:
        problem = _attribute_problem(attrs, digest)
        if problem is not None:
            return SignatureStatus.INVALID, problem
        # The signature covers the attributes as a SET OF, not as the [0] IMPLICIT field.
        raw = si["signed_attrs"].dump()
        signed_bytes = b"\x31" + raw[1:]
    try:
        _verify_signature(signer, si, signed_bytes, _HASHES[digest_name]())
    except InvalidSignature:
        return SignatureStatus.INVALID, "the signature does not match the signed data"
    except _UnsupportedSignature as exc:
        return SignatureStatus.UNVERIFIABLE, str(exc)
    return None


def _attribute_problem(attrs: dict[str, list[object]], digest: bytes) -> str | None:
    digests = attrs.get("message_digest", [])
    if len(digests) != 1 or not isinstance(digests[0], bytes):
        return "the signed attributes need exactly one message digest"
    if not hmac.compare_digest(digests[0], digest):
        return "the content was altered after signing (message digest mismatch)"
    if attrs.get("content_type") != ["data"]:
        return "the signed content-type attribute is missing or not data"
    return None


class _UnsupportedSignature(Exception):
    pass


def _verify_signature(
    signer: x509.Certificate, si: cms.SignerInfo, data: bytes, digest: hashes.HashAlgorithm
) -> None:
    algorithm = si["signature_algorithm"]
    try:
        kind = algorithm.signature_algo
    except ValueError as exc:
        raise _UnsupportedSignature(f"unsupported signature algorithm: {exc}") from exc
    _check_hash_pairing(algorithm, digest)
    key = _public_key(signer)
    signature = si["signature"].native
    if kind == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), digest)
    elif kind == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, _pss(algorithm, digest), digest)
    elif kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(digest))
    else:
        raise _UnsupportedSignature(
            f"signature algorithm {kind} with a {_algorithm(signer)} certificate is not supported"
        )


def _check_hash_pairing(algorithm: cms.SignedDigestAlgorithm, digest: hashes.HashAlgorithm) -> None:
    """sha1WithRSA and friends name their own hash: it must be the digest algorithm."""
    try:
        named = algorithm.hash_algo
    except ValueError:
        return  # rsaEncryption, ecPublicKey, PSS: the digest algorithm decides
    if named != digest.name:
        raise InvalidSignature(f"signature algorithm hash {named} differs from {digest.name}")


def _pss(algorithm: cms.SignedDigestAlgorithm, digest: hashes.HashAlgorithm) -> padding.PSS:
    params = algorithm["parameters"]
    if params["hash_algorithm"]["algorithm"].native != digest.name:
        raise _UnsupportedSignature("RSASSA-PSS hash differs from the digest algorithm")
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1" or mgf["parameters"]["algorithm"].native != digest.name:
        raise _UnsupportedSignature("RSASSA-PSS with an unsupported mask generation function")
    return padding.PSS(mgf=padding.MGF1(type(digest)()), salt_length=params["salt_length"].native)
