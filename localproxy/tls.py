"""Verified TLS for every upstream connection.

One place decides how localproxy trusts a provider: the OS trust store (via
truststore) or exactly the configured CA bundle, hostname checked, TLS 1.2 or
newer, optional SPKI pin and client certificate. Failures are turned into an
UpstreamError whose message names the host, the port and what went wrong.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from localproxy.config import UpstreamServer

_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL X509_V_ERR_* codes that have their own message.
_X509_EXPIRED = 10
_X509_NOT_YET_VALID = 9
_X509_HOSTNAME_MISMATCH = 62
_X509_UNTRUSTED = {2, 18, 19, 20, 21, 27, 28}


class Failure(StrEnum):
    """Every way an upstream connection can fail, each with its own message."""

    EXPIRED = "certificate-expired"
    NOT_YET_VALID = "certificate-not-yet-valid"
    HOSTNAME_MISMATCH = "hostname-mismatch"
    UNTRUSTED = "untrusted-certificate"
    PIN_MISMATCH = "pin-mismatch"
    STARTTLS_NOT_OFFERED = "starttls-not-offered"
    STARTTLS_REFUSED = "starttls-refused"
    PROTOCOL_TOO_OLD = "protocol-too-old"
    CONNECTION_REFUSED = "connection-refused"
    TIMEOUT = "timeout"
    DNS = "dns-failure"
    CLIENT_CERT = "client-certificate-rejected"
    TLS = "tls-error"
    PROTOCOL = "protocol-error"
    NETWORK = "network-error"


class UpstreamError(Exception):
    """A failed upstream connection, with a message a person can act on."""

    def __init__(self, failure: Failure, host: str, port: int, detail: str) -> None:
        self.failure = failure
        self.host = host
        self.port = port
        self.detail = detail
        super().__init__(f"{host}:{port}: {detail}")


@dataclass(frozen=True)
class TLSInfo:
    """What was negotiated with an upstream server (shown by `check` and `status`)."""

    version: str
    cipher: str
    subject: str
    issuer: str
    not_after: datetime
    spki_sha256: str  # base64, the form a pin is written in
    starttls: bool

    @property
    def days_left(self) -> int:
        return (self.not_after - datetime.now(UTC)).days

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["not_after"] = self.not_after.isoformat()
        out["days_left"] = self.days_left
        return out


# --------------------------------------------------------------------------- client certs


class ClientCertError(ValueError):
    """A client certificate/key pair that cannot be used, described for config errors."""

    def __init__(self, which: str, found: str, expected: str) -> None:
        self.which, self.found, self.expected = which, found, expected
        super().__init__(f"{which}: {found}; expected {expected}")


def load_client_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Check that a PEM certificate and an unencrypted PEM key belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ClientCertError("client_cert", "no PEM certificate", "a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ClientCertError(
            "client_key",
            "a passphrase-protected key",
            "an unencrypted PEM private key (protect it with file permissions)",
        ) from None
    except ValueError:
        raise ClientCertError("client_key", "no PEM private key", "a PEM private key") from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ClientCertError(
            "client_key", "a key that does not match client_cert", "the private key of client_cert"
        )


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- contexts


def client_context(server: UpstreamServer) -> ssl.SSLContext:
    """The SSLContext for one upstream server: verified, TLS >= min_tls, never weaker."""
    if server.ca_file is not None:
        # Exactly this bundle: a private CA must not widen trust to the system store.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(server.ca_file))
    else:
        import truststore

        ctx = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _TLS_VERSIONS[server.min_tls]
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server.client_cert and server.client_key:
        ctx.load_cert_chain(str(server.client_cert), str(server.client_key))
    return ctx


# --------------------------------------------------------------------------- after the handshake


def spki_sha256(cert_der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    return hashlib.sha256(_public_der(cert.public_key())).digest()


def verify_session(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, server: UpstreamServer, starttls: bool
) -> TLSInfo:
    """Check the pin (the chain and name were checked by OpenSSL) and describe the session."""
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:  # cannot happen with CERT_REQUIRED; refuse rather than trust
        raise UpstreamError(
            Failure.UNTRUSTED, server.host, server.port, "the server presented no certificate"
        )
    actual = spki_sha256(der)
    if server.pin_sha256 is not None and actual != server.pin_sha256:
        raise UpstreamError(
            Failure.PIN_MISMATCH,
            server.host,
            server.port,
            "certificate pin mismatch: expected pin_sha256 "
            f"{base64.b64encode(server.pin_sha256).decode()}, "
            f"the server's key is {base64.b64encode(actual).decode()}",
        )
    cert = x509.load_der_x509_certificate(der)
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version() or "unknown",
        cipher=cipher[0] if cipher else "unknown",
        subject=cert.subject.rfc4514_string(),
        issuer=_issuer_name(cert),
        not_after=cert.not_valid_after_utc,
        spki_sha256=base64.b64encode(actual).decode(),
        starttls=starttls,
    )


def _issuer_name(cert: x509.Certificate) -> str:
    for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME):
        values = cert.issuer.get_attributes_for_oid(oid)
        if values:
            return f"{values[0].value} ({cert.issuer.rfc4514_string()})"
    return cert.issuer.rfc4514_string()


# --------------------------------------------------------------------------- classifying failures


def classify(exc: BaseException, server: UpstreamServer) -> UpstreamError:
    """Turn whatever a connect attempt raised into one precise UpstreamError."""
    for cause in _chain(exc):
        if isinstance(cause, UpstreamError):
            return cause
        if (found := _classify_one(cause, server)) is not None:
            return found
    return UpstreamError(
        Failure.NETWORK,
        server.host,
        server.port,
        f"connection failed: {exc.__class__.__name__}: {exc}",
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify_one(exc: BaseException, server: UpstreamServer) -> UpstreamError | None:
    def err(failure: Failure, detail: str) -> UpstreamError:
        return UpstreamError(failure, server.host, server.port, detail)

    if isinstance(exc, ssl.SSLCertVerificationError):
        return _classify_verification(exc, server)
    if isinstance(exc, ssl.SSLError):
        return _classify_ssl(exc, server)
    if isinstance(exc, socket.gaierror):
        return err(Failure.DNS, f"cannot resolve host name {server.host!r} ({exc.strerror})")
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return err(
            Failure.CONNECTION_REFUSED,
            "connection refused: nothing listens on that port (check host and port)",
        )
    if isinstance(exc, TimeoutError):
        return err(Failure.TIMEOUT, f"no answer within {server.timeout:g} s (timeout)")
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return err(Failure.NETWORK, "the server closed the connection unexpectedly")
    return None


def _classify_verification(
    exc: ssl.SSLCertVerificationError, server: UpstreamServer
) -> UpstreamError:
    code, text = exc.verify_code, exc.verify_message or str(exc)
    if code == _X509_EXPIRED:
        failure, detail = Failure.EXPIRED, "the server's certificate has expired"
    elif code == _X509_NOT_YET_VALID:
        failure, detail = Failure.NOT_YET_VALID, "the server's certificate is not yet valid"
    elif code == _X509_HOSTNAME_MISMATCH:
        failure = Failure.HOSTNAME_MISMATCH
        detail = f"the server's certificate is not valid for the name {server.host!r}"
    elif code in _X509_UNTRUSTED:
        failure = Failure.UNTRUSTED
        where = f"the CA bundle {server.ca_file}" if server.ca_file else "the system trust store"
        detail = f"the server's certificate is not trusted by {where} ({text})"
    else:
        failure, detail = Failure.UNTRUSTED, f"certificate verification failed ({text})"
    return UpstreamError(failure, server.host, server.port, detail)


def _classify_ssl(exc: ssl.SSLError, server: UpstreamServer) -> UpstreamError:
    reason = (exc.reason or "").upper()
    old = (
        "UNSUPPORTED_PROTOCOL",
        "PROTOCOL_VERSION",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "WRONG_SSL_VERSION",
    )
    if any(word in reason for word in old):
        return UpstreamError(
            Failure.PROTOCOL_TOO_OLD,
            server.host,
            server.port,
            f"the server does not offer TLS {server.min_tls} or newer "
            "(it only speaks an older, insecure protocol version)",
        )
    if "CERTIFICATE_REQUIRED" in reason or "BAD_CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return UpstreamError(
            Failure.CLIENT_CERT,
            server.host,
            server.port,
            f"the server rejected our client certificate ({exc.reason})",
        )
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return UpstreamError(
            Failure.TLS,
            server.host,
            server.port,
            "the server did not answer with TLS (is it a STARTTLS or "
            'plaintext port? try security = "starttls")',
        )
    return UpstreamError(
        Failure.TLS, server.host, server.port, f"TLS handshake failed ({exc.reason or exc})"
    )
