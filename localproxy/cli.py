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
from pathlib import Path

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

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: worth a retry (the service manager restarts)
ENV_PASSWORD = "LOCALPROXY_PASSWORD"

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad arguments that argparse cannot see; printed as one line, exit 2."""


class TemporaryError(Exception):
    """Could work a moment later (a port still held); printed as one line, exit 75."""


class NotRunningError(Exception):
    """The daemon is not running; printed with how to start it, exit 3."""


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
    _add_run_commands(commands)
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


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run",
        help="run the proxy in the foreground (what the background service starts)",
        description="Start the IMAP and SMTP listeners of every account and serve until "
        "SIGTERM or Ctrl-C. SIGHUP reloads the config. Logs go to stderr.",
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override [proxy] log_level",
    )
    run.add_argument("--log-file", type=Path, help="also log to this file (rotated at 5 MB)")
    run.add_argument(
        "--log-traffic",
        action="store_true",
        help="log protocol lines, message content included, at DEBUG (credentials stay "
        "redacted); for debugging only",
    )
    run.set_defaults(handler=cmd_run)
    reload = commands.add_parser(
        "reload",
        help="make the running proxy re-read its config",
        description="Ask the running proxy to re-read its config; "
        "accounts whose settings did not change keep running.",
    )
    reload.set_defaults(handler=cmd_reload)
    status = commands.add_parser(
        "status",
        help="show what the running proxy is doing (accounts, TLS, keys, queue, events)",
        description="A dashboard of the running proxy: listeners, upstream TLS and "
        "certificates, sessions, counters, outbox, keys and recent events. Exits 3 when the "
        "proxy is not running.",
    )
    status.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    status.add_argument("--watch", action="store_true", help="refresh live until Ctrl-C")
    status.set_defaults(handler=cmd_status)
    from localproxy.demo import add_demo_command
    from localproxy.init import add_init_command
    from localproxy.service import add_service_commands

    add_init_command(commands)
    add_service_commands(commands)
    add_demo_command(commands)
    outbox = commands.add_parser("outbox", help="the queue of messages waiting to be sent")
    sub = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    flush = sub.add_parser("flush", help="try to send every queued message now")
    flush.set_defaults(handler=cmd_outbox_flush)


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


def cmd_run(args: argparse.Namespace) -> int:
    from localproxy.daemon import DaemonError, ListenError, run_daemon, setup_logging

    config_path = resolve_config_path(args.config)
    config = load_config(config_path)
    setup_logging(args.log_level or config.proxy.log_level, args.log_file, args.log_traffic)
    try:
        return run_daemon(config_path)
    except ListenError as exc:
        raise TemporaryError(str(exc)) from None
    except DaemonError as exc:
        raise UsageError(str(exc)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from localproxy.status import Snapshot, render, render_not_running

    config_path = resolve_config_path(args.config)
    console = Console()

    def fetch() -> Snapshot | None:
        from localproxy.control import NotRunning, request

        try:
            answer = request(_load(args), "status")
        except NotRunning:
            return None
        if not answer.get("ok"):
            raise UsageError(f"the proxy could not report its status: {answer.get('error')}")
        return Snapshot.from_json(json.dumps(answer["snapshot"]))

    snapshot = fetch()
    if snapshot is None and args.json:  # scripts read stdout: JSON there too
        print(json.dumps({"running": False, "config": str(config_path), "start": "localproxy run"}))
        return EXIT_NOT_RUNNING
    if snapshot is None:
        console.print(render_not_running(config_path))
        return EXIT_NOT_RUNNING
    if args.json:
        print(snapshot.to_json())
        return EXIT_OK
    if not args.watch:
        console.print(render(snapshot))
        return EXIT_OK
    return _watch(console, snapshot, fetch, render, render_not_running, config_path)


def _watch(console: Console, first, fetch, render, render_not_running, config_path: Path) -> int:
    import time

    from rich.live import Live

    with Live(render(first), console=console, refresh_per_second=1, screen=False) as live:
        try:
            while True:
                time.sleep(2)
                snapshot = fetch()
                live.update(render(snapshot) if snapshot else render_not_running(config_path))
        except KeyboardInterrupt:
            return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    answer = _control(args, "reload")
    if not answer.get("ok"):
        if "restarted" in answer:  # read, but an account could not take its new settings
            raise UsageError(f"config reloaded, but {answer['error']}")
        raise UsageError(f"config not reloaded: {answer.get('error')}")
    restarted = ", ".join(answer["restarted"]) or "no account"
    Console().print(f"Config reloaded; restarted: {restarted}.")
    return EXIT_OK


def cmd_outbox_flush(args: argparse.Namespace) -> int:
    answer = _control(args, "flush-outbox")
    Console().print(f"Delivered {answer.get('delivered', 0)} queued message(s).")
    return EXIT_OK


def _control(args: argparse.Namespace, command: str) -> dict:
    from localproxy.control import NotRunning, request

    try:
        return request(_load(args), command)
    except NotRunning as exc:
        raise NotRunningError(str(exc)) from None


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
    from localproxy.demo import DemoError
    from localproxy.init import InitError
    from localproxy.keys.commands import KeysError
    from localproxy.keys.store import KeyStoreError
    from localproxy.localtls import LocalTLSError
    from localproxy.secretbox import SecretBoxError
    from localproxy.service import ServiceError

    return (
        CryptoError,
        DemoError,
        InitError,
        KeysError,
        KeyStoreError,
        LocalTLSError,
        SecretBoxError,
        ServiceError,
    )


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
    except TemporaryError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_TEMPFAIL
    except NotRunningError as exc:
        err.print(
            f"{escape(str(exc))}\nStart it with [bold]localproxy run[/] or as a "
            "service: [bold]localproxy service install[/]",
            soft_wrap=True,
        )
        return EXIT_NOT_RUNNING
    except operation_errors as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
