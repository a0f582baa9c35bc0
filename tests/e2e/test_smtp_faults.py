"""The SMTP proxy when the provider fails around the end of a message, and when its
certificate changes mid-run: against real Postfix and Dovecot, through the fault relay
(tests/harness/smtp_faults.py).

The rule (RFC 5321 6.1): the client hears 250 only after the provider confirmed the
message; whatever went wrong before that, it hears a 4xx and keeps the message. Under
an encrypt policy nothing in clear ever reaches the provider, however it fails.

Rigs and helpers are those of test_smtp_hardening.py; blocking smtplib clients run in
threads (asyncio.to_thread), as the proxy shares the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from localproxy.sandbox.ca import make_test_ca
from localproxy.sandbox.provider import Provider
from tests.e2e.test_smtp_hardening import (
    BOB_ALWAYS,
    SECRET,
    Rig,
    decrypt,
    mail,
    start_rig,
    stored,
)
from tests.harness.smtp_faults import SmtpFaultRelay

pytestmark = pytest.mark.e2e
TIMEOUT = 1.5  # seconds: the proxy's upstream timeout in these tests
NOT_CONFIRMED = b"4.4.2 localproxy: the provider did not confirm the message ("
RETRY = b"); please try again"
PGP_ARMOR = (b"-----BEGIN PGP MESSAGE-----", b"-----END PGP MESSAGE-----")
# SECRET in the Subject too: a message cut off in its header (DROP_AFTER_BYTES) would
# show it in clear, where the encrypted copy has "[...]" (protected headers).
BOB_ONLY = mail(to="Bob <bob@example.org>", subject=SECRET.decode())


@pytest.fixture
async def relay(clean_provider: Provider) -> AsyncIterator[SmtpFaultRelay]:
    running = SmtpFaultRelay(clean_provider)
    await running.start()
    yield running
    await running.close()


async def relay_rig(provider: Provider, tmp_path: Path, relay: SmtpFaultRelay) -> Rig:
    """A proxy for alice whose provider is the relay; bob must get encrypted mail."""
    upstream = {"port": relay.port, "security": "tls", "timeout": TIMEOUT}
    return await start_rig(provider, tmp_path, policy=BOB_ALWAYS, upstream=upstream)


async def bobs_messages(provider: Provider) -> list[bytes]:
    """What bob holds, once a sentinel sent straight through Postfix now has arrived:
    anything the provider accepted before has been delivered by then."""
    token = os.urandom(8).hex().encode()
    sentinel = b"Subject: sentinel " + token + b"\r\n\r\nsentinel\r\n"
    await asyncio.to_thread(provider.send, "alice", ["bob@example.org"], sentinel)
    messages = await stored(provider, "bob")
    while not any(token in m for m in messages):
        messages = await stored(provider, "bob", len(messages) + 1)
    return [m for m in messages if b"Subject: sentinel " not in m]


def assert_encrypted_copy(raw: bytes) -> None:
    assert SECRET not in raw and all(armor in raw for armor in PGP_ARMOR), raw[:400]
    assert SECRET in decrypt(raw).plaintext


def send_timed(rig: Rig, raw: bytes) -> tuple[int, bytes, float]:
    """One message to bob; its final reply, and the seconds from DATA to that reply."""
    with rig.client() as smtp:
        smtp.mail("alice@example.org")
        smtp.rcpt("bob@example.org")
        started = time.monotonic()
        code, text = smtp.data(raw)
        return code, text, time.monotonic() - started


# ------------------------------------------------------- the provider dies in or after DATA


@pytest.mark.parametrize("close_style", ["close_notify", "no_close_notify", "rst"])
@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("mode", ["drop-in-data", "drop-after-data"])
async def test_provider_dies_in_or_after_data_client_gets_4xx(
    clean_provider, tmp_path, relay, mode, chunking, close_style
):
    """The provider's connection dies however it dies (an orderly TLS shutdown, TCP
    closed without close_notify, a reset), either in the middle of the message or
    after the provider accepted all of it (the final "." of DATA, the whole BDAT ...
    LAST chunk) but before its 250 reached the proxy.

    Outcome: the client never hears 250; it gets 451 4.4.2 "the provider did not
    confirm the message", so it keeps the message and retries. Nothing is queued (the
    retry is the client's). Mid-message, the provider stored nothing; after the end of
    the data, it stored the message exactly once, and the client's retry then delivers
    a second copy. That duplicate is RFC 1047's unavoidable window: between the
    provider's acceptance and its reply arriving, neither side can know about the
    other. The proxy keeps the window to the one round trip of the final reply: it
    neither answers the client early nor retries by itself. Bob's policy is
    encrypt = "always": everything the provider saw, and what it stored, is
    ciphertext."""
    rig = await relay_rig(clean_provider, tmp_path, relay)
    relay.chunking, relay.close_style = chunking, close_style
    relay.fail_after, relay.mode = 0, mode
    try:
        code, text, elapsed = await asyncio.to_thread(send_timed, rig, BOB_ONLY)
        assert code == 451, (code, text)
        assert text.startswith(NOT_CONFIRMED) and text.endswith(RETRY), text
        assert b"closed the connection" in text, text
        assert elapsed < TIMEOUT, "a dead connection is noticed at once, not by timeout"
        assert relay.faults == 1
        assert (b"BDAT" in relay.verbs, b"DATA" in relay.verbs) == (chunking, not chunking)
        assert relay.data_seen and all(SECRET not in data for data in relay.data_seen)
        assert rig.outbox.stats()[:2] == (0, 0)
        kept = await bobs_messages(clean_provider)
        if mode == "drop-after-data":
            (copy,) = kept  # stored exactly once, though the client was told to retry
            assert_encrypted_copy(copy)
            assert relay.accepted == 1 and all(armor in relay.data_seen[0] for armor in PGP_ARMOR)
        else:
            assert kept == [] and relay.accepted == 0
        # The client's retry.
        relay.fail_after = None
        code, text, _ = await asyncio.to_thread(send_timed, rig, BOB_ONLY)
        assert code == 250, (code, text)
    finally:
        await rig.close()
    again = await bobs_messages(clean_provider)
    assert len(again) == len(kept) + 1
    for raw in again:
        assert_encrypted_copy(raw)


# ------------------------------------------------------ the provider never answers the end


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
@pytest.mark.parametrize("mode", ["stall", "stall-after-data"])
async def test_provider_never_answers_the_end_of_data(
    clean_provider, tmp_path, relay, mode, chunking
):
    """The provider's connection stays up but its reply to the end of the data never
    comes: "stall" holds back the final "." (or BDAT's last octet), so the provider
    never has the whole message; "stall-after-data" passes it all, Postfix accepts and
    stores it, and its 250 is held back.

    Outcome: after the upstream timeout (and not much later) the client gets 451 4.4.2
    saying the provider did not confirm the message in time; nothing is queued; the
    provider stored the message never ("stall") or exactly once ("stall-after-data",
    the same duplicate window as above); nothing in clear went out for bob."""
    rig = await relay_rig(clean_provider, tmp_path, relay)
    relay.chunking = chunking
    relay.fail_after, relay.mode = 0, mode
    try:
        code, text, elapsed = await asyncio.to_thread(send_timed, rig, BOB_ONLY)
    finally:
        await rig.close()
    assert code == 451, (code, text)
    assert text == NOT_CONFIRMED + b"timed out waiting for the provider's reply" + RETRY, text
    assert TIMEOUT <= elapsed < TIMEOUT + 3, elapsed
    assert relay.faults == 1
    assert (b"BDAT" in relay.verbs, b"DATA" in relay.verbs) == (chunking, not chunking)
    assert relay.data_seen and all(SECRET not in data for data in relay.data_seen)
    assert rig.outbox.stats()[:2] == (0, 0)
    kept = await bobs_messages(clean_provider)
    if mode == "stall-after-data":
        (copy,) = kept
        assert_encrypted_copy(copy)
    else:
        assert kept == []


# ------------------------------------------------------ a certificate changed mid-run


async def test_an_untrusted_certificate_mid_run_fails_closed(clean_provider, tmp_path, relay):
    """After a message went out, the provider presents a certificate from another CA
    (same names). The next client's AUTH gets 454 (temporary: the password is not at
    fault) naming the certificate problem, and no TLS session is ever completed with
    that certificate, so neither the credentials nor a message reached the relay.
    With the right certificate back, the same proxy logs in again."""
    rig = await relay_rig(clean_provider, tmp_path, relay)
    alice = clean_provider.users["alice"]
    try:
        await asyncio.to_thread(rig.send, BOB_ONLY, ["bob@example.org"])
        (first,) = await stored(clean_provider, "bob")
        assert_encrypted_copy(first)
        assert relay.handshake_failures == 0
        other = make_test_ca(tmp_path / "other-ca")
        relay.use_certificate(other.cert_file, other.key_file)
        seen = relay.connections, relay.handshakes, len(relay.verbs), len(relay.data_seen)

        def session() -> tuple[smtplib.SMTPAuthenticationError, tuple[int, bytes]]:
            with rig.connect() as smtp:
                with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                    smtp.login(alice.login, alice.password)
                return failed.value, smtp.mail("alice@example.org")

        refused, mail_reply = await asyncio.to_thread(session)
        assert refused.smtp_code == 454, refused
        assert refused.smtp_error.startswith(b"4.7.0 localproxy: "), refused
        assert b"certificate is not trusted" in refused.smtp_error, refused
        assert mail_reply[0] == 530, "no AUTH, no mail"
        tried = relay.connections - seen[0]
        assert tried >= 1  # smtplib tries PLAIN, then LOGIN: one connection each
        deadline = time.monotonic() + 5  # the relay notices its side a moment later
        while relay.handshake_failures < tried and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert relay.handshake_failures == tried, "every connection failed at the handshake"
        after = relay.connections, relay.handshakes, len(relay.verbs), len(relay.data_seen)
        assert after[1:] == seen[1:], "nothing may cross an untrusted connection"
        assert any(
            kind == "upstream-error" and "not trusted" in data["error"] for kind, data in rig.events
        ), rig.events
        relay.use_certificate(clean_provider.ca.cert_file, clean_provider.ca.key_file)
        await asyncio.to_thread(lambda: rig.client().quit())
    finally:
        await rig.close()
    assert relay.handshakes == seen[1] + 1
    assert await asyncio.to_thread(clean_provider.stored_messages, "bob") == [first]
