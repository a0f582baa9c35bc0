"""`localproxy check` against the real Dovecot and Postfix of the harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localproxy.sandbox.provider import Provider
from tests.harness.endpoints import Script, closed_port, make_tls_material, start_endpoint

pytestmark = pytest.mark.e2e


def write_config(
    directory: Path,
    provider: Provider,
    *,
    imap: tuple[int, str],
    smtp: tuple[int, str],
    user: str = "alice",
    ca_file: Path | None = None,
    host: str | None = None,
) -> Path:
    account = provider.users[user]
    path = directory / "config.toml"
    path.write_text(f"""
[proxy]
data_dir = "{directory / "data"}"

[[account]]
name = "{user}"
addresses = ["{account.address}"]
username = "{account.login}"

[account.upstream.imap]
host = "{host or provider.hostname}"
port = {imap[0]}
security = "{imap[1]}"
ca_file = "{ca_file or provider.ca_file}"

[account.upstream.smtp]
host = "{host or provider.hostname}"
port = {smtp[0]}
security = "{smtp[1]}"
ca_file = "{ca_file or provider.ca_file}"
""")
    return path


def check(
    config: Path, *args: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("LOCALPROXY_PASSWORD", None)
    if password is not None:
        env["LOCALPROXY_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(("imap_mode", "smtp_mode"), [("tls", "starttls"), ("starttls", "tls")])
def test_check_reports_tls13_and_the_test_ca(provider, tmp_path, imap_mode, smtp_mode):
    ports = {
        "imap": {"tls": provider.imaps_port, "starttls": provider.imap_port},
        "smtp": {"tls": provider.submissions_port, "starttls": provider.submission_port},
    }
    config = write_config(
        tmp_path,
        provider,
        imap=(ports["imap"][imap_mode], imap_mode),
        smtp=(ports["smtp"][smtp_mode], smtp_mode),
    )
    result = check(config, "--json", "--login", password=provider.users["alice"].password)
    assert result.returncode == 0, result.stdout + result.stderr
    by_service = {item["service"]: item for item in json.loads(result.stdout)}
    for service, mode in (("imap", imap_mode), ("smtp", smtp_mode)):
        item = by_service[service]
        assert item["ok"] and item["error"] is None
        assert item["tls"]["version"] == "TLSv1.3"
        assert provider.ca_name in item["tls"]["issuer"]
        assert item["tls"]["starttls"] == (mode == "starttls")
        assert item["tls"]["days_left"] > 0
        assert item["login"]["ok"], item
    assert provider.users["alice"].password not in result.stdout + result.stderr


def test_check_table_shows_what_was_negotiated(provider, tmp_path):
    config = write_config(
        tmp_path,
        provider,
        imap=(provider.imap_port, "starttls"),
        smtp=(provider.submission_port, "starttls"),
    )
    result = check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("TLSv1.3", "STARTTLS", provider.ca_name, "pin_sha256", "OK", "expires in"):
        assert text in result.stdout


def test_wrong_password_fails_with_the_providers_answer(provider, tmp_path):
    config = write_config(
        tmp_path,
        provider,
        imap=(provider.imaps_port, "tls"),
        smtp=(provider.submission_port, "starttls"),
    )
    result = check(config, "--json", "--login", password="definitely-wrong")
    assert result.returncode == 1
    items = json.loads(result.stdout)
    for item in items:
        assert item["tls"]["version"] == "TLSv1.3", "TLS was fine, only the login failed"
        assert not item["login"]["ok"]
    imap_item = next(i for i in items if i["service"] == "imap")
    smtp_item = next(i for i in items if i["service"] == "smtp")
    assert "AUTHENTICATIONFAILED" in imap_item["login"]["message"]
    assert smtp_item["login"]["message"].startswith("535")


def test_login_without_password_source_is_a_usage_error(provider, tmp_path):
    config = write_config(
        tmp_path,
        provider,
        imap=(provider.imaps_port, "tls"),
        smtp=(provider.submissions_port, "tls"),
    )
    result = check(config, "--login")
    assert result.returncode == 2
    assert "LOCALPROXY_PASSWORD" in result.stderr


def test_check_fails_against_an_untrusting_ca_bundle(provider, tmp_path):
    other = make_tls_material(tmp_path)  # a CA that did not sign the provider's certificate
    config = write_config(
        tmp_path,
        provider,
        imap=(provider.imaps_port, "tls"),
        smtp=(provider.submission_port, "starttls"),
        ca_file=other.ca_file,
    )
    result = check(config, "--json")
    assert result.returncode == 1
    for item in json.loads(result.stdout):
        assert item["error"]["kind"] == "untrusted-certificate"
        assert f"{provider.hostname}:" in item["error"]["message"]


BAD_ENDPOINTS = {
    # kind: (script factory, security, config extra, expected kind, expected text)
    "expired": ("expired", "tls", "", "certificate-expired", "has expired"),
    "not-yet-valid": ("not_yet_valid", "tls", "", "certificate-not-yet-valid", "not yet valid"),
    "wrong-name": ("wrong_name", "tls", "", "hostname-mismatch", "not valid for the name"),
    "untrusted": ("untrusted", "tls", "", "untrusted-certificate", "is not trusted"),
    "tls10": ("tls10", "tls", "", "protocol-too-old", "does not offer TLS 1.2 or newer"),
    "pin": (
        "good",
        "tls",
        'pin_sha256 = "' + "00" * 32 + '"',
        "pin-mismatch",
        "certificate pin mismatch",
    ),
    "no-starttls": (None, "starttls", "", "starttls-not-offered", "does not offer STARTTLS"),
    "starttls-refused": ("refuse", "starttls", "", "starttls-refused", "refused STARTTLS"),
}


def _bad_script(protocol: str, kind: str | None, tls) -> Script:
    if kind is None:
        return Script(protocol, advertise_starttls=False)
    if kind == "refuse":
        return Script(protocol, starttls=tls.server_context(tls.good()), refuse_starttls=True)
    cert = tls.good() if kind in ("good", "tls10") else getattr(tls, kind)()
    return Script(protocol, implicit_tls=tls.server_context(cert, tls10_only=kind == "tls10"))


@pytest.mark.parametrize("case", sorted(BAD_ENDPOINTS))
def test_check_fails_with_the_right_message_against_each_bad_endpoint(tmp_path, case):
    kind, security, extra, failure, text = BAD_ENDPOINTS[case]
    tls = make_tls_material(tmp_path)
    imap = start_endpoint(_bad_script("imap", kind, tls))
    smtp = start_endpoint(_bad_script("smtp", kind, tls))
    config = tmp_path / "config.toml"
    config.write_text(f"""
[[account]]
name = "bad"
addresses = ["alice@example.org"]
[account.upstream.imap]
host = "localhost"
port = {imap.port}
security = "{security}"
ca_file = "{tls.ca_file}"
{extra}
[account.upstream.smtp]
host = "localhost"
port = {smtp.port}
security = "{security}"
ca_file = "{tls.ca_file}"
{extra}
""")
    try:
        result = check(config, "--json", "--login", password="never-sent-in-clear")
        table = check(config)
    finally:
        imap.close()
        smtp.close()
    assert result.returncode == 1 and table.returncode == 1
    for item in json.loads(result.stdout):
        assert item["error"]["kind"] == failure, item
        assert text in item["error"]["message"]
        assert item["error"]["message"].startswith(f"localhost:{item['port']}: ")
    assert text in " ".join(table.stdout.split())
    for endpoint in (imap, smtp):
        assert not any(b"never-sent-in-clear" in line for line in endpoint.cleartext)


def test_check_names_network_failures(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f"""
[[account]]
name = "down"
addresses = ["alice@example.org"]
[account.upstream.imap]
host = "no-such-host.invalid"
security = "tls"
[account.upstream.smtp]
host = "127.0.0.1"
port = {closed_port()}
security = "starttls"
""")
    result = check(config, "--json")
    assert result.returncode == 1
    errors = {item["service"]: item["error"] for item in json.loads(result.stdout)}
    assert errors["imap"]["kind"] == "dns-failure"
    assert "no-such-host.invalid:993: cannot resolve host name" in errors["imap"]["message"]
    assert errors["smtp"]["kind"] == "connection-refused"


def test_check_unknown_account_is_a_usage_error(provider, tmp_path):
    config = write_config(
        tmp_path,
        provider,
        imap=(provider.imaps_port, "tls"),
        smtp=(provider.submissions_port, "tls"),
    )
    result = check(config, "nobody")
    assert result.returncode == 2
    assert "no account named 'nobody' (configured: alice)" in result.stderr
