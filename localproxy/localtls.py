"""The self-signed certificate localproxy shows mail clients on 127.0.0.1.

Some clients (Outlook, Apple Mail) insist on TLS even to localhost, so the local
STARTTLS and implicit-TLS listeners present one certificate that the user trusts
once. It is deliberately *not* a CA: it names only localhost, 127.0.0.1 and ::1
and cannot sign other certificates, so a stolen key cannot impersonate any real
server. It is created on first use, reused afterwards, and replaced when it is
about to expire or the files are damaged; every replacement says why, because the
user has to trust the new certificate again.

`localproxy cert show` and `localproxy cert export` (see `add_cert_commands`) let
the user inspect the certificate and install it in the OS or mail client.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shlex
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.markup import escape

from localproxy.config import Config, load_config, resolve_config_path

log = logging.getLogger(__name__)

TLS_DIR_NAME = "local-tls"
CERT_FILE_NAME = "cert.pem"
KEY_FILE_NAME = "key.pem"
# Apple rejects TLS server certificates valid for more than 825 days (rule for
# certificates issued after 2019-07-01); stay a little below it.
MAX_VALIDITY = timedelta(days=825)
VALIDITY = timedelta(days=820)
RENEW_BEFORE = timedelta(days=30)
BACKDATE = timedelta(minutes=5)  # a client whose clock runs slightly behind still accepts it
DNS_NAMES = ("localhost",)
IP_ADDRESSES = ("127.0.0.1", "::1")
NO_CERTIFICATE_YET = "no certificate yet"
_CN_MAX = 64  # X.520 upper bound for commonName


class LocalTLSError(Exception):
    """The local certificate cannot be created or read; printed as one line, exit 1."""


@dataclass(frozen=True)
class LocalCertificate:
    """The certificate the local listeners present, and where its files are."""

    cert_path: Path
    key_path: Path
    sha256_fingerprint: str  # "AB:CD:...", as browsers and OS dialogs show it
    not_after: datetime
    subject: str
    renewal_reason: str | None = None  # why it was (re)created just now; None when reused


# --------------------------------------------------------------------------- create / reuse


def ensure_local_certificate(data_dir: Path, *, validity: timedelta = VALIDITY) -> LocalCertificate:
    """The local certificate under data_dir/local-tls, created or renewed when needed.

    `validity` exists for tests (a short-lived certificate to exercise renewal).
    """
    if validity > MAX_VALIDITY:
        raise ValueError(f"validity {validity.days} days exceeds {MAX_VALIDITY.days}")
    directory = data_dir / TLS_DIR_NAME
    cert_path, key_path = directory / CERT_FILE_NAME, directory / KEY_FILE_NAME
    try:
        _make_private_dir(directory)
        with _exclusive(directory):
            reason = _reason_to_renew(cert_path, key_path, datetime.now(UTC))
            if reason is None:
                key_path.chmod(0o600)  # tighten rather than refuse: the key is ours
                return _describe(cert_path, key_path, read_certificate(cert_path), None)
            cert = _create(cert_path, key_path, validity)
    except OSError as exc:
        raise LocalTLSError(f"{exc.filename or directory}: {_reason(exc)}") from exc
    if reason == NO_CERTIFICATE_YET:
        log.info("created local TLS certificate %s", cert_path)
    else:
        log.warning(
            "renewed local TLS certificate %s (%s); mail clients must trust the new one",
            cert_path,
            reason,
        )
    return _describe(cert_path, key_path, cert, reason)


def _reason_to_renew(cert_path: Path, key_path: Path, now: datetime) -> str | None:
    """Why the pair on disk cannot be used as it is, or None when it can."""
    if not cert_path.exists() and not key_path.exists():
        return NO_CERTIFICATE_YET
    try:
        cert = read_certificate(cert_path)
    except (OSError, ValueError) as exc:
        return f"{cert_path.name} is unreadable ({_reason(exc)})"
    try:
        key_pem = key_path.read_bytes()
    except OSError as exc:
        return f"{key_path.name} is unreadable ({_reason(exc)})"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"{key_path.name} is unreadable (not an unencrypted PEM private key)"
    if _spki(key.public_key()) != _spki(cert.public_key()):
        return "certificate and key do not belong together"
    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_after_utc <= now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return f"expires on {cert.not_valid_after_utc:%Y-%m-%d}, within {RENEW_BEFORE.days} days"
    return None


def _create(cert_path: Path, key_path: Path, validity: timedelta) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_certificate(key, datetime.now(UTC), validity)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # the proxy starts unattended; the 0700 dir guards it
    )
    # Key first: a crash between the two renames leaves a mismatched pair, which the
    # next start detects and replaces, never a half-written key.
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert


def build_certificate(
    key: ec.EllipticCurvePrivateKey, now: datetime, validity: timedelta = VALIDITY
) -> x509.Certificate:
    """A self-signed TLS server certificate for localhost that is not a CA."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "localproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name()),
        ]
    )
    public_key = key.public_key()
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key)
    not_before = now - BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())  # 159 random bits: positive, 20 bytes
        .not_valid_before(not_before)
        .not_valid_after(not_before + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_digital_signature_only(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alternative_names()), critical=False)
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256())


def _common_name() -> str:
    host = socket.gethostname().split(".")[0] or "this computer"
    return f"localproxy on {host}"[:_CN_MAX]


def _digital_signature_only() -> x509.KeyUsage:
    # ECDHE with an ECDSA key only signs; keyEncipherment is for RSA key transport.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _alternative_names() -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in DNS_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in IP_ADDRESSES]
    return names


# --------------------------------------------------------------------------- reading


def read_certificate(path: Path) -> x509.Certificate:
    """The certificate in a PEM file (ValueError when it is not one)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise ValueError("not a PEM certificate") from None


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The subjectAltName entries as "DNS:localhost", "IP:127.0.0.1", ..."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    return dns + [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]


def fingerprint(cert: x509.Certificate, algorithm: hashes.HashAlgorithm) -> str:
    """Colon-separated upper-case hex of the certificate's digest."""
    return cert.fingerprint(algorithm).hex(":").upper()


def _describe(
    cert_path: Path, key_path: Path, cert: x509.Certificate, reason: str | None
) -> LocalCertificate:
    return LocalCertificate(
        cert_path=cert_path,
        key_path=key_path,
        sha256_fingerprint=fingerprint(cert, hashes.SHA256()),
        not_after=cert.not_valid_after_utc,
        subject=cert.subject.rfc4514_string(),
        renewal_reason=reason,
    )


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- server side


def server_context(cert: LocalCertificate) -> ssl.SSLContext:
    """A server-side context for the local listeners: TLS 1.2 or newer, this pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert.cert_path, cert.key_path)
    return context


# --------------------------------------------------------------------------- files


def _make_private_dir(directory: Path) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # as the key store does
    directory.mkdir(exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # mkdir's mode is masked by umask and ignored if it exists


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write through a temp file in the same directory, then rename over `path`."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp creates it 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.chmod(mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """One process at a time decides and (re)creates, e.g. the proxy and `cert show`."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; each file is still replaced whole
        yield
        return
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


# --------------------------------------------------------------------------- CLI


def add_cert_commands(commands: argparse._SubParsersAction) -> None:
    cert = commands.add_parser(
        "cert",
        help="show or export the local TLS certificate mail clients see",
        description="The self-signed certificate localproxy presents to your mail client "
        "on 127.0.0.1 (STARTTLS and implicit-TLS ports). It is created on first use, "
        f"renewed {RENEW_BEFORE.days} days before it expires, valid only for localhost, "
        "127.0.0.1 and ::1, and not a CA.",
    )
    sub = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "show", help="show files, names, SHA-256 fingerprint and expiry (creating it if needed)"
    )
    p.set_defaults(handler=cmd_cert_show)

    p = sub.add_parser(
        "export",
        help="print the certificate (never the key) and how to trust it",
        description="Print the certificate as PEM, never the key, and how to make your OS "
        "or mail client trust it. The PEM goes to stdout (instructions to stderr, so "
        "`localproxy cert export > localproxy.pem` yields a clean file) or to -o FILE.",
    )
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.set_defaults(handler=cmd_cert_export)


def cmd_cert_show(args: argparse.Namespace) -> int:
    config = _config(args)
    local = ensure_local_certificate(config.proxy.data_dir)
    cert = _read(local)
    console = _console()
    if local.renewal_reason:
        console.print(_renewal_note(local.renewal_reason), soft_wrap=True)
    # One line per field, never re-wrapped by rich, so a fingerprint copies in one piece.
    for label, value in _details(local, cert):
        console.print(f"[bold]{label:<12}[/]{value}", soft_wrap=True)
    console.print(
        "Trust it in your mail client: [bold]localproxy cert export -o localproxy.pem[/]",
        soft_wrap=True,
    )
    return 0


def cmd_cert_export(args: argparse.Namespace) -> int:
    config = _config(args)
    local = ensure_local_certificate(config.proxy.data_dir)
    cert = _read(local)
    pem = cert.public_bytes(serialization.Encoding.PEM)  # re-encoded: only the certificate
    if args.output:
        try:
            args.output.write_bytes(pem)
        except OSError as exc:
            raise LocalTLSError(f"{args.output}: {_reason(exc)}") from exc
        instructions, target = _console(), args.output
    else:
        sys.stdout.buffer.write(pem)
        sys.stdout.flush()
        instructions, target = _console(stderr=True), Path("localproxy.pem")
    if local.renewal_reason:
        instructions.print(_renewal_note(local.renewal_reason), soft_wrap=True)
    text = trust_instructions(local, cert, target, _tls_ports(config), saved=bool(args.output))
    instructions.print(text, markup=False, soft_wrap=True)
    return 0


def trust_instructions(
    local: LocalCertificate,
    cert: x509.Certificate,
    target: Path,
    tls_ports: Sequence[int] = (),
    *,
    saved: bool = True,
) -> str:
    """How to make each OS and mail client trust the certificate saved at `target`."""
    posix_file, windows_file = shlex.quote(str(target)), _windows_quote(str(target))
    address = f"localhost:{tls_ports[0]}" if tls_ports else "localhost:PORT (an imaps_port)"
    if saved:
        first = f"Certificate written to {target}."
    else:
        first = f"Save the PEM above as {target}, e.g. `localproxy cert export > {target}`."
    lines = [
        first,
        f"SHA-256 fingerprint: {local.sha256_fingerprint}",
        "It is valid only for localhost, 127.0.0.1 and ::1 and is not a CA, so trusting it",
        "lets nothing else pose as a real server.",
        "",
        "macOS (Apple Mail, Outlook): trust it for TLS in your login keychain",
        "(macOS asks for your password; no sudo):",
        "  security add-trusted-cert -r trustRoot -p ssl "
        f"-k ~/Library/Keychains/login.keychain-db {posix_file}",
        "",
        "Windows (Outlook, Windows Mail, eM Client): add it to your own Trusted Root store:",
        f"  certutil -user -addstore Root {windows_file}",
        "  Windows asks to confirm and shows the SHA-1 thumbprint, which must be",
        f"  {fingerprint(cert, hashes.SHA1())}",
        "",
        "Thunderbird (any OS; it keeps its own list and ignores the system's):",
        '  On the first connection it offers "Add Security Exception": check the SHA-256',
        '  fingerprint above, keep "Permanently store this exception" ticked, and confirm.',
        "  Or beforehand: Settings > Privacy & Security > Certificates > Manage Certificates >",
        f"  Servers > Add Exception, location {address}, Get Certificate, Confirm.",
        "",
        "Linux:",
        "  Evolution, Geary, KMail, Claws Mail, mutt: accept the certificate when first asked,",
        "  after checking the SHA-256 fingerprint above.",
        "  For clients that use the system store on Debian/Ubuntu:",
        f"  sudo cp {posix_file} /usr/local/share/ca-certificates/localproxy.crt"
        " && sudo update-ca-certificates",
        "  Fedora, Arch and other p11-kit systems (`trust anchor`) leave certificates that",
        '  are not CAs out of their TLS bundle: use the client\'s own "accept" there.',
        "",
        f"localproxy renews it {RENEW_BEFORE.days} days before it expires "
        f"({local.not_after:%Y-%m-%d}); trust the new one then.",
    ]
    return "\n".join(lines)


def _details(local: LocalCertificate, cert: x509.Certificate) -> list[tuple[str, str]]:
    days_left = (local.not_after - datetime.now(UTC)).days
    return [
        ("Certificate", escape(str(local.cert_path))),
        ("Key", f"{escape(str(local.key_path))} [dim](never exported)[/]"),
        ("Subject", escape(local.subject)),
        ("Names", escape(", ".join(certificate_names(cert)))),
        ("SHA-256", local.sha256_fingerprint),
        ("SHA-1", f"{fingerprint(cert, hashes.SHA1())} [dim](Windows thumbprint)[/]"),
        ("Valid from", f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"),
        (
            "Expires",
            f"{local.not_after:%Y-%m-%d %H:%M} UTC (in {days_left} days; "
            f"renewed {RENEW_BEFORE.days} days before)",
        ),
    ]


def _console(stderr: bool = False) -> Console:
    # emoji=False: rich would turn ":CD:" inside a fingerprint into an emoji.
    return Console(stderr=stderr, highlight=False, emoji=False)


def _renewal_note(reason: str) -> str:
    if reason == NO_CERTIFICATE_YET:
        return "[green]Created a new local certificate.[/]"
    return (
        f"[yellow]Replaced the local certificate[/] ({escape(reason)}): "
        "mail clients must trust the new one."
    )


def _read(local: LocalCertificate) -> x509.Certificate:
    try:
        return read_certificate(local.cert_path)
    except (OSError, ValueError) as exc:
        raise LocalTLSError(f"{local.cert_path}: {_reason(exc)}") from exc


def _tls_ports(config: Config) -> list[int]:
    ports = (a.local.imaps_port for a in config.accounts)
    return sorted({p for p in ports if p is not None})


def _windows_quote(path: str) -> str:
    return f'"{path}"' if " " in path else path


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))
