"""IMAP faults the first campaign (test_faults.py) left open: an APPEND whose answer is
lost, a Drafts copy under a fault, a provider dying under IDLE, a provider that stalls,
and a host name that does not resolve. The daemon runs as a real subprocess behind
ImapFaultRelay; outcomes are read from Dovecot directly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localproxy.sandbox.provider import Provider
from tests.e2e import test_faults
from tests.e2e.test_daemon import Running, free_port, launch, status_json, write_config
from tests.e2e.test_faults import RawImap, assert_auth_gets_454, login, wait_for

pytestmark = pytest.mark.e2e
# test_faults' fixtures: the relay loop, ImapFaultRelay, and the daemon behind it
background = test_faults.background
imap_relay = test_faults.imap_relay
behind_relay = test_faults.behind_relay
STYLES = ["close_notify", "no_close_notify", "rst"]
BYE = re.compile(rb"\* BYE \[UNAVAILABLE\] localproxy: [^\r\n]+\r\n")
PROMPT = 10.0  # seconds within which a client must learn that the provider is gone


def start_daemon_with(
    provider: Provider,
    tmp_path: Path,
    *,
    up_imap: int | None = None,
    host: str | None = None,
    timeout: float | None = None,
) -> Running:
    """Like test_faults.start_daemon, with the upstream host name (both services) or the
    IMAP upstream `timeout` changed in the config."""
    config = tmp_path / "config.toml"
    ports = (free_port(), free_port())
    write_config(config, provider, *ports, up_imap=up_imap)
    text = config.read_text()
    if host is not None:
        text = text.replace(f'host = "{provider.hostname}"', f'host = "{host}"')
        assert text.count(f'host = "{host}"') == 2
    if timeout is not None:
        section = "[account.upstream.imap]\n"
        text = text.replace(section, f"{section}timeout = {timeout}\n")
    config.write_text(text)
    env = {**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "run")}
    subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "keys", "generate", "alice"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return launch(config, env, ports)


def session_works(provider: Provider, port: int, mailbox: str = "INBOX") -> bytes:
    """A fresh session logs in and selects `mailbox`; returns the SELECT answer."""
    client = RawImap(port)
    try:
        assert client.greeting.startswith(b"* OK"), client.greeting
        assert b"n1 OK" in client.command("n1", login(provider))
        selected = client.command("n2", f"SELECT {mailbox}")
        assert b"n2 OK" in selected, selected
        client.command("n3", "LOGOUT")
    finally:
        client.close()
    return selected


# ------------------------------------------------ 1. APPEND: stored, but the OK is lost

AMBIGUOUS = (
    b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: ambiguous\r\n"
    b"Message-ID: <ambiguous@example.org>\r\n\r\n" + b"a line of text\r\n" * 100 + b"LAST-LINE\r\n"
)


@pytest.mark.parametrize("style", STYLES)
def test_append_stored_but_the_ok_is_lost(clean_provider, imap_relay, behind_relay, style):
    """The whole literal reaches Dovecot, which stores the message and answers OK; the
    connection dies before that OK reaches the client. The client gets a BYE, never an
    OK, and the message is stored exactly once: the proxy never retries on its own.

    The duplicate-on-retry window (the IMAP analogue of RFC 1047's for SMTP): from the
    moment the provider has committed the message until its tagged OK reaches the
    client, a failure leaves the client unable to tell "stored" from "not stored". A
    client that simply APPENDs again stores a second copy; one that wants to avoid it
    searches for the Message-ID (or checks APPENDUID / UIDNEXT) in the next session
    first. The proxy cannot close that window: it learns of the commit no sooner than
    the client would."""
    imap_relay.cut_on, imap_relay.cut_reply, imap_relay.cut_extra = b"LAST-LINE\r\n", True, 0
    imap_relay.close_style = style
    answer, elapsed = append_until_closed(clean_provider, behind_relay.imap_port, AMBIGUOUS)
    assert imap_relay.cuts == 1
    assert AMBIGUOUS in imap_relay.received, "the whole literal went upstream"
    assert BYE.search(answer), answer
    assert b"a2 OK" not in answer and b"Traceback" not in answer
    assert elapsed < PROMPT
    assert clean_provider.stored_messages("alice") == [AMBIGUOUS], "stored exactly once"
    # The proxy goes on serving, and the next session sees the one copy.
    imap_relay.cut_on = None
    assert b"* 1 EXISTS" in session_works(clean_provider, behind_relay.imap_port)
    assert clean_provider.stored_messages("alice") == [AMBIGUOUS]


# ------------------------------------------- 2. a Drafts copy never crosses in clear

SECRET = b"TOP-SECRET-DRAFT-TEXT"
DRAFT = (
    b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: a draft\r\n\r\n"
    + b"draft line\r\n" * 50
    + SECRET
    + b"\r\n"
    + b"more of the draft\r\n" * 50
)
ARMOR_BEGIN, ARMOR_END = b"-----BEGIN PGP MESSAGE-----", b"-----END PGP MESSAGE-----"


def append_until_closed(provider: Provider, port: int, message: bytes) -> tuple[bytes, float]:
    """Log in, APPEND to INBOX, read until the proxy hangs up: (everything it said after
    the login, seconds the APPEND took)."""
    client = RawImap(port)
    try:
        assert b"a1 OK" in client.command("a1", login(provider))
        started = time.monotonic()
        answer = client.command("a2", "APPEND INBOX", message) + client.rest()
        return answer, time.monotonic() - started
    finally:
        client.close()


def append_draft(provider: Provider, port: int, tag: str) -> bytes:
    client = RawImap(port)
    try:
        assert b"d1 OK" in client.command("d1", login(provider))
        listed = client.command("d2", 'LIST "" "*"')  # the proxy learns \Drafts here
        assert re.search(rb"\\Drafts[^\r\n]*Drafts", listed), listed
        answer = client.command(tag, "APPEND Drafts", DRAFT)
        if f"{tag} OK".encode() in answer:
            client.command("d4", "LOGOUT")
            return answer
        return answer + client.rest()
    finally:
        client.close()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("where", ["mid-literal", "after-literal"])
def test_a_draft_under_a_fault_is_only_ever_ciphertext(
    clean_provider, imap_relay, behind_relay, where, style
):
    """The proxy encrypts a Drafts copy before any of it goes upstream: whether the
    provider dies inside the literal or after it (stored, the OK lost), nothing of the
    plaintext ever reached the provider's side, and what Dovecot stored is ciphertext."""
    if where == "mid-literal":
        imap_relay.cut_on, imap_relay.cut_extra = ARMOR_BEGIN, 300
    else:
        imap_relay.cut_on, imap_relay.cut_reply, imap_relay.cut_extra = ARMOR_END, True, 0
    imap_relay.close_style = style
    answer = append_draft(clean_provider, behind_relay.imap_port, "d3")
    assert imap_relay.cuts == 1
    assert BYE.search(answer), answer
    assert b"d3 OK" not in answer and b"Traceback" not in answer
    assert ARMOR_BEGIN in imap_relay.received, "the copy went upstream encrypted"
    assert SECRET not in imap_relay.received and b"draft line" not in imap_relay.received
    stored = clean_provider.stored_messages("alice", "Drafts")
    assert len(stored) == (0 if where == "mid-literal" else 1), stored
    assert all(ARMOR_BEGIN in m and SECRET not in m for m in stored)
    # The next session stores the draft, encrypted too.
    imap_relay.cut_on = None
    assert b"d3 OK" in append_draft(clean_provider, behind_relay.imap_port, "d3")
    stored = clean_provider.stored_messages("alice", "Drafts")
    assert len(stored) == (1 if where == "mid-literal" else 2)
    assert all(ARMOR_BEGIN in m and SECRET not in m for m in stored)
    assert SECRET not in imap_relay.received


# ------------------------------------------------ 3. the provider dies under IDLE


def start_idle(provider: Provider, port: int) -> RawImap:
    client = RawImap(port)
    assert b"i1 OK" in client.command("i1", login(provider))
    assert b"i2 OK" in client.command("i2", "SELECT INBOX")
    client.send(b"i3 IDLE\r\n")
    idling = client.read_until(lambda b: b"\r\n" in b)
    assert idling.startswith(b"+ "), idling
    return client


@pytest.mark.parametrize("style", STYLES)
def test_provider_dies_while_the_client_idles(
    clean_provider, imap_relay, behind_relay, background, style
):
    """The client idles (it has the provider's "+" through the proxy) when the
    provider's connection ends: it is told at once with a BYE and the connection
    closes; the proxy goes on, and a new session can IDLE again."""
    imap_relay.close_style = style
    client = start_idle(clean_provider, behind_relay.imap_port)
    try:
        started = time.monotonic()
        assert background.run(imap_relay.drop_connections()) >= 1
        answer = client.rest()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert elapsed < PROMPT, f"the client learnt it after {elapsed:.1f} s"
    assert re.fullmatch(BYE, answer), answer
    again = start_idle(clean_provider, behind_relay.imap_port)
    try:
        again.send(b"DONE\r\n")
        done = again.read_until(lambda b: b"i3 OK" in b)
        assert b"i3 OK" in done, done
        again.command("i4", "LOGOUT")
    finally:
        again.close()


# ------------------------------------------------ 5. a provider that stalls

TIMEOUT = 2  # the IMAP upstream timeout of these daemons, in seconds


@pytest.fixture
def impatient(clean_provider, tmp_path, imap_relay) -> Iterator[Running]:
    """The daemon behind the relay, with an upstream timeout of TIMEOUT seconds."""
    running = start_daemon_with(clean_provider, tmp_path, up_imap=imap_relay.port, timeout=TIMEOUT)
    yield running
    running.stop()


def test_a_provider_that_never_greets_gets_a_bye_in_time(clean_provider, imap_relay, impatient):
    """TCP and TLS succeed, the greeting never comes: BYE after the upstream timeout."""
    imap_relay.stall_greeting = True
    started = time.monotonic()
    client = RawImap(impatient.imap_port)
    try:
        answer = client.greeting + client.rest()
    finally:
        client.close()
    elapsed = time.monotonic() - started
    assert imap_relay.stalls >= 1
    assert_bye_after_timeout(answer, elapsed, f"no answer within {TIMEOUT} s (timeout)")
    imap_relay.stall_greeting = False
    session_works(clean_provider, impatient.imap_port)


def assert_bye_after_timeout(answer: bytes, elapsed: float, reason: str) -> None:
    """A BYE naming the reason, neither before the upstream timeout nor long after."""
    assert re.fullmatch(BYE, answer), answer
    assert reason.encode() in answer
    assert TIMEOUT - 0.5 < elapsed < TIMEOUT + 3, elapsed


def test_a_provider_that_stops_answering_mid_session_gets_a_bye_in_time(
    clean_provider, imap_relay, impatient
):
    """Logged in and selected, the provider swallows a command and says nothing more
    while keeping the connection open: BYE after the upstream timeout, not a hang."""
    imap_relay.stall_on = b"s3 NOOP"
    client = RawImap(impatient.imap_port)
    try:
        assert b"s1 OK" in client.command("s1", login(clean_provider))
        assert b"s2 OK" in client.command("s2", "SELECT INBOX")
        started = time.monotonic()
        client.send(b"s3 NOOP\r\n")
        answer = client.rest()
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert imap_relay.stalls == 1
    assert_bye_after_timeout(answer, elapsed, f"the provider did not answer within {TIMEOUT} s")
    imap_relay.stall_on = None
    session_works(clean_provider, impatient.imap_port)


def test_a_provider_that_stops_taking_data_mid_literal_gets_a_bye_in_time(
    clean_provider, imap_relay, impatient
):
    """The provider stops reading inside a big APPEND literal: once the buffers are
    full the proxy's sending stalls, and the client gets a BYE after the upstream
    timeout instead of hanging (sending is timed piece by piece, so a slow link is not
    taken for a stall)."""
    imap_relay.stall_on, imap_relay.stall_reads = b"STALL-UPLOAD", True
    # 24 MiB: more than the kernel's and the relay's buffers take before sends block
    big = b"Subject: big\r\n\r\nSTALL-UPLOAD\r\n" + (b"y" * 78 + b"\r\n") * (24 * 2**20 // 80)
    answer, elapsed = append_until_closed(clean_provider, impatient.imap_port, big)
    assert imap_relay.stalls == 1
    continuation, _, rest = answer.partition(b"\r\n")
    assert continuation.startswith(b"+ ") and re.fullmatch(BYE, rest), answer[:300]
    assert f"the provider took no data for {TIMEOUT} s (timeout)".encode() in answer
    assert elapsed < TIMEOUT + 6, elapsed
    assert clean_provider.stored_messages("alice") == []


def test_a_quiet_idle_is_not_a_stall(clean_provider, imap_relay, impatient):
    """Under IDLE the provider owes nothing: a silence longer than the timeout must not
    end the session, and DONE is answered as usual."""
    client = start_idle(clean_provider, impatient.imap_port)
    try:
        time.sleep(TIMEOUT + 1.5)
        client.send(b"DONE\r\n")
        done = client.read_until(lambda b: b"i3 OK" in b)
        assert b"i3 OK" in done and b"BYE" not in done, done
        assert b"i4 OK" in client.command("i4", "NOOP")
        client.command("i5", "LOGOUT")
    finally:
        client.close()


# ------------------------------------------------ 6. the host name does not resolve


def test_unresolvable_at_start_the_daemon_runs_and_says_why(clean_provider, tmp_path):
    """As test_faults.test_refused_at_start_the_daemon_runs_and_says_why, for DNS."""
    host = "nonexistent.invalid"
    running = start_daemon_with(clean_provider, tmp_path, host=host)
    try:
        upstream: dict = {}

        def checked() -> bool:
            upstream.update(status_json(running)["accounts"][0]["upstream"])
            return all(upstream[s]["reachable"] is not None for s in ("imap", "smtp"))

        wait_for(checked, "the first upstream check")
        for service in ("imap", "smtp"):
            assert upstream[service]["reachable"] is False
            assert f"cannot resolve host name '{host}'" in (upstream[service]["error"] or "")
        client = RawImap(running.imap_port)
        answer = client.greeting + client.rest()
        client.close()
        assert re.fullmatch(BYE, answer), answer
        assert f"cannot resolve host name '{host}'".encode() in answer
        assert_auth_gets_454(clean_provider, running.smtp_port, b"cannot resolve host name")
    finally:
        log = running.stop()
    assert running.process.returncode == 0, log[-2000:]
