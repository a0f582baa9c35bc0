"""Autocrypt learning from incoming mail (Level 1, "Updating Autocrypt Peer State"),
through learn_autocrypt and the relay's header observer."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from localproxy import incoming as incoming_module
from localproxy.config import Config, parse_config
from localproxy.crypto.openpgp import default_engine
from localproxy.imap.relay import MessageContext
from localproxy.incoming import (
    AUTOCRYPT_MAX_HEADER,
    AutocryptPeers,
    IncomingProcessor,
    learn_autocrypt,
)
from localproxy.keys.store import KeyStore

ENGINE = default_engine()
BOB = ENGINE.public_only(ENGINE.generate_key(["Bob <bob@example.org>"]).data)
BOB_NEWER = ENGINE.public_only(ENGINE.generate_key(["Bob <bob@example.org>"]).data)
CAROL = ENGINE.public_only(ENGINE.generate_key(["Carol <carol@example.org>"]).data)


def autocrypt(addr: str, key: bytes, name: str = "Autocrypt", extra: str = "") -> bytes:
    """An Autocrypt header field as an MUA writes it: keydata last, folded."""
    data = base64.b64encode(key).decode()
    folded = "\r\n ".join(data[i : i + 72] for i in range(0, len(data), 72))
    return f"{name}: addr={addr}; {extra}keydata=\r\n {folded}\r\n".encode()


def message(
    *fields: bytes,
    sender: str = "Bob <bob@example.org>",
    date: str = "Mon, 01 Jan 2024 10:00:00 +0000",
) -> bytes:
    head = f"From: {sender}\r\nTo: alice@example.org, carol@example.org\r\nDate: {date}\r\n"
    return head.encode() + b"".join(fields) + b"Subject: hi\r\n\r\nhello\r\n"


def config_for(data: Path, autocrypt: bool = True) -> Config:
    upstream = {"host": "mail.example.org", "port": 993, "security": "tls"}
    return parse_config(
        {
            "proxy": {"data_dir": str(data)},
            "policy": {"autocrypt": autocrypt},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": upstream, "smtp": {**upstream, "port": 465}},
                }
            ],
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "data", ENGINE) as keys:
        yield keys


@pytest.fixture
def incoming(tmp_path: Path, store: KeyStore) -> IncomingProcessor:
    config = config_for(tmp_path / "data")
    return IncomingProcessor(config.accounts[0], config, store, ENGINE)


def learned(store: KeyStore, address: str = "bob@example.org") -> list[tuple[str, str]]:
    return [(c.fingerprint, c.source) for c in store.find(address)]


def fingerprint(key: bytes) -> str:
    return ENGINE.parse_certs(key)[0].fingerprint


def context(uid: int, mailbox: str = "INBOX") -> MessageContext:
    return MessageContext("alice", mailbox, 7, uid)


# --------------------------------------------------------------------------- learn_autocrypt


def test_plain_message_with_one_valid_header_teaches_the_key(store: KeyStore):
    raw = message(autocrypt("bob@example.org", BOB, extra="prefer-encrypt=mutual; "))
    assert learn_autocrypt(store, raw, "autocrypt") == 1
    assert learned(store) == [(fingerprint(BOB), "autocrypt")]
    assert learn_autocrypt(store, raw, "autocrypt") == 0, "already known"


def test_a_header_block_alone_is_enough(store: KeyStore):
    header = message(autocrypt("bob@example.org", BOB)).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert learn_autocrypt(store, header, "autocrypt") == 1


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(message(autocrypt("mallory@example.org", BOB)), id="addr-is-not-from"),
        pytest.param(
            message(autocrypt("bob@example.org", BOB), autocrypt("bob@example.org", BOB_NEWER)),
            id="two-valid-headers",
        ),
        pytest.param(
            message(autocrypt("bob@example.org", b"not an OpenPGP key at all")),
            id="garbage-keydata",
        ),
        pytest.param(
            message(b"Autocrypt: addr=bob@example.org; keydata=%%%not-base64%%%\r\n"),
            id="keydata-not-base64",
        ),
        pytest.param(message(autocrypt("bob@example.org", CAROL)), id="key-lacks-the-address"),
        pytest.param(
            message(autocrypt("bob@example.org", BOB), sender="bob@example.org, eve@example.org"),
            id="two-from-addresses",
        ),
        pytest.param(
            message(b"Auto-Submitted: auto-replied\r\n", autocrypt("bob@example.org", BOB)),
            id="auto-replied",
        ),
        pytest.param(
            message(
                b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n",
                autocrypt("bob@example.org", BOB),
            ),
            id="report",
        ),
        pytest.param(
            message(autocrypt("bob@example.org", BOB, extra="_pad=" + "x" * AUTOCRYPT_MAX_HEADER)),
            id="larger-than-10-KiB",
        ),
        pytest.param(message(), id="no-header"),
    ],
)
def test_headers_level_1_ignores(store: KeyStore, raw: bytes):
    assert learn_autocrypt(store, raw, "autocrypt") == 0
    assert store.find("bob@example.org") == []


def test_a_header_with_an_unknown_critical_attribute_does_not_count(store: KeyStore):
    """Future versions hide extra headers from Level 1 this way; the valid one is taken."""
    raw = message(
        autocrypt("bob@example.org", BOB_NEWER, extra="version=2; "),
        autocrypt("bob@example.org", BOB, extra="_comment=ignored; "),
    )
    assert learn_autocrypt(store, raw, "autocrypt") == 1
    assert learned(store) == [(fingerprint(BOB), "autocrypt")]


def test_gossip_is_taken_for_recipients_only(store: KeyStore):
    dave = ENGINE.public_only(ENGINE.generate_key(["Dave <dave@example.org>"]).data)
    raw = message(
        autocrypt("carol@example.org", CAROL, name="Autocrypt-Gossip"),
        autocrypt("dave@example.org", dave, name="Autocrypt-Gossip"),
    )
    assert learn_autocrypt(store, raw, "autocrypt-gossip", gossip=True) == 1
    assert learned(store, "carol@example.org") == [(fingerprint(CAROL), "autocrypt-gossip")]
    assert store.find("dave@example.org") == []


def test_an_older_message_does_not_count_once_a_younger_header_was_taken(store: KeyStore):
    peers = AutocryptPeers()
    newer = message(autocrypt("bob@example.org", BOB_NEWER), date="Mon, 01 Jan 2024 10:00 +0000")
    older = message(autocrypt("bob@example.org", BOB), date="Sun, 01 Jan 2023 10:00 +0000")
    assert learn_autocrypt(store, newer, "autocrypt", peers=peers) == 1
    assert learn_autocrypt(store, older, "autocrypt", peers=peers) == 0
    assert learned(store) == [(fingerprint(BOB_NEWER), "autocrypt")]


def test_peers_compare_effective_dates():
    peers = AutocryptPeers()
    peers.record("bob@example.org", datetime.now(UTC), BOB)
    future = datetime.now(UTC) + timedelta(days=365)
    assert not peers.outdated("bob@example.org", future)
    assert peers.outdated("bob@example.org", datetime.now(UTC) - timedelta(days=1))
    assert peers.known_key("bob@example.org", BOB)
    assert not peers.known_key("bob@example.org", BOB_NEWER)


def test_a_future_date_counts_as_now(store: KeyStore):
    """Otherwise one message dated 2100 would freeze the sender's key until then."""
    peers = AutocryptPeers()
    far = message(autocrypt("bob@example.org", BOB), date="Fri, 01 Jan 2100 10:00 +0000")
    assert learn_autocrypt(store, far, "autocrypt", peers=peers) == 1
    less_far = message(autocrypt("bob@example.org", BOB_NEWER), date="Thu, 01 Jan 2099 10:00 +0000")
    assert learn_autocrypt(store, less_far, "autocrypt", peers=peers) == 1


# --------------------------------------------------------------------------- observe_headers


def header_of(raw: bytes) -> bytes:
    """What the relay's header probe returns: the fields and the blank line."""
    return raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n"


async def test_observed_headers_teach_the_key(incoming: IncomingProcessor, store: KeyStore):
    await incoming.observe_headers(
        header_of(message(autocrypt("bob@example.org", BOB))), context(1)
    )
    assert learned(store) == [(fingerprint(BOB), "autocrypt")]


async def test_each_stored_message_is_observed_once(
    incoming: IncomingProcessor, monkeypatch: pytest.MonkeyPatch
):
    calls: list[bytes] = []
    monkeypatch.setattr(
        incoming_module, "learn_autocrypt", lambda store, raw, *a, **k: calls.append(raw)
    )
    header = header_of(message(autocrypt("bob@example.org", BOB)))
    for ctx in (context(1), context(1), context(1, "Archive"), context(1), context(2)):
        await incoming.observe_headers(header, ctx)
    assert len(calls) == 3  # INBOX 1, Archive 1, INBOX 2


async def test_a_key_met_again_costs_no_openpgp_work(
    incoming: IncomingProcessor, store: KeyStore, monkeypatch: pytest.MonkeyPatch
):
    imports: list[str] = []
    real = incoming_module._import_for

    def counting(*args: object) -> int | None:
        imports.append("import")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(incoming_module, "_import_for", counting)
    for uid, day in enumerate(("01", "02", "03"), 1):
        raw = message(autocrypt("bob@example.org", BOB), date=f"Mon, {day} Jan 2024 10:00 +0000")
        await incoming.observe_headers(header_of(raw), context(uid))
    assert imports == ["import"]
    assert learned(store) == [(fingerprint(BOB), "autocrypt")]


async def test_observed_headers_without_autocrypt_cost_no_thread(
    incoming: IncomingProcessor, monkeypatch: pytest.MonkeyPatch
):
    async def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("learn_autocrypt should not run")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    await incoming.observe_headers(b"From: bob@example.org\r\n\r\n", context(2))


async def test_observer_respects_the_autocrypt_policy(tmp_path: Path, store: KeyStore):
    config = config_for(tmp_path / "data", autocrypt=False)
    processor = IncomingProcessor(config.accounts[0], config, store, ENGINE)
    header = message(autocrypt("bob@example.org", BOB))
    await processor.observe_headers(header, context(3))
    assert store.find("bob@example.org") == []


async def test_the_view_path_still_learns_an_older_signing_key(
    incoming: IncomingProcessor, store: KeyStore
):
    """Observed newer mail does not stop an older message's key from being imported when
    that message is opened: verifying it needs that key."""
    newer = message(autocrypt("bob@example.org", BOB_NEWER), date="Mon, 01 Jan 2024 10:00 +0000")
    await incoming.observe_headers(newer, context(4))
    older = message(autocrypt("bob@example.org", BOB), date="Sun, 01 Jan 2023 10:00 +0000")
    await incoming.transform(older, context(5))
    assert {fpr for fpr, _ in learned(store)} == {fingerprint(BOB), fingerprint(BOB_NEWER)}


async def test_the_view_path_imports_a_key_met_again_only_once(
    incoming: IncomingProcessor, store: KeyStore, monkeypatch: pytest.MonkeyPatch
):
    """Every mail of a correspondent carries the same key: opening many of them must not
    import it each time (that cost more than decrypting them), a new key still counts."""
    imports: list[str] = []
    real = incoming_module._import_for

    def counting(*args: object) -> int | None:
        imports.append(str(args[2]))
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(incoming_module, "_import_for", counting)
    for uid in range(1, 4):
        await incoming.transform(message(autocrypt("bob@example.org", BOB)), context(uid))
    await incoming.transform(message(autocrypt("bob@example.org", BOB_NEWER)), context(4))
    assert imports == ["bob@example.org", "bob@example.org"]
    assert {fpr for fpr, _ in learned(store)} == {fingerprint(BOB), fingerprint(BOB_NEWER)}
