"""The block-wise DATA receiver against a line-by-line reading of the same octets."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from localproxy.smtp.data import DataProblem, DataReceiver
from localproxy.smtp.pipe import dot_stuffed

PIECES = st.sampled_from([b".", b"..", b"\r\n", b"\r\n.", b"\n", b"\r", b"x", b"yyyyyyy\r\n"])
NEXT_COMMAND = b"QUIT\r\n"


def on_the_wire(message: bytes) -> bytes:
    """What a client sends after 354: dot-stuffed, CRLF-terminated, the end mark."""
    stuffed = b"".join(bytes(p) for p in dot_stuffed(message))
    return stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def receive(receiver: DataReceiver, pieces: list[bytes]) -> bytes:
    """Feed pieces until the data ends; the octets left over for the next command."""
    for index, piece in enumerate(pieces):
        end = receiver.feed(piece)
        if end is not None:
            return piece[end:] + b"".join(pieces[index + 1 :])
    raise AssertionError("the end of the data was not found")


def by_lines(stream: bytes, size_limit: int | None, line_limit: int) -> DataProblem | None:
    """The reference: the data before the end mark, one line at a time."""
    data = stream[: -len(b".\r\n")]
    if any(len(line) + 1 > line_limit for line in data.split(b"\n")[:-1]):
        return DataProblem.TOO_LONG
    if size_limit and len(data) > size_limit:
        return DataProblem.TOO_MUCH
    return None


@given(st.lists(PIECES, max_size=40), st.lists(st.integers(min_value=0), max_size=8))
def test_any_cut_gives_back_the_message_and_leaves_the_next_command(
    parts: list[bytes], cuts: list[int]
) -> None:
    message = b"".join(parts)
    expected = message if message.endswith(b"\r\n") else message + b"\r\n"
    receiver = DataReceiver(None, line_limit=10_000)
    leftover = receive(receiver, cut(on_the_wire(message) + NEXT_COMMAND, cuts))
    assert leftover == NEXT_COMMAND
    assert receiver.content() == expected


@given(
    st.lists(PIECES, max_size=40),
    st.lists(st.integers(min_value=0), max_size=8),
    st.integers(min_value=5, max_value=30),
    st.one_of(st.none(), st.integers(min_value=1, max_value=120)),
)
def test_limits_match_a_line_by_line_reading(
    parts: list[bytes], cuts: list[int], line_limit: int, size_limit: int | None
) -> None:
    stream = on_the_wire(b"".join(parts))
    receiver = DataReceiver(size_limit, line_limit=line_limit)
    assert receive(receiver, cut(stream, cuts)) == b""
    expected = by_lines(stream, size_limit, line_limit)
    assert (receiver.problem is None) == (expected is None)
    if receiver.problem is not None:
        assert not receiver._data, "nothing kept once the message is refused"


def test_a_message_that_is_only_the_end_mark_is_empty() -> None:
    receiver = DataReceiver(None)
    assert receiver.feed(b".\r\n") == 3
    assert receiver.content() == b""


def test_an_overlong_line_is_refused_before_it_ends() -> None:
    receiver = DataReceiver(None)
    assert receiver.feed(b"x" * 600) is None and receiver.problem is None
    assert receiver.feed(b"x" * 600) is None
    assert receiver.problem is DataProblem.TOO_LONG


def test_a_1000_octet_line_is_allowed_and_1001_is_not() -> None:
    fits, over = DataReceiver(None), DataReceiver(None)
    fits.feed(b"x" * 998 + b"\r\n.\r\n")
    over.feed(b"x" * 999 + b"\r\n.\r\n")
    assert fits.problem is None and over.problem is DataProblem.TOO_LONG


def test_too_much_data_is_dropped_as_it_arrives() -> None:
    receiver = DataReceiver(100)
    for _ in range(50):
        receiver.feed(b"0123456789" * 5 + b"\r\n")
    assert receiver.problem is DataProblem.TOO_MUCH and not receiver._data
    assert receiver.feed(b".\r\n") == 3
