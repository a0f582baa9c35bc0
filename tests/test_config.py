"""Config loading and validation: every mistake reported precisely, all at once."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from localproxy.config import (
    ConfigError,
    config_as_dict,
    dump_toml,
    load_config,
    parse_config,
    parse_pin,
    resolve_config_path,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

MINIMAL = """
[[account]]
name = "personal"
addresses = ["Alice@Example.ORG"]
[account.upstream.imap]
host = "imap.example.org"
security = "tls"
[account.upstream.smtp]
host = "smtp.example.org"
security = "starttls"
"""


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return [p.render(caught.value.source) for p in caught.value.problems]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localproxy", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


# --------------------------------------------------------------------------- valid configs


def test_example_config_loads_and_documents_every_key():
    config = load_config(EXAMPLE)
    account = config.account("personal")
    assert account.imap.port == 993 and account.imap.security == "tls"
    assert account.local.host == "127.0.0.1" and not account.local.allow_remote
    text = EXAMPLE.read_text()
    for key in (
        "data_dir",
        "log_level",
        "imap_port",
        "smtp_port",
        "security",
        "ca_file",
        "pin_sha256",
        "client_cert",
        "client_key",
        "min_tls",
        "encrypt",
        "sign",
        "imaps_port",
        "smtps_port",
        "allow_remote",
        "username",
        "timeout",
    ):
        assert key in text, f"config.example.toml does not document {key}"


def test_defaults_are_filled_in(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    account = config.accounts[0]
    assert account.addresses == ("Alice@example.org",), "domain lowercased, local part kept"
    assert account.login == "Alice@example.org"
    assert (account.imap.port, account.smtp.port) == (993, 587)
    assert account.imap.min_tls == "1.2"
    assert (account.local.imap_port, account.local.smtp_port) == (1143, 1025)
    assert config.policy.encrypt == "opportunistic" and config.policy.sign == "encrypted"
    assert config.proxy.data_dir.name == "localproxy"


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = MINIMAL.replace('security = "tls"', 'security = "tls"\nca_file = "ca.pem"')
    config = load_config(write(tmp_path, text))
    assert config.accounts[0].imap.ca_file == tmp_path / "ca.pem"


def test_show_output_round_trips(tmp_path):
    config = load_config(EXAMPLE)
    again = parse_config(tomllib.loads(dump_toml(config_as_dict(config))))
    assert config_as_dict(again) == config_as_dict(config)


# --------------------------------------------------------------------------- mistakes


def test_several_problems_are_reported_at_once(tmp_path):
    found = problems(
        tmp_path,
        """
[proxy]
log_levl = "info"
[[account]]
name = "personal"
addresses = ["alice@example"]
[account.local]
imap_port = 1143
smtp_port = "1025"
[account.upstream.imap]
host = "imap.example.org"
port = 99999
security = "tls"
[account.upstream.smtp]
host = "smtp.example.org"
security = "plaintext"
""",
    )
    joined = "\n".join(found)
    assert len(found) == 5, joined
    assert "proxy.log_levl: found an unknown key; expected 'log_level' (did you mean it?)" in joined
    assert (
        "account[0].addresses[0]: found 'alice@example' (string); expected an e-mail address"
        in joined
    )
    assert "account[0].local.smtp_port: found '1025' (string); expected a port number" in joined
    assert (
        "account[0].upstream.imap.port: found 99999 (integer); expected a port number from 1 "
        "to 65535" in joined
    )
    assert (
        "account[0].upstream.smtp.security: found 'plaintext' (string); expected \"tls\" or "
        '"starttls": localproxy never talks to a provider without TLS' in joined
    )
    assert all(line.startswith(f"{tmp_path / 'config.toml'}: ") for line in found)


def test_port_clash_between_accounts_names_both(tmp_path):
    second = (
        MINIMAL.replace('"personal"', '"work"').replace("Alice", "bob")
        + "[account.local]\nimap_port = 1025\nsmtp_port = 1026\n"
    )
    found = problems(tmp_path, MINIMAL + second)
    assert found == [
        f"{tmp_path / 'config.toml'}: account[1].local.imap_port: found 1025; "
        "expected a port not already used by account[0].local.smtp_port"
    ]


def test_duplicate_account_names(tmp_path):
    second = MINIMAL + "[account.local]\nimap_port = 2143\nsmtp_port = 2025\n"
    found = problems(tmp_path, MINIMAL + second)
    assert any(
        "account[1].name: found 'personal'; expected a name not already used by account[0]" in line
        for line in found
    )


def test_non_loopback_listener_needs_allow_remote(tmp_path):
    found = problems(tmp_path, MINIMAL + '[account.local]\nhost = "0.0.0.0"\n')
    assert "account[0].local.host: found '0.0.0.0'; expected a loopback address" in found[0]
    ok = load_config(write(tmp_path, MINIMAL + '[account.local]\nhost = "::1"\n'))
    assert ok.accounts[0].local.host == "::1"


@pytest.mark.parametrize("value", ['"1.0"', '"1.1"', "1.0", '"ssl3"'])
def test_tls_older_than_12_cannot_be_configured(tmp_path, value):
    text = MINIMAL.replace('security = "tls"', f'security = "tls"\nmin_tls = {value}')
    found = problems(tmp_path, text)
    assert "upstream.imap.min_tls" in found[0]
    assert "older TLS versions are never allowed" in found[0]


@pytest.mark.parametrize("word", ["none", "plain", "off"])
def test_there_is_no_plaintext_upstream(tmp_path, word):
    found = problems(tmp_path, MINIMAL.replace('security = "tls"', f'security = "{word}"'))
    assert "never talks to a provider without TLS" in found[0]


def test_missing_required_keys(tmp_path):
    found = problems(tmp_path, '[[account]]\nname = "x"\n')
    joined = "\n".join(found)
    assert "account[0].addresses: found nothing; expected a list of e-mail addresses" in joined
    assert "account[0].upstream: found nothing; expected a [account[0].upstream] table" in joined


def test_invalid_toml_shows_line_and_column(tmp_path):
    found = problems(tmp_path, '[proxy]\nlog_level = "info\n')
    assert found[0].startswith(f"{tmp_path / 'config.toml'}: line 2, column ")
    assert "invalid TOML" in found[0]


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="found a directory"):
        load_config(tmp_path)


def test_missing_config_points_to_init(tmp_path):
    with pytest.raises(ConfigError, match="localproxy init"):
        load_config(tmp_path / "nope.toml")


def test_unreadable_config(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(ConfigError, match="a file this user may not read"):
        load_config(path)


def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'[proxy]\nlog_level = "\xff"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 on line 2 \(byte offset 21\)"):
        load_config(path)


def test_ca_file_that_is_not_pem(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = MINIMAL.replace('security = "tls"', 'security = "tls"\nca_file = "ca.pem"')
    found = problems(tmp_path, text)
    assert "upstream.imap.ca_file: found" in found[0] and "holds no PEM certificate" in found[0]


def test_missing_ca_file(tmp_path):
    text = MINIMAL.replace('security = "tls"', 'security = "tls"\nca_file = "gone.pem"')
    found = problems(tmp_path, text)
    assert "gone.pem, which does not exist; expected an existing file" in found[0]


@pytest.mark.parametrize("pin", ["xyz", "abcd", base64.b64encode(b"x" * 31).decode(), "00" * 31])
def test_pin_in_the_wrong_format(tmp_path, pin):
    text = MINIMAL.replace('security = "tls"', f'security = "tls"\npin_sha256 = "{pin}"')
    found = problems(tmp_path, text)
    assert "pin_sha256" in found[0] and "base64 (44 characters) or hex (64 digits)" in found[0]


def test_pin_formats():
    raw = bytes(range(32))
    assert parse_pin(base64.b64encode(raw).decode()) == raw
    assert parse_pin("sha256/" + base64.b64encode(raw).decode()) == raw
    assert parse_pin(raw.hex().upper()) == raw
    assert parse_pin(":".join(f"{b:02x}" for b in raw)) == raw


def _client_files(tmp_path: Path) -> tuple[trustme.LeafCert, trustme.LeafCert]:
    ca = trustme.CA()
    return ca.issue_cert("client.example"), ca.issue_cert("other.example")


def _with_client(cert: str, key: str) -> str:
    return MINIMAL.replace(
        'security = "tls"', f'security = "tls"\nclient_cert = "{cert}"\nclient_key = "{key}"'
    )


def test_client_key_that_does_not_match_its_certificate(tmp_path):
    mine, other = _client_files(tmp_path)
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    found = problems(tmp_path, _with_client("c.pem", "k.pem"))
    assert "upstream.imap.client_key: found" in found[0]
    assert "a key that does not match client_cert" in found[0]


def test_matching_client_pair_is_accepted(tmp_path):
    mine, _ = _client_files(tmp_path)
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    mine.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    config = load_config(write(tmp_path, _with_client("c.pem", "k.pem")))
    assert config.accounts[0].imap.client_key == tmp_path / "k.pem"


def test_client_cert_without_key(tmp_path):
    mine, _ = _client_files(tmp_path)
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    text = MINIMAL.replace('security = "tls"', 'security = "tls"\nclient_cert = "c.pem"')
    found = problems(tmp_path, text)
    assert "client_key: found nothing; expected client_cert and client_key set together" in found[0]


def test_passphrase_protected_client_key(tmp_path):
    from cryptography.hazmat.primitives import serialization

    mine, _ = _client_files(tmp_path)
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    key = serialization.load_pem_private_key(mine.private_key_pem.bytes(), None)
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    found = problems(tmp_path, _with_client("c.pem", "k.pem"))
    assert "a passphrase-protected key" in found[0]


# --------------------------------------------------------------------------- location and CLI


def test_config_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALPROXY_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path(str(tmp_path / "cli.toml")) == tmp_path / "cli.toml"
    assert resolve_config_path(None) == tmp_path / "env.toml"
    monkeypatch.delenv("LOCALPROXY_CONFIG")
    assert resolve_config_path(None).name == "config.toml"


def test_cli_reports_problems_without_traceback_and_exits_2(tmp_path):
    path = write(tmp_path, MINIMAL.replace('"tls"', '"nope"'))
    result = run_cli("--config", str(path), "config", "show")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"config error: {path}: account[0].upstream.imap.security" in result.stderr


def test_cli_show_json_uses_env_config(tmp_path):
    path = write(tmp_path, MINIMAL)
    result = run_cli("config", "show", "--json", env={"LOCALPROXY_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["account"][0]["upstream"]["smtp"] == {
        "host": "smtp.example.org",
        "port": 587,
        "security": "starttls",
        "min_tls": "1.2",
        "timeout": 30.0,
    }


def test_cli_version_and_help():
    from localproxy import __version__

    assert run_cli("--version").stdout.strip() == f"localproxy {__version__}"
    helptext = run_cli("--help").stdout
    for command in ("config", "check"):
        assert command in helptext


# --------------------------------------------------------------------------- fuzzing

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 70000),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
_keys = st.sampled_from(
    [
        "name",
        "addresses",
        "host",
        "port",
        "security",
        "local",
        "upstream",
        "imap",
        "smtp",
        "imap_port",
        "smtp_port",
        "min_tls",
        "pin_sha256",
        "ca_file",
        "proxy",
        "policy",
        "account",
        "encrypt",
        "log_level",
        "x",
    ]
)
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _documents, max_size=4))
def test_any_document_gives_a_config_or_a_config_error(document):
    try:
        parse_config({k: v for k, v in document.items() if v is not None})
    except ConfigError as exc:
        assert exc.problems
