"""Command line: `localproxy SUBCOMMAND ...`.

Exit codes: 0 success, 1 a check or operation failed, 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax

from localproxy import __version__
from localproxy.config import (
    Config,
    ConfigError,
    config_as_dict,
    dump_toml,
    load_config,
    resolve_config_path,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ENV_PASSWORD = "LOCALPROXY_PASSWORD"

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments that argparse cannot see; printed as one line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localproxy",
        description="Local mail-encryption proxy: OpenPGP for any mail client, "
        "listening on 127.0.0.1 between the client and the provider.",
    )
    parser.add_argument("--version", action="version", version=f"localproxy {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $LOCALPROXY_CONFIG, else the platform's "
        "config dir, e.g. ~/.config/localproxy/config.toml)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_config_commands(commands)
    _add_check_command(commands)
    _add_keys_commands(commands)
    _add_cert_commands(commands)
    return parser


def _add_cert_commands(commands: argparse._SubParsersAction) -> None:
    from localproxy.localtls import add_cert_commands

    add_cert_commands(commands)


def _add_keys_commands(commands: argparse._SubParsersAction) -> None:
    from localproxy.keys.commands import add_keys_commands

    add_keys_commands(commands)


def _add_config_commands(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config", help="inspect the configuration", description="Inspect the configuration."
    )
    sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        help="validate and print the effective configuration with defaults filled in",
        description="Validate the config and print it with every default filled in.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    show.set_defaults(handler=cmd_config_show)


def _add_check_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check",
        help="connect to each provider over verified TLS and report what was found",
        description="Connect to each account's upstream IMAP and SMTP server exactly as the "
        "proxy will, and report TLS version, cipher and certificate. Exits 1 "
        "when any check fails.",
    )
    check.add_argument("account", nargs="?", help="only this account (default: all)")
    check.add_argument(
        "--login",
        action="store_true",
        help=f"also log in (password from ${ENV_PASSWORD} or a prompt)",
    )
    check.add_argument("--json", action="store_true", help="print JSON for scripts")
    check.set_defaults(handler=cmd_check)


# --------------------------------------------------------------------------- commands


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _load(args)
    data = config_as_dict(config)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        Console().print(Syntax(dump_toml(data), "toml", background_color="default"))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from localproxy.check import render_checks, run_checks

    config = _load(args)
    accounts = _select_accounts(config, args.account)
    passwords = {
        a.name: _password_for(a.login, a.imap.host) if args.login else None for a in accounts
    }
    checks = asyncio.run(run_checks(accounts, passwords))
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        render_checks(checks, Console())
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


# --------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))


def _select_accounts(config: Config, name: str | None) -> list:
    if not config.accounts:
        raise UsageError(f"{config.source}: no [[account]] configured")
    if name is None:
        return list(config.accounts)
    try:
        return [config.account(name)]
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None


def _password_for(login: str, host: str) -> str:
    if (password := os.environ.get(ENV_PASSWORD)) is not None:
        return password
    if not sys.stdin.isatty():
        raise UsageError(f"--login needs a password: set {ENV_PASSWORD} or run in a terminal")
    return getpass.getpass(f"Password for {login} at {host}: ")


def _operation_errors() -> tuple[type[Exception], ...]:
    """Errors that end a command with one clear line and exit 1 (never a traceback)."""
    from localproxy.crypto.errors import CryptoError
    from localproxy.keys.commands import KeysError
    from localproxy.keys.store import KeyStoreError
    from localproxy.localtls import LocalTLSError
    from localproxy.secretbox import SecretBoxError

    return (CryptoError, KeysError, KeyStoreError, LocalTLSError, SecretBoxError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    err = Console(stderr=True, highlight=False)
    operation_errors = _operation_errors()
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(
                f"[bold red]config error:[/] {escape(problem.render(exc.source))}", soft_wrap=True
            )
        return EXIT_USAGE
    except UsageError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_USAGE
    except operation_errors as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
