"""Every way an upstream TLS connection can fail, against real sockets."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from localproxy.config import UpstreamServer
from localproxy.tls import Failure, UpstreamError
from localproxy.upstream import LoginFailed, connect_imap, connect_smtp, imap_login, smtp_login
from tests.harness.endpoints import (
    Endpoint,
    Script,
    TLSMaterial,
    closed_port,
    make_tls_material,
    start_endpoint,
)

PROTOCOLS = ["imap", "smtp"]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    started: list[Endpoint] = []
    yield started
    for endpoint in started:
        endpoint.close()


def upstream(
    endpoint: Endpoint | None, security: str, tls: TLSMaterial, **kw: object
) -> UpstreamServer:
    settings: dict = {
        "host": "localhost",
        "port": endpoint.port if endpoint else 0,
        "security": security,
        "ca_file": tls.ca_file,
        "timeout": 5.0,
    }
    settings.update(kw)
    return UpstreamServer(**settings)


async def connect(protocol: str, server: UpstreamServer):
    if protocol == "imap":
        conn = await connect_imap(server)
        await conn.close()
        return conn.tls
    smtp, info = await connect_smtp(server)
    smtp.close()
    return info


async def failure_of(protocol: str, server: UpstreamServer) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await connect(protocol, server)
    message = str(caught.value)
    assert f"{server.host}:{server.port}" in message, "every error names host and port"
    return caught.value


def serve(endpoints: list[Endpoint], script: Script, host: str = "127.0.0.1") -> Endpoint:
    endpoint = start_endpoint(script, host)
    endpoints.append(endpoint)
    return endpoint


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_verified_connection_reports_tls_details(tls, endpoints, protocol, security):
    ctx = tls.server_context(tls.good())
    script = Script(
        protocol,
        implicit_tls=ctx if security == "tls" else None,
        starttls=ctx if security == "starttls" else None,
    )
    endpoint = serve(endpoints, script)
    info = await connect(protocol, upstream(endpoint, security, tls))
    assert info.version == "TLSv1.3"
    assert "localproxy endpoint test CA" in info.issuer
    assert info.starttls == (security == "starttls")
    assert info.days_left > 0


@pytest.mark.parametrize("pin_format", ["base64", "hex", "hex-colons"])
async def test_matching_pin_is_accepted(tls, endpoints, pin_format):
    cert = tls.good()
    endpoint = serve(endpoints, Script("imap", implicit_tls=tls.server_context(cert)))
    pin = _spki_pin(cert.cert_chain_pems[0].bytes())
    written = {
        "base64": base64.b64encode(pin).decode(),
        "hex": pin.hex(),
        "hex-colons": ":".join(f"{b:02X}" for b in pin),
    }[pin_format]
    from localproxy.config import parse_pin

    info = await connect("imap", upstream(endpoint, "tls", tls, pin_sha256=parse_pin(written)))
    assert info.spki_sha256 == base64.b64encode(pin).decode()


# --------------------------------------------------------------------------- certificate failures


CERT_CASES = [
    ("expired", Failure.EXPIRED, "has expired"),
    ("not_yet_valid", Failure.NOT_YET_VALID, "not yet valid"),
    ("wrong_name", Failure.HOSTNAME_MISMATCH, "not valid for the name 'localhost'"),
    ("untrusted", Failure.UNTRUSTED, "is not trusted by the CA bundle"),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("security", ["tls", "starttls"])
@pytest.mark.parametrize(("cert_kind", "failure", "text"), CERT_CASES)
async def test_certificate_problems_fail_with_their_own_message(
    tls, endpoints, protocol, security, cert_kind, failure, text
):
    ctx = tls.server_context(getattr(tls, cert_kind)())
    script = Script(
        protocol,
        implicit_tls=ctx if security == "tls" else None,
        starttls=ctx if security == "starttls" else None,
    )
    endpoint = serve(endpoints, script)
    error = await failure_of(protocol, upstream(endpoint, security, tls))
    assert error.failure == failure
    assert text in str(error)


async def test_self_signed_certificate_is_untrusted(tls, endpoints, tmp_path):
    self_signed = make_tls_material(tmp_path)  # its own CA acts as the "self-signed" server
    endpoint = serve(
        endpoints, Script("imap", implicit_tls=self_signed.server_context(self_signed.good()))
    )
    error = await failure_of("imap", upstream(endpoint, "tls", tls))
    assert error.failure == Failure.UNTRUSTED


async def test_system_trust_store_rejects_a_private_ca(tls, endpoints):
    endpoint = serve(endpoints, Script("imap", implicit_tls=tls.server_context(tls.good())))
    error = await failure_of("imap", upstream(endpoint, "tls", tls, ca_file=None))
    assert error.failure == Failure.UNTRUSTED
    assert "system trust store" in str(error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pin_mismatch_shows_expected_and_actual(tls, endpoints, protocol):
    cert = tls.good()
    endpoint = serve(endpoints, Script(protocol, implicit_tls=tls.server_context(cert)))
    wrong = hashlib.sha256(b"some other key").digest()
    error = await failure_of(protocol, upstream(endpoint, "tls", tls, pin_sha256=wrong))
    assert error.failure == Failure.PIN_MISMATCH
    actual = base64.b64encode(_spki_pin(cert.cert_chain_pems[0].bytes())).decode()
    assert base64.b64encode(wrong).decode() in str(error)
    assert actual in str(error)


# --------------------------------------------------------------------------- protocol failures


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_tls10_only_server_is_too_old(tls, endpoints, protocol):
    ctx = tls.server_context(tls.good(), tls10_only=True)
    endpoint = serve(endpoints, Script(protocol, implicit_tls=ctx))
    error = await failure_of(protocol, upstream(endpoint, "tls", tls))
    assert error.failure == Failure.PROTOCOL_TOO_OLD
    assert "does not offer TLS 1.2 or newer" in str(error)


async def test_min_tls_13_refuses_a_tls12_server(tls, endpoints):
    import ssl

    ctx = tls.server_context(tls.good())
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    endpoint = serve(endpoints, Script("imap", implicit_tls=ctx))
    error = await failure_of("imap", upstream(endpoint, "tls", tls, min_tls="1.3"))
    assert error.failure == Failure.PROTOCOL_TOO_OLD
    assert "TLS 1.3" in str(error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_starttls_not_offered_is_a_hard_failure(tls, endpoints, protocol):
    endpoint = serve(endpoints, Script(protocol, advertise_starttls=False))
    error = await failure_of(protocol, upstream(endpoint, "starttls", tls))
    assert error.failure == Failure.STARTTLS_NOT_OFFERED
    assert "does not offer STARTTLS" in str(error)
    assert not endpoint.saw_in_clear(b"LOGIN") and not endpoint.saw_in_clear(b"AUTH")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_starttls_refused_is_a_hard_failure(tls, endpoints, protocol):
    ctx = tls.server_context(tls.good())
    endpoint = serve(endpoints, Script(protocol, starttls=ctx, refuse_starttls=True))
    error = await failure_of(protocol, upstream(endpoint, "starttls", tls))
    assert error.failure == Failure.STARTTLS_REFUSED
    assert "not continuing in clear" in str(error)


async def test_imap_preauth_in_clear_is_refused(tls, endpoints):
    endpoint = serve(endpoints, Script("imap", greeting=b"* PREAUTH welcome\r\n"))
    error = await failure_of("imap", upstream(endpoint, "starttls", tls))
    assert error.failure == Failure.STARTTLS_NOT_OFFERED


async def test_data_injected_before_the_tls_handshake_is_refused(tls, endpoints):
    ctx = tls.server_context(tls.good())
    script = Script("imap", starttls=ctx, inject_after_starttls=b"* OK [ALERT] injected\r\n")
    endpoint = serve(endpoints, script)
    error = await failure_of("imap", upstream(endpoint, "starttls", tls))
    assert error.failure == Failure.PROTOCOL
    assert "injection" in str(error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_plaintext_server_on_a_tls_port_is_explained(tls, endpoints, protocol):
    endpoint = serve(endpoints, Script(protocol))
    error = await failure_of(protocol, upstream(endpoint, "tls", tls))
    assert error.failure == Failure.TLS
    assert "did not answer with TLS" in str(error)


# --------------------------------------------------------------------------- network failures


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_connection_refused(tls, protocol, security):
    server = UpstreamServer("127.0.0.1", closed_port(), security, ca_file=tls.ca_file)
    error = await failure_of(protocol, server)
    assert error.failure == Failure.CONNECTION_REFUSED
    assert "connection refused" in str(error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_silent_server_times_out(tls, endpoints, protocol, security):
    endpoint = serve(endpoints, Script(protocol, silent=True))
    error = await failure_of(protocol, upstream(endpoint, security, tls, timeout=1.0))
    assert error.failure == Failure.TIMEOUT
    assert "no answer within 1 s" in str(error)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unknown_host_is_a_dns_failure(tls, protocol):
    server = UpstreamServer("no-such-host.invalid", 993, "tls", ca_file=tls.ca_file, timeout=5)
    error = await failure_of(protocol, server)
    assert error.failure == Failure.DNS
    assert "cannot resolve host name 'no-such-host.invalid'" in str(error)


# --------------------------------------------------------------------------- client certificates


def _client_pair(tls: TLSMaterial, directory: Path) -> tuple[Path, Path]:
    client = tls.ca.issue_cert("alice@example.org", common_name="alice client")
    cert, key = directory / "client.pem", directory / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    return cert, key


async def test_client_certificate_is_presented_when_configured(tls, endpoints, tmp_path):
    ctx = tls.server_context(tls.good(), require_client_ca=tls.ca)
    endpoint = serve(endpoints, Script("imap", implicit_tls=ctx))
    cert, key = _client_pair(tls, tmp_path)
    info = await connect("imap", upstream(endpoint, "tls", tls, client_cert=cert, client_key=key))
    assert info.version == "TLSv1.3"


async def test_missing_client_certificate_is_named(tls, endpoints):
    ctx = tls.server_context(tls.good(), require_client_ca=tls.ca)
    endpoint = serve(endpoints, Script("imap", implicit_tls=ctx))
    error = await failure_of("imap", upstream(endpoint, "tls", tls))
    assert error.failure == Failure.CLIENT_CERT
    assert "client certificate" in str(error)


# ------------------------------------------------------------------ no credentials in clear


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_plaintext_login_trap_on_another_address_never_sees_credentials(
    tls, endpoints, security
):
    """A server on 127.0.0.2 that would gladly take a plaintext LOGIN gets none."""
    trap = serve(endpoints, Script("imap", advertise_starttls=False), host="127.0.0.2")
    server = UpstreamServer("127.0.0.2", trap.port, security, ca_file=tls.ca_file, timeout=5)
    with pytest.raises(UpstreamError):
        conn = await connect_imap(server)
        await imap_login(conn, "alice@example.org", "secret-password")
    assert not any(b"secret-password" in line for line in trap.cleartext)
    assert not trap.saw_in_clear(b"LOGIN") and not trap.saw_in_clear(b"AUTHENTICATE")


async def test_smtp_trap_never_sees_credentials(tls, endpoints):
    trap = serve(endpoints, Script("smtp", advertise_starttls=False), host="127.0.0.2")
    server = UpstreamServer("127.0.0.2", trap.port, "starttls", ca_file=tls.ca_file, timeout=5)
    with pytest.raises(UpstreamError):
        smtp, _ = await connect_smtp(server)
        await smtp_login(smtp, "alice@example.org", "secret-password")
    assert not trap.saw_in_clear(b"AUTH")


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_login_happens_only_after_tls(tls, endpoints, protocol):
    ctx = tls.server_context(tls.good())
    endpoint = serve(endpoints, Script(protocol, starttls=ctx))
    server = upstream(endpoint, "starttls", tls)
    if protocol == "imap":
        conn = await connect_imap(server)
        assert (await imap_login(conn, "alice@example.org", "pw")).startswith("OK")
        await conn.close()
    else:
        smtp, _ = await connect_smtp(server)
        assert (await smtp_login(smtp, "alice@example.org", "pw")).startswith("235")
        smtp.close()
    assert not endpoint.saw_in_clear(b"LOGIN") and not endpoint.saw_in_clear(b"AUTH")
    assert any(b"AUTH" in line.upper() for line in endpoint.encrypted)


async def test_login_rejection_carries_the_providers_text():
    class Reader:
        def __init__(self, lines: list[bytes]) -> None:
            self.lines = lines

        async def readline(self) -> bytes:
            return self.lines.pop(0)

    class Writer:
        def write(self, data: bytes) -> None:
            pass

    from localproxy.upstream import ImapUpstream

    conn = ImapUpstream(
        Reader(
            [
                b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n",  # type: ignore[arg-type]
                b"LP3 OK\r\n",
                b"LP4 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
            ]
        ),
        Writer(),
        b"* OK\r\n",
        None,
    )  # type: ignore[arg-type]
    with pytest.raises(LoginFailed, match=r"AUTHENTICATIONFAILED\] Authentication failed"):
        await imap_login(conn, "alice@example.org", "wrong")


def _spki_pin(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()
