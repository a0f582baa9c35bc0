"""SQLite conventions shared by the key store and the outbox."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext


@contextmanager
def immediate(
    db: sqlite3.Connection, lock: threading.RLock | None = None
) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes SQLite's write lock up front (BEGIN IMMEDIATE), so a
    read-then-update never interleaves with another writer, which waits (busy_timeout)
    instead of failing half-way. The optional lock serializes threads sharing `db`."""
    with lock if lock is not None else nullcontext():
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def retry_locked(setup: Callable[[], None], attempts: int = 50) -> None:
    """Switching a new database to WAL answers "locked" at once, without waiting for the
    busy timeout, when another process opens it at the same moment: try again."""
    for attempt in range(attempts):
        try:
            setup()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.1)
