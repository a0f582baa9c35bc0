"""Hostile mail on the decrypt path: pgpmime.classify and unwrap on mutated messages.

Real PGP/MIME, inline PGP and PGP/MIME signed messages (made with our own keys) are
mutated: bytes flipped in the armor, cut, boundaries duplicated, Content-Type
parameters changed, bare LF or CR, multipart/encrypted nested or wrapped, huge header
lines. Property: unwrap returns within a time limit (it never raises for bad mail); a
message it did not decrypt comes back exactly as stored, with the reason in .error when
it was encrypted; a message it did decrypt shows exactly a plaintext that was encrypted,
so ciphertext that fails its integrity check never releases anything.
test_incoming_hostile.py runs the same messages through IncomingProcessor.view_of.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from localproxy.crypto.openpgp import default_engine
from localproxy.crypto.pgpmime import (
    Kind,
    classify,
    encrypt_message,
    sign_message,
    unwrap,
)
from localproxy.mime import parse_entity, to_crlf
from tests.harness.hostile import mutations, time_limit

HOSTILE = settings(max_examples=200, deadline=2000)
MAX_OUTPUT = 1 << 20

ENGINE = default_engine()
ALICE = ENGINE.generate_key(["Alice <alice@example.org>"])
BOB = ENGINE.generate_key(["Bob <bob@example.org>"])
ALICE_PUB = ENGINE.public_only(ALICE.data)
BOB_PUB = ENGINE.public_only(BOB.data)

SECRET = b"The launch code is 7-7-3-1; keep it to yourself."
LETTER = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: plans\r\n"
    b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <h1@example.org>\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="in"\r\n\r\n'
    b"--in\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + SECRET + b"\r\n"
    b"--in\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64"
    b"\r\n\r\nAAECAwQ=\r\n--in--\r\n"
)
ENCRYPTED = bytes(encrypt_message(LETTER, ENGINE, [BOB_PUB], signer=ALICE.data))
INLINE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: inline\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    + to_crlf(ENGINE.encrypt(SECRET + b"\n", [BOB_PUB], signer=ALICE.data))
)
SIGNED = sign_message(LETTER, ENGINE, ALICE.data)
BOUNDARY = parse_entity(ENCRYPTED).params["boundary"].encode()
BASES = [ENCRYPTED, INLINE, SIGNED]


ARMOR = rb"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----"


def _armor(raw: bytes) -> bytes:
    match = re.search(ARMOR, raw, re.S)
    assert match is not None
    return match.group()


def _plaintext_bodies() -> frozenset[bytes]:
    """What a reader may ever see as the body of a decrypted view: each plaintext we
    encrypted, shown as PGP/MIME (its entity's body) or as inline PGP (all of it)."""
    bodies = set()
    for raw in (ENCRYPTED, INLINE):
        plaintext = to_crlf(ENGINE.decrypt(_armor(raw), [BOB.data]).plaintext)
        bodies |= {plaintext, parse_entity(plaintext).body}
    return frozenset(bodies)


PLAINTEXT_BODIES = _plaintext_bodies()
ENCRYPTED_KINDS = (Kind.PGP_ENCRYPTED, Kind.INLINE_ENCRYPTED)

FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"--",
    b"=",
    b"==\r\n",
    b"\x00",
    b"\xff\xfe",
    b" \t",
    b"--" + BOUNDARY + b"\r\n",
    b"\r\n--" + BOUNDARY + b"--\r\n",
    b"-----BEGIN PGP MESSAGE-----\r\n",
    b"-----END PGP MESSAGE-----\r\n",
    b"Version: 1\r\n",
    b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=x\r\n',
    b"Content-Type: application/pgp-encrypted\r\n",
    b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b'; boundary=""',
    b"; boundary*0*=utf-8''%FF%FE; boundary*1=x",
    b"; protocol*=''application%2Fpgp-encrypted",
    b"=?utf-8?b?////?=",
    b"X-Huge: " + b"a" * 100_000 + b"\r\n",
]


# --------------------------------------------------------------------------- transforms

Transform = Callable[[st.DrawFn, bytes], bytes]


def bare_line_ends(draw: st.DrawFn, raw: bytes) -> bytes:
    return raw.replace(b"\r\n", draw(st.sampled_from([b"\n", b"\r", b"\n\r"])))


def duplicated_boundary(draw: st.DrawFn, raw: bytes) -> bytes:
    line = b"--" + BOUNDARY + draw(st.sampled_from([b"\r\n", b"--\r\n", b"  \r\n"]))
    found = [raw.find(b"--" + BOUNDARY), raw.rfind(b"--" + BOUNDARY)]
    at = draw(st.sampled_from([p for p in found if p >= 0] + [len(raw) // 2]))
    return raw[:at] + line * draw(st.integers(1, 3)) + raw[at:]


def changed_parameters(draw: st.DrawFn, raw: bytes) -> bytes:
    """A Content-Type parameter of the outer message changed or repeated."""
    old = draw(st.sampled_from([b'protocol="application/pgp-encrypted"', b'boundary="' + BOUNDARY]))
    new = draw(
        st.sampled_from(
            [
                b"",
                b'protocol="application/pgp-signature"',
                b"PROTOCOL=APPLICATION/PGP-ENCRYPTED",
                b'protocol="application/pgp-encrypted"; protocol=x',
                b'boundary=""; boundary="' + BOUNDARY,
                b'boundary="' + BOUNDARY + b"x",
                b'boundary="' + BOUNDARY + b'"; boundary="other',
                b'boundary*0="' + BOUNDARY[:4] + b'"; boundary*1="' + BOUNDARY[4:],
                b'boundary="' + b"b" * 5000,
            ]
        )
    )
    return raw.replace(old, new, 1)


def nested(draw: st.DrawFn, raw: bytes) -> bytes:
    """The message inside another multipart/encrypted, or inside a multipart/mixed
    (EFAIL: nested ciphertext must never be decrypted), depth times."""
    outer = draw(
        st.sampled_from(
            [
                b'multipart/encrypted; protocol="application/pgp-encrypted"',
                b"multipart/mixed",
            ]
        )
    )
    control = b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
    for level in range(draw(st.sampled_from([1, 2, 60]))):
        boundary = b"n%d" % level
        head = b"Content-Type: " + outer + b"; boundary=" + boundary + b"\r\n\r\n"
        parts = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in (control, raw))
        raw = head + parts + b"--" + boundary + b"--\r\n"
    return raw


def payload_reencoded(draw: st.DrawFn, raw: bytes) -> bytes:
    """The armored payload in base64 or quoted-printable (valid, or mangled)."""
    match = re.search(ARMOR, raw, re.S)
    if match is None:  # a signed message
        return raw
    armor = match.group()
    cte = draw(st.sampled_from([b"base64", b"quoted-printable", b"x-unknown"]))
    encoded = base64.encodebytes(armor) if cte == b"base64" else armor.replace(b"=", b"=3D")
    if draw(st.booleans()):
        encoded = encoded[: len(encoded) // 2] + b"!*" + encoded[len(encoded) // 2 :]
    head = b"Content-Transfer-Encoding: " + cte + b"\r\n"
    return raw.replace(b"\r\n\r\n" + armor, b"\r\n" + head + b"\r\n" + encoded, 1)


def huge_header(draw: st.DrawFn, raw: bytes) -> bytes:
    size = draw(st.sampled_from([998, 100_000, 1_000_000]))
    field = draw(
        st.sampled_from(
            [
                b"X-Huge: " + b"a" * size + b"\r\n",
                b"Subject: x" + b"\r\n y" * (size // 100) + b"\r\n",
                b"Content-Type: multipart/encrypted; " + b"a=b; " * (size // 100) + b"\r\n",
            ]
        )
    )
    return field + raw


def many_parts(draw: st.DrawFn, raw: bytes) -> bytes:
    part = b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n"
    close = b"--" + BOUNDARY + b"--"
    return raw.replace(close, part * draw(st.sampled_from([3, 5000])) + close, 1)


TRANSFORMS: list[Transform] = [
    bare_line_ends,
    duplicated_boundary,
    changed_parameters,
    nested,
    payload_reencoded,
    huge_header,
    many_parts,
]


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    """A real message, changed by 0-2 structural transforms, then maybe by byte edits."""
    raw = draw(st.sampled_from(BASES))
    for transform in draw(st.lists(st.sampled_from(TRANSFORMS), max_size=2)):
        raw = transform(draw, raw)
    if draw(st.booleans()):
        raw = draw(mutations(raw, FRAGMENTS, max_steps=3))
    return raw


_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@st.composite
def armor_flips(draw: st.DrawFn) -> bytes:
    """An encrypted message with 1-3 characters of its armor replaced by other base64
    characters: the armor still decodes, to ciphertext that is no longer what was sent."""
    raw = bytearray(draw(st.sampled_from([ENCRYPTED, INLINE])))
    start = raw.index(b"-----BEGIN PGP MESSAGE-----") + 30
    end = raw.index(b"-----END PGP MESSAGE-----")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(start, end - 1))
        if raw[at] in _BASE64:
            raw[at] = draw(st.sampled_from([c for c in _BASE64 if c != raw[at]]))
    return bytes(raw)


# --------------------------------------------------------------------------- property


def check_unwrap(raw: bytes) -> None:
    with time_limit():
        kind = classify(parse_entity(raw))
        result = unwrap(raw, ENGINE, [BOB.data], [ALICE_PUB], max_output=MAX_OUTPUT)
    assert result.kind == kind
    assert len(result.message) <= len(raw) + MAX_OUTPUT, "memory bounded"
    if result.decrypted:
        assert result.kind in ENCRYPTED_KINDS and result.error is None
        assert parse_entity(result.message).body in PLAINTEXT_BODIES, "altered plaintext"
    else:
        assert result.message == raw, "not decrypted, so served exactly as stored"
        if kind in ENCRYPTED_KINDS:
            assert result.error, "an encrypted message that stays encrypted says why"


def test_the_unmutated_messages_decrypt_and_verify():
    """The property's baseline: the bases themselves decrypt (or verify)."""
    for raw in (ENCRYPTED, INLINE):
        result = unwrap(raw, ENGINE, [BOB.data], [ALICE_PUB], max_output=MAX_OUTPUT)
        assert result.decrypted and SECRET in result.message
        assert [s.valid for s in result.signatures] == [True]
    assert unwrap(SIGNED, ENGINE, [], [ALICE_PUB]).signatures[0].valid


@HOSTILE
@given(hostile_messages())
@example(ENCRYPTED.replace(b"\r\n", b"\n"))
@example(ENCRYPTED[: len(ENCRYPTED) // 2])
@example(INLINE.replace(b"\r\n", b"\n\r"))  # found by this suite, see below
def test_mutated_messages_are_decrypted_whole_or_served_as_stored(raw: bytes):
    check_unwrap(raw)


@HOSTILE
@given(armor_flips())
def test_flipped_armor_releases_no_altered_plaintext(raw: bytes):
    check_unwrap(raw)


@settings(max_examples=60, deadline=2000)
@given(st.binary(max_size=2000))
def test_random_bytes_after_a_pgp_mime_header(noise: bytes):
    check_unwrap(ENCRYPTED.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" + noise)


# --------------------------------------------------------------------------- regressions

FORGED = b"X-Note: hi\r\r\nWire the money to account 666.\r\n"


@pytest.mark.parametrize("base", [ENCRYPTED, INLINE], ids=["pgp-mime", "inline"])
def test_lines_without_a_field_name_stay_out_of_the_decrypted_view(base: bytes):
    """A line "X: a\\r\\r\\n" splits into a field and a lone "\\r\\n", which the view used
    to copy as a blank line: the forged lines after it began the decrypted body."""
    at = base.index(b"To: ")
    result = unwrap(base[:at] + FORGED + base[at:], ENGINE, [BOB.data], [ALICE_PUB])
    assert result.decrypted and result.signatures[0].valid
    header = result.message.split(b"\r\n\r\n", 1)[0]
    assert b"X-Note: hi\r\n" in header and b"Content-Type: " in header
    assert b"Wire the money" not in result.message
    assert parse_entity(result.message).body in PLAINTEXT_BODIES
