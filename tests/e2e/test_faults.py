"""Faults around `localproxy run` (issue 8): crashes, a changed certificate, a provider
that dies mid-command or is not there at all. The daemon runs as a real subprocess;
outcomes are read from Dovecot directly."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localproxy.crypto.openpgp import default_engine
from localproxy.sandbox.ca import make_test_ca
from localproxy.sandbox.provider import Provider
from tests.e2e.test_daemon import Running, free_port, launch, status_json, write_config
from tests.harness.smtp_faults import SmtpFaultRelay
from tests.harness.tcp_faults import BackgroundLoop, ImapFaultRelay

pytestmark = pytest.mark.e2e
ENGINE = default_engine()
CLI = (sys.executable, "-m", "localproxy", "--config")
CAROL_KEY = ENGINE.generate_key(["Carol <carol@example.org>"])


def start_daemon(
    provider: Provider, tmp_path: Path, *, certs: tuple[Path, ...] = (), **upstream: object
) -> Running:
    config = tmp_path / "config.toml"
    ports = (free_port(), free_port())
    write_config(config, provider, *ports, **upstream)  # type: ignore[arg-type]
    env = {**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "run")}
    base = [sys.executable, "-m", "localproxy", "--config", str(config), "keys"]
    for args in (["generate", "alice"], ["import", *map(str, certs)] if certs else None):
        if args:
            subprocess.run([*base, *args], env=env, check=True, capture_output=True, timeout=60)
    return launch(config, env, ports)


@pytest.fixture
def background() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------ raw IMAP client


class RawImap:
    """A line-level IMAP client that shows exactly what the proxy answered."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.greeting = self.read_until(lambda b: b"\r\n" in b)

    def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        while not done(self.buf):
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, tag: str, text: str, literal: bytes | None = None) -> bytes:
        tagged = re.compile(rb"(?:^|\r\n)" + tag.encode() + rb" (?:OK|NO|BAD)[^\r\n]*\r\n")
        if literal is None:
            self.send(f"{tag} {text}\r\n".encode())
            return self.read_until(lambda b: bool(tagged.search(b)))
        self.send(f"{tag} {text} {{{len(literal)}}}\r\n".encode())
        first = self.read_until(lambda b: b.startswith(b"+") or bool(tagged.search(b)))
        if not first.startswith(b"+"):
            return first
        self.send(literal + b"\r\n")
        return first + self.read_until(lambda b: bool(tagged.search(b)))

    def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        return self.read_until(lambda _b: False)

    def close(self) -> None:
        self.sock.close()


def login(provider: Provider) -> str:
    alice = provider.users["alice"]
    return f'LOGIN "{alice.login}" "{alice.password}"'


# ---------------------------------------------------------- 1. SIGKILL during a retry


def send_two(provider: Provider, port: int) -> dict:
    alice = provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.login(alice.login, alice.password)
        return smtp.sendmail(
            alice.address,
            ["bob@example.org", "carol@example.org"],
            b"From: alice@example.org\r\nTo: bob@example.org\r\n"  # carol: Bcc, a copy of her own
            b"Subject: survives a crash\r\n\r\nkill -9 proof\r\n",
        )


def outbox_rows(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state, attempts FROM outbox").fetchall()


@pytest.mark.parametrize(
    ("fault", "copies"),
    [
        ("stall", 1),  # killed before the final ".": Postfix drops the partial copy
        # Killed after Postfix stored it, before its 250 came back and was committed:
        # sent again after the restart. SMTP's duplicate window (RFC 1047), never a loss.
        ("stall-after-data", 2),
    ],
)
def test_sigkill_while_the_outbox_is_sending_loses_nothing(
    clean_provider, tmp_path, background, fault, copies
):
    relay = SmtpFaultRelay(clean_provider)
    background.run(relay.start())
    relay.fail_after, relay.mode = 1, "drop"  # bob's copy goes through, carol's is queued
    carol_cert = tmp_path / "carol.asc"  # a Bcc recipient with a key gets a copy of her own
    carol_cert.write_bytes(ENGINE.public_only(CAROL_KEY.data))
    running = start_daemon(
        clean_provider, tmp_path, certs=(carol_cert,), up_smtp=relay.port, smtp_security="tls"
    )
    db = tmp_path / "data" / "outbox.sqlite"
    flush: subprocess.Popen[str] | None = None
    try:
        assert send_two(clean_provider, running.smtp_port) == {}
        assert len(clean_provider.wait_for_messages("bob", 1)) == 1
        assert status_json(running)["accounts"][0]["outbox"]["queued"] == 1
        # The retry: the provider never answers (the final "." held back, or its 250)
        relay.mode = fault
        faults = relay.faults
        flush = subprocess.Popen(
            [*CLI, str(running.config), "outbox", "flush"],
            env=running.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: relay.faults > faults, "the retry to reach DATA")
        wait_for(lambda: len(relay.data_seen) == 2, "carol's copy to reach the provider")
        assert [state for state, _ in outbox_rows(db)] == ["sending"]
        running.process.kill()  # SIGKILL while the copy is in flight
        running.process.wait(10)
    finally:
        if flush is not None:
            flush.wait(30)
        if running.process.poll() is None:
            running.stop()
    # Restart with the provider healthy again.
    relay.fail_after = None
    restarted = launch(running.config, running.env, (running.imap_port, running.smtp_port))
    try:
        done = restarted.cli("outbox", "flush")
        assert done.returncode == 0, done.stderr
        assert len(clean_provider.wait_for_messages("carol", copies)) == copies
        wait_for(
            lambda: status_json(restarted)["accounts"][0]["outbox"]["queued"] == 0,
            "an empty outbox",
        )
        time.sleep(0.5)  # a duplicate would arrive about now
        carol = clean_provider.stored_messages("carol")
        assert len(carol) == copies
        assert all(b"-----BEGIN PGP MESSAGE-----" in copy for copy in carol)
        assert not any(b"kill -9 proof" in copy or b"survives a crash" in copy for copy in carol)
        assert all(b"kill -9 proof" not in seen for seen in relay.data_seen[1:])
        assert len(clean_provider.stored_messages("bob")) == 1
        assert outbox_rows(db) == []
        # Counted once each: bob's copy at once (before the kill: kept in today's
        # counters), carol's from the outbox (since this start, and today).
        account = status_json(restarted)["accounts"][0]
        since_start, today = account["counters_total"], account["counters_today"]
        assert (since_start["sent_plain"], since_start["sent_encrypted"]) == (0, 1)
        assert (today["sent_plain"], today["sent_encrypted"]) == (1, 1)
    finally:
        restarted.stop()
        background.run(relay.close())
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ------------------------------------------------- 2. certificate swapped mid-run


@pytest.fixture
def imap_relay(clean_provider, background) -> Iterator[ImapFaultRelay]:
    relay = ImapFaultRelay(clean_provider)
    background.run(relay.start())
    yield relay
    background.run(relay.close())


@pytest.fixture
def behind_relay(clean_provider, tmp_path, imap_relay) -> Iterator[Running]:
    running = start_daemon(clean_provider, tmp_path, up_imap=imap_relay.port)
    yield running
    running.stop()


def test_an_untrusted_certificate_mid_run_fails_closed(
    clean_provider, tmp_path, imap_relay, behind_relay
):
    first = RawImap(behind_relay.imap_port)
    assert first.greeting.startswith(b"* OK")
    assert b"a1 OK" in first.command("a1", login(clean_provider))
    first.command("a2", "LOGOUT")
    first.close()
    assert imap_relay.handshake_failures == 0
    other = make_test_ca(tmp_path / "other-ca")  # same names, another CA
    imap_relay.use_certificate(other.cert_file, other.key_file)
    seen = len(imap_relay.received)
    client = socket.create_connection(("127.0.0.1", behind_relay.imap_port), timeout=20)
    client.sendall(f"b1 {login(clean_provider)}\r\n".encode())  # eager: before the greeting
    answer = b""
    while chunk := client.recv(65536):
        answer += chunk
    client.close()
    assert answer.startswith(b"* BYE [UNAVAILABLE]"), answer
    assert b"not trusted" in answer and b"b1 OK" not in answer
    # The relay notices its side of the failed handshake a moment after the proxy's BYE.
    deadline = time.monotonic() + 10
    while imap_relay.handshake_failures < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert imap_relay.handshake_failures >= 1
    assert imap_relay.received[seen:] == b"", "nothing may cross an untrusted connection"
    assert clean_provider.users["alice"].password.encode() not in imap_relay.received[seen:]


# ------------------------------------------ 3. the provider dies in the middle of it

MESSAGE = (
    b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: half\r\n\r\n"
    + b"first half\r\n" * 200
    + b"CUT-HERE\r\n"
    + b"second half\r\n" * 200
)


def _dies_during_login(client: RawImap, provider: Provider) -> bytes:
    return client.command("c1", login(provider)) + client.rest()


def _dies_during_append(client: RawImap, provider: Provider) -> bytes:
    assert b"c1 OK" in client.command("c1", login(provider))
    return client.command("c2", "APPEND INBOX", MESSAGE) + client.rest()


def _dies_during_idle(client: RawImap, provider: Provider) -> bytes:
    assert b"c1 OK" in client.command("c1", login(provider))
    assert b"c2 OK" in client.command("c2", "SELECT INBOX")
    client.send(b"c3 IDLE\r\n")
    return client.rest()


@pytest.mark.parametrize(
    ("marker", "dialogue"),
    [
        (b"LOGIN", _dies_during_login),
        (b"CUT-HERE", _dies_during_append),
        (b"IDLE\r\n", _dies_during_idle),
    ],
    ids=["auth", "append", "idle"],
)
def test_provider_dies_mid_command(clean_provider, imap_relay, behind_relay, marker, dialogue):
    imap_relay.cut_on = marker
    client = RawImap(behind_relay.imap_port)
    try:
        answer = dialogue(client, clean_provider)
    finally:
        client.close()
    assert imap_relay.cuts == 1
    assert b"* BYE [UNAVAILABLE] localproxy: the provider closed the connection" in answer, answer
    assert b"Traceback" not in answer
    assert clean_provider.stored_messages("alice") == [], "nothing half-stored"
    # The proxy goes on serving: a new session stores the message exactly once.
    imap_relay.cut_on = None
    again = RawImap(behind_relay.imap_port)
    try:
        assert b"d1 OK" in again.command("d1", login(clean_provider))
        assert b"d2 OK" in again.command("d2", "APPEND INBOX", MESSAGE)
        again.command("d3", "LOGOUT")
    finally:
        again.close()
    assert clean_provider.stored_messages("alice") == [MESSAGE]


# --------------------------------------------- 4. the provider is not there at all


def assert_auth_gets_454(provider: Provider, port: int, reason: bytes) -> None:
    """AUTH through the proxy is answered 454 (temporary), naming the reason."""
    alice = provider.users["alice"]
    with (
        pytest.raises(smtplib.SMTPException) as refused,
        smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp,
    ):
        smtp.login(alice.login, alice.password)
    assert getattr(refused.value, "smtp_code", None) == 454, refused.value
    assert reason in refused.value.smtp_error  # type: ignore[attr-defined]


def test_refused_at_start_the_daemon_runs_and_says_why(clean_provider, tmp_path):
    closed = free_port()  # nothing listens here
    running = start_daemon(clean_provider, tmp_path, up_imap=closed, up_smtp=closed)
    try:
        imap: dict = {}

        def checked() -> bool:
            imap.update(status_json(running)["accounts"][0]["upstream"]["imap"])
            return imap["reachable"] is not None

        wait_for(checked, "the first upstream check")
        assert imap["reachable"] is False
        assert "refused" in (imap["error"] or "").lower(), imap
        client = RawImap(running.imap_port)
        answer = client.greeting + client.rest()
        client.close()
        assert answer.startswith(b"* BYE [UNAVAILABLE]"), answer
        assert b"connection refused" in answer
        assert_auth_gets_454(clean_provider, running.smtp_port, b"connection refused")
    finally:
        log = running.stop()
    assert running.process.returncode == 0, log[-2000:]


# ---------------------------------- 5. how it dies, mid-literal, and a slow network

BIG = (
    b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: big\r\n\r\n"
    + b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwx\r\n" * 3000
)


def literals_are_whole(answer: bytes) -> bool:
    """Every literal the client was promised ({N}) came with its N bytes."""
    for match in re.finditer(rb"\{(\d+)\}\r\n", answer):
        if len(answer) - match.end() < int(match.group(1)):
            return False
    return True


@pytest.mark.parametrize("style", ["close_notify", "no_close_notify", "rst"])
def test_however_the_provider_dies_the_client_is_told(
    clean_provider, imap_relay, behind_relay, style
):
    """An orderly TLS shutdown, a TCP close without close_notify (a truncation attack
    looks the same) and a reset all end in BYE, with nothing half-stored."""
    imap_relay.cut_on, imap_relay.close_style = b"CUT-HERE", style
    client = RawImap(behind_relay.imap_port)
    try:
        answer = _dies_during_append(client, clean_provider)
    finally:
        client.close()
    assert imap_relay.cuts == 1
    assert re.search(rb"\* BYE \[UNAVAILABLE\] localproxy: [^\r\n]+\r\n", answer), answer
    assert b"c2 OK" not in answer and b"Traceback" not in answer
    assert clean_provider.stored_messages("alice") == [], "nothing half-stored"


@pytest.mark.parametrize("style", ["close_notify", "no_close_notify", "rst"])
def test_provider_dies_during_a_fetch_of_a_large_literal(
    clean_provider, imap_relay, behind_relay, style
):
    """The client must never take a truncated message for the whole one: it gets the
    message whole or a failure, and a new session gets it whole."""
    clean_provider.append("alice", BIG)
    imap_relay.cut_on, imap_relay.cut_reply, imap_relay.cut_extra = b"BODY[]", True, 40_000
    imap_relay.close_style = style
    client = RawImap(behind_relay.imap_port)
    try:
        assert b"c1 OK" in client.command("c1", login(clean_provider))
        assert b"c2 OK" in client.command("c2", "SELECT INBOX")
        client.send(b"c3 UID FETCH 1:* (BODY[])\r\n")
        answer = client.rest()
    finally:
        client.close()
    assert imap_relay.cuts >= 1
    assert literals_are_whole(answer), answer[-300:]
    assert re.fullmatch(rb"\* BYE \[UNAVAILABLE\] localproxy: [^\r\n]+\r\n", answer), answer
    imap_relay.cut_on = None
    again = RawImap(behind_relay.imap_port)
    try:
        assert b"d1 OK" in again.command("d1", login(clean_provider))
        assert b"d2 OK" in again.command("d2", "SELECT INBOX")
        whole = again.command("d3", "UID FETCH 1:* (BODY[])")
    finally:
        again.close()
    assert BIG in whole and b"d3 OK" in whole


def test_a_trickling_provider_gives_the_same_bytes(clean_provider, imap_relay, behind_relay):
    """The provider's answers arrive 7 bytes at a time: every literal and status line
    must come out the same as over a fast link."""
    clean_provider.append("alice", BIG[:5000])

    def session() -> list[bytes]:
        client = RawImap(behind_relay.imap_port)
        try:
            answers = [client.command("e1", login(clean_provider))]
            answers.append(client.command("e2", "SELECT INBOX"))
            answers.append(client.command("e3", "UID FETCH 1:* (RFC822.SIZE BODY.PEEK[])"))
            client.command("e4", "LOGOUT")
        finally:
            client.close()
        return answers

    fast = session()
    imap_relay.trickle = 7
    slow = session()
    assert [comparable(a) for a in slow] == [comparable(a) for a in fast]
    assert BIG[:5000] in slow[2]


def comparable(answer: bytes) -> bytes:
    """Without what differs between two sessions anyway: Dovecot's timings, RECENT
    (the FETCH leaves FLAGS out for the same reason)."""
    answer = re.sub(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)", b"", answer)
    return re.sub(rb"\* \d+ RECENT\r\n", b"", answer)
