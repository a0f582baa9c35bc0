"""Scripted IMAP/SMTP endpoints for the ways an upstream can fail or lie.

Each endpoint is a real TCP (and TLS) listener on loopback. It records every
line it received in clear and over TLS, so a test can prove that credentials
never crossed the wire unencrypted.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme


@dataclass
class Script:
    """How the endpoint behaves."""

    protocol: str  # "imap" or "smtp"
    implicit_tls: ssl.SSLContext | None = None  # TLS from the first byte
    starttls: ssl.SSLContext | None = None  # offered and performed with this context
    advertise_starttls: bool = True  # False: STARTTLS is not offered at all
    refuse_starttls: bool = False  # offered, but the command is answered with an error
    inject_after_starttls: bytes = b""  # sent in clear right after the go-ahead
    silent: bool = False  # accept TCP, never say anything (timeouts)
    greeting: bytes | None = None  # override the greeting line


@dataclass
class Endpoint:
    host: str
    port: int
    cleartext: list[bytes] = field(default_factory=list)
    encrypted: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def saw_in_clear(self, word: bytes) -> bool:
        return any(word.upper() in line.upper() for line in self.cleartext)


def start_endpoint(script: Script, host: str = "127.0.0.1") -> Endpoint:
    listener = socket.create_server((host, 0))
    endpoint = Endpoint(host, listener.getsockname()[1], _sock=listener)
    thread = threading.Thread(target=_accept_loop, args=(listener, script, endpoint), daemon=True)
    thread.start()
    return endpoint


def _accept_loop(listener: socket.socket, script: Script, endpoint: Endpoint) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # listener closed: the test is over
        conn.settimeout(15)
        threading.Thread(target=_serve, args=(conn, script, endpoint), daemon=True).start()


def _serve(conn: socket.socket, script: Script, endpoint: Endpoint) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, ValueError), conn:
        if script.silent:
            while conn.recv(4096):
                pass
            return
        session = _Session(conn, script, endpoint)
        if script.implicit_tls is not None:
            session.upgrade(script.implicit_tls)
        session.run()


class _Session:
    def __init__(self, conn: socket.socket, script: Script, endpoint: Endpoint) -> None:
        self.sock: socket.socket = conn
        self.script = script
        self.endpoint = endpoint
        self.tls = False
        self.buffer = b""

    def upgrade(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_side=True)
        self.tls = True

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        (self.endpoint.encrypted if self.tls else self.endpoint.cleartext).append(line)
        return line.rstrip(b"\r")

    def run(self) -> None:
        with contextlib.suppress(EOFError):
            if self.script.protocol == "imap":
                self._imap()
            else:
                self._smtp()

    # -- IMAP: accepts any login, which is the point: it is a trap for clear credentials

    def _imap_caps(self) -> bytes:
        caps = b"IMAP4rev1 AUTH=PLAIN SASL-IR"
        if self.script.advertise_starttls and not self.tls:
            caps += b" STARTTLS"
        return caps

    def _imap(self) -> None:
        self.send(self.script.greeting or b"* OK [CAPABILITY " + self._imap_caps() + b"] ready\r\n")
        while True:
            tag, _, rest = self.line().partition(b" ")
            command = rest.split(b" ")[0].upper()
            if command == b"CAPABILITY":
                self.send(b"* CAPABILITY " + self._imap_caps() + b"\r\n" + tag + b" OK done\r\n")
            elif command == b"STARTTLS" and self.script.starttls and not self.tls:
                self._imap_starttls(tag)
            elif command in (b"LOGIN", b"AUTHENTICATE"):
                self.send(tag + b" OK logged in\r\n")
            elif command == b"LOGOUT":
                self.send(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                return
            else:
                self.send(tag + b" BAD unknown command\r\n")

    def _imap_starttls(self, tag: bytes) -> None:
        if self.script.refuse_starttls:
            self.send(tag + b" NO TLS is not available right now\r\n")
            return
        self.send(tag + b" OK begin TLS\r\n" + self.script.inject_after_starttls)
        assert self.script.starttls is not None
        self.upgrade(self.script.starttls)

    # -- SMTP

    def _smtp(self) -> None:
        self.send(self.script.greeting or b"220 fake.example ESMTP ready\r\n")
        while True:
            line = self.line()
            verb = line.split(b" ")[0].upper()
            if verb in (b"EHLO", b"HELO"):
                self._smtp_ehlo()
            elif verb == b"STARTTLS" and self.script.starttls and not self.tls:
                self._smtp_starttls()
            elif verb == b"AUTH":
                self.send(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"QUIT":
                self.send(b"221 2.0.0 bye\r\n")
                return
            else:
                self.send(b"250 2.0.0 ok\r\n")

    def _smtp_ehlo(self) -> None:
        lines = [b"fake.example", b"AUTH PLAIN LOGIN", b"8BITMIME"]
        if self.script.advertise_starttls and not self.tls:
            lines.append(b"STARTTLS")
        body = b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
        self.send(body)

    def _smtp_starttls(self) -> None:
        if self.script.refuse_starttls:
            self.send(b"454 4.7.0 TLS not available due to temporary reason\r\n")
            return
        self.send(b"220 2.0.0 Ready to start TLS\r\n" + self.script.inject_after_starttls)
        assert self.script.starttls is not None
        self.upgrade(self.script.starttls)


# --------------------------------------------------------------------------- certificates


@dataclass
class TLSMaterial:
    """A trusted CA plus server contexts for every certificate problem."""

    ca: trustme.CA
    ca_file: Path
    other_ca: trustme.CA  # trusted by nobody

    def server_context(
        self,
        cert: trustme.LeafCert,
        tls10_only: bool = False,
        require_client_ca: trustme.CA | None = None,
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(ctx)
        if tls10_only:
            # Only for the "protocol too old" case: OpenSSL 3 needs SECLEVEL=0 for TLS 1.0.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if require_client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            require_client_ca.configure_trust(ctx)
        return ctx

    def good(self) -> trustme.LeafCert:
        return self.ca.issue_cert("localhost", "127.0.0.1", "127.0.0.2")

    def expired(self) -> trustme.LeafCert:
        now = datetime.now(UTC)
        return self.ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        )

    def not_yet_valid(self) -> trustme.LeafCert:
        now = datetime.now(UTC)
        return self.ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now + timedelta(days=1),
            not_after=now + timedelta(days=30),
        )

    def wrong_name(self) -> trustme.LeafCert:
        return self.ca.issue_cert("mail.other.example")

    def untrusted(self) -> trustme.LeafCert:
        return self.other_ca.issue_cert("localhost", "127.0.0.1")


def make_tls_material(directory: Path) -> TLSMaterial:
    ca = trustme.CA(organization_name="localproxy endpoint test CA")
    ca_file = directory / "endpoint-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return TLSMaterial(
        ca=ca, ca_file=ca_file, other_ca=trustme.CA(organization_name="Untrusted Other CA")
    )


def closed_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, so connecting to it is refused."""
    with socket.create_server((host, 0)) as s:
        return s.getsockname()[1]
