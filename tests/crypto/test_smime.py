"""S/MIME: identities, certificate checks, encrypt/decrypt, sign/verify, and hostile input.

The PKI (a test CA, user certificates and their bad variants) is generated here with
``cryptography``; test_smime_interop.py reuses it.
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.crypto import smime
from localproxy.crypto.errors import (
    BadPassphrase,
    CryptoError,
    DecryptionFailed,
    KeyExpired,
    MalformedData,
    OutputTooLarge,
)
from localproxy.crypto.openpgp import SignatureStatus
from localproxy.crypto.smime import CertificateRejected, CertProblem, SmimeKind
from localproxy.mime import parse_entity

NOW = datetime.now(UTC)
DAY = timedelta(days=1)
ENTITY = (
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße aus dem Test.\r\nFrom the start of a line\r\n.\r\n".encode()
)
SEVEN_BIT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nHello, S/MIME.\r\n"

# --------------------------------------------------------------------------- test PKI


@dataclass(frozen=True)
class User:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def identity(self) -> smime.SmimeIdentity:
        return smime.SmimeIdentity(self.key, self.cert, (ca().cert,))


def _name(cn: str, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


@cache
def _rsa(tag: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _root(cn: str) -> User:
    key = _rsa(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 30 * DAY)
        .not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return User(key, cert)


@cache
def ca() -> User:
    return _root("localproxy test CA")


@cache
def other_ca() -> User:
    return _root("some other CA")


def make_user(
    email: str | None = "alice@example.org",
    *,
    issuer: User | None = None,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    usage: str = "both",  # both, sign, encrypt
    eku: x509.ObjectIdentifier | None = ExtendedKeyUsageOID.EMAIL_PROTECTION,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    subject_email: str | None = None,
) -> User:
    issuer = issuer or ca()
    key = key or _rsa(f"user {email} {usage}")
    sign, encrypt = usage in ("both", "sign"), usage in ("both", "encrypt")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"user {email}", subject_email))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 365 * DAY)
        .add_extension(
            x509.KeyUsage(sign, sign, encrypt, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if email:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    return User(key, builder.sign(issuer.key, hashes.SHA256()))


@cache
def alice() -> User:
    return make_user("alice@example.org")


@cache
def bob() -> User:
    return make_user("bob@example.net")


def roots() -> list[x509.Certificate]:
    return [ca().cert]


# --------------------------------------------------------------------------- identities


def test_load_pkcs12_round_trip() -> None:
    user = alice()
    p12 = pkcs12.serialize_key_and_certificates(
        b"alice",
        user.key,  # type: ignore[arg-type]
        user.cert,
        [ca().cert],
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    ident = smime.load_pkcs12(p12, "s3cret")
    assert ident.cert == user.cert
    assert ident.chain == (ca().cert,)
    assert ident.fingerprint == user.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert smime.load_private_key(ident.key_der).private_numbers() == user.key.private_numbers()  # type: ignore[union-attr]
    with pytest.raises(BadPassphrase):
        smime.load_pkcs12(p12, "wrong")
    with pytest.raises(MalformedData):
        smime.load_pkcs12(b"not a p12 at all", "x")


def test_load_pkcs12_without_key_or_cert() -> None:
    only_certs = pkcs12.serialize_java_truststore(
        [pkcs12.PKCS12Certificate(ca().cert, b"ca")], serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(MalformedData, match="no private key"):
        smime.load_pkcs12(only_certs, "pw")
    key_only = pkcs12.serialize_key_and_certificates(
        b"k",
        alice().key,  # type: ignore[arg-type]
        None,
        None,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(MalformedData, match="no certificate"):
        smime.load_pkcs12(key_only, "pw")


# --------------------------------------------------------------------------- certificates


def test_parse_certificates_pem_der_pkcs7() -> None:
    a, b = alice().cert, bob().cert
    pem = a.public_bytes(serialization.Encoding.PEM) + b.public_bytes(serialization.Encoding.PEM)
    assert smime.parse_certificates(pem) == [a, b]
    assert smime.parse_certificates(a.public_bytes(serialization.Encoding.DER)) == [a]
    bundle = pkcs7.serialize_certificates([a, b], serialization.Encoding.DER)
    assert set(smime.parse_certificates(bundle)) == {a, b}
    bundle_pem = pkcs7.serialize_certificates([a], serialization.Encoding.PEM)
    assert smime.parse_certificates(bundle_pem) == [a]
    for junk in (b"", b"hello", b"\x30\x03\x02\x01\x00", b"-----BEGIN CERTIFICATE-----\nAA==\n"):
        with pytest.raises(MalformedData):
            smime.parse_certificates(junk)


def test_cert_info() -> None:
    info = smime.cert_info(alice().cert)
    assert info.emails == ("alice@example.org",)
    assert info.fingerprint == smime.fingerprint(alice().cert)
    assert len(info.fingerprint) == 64 and info.fingerprint.isupper()
    assert info.can_encrypt and info.can_sign and not info.is_ca
    assert info.algorithm == "RSA-2048"
    assert "localproxy test CA" in info.issuer
    assert smime.cert_info(make_user("x@example.org", usage="sign").cert).can_encrypt is False
    assert smime.cert_info(make_user("x@example.org", usage="encrypt").cert).can_sign is False
    fallback = make_user(None, subject_email="Carol@Example.COM").cert
    assert smime.cert_info(fallback).emails == ("Carol@example.com",)


# --------------------------------------------------------------------------- validate


def test_validate_good() -> None:
    chain = smime.validate(alice().cert, roots(), [], "alice@EXAMPLE.org", "encrypt")
    assert chain[0] == alice().cert and chain[-1] == ca().cert
    smime.validate(alice().cert, roots(), [], "alice@example.org", "sign")
    smime.validate(make_user("n@example.org", eku=None).cert, roots(), [], None, "sign")
    any_eku = x509.ObjectIdentifier("2.5.29.37.0")
    smime.validate(make_user("n@example.org", eku=any_eku).cert, roots(), [], None, "encrypt")


@pytest.mark.parametrize(
    ("user", "purpose", "problem", "words"),
    [
        (lambda: make_user(usage="sign"), "encrypt", CertProblem.KEY_USAGE, "keyEncipherment"),
        (lambda: make_user(usage="encrypt"), "sign", CertProblem.KEY_USAGE, "digitalSignature"),
        (
            lambda: make_user(eku=ExtendedKeyUsageOID.SERVER_AUTH),
            "sign",
            CertProblem.KEY_USAGE,
            "emailProtection",
        ),
        (
            lambda: make_user(not_before=NOW - 30 * DAY, not_after=NOW - DAY),
            "encrypt",
            CertProblem.EXPIRED,
            "expired on",
        ),
        (
            lambda: make_user(not_before=NOW + DAY, not_after=NOW + 30 * DAY),
            "encrypt",
            CertProblem.NOT_YET_VALID,
            "not valid before",
        ),
        (lambda: make_user(issuer=other_ca()), "encrypt", CertProblem.UNTRUSTED, "trusted root"),
        (lambda: make_user("mallory@example.org"), "encrypt", CertProblem.EMAIL_MISMATCH, "not"),
        (
            lambda: make_user(key=ec.generate_private_key(ec.SECP256R1())),
            "encrypt",
            CertProblem.UNSUPPORTED_KEY,
            "RSA",
        ),
    ],
)
def test_validate_rejects(user, purpose, problem: CertProblem, words: str) -> None:  # type: ignore[no-untyped-def]
    cert = user().cert
    with pytest.raises(CertificateRejected, match=words) as caught:
        smime.validate(cert, roots(), [], "alice@example.org", purpose)
    assert caught.value.problem is problem
    assert caught.value.fingerprint == smime.fingerprint(cert)
    assert isinstance(caught.value, KeyExpired) == (problem is CertProblem.EXPIRED)


def test_validate_at_a_given_time() -> None:
    with pytest.raises(KeyExpired):
        smime.validate(alice().cert, roots(), [], None, "encrypt", at=NOW + 400 * DAY)
    with pytest.raises(CertificateRejected) as caught:
        smime.validate(alice().cert, [], [], None, "encrypt")
    assert caught.value.problem is CertProblem.UNTRUSTED


def test_validate_through_intermediate() -> None:
    key = _rsa("intermediate")
    inter_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("intermediate"))
        .issuer_name(ca().cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca().key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca().key, hashes.SHA256())
    )
    user = make_user("dave@example.org", issuer=User(key, inter_cert))
    chain = smime.validate(user.cert, roots(), [inter_cert], "dave@example.org", "sign")
    assert chain == [user.cert, inter_cert, ca().cert]
    with pytest.raises(CertificateRejected) as caught:
        smime.validate(user.cert, roots(), [], "dave@example.org", "sign")
    assert caught.value.problem is CertProblem.UNTRUSTED
    # A signed message carries the intermediate: verification finds the chain by itself.
    signed = smime.sign(SEVEN_BIT, user.cert, user.key, [inter_cert])
    _, result = smime.verify_entity(signed, roots(), address="dave@example.org")
    assert result.status is SignatureStatus.VALID


# --------------------------------------------------------------------------- encrypt / decrypt


def test_encrypt_decrypt_round_trip() -> None:
    entity = smime.encrypt(ENTITY.replace(b"\r\n", b"\n"), [alice().cert, bob().cert])
    parsed = parse_entity(entity)
    assert parsed.content_type == "application/pkcs7-mime"
    assert parsed.params["smime-type"] == "enveloped-data"
    assert parsed.params["name"] == "smime.p7m"
    assert parsed.transfer_encoding == "base64"
    assert smime.classify(parsed) is SmimeKind.ENVELOPED
    assert all(len(line) <= 76 for line in parsed.body.split(b"\r\n"))
    for user in (alice(), bob()):
        result = smime.decrypt(entity, [user.identity])
        assert result.plaintext == ENTITY  # canonical CRLF
        assert result.recipient == user.cert
    plaintext, used = smime.decrypt(entity, [(bob().key, bob().cert)])
    assert plaintext == ENTITY and used == bob().cert


def test_encrypt_algorithms_are_the_safe_defaults() -> None:
    der = smime.encrypt_der(ENTITY, [alice().cert])
    info = cms.ContentInfo.load(der)
    assert info["content_type"].native == "enveloped_data"
    enveloped = info["content"]
    algo = enveloped["encrypted_content_info"]["content_encryption_algorithm"]
    assert algo["algorithm"].native == "aes256_cbc"
    (recipient,) = list(enveloped["recipient_infos"])
    assert recipient.name == "ktri"
    assert recipient.chosen["rid"].name == "issuer_and_serial_number"
    assert recipient.chosen["rid"].chosen["serial_number"].native == alice().cert.serial_number
    assert recipient.chosen["key_encryption_algorithm"]["algorithm"].native == "rsaes_pkcs1v15"
    # PEM and raw DER input work as well as the MIME entity.
    assert smime.decrypt(der, [alice().identity]).plaintext == ENTITY


def test_decrypt_not_for_us_names_the_recipients() -> None:
    entity = smime.encrypt(ENTITY, [bob().cert])
    with pytest.raises(DecryptionFailed) as caught:
        smime.decrypt(entity, [alice().identity])
    (named,) = caught.value.recipients
    assert f"serial {bob().cert.serial_number:X}" in named
    assert "localproxy test CA" in named
    assert named in str(caught.value)


def test_decrypt_refuses_other_content_types() -> None:
    signed = smime.sign(SEVEN_BIT, alice().cert, alice().key, detached=False)
    with pytest.raises(MalformedData, match="expected CMS enveloped_data"):
        smime.decrypt(signed, [alice().identity])
    with pytest.raises(MalformedData, match="not an S/MIME object"):
        smime.decrypt(SEVEN_BIT, [alice().identity])


def test_decrypt_output_limit() -> None:
    entity = smime.encrypt(ENTITY * 100, [alice().cert])
    with pytest.raises(OutputTooLarge):
        smime.decrypt(entity, [alice().identity], max_output=1000)
    assert smime.decrypt(entity, [alice().identity], max_output=len(ENTITY) * 100)


def test_decrypt_truncated_and_tampered() -> None:
    der = smime.encrypt_der(ENTITY, [alice().cert])
    for cut in (1, 10, len(der) // 2, len(der) - 1):
        with pytest.raises(MalformedData):
            smime.decrypt(der[:cut], [alice().identity])
    with pytest.raises(MalformedData):
        smime.decrypt(der + b"\x00", [alice().identity])  # trailing garbage
    broken = smime.encrypt(ENTITY, [alice().cert]).replace(b"\r\n\r\n", b"\r\n\r\n!!", 1)
    with pytest.raises(CryptoError):
        smime.decrypt(broken, [alice().identity])


def test_encrypt_refuses_non_rsa_and_nobody() -> None:
    ec_user = make_user("e@example.org", key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CertificateRejected):
        smime.encrypt(ENTITY, [ec_user.cert])
    with pytest.raises(CryptoError):
        smime.encrypt(ENTITY, [])


# --------------------------------------------------------------------------- sign / verify


def _parts(signed: bytes) -> tuple[bytes, bytes]:
    entity = parse_entity(signed)
    return entity.parts[0].raw, smime.decode_body(entity.parts[1])


def test_sign_detached_round_trip() -> None:
    signed = smime.sign(SEVEN_BIT, alice().cert, alice().key, [ca().cert])
    entity = parse_entity(signed)
    assert entity.content_type == "multipart/signed"
    assert entity.params["protocol"] == "application/pkcs7-signature"
    assert entity.params["micalg"] == "sha-256"
    assert smime.classify(entity) is SmimeKind.SIGNED_DETACHED
    content, signature = _parts(signed)
    assert content == SEVEN_BIT
    result = smime.verify_detached(content, signature, roots(), address="alice@example.org")
    assert result.status is SignatureStatus.VALID, result.signature.detail
    assert result.signer == alice().cert
    assert result.signature.fingerprint == smime.fingerprint(alice().cert)
    assert result.signing_time is not None and abs(result.signing_time - NOW) < DAY
    assert result.signature.created == result.signing_time
    assert "aes256_cbc" in result.capabilities
    assert ca().cert in result.certificates and alice().cert in result.certificates
    content2, again = smime.verify_entity(signed, roots(), address="alice@example.org")
    assert content2 == SEVEN_BIT and again.valid


def test_sign_detached_attributes() -> None:
    _, signature = _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))
    signed = cms.ContentInfo.load(signature)["content"]
    assert signed["encap_content_info"]["content"].native is None
    (si,) = list(signed["signer_infos"])
    assert si["digest_algorithm"]["algorithm"].native == "sha256"
    kinds = {a["type"].native for a in si["signed_attrs"]}
    assert {"content_type", "signing_time", "message_digest", "smime_capabilities"} <= kinds


def test_sign_opaque_round_trip() -> None:
    signed = smime.sign(ENTITY, alice().cert, alice().key, detached=False)
    entity = parse_entity(signed)
    assert entity.params["smime-type"] == "signed-data"
    assert smime.classify(entity) is SmimeKind.SIGNED_OPAQUE
    content, result = smime.verify_opaque(signed, roots(), address="alice@example.org")
    assert content == ENTITY
    assert result.valid, result.signature.detail
    assert smime.verify_entity(signed, roots())[1].valid


def test_sign_refuses_encrypt_only_cert_and_wrong_key() -> None:
    enc_only = make_user(usage="encrypt")
    with pytest.raises(CertificateRejected):
        smime.sign(SEVEN_BIT, enc_only.cert, enc_only.key)
    with pytest.raises(CryptoError, match="does not belong"):
        smime.sign(SEVEN_BIT, alice().cert, bob().key)


def test_altered_content_is_invalid() -> None:
    content, signature = _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))
    result = smime.verify_detached(content.replace(b"Hello", b"Jello"), signature, roots())
    assert result.status is SignatureStatus.INVALID
    assert "altered" in result.signature.detail
    assert result.signer == alice().cert


def _resign(signature: bytes, mutate) -> bytes:  # type: ignore[no-untyped-def]
    info = cms.ContentInfo.load(signature)
    mutate(info["content"]["signer_infos"][0])
    return info.dump(force=True)


def test_altered_signature_or_attributes_are_invalid() -> None:
    content, signature = _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))

    def flip_signature(si: cms.SignerInfo) -> None:
        raw = bytearray(si["signature"].native)
        raw[10] ^= 1
        si["signature"] = bytes(raw)

    def change_time(si: cms.SignerInfo) -> None:
        for attr in si["signed_attrs"]:
            if attr["type"].native == "signing_time":
                attr["values"] = [cms.Time({"utc_time": NOW - 1000 * DAY})]

    for mutate in (flip_signature, change_time):
        result = smime.verify_detached(content, _resign(signature, mutate), roots())
        assert result.status is SignatureStatus.INVALID
        assert "does not match" in result.signature.detail


@pytest.mark.parametrize(
    ("signer", "address", "status", "words"),
    [
        (lambda: make_user(issuer=other_ca()), None, SignatureStatus.UNKNOWN_KEY, "trusted root"),
        (
            lambda: make_user(not_before=NOW - 30 * DAY, not_after=NOW - DAY),
            None,
            SignatureStatus.EXPIRED,
            "expired",
        ),
        (lambda: alice(), "mallory@example.org", SignatureStatus.INVALID, "not mallory"),
        (
            lambda: make_user(eku=ExtendedKeyUsageOID.CODE_SIGNING),
            None,
            SignatureStatus.INVALID,
            "emailProtection",
        ),
    ],
)
def test_verify_certificate_problems(signer, address, status, words) -> None:  # type: ignore[no-untyped-def]
    user = signer()
    # Sign at the library level: sign() itself refuses unusable certificates.
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(SEVEN_BIT)
        .add_signer(user.cert, user.key, hashes.SHA256())
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary],
        )
    )
    result = smime.verify_detached(SEVEN_BIT, der, roots(), address=address)
    assert result.status is status
    assert words in result.signature.detail
    assert "the signature matches" in result.signature.detail
    assert result.signer == user.cert


def test_verify_without_signer_certificate() -> None:
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(SEVEN_BIT)
        .add_signer(alice().cert, alice().key, hashes.SHA256())
        .sign(
            serialization.Encoding.DER,
            [
                pkcs7.PKCS7Options.DetachedSignature,
                pkcs7.PKCS7Options.Binary,
                pkcs7.PKCS7Options.NoCerts,
            ],
        )
    )
    result = smime.verify_detached(SEVEN_BIT, der, roots())
    assert result.status is SignatureStatus.UNKNOWN_KEY and result.signer is None
    # A collected certificate fills the gap.
    known = smime.verify_detached(SEVEN_BIT, der, roots(), known_certs=[alice().cert])
    assert known.valid


@pytest.mark.parametrize(
    "variant",
    ["pss", "ecdsa", "sha512", "no-attributes"],
)
def test_verify_algorithms(variant: str) -> None:
    user, digest, rsa_padding, options = alice(), hashes.SHA256(), None, []
    if variant == "pss":
        rsa_padding = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    elif variant == "ecdsa":
        user = make_user(
            "ec@example.org", key=ec.generate_private_key(ec.SECP256R1()), usage="sign"
        )
    elif variant == "sha512":
        digest = hashes.SHA512()
    else:
        options = [pkcs7.PKCS7Options.NoAttributes]
    der = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(SEVEN_BIT)
        .add_signer(user.cert, user.key, digest, rsa_padding=rsa_padding)
        .sign(
            serialization.Encoding.DER,
            [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary, *options],
        )
    )
    good = smime.verify_detached(SEVEN_BIT, der, roots())
    assert good.status is SignatureStatus.VALID, good.signature.detail
    bad = smime.verify_detached(SEVEN_BIT + b"x", der, roots())
    assert bad.status is SignatureStatus.INVALID


def _with_duplicate_san(cert: x509.Certificate) -> bytes:
    """The certificate's DER with its keyUsage OID rewritten to subjectAltName's: a second
    SAN, which cryptography reports only when the extensions are read."""
    der = cert.public_bytes(serialization.Encoding.DER)
    key_usage, san = bytes.fromhex("0603551d0f"), bytes.fromhex("0603551d11")
    assert der.count(key_usage) == 1 and der.count(san) == 1
    return der.replace(key_usage, san)


def test_certificate_with_duplicate_extensions() -> None:
    """Found by scripts/fuzz (cms): a message carrying such a certificate raised
    DuplicateExtension out of verify; now the certificate is unreadable, not a crash."""
    signed = smime.sign(SEVEN_BIT, alice().cert, alice().key)
    der = alice().cert.public_bytes(serialization.Encoding.DER)
    content, signature = _parts(signed)
    bad_signature = signature.replace(der, _with_duplicate_san(alice().cert))
    assert bad_signature != signature
    result = smime.verify_detached(content, bad_signature, roots())
    assert result.status is SignatureStatus.UNKNOWN_KEY and result.signer is None
    with pytest.raises(MalformedData, match="cannot read certificates"):
        smime.parse_certificates(_with_duplicate_san(alice().cert))


def test_verify_rejects_sha1_digest() -> None:
    _, signature = _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))

    def to_sha1(si: cms.SignerInfo) -> None:
        si["digest_algorithm"] = {"algorithm": "sha1"}

    result = smime.verify_detached(SEVEN_BIT, _resign(signature, to_sha1), roots())
    assert result.status is SignatureStatus.INVALID
    assert "sha1" in result.signature.detail


def test_verify_malformed() -> None:
    content, signature = _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))
    for cut in (0, 1, 50, len(signature) - 1):
        with pytest.raises(MalformedData):
            smime.verify_detached(content, signature[:cut], roots())
    enveloped = smime.encrypt_der(ENTITY, [alice().cert])
    with pytest.raises(MalformedData, match="expected CMS signed_data"):
        smime.verify_detached(content, enveloped, roots())
    detached_as_opaque = base64.b64encode(signature)
    with pytest.raises(MalformedData, match="no content"):
        smime.verify_opaque(signature, roots())
    with pytest.raises(MalformedData):
        smime.verify_opaque(detached_as_opaque, roots())
    with pytest.raises(MalformedData, match="not an S/MIME signed"):
        smime.verify_entity(SEVEN_BIT, roots())


def test_classify() -> None:
    assert smime.classify(parse_entity(SEVEN_BIT)) is SmimeKind.OTHER
    unlabelled = smime.encrypt(ENTITY, [alice().cert]).replace(b"smime-type=enveloped-data; ", b"")
    assert smime.classify(parse_entity(unlabelled)) is SmimeKind.ENVELOPED


# --------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_into_decrypt(data: bytes) -> None:
    with pytest.raises(CryptoError):
        smime.decrypt(data, [alice().identity])


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes_into_verify(data: bytes) -> None:
    with pytest.raises(CryptoError):
        smime.verify_detached(SEVEN_BIT, data, roots())
    with pytest.raises(CryptoError):
        smime.verify_opaque(data, roots())


@cache
def _sample_signature() -> bytes:
    return _parts(smime.sign(SEVEN_BIT, alice().cert, alice().key))[1]


@cache
def _sample_envelope() -> bytes:
    return smime.encrypt_der(ENTITY, [alice().cert])


@FUZZ
@given(st.data())
def test_mutated_cms_never_crashes(data: st.DataObject) -> None:
    for sample, call in (
        (_sample_signature(), lambda b: smime.verify_detached(SEVEN_BIT, b, roots())),
        (_sample_envelope(), lambda b: smime.decrypt(b, [alice().identity])),
    ):
        pos = data.draw(st.integers(0, len(sample) - 1))
        value = data.draw(st.integers(0, 255))
        mutated = sample[:pos] + bytes([value]) + sample[pos + 1 :]
        with contextlib.suppress(CryptoError):  # an unsigned spot may still verify
            call(mutated)


@FUZZ
@given(st.binary(min_size=1, max_size=200), st.integers(0, 10_000))
def test_altered_content_never_valid(insert: bytes, where: int) -> None:
    content = SEVEN_BIT
    where %= len(content)
    altered = content[:where] + insert + content[where:]
    result = smime.verify_detached(altered, _sample_signature(), roots())
    assert result.status is SignatureStatus.INVALID
