"""`localproxy init`: presets, answers from flags, config writing, key, instructions."""

from __future__ import annotations

import io
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from localproxy import init
from localproxy.cli import UsageError
from localproxy.config import load_config
from localproxy.init import FlagsOnly, InitError, build_init_parser, run_init
from localproxy.keys.store import KeyStore


@dataclass
class Run:
    code: int
    output: str
    config: Path


def run(config: Path, *argv: str, ask: init.Asker | None = None) -> Run:
    args = build_init_parser().parse_args(["--config", str(config), "init", *argv])
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, highlight=False, emoji=False)
    code = run_init(args, ask or FlagsOnly(), console)
    return Run(code, buffer.getvalue(), config)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "config.toml"


def new_account(config: Path, email: str, *extra: str) -> Run:
    data_dir = config.parent.parent / "data"
    new_config = () if config.exists() else ("--data-dir", str(data_dir))
    return run(config, "--email", email, "--no-check", "--key", "skip", *extra, *new_config)


# --------------------------------------------------------------------------- presets


def test_gmail_preset_fills_hosts_ports_and_says_how_to_log_in(config_path):
    result = new_account(config_path, "Alice@GMail.com")
    assert result.code == 0, result.output
    account = load_config(config_path).account("gmail")
    assert (account.imap.host, account.imap.port, account.imap.security) == (
        "imap.gmail.com",
        993,
        "tls",
    )
    assert (account.smtp.host, account.smtp.port, account.smtp.security) == (
        "smtp.gmail.com",
        465,
        "tls",
    )
    assert account.addresses == ("Alice@gmail.com",)
    assert "app password" in result.output


MICROSOFT_SMTP = ("smtp.office365.com", 587, "starttls")


@pytest.mark.parametrize(
    ("domain", "imap", "smtp"),
    [
        ("hotmail.com", ("outlook.office365.com", 993, "tls"), MICROSOFT_SMTP),
        ("me.com", ("imap.mail.me.com", 993, "tls"), ("smtp.mail.me.com", 587, "starttls")),
        ("posteo.net", ("posteo.de", 993, "tls"), ("posteo.de", 465, "tls")),
        ("gmx.de", ("imap.gmx.net", 993, "tls"), ("mail.gmx.net", 465, "tls")),
    ],
)
def test_presets_by_domain(domain, imap, smtp):
    preset = init.preset_for(domain)
    assert (preset.imap.host, preset.imap.port, preset.imap.security) == imap
    assert (preset.smtp.host, preset.smtp.port, preset.smtp.security) == smtp


def test_every_big_provider_has_a_preset():
    for domain in (
        "gmail.com", "googlemail.com", "outlook.com", "live.com", "fastmail.com", "fastmail.fm",
        "yahoo.com", "icloud.com", "mac.com", "posteo.de", "mailbox.org", "gmx.net", "gmx.com",
    ):  # fmt: skip
        assert domain in init.PROVIDERS


def test_unknown_domain_gets_guessed_servers(config_path):
    result = new_account(config_path, "alice@example.org")
    assert result.code == 0, result.output
    account = load_config(config_path).account("example")
    assert (account.imap.host, account.imap.port, account.imap.security) == (
        "imap.example.org",
        993,
        "tls",
    )
    assert (account.smtp.host, account.smtp.port, account.smtp.security) == (
        "smtp.example.org",
        465,
        "tls",
    )
    assert "No preset for example.org" in result.output


def test_provider_flag_serves_own_domains_and_flags_override(config_path):
    result = new_account(
        config_path,
        "boss@company.example",
        "--provider",
        "microsoft",
        "--imap-security",
        "starttls",
        "--smtp-port",
        "2525",
        "--username",
        "boss@company.onmicrosoft.com",
    )
    assert result.code == 0, result.output
    account = load_config(config_path).account("company")
    assert account.imap.host == "outlook.office365.com"
    # A different security mode than the preset's brings that mode's standard port.
    assert (account.imap.port, account.imap.security) == (143, "starttls")
    assert (account.smtp.port, account.smtp.security) == (2525, "starttls")
    assert account.login == "boss@company.onmicrosoft.com"
    assert "OAuth2" in result.output


# --------------------------------------------------------------------------- no terminal


def test_missing_email_without_terminal_names_the_flag(config_path):
    with pytest.raises(UsageError, match="--email"):
        run(config_path, "--no-check")
    assert not config_path.exists()


def test_bad_email_names_the_flag(config_path):
    with pytest.raises(UsageError, match="--email"):
        run(config_path, "--email", "not-an-address", "--no-check")


def test_bad_key_option_is_refused_by_the_parser(config_path, capsys):
    with pytest.raises(SystemExit):
        build_init_parser().parse_args(["init", "--key", "maybe"])
    assert "import:PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------- config file


def test_writes_a_valid_private_commented_config(config_path):
    result = new_account(config_path, "alice@example.org")
    assert result.code == 0
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600
    config = load_config(config_path)
    assert config.proxy.data_dir == config_path.parent.parent / "data"
    text = config_path.read_text()
    for comment in ("# Where your mail client connects", "# The provider's IMAP server"):
        assert comment in text
    assert not list(config_path.parent.glob("*.tmp"))


def test_second_account_is_added_with_free_local_ports(config_path):
    new_account(config_path, "alice@example.org")
    first_text = config_path.read_text()
    result = new_account(config_path, "bob@gmail.com")
    assert result.code == 0, result.output
    assert config_path.read_text().startswith(first_text.rstrip("\n"))
    config = load_config(config_path)
    first, second = config.accounts
    assert (first.name, first.local.imap_port, first.local.smtp_port) == ("example", 1143, 1025)
    assert (second.name, second.local.imap_port, second.local.smtp_port) == ("gmail", 1144, 1026)
    assert "Added account 'gmail'" in result.output


def test_next_free_ports_skips_any_used_port():
    assert init.next_free_ports(set()) == (1143, 1025)
    assert init.next_free_ports({1143, 1026}) == (1145, 1027)


def test_clashing_local_port_names_the_flag(config_path):
    new_account(config_path, "alice@example.org")
    with pytest.raises(UsageError, match="--smtp-local-port"):
        new_account(config_path, "bob@example.net", "--smtp-local-port", "1025")


def test_same_name_gets_another_default_and_a_taken_name_is_refused(config_path):
    new_account(config_path, "alice@example.org")
    result = new_account(config_path, "bob@example.org")
    assert [a.name for a in load_config(config_path).accounts] == ["example", "example-bob"]
    assert result.code == 0
    with pytest.raises(UsageError, match="--name"):
        new_account(config_path, "carol@example.org", "--name", "example")


def test_an_address_is_set_up_only_once(config_path):
    new_account(config_path, "alice@example.org")
    with pytest.raises(InitError, match="already set up"):
        new_account(config_path, "alice@example.org")


def test_invalid_existing_config_is_kept_unless_forced(config_path):
    config_path.parent.mkdir(parents=True)
    config_path.write_text("[proxy\n")
    with pytest.raises(InitError, match="--force"):
        new_account(config_path, "alice@example.org")
    assert config_path.read_text() == "[proxy\n"
    result = new_account(config_path, "alice@example.org", "--force")
    assert result.code == 0
    assert config_path.with_name("config.toml.bak").read_text() == "[proxy\n"
    assert load_config(config_path).accounts[0].name == "example"


def test_force_replaces_a_valid_config(config_path):
    new_account(config_path, "alice@example.org")
    new_account(config_path, "alice@example.org", "--force")
    assert len(load_config(config_path).accounts) == 1
    assert "alice@example.org" in config_path.with_name("config.toml.bak").read_text()


def test_validation_failure_keeps_the_old_file(config_path, tmp_path):
    new_account(config_path, "alice@example.org")
    before = config_path.read_text()
    answers = init.Answers(
        name="bad",
        email="bob@example.net",
        username="bob@example.net",
        preset=init.preset_for("example.net"),
        imap=init.Server("imap.example.net", 993, "tls"),
        smtp=init.Server("smtp.example.net", 465, "tls"),
        imap_local=1143,  # clashes with alice's account: load_config must refuse it
        smtp_local=1026,
        ca_file=None,
    )
    from datetime import date

    from localproxy.config import ConfigError

    text = init.config_text(answers, before, None, date.today())
    with pytest.raises(ConfigError) as caught:
        init.write_config(config_path, text, backup=False)
    assert caught.value.source == config_path
    assert config_path.read_text() == before
    assert not list(config_path.parent.glob("*.tmp"))


def test_ca_file_goes_to_both_servers(config_path, tmp_path):
    from tests.harness.endpoints import make_tls_material

    ca = make_tls_material(tmp_path).ca_file
    result = new_account(config_path, "alice@example.org", "--ca-file", str(ca))
    assert result.code == 0, result.output
    account = load_config(config_path).account("example")
    assert account.imap.ca_file == ca and account.smtp.ca_file == ca


# --------------------------------------------------------------------------- check


@dataclass
class FakeCheck:
    service: str
    ok: bool
    error: object = None
    tls: object = None

    @property
    def server(self):
        return init.UpstreamServer("imap.example.org", 993, "tls")


@dataclass
class FakeError:
    detail: str


def failing_check(answers):
    return [FakeCheck("imap", False, FakeError("nothing is listening")), FakeCheck("smtp", True)]


def test_no_check_skips_the_check(config_path, monkeypatch):
    def must_not_run(answers):
        raise AssertionError("the check ran despite --no-check")

    monkeypatch.setattr(init, "run_check", must_not_run)
    result = new_account(config_path, "alice@example.org")
    assert result.code == 0
    assert "check skipped" in result.output


def test_failed_check_without_terminal_writes_nothing_unless_yes(config_path, monkeypatch):
    monkeypatch.setattr(init, "run_check", failing_check)
    argv = ("--email", "alice@example.org", "--key", "skip")
    argv += ("--data-dir", str(config_path.parent / "data"))
    with pytest.raises(InitError, match="--yes"):
        run(config_path, *argv)
    assert not config_path.exists()
    result = run(config_path, *argv, "--yes")
    assert result.code == 1
    assert "nothing is listening" in result.output
    assert "check failed" in result.output
    assert load_config(config_path).account("example")


# --------------------------------------------------------------------------- key


def test_generated_key_is_in_the_key_store(config_path):
    data_dir = config_path.parent / "data"
    result = run(
        config_path,
        "--email",
        "alice@example.org",
        "--no-check",
        "--key",
        "generate",
        "--data-dir",
        str(data_dir),
    )
    assert result.code == 0, result.output
    with KeyStore(data_dir) as store:
        [(stored, _secret)] = store.own_keys("example")
    assert "alice@example.org" in stored.info.emails
    assert stored.fingerprint in result.output


def test_key_is_generated_by_default_and_only_once(config_path):
    data_dir = config_path.parent / "data"
    argv = ("--email", "alice@example.org", "--no-check", "--data-dir", str(data_dir))
    run(config_path, *argv)
    result = run(config_path, *argv, "--force")
    with KeyStore(data_dir) as store:
        assert len(store.own_keys("example")) == 1
    assert "already has a key" in result.output


def test_imported_key_belongs_to_the_new_account(config_path, tmp_path):
    with KeyStore(tmp_path / "elsewhere") as other:
        info = other.generate("old", ("alice@example.org",))
        key_file = tmp_path / "alice.asc"
        key_file.write_bytes(other.export_secret(info.fingerprint))
    data_dir = config_path.parent / "data"
    result = run(
        config_path,
        "--email",
        "alice@example.org",
        "--no-check",
        "--key",
        f"import:{key_file}",
        "--data-dir",
        str(data_dir),
    )
    assert result.code == 0, result.output
    with KeyStore(data_dir) as store:
        [(stored, _secret)] = store.own_keys("example")
    assert stored.fingerprint == info.fingerprint


def test_missing_import_file_is_a_usage_error(config_path, tmp_path):
    with pytest.raises(UsageError, match="--key"):
        new_account(config_path, "alice@example.org", "--key", f"import:{tmp_path / 'none'}")


# --------------------------------------------------------------------------- instructions


def test_instructions_name_loopback_ports_user_and_certificate(config_path):
    new_account(config_path, "alice@example.org")
    result = new_account(config_path, "bob@example.net", "--username", "bob")
    text = result.output
    for expected in (
        "127.0.0.1", "port 1144", "port 1026", "Thunderbird", "Outlook", "Apple Mail",
        "User name: bob", "STARTTLS", "localproxy cert export", "localproxy run",
        "localproxy service install",
    ):  # fmt: skip
        assert expected in text, expected
    config = load_config(config_path)
    from localproxy.localtls import ensure_local_certificate

    assert ensure_local_certificate(config.proxy.data_dir).sha256_fingerprint in text


# --------------------------------------------------------------------------- terminal


class Scripted:
    """A terminal user who accepts every default except the answers given."""

    interactive = True

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.asked: dict[str, object] = {}
        self.console = Console(file=io.StringIO())

    def _answer(self, question: str, default):
        self.asked[question] = default
        return self.answers.get(question, default)

    def text(self, question: str, default: str | None, flag: str) -> str:
        return self._answer(question, default)

    def number(self, question: str, default: int, flag: str) -> int:
        return self._answer(question, default)

    def choice(self, question: str, choices: Sequence[str], default: str, flag: str) -> str:
        return self._answer(question, default)

    def confirm(self, question: str, default: bool) -> bool:
        return self._answer(question, default)


def test_terminal_prompts_are_prefilled_from_the_preset(config_path):
    user = Scripted({"E-mail address": "alice@fastmail.com", "Account name": "mine"})
    result = run(config_path, "--no-check", "--data-dir", str(config_path.parent / "d"), ask=user)
    assert result.code == 0, result.output
    assert user.asked["IMAP server"] == "imap.fastmail.com"
    assert user.asked["SMTP port"] == 465
    assert user.asked["User name at the provider"] == "alice@fastmail.com"
    assert user.asked["Local IMAP port (for your mail client)"] == 1143
    assert user.asked["Your key: generate, import or skip"] == "generate"
    assert load_config(config_path).account("mine").smtp.host == "smtp.fastmail.com"


def test_terminal_user_can_decline_writing_after_a_failed_check(config_path, monkeypatch):
    monkeypatch.setattr(init, "run_check", failing_check)
    user = Scripted({"E-mail address": "alice@example.org"})
    with pytest.raises(InitError, match="nothing written"):
        run(config_path, "--key", "skip", ask=user)
    assert user.asked["The check failed. Write the config anyway?"] is False
    assert not config_path.exists()
