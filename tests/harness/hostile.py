"""Helpers for the bounded hostile-input suites (tests/**/test_*_hostile.py).

Hypothesis' `deadline` only judges an example after it returns, so an exponential parse
would hang the run instead of failing it. `time_limit` interrupts the example with
`Hang` (SIGALRM, main thread only), which hypothesis then shrinks like any failure.
`mutations` turns a valid input into hostile variants: cut, duplicated, spliced with
fragments that parsers choke on, bytes flipped.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hypothesis import strategies as st

HANG_SECONDS = 2.0  # one example of a bounded suite takes milliseconds


class Hang(AssertionError):
    """The code under test ran past its time limit."""


class _Expired(BaseException):
    """Raised by the alarm: a BaseException, so that no `except Exception` in the code
    under test (which turns library errors into its own) can swallow it."""


@contextmanager
def time_limit(seconds: float = HANG_SECONDS) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise Hang(f"still running after {seconds} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def mutations(
    draw: st.DrawFn, data: bytes, fragments: Sequence[bytes], max_steps: int = 4
) -> bytes:
    """data changed by 1..max_steps edits: truncate, delete or duplicate a slice, insert
    a fragment (or random bytes), overwrite or flip a byte."""
    for _ in range(draw(st.integers(1, max_steps))):
        data = _edit(draw, data, fragments)
    return data


def _edit(draw: st.DrawFn, data: bytes, fragments: Sequence[bytes]) -> bytes:
    size = len(data)
    at = draw(st.integers(0, size))
    end = draw(st.integers(at, min(size, at + 64)))
    kind = draw(st.sampled_from(["cut", "delete", "duplicate", "insert", "byte", "flip"]))
    if kind == "cut":
        return data[:at]
    if kind == "delete":
        return data[:at] + data[end:]
    if kind == "duplicate":
        return data[:end] + data[at:end] * draw(st.integers(1, 3)) + data[end:]
    if kind == "insert":
        fragment = draw(st.one_of(st.sampled_from(fragments), st.binary(min_size=1, max_size=8)))
        return data[:at] + fragment + data[at:]
    if at == size:
        return data
    old = data[at]
    new = draw(st.integers(0, 255)) if kind == "byte" else old ^ (1 << draw(st.integers(0, 7)))
    return data[:at] + bytes([new]) + data[at + 1 :]
