"""The delivery report put into the INBOX when a queued copy fails for good."""

from __future__ import annotations

import asyncio
import email
import email.policy
from datetime import UTC, datetime

import pytest

from localproxy.notice import failure_report
from localproxy.upstream import ImapUpstream, UpstreamReply, imap_append

COPY = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: ...\r\n"
    b"Message-ID: <m1@example.org>\r\nX-Mailer: client\r\n"
    b"Content-Type: multipart/encrypted; boundary=x;\r\n protocol=application/pgp-encrypted\r\n"
    b"\r\nthe copy's body never goes into the report\r\n"
)


def report(error: str = "550 5.1.1 <carol@example.org>: Recipient address rejected"):
    raw = failure_report(
        "alice@example.org",
        ("carol@example.org", "dave@example.org"),
        error,
        COPY,
        datetime(2026, 12, 1, 10, 0, tzinfo=UTC),
        3,
    )
    return raw, email.message_from_bytes(raw, policy=email.policy.default)


def test_a_report_is_rfc3464_with_every_recipient():
    raw, message = report()
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["To"].addresses[0].addr_spec == "alice@example.org"
    text, status, headers = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "carol@example.org" in text.get_content() and "tried 3 time(s)" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    assert raw.count(b"Final-Recipient: rfc822;") == 2
    assert raw.count(b"Status: 5.1.1") == 2
    assert headers.get_content_type() == "text/rfc822-headers"


def test_the_report_shows_the_outer_header_and_never_the_text():
    raw, _message = report()
    assert b"Message-ID: <m1@example.org>" in raw and b"Subject: ...\r\n" in raw
    assert b"X-Mailer" not in raw and b"never goes into the report" not in raw


def test_without_an_enhanced_code_the_status_is_permanent_other():
    raw, _message = report("554 Transaction failed")
    assert b"Status: 5.0.0" in raw and b"Diagnostic-Code: smtp; 554 Transaction failed" in raw


class Written:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def fake_connection(replies: bytes) -> tuple[ImapUpstream, Written]:
    reader = asyncio.StreamReader()
    reader.feed_data(replies)
    reader.feed_eof()
    written = Written()
    return ImapUpstream(reader, written, b"* OK", None), written  # type: ignore[arg-type]


async def test_append_waits_past_untagged_news_for_the_continuation():
    conn, written = fake_connection(b"* OK [ALERT] maintenance\r\n+ go\r\nLP6 OK APPEND done\r\n")
    assert await imap_append(conn, b"INBOX", b"Subject: r\r\n\r\nx\r\n") == "OK APPEND done"
    assert written.data == b'LP6 APPEND "INBOX" {17}\r\nSubject: r\r\n\r\nx\r\n\r\n'


async def test_a_refused_append_says_why():
    conn, written = fake_connection(b"LP6 NO [OVERQUOTA] mailbox full\r\n")
    with pytest.raises(UpstreamReply, match="OVERQUOTA"):
        await imap_append(conn, b"INBOX", b"x\r\n")
    assert b"x\r\n" not in written.data.partition(b"\r\n")[2], "no literal after a refusal"
