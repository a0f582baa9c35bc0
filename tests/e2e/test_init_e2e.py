"""`localproxy init` against the real Dovecot and Postfix of the harness."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from localproxy.config import load_config
from localproxy.init import FlagsOnly, build_init_parser, run_init

pytestmark = pytest.mark.e2e


def test_init_checks_the_provider_over_tls13_and_writes_a_working_config(provider, tmp_path):
    config_path = tmp_path / "config.toml"
    alice = provider.users["alice"]
    argv = [
        "--config", str(config_path), "init",
        "--email", alice.address, "--username", alice.login,
        "--imap-host", provider.hostname, "--imap-port", str(provider.imaps_port),
        "--imap-security", "tls",
        "--smtp-host", provider.hostname, "--smtp-port", str(provider.submission_port),
        "--smtp-security", "starttls",
        "--ca-file", str(provider.ca_file), "--key", "skip",
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    out = io.StringIO()
    console = Console(file=out, width=200, highlight=False, emoji=False)
    code = run_init(build_init_parser().parse_args(argv), FlagsOnly(), console)
    text = out.getvalue()
    assert code == 0, text
    assert text.count("TLSv1.3") == 2
    assert "implicit TLS" in text and "STARTTLS" in text
    assert "FAILED" not in text
    account = load_config(config_path).account("example")
    assert account.imap.ca_file == provider.ca_file
    assert (account.smtp.port, account.smtp.security) == (provider.submission_port, "starttls")
