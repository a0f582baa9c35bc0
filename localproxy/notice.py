"""Telling the user in their own INBOX that a queued copy could not be delivered.

The client got 250 for the message (the provider took the first copy), so a copy
that later fails for good would otherwise only show in the log and in `status`.
Like a mail server's bounce, localproxy then puts a delivery report (RFC 3464,
multipart/report) into the account's INBOX over the usual verified-TLS IMAP
connection, logged in with the credentials the copy was queued with.

The report names the recipients, the provider's answer and the copy's outer header
(what the provider saw anyway); never the message text.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import secrets
from datetime import datetime

from localproxy.config import Account
from localproxy.mime import CRLF, split_header_body
from localproxy.upstream import (
    connect_imap,
    imap_append,
    imap_authenticate,
    imap_authenticate_xoauth2,
)

_STATUS = re.compile(rb"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_KEPT_HEADERS = re.compile(rb"(?i)^(from|to|cc|date|subject|message-id):")


def failure_report(
    address: str,
    recipients: tuple[str, ...],
    error: str,
    copy: bytes,
    queued_at: datetime,
    attempts: int,
) -> bytes:
    """The report for `address` (the account's) about a copy that failed for good."""
    boundary = f"localproxy-report-{secrets.token_hex(8)}"
    status = _enhanced_status(error)
    listed = "".join(f"  {r}\r\n" for r in recipients)
    text = (
        f"localproxy could not deliver a copy of your message to:\r\n\r\n{listed}\r\n"
        f"The provider answered:\r\n\r\n  {error}\r\n\r\n"
        f"Your mail client was told the message was sent, because the provider took it\r\n"
        f"for the other recipients. The copy above was queued at "
        f"{email.utils.format_datetime(queued_at)} and tried {attempts} time(s); it will\r\n"
        f"not be tried again (`localproxy outbox` shows it until you dismiss it).\r\n"
    )
    per_recipient = "".join(
        f"\r\nFinal-Recipient: rfc822; {r}\r\nAction: failed\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {_one_line(error)}\r\n"
        for r in recipients
    )
    delivery_status = (
        "Reporting-MTA: dns; localhost\r\n"
        f"Arrival-Date: {email.utils.format_datetime(queued_at)}\r\n{per_recipient}"
    )
    header = (
        'From: "localproxy" <postmaster@localhost>\r\n'
        f"To: <{address}>\r\n"
        f"Subject: Undelivered mail: {len(recipients)} recipient(s) could not be reached\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\n"
        f"Message-ID: <{secrets.token_hex(16)}@localproxy.invalid>\r\n"
        "Auto-Submitted: auto-generated\r\n"  # RFC 3834: no client should answer it
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
    )
    parts = [
        ("text/plain; charset=utf-8", text),
        ("message/delivery-status", delivery_status),
        ("text/rfc822-headers", _outer_header(copy).decode("utf-8", "replace")),
    ]
    body = "".join(f"--{boundary}\r\nContent-Type: {ct}\r\n\r\n{p}\r\n" for ct, p in parts)
    return (header + "\r\n" + body + f"--{boundary}--\r\n").encode()


async def put_in_inbox(account: Account, credentials: tuple[str, str, str], report: bytes) -> None:
    """APPEND the report to INBOX; `credentials` is (mechanism, user, secret). Raises
    UpstreamError, LoginFailed, UpstreamReply, TimeoutError or OSError when it cannot."""
    mechanism, user, secret = credentials
    conn = await connect_imap(account.imap)
    try:
        # The outbox worker waits for this: a provider that stalls must not hold it.
        async with asyncio.timeout(account.imap.timeout):
            if mechanism == "XOAUTH2":
                await imap_authenticate_xoauth2(conn, user, secret)
            else:
                await imap_authenticate(conn, user, secret)
            await imap_append(conn, b"INBOX", report)
        conn.writer.write(b"LP7 LOGOUT\r\n")
    finally:
        await conn.close()


def _enhanced_status(error: str) -> str:
    """The provider's enhanced status code (RFC 3463), else 5.0.0 (permanent, other)."""
    found = _STATUS.search(error.encode())
    return b".".join(found.groups()).decode() if found else "5.0.0"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _outer_header(copy: bytes) -> bytes:
    """The copy's identifying header fields (an encrypted copy's outer header hides the
    real Subject; this shows what the provider was given)."""
    header, _sep, _body = split_header_body(copy)
    lines, keep = [], False
    for line in header.splitlines(keepends=True):
        if not line[:1].isspace():
            keep = bool(_KEPT_HEADERS.match(line))
        if keep:
            lines.append(line if line.endswith(b"\n") else line + CRLF)
    return b"".join(lines)
