"""`localproxy init`: a wizard that writes a working config for one mail account.

It asks (or takes from flags) the address, the provider's servers (prefilled for the
big providers), checks them over verified TLS, writes the config, creates or imports
the user's key and prints what to enter in the mail client.

Decisions:
* An existing valid config gets the new account appended (its own text and comments
  stay as they are); local ports are the next pair not used by another account.
  `--force` replaces the file instead, keeping the old one as `config.toml.bak`. An
  existing *invalid* config is never touched without `--force`.
* A failed check asks whether to write anyway; without a terminal it is written only
  with `--yes`, and the command then exits 1 listing the failure.
* Without a terminal nothing is ever asked: answers come from flags or defaults, and a
  missing answer without a default is a usage error naming its flag.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm, IntPrompt, Prompt
from rich.table import Table

from localproxy.config import (
    SECURITY_MODES,
    Account,
    Config,
    ConfigError,
    LocalListen,
    UpstreamServer,
    default_data_dir,
    load_config,
    normalize_address,
    resolve_config_path,
)

FIRST_IMAP_PORT, FIRST_SMTP_PORT = 1143, 1025
STANDARD_PORTS = {"imap": {"tls": 993, "starttls": 143}, "smtp": {"tls": 465, "starttls": 587}}
KEY_CHOICES = ("generate", "import", "skip")
ENV_KEY_PASSPHRASE = "LOCALPROXY_KEY_PASSPHRASE"  # the same variable `keys import` reads
_SIMPLE_ADDRESS = re.compile(r"^[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


class InitError(Exception):
    """`init` cannot go on; printed as one line, exit 1."""


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    security: str  # "tls" or "starttls"


@dataclass(frozen=True)
class ProviderPreset:
    name: str  # also the value of --provider
    title: str
    domains: tuple[str, ...]
    imap: Server
    smtp: Server
    note: str = ""


_MICROSOFT_NOTE = (
    "Outlook.com and Microsoft 365 accept only OAuth2 (Modern Auth) sign-in: choose OAuth2 "
    "in your mail client (localproxy passes it through); plain passwords are refused. "
    "On Outlook.com, turn on IMAP first (Settings > Mail > Forwarding and IMAP)."
)
_PRESETS = (
    ProviderPreset(
        "gmail",
        "Gmail / Google Workspace",
        ("gmail.com", "googlemail.com"),
        Server("imap.gmail.com", 993, "tls"),
        Server("smtp.gmail.com", 465, "tls"),
        "Gmail takes no normal password: use an app password (Google Account > Security > "
        "2-Step Verification > App passwords) or OAuth2 in your mail client (localproxy "
        "passes OAuth2 through).",
    ),
    ProviderPreset(
        "microsoft",
        "Outlook.com / Microsoft 365",
        ("outlook.com", "hotmail.com", "live.com", "msn.com", "office365"),
        Server("outlook.office365.com", 993, "tls"),
        Server("smtp.office365.com", 587, "starttls"),
        _MICROSOFT_NOTE,
    ),
    ProviderPreset(
        "fastmail",
        "Fastmail",
        ("fastmail.com", "fastmail.fm"),
        Server("imap.fastmail.com", 993, "tls"),
        Server("smtp.fastmail.com", 465, "tls"),
        "Fastmail needs an app password for IMAP and SMTP (Settings > Privacy & Security).",
    ),
    ProviderPreset(
        "yahoo",
        "Yahoo Mail",
        ("yahoo.com",),
        Server("imap.mail.yahoo.com", 993, "tls"),
        Server("smtp.mail.yahoo.com", 465, "tls"),
        "Yahoo needs an app password (Account info > Account security > App passwords).",
    ),
    ProviderPreset(
        "icloud",
        "iCloud Mail",
        ("icloud.com", "me.com", "mac.com"),
        Server("imap.mail.me.com", 993, "tls"),
        Server("smtp.mail.me.com", 587, "starttls"),
        "iCloud needs an app-specific password (account.apple.com > Sign-In and Security).",
    ),
    ProviderPreset(
        "posteo",
        "Posteo",
        ("posteo.de", "posteo.net"),
        Server("posteo.de", 993, "tls"),
        Server("posteo.de", 465, "tls"),
        "If Posteo refuses your password, create an app-specific password in its settings.",
    ),
    ProviderPreset(
        "mailbox.org",
        "mailbox.org",
        ("mailbox.org",),
        Server("imap.mailbox.org", 993, "tls"),
        Server("smtp.mailbox.org", 465, "tls"),
        "With two-factor authentication on, mailbox.org needs an application password.",
    ),
    ProviderPreset(
        "gmx",
        "GMX",
        ("gmx.de", "gmx.net", "gmx.com"),
        Server("imap.gmx.net", 993, "tls"),
        Server("mail.gmx.net", 465, "tls"),
        "GMX: allow access by POP3/IMAP first (E-mail settings > POP3 & IMAP).",
    ),
)
PROVIDERS: dict[str, ProviderPreset] = {d: p for p in _PRESETS for d in p.domains}
PRESETS_BY_NAME: dict[str, ProviderPreset] = {p.name: p for p in _PRESETS}


def preset_for(domain: str, name: str | None = None) -> ProviderPreset:
    """The preset named by --provider, else the one for this domain, else a guess."""
    if name is not None:
        return PRESETS_BY_NAME[name]
    domain = domain.lower()
    if domain in PROVIDERS:
        return PROVIDERS[domain]
    return ProviderPreset(
        "",
        "",
        (domain,),
        Server(f"imap.{domain}", 993, "tls"),
        Server(f"smtp.{domain}", 465, "tls"),
    )


# --------------------------------------------------------------------------- parser


def add_init_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "init",
        help="set up an account: provider servers, check, config, key, client settings",
        description="Interactive set-up of one mail account. Every answer can also be given "
        "as a flag; without a terminal nothing is asked. An existing config gets the account "
        "added (with local ports no other account uses); --force replaces it instead "
        "(the old file is kept as config.toml.bak).",
    )
    p.add_argument("--email", metavar="ADDR", help="the account's e-mail address")
    p.add_argument("--name", metavar="ACCOUNT", help="short account name (default: from ADDR)")
    p.add_argument(
        "--provider",
        choices=sorted(PRESETS_BY_NAME),
        help="use this provider's servers (for your own domain hosted there)",
    )
    for service in ("imap", "smtp"):
        label = service.upper()
        p.add_argument(f"--{service}-host", metavar="H", help=f"provider's {label} server")
        p.add_argument(f"--{service}-port", metavar="N", type=_port, help=f"its {label} port")
        p.add_argument(
            f"--{service}-security",
            choices=SECURITY_MODES,
            help="tls (implicit TLS) or starttls",
        )
    p.add_argument("--username", metavar="U", help="provider login name (default: ADDR)")
    p.add_argument("--imap-local-port", metavar="N", type=_port, help="port for your client")
    p.add_argument("--smtp-local-port", metavar="N", type=_port, help="port for your client")
    p.add_argument("--ca-file", metavar="PATH", type=Path, help="trust this CA bundle upstream")
    p.add_argument(
        "--data-dir", metavar="PATH", type=Path, help="key store location (new config only)"
    )
    p.add_argument(
        "--key",
        metavar="generate|import:PATH|skip",
        type=_key_option,
        help="your own key (default: generate unless the account has one)",
    )
    p.add_argument("--no-check", action="store_true", help="do not test the provider's servers")
    p.add_argument("--yes", action="store_true", help="write the config even if the check fails")
    p.add_argument("--force", action="store_true", help="replace an existing config (kept as .bak)")
    p.set_defaults(handler=cmd_init)


def build_init_parser() -> argparse.ArgumentParser:
    """A stand-alone `localproxy [--config X] init ...` parser (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="localproxy")
    parser.add_argument("--config", metavar="PATH")
    add_init_command(parser.add_subparsers(dest="command", required=True))
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def _key_option(text: str) -> str:
    if text in ("generate", "skip") or (text.startswith("import:") and len(text) > 7):
        return text
    raise argparse.ArgumentTypeError("expected generate, import:PATH or skip")


# --------------------------------------------------------------------------- asking


class Asker(Protocol):
    interactive: bool

    def text(self, question: str, default: str | None, flag: str) -> str: ...
    def number(self, question: str, default: int, flag: str) -> int: ...
    def choice(self, question: str, choices: Sequence[str], default: str, flag: str) -> str: ...
    def confirm(self, question: str, default: bool) -> bool: ...


class FlagsOnly:
    """No terminal: every answer is a flag or a default, never a question."""

    interactive = False

    def text(self, question: str, default: str | None, flag: str) -> str:
        if default is None:
            raise _usage(f"{flag} is required when not running in a terminal")
        return default

    def number(self, question: str, default: int, flag: str) -> int:
        return default

    def choice(self, question: str, choices: Sequence[str], default: str, flag: str) -> str:
        return default

    def confirm(self, question: str, default: bool) -> bool:
        return default


class TerminalPrompts:
    """rich prompts, each prefilled with its default."""

    interactive = True

    def __init__(self, console: Console) -> None:
        self.console = console

    def text(self, question: str, default: str | None, flag: str) -> str:
        while True:
            if default is None:
                answer = Prompt.ask(question, console=self.console)
            else:
                answer = Prompt.ask(question, default=default, console=self.console)
            if answer.strip():
                return answer.strip()

    def number(self, question: str, default: int, flag: str) -> int:
        while True:
            answer = IntPrompt.ask(question, default=default, console=self.console)
            if 1 <= answer <= 65535:
                return answer
            self.console.print("[red]a port is a number from 1 to 65535[/]")

    def choice(self, question: str, choices: Sequence[str], default: str, flag: str) -> str:
        return Prompt.ask(question, choices=list(choices), default=default, console=self.console)

    def confirm(self, question: str, default: bool) -> bool:
        return Confirm.ask(question, default=default, console=self.console)


def _usage(message: str) -> Exception:
    # Imported late: cli imports this module, and a usage error must exit 2 like the others.
    from localproxy.cli import UsageError

    return UsageError(message)


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answers:
    name: str
    email: str
    username: str
    preset: ProviderPreset
    imap: Server
    smtp: Server
    imap_local: int
    smtp_local: int
    ca_file: Path | None

    def account(self) -> Account:
        """The account as the proxy will use it (for the check)."""
        return Account(
            name=self.name,
            addresses=(self.email,),
            local=LocalListen(imap_port=self.imap_local, smtp_port=self.smtp_local),
            imap=_upstream(self.imap, self.ca_file),
            smtp=_upstream(self.smtp, self.ca_file),
            username=self.username if self.username != self.email else None,
        )


def _upstream(server: Server, ca_file: Path | None) -> UpstreamServer:
    return UpstreamServer(server.host, server.port, server.security, ca_file=ca_file)


def gather_answers(
    args: argparse.Namespace, ask: Asker, existing: Config | None, console: Console
) -> Answers:
    email = _ask_email(args, ask, console)
    _refuse_known_address(email, existing)
    taken = {a.name for a in existing.accounts} if existing else set()
    name = _ask_name(args, ask, email, taken)
    preset = preset_for(email.rpartition("@")[2], args.provider)
    _announce(preset, email, console)
    imap = _ask_server("imap", preset.imap, args, ask)
    smtp = _ask_server("smtp", preset.smtp, args, ask)
    username = args.username or ask.text("User name at the provider", email, "--username")
    imap_local, smtp_local = _ask_local_ports(args, ask, existing)
    return Answers(
        name, email, username, preset, imap, smtp, imap_local, smtp_local, _ca_file(args)
    )


def _ask_email(args: argparse.Namespace, ask: Asker, console: Console) -> str:
    while True:
        email = (args.email or ask.text("E-mail address", None, "--email")).strip()
        if _SIMPLE_ADDRESS.match(email):
            return normalize_address(email)
        if args.email or not ask.interactive:
            raise _usage(f"--email: {email!r} is not an e-mail address like name@example.org")
        console.print(f"[red]{escape(email)} is not an e-mail address like name@example.org[/]")


def _refuse_known_address(email: str, existing: Config | None) -> None:
    for account in existing.accounts if existing else ():
        if email in account.addresses:
            raise InitError(
                f"{email} is already set up as account {account.name!r}; "
                "use --force to start a new config"
            )


def _ask_name(args: argparse.Namespace, ask: Asker, email: str, taken: set[str]) -> str:
    if args.name is not None:
        if problem := name_problem(args.name, taken):
            raise _usage(f"--name: {problem}")
        return args.name
    while True:
        name = ask.text("Account name", default_account_name(email, taken), "--name")
        if (problem := name_problem(name, taken)) is None:
            return name
        if not ask.interactive:
            raise _usage(f"--name: {problem}")
        ask.console.print(f"[red]{escape(problem)}[/]")  # type: ignore[attr-defined]


def name_problem(name: str, taken: set[str]) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return f"{name!r} may contain only letters, digits, '.', '_' and '-'"
    if name in taken:
        return f"the config already has an account named {name!r}"
    return None


def default_account_name(email: str, taken: set[str]) -> str:
    """The provider's name ("gmail"), then with the local part, then numbered."""
    local, _, domain = email.rpartition("@")
    base = _name_safe(domain.split(".")[0]) or "mail"
    for candidate in (base, f"{base}-{_name_safe(local)}".rstrip("-")):
        if candidate not in taken:
            return candidate
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"


def _name_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower()


def _announce(preset: ProviderPreset, email: str, console: Console) -> None:
    if preset.title:
        console.print(f"Using the servers of [bold]{escape(preset.title)}[/].")
    else:
        domain = email.rpartition("@")[2]
        console.print(
            f"No preset for {escape(domain)}: guessing [bold]{preset.imap.host}[/] and "
            f"[bold]{preset.smtp.host}[/] (check your provider's help pages)."
        )


def _ask_server(service: str, guess: Server, args: argparse.Namespace, ask: Asker) -> Server:
    label = service.upper()
    flag = f"--{service}"
    host = getattr(args, f"{service}_host") or ask.text(
        f"{label} server", guess.host, f"{flag}-host"
    )
    security = getattr(args, f"{service}_security") or ask.choice(
        f"{label} security", SECURITY_MODES, guess.security, f"{flag}-security"
    )
    # A preset's port belongs to its security mode; another mode has its own standard port.
    port_guess = guess.port if security == guess.security else STANDARD_PORTS[service][security]
    port = getattr(args, f"{service}_port") or ask.number(
        f"{label} port", port_guess, f"{flag}-port"
    )
    return Server(host, port, security)


def _ask_local_ports(
    args: argparse.Namespace, ask: Asker, existing: Config | None
) -> tuple[int, int]:
    used = used_local_ports(existing)
    free_imap, free_smtp = next_free_ports(used)
    imap = args.imap_local_port or ask.number(
        "Local IMAP port (for your mail client)", free_imap, "--imap-local-port"
    )
    smtp = args.smtp_local_port or ask.number(
        "Local SMTP port (for your mail client)", free_smtp, "--smtp-local-port"
    )
    for flag, port in (("--imap-local-port", imap), ("--smtp-local-port", smtp)):
        if port in used:
            raise _usage(f"{flag}: port {port} is already used by another account")
    if imap == smtp:
        raise _usage("--imap-local-port and --smtp-local-port must differ")
    return imap, smtp


def used_local_ports(config: Config | None) -> set[int]:
    ports: set[int] = set()
    for account in config.accounts if config else ():
        local = account.local
        ports |= {p for p in (local.imap_port, local.smtp_port, local.imaps_port) if p}
        ports |= {local.smtps_port} if local.smtps_port else set()
    return ports


def next_free_ports(used: set[int]) -> tuple[int, int]:
    """The first pair 1143+n / 1025+n with neither port used by another account."""
    offset = 0
    while FIRST_IMAP_PORT + offset in used or FIRST_SMTP_PORT + offset in used:
        offset += 1
    return FIRST_IMAP_PORT + offset, FIRST_SMTP_PORT + offset


def _ca_file(args: argparse.Namespace) -> Path | None:
    if args.ca_file is None:
        return None
    path = args.ca_file.expanduser().resolve()
    if not path.is_file():
        raise _usage(f"--ca-file: {path} is not a file")
    return path


# --------------------------------------------------------------------------- check


def run_check(answers: Answers) -> list:
    from localproxy.check import check_service

    account = answers.account()

    async def both() -> list:
        return list(
            await asyncio.gather(
                check_service(account, "imap", None), check_service(account, "smtp", None)
            )
        )

    return asyncio.run(both())


def render_check(checks: Sequence, console: Console) -> None:
    table = Table(title="Provider check (no login)", title_justify="left")
    for column in ("Service", "Server", "Result", "TLS"):
        table.add_column(column, overflow="fold")
    for c in checks:
        result = "[green]OK[/]" if c.ok else f"[red]FAILED[/] {escape(c.error.detail)}"
        tls = "-"
        if c.tls is not None:
            tls = f"{c.tls.version}, {'STARTTLS' if c.tls.starttls else 'implicit TLS'}"
        table.add_row(c.service.upper(), f"{c.server.address} ({c.server.security})", result, tls)
    console.print(table)


def _go_on_after_failure(args: argparse.Namespace, ask: Asker) -> bool:
    if args.yes:
        return True
    if not ask.interactive:
        raise InitError(
            "the provider check failed (see above); nothing written. Fix the servers, or add "
            "--yes to write the config anyway (or --no-check to skip the check)"
        )
    return ask.confirm("The check failed. Write the config anyway?", False)


# --------------------------------------------------------------------------- config file


def load_existing(path: Path, force: bool) -> Config | None:
    """The config to add to, or None for a new file; refuses to touch an invalid one."""
    if not path.exists():
        return None
    try:
        config = load_config(path)
    except ConfigError as exc:
        if force:
            return None
        raise InitError(
            f"{path} exists but is not a valid config ({len(exc.problems)} problem(s); "
            "`localproxy config show` lists them). Fix it, or use --force to replace it "
            "(the old file is kept as .bak)"
        ) from None
    return None if force else config


def config_text(
    answers: Answers, existing_text: str | None, data_dir: Path | None, today: date
) -> str:
    """The new file: the existing text plus an account, or a fresh commented config."""
    block = account_block(answers, today)
    if existing_text is None:
        return _new_config_header(data_dir) + "\n" + block
    return existing_text.rstrip("\n") + "\n\n" + block


def _new_config_header(data_dir: Path | None) -> str:
    data_line = (
        f"data_dir = {_toml(str(data_dir))}"
        if data_dir
        else f"# data_dir = {_toml(str(default_data_dir()))}"
    )
    return f"""\
# localproxy configuration, written by `localproxy init`.
# Check it with `localproxy config show`; test the provider with `localproxy check`.
# Relative file paths are relative to this file.

[proxy]
# Where the key store, outbox and caches live (default: the platform's data dir).
{data_line}
# debug, info, warning or error. Secrets are never logged at any level.
log_level = "info"

[policy]
# encrypt: "opportunistic" encrypts whenever a usable key for the recipient is known,
#          "always" refuses to send to recipients without a key, "never" encrypts nothing.
encrypt = "opportunistic"
# sign: "encrypted" signs what it encrypts, "always" signs everything, "never" nothing.
sign = "encrypted"
"""


def account_block(answers: Answers, today: date) -> str:
    title = f" ({answers.preset.title})" if answers.preset.title else ""
    username = (
        f"username = {_toml(answers.username)}"
        if answers.username != answers.email
        else '# username = "..."   # only if it is not the address'
    )
    note = "".join(f"# {line}\n" for line in textwrap.wrap(answers.preset.note, 86))
    return f"""\
# Added by `localproxy init` on {today.isoformat()}: {answers.email}{title}.
{note}[[account]]
# A short name: letters, digits, '.', '_' or '-'. Used in `check NAME`.
name = {_toml(answers.name)}
# The addresses this account sends from; mail from them is signed with its key.
addresses = [{_toml(answers.email)}]
# Login name at the provider.
{username}

# Where your mail client connects (loopback only).
[account.local]
imap_port = {answers.imap_local}        # the client's incoming (IMAP) server: 127.0.0.1
smtp_port = {answers.smtp_local}        # the client's outgoing (SMTP) server: 127.0.0.1

{_server_block("imap", answers.imap, answers.ca_file)}
{_server_block("smtp", answers.smtp, answers.ca_file)}"""


def _server_block(service: str, server: Server, ca_file: Path | None) -> str:
    ca_line = (
        "# Trust exactly this CA bundle instead of the system's.\n"
        f"ca_file = {_toml(str(ca_file))}\n"
        if ca_file
        else ""
    )
    return f"""\
# The provider's {service.upper()} server, always over verified TLS.
[account.upstream.{service}]
host = {_toml(server.host)}
port = {server.port}
# "tls" = implicit TLS, "starttls" = upgrade a plain connection (never plaintext).
security = {_toml(server.security)}
{ca_line}"""


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes).
    return json.dumps(value, ensure_ascii=False)


def write_config(path: Path, text: str, backup: bool) -> Config:
    """Write atomically (temp file + rename, mode 0600) after validating the new text;
    on a validation error the old file stays and the ConfigError names every problem."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temp.chmod(0o600)
        try:
            load_config(temp)  # same directory, so relative paths resolve the same
        except ConfigError as exc:
            raise ConfigError(path, exc.problems) from None
        if backup and path.exists():
            backup_path = path.with_name(path.name + ".bak")
            shutil.copy2(path, backup_path)
            backup_path.chmod(0o600)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return load_config(path)


# --------------------------------------------------------------------------- key


def setup_key(
    config: Config, account: Account, option: str | None, ask: Asker, console: Console
) -> bool:
    """Generate, import or skip the account's own key; False when an import failed."""
    from localproxy.keys.store import KeyStore

    with KeyStore(config.proxy.data_dir) as store:
        has_key = bool(store.own_keys(account.name))
        choice, path = _key_choice(option, has_key, ask)
        if choice == "skip":
            console.print(_skip_message(has_key, account.name))
            return True
        if choice == "generate":
            info = store.generate(account.name, account.addresses)
            console.print(f"Generated key [bold]{info.fingerprint}[/] for {account.addresses[0]}.")
            console.print("Back it up: [bold]localproxy keys backup FILE[/]")
            return True
        return _import_key(store, account, path, console)


def _key_choice(option: str | None, has_key: bool, ask: Asker) -> tuple[str, Path | None]:
    if option is None:
        default = "skip" if has_key else "generate"
        option = ask.choice("Your key: generate, import or skip", KEY_CHOICES, default, "--key")
        if option == "import":
            option = "import:" + ask.text("Key file to import", None, "--key import:PATH")
    if option.startswith("import:"):
        return "import", Path(option[7:]).expanduser()
    return option, None


def _skip_message(has_key: bool, name: str) -> str:
    if has_key:
        return f"Account {name!r} already has a key; keeping it."
    return f"No key yet: create one later with [bold]localproxy keys generate {name}[/]."


def _import_key(store, account: Account, path: Path | None, console: Console) -> bool:
    from localproxy.crypto.errors import CryptoError

    assert path is not None
    try:
        outcomes = store.import_keys(
            path.read_bytes(), f"import:{path.name}", _key_passphrase, lambda _: account.name
        )
    except OSError as exc:
        raise InitError(f"{path}: {exc.strerror or exc}") from None
    except CryptoError as exc:
        raise InitError(f"{path}: {exc}") from None
    for o in outcomes:
        reason = f": {o.reason}" if o.reason else ""
        console.print(f"{o.action:9} {o.fingerprint} ({', '.join(o.addresses)}){escape(reason)}")
    if store.own_keys(account.name):
        return True
    console.print(f"[red]{escape(str(path))} gave account {account.name!r} no secret key.[/]")
    return False


def _key_passphrase(info) -> str | None:
    if (value := os.environ.get(ENV_KEY_PASSPHRASE)) is not None:
        return value
    if not sys.stdin.isatty():
        return None
    return getpass.getpass(f"Passphrase for secret key {info.fingerprint}: ")


# --------------------------------------------------------------------------- instructions


def client_instructions(account: Account, login: str, fingerprint: str) -> str:
    """What to type into Thunderbird, Outlook and Apple Mail, and how to trust the cert."""
    imap, smtp = account.local.imap_port, account.local.smtp_port
    return f"""\
In your mail client, change only the servers; user name and password stay the provider's.
  User name: {login}
  Password:  your provider password (or app password / OAuth2, see the note above)

Thunderbird (Account Settings > Server Settings, and Outgoing Server (SMTP)):
  Incoming (IMAP): server 127.0.0.1, port {imap}, connection security None, normal password
  Outgoing (SMTP): server 127.0.0.1, port {smtp}, connection security None, normal password
  (STARTTLS works too: accept localproxy's certificate after comparing the fingerprint.)
  Leave Thunderbird's own OpenPGP off for this account.

Outlook (File > Add Account > Advanced options > set up manually > IMAP):
  Incoming mail: server 127.0.0.1, port {imap}, encryption method STARTTLS
  Outgoing mail: server 127.0.0.1, port {smtp}, encryption method STARTTLS
  Outlook insists on TLS: trust localproxy's certificate first (below).

Apple Mail (Mail > Settings > Accounts > Server Settings; untick
"Automatically manage connection settings"):
  Incoming Mail Server: 127.0.0.1, port {imap}, Use TLS/SSL on (STARTTLS)
  Outgoing Mail Server: 127.0.0.1, port {smtp}, Use TLS/SSL on (STARTTLS)
  Authentication: Password. Trust localproxy's certificate first (below).

Local certificate (for STARTTLS), SHA-256 fingerprint:
  {fingerprint}
  Outlook and Apple Mail: `localproxy cert export -o localproxy.pem` saves it and prints
  how to trust it on macOS (Keychain) and Windows (certutil).

Start localproxy: `localproxy run` in a terminal, or in the background:
`localproxy service install`. Already running? `localproxy reload`."""


# --------------------------------------------------------------------------- command


def cmd_init(args: argparse.Namespace) -> int:
    console = Console(highlight=False, emoji=False)  # emoji=False: ":CD:" in fingerprints
    ask: Asker = TerminalPrompts(console) if sys.stdin.isatty() else FlagsOnly()
    return run_init(args, ask, console)


def run_init(args: argparse.Namespace, ask: Asker, console: Console) -> int:
    path = resolve_config_path(args.config)
    existing = load_existing(path, args.force)
    if existing is not None and args.data_dir is not None:
        raise _usage(f"--data-dir: {path} already sets the data dir; edit [proxy] there")
    if args.key and args.key.startswith("import:") and not Path(args.key[7:]).is_file():
        raise _usage(f"--key: {args.key[7:]} is not a file")
    answers = gather_answers(args, ask, existing, console)
    check_failed = _check(args, ask, answers, console)
    if check_failed and not _go_on_after_failure(args, ask):
        raise InitError("nothing written")
    config = _write(path, answers, existing, args, console)
    account = config.account(answers.name)
    key_ok = setup_key(config, account, args.key, ask, console)
    _print_next_steps(config, account, answers, console)
    return _exit_status(check_failed, key_ok, console)


def _check(args: argparse.Namespace, ask: Asker, answers: Answers, console: Console) -> bool:
    """Run the check unless --no-check; True when it failed."""
    if args.no_check:
        console.print("Provider check skipped (--no-check); run `localproxy check` later.")
        return False
    console.print("Checking the provider's servers...")
    checks = run_check(answers)
    render_check(checks, console)
    return not all(c.ok for c in checks)


def _write(
    path: Path,
    answers: Answers,
    existing: Config | None,
    args: argparse.Namespace,
    console: Console,
) -> Config:
    old_text = path.read_text(encoding="utf-8") if existing is not None else None
    data_dir = args.data_dir.expanduser().resolve() if args.data_dir else None
    text = config_text(answers, old_text, data_dir, date.today())
    replacing = existing is None and path.exists()  # only with --force
    config = write_config(path, text, backup=replacing)
    if existing is not None:
        console.print(f"Added account {answers.name!r} to {escape(str(path))} (mode 0600).")
    else:
        console.print(f"Wrote {escape(str(path))} (mode 0600).")
    if replacing:
        console.print(f"The previous file is kept as {escape(path.name)}.bak.")
    return config


def _print_next_steps(config: Config, account: Account, answers: Answers, console: Console) -> None:
    from localproxy.localtls import ensure_local_certificate

    if answers.preset.note:
        console.print(f"\n[yellow]Note:[/] {escape(answers.preset.note)}", soft_wrap=True)
    local = ensure_local_certificate(config.proxy.data_dir)
    text = client_instructions(account, account.login, local.sha256_fingerprint)
    console.print("\n" + text, markup=False, soft_wrap=True)


def _exit_status(check_failed: bool, key_ok: bool, console: Console) -> int:
    problems = []
    if check_failed:
        problems.append("the provider check failed (written anyway); see `localproxy check`")
    if not key_ok:
        problems.append("the key import gave the account no key")
    for problem in problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
    return 1 if problems else 0
