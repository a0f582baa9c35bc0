"""Durable outbox: copies of a message that the provider has not accepted yet.

The SMTP proxy sends several copies of one message (To/Cc, one per Bcc, a plain one).
The client gets 250 once the first copy is accepted; a later copy that fails for now is
put here, and `OutboxWorker` retries it with backoff until it is delivered, fails
permanently (5xx) or grows older than `max_age`. A failed item stays, visible in
`localproxy status`, until the user dismisses it.

Storage: one SQLite file (WAL, synchronous=FULL, secure_delete, mode 0600). Message and
upstream credentials are sealed with the store key; the AAD binds them to the item id and
its envelope, so a sealed blob moved to another row, or an envelope edited on disk, no
longer opens. A record that does not open fails alone; the others go on.

Delivery is at-least-once, never exactly-once (SMTP cannot do better): a crash after the
provider's 250 and before `delivered()` commits sends that copy again, once, after the
restart. Nothing is ever lost: an item leaves the file only through `delivered()` or
`dismiss()`.

Claims: `claim()` flips queued -> sending in one UPDATE, so of two workers on one file
(the daemon and a CLI `flush`) only one gets an item. The claim records the claiming
Outbox's owner token; each open Outbox holds an flock on its own file in
`<db>.owners/`. The kernel drops a flock when its process dies (SIGKILL included), so an
item "sending" under an unlocked token belongs to a dead process and is queued again
(counted as one failed attempt, so a message that crashes the sender cannot loop
forever). A live owner's claims are never taken over, whatever the clocks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

from localproxy.aio import cancel_and_wait
from localproxy.secretbox import SecretBox, SecretBoxError
from localproxy.sqlite import immediate, retry_locked

try:
    import fcntl
except ImportError:  # Windows: see _OwnerLocks
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_BACKOFF: tuple[timedelta, ...] = (
    timedelta(minutes=1),
    timedelta(minutes=5),
    timedelta(minutes=15),
    timedelta(hours=1),
    timedelta(hours=4),  # the last step repeats until max_age
)
DEFAULT_MAX_AGE = timedelta(days=5)
INTERRUPTED = "interrupted while sending (the sending process ended); the provider may have it"
_MAX_ERROR_CHARS = 2000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SEAL_LABEL = b"localproxy-outbox-v1"

State = Literal["queued", "sending", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq          INTEGER PRIMARY KEY,     -- insertion order: FIFO among equal `created`
    id           TEXT NOT NULL UNIQUE,
    account      TEXT NOT NULL,
    mail_from    TEXT NOT NULL,
    recipients   TEXT NOT NULL,           -- JSON array; bound into the seals' AAD
    size         INTEGER NOT NULL,        -- of the plaintext message
    message      BLOB NOT NULL,           -- SecretBox(store key)
    credentials  BLOB NOT NULL,           -- SecretBox(store key)
    created      INTEGER NOT NULL,        -- microseconds since the epoch, UTC
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    last_error   TEXT,
    state        TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'failed')),
    owner        TEXT,                    -- token of the claiming Outbox while 'sending'
    notified     INTEGER NOT NULL DEFAULT 0  -- on_failed was called for this failure
);
CREATE INDEX IF NOT EXISTS outbox_by_due ON outbox (state, next_attempt);
"""


def now_utc() -> datetime:
    return datetime.now(UTC)


class TemporaryFailure(Exception):
    """send() could not deliver now (4xx, connection trouble): retry later."""


class PermanentFailure(Exception):
    """send() was refused for good (5xx): give up and tell the user."""


class OutboxError(Exception):
    """An outbox operation that cannot be done; the message says why."""


class UnknownItem(OutboxError, LookupError):
    """No item with this id (delivered or dismissed meanwhile)."""


class UnreadableItem(OutboxError):
    """claim() found a record that does not open; it is now failed (see `.item`)."""

    def __init__(self, item: OutboxItem) -> None:
        super().__init__(item.last_error)
        self.item = item


@dataclass(frozen=True)
class OutboxItem:
    id: str
    account: str
    mail_from: str
    recipients: tuple[str, ...]
    # repr=False: an item in a log line must never show the mail or the login.
    message: bytes = field(repr=False)
    credentials: bytes = field(repr=False)  # opaque blob from the caller (upstream login)
    created: datetime
    attempts: int
    next_attempt: datetime
    last_error: str | None
    state: State
    readable: bool = True  # False: the record did not open; message/credentials are empty


@dataclass(frozen=True)
class OutboxSummary:
    """What status shows: everything but the message and the credentials."""

    id: str
    account: str
    recipients: tuple[str, ...]
    size: int
    created: datetime
    attempts: int
    next_attempt: datetime
    last_error: str | None
    state: State

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "account": self.account,
            "recipients": list(self.recipients),
            "size": self.size,
            "created": self.created.isoformat(),
            "attempts": self.attempts,
            "next_attempt": self.next_attempt.isoformat(),
            "last_error": self.last_error,
            "state": self.state,
        }


class OutboxStats(NamedTuple):
    queued: int  # waiting or being sent right now
    failed: int  # permanently, until dismissed
    oldest: datetime | None  # creation time of the oldest waiting item


def backoff_delay(attempts: int, schedule: Sequence[timedelta] = DEFAULT_BACKOFF) -> timedelta:
    """Wait after the `attempts`-th failed attempt (1-based); the last step repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


def _to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("the outbox clock must return timezone-aware datetimes")
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_us(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def _seal_context(item_id: str, what: bytes, envelope: str) -> bytes:
    # Distinct per item, per column and per envelope: a blob copied to another row or
    # column, or a recipient list edited on disk, fails the AEAD check.
    return b"\0".join((_SEAL_LABEL, item_id.encode(), what, envelope.encode()))


def _envelope(account: str, mail_from: str, recipients_json: str) -> str:
    return json.dumps([account, mail_from, recipients_json])


# --------------------------------------------------------------------------- owner locks


class _OwnerLocks:
    """Which Outbox instances (in any process) are still alive.

    Each open Outbox holds an exclusive flock on `<dir>/<token>`. A token whose file can
    be locked by someone else (or has no file) belongs to a dead instance. Without fcntl
    (Windows) every other owner counts as dead, which keeps crash recovery but allows a
    concurrent duplicate when two processes share one outbox there."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.token = secrets.token_hex(8)
        self._fd: int | None = None
        if fcntl is not None:
            directory.mkdir(mode=0o700, exist_ok=True)
            self.token, self._fd = self._acquire()

    def _acquire(self) -> tuple[str, int]:
        while True:
            token = secrets.token_hex(8)  # never reused: unlinking by name stays safe
            path = self.directory / token
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a sweeper holds it for a moment at most
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return token, fd
            os.close(fd)  # a sweeper took it for a dead owner's file before we locked it

    def is_alive(self, token: str | None) -> bool:
        if token == self.token:
            return True
        if token is None or fcntl is None or not _is_token(token):
            return False
        return not self._reap(self.directory / token)

    def sweep(self) -> None:
        """Remove the files of owners that died without closing (SIGKILL, power loss)."""
        if fcntl is None:
            return
        for path in self.directory.iterdir():
            if path.name != self.token and _is_token(path.name):
                self._reap(path)

    @staticmethod
    def _reap(path: Path) -> bool:
        """True (and the file removed) when no live owner holds `path`."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / self.token)  # before unlocking: never seen free
            os.close(self._fd)
            self._fd = None


def _is_token(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


# --------------------------------------------------------------------------- the outbox


class Outbox:
    """The queued copies of one data dir. One instance per thread; several instances
    (processes) may share one file."""

    def __init__(
        self,
        path: Path,
        box: SecretBox,
        clock: Callable[[], datetime] = now_utc,
        *,
        max_age: timedelta = DEFAULT_MAX_AGE,
        backoff: Sequence[timedelta] = DEFAULT_BACKOFF,
    ) -> None:
        if not backoff:
            raise ValueError("backoff schedule must not be empty")
        self.path = path
        self.clock = clock
        self.max_age = max_age
        self.backoff = tuple(backoff)
        self._box = box
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._owners = _OwnerLocks(path.with_name(path.name + ".owners"))
        try:
            self._db = self._connect(path)
        except BaseException:
            self._owners.release()
            raise
        self._owners.sweep()
        self.recover_stale()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # Create the file 0600 before SQLite does: its -wal and -shm inherit the mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        path.chmod(0o600)
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA synchronous=FULL")  # WAL + NORMAL may lose the last commit
        db.execute("PRAGMA secure_delete=ON")  # delivered mail is overwritten, not freed
        retry_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
        retry_locked(lambda: db.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};"))
        return db

    def close(self) -> None:
        """Put this instance's unfinished claims back (not counted as attempts) and close.
        Stop the worker first."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(sqlite3.Error), self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = 'queued', owner = NULL "
                "WHERE state = 'sending' AND owner = ?",
                (self._owners.token,),
            )
        self._db.close()
        self._owners.release()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-update cannot interleave
        # with another process's claim.
        with immediate(self._db) as db:
            yield db

    def _now_us(self) -> int:
        return _to_us(self.clock())

    # ----------------------------------------------------------------------- adding

    def add(
        self,
        account: str,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        credentials: bytes,
        *,
        error: str | None = None,
        permanent: bool = False,
        notify: bool = True,
    ) -> OutboxItem:
        """Queue a copy. Durable (committed and fsync'ed) when this returns.

        Without `error` it is due now. With `error` the caller's own failed attempt is
        recorded in the same transaction (backoff as retry_later(), or failed at once when
        `permanent`), so no other process can claim it in between. `notify=False`: the
        caller tells the user itself, on_failed is not called for this item."""
        if not recipients:
            raise ValueError("an outbox item needs at least one recipient")
        item_id = secrets.token_hex(12)
        rcpts = json.dumps(list(recipients))
        envelope = _envelope(account, mail_from, rcpts)
        now = self.clock()
        state, attempts, next_attempt = "queued", 0, now
        if error is not None:
            state, next_attempt, error = self._after_failure(1, now, now, error, permanent)
            attempts = 1
        with self._transaction() as db:
            db.execute(
                "INSERT INTO outbox (id, account, mail_from, recipients, size, message, "
                "credentials, created, attempts, next_attempt, last_error, state, notified) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    item_id,
                    account,
                    mail_from,
                    rcpts,
                    len(message),
                    self._box.seal(message, _seal_context(item_id, b"message", envelope)),
                    self._box.seal(credentials, _seal_context(item_id, b"credentials", envelope)),
                    _to_us(now),
                    attempts,
                    _to_us(next_attempt),
                    error,
                    state,
                    int(not notify),
                ),
            )
        return self._load(item_id)

    # ----------------------------------------------------------------------- reading

    def _row(self, item_id: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItem(f"no outbox item {item_id}")
        return row

    def _open(self, row: sqlite3.Row) -> tuple[bytes, bytes]:
        """Message and credentials; raises SecretBoxError when the record does not open."""
        envelope = _envelope(row["account"], row["mail_from"], row["recipients"])
        message = self._box.open(row["message"], _seal_context(row["id"], b"message", envelope))
        credentials = self._box.open(
            row["credentials"], _seal_context(row["id"], b"credentials", envelope)
        )
        return message, credentials

    def _item(self, row: sqlite3.Row, contents: tuple[bytes, bytes] | None) -> OutboxItem:
        message, credentials = contents if contents is not None else (b"", b"")
        return OutboxItem(
            id=row["id"],
            account=row["account"],
            mail_from=row["mail_from"],
            recipients=tuple(json.loads(row["recipients"])),
            message=message,
            credentials=credentials,
            created=_from_us(row["created"]),
            attempts=row["attempts"],
            next_attempt=_from_us(row["next_attempt"]),
            last_error=row["last_error"],
            state=row["state"],
            readable=contents is not None,
        )

    def _lenient_item(self, row: sqlite3.Row) -> OutboxItem:
        try:
            return self._item(row, self._open(row))
        except SecretBoxError:
            return self._item(row, None)

    def _load(self, item_id: str) -> OutboxItem:
        return self._lenient_item(self._row(item_id))

    def get(self, item_id: str) -> OutboxItem | None:
        """The item (contents empty and `readable` False if its record does not open)."""
        try:
            return self._load(item_id)
        except UnknownItem:
            return None

    def queued_ids(self, *, due_only: bool = True, limit: int | None = None) -> list[str]:
        """Ids of queued items, oldest first; with due_only, only those due now."""
        query = "SELECT id FROM outbox WHERE state = 'queued'"
        args: list[int] = []
        if due_only:
            query += " AND next_attempt <= ?"
            args.append(self._now_us())
        query += " ORDER BY created, seq LIMIT ?"
        args.append(-1 if limit is None else limit)
        return [row["id"] for row in self._db.execute(query, args)]

    def due(self, limit: int = 20) -> list[OutboxItem]:
        """Queued items due now, oldest first. A record that does not open is left out
        here; claim() marks it failed."""
        items = []
        for item_id in self.queued_ids(due_only=True, limit=limit):
            row = self._row(item_id)
            try:
                items.append(self._item(row, self._open(row)))
            except SecretBoxError:
                log.warning("outbox item %s does not open; it fails when claimed", item_id)
        return items

    def next_due(self) -> datetime | None:
        """When the earliest queued item is due (possibly in the past)."""
        row = self._db.execute(
            "SELECT MIN(next_attempt) AS due FROM outbox WHERE state = 'queued'"
        ).fetchone()
        return None if row["due"] is None else _from_us(row["due"])

    def summaries(self) -> list[OutboxSummary]:
        rows = self._db.execute(
            "SELECT id, account, recipients, size, created, attempts, next_attempt, "
            "last_error, state FROM outbox ORDER BY created, seq"
        )
        return [
            OutboxSummary(
                id=row["id"],
                account=row["account"],
                recipients=tuple(json.loads(row["recipients"])),
                size=row["size"],
                created=_from_us(row["created"]),
                attempts=row["attempts"],
                next_attempt=_from_us(row["next_attempt"]),
                last_error=row["last_error"],
                state=row["state"],
            )
            for row in rows
        ]

    def stats(self) -> OutboxStats:
        row = self._db.execute(
            "SELECT COUNT(*) FILTER (WHERE state != 'failed') AS queued, "
            "COUNT(*) FILTER (WHERE state = 'failed') AS failed, "
            "MIN(created) FILTER (WHERE state != 'failed') AS oldest FROM outbox"
        ).fetchone()
        oldest = None if row["oldest"] is None else _from_us(row["oldest"])
        return OutboxStats(row["queued"], row["failed"], oldest)

    # ----------------------------------------------------------------------- state changes

    def claim(self, item_id: str) -> OutboxItem | None:
        """Mark a queued item "sending" for this instance, whether due or not. None when it
        is not queued (another worker has it, or it is gone). Raises UnreadableItem, with
        the item now failed, when its record does not open."""
        with self._transaction() as db:
            claimed = db.execute(
                "UPDATE outbox SET state = 'sending', owner = ? WHERE id = ? AND state = 'queued'",
                (self._owners.token, item_id),
            ).rowcount
            row = db.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if not claimed:
            return None
        try:
            return self._item(row, self._open(row))
        except SecretBoxError as exc:
            error = f"the stored copy cannot be opened: {exc}"
            log.error("outbox item %s: %s", item_id, error)
            raise UnreadableItem(self.fail(item_id, error)) from None

    def release(self, item_id: str) -> None:
        """Give a claim back untried (shutdown, cancellation): queued, due as before."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = 'queued', owner = NULL "
                "WHERE id = ? AND state = 'sending'",
                (item_id,),
            )

    def delivered(self, item_id: str) -> None:
        """The provider accepted it: remove it (secure_delete overwrites the bytes)."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (item_id,))

    def retry_later(self, item_id: str, error: str) -> OutboxItem:
        """One more failed attempt: queued again after the backoff, or failed once the
        item is older than max_age."""
        with self._transaction() as db:
            self._record_failure(db, self._row(item_id), error, permanent=False)
        return self._load(item_id)

    def fail(self, item_id: str, error: str, *, notify: bool = True) -> OutboxItem:
        """Give up for good (counts as an attempt); the item stays, for the user to see,
        until dismissed. `notify=False`: on_failed is not called for it."""
        with self._transaction() as db:
            row = self._row(item_id)
            self._record_failure(db, row, error, permanent=True)
            if not notify:
                db.execute("UPDATE outbox SET notified = 1 WHERE id = ?", (item_id,))
        return self._load(item_id)

    def _record_failure(
        self,
        db: sqlite3.Connection,
        row: sqlite3.Row,
        error: str,
        *,
        permanent: bool,
        owner_dead: bool = False,
    ) -> None:
        if row["state"] == "sending" and row["owner"] != self._owners.token and not owner_dead:
            # Only the claimant decides what happened to a copy in flight; overriding a
            # live claim could let a third worker send it concurrently.
            raise OutboxError(f"outbox item {row['id']} is being sent by another process")
        attempts = row["attempts"] + 1
        state, next_attempt, error = self._after_failure(
            attempts, _from_us(row["created"]), self.clock(), error, permanent
        )
        db.execute(
            "UPDATE outbox SET state = ?, owner = NULL, attempts = ?, next_attempt = ?, "
            "last_error = ? WHERE id = ?",
            (state, attempts, _to_us(next_attempt), error, row["id"]),
        )

    def _after_failure(
        self, attempts: int, created: datetime, now: datetime, error: str, permanent: bool
    ) -> tuple[State, datetime, str]:
        """State, next attempt and error text after the `attempts`-th failed attempt."""
        error = error[:_MAX_ERROR_CHARS]
        if permanent:
            return "failed", now, error
        deadline = created + self.max_age
        if now >= deadline:
            age = _describe_age(now - created)
            return "failed", now, f"gave up after {attempts} attempts over {age}: {error}"
        # Clamped to the deadline: the final try happens when max_age is reached.
        return "queued", min(now + backoff_delay(attempts, self.backoff), deadline), error

    def dismiss(self, item_id: str) -> bool:
        """Delete a failed or queued item (the user gives up on it). An item being sent
        right now is not dismissed: False."""
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM outbox WHERE id = ? AND state != 'sending'", (item_id,)
            ).rowcount
        return deleted > 0

    def recover_stale(self) -> int:
        """Queue again the items left "sending" by instances that died; returns how many.
        Each counts as one failed attempt (the send may or may not have reached the
        provider), so it may also fail for max_age here."""
        owners = [
            row["owner"]
            for row in self._db.execute("SELECT DISTINCT owner FROM outbox WHERE state = 'sending'")
        ]
        dead = [owner for owner in owners if not self._owners.is_alive(owner)]
        recovered = 0
        for owner in dead:
            with self._transaction() as db:
                rows = db.execute(
                    "SELECT * FROM outbox WHERE state = 'sending' AND owner IS ?", (owner,)
                ).fetchall()
                for row in rows:
                    log.warning("outbox item %s: %s", row["id"], INTERRUPTED)
                    self._record_failure(db, row, INTERRUPTED, permanent=False, owner_dead=True)
            recovered += len(rows)
        return recovered

    def take_failure_notice(self) -> OutboxItem | None:
        """A failed item nobody was told about yet, marked as told (at most once, even
        with several workers); None when there is none."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM outbox WHERE state = 'failed' AND notified = 0 "
                "ORDER BY created, seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE outbox SET notified = 1 WHERE id = ?", (row["id"],))
        return self._lenient_item(row)


def _describe_age(age: timedelta) -> str:
    if age >= timedelta(days=2):
        return f"{age.days} days"
    hours = age // timedelta(hours=1)
    return f"{hours} hours" if hours >= 2 else f"{age // timedelta(minutes=1)} minutes"


# --------------------------------------------------------------------------- the worker

Outcome = Literal["delivered", "retry", "failed", "skipped"]


class OutboxWorker:
    """Sends what is due, one item at a time, until stopped. Runs on one event loop;
    call wake() from that loop."""

    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[OutboxItem], Awaitable[None]],
        on_failed: Callable[[OutboxItem], Awaitable[None]],
        poll_interval: float = 30.0,
        *,
        batch_size: int = 20,
        on_delivered: Callable[[OutboxItem], None] = lambda item: None,
    ) -> None:
        self.outbox = outbox
        self._send = send
        self._on_failed = on_failed
        self._on_delivered = on_delivered
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # Outcomes whose bookkeeping failed (database locked, disk full): retried first
        # on the next pass, so an accepted copy is not sent again because of it.
        self._unsettled: list[Callable[[], object]] = []

    async def run(self) -> None:
        """Send due items until stop(). Never ends on an error of send() or the store."""
        if self._task is not None:
            raise RuntimeError("this outbox worker is already running")
        self._task = asyncio.current_task()
        try:
            while not self._stopping:
                self._wakeup.clear()
                await self._sleep(await self._run_once())
        finally:
            self._task = None

    async def _run_once(self) -> float:
        """One pass over due items; returns how long to wait before the next."""
        try:
            ids = self.outbox.queued_ids(due_only=True, limit=self.batch_size)
            outcomes = await self._process(ids)
            if ids and all(outcome == "skipped" for outcome in outcomes):
                return self.poll_interval  # due but not ours to take: do not spin
            return self._until_next_due()
        except Exception:
            log.exception("outbox pass failed; trying again in %.0f s", self.poll_interval)
            return self.poll_interval

    def _until_next_due(self) -> float:
        due = self.outbox.next_due()
        if due is None:
            return self.poll_interval
        wait = (due - self.outbox.clock()).total_seconds()
        return min(self.poll_interval, max(0.0, wait))

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._stopping:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    def wake(self) -> None:
        """Look for due items now (after add(), or on a "flush outbox" request)."""
        self._wakeup.set()

    async def flush(self) -> int:
        """Try every queued item now, due or not; returns how many were delivered."""
        outcomes = await self._process(self.outbox.queued_ids(due_only=False))
        return outcomes.count("delivered")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop run(): the send in progress gets `grace` seconds, then is cancelled (its
        item goes back to the queue untried)."""
        self._stopping = True
        self._wakeup.set()
        task = self._task
        if task is None or task is asyncio.current_task():
            return
        _done, pending = await asyncio.wait({task}, timeout=grace)
        if pending:
            await cancel_and_wait(pending)

    # ----------------------------------------------------------------------- one pass

    async def _process(self, ids: list[str]) -> list[Outcome]:
        self._settle_leftovers()
        self.outbox.recover_stale()
        await self._notify_failures()
        outcomes: list[Outcome] = []
        for item_id in ids:
            if self._stopping:
                break
            outcomes.append(await self._attempt(item_id))
            await self._notify_failures()
        return outcomes

    async def _attempt(self, item_id: str) -> Outcome:
        try:
            item = self.outbox.claim(item_id)
        except UnreadableItem:
            return "failed"
        if item is None:
            return "skipped"
        try:
            await self._send(item)
        except asyncio.CancelledError:
            with contextlib.suppress(sqlite3.Error):  # else close() gives it back
                self.outbox.release(item.id)
            raise
        except PermanentFailure as exc:
            log.warning("outbox item %s refused for good: %s", item.id, exc)
            self._settle(partial(self.outbox.fail, item.id, str(exc) or "permanent failure"))
            return "failed"
        except TemporaryFailure as exc:
            log.info("outbox item %s not delivered yet: %s", item.id, exc)
            self._settle(partial(self.outbox.retry_later, item.id, str(exc) or "temporary"))
            return "retry"
        except Exception as exc:
            log.exception("outbox item %s: unexpected error while sending", item.id)
            error = f"unexpected error: {exc.__class__.__name__}: {exc}"
            self._settle(partial(self.outbox.retry_later, item.id, error))
            return "retry"
        self._settle(partial(self.outbox.delivered, item.id))
        try:
            self._on_delivered(item)
        except Exception:  # counting must not stop the deliveries
            log.exception("outbox item %s: on_delivered callback raised", item.id)
        return "delivered"

    def _settle(self, action: Callable[[], object]) -> None:
        try:
            action()
        except UnknownItem:
            pass  # dismissed meanwhile: nothing left to record
        except Exception:
            log.exception("cannot record an outbox outcome; will retry")
            self._unsettled.append(action)

    def _settle_leftovers(self) -> None:
        leftovers, self._unsettled = self._unsettled, []
        for action in leftovers:
            self._settle(action)

    async def _notify_failures(self) -> None:
        while (item := self.outbox.take_failure_notice()) is not None:
            try:
                await self._on_failed(item)
            except Exception:
                log.exception("outbox item %s: on_failed callback raised", item.id)
