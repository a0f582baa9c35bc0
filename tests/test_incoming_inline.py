"""Small incoming messages are decrypted on the event loop; anything that would stall it
(a large plaintext, Sequoia's unbounded path, S/MIME) goes to a worker thread, once,
with the same result and the same counters as if it had gone there first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localproxy.crypto.errors import NeedsWorker, OutputTooLarge
from localproxy.crypto.openpgp import default_engine, inline_only
from localproxy.incoming import INLINE_VIEW, IncomingProcessor
from localproxy.keys.store import KeyStore
from tests.crypto import bomb, compressed, encrypt_raw, literal
from tests.test_incoming import config_for

ENGINE = default_engine()
HEAD = b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: hi\r\n"


def pgp_mime(binary: bytes) -> bytes:
    armored = ENGINE.armor(binary, kind="message").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return (
        HEAD + b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        b"Version: 1\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        + armored
        + b"--b--\r\n"
    )


def inner(text: bytes) -> bytes:
    return b"Content-Type: text/plain\r\n\r\n" + text


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "data", ENGINE) as keys:
        keys.generate("alice", ("alice@example.org",))
        yield keys


@pytest.fixture
def alice_public(store: KeyStore) -> bytes:
    ((_cert, secret),) = store.own_keys("alice")
    return ENGINE.public_only(secret)


@pytest.fixture
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def incoming(tmp_path: Path, store: KeyStore, events: list) -> IncomingProcessor:
    config = config_for(tmp_path / "data")
    return IncomingProcessor(
        config.accounts[0], config, store, ENGINE, on_event=lambda *event: events.append(event)
    )


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions handed to a worker thread."""
    handed: list[str] = []
    real = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        handed.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    return handed


async def test_a_small_message_is_decrypted_on_the_loop(
    incoming: IncomingProcessor, alice_public: bytes, threads: list[str], events: list
) -> None:
    raw = pgp_mime(encrypt_raw(alice_public, literal(inner(b"hello inline\r\n"))))
    assert len(raw) <= INLINE_VIEW
    view = await incoming.transform(raw)
    assert b"hello inline" in view and b"decrypted" in view.split(b"\r\n\r\n")[0]
    assert threads == []
    assert [kind for kind, _ in events] == ["received-decrypted"]


async def test_a_large_plaintext_from_a_small_message_goes_to_a_worker_once(
    incoming: IncomingProcessor, alice_public: bytes, threads: list[str], events: list
) -> None:
    text = b"x" * (3 << 20)  # compresses to a few KB, over the 1 MB inline budget
    raw = pgp_mime(encrypt_raw(alice_public, compressed(literal(inner(text)))))
    assert len(raw) <= INLINE_VIEW
    view = await incoming.transform(raw)
    assert text in view
    assert threads == ["view_of"]
    assert [kind for kind, _ in events] == ["received-decrypted"], "counted once"


async def test_a_compression_bomb_is_refused_in_the_worker(
    incoming: IncomingProcessor, alice_public: bytes, threads: list[str], events: list
) -> None:
    incoming.max_output = 8 << 20  # the account's limit, small here to keep the test quick
    raw = pgp_mime(encrypt_raw(alice_public, bomb(64 << 20, algo=3)))
    assert len(raw) <= INLINE_VIEW
    view = await incoming.transform(raw)
    assert threads == ["view_of"]
    assert b"BEGIN PGP MESSAGE" in view, "shown as stored"
    ((kind, data),) = events
    assert kind == "received-failed" and "larger than the limit" in data["error"]


async def test_s_mime_goes_to_a_worker(incoming: IncomingProcessor, threads: list[str]) -> None:
    raw = (
        HEAD + b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n"
    )
    await incoming.transform(raw)
    assert threads == ["view_of"]


async def test_a_large_message_goes_to_a_worker(
    incoming: IncomingProcessor, threads: list[str]
) -> None:
    await incoming.transform(HEAD + b"\r\n" + b"plain text\r\n" * (INLINE_VIEW // 10))
    assert threads == ["view_of"]


def test_the_engine_asks_for_a_worker_instead_of_spending_past_the_budget(
    store: KeyStore, alice_public: bytes
) -> None:
    ((_cert, secret),) = store.own_keys("alice")
    message = encrypt_raw(alice_public, compressed(literal(b"z" * (2 << 20))))
    with inline_only(budget=1 << 20), pytest.raises(NeedsWorker):
        ENGINE.decrypt(message, [secret], max_output=64 << 20)
    with inline_only(budget=4 << 20):
        assert ENGINE.decrypt(message, [secret]).plaintext.endswith(b"z" * 100)
    with pytest.raises(OutputTooLarge):  # the caller's own limit still says no
        ENGINE.decrypt(message, [secret], max_output=1 << 20)
    assert len(ENGINE.decrypt(message, [secret]).plaintext) == 2 << 20
