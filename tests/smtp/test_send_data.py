"""The streaming DATA writer: the same octets on the wire as aiosmtplib's data()."""

from __future__ import annotations

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from localproxy.smtp import pipe

PIECES = st.sampled_from([b".", b"..", b"\r\n", b"\r\n.", b"x", b"x\r\n"])


def wire(message: bytes) -> bytes:
    end = b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n"
    return b"".join(bytes(p) for p in pipe.dot_stuffed(message)) + end


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
@given(st.lists(PIECES, max_size=20))
def test_dot_stuffing_matches_aiosmtplib(chunk: int, pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
    original = pipe.DATA_CHUNK
    pipe.DATA_CHUNK = chunk
    try:
        assert wire(message) == expected
    finally:
        pipe.DATA_CHUNK = original
