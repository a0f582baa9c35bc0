"""The local TLS certificate: profile, reuse and renewal, a real handshake, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from localproxy import localtls
from localproxy.localtls import (
    MAX_VALIDITY,
    NO_CERTIFICATE_YET,
    LocalCertificate,
    cmd_cert_export,
    cmd_cert_show,
    ensure_local_certificate,
    read_certificate,
    server_context,
)

POSIX = os.name == "posix"

CONFIG = """
[proxy]
data_dir = "{data}"

[[account]]
name = "personal"
addresses = ["Alice@Example.ORG"]
[account.local]
imaps_port = 1993
[account.upstream.imap]
host = "imap.example.org"
security = "tls"
[account.upstream.smtp]
host = "smtp.example.org"
security = "starttls"
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def local(data_dir: Path) -> LocalCertificate:
    return ensure_local_certificate(data_dir)


@pytest.fixture
def config(tmp_path: Path, data_dir: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(data=data_dir.as_posix()))
    return path


def cert_of(local: LocalCertificate) -> x509.Certificate:
    return read_certificate(local.cert_path)


# --------------------------------------------------------------------------- create / reuse


def test_created_on_first_use_then_reused(data_dir: Path):
    first = ensure_local_certificate(data_dir)
    second = ensure_local_certificate(data_dir)
    assert first.renewal_reason == NO_CERTIFICATE_YET
    assert second.renewal_reason is None
    assert second.sha256_fingerprint == first.sha256_fingerprint
    assert first.cert_path == data_dir / "local-tls" / "cert.pem"
    assert first.key_path == data_dir / "local-tls" / "key.pem"


def test_only_the_pair_and_the_lock_are_left_behind(local: LocalCertificate):
    names = {p.name for p in local.cert_path.parent.iterdir()}
    assert names <= {"cert.pem", "key.pem", ".lock"} and {"cert.pem", "key.pem"} <= names


@pytest.mark.skipif(not POSIX, reason="POSIX file modes")
def test_directory_and_key_are_private(local: LocalCertificate):
    assert stat.S_IMODE(local.cert_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(local.key_path.stat().st_mode) == 0o600


@pytest.mark.skipif(not POSIX, reason="POSIX file modes")
def test_loose_modes_are_tightened_on_reuse(local: LocalCertificate, data_dir: Path):
    local.key_path.chmod(0o644)
    local.cert_path.parent.chmod(0o755)
    ensure_local_certificate(data_dir)
    assert stat.S_IMODE(local.cert_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(local.key_path.stat().st_mode) == 0o600


def test_description_matches_the_file(local: LocalCertificate):
    cert = cert_of(local)
    digest = cert.fingerprint(hashes.SHA256())
    assert local.sha256_fingerprint == digest.hex(":").upper()
    assert len(local.sha256_fingerprint) == 32 * 3 - 1
    assert local.not_after == cert.not_valid_after_utc
    assert local.subject == cert.subject.rfc4514_string()


# --------------------------------------------------------------------------- profile


def test_is_not_a_ca(local: LocalCertificate):
    ext = cert_of(local).extensions.get_extension_for_class(x509.BasicConstraints)
    assert ext.critical and ext.value.ca is False


def test_key_usage_is_digital_signature_only(local: LocalCertificate):
    ext = cert_of(local).extensions.get_extension_for_class(x509.KeyUsage)
    usage = ext.value
    assert ext.critical and usage.digital_signature
    assert not (usage.key_cert_sign or usage.crl_sign or usage.key_encipherment)


def test_extended_key_usage_is_server_auth(local: LocalCertificate):
    ext = cert_of(local).extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(ext.value) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_names_localhost_and_loopback_addresses(local: LocalCertificate):
    san = cert_of(local).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert localtls.certificate_names(cert_of(local)) == [
        "DNS:localhost",
        "IP:127.0.0.1",
        "IP:::1",
    ]


def test_subject_key_signature_and_serial(local: LocalCertificate):
    cert = cert_of(local)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert cn.startswith("localproxy on ") and org == "localproxy"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # self-signed
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert 0 < cert.serial_number < 2**159  # positive and at most 20 DER bytes


def test_validity_within_apples_limit_and_backdated(local: LocalCertificate):
    cert = cert_of(local)
    now = datetime.now(UTC)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=825)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= timedelta(days=800)
    assert now - timedelta(minutes=30) < cert.not_valid_before_utc < now - timedelta(minutes=1)


def test_validity_above_the_limit_is_refused(data_dir: Path):
    with pytest.raises(ValueError):
        ensure_local_certificate(data_dir, validity=MAX_VALIDITY + timedelta(days=1))


def test_serials_differ(tmp_path: Path):
    one = cert_of(ensure_local_certificate(tmp_path / "a"))
    two = cert_of(ensure_local_certificate(tmp_path / "b"))
    assert one.serial_number != two.serial_number


# --------------------------------------------------------------------------- renewal


def test_renewed_when_it_expires_within_30_days(data_dir: Path):
    short = ensure_local_certificate(data_dir, validity=timedelta(days=10))
    renewed = ensure_local_certificate(data_dir)
    assert renewed.renewal_reason is not None and "within 30 days" in renewed.renewal_reason
    assert renewed.sha256_fingerprint != short.sha256_fingerprint
    assert renewed.not_after - datetime.now(UTC) > timedelta(days=800)
    assert ensure_local_certificate(data_dir).renewal_reason is None


def test_not_renewed_with_more_than_30_days_left(data_dir: Path):
    ensure_local_certificate(data_dir, validity=timedelta(days=40))
    assert ensure_local_certificate(data_dir).renewal_reason is None


def test_renewed_when_the_key_does_not_match(local: LocalCertificate, data_dir: Path):
    other = ec.generate_private_key(ec.SECP256R1())
    local.key_path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    renewed = ensure_local_certificate(data_dir)
    assert renewed.renewal_reason == "certificate and key do not belong together"
    assert renewed.sha256_fingerprint != local.sha256_fingerprint
    server_context(renewed)  # the new pair loads


@pytest.mark.parametrize("damaged", ["cert.pem", "key.pem"])
def test_renewed_when_a_file_is_garbage(local: LocalCertificate, data_dir: Path, damaged: str):
    (local.cert_path.parent / damaged).write_bytes(b"\x00garbage, not PEM\n")
    renewed = ensure_local_certificate(data_dir)
    assert renewed.renewal_reason is not None
    assert renewed.renewal_reason.startswith(f"{damaged} is unreadable")
    server_context(renewed)


def test_renewed_when_the_key_is_missing(local: LocalCertificate, data_dir: Path):
    local.key_path.unlink()
    renewed = ensure_local_certificate(data_dir)
    assert renewed.renewal_reason is not None and "key.pem is unreadable" in renewed.renewal_reason


def test_renewal_is_logged(data_dir: Path, caplog: pytest.LogCaptureFixture):
    ensure_local_certificate(data_dir, validity=timedelta(days=1))
    with caplog.at_level("WARNING", logger="localproxy.localtls"):
        ensure_local_certificate(data_dir)
    assert "must trust the new one" in caplog.text and "within 30 days" in caplog.text


def test_a_crash_while_writing_leaves_the_old_pair_whole(
    local: LocalCertificate, data_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    old_key = local.key_path.read_bytes()
    local.cert_path.write_bytes(b"garbage")  # forces a renewal

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(localtls.os, "replace", crash)
    with pytest.raises(localtls.LocalTLSError, match="No space left on device"):
        ensure_local_certificate(data_dir)
    assert local.key_path.read_bytes() == old_key  # never a half-written key
    assert not [p for p in local.key_path.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    recovered = ensure_local_certificate(data_dir)
    assert recovered.renewal_reason is not None
    server_context(recovered)


# --------------------------------------------------------------------------- TLS handshake


def test_server_context_requires_tls_1_2(local: LocalCertificate):
    context = server_context(local)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # clients are not asked for certificates


def client_context(local: LocalCertificate) -> ssl.SSLContext:
    """A client that trusts exactly the exported PEM, with Python 3.13's strict checks."""
    pem = cert_of(local).public_bytes(serialization.Encoding.PEM).decode()
    context = ssl.create_default_context(cadata=pem)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


async def handshake(local: LocalCertificate, host: str, server_hostname: str) -> bytes:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK localproxy\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, host, 0, ssl=server_context(local))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=client_context(local), server_hostname=server_hostname
            ),
            timeout=10,
        )
        line = await reader.readline()
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        assert version in ("TLSv1.2", "TLSv1.3")
        return line
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
async def test_handshake_on_loopback_verifies(local: LocalCertificate, server_hostname: str):
    assert await handshake(local, "127.0.0.1", server_hostname) == b"* OK localproxy\r\n"


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_handshake_on_ipv6_loopback_verifies(local: LocalCertificate):
    assert await handshake(local, "::1", "::1") == b"* OK localproxy\r\n"


async def test_handshake_for_another_name_fails(local: LocalCertificate):
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(local, "127.0.0.1", "imap.example.org")


# --------------------------------------------------------------------------- CLI handlers


def namespace(config: Path, **kwargs: object) -> argparse.Namespace:
    return argparse.Namespace(config=str(config), **kwargs)


def test_export_prints_only_the_certificate_and_instructions_on_stderr(
    config: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
):
    assert cmd_cert_export(namespace(config, output=None)) == 0
    out, err = capsys.readouterr()
    cert = x509.load_pem_x509_certificate(out.encode())
    assert out.startswith("-----BEGIN CERTIFICATE-----")
    assert out.strip().endswith("-----END CERTIFICATE-----") and out.count("BEGIN") == 1
    local = ensure_local_certificate(data_dir)
    assert cert.fingerprint(hashes.SHA256()).hex(":").upper() == local.sha256_fingerprint
    assert "PRIVATE KEY" not in out + err
    assert local.sha256_fingerprint in err
    assert localtls.fingerprint(cert, hashes.SHA1()) in err  # Windows shows the SHA-1
    assert "security add-trusted-cert -r trustRoot -p ssl -k" in err
    assert "certutil -user -addstore Root localproxy.pem" in err
    assert "Thunderbird" in err and "localhost:1993" in err
    assert "update-ca-certificates" in err


def test_export_to_a_file(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    target = tmp_path / "my cert.pem"
    assert cmd_cert_export(namespace(config, output=target)) == 0
    out, err = capsys.readouterr()
    x509.load_pem_x509_certificate(target.read_bytes())
    assert b"PRIVATE" not in target.read_bytes()
    assert f"Certificate written to {target}" in out
    assert f"'{target}'" in out  # quoted for the shell
    assert err == ""


def test_show_prints_path_names_fingerprint_and_expiry(
    config: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch
):
    monkeypatch.setenv("COLUMNS", "200")
    assert cmd_cert_show(namespace(config)) == 0
    first = capsys.readouterr().out
    assert "Created a new local certificate" in first
    assert cmd_cert_show(namespace(config)) == 0
    out = capsys.readouterr().out
    local = ensure_local_certificate(data_dir)
    assert "Created" not in out
    assert str(local.cert_path) in out
    assert local.sha256_fingerprint in out
    assert localtls.fingerprint(cert_of(local), hashes.SHA1()) in out
    assert "DNS:localhost, IP:127.0.0.1, IP:::1" in out
    assert f"{local.not_after:%Y-%m-%d}" in out
    assert "CN=localproxy on " in out


def test_fingerprints_are_printed_verbatim(
    config: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch
):
    # rich turns ":cd:" into an emoji unless told not to; a fingerprint often contains it.
    local = ensure_local_certificate(data_dir)
    fake = "CD:" * 31 + "CD"
    monkeypatch.setattr(localtls, "fingerprint", lambda *_: fake)
    monkeypatch.setattr(
        localtls, "ensure_local_certificate", lambda _d: replace(local, sha256_fingerprint=fake)
    )
    monkeypatch.setenv("COLUMNS", "200")
    cmd_cert_show(namespace(config))
    cmd_cert_export(namespace(config, output=None))
    out, err = capsys.readouterr()
    assert out.count(fake) == 2 and err.count(fake) == 2


def test_show_reports_a_renewal(config: Path, data_dir: Path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    ensure_local_certificate(data_dir, validity=timedelta(days=3))
    assert cmd_cert_show(namespace(config)) == 0
    out = capsys.readouterr().out
    assert "Replaced the local certificate" in out and "must trust the new one" in out


# --------------------------------------------------------------------------- CLI subprocess


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "localproxy", *args],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def cert_command_registered() -> bool:
    help_text = run_cli("--help").stdout.decode()
    return any(line.split()[:1] == ["cert"] for line in help_text.splitlines())


@pytest.fixture
def wired() -> None:
    if not cert_command_registered():
        pytest.skip("`cert` is not yet registered in localproxy/cli.py")


@pytest.mark.usefixtures("wired")
def test_cli_export_yields_a_clean_pem(config: Path):
    result = run_cli("--config", str(config), "cert", "export")
    assert result.returncode == 0, result.stderr.decode()
    x509.load_pem_x509_certificate(result.stdout)
    assert result.stdout.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"security add-trusted-cert" in result.stderr
    assert b"certutil -user -addstore Root" in result.stderr


@pytest.mark.usefixtures("wired")
def test_cli_show(config: Path, data_dir: Path):
    result = run_cli("--config", str(config), "cert", "show")
    assert result.returncode == 0, result.stderr.decode()
    local = ensure_local_certificate(data_dir)
    assert local.sha256_fingerprint.encode() in result.stdout
