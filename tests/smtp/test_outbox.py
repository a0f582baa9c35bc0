"""Durable outbox: queue states, backoff, sealing at rest, crashes, concurrent workers."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from localproxy.secretbox import SecretBox
from localproxy.smtp.outbox import (
    INTERRUPTED,
    Outbox,
    OutboxError,
    OutboxItem,
    OutboxWorker,
    PermanentFailure,
    TemporaryFailure,
    UnreadableItem,
    backoff_delay,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(reversed(range(32)))
START = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MESSAGE = b"Subject: hi\r\n\r\nTOP-SECRET-BODY-0123456789\r\n"
CREDENTIALS = b"PLAIN user@example.org hunter2-SECRET-PASSWORD"


class FakeClock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox.sqlite"


@pytest.fixture
def outbox(db_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    with Outbox(db_path, SecretBox(KEY), clock) as box:
        yield box


def add(outbox: Outbox, n: int = 0, **kwargs: Any) -> OutboxItem:
    rcpts = [f"rcpt{n}@example.net"]
    return outbox.add("work", "me@example.org", rcpts, MESSAGE + b"%d" % n, CREDENTIALS, **kwargs)


def database_files(db_path: Path) -> list[Path]:
    """The database, its WAL and its shared memory file."""
    return [p for p in db_path.parent.glob(db_path.name + "*") if p.is_file()]


def on_disk(db_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in database_files(db_path))


def raw_db(db_path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(db_path, isolation_level=None, timeout=10))


# --------------------------------------------------------------------------- queue states


def test_add_due_claim_delivered(outbox: Outbox, clock: FakeClock) -> None:
    item = add(outbox)
    assert item.state == "queued" and item.attempts == 0 and item.last_error is None
    assert (item.created, item.next_attempt) == (START, START)
    assert item.recipients == ("rcpt0@example.net",)
    assert (item.message, item.credentials) == (MESSAGE + b"0", CREDENTIALS)
    assert [i.id for i in outbox.due()] == [item.id]

    claimed = outbox.claim(item.id)
    assert claimed is not None and claimed.state == "sending"
    assert claimed.message == item.message
    assert outbox.claim(item.id) is None, "an item is claimed once"
    assert outbox.due() == []
    assert outbox.stats() == (1, 0, START)

    outbox.delivered(item.id)
    assert outbox.summaries() == [] and outbox.get(item.id) is None
    assert outbox.stats() == (0, 0, None)


def test_due_is_oldest_first_and_skips_future_items(outbox: Outbox, clock: FakeClock) -> None:
    first = add(outbox, 1)
    clock.advance(timedelta(seconds=1))
    second = add(outbox, 2)
    third = add(outbox, 3)  # same created time as `second`: insertion order decides
    assert [i.id for i in outbox.due()] == [first.id, second.id, third.id]
    assert [i.id for i in outbox.due(limit=2)] == [first.id, second.id]

    outbox.claim(first.id)
    outbox.retry_later(first.id, "421 try later")
    assert [i.id for i in outbox.due()] == [second.id, third.id]
    assert outbox.queued_ids(due_only=False) == [first.id, second.id, third.id]
    assert outbox.next_due() == START + timedelta(seconds=1)


def test_item_repr_hides_message_and_credentials(outbox: Outbox) -> None:
    text = repr(add(outbox))
    assert "SECRET" not in text and "hunter2" not in text


def test_add_refuses_empty_recipients(outbox: Outbox) -> None:
    with pytest.raises(ValueError):
        outbox.add("work", "me@example.org", [], MESSAGE, CREDENTIALS)


def test_clock_must_be_timezone_aware(db_path: Path) -> None:
    with (
        Outbox(db_path, SecretBox(KEY), lambda: datetime(2025, 1, 1)) as naive,
        pytest.raises(ValueError, match="timezone-aware"),
    ):
        add(naive)


def test_fail_keeps_item_until_dismissed(outbox: Outbox, clock: FakeClock) -> None:
    item = add(outbox)
    outbox.claim(item.id)
    failed = outbox.fail(item.id, "550 5.1.1 no such user")
    assert failed.state == "failed" and failed.attempts == 1
    assert failed.last_error == "550 5.1.1 no such user"
    assert failed.message == item.message, "kept for the user"
    assert outbox.due() == [] and outbox.queued_ids(due_only=False) == []
    assert outbox.stats() == (0, 1, None)
    [summary] = outbox.summaries()
    assert summary.state == "failed" and summary.size == len(item.message)
    assert summary.to_json()["recipients"] == ["rcpt0@example.net"]
    assert "message" not in summary.to_json() and "credentials" not in summary.to_json()

    assert outbox.dismiss(item.id) is True
    assert outbox.dismiss(item.id) is False
    assert outbox.summaries() == []


def test_dismiss_refuses_an_item_being_sent(outbox: Outbox) -> None:
    item = add(outbox)
    outbox.claim(item.id)
    assert outbox.dismiss(item.id) is False
    outbox.release(item.id)
    assert outbox.get(item.id).state == "queued"  # type: ignore[union-attr]
    assert outbox.dismiss(item.id) is True


def test_add_can_record_the_callers_own_failed_attempt(outbox: Outbox) -> None:
    later = add(outbox, 1, error="451 greylisted")
    assert (later.state, later.attempts, later.last_error) == ("queued", 1, "451 greylisted")
    assert later.next_attempt == START + timedelta(minutes=1)
    refused = add(outbox, 2, error="550 rejected", permanent=True)
    assert (refused.state, refused.attempts) == ("failed", 1)
    silent = add(outbox, 3, error="550 rejected", permanent=True, notify=False)
    assert outbox.take_failure_notice().id == refused.id  # type: ignore[union-attr]
    assert outbox.take_failure_notice() is None, f"{silent.id} was not to be notified"


# --------------------------------------------------------------------------- backoff


def test_backoff_schedule(outbox: Outbox, clock: FakeClock) -> None:
    item = add(outbox)
    expected_minutes = [1, 5, 15, 60, 240, 240, 240]
    for attempt, minutes in enumerate(expected_minutes, start=1):
        assert outbox.claim(item.id) is not None
        retried = outbox.retry_later(item.id, f"451 attempt {attempt}")
        assert retried.attempts == attempt and retried.state == "queued"
        assert retried.next_attempt == clock.now + timedelta(minutes=minutes)
        assert outbox.due() == []
        clock.now = retried.next_attempt
        assert [i.id for i in outbox.due()] == [item.id]
    assert backoff_delay(100) == timedelta(hours=4)


def test_gives_up_at_max_age_with_a_last_try_at_the_deadline(
    outbox: Outbox, clock: FakeClock
) -> None:
    item = add(outbox)
    deadline = START + timedelta(days=5)
    current = item
    while current.state == "queued":
        clock.now = current.next_attempt
        assert outbox.claim(item.id) is not None
        current = outbox.retry_later(item.id, "451 mailbox busy")
        assert current.next_attempt <= deadline
    assert clock.now == deadline, "the final try happens when max_age is reached"
    assert current.state == "failed"
    assert current.last_error.startswith("gave up after")  # type: ignore[union-attr]
    assert "5 days" in current.last_error and "451 mailbox busy" in current.last_error  # type: ignore[operator]


# --------------------------------------------------------------------------- at rest


def test_records_are_sealed_and_files_private(outbox: Outbox, db_path: Path) -> None:
    for n in range(3):
        add(outbox, n)
    stored = on_disk(db_path)
    assert b"TOP-SECRET-BODY" not in stored and b"hunter2" not in stored
    assert b"rcpt1@example.net" in stored, "the envelope is metadata for status (authenticated)"
    assert len(database_files(db_path)) == 3
    for path in database_files(db_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    owners = db_path.with_name(db_path.name + ".owners")
    assert stat.S_IMODE(owners.stat().st_mode) == 0o700


def test_delivered_items_are_overwritten_on_disk(db_path: Path, clock: FakeClock) -> None:
    with Outbox(db_path, SecretBox(KEY), clock) as box:
        # Neighbours keep the page in use: SQLite drops a page that empties anyway.
        _before, item, _after = (add(box, n) for n in range(3))
        with raw_db(db_path) as db:
            query = "SELECT message FROM outbox WHERE id = ?"
            (sealed,) = db.execute(query, (item.id,)).fetchone()
        box.delivered(item.id)
    # Last connection closed: the WAL is checkpointed into the main file and removed.
    assert sealed[20:60] not in on_disk(db_path), "secure_delete must overwrite the record"


def test_other_store_key_fails_per_item_not_globally(db_path: Path, clock: FakeClock) -> None:
    with Outbox(db_path, SecretBox(OTHER_KEY), clock) as foreign:
        stranger = add(foreign, 1)
    with Outbox(db_path, SecretBox(KEY), clock) as outbox:
        ours = add(outbox, 2)
        assert [i.id for i in outbox.due()] == [ours.id], "unreadable items are left out"
        with pytest.raises(UnreadableItem) as raised:
            outbox.claim(stranger.id)
        failed = raised.value.item
        assert failed.state == "failed" and not failed.readable and failed.message == b""
        assert "store key" in failed.last_error  # type: ignore[operator]
        assert outbox.claim(ours.id).message == MESSAGE + b"2"  # type: ignore[union-attr]


def test_tampered_moved_or_readdressed_records_do_not_open(outbox: Outbox, db_path: Path) -> None:
    one, two, three, four = (add(outbox, n) for n in range(4))
    with raw_db(db_path) as db:
        blob = db.execute("SELECT message FROM outbox WHERE id = ?", (one.id,)).fetchone()[0]
        db.execute("UPDATE outbox SET message = ? WHERE id = ?", (blob, two.id))  # moved
        db.execute(
            "UPDATE outbox SET recipients = '[\"attacker@evil.example\"]' WHERE id = ?",
            (three.id,),
        )
        flipped = bytearray(blob)
        flipped[-1] ^= 1
        db.execute("UPDATE outbox SET message = ? WHERE id = ?", (bytes(flipped), four.id))
    assert outbox.claim(one.id) is not None
    for broken in (two, three, four):
        with pytest.raises(UnreadableItem):
            outbox.claim(broken.id)
        assert outbox.get(broken.id).state == "failed"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- claims and owners


def test_live_claim_is_not_taken_over_by_another_instance(
    outbox: Outbox, db_path: Path, clock: FakeClock
) -> None:
    item = add(outbox)
    assert outbox.claim(item.id) is not None
    with Outbox(db_path, SecretBox(KEY), clock) as second:  # e.g. a CLI flush
        assert second.recover_stale() == 0
        assert second.claim(item.id) is None
        assert second.queued_ids(due_only=False) == []
        with pytest.raises(OutboxError, match="another process"):
            second.retry_later(item.id, "not mine")
    outbox.close()  # a clean close gives the claim back, untried
    with Outbox(db_path, SecretBox(KEY), clock) as third:
        again = third.get(item.id)
        assert again.state == "queued" and again.attempts == 0  # type: ignore[union-attr]


CHILD_PRELUDE = """
import asyncio, os, sys
from pathlib import Path
from localproxy.secretbox import SecretBox
from localproxy.smtp.outbox import Outbox, OutboxWorker
PATH, KEY = Path(sys.argv[1]), SecretBox(bytes.fromhex(sys.argv[2]))
"""


def run_child(body: str, db_path: Path, *args: str) -> subprocess.Popen[str]:
    code = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db_path), KEY.hex(), *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def read_until(child: subprocess.Popen[str], done: Callable[[str], bool]) -> list[str]:
    lines = []
    assert child.stdout is not None
    while line := child.stdout.readline():
        lines.append(line.strip())
        if done(line.strip()):
            return lines
    raise AssertionError(f"child ended early (exit {child.wait()}): {lines[-5:]}")


def kill(child: subprocess.Popen[str]) -> list[str]:
    """SIGKILL, reap, and return what the child printed that we had not read yet."""
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    return rest.split()


def test_stale_claim_of_an_exited_process_is_queued_again(db_path: Path) -> None:
    with Outbox(db_path, SecretBox(KEY)) as outbox:
        item = add(outbox)
    child = run_child(
        """
        outbox = Outbox(PATH, KEY)
        outbox.claim(sys.argv[3])
        os._exit(0)  # no close(): the claim is left behind, as after a crash
        """,
        db_path,
        item.id,
    )
    assert child.wait(timeout=20) == 0
    with raw_db(db_path) as db:
        assert db.execute("SELECT state FROM outbox").fetchone() == ("sending",)
    with Outbox(db_path, SecretBox(KEY)) as reopened:
        again = reopened.get(item.id)
        assert again.state == "queued" and again.attempts == 1  # type: ignore[union-attr]
        assert again.last_error == INTERRUPTED  # type: ignore[union-attr]
        assert reopened.queued_ids(due_only=False) == [item.id], "due after the backoff"
    owners = db_path.with_name(db_path.name + ".owners")
    assert list(owners.iterdir()) == [], "the dead owner's lock file is swept"


# --------------------------------------------------------------------------- crashes


def test_sigkill_while_adding_loses_no_acknowledged_item(db_path: Path) -> None:
    child = run_child(
        """
        outbox = Outbox(PATH, KEY)
        n = 0
        while True:
            body = b"MESSAGE %d " % n * 500  # ~6 KiB: several pages per record
            item = outbox.add("work", "me@example.org", ["r%d@example.net" % n], body, b"c")
            print(item.id, n, flush=True)
            n += 1
        """,
        db_path,
    )
    lines = []
    read_until(child, lambda line: lines.append(line) or len(lines) >= 150)
    tokens = " ".join(lines).split() + kill(child)
    acknowledged = dict(zip(tokens[::2], map(int, tokens[1::2]), strict=False))
    assert len(acknowledged) >= 150

    with Outbox(db_path, SecretBox(KEY)) as reopened:
        with raw_db(db_path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        items = reopened.due(limit=100_000)
        assert len(items) == len(reopened.summaries()), "every stored record opens"
        by_id = {item.id: item for item in items}
        for item_id, n in acknowledged.items():
            assert by_id[item_id].message == b"MESSAGE %d " % n * 500
            assert by_id[item_id].recipients == (f"r{n}@example.net",)


def test_sigkill_during_send_requeues_the_copy_and_keeps_the_rest(db_path: Path) -> None:
    with Outbox(db_path, SecretBox(KEY)) as outbox:
        before = [add(outbox, n) for n in range(3)]
        # The provider will have accepted this one when the process dies, before
        # delivered() is recorded: the one case where a copy is sent twice.
        accepted_then_crash = outbox.add("work", "me@example.org", ["x@example.net"], b"HANG", b"c")
        after = [add(outbox, n) for n in range(3, 6)]
    child = run_child(
        """
        async def send(item):
            print("SENDING", item.id, flush=True)
            if item.message == b"HANG":
                await asyncio.sleep(3600)

        async def on_failed(item):
            print("FAILED", item.id, flush=True)

        asyncio.run(OutboxWorker(Outbox(PATH, KEY), send, on_failed, poll_interval=0.05).run())
        """,
        db_path,
    )
    read_until(child, lambda line: line == f"SENDING {accepted_then_crash.id}")
    kill(child)

    with Outbox(db_path, SecretBox(KEY)) as reopened:
        remaining = {s.id: s for s in reopened.summaries()}
        assert not any(item.id in remaining for item in before), "delivered before the crash"
        interrupted = remaining[accepted_then_crash.id]
        assert (interrupted.state, interrupted.attempts) == ("queued", 1)
        assert interrupted.last_error == INTERRUPTED
        for item in after:
            assert remaining[item.id].state == "queued" and remaining[item.id].attempts == 0
        assert len(reopened.due(limit=100)) == len(after), "all readable; the retry waits 1 min"


def test_two_processes_flushing_one_outbox_send_each_item_once(
    db_path: Path, tmp_path: Path
) -> None:
    with Outbox(db_path, SecretBox(KEY)) as outbox:
        ids = {add(outbox, n).id for n in range(120)}
    sent_log, go = tmp_path / "sent.log", tmp_path / "go"
    body = """
        import time
        log_fd = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

        async def send(item):
            os.write(log_fd, f"{os.getpid()} {item.id}\\n".encode())
            await asyncio.sleep(0.002)

        async def on_failed(item):
            raise AssertionError(item)

        worker = OutboxWorker(Outbox(PATH, KEY), send, on_failed)
        print("READY", flush=True)
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.005)
        print("DELIVERED", asyncio.run(worker.flush()), flush=True)
        """
    children = [run_child(body, db_path, str(sent_log), str(go)) for _ in range(2)]
    for child in children:
        read_until(child, lambda line: line == "READY")
    go.touch()
    delivered = 0
    for child in children:
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0
        delivered += int(out.split()[-1])

    sends = [line.split() for line in sent_log.read_text().splitlines()]
    sent_ids = [item_id for _pid, item_id in sends]
    assert sorted(sent_ids) == sorted(ids), "every item sent, none twice"
    assert delivered == len(ids)
    assert len({pid for pid, _ in sends}) == 2, "both processes took part"
    with Outbox(db_path, SecretBox(KEY)) as reopened:
        assert reopened.summaries() == []


# --------------------------------------------------------------------------- the worker


@dataclass
class FakeProvider:
    """send() and on_failed() for a worker; `script` decides each send's fate by item."""

    script: Callable[[OutboxItem], object] = lambda item: None
    sent: list[str] = field(default_factory=list)
    failed: list[OutboxItem] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)

    async def send(self, item: OutboxItem) -> None:
        if item.id in self.in_flight:
            self.overlaps.append(item.id)
        self.in_flight.add(item.id)
        try:
            await asyncio.sleep(0.001)
            outcome = self.script(item)
            if isinstance(outcome, BaseException):
                raise outcome
            if asyncio.iscoroutine(outcome):
                await outcome
            self.sent.append(item.id)
        finally:
            self.in_flight.discard(item.id)

    async def on_failed(self, item: OutboxItem) -> None:
        self.failed.append(item)


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_worker_delivers_when_woken(outbox: Outbox) -> None:
    provider = FakeProvider()
    worker = OutboxWorker(outbox, provider.send, provider.on_failed, poll_interval=60)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.05)
    item = add(outbox)
    worker.wake()
    await wait_until(lambda: provider.sent == [item.id])
    assert outbox.summaries() == []
    await worker.stop()
    assert task.done() and task.exception() is None


async def test_only_delivered_items_reach_on_delivered(outbox: Outbox) -> None:
    items = [add(outbox, n) for n in range(3)]
    refused = {items[1].id: PermanentFailure("550 no"), items[2].id: TemporaryFailure("451")}
    provider = FakeProvider(lambda item: refused.get(item.id))
    delivered: list[str] = []

    def on_delivered(item: OutboxItem) -> None:
        delivered.append(item.id)
        raise RuntimeError("a broken counter must not stop the worker")

    worker = OutboxWorker(outbox, provider.send, provider.on_failed, on_delivered=on_delivered)
    assert await worker.flush() == 1
    assert delivered == [items[0].id]
    assert [summary.id for summary in outbox.summaries()] == [items[1].id, items[2].id]


async def test_worker_survives_send_and_callback_exceptions(outbox: Outbox) -> None:
    def script(item: OutboxItem) -> object:
        if item.message.endswith(b"0"):
            return ValueError("bug in the relay")
        if item.message.endswith(b"1"):
            return PermanentFailure("550 5.7.1 relaying denied")
        if item.message.endswith(b"2"):
            return TemporaryFailure("421 4.3.0 try again")
        return None

    async def broken_on_failed(item: OutboxItem) -> None:
        provider.failed.append(item)
        raise RuntimeError("notice could not be written")

    provider = FakeProvider(script)
    items = [add(outbox, n) for n in range(4)]
    worker = OutboxWorker(outbox, provider.send, broken_on_failed, poll_interval=0.02)
    task = asyncio.create_task(worker.run())
    await wait_until(lambda: provider.sent == [items[3].id] and provider.failed)
    await asyncio.sleep(0.1)  # more passes: nothing changes, nothing dies
    await worker.stop()
    assert task.exception() is None

    unexpected, refused, later = (outbox.get(i.id) for i in items[:3])
    assert unexpected.state == "queued" and unexpected.attempts == 1  # type: ignore[union-attr]
    assert "ValueError: bug in the relay" in unexpected.last_error  # type: ignore[union-attr,operator]
    assert refused.state == "failed" and refused.last_error == "550 5.7.1 relaying denied"  # type: ignore[union-attr]
    assert later.state == "queued" and later.last_error == "421 4.3.0 try again"  # type: ignore[union-attr]
    assert [f.id for f in provider.failed] == [items[1].id], "notified once"
    assert provider.failed[0].message == items[1].message


async def test_worker_gives_up_at_max_age_and_reports(outbox: Outbox, clock: FakeClock) -> None:
    provider = FakeProvider(lambda item: TemporaryFailure("451 4.4.1 no answer"))
    worker = OutboxWorker(outbox, provider.send, provider.on_failed)
    item = add(outbox)
    while not provider.failed:
        await worker.flush()
        clock.now = max(clock.now, outbox.get(item.id).next_attempt)  # type: ignore[union-attr]
    [failed] = provider.failed
    assert failed.id == item.id and failed.state == "failed"
    assert failed.last_error.startswith("gave up after")  # type: ignore[union-attr]
    assert clock.now == START + timedelta(days=5)


async def test_worker_reports_unreadable_records(db_path: Path, clock: FakeClock) -> None:
    with Outbox(db_path, SecretBox(OTHER_KEY), clock) as foreign:
        stranger = add(foreign, 1)
    with Outbox(db_path, SecretBox(KEY), clock) as outbox:
        ours = add(outbox, 2)
        provider = FakeProvider()
        worker = OutboxWorker(outbox, provider.send, provider.on_failed)
        assert await worker.flush() == 1
        assert provider.sent == [ours.id]
        [failed] = provider.failed
        assert failed.id == stranger.id and not failed.readable


async def test_flush_sends_items_that_are_not_due_yet(outbox: Outbox, clock: FakeClock) -> None:
    waiting = add(outbox, 1, error="451 later")  # next attempt in a minute
    fresh = add(outbox, 2)
    provider = FakeProvider(lambda item: TemporaryFailure("4xx") if item.id == fresh.id else None)
    worker = OutboxWorker(outbox, provider.send, provider.on_failed)
    assert await worker.flush() == 1
    assert provider.sent == [waiting.id]
    assert outbox.get(fresh.id).attempts == 1  # type: ignore[union-attr]


async def test_stop_during_send_gives_the_item_back_untried(outbox: Outbox) -> None:
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    provider = FakeProvider(lambda item: hang())
    item = add(outbox)
    worker = OutboxWorker(outbox, provider.send, provider.on_failed)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    await worker.stop(grace=0.05)
    assert task.cancelled()
    back = outbox.get(item.id)
    assert back.state == "queued" and back.attempts == 0  # type: ignore[union-attr]


async def test_outcome_not_recorded_is_retried_without_sending_again(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_delivered = outbox.delivered
    calls: list[str] = []

    def flaky_delivered(item_id: str) -> None:
        calls.append(item_id)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real_delivered(item_id)

    monkeypatch.setattr(outbox, "delivered", flaky_delivered)
    provider = FakeProvider()
    worker = OutboxWorker(outbox, provider.send, provider.on_failed)
    item = add(outbox)
    assert await worker.flush() == 1
    assert outbox.get(item.id).state == "sending"  # type: ignore[union-attr]
    await worker.flush()
    assert outbox.get(item.id) is None and provider.sent == [item.id]


async def test_two_workers_on_one_file_never_send_an_item_twice(
    db_path: Path, clock: FakeClock
) -> None:
    provider = FakeProvider()
    with (
        Outbox(db_path, SecretBox(KEY), clock) as first,
        Outbox(db_path, SecretBox(KEY), clock) as second,
    ):
        ids = {add(first, n).id for n in range(60)}
        workers = [OutboxWorker(box, provider.send, provider.on_failed) for box in (first, second)]
        delivered = await asyncio.gather(*(worker.flush() for worker in workers))
    assert sum(delivered) == 60 and all(delivered), "both took part"
    assert sorted(provider.sent) == sorted(ids) and provider.overlaps == []
