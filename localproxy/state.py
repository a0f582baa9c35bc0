"""Counters and recent events that survive restarts (SQLite in the data dir).

Only counts, addresses and short texts are stored here: never message content,
never credentials.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

COUNTERS = (
    "sent_encrypted",
    "sent_signed",
    "sent_plain",
    "received_decrypted",
    "received_verified",
    "received_failed",
)
MAX_EVENTS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    account TEXT NOT NULL, day TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (account, day, name)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, level TEXT NOT NULL,
    account TEXT, kind TEXT NOT NULL, message TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredEvent:
    time: datetime
    level: str  # "info", "warning" or "error"
    account: str | None
    kind: str
    message: str


class State:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def count(self, account: str, name: str, amount: int = 1, day: date | None = None) -> None:
        if name not in COUNTERS:
            raise ValueError(f"unknown counter {name!r}")
        today = (day or date.today()).isoformat()  # the user's day: local midnight
        with self._lock:
            self._db.execute(
                "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT(account, day, name) "
                "DO UPDATE SET value = value + excluded.value",
                (account, today, name, amount),
            )

    def counters(self, account: str, day: date | None = None) -> dict[str, int]:
        """Totals since the first start, or of one day."""
        query = "SELECT name, SUM(value) FROM counters WHERE account = ?"
        args: tuple[str, ...] = (account,)
        if day is not None:
            query += " AND day = ?"
            args += (day.isoformat(),)
        with self._lock:
            rows = dict(self._db.execute(query + " GROUP BY name", args).fetchall())
        return {name: int(rows.get(name, 0)) for name in COUNTERS}

    def event(self, level: str, kind: str, message: str, account: str | None = None) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute(
                "INSERT INTO events (time, level, account, kind, message) VALUES (?, ?, ?, ?, ?)",
                (now, level, account, kind, message[:500]),
            )
            self._db.execute(
                "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (MAX_EVENTS,)
            )

    def recent(self, limit: int = 20) -> list[StoredEvent]:
        """The newest events, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT time, level, account, kind, message FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            StoredEvent(datetime.fromisoformat(t), lvl, acct, kind, msg)
            for t, lvl, acct, kind, msg in reversed(rows)
        ]
