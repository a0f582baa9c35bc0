"""Hostile mail through IncomingProcessor.view_of, what the IMAP relay shows for a message.

The mutated PGP/MIME, inline PGP and signed messages of test_pgpmime_hostile.py, some
behind a forged status header or an Autocrypt header (maybe mutated too), go through the
whole view path: status headers stripped, Autocrypt learned, S/MIME or OpenPGP unwrapped
with the account's keys from a real key store. Property (the module's contract): view_of
returns within a time limit; a message it did not decrypt is served exactly as stored,
never hidden, behind at most one X-LocalProxy-Security field, which for encrypted mail
says why; a decrypted view holds exactly a plaintext that was encrypted.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from localproxy.config import parse_config
from localproxy.crypto.pgpmime import Kind, classify, strip_headers
from localproxy.incoming import STATUS_HEADER, IncomingProcessor
from localproxy.incoming import _view as incoming_view
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity
from localproxy.secretbox import StoreKey
from tests.crypto.test_pgpmime_hostile import (
    ALICE_PUB,
    BOB,
    ENCRYPTED,
    ENGINE,
    INLINE,
    PLAINTEXT_BODIES,
    SECRET,
    SIGNED,
    hostile_messages,
)
from tests.harness.hostile import mutations, time_limit

HOSTILE = settings(max_examples=150, deadline=2000)
STATUS = STATUS_HEADER.encode() + b": "
AUTOCRYPT = b"Autocrypt: addr=alice@example.org; keydata=" + base64.b64encode(ALICE_PUB) + b"\r\n"
PREFIXES = [
    b"",
    STATUS + b"decrypted; signature=valid\r\n",
    b"x-localproxy-security: decrypted\r\n x-localproxy-folded: yes\r\n",
    AUTOCRYPT,
]


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IncomingProcessor]:
    data = tmp_path_factory.mktemp("incoming") / "data"
    upstream = {"host": "mail.example.org", "port": 993, "security": "tls"}
    config = parse_config(
        {
            "proxy": {"data_dir": str(data), "max_message_size": 1 << 20},
            "account": [
                {
                    "name": "bob",
                    "addresses": ["bob@example.org"],
                    "upstream": {"imap": upstream, "smtp": {**upstream, "port": 465}},
                }
            ],
        }
    )
    with KeyStore(data, ENGINE, StoreKey(secrets.token_bytes(32), "test")) as store:
        outcomes = store.import_keys(BOB.data, "import:test", account_for=lambda info: "bob")
        assert [o.action for o in outcomes] == ["added"]
        yield IncomingProcessor(config.accounts[0], config, store, ENGINE)


@st.composite
def stored_messages(draw: st.DrawFn) -> bytes:
    """A hostile message, maybe behind a forged status header or an Autocrypt header
    (itself maybe mutated)."""
    prefix = draw(st.sampled_from(PREFIXES))
    if prefix == AUTOCRYPT and draw(st.booleans()):
        prefix = draw(mutations(AUTOCRYPT, [b"=", b"\r\n ", b";", b"_x=y;"], max_steps=2))
    return prefix + draw(hostile_messages())


# --------------------------------------------------------------------------- property


def check_view(processor: IncomingProcessor, raw: bytes) -> None:
    with time_limit():
        view = processor.view_of(raw)
        stored = strip_headers(raw)
        kind = classify(parse_entity(stored))
    assert len(view) <= len(raw) + processor.max_output + 1024, "memory bounded"
    if view.startswith(STATUS + b"decrypted"):
        assert kind in (Kind.PGP_ENCRYPTED, Kind.INLINE_ENCRYPTED)
        assert parse_entity(view).body in PLAINTEXT_BODIES, "altered plaintext"
        return
    assert SECRET not in view or SECRET in stored, "plaintext released"
    if kind == Kind.PLAIN:
        assert view == stored, "plain mail is served as stored"
        return
    assert view.endswith(stored), "served exactly as stored, never hidden"
    status = view[: len(view) - len(stored)]
    assert status.startswith(STATUS) and status.endswith(b"\r\n")
    assert all(line.startswith(b" ") for line in status[:-2].split(b"\r\n")[1:]), "one field"
    if kind in (Kind.PGP_ENCRYPTED, Kind.INLINE_ENCRYPTED, Kind.SMIME):
        assert b"not-" in status and b'reason="' in status, "says why"


def test_the_unmutated_messages_are_decrypted_or_verified(processor: IncomingProcessor):
    for raw in (ENCRYPTED, INLINE):
        view = asyncio.run(processor.transform(AUTOCRYPT + raw))
        assert view.startswith(STATUS + b"decrypted") and SECRET in view
        assert b"signature=valid" in view
    assert processor.view_of(SIGNED).startswith(STATUS + b"signed; signature=valid")


@HOSTILE
@given(raw=stored_messages())
@example(raw=STATUS + b"decrypted\r\n" + ENCRYPTED[:-200])
@example(raw=AUTOCRYPT.replace(b"keydata=", b"keydata=AAAA") + ENCRYPTED)
@example(raw=INLINE.replace(b"\r\n", b"\n\r"))  # see test_pgpmime_hostile.py
def test_mutated_messages_are_decrypted_whole_or_served_as_stored(
    processor: IncomingProcessor, raw: bytes
):
    check_view(processor, raw)


def test_smime_view_keeps_lines_without_a_field_name_out():
    """The S/MIME view copies the outer fields the same way as PGP/MIME's (see
    test_pgpmime_hostile.py): a lone "\\r\\n" must not end its header early."""
    outer = parse_entity(
        b"From: a@example.org\r\nX-Note: hi\r\r\nWire the money.\r\n"
        b"Content-Type: application/pkcs7-mime\r\n\r\nMIIB\r\n"
    )
    view = incoming_view(outer, b"Content-Type: text/plain\r\n\r\nsecret\r\n")
    assert view == (
        b"From: a@example.org\r\nX-Note: hi\r\nContent-Type: text/plain\r\n\r\nsecret\r\n"
    )
