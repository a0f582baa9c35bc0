"""compose() on bad input, in process: every case has a defined outcome, and nothing
that policy says must be encrypted leaves in clear.

The same cases run end to end, through real Postfix, in tests/e2e/test_smtp_hardening.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.config import Config, parse_config
from localproxy.crypto.openpgp import CertInfo, DecryptResult, default_engine
from localproxy.keys.store import KeyStore
from localproxy.mime import parse_entity
from localproxy.smtp.compose import (
    Copy,
    PolicyRefusal,
    compose,
    header_section,
    refusal_for_recipient,
)

ENGINE = default_engine()
BOB_KEY = ENGINE.generate_key(["Bob <bob@example.org>"])
JOERG_KEY = ENGINE.generate_key(["Jörg <jörg@example.org>"])
SECRET = b"SECRET-BODY-TEXT-4711"


def make_config(tmp_path: Path, policy: dict | None = None) -> Config:
    server = {"host": "mail.example.org", "port": 465, "security": "tls"}
    return parse_config(
        {
            "proxy": {"data_dir": str(tmp_path / "data")},
            "policy": policy or {},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": server | {"port": 993}, "smtp": server},
                }
            ],
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "data") as keys:
        keys.generate("alice", ("alice@example.org",))
        for key in (BOB_KEY, JOERG_KEY):
            keys.import_keys(ENGINE.public_only(key.data), "import:test")
        yield keys


def run(
    store: KeyStore, tmp_path: Path, raw: bytes, recipients: list[str], policy: dict | None = None
) -> list[Copy]:
    config = make_config(tmp_path, policy)
    return compose(
        raw,
        recipients,
        account=config.accounts[0],
        policy=config.policy,
        store=store,
        engine=ENGINE,
    )


def alice(store: KeyStore) -> CertInfo:
    ((stored, _secret),) = store.own_keys("alice")
    return stored.info


def decrypt(copy: Copy, secret: CertInfo, store: KeyStore) -> DecryptResult:
    entity = parse_entity(copy.message)
    assert entity.content_type == "multipart/encrypted", copy.message[:300]
    return ENGINE.decrypt(entity.parts[1].body, [secret.data], verify_certs=[alice(store).data])


def outer_header(copy: Copy) -> bytes:
    return parse_entity(copy.message).header


def only_crlf(data: bytes) -> bool:
    return re.search(rb"(?<!\r)\n|\r(?!\n)", data) is None


# --------------------------------------------------------------------------- malformed MIME


MALFORMED = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org, carol@example.org\r\n"
    b"Subject: broken\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="never-closed"\r\n\r\n'
    b"--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"!!! not base64 " + SECRET + b"\r\n--wrong-boundary\r\n"
)


def test_malformed_mime_is_encrypted_as_it_is(store, tmp_path):
    """Outcome: not repaired, not refused; encrypted (or sent plain) byte for byte."""
    encrypted, plain = run(store, tmp_path, MALFORMED, ["bob@example.org", "carol@example.org"])
    assert (encrypted.kind, encrypted.recipients) == ("encrypted", ("bob@example.org",))
    assert SECRET not in encrypted.message
    inner = decrypt(encrypted, BOB_KEY, store).plaintext
    assert MALFORMED.split(b"\r\n\r\n", 1)[1] in inner, "body untouched inside"
    assert (plain.kind, plain.recipients) == ("plain", ("carol@example.org",))
    assert plain.message.endswith(MALFORMED.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"Subject: s\r\n" + SECRET + b" no blank line\r\nmore\r\n", id="no-blank-line"
        ),
        pytest.param(b"From: alice@example.org\r\n" + SECRET + b"\r\n\r\nbody\r\n", id="junk-line"),
        pytest.param(SECRET + b" only a body\r\n", id="no-header"),
        pytest.param(b" " + SECRET + b" continuation first\r\n\r\nx\r\n", id="leading-space"),
    ],
)
def test_a_line_that_is_no_header_field_starts_the_body(store, tmp_path, raw):
    """Found by these tests: such lines used to be copied to the outer header in clear."""
    (copy,) = run(store, tmp_path, raw, ["bob@example.org"])
    assert SECRET not in copy.message
    assert SECRET in decrypt(copy, BOB_KEY, store).plaintext


def test_header_section_splits_like_postfix():
    fields, sep, body = header_section(b"A: 1\r\n folded\r\nnot a field\r\nB: 2\r\n\r\nbody\r\n")
    assert [f.name for f in fields] == ["A"] and sep == b"\r\n"
    assert body == b"not a field\r\nB: 2\r\n\r\nbody\r\n"


_LINES = st.one_of(
    st.sampled_from(
        [b"From: alice@example.org", b"To: bob@example.org", b"", b"Subject: x", b" fold"]
    ),
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.just(b"Subject: " + SECRET),
    st.just(SECRET),
    st.just(b"Content-Type: multipart/mixed; boundary=b"),
    st.just(b"--b"),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(_LINES, max_size=12), ending=st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_no_subject_or_body_text_leaves_in_clear(store, tmp_path, lines, ending):
    """Property: whatever the structure, the secret (only ever in Subject, a line that is
    no header field, or the body) is never in the encrypted copy outside the ciphertext."""
    raw = ending.join(lines) + ending + SECRET + ending
    (copy,) = run(store, tmp_path, raw, ["bob@example.org"])
    assert copy.kind == "encrypted"
    assert SECRET not in copy.message


# --------------------------------------------------------------------------- headers and senders


def test_missing_from_is_sent_unsigned_without_autocrypt(store, tmp_path):
    """Outcome: sent, encrypted as policy says; no key vouches for an unnamed sender, so
    no signature, no Autocrypt, no encryption to the account's key; the Message-ID uses
    the account's domain, never the machine's name."""
    raw = b"To: bob@example.org\r\nSubject: anonymous\r\n\r\n" + SECRET + b"\r\n"
    (copy,) = run(store, tmp_path, raw, ["bob@example.org"])
    outer = parse_entity(copy.message)
    assert outer.get("From") is None and outer.get("Autocrypt") is None
    assert outer.get("Message-ID").value.endswith("@example.org>")
    result = decrypt(copy, BOB_KEY, store)
    assert SECRET in result.plaintext and result.signatures == ()
    assert not set(result.recipients) & set(alice(store).key_ids)


def test_eight_bit_headers_are_kept_and_protected(store, tmp_path):
    """Outcome: raw UTF-8 (RFC 6532) and even invalid 8-bit header bytes pass unchanged;
    the Subject is hidden in the encrypted copy; nothing raises."""
    raw = (
        "From: Jörg Müller <alice@example.org>\r\nTo: Bob <bob@example.org>, carol@example.org\r\n"
        "Subject: Grüße 🎉\r\n"
    ).encode() + b"X-Legacy: caf\xe9\r\n\r\nbody\r\n"
    encrypted, plain = run(store, tmp_path, raw, ["bob@example.org", "carol@example.org"])
    assert "Grüße".encode() not in encrypted.message
    assert "From: Jörg Müller <alice@example.org>".encode() in outer_header(encrypted)
    result = decrypt(encrypted, BOB_KEY, store)
    assert "Subject: Grüße 🎉".encode() in result.plaintext
    assert b"X-Legacy: caf\xe9" in result.plaintext
    assert [s.valid for s in result.signatures] == [True], "From is the account's: signed"
    assert b"X-Legacy: caf\xe9\r\n" in plain.message and "Grüße 🎉".encode() in plain.message


def test_bare_lf_and_bare_cr_become_crlf(store, tmp_path):
    """Outcome: canonical CRLF everywhere (RFC 5322); a smuggled "\\n.\\n" end of data
    becomes an ordinary "." line that the SMTP client dot-stuffs."""
    raw = (
        b"From: alice@example.org\nTo: bob@example.org, carol@example.org\nSubject: lf\n\n"
        b"one\ntwo\rthree\r\n.\nMAIL FROM:<x@evil.example>\n" + SECRET + b"\n"
    )
    encrypted, plain = run(store, tmp_path, raw, ["bob@example.org", "carol@example.org"])
    for copy in (encrypted, plain):
        assert only_crlf(copy.message)
    assert b"\r\none\r\ntwo\r\nthree\r\n.\r\nMAIL FROM:<x@evil.example>\r\n" in plain.message
    assert b"one\r\ntwo\r\nthree\r\n" in decrypt(encrypted, BOB_KEY, store).plaintext


def test_non_ascii_addresses_are_looked_up_and_kept_visible(store, tmp_path):
    """Outcome: policy and keys work for SMTPUTF8 addresses; a To recipient stays in the
    shared copy (not treated as Bcc); one without a key under encrypt=always is refused."""
    raw = "From: alice@example.org\r\nTo: Jörg <jörg@example.org>, bob@example.org\r\n\r\nhi\r\n"
    (copy,) = run(store, tmp_path, raw.encode(), ["jörg@example.org", "bob@example.org"])
    assert copy.kind == "encrypted" and copy.recipients == ("jörg@example.org", "bob@example.org")
    assert b"hi" in decrypt(copy, JOERG_KEY, store).plaintext
    config = make_config(tmp_path, {"address": {"zoë@example.org": {"encrypt": "always"}}})
    refusal = refusal_for_recipient("zoë@example.org", config.accounts[0], config.policy, store)
    assert refusal is not None and refusal.startswith("550 5.7.1 <zoë@example.org>")


def test_foreign_from_is_never_signed_even_when_policy_says_always(store, tmp_path):
    """Outcome: sent (the provider decides whether it may), encrypted as policy says,
    but never signed with the account's key and without Autocrypt."""
    raw = (
        b"From: Boss <boss@elsewhere.example>\r\n"
        b"To: bob@example.org, carol@example.org\r\n\r\nx\r\n"
    )
    policy = {"sign": "always"}
    encrypted, plain = run(store, tmp_path, raw, ["bob@example.org", "carol@example.org"], policy)
    assert plain.kind == "plain", "not 'signed': the key is not the sender's"
    for copy in (encrypted, plain):
        assert parse_entity(copy.message).get("Autocrypt") is None
    result = decrypt(encrypted, BOB_KEY, store)
    assert result.signatures == ()
    assert not set(result.recipients) & set(alice(store).key_ids)


# --------------------------------------------------------------------------- expired key


def test_recipient_key_that_expired_since_import(store, tmp_path):
    """Outcome: encrypt=always -> refused (550 at RCPT; 554 if it expires between RCPT
    and DATA); opportunistic -> sent plain, as to anyone without a usable key."""
    created = datetime.now(UTC) - timedelta(days=1)
    soon = ENGINE.generate_key(
        ["Carol <carol@example.org>"], created=created, expires_in=timedelta(days=1, seconds=2)
    )
    (outcome,) = store.import_keys(ENGINE.public_only(soon.data), "import:carol.asc")
    assert outcome.action == "added" and store.encryption_cert("carol@example.org")
    time.sleep(max(0.0, (soon.expires - datetime.now(UTC)).total_seconds()) + 0.5)
    assert store.encryption_cert("carol@example.org") is None
    raw = b"From: alice@example.org\r\nTo: carol@example.org\r\n\r\n" + SECRET + b"\r\n"
    always = {"address": {"carol@example.org": {"encrypt": "always"}}}
    config = make_config(tmp_path, always)
    refusal = refusal_for_recipient("carol@example.org", config.accounts[0], config.policy, store)
    assert refusal is not None and refusal.startswith("550 5.7.1")
    with pytest.raises(PolicyRefusal, match=r"^554 5\.7\.1 <carol@example\.org>"):
        run(store, tmp_path, raw, ["carol@example.org"], always)
    (copy,) = run(store, tmp_path, raw, ["carol@example.org"])
    assert copy.kind == "plain" and SECRET in copy.message
