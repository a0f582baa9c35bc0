"""Daemon pieces that need no running daemon."""

from __future__ import annotations

import logging
import sys

import pytest

from localproxy.daemon import OneLineFormatter, sent_kind


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ('multipart/encrypted; protocol="application/pgp-encrypted"; boundary=b', "encrypted"),
        ("application/pkcs7-mime; smime-type=enveloped-data", "encrypted"),
        ('multipart/signed; protocol="application/pgp-signature"; boundary=b', "signed"),
        ("text/plain; charset=utf-8", "plain"),
        (None, "plain"),
    ],
)
def test_a_delivered_outbox_copy_counts_by_its_top_level_type(content_type, kind):
    header = b"From: a@example.org\r\nTo: b@example.org\r\n"
    if content_type is not None:
        header += b"Content-Type: " + content_type.encode() + b"\r\n"
    assert sent_kind(header + b"\r\nbody\r\n") == kind


def test_a_logged_traceback_is_one_redacted_line():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "session failed", None, None)
    said = "the client said:\nLOGIN alice " + "hunter" + "2\nand then hung up"
    try:
        raise ValueError(said)
    except ValueError:
        record.exc_info = sys.exc_info()
    line = OneLineFormatter().format(record)
    assert "\n" not in line
    assert "session failed | Traceback (most recent call last):" in line
    assert "LOGIN alice <redacted>" in line and "hunter2" not in line
