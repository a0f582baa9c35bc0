"""`localproxy check`: connect to each account's provider exactly as the proxy will."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from localproxy.config import Account, UpstreamServer
from localproxy.tls import TLSInfo, UpstreamError
from localproxy.upstream import LoginFailed, connect_imap, connect_smtp, imap_login, smtp_login

EXPIRY_WARNING_DAYS = 14


@dataclass
class ServiceCheck:
    """The outcome of connecting (and optionally logging in) to one upstream service."""

    account: str
    service: str  # "imap" or "smtp"
    server: UpstreamServer
    tls: TLSInfo | None = None
    error: UpstreamError | None = None
    login: str | None = None  # the provider's OK text
    login_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.login_error is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "account": self.account,
            "service": self.service,
            "host": self.server.host,
            "port": self.server.port,
            "security": self.server.security,
            "ok": self.ok,
            "tls": self.tls.as_dict() if self.tls else None,
            "error": None,
        }
        if self.error:
            out["error"] = {"kind": str(self.error.failure), "message": str(self.error)}
        if self.login is not None or self.login_error is not None:
            out["login"] = {
                "ok": self.login_error is None,
                "message": self.login if self.login_error is None else self.login_error,
            }
        return out


async def check_service(account: Account, service: str, password: str | None) -> ServiceCheck:
    server = account.imap if service == "imap" else account.smtp
    result = ServiceCheck(account.name, service, server)
    try:
        if service == "imap":
            await _check_imap(result, account, password)
        else:
            await _check_smtp(result, account, password)
    except UpstreamError as exc:
        result.error = exc
    except LoginFailed as exc:
        result.login_error = str(exc)
    except (OSError, TimeoutError) as exc:
        result.login_error = f"connection lost during login ({exc.__class__.__name__})"
    return result


async def _check_imap(result: ServiceCheck, account: Account, password: str | None) -> None:
    conn = await connect_imap(result.server)
    result.tls = conn.tls
    try:
        if password is not None:
            async with asyncio.timeout(result.server.timeout):
                result.login = await imap_login(conn, account.login, password)
    finally:
        await conn.close()


async def _check_smtp(result: ServiceCheck, account: Account, password: str | None) -> None:
    smtp, result.tls = await connect_smtp(result.server)
    try:
        if password is not None:
            result.login = await smtp_login(smtp, account.login, password)
    finally:
        smtp.close()


async def run_checks(
    accounts: Sequence[Account], passwords: dict[str, str | None]
) -> list[ServiceCheck]:
    jobs = [
        check_service(a, service, passwords.get(a.name))
        for a in accounts
        for service in ("imap", "smtp")
    ]
    return list(await asyncio.gather(*jobs))


def render_checks(checks: Sequence[ServiceCheck], console: Console) -> None:
    table = Table(title="Upstream connections", show_lines=True)
    for column in ("Account", "Service", "Server", "Result", "TLS", "Certificate", "Login"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(
            c.account,
            c.service.upper(),
            f"{c.server.address}\n{c.server.security}",
            _result_cell(c),
            _tls_cell(c.tls),
            _cert_cell(c.tls),
            _login_cell(c),
        )
    console.print(table)


def _result_cell(c: ServiceCheck) -> str:
    if c.error is not None:
        return f"[bold red]FAILED[/]\n{_escape(c.error.detail)}"
    if c.login_error is not None:
        return "[bold red]LOGIN FAILED[/]"
    return "[bold green]OK[/]"


def _tls_cell(tls: TLSInfo | None) -> str:
    if tls is None:
        return "-"
    how = "STARTTLS" if tls.starttls else "implicit TLS"
    return f"{tls.version}\n{tls.cipher}\n{how}"


def _cert_cell(tls: TLSInfo | None) -> str:
    if tls is None:
        return "-"
    days = tls.days_left
    colour = "red" if days < 0 else "yellow" if days < EXPIRY_WARNING_DAYS else "green"
    return (
        f"subject: {_escape(tls.subject)}\nissuer: {_escape(tls.issuer)}\n"
        f"[{colour}]expires in {days} days[/] ({tls.not_after:%Y-%m-%d})\n"
        f"pin_sha256: {tls.spki_sha256}"
    )


def _login_cell(c: ServiceCheck) -> str:
    if c.login_error is not None:
        return f"[red]{_escape(c.login_error)}[/]"
    if c.login is not None:
        return f"[green]ok[/] {_escape(c.login)}"
    return "not tried (--login)"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
