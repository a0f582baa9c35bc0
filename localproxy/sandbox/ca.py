"""A throw-away certificate authority and server certificate for the test provider.

trustme gives certificates without a CN on the CA; the organisation name (O=) is ours, so
"issuer is the test CA" is asserted on ``organizationName == CA_NAME`` (it is also a substring
of every rendering of the issuer, e.g. RFC 4514 ``OU=...,O=localproxy Test CA``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509

CA_NAME = "localproxy Test CA"
CA_UNIT = "localproxy test suite"
# Names the server certificate is valid for. 127.0.0.2 exists so tests can reach the provider
# on an address different from the client's source address (Dovecot then enforces TLS).
SERVER_NAMES = ("localhost", "127.0.0.1", "127.0.0.2")


@dataclass(frozen=True)
class TestCA:
    """PEM files of the test CA and of one server certificate it issued."""

    __test__ = False  # not a pytest test class despite the name

    ca_file: Path  # CA certificate (trust anchor for clients)
    ca_key_file: Path  # CA private key, for tests that need to issue more certificates
    cert_file: Path  # server certificate followed by any intermediates
    key_file: Path  # server private key (mode 0600)
    name: str  # organisation name of the CA as it appears in the issuer
    subject: str  # RFC 4514 rendering of the CA subject, e.g. "OU=...,O=localproxy Test CA"

    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_file.read_bytes())


def make_test_ca(directory: Path, names: tuple[str, ...] = SERVER_NAMES) -> TestCA:
    """Create a CA and a server certificate for ``names``; write them as PEM into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name=CA_NAME, organization_unit_name=CA_UNIT)
    leaf = ca.issue_cert(*names, common_name=names[0])
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_key_file = _write_private(directory / "ca.key", ca.private_key_pem.bytes())
    cert_file = directory / "server.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file = _write_private(directory / "server.key", leaf.private_key_pem.bytes())
    subject = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject.rfc4514_string()
    return TestCA(ca_file, ca_key_file, cert_file, key_file, CA_NAME, subject)


def _write_private(path: Path, data: bytes) -> Path:
    # Created 0600 from the start so the key is never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path
