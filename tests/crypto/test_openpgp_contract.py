"""The OpenPGP engine contract: every engine in ENGINES must pass all of this.

Messages the engines must refuse (no MDC, bad MDC, compression bombs, anonymous
recipients) are crafted with the independent helpers in tests/crypto/__init__.py.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.crypto.errors import (
    BadPassphrase,
    CryptoError,
    DecryptionFailed,
    IntegrityError,
    KeyExpired,
    KeyLocked,
    KeyRevoked,
    MalformedData,
    NeedsWorker,
    NoUsableKey,
    OutputTooLarge,
)
from localproxy.crypto.openpgp import (
    ENGINES,
    CertInfo,
    OpenPGPEngine,
    SignatureStatus,
    default_engine,
    inline_only,
)
from tests.crypto import (
    bomb,
    compressed,
    encrypt_raw,
    encrypt_raw_v2,
    features,
    inline_signed,
    join,
    literal,
    packet,
    packets,
    seipd,
    without,
)

MESSAGE = "Grüße from the contract tests\r\n".encode() * 40
VALID, INVALID = SignatureStatus.VALID, SignatureStatus.INVALID
UNKNOWN_KEY = SignatureStatus.UNKNOWN_KEY


@dataclass(frozen=True)
class Party:
    info: CertInfo
    public: bytes

    @property
    def secret(self) -> bytes:
        return self.info.data

    @property
    def fpr(self) -> str:
        return self.info.fingerprint


def make_party(engine: OpenPGPEngine, user_id: str, **options: object) -> Party:
    info = engine.generate_key([user_id], **options)  # type: ignore[arg-type]
    return Party(info, engine.public_only(info.data))


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> OpenPGPEngine:
    return ENGINES[request.param]()


@pytest.fixture(scope="module")
def alice(engine: OpenPGPEngine) -> Party:
    return make_party(engine, "Alice <Alice@Example.ORG>")


@pytest.fixture(scope="module")
def bob(engine: OpenPGPEngine) -> Party:
    return make_party(engine, "Bob <bob@example.org>")


@pytest.fixture(scope="module")
def carol(engine: OpenPGPEngine) -> Party:
    return make_party(engine, "carol@example.net")


def now() -> datetime:
    return datetime.now(UTC)


def survives(call: Callable[[], object]) -> None:
    """A result or a CryptoError are both fine; anything else fails the test."""
    with contextlib.suppress(CryptoError):
        call()


def test_default_engine_is_registered() -> None:
    assert default_engine().name in ENGINES


# --------------------------------------------------------------------------- keys


def test_generated_key_is_described(alice: Party) -> None:
    info = alice.info
    assert re.fullmatch(r"[0-9A-F]{40}", info.fingerprint)
    assert info.user_ids == ("Alice <Alice@Example.ORG>",)
    assert info.emails == ("Alice@example.org",), "domain lower-cased, local part kept"
    assert info.algorithm == "EdDSA/Ed25519 + ECDH/Cv25519"
    assert info.can_encrypt and info.can_sign
    assert info.has_secret and not info.secret_locked
    assert not info.revoked and info.expires is None
    assert abs(info.created - now()) < timedelta(minutes=1)
    assert len(info.subkey_fingerprints) == 1
    assert info.key_ids == (info.fingerprint[-16:], info.subkey_fingerprints[0][-16:])
    assert "data" not in repr(info), "secret key material stays out of logs"
    assert info.problem is None


def test_generated_keys_advertise_mdc_only(alice: Party, engine: OpenPGPEngine) -> None:
    # GnuPG 2.4 answers the AEAD flag (0x02) with OCB packets others cannot read, and
    # SEIPDv2 (0x08) makes Sequoia senders use what GnuPG 2.2 and RNP 0.16 cannot read.
    found = features(alice.public)
    assert found and all(value == b"\x01" for value in found)
    locked = engine.generate_key(["Locked <locked@example.org>"], passphrase="pw")
    assert all(value == b"\x01" for value in features(engine.public_only(locked.data)))


def test_user_ids_and_expiry(engine: OpenPGPEngine) -> None:
    info = engine.generate_key(
        ["bare@Example.COM", "Name (note) <x.y@Sub.Example.org>", "No Address"],
        expires_in=timedelta(days=30),
    )
    assert info.emails == ("bare@example.com", "x.y@sub.example.org")
    assert info.expires is not None
    assert abs(info.expires - (info.created + timedelta(days=30))) < timedelta(seconds=2)
    assert info.can_encrypt


@pytest.mark.parametrize("user_ids", [[], [""], ["two\nlines"]])
def test_generate_refuses_bad_user_ids(engine: OpenPGPEngine, user_ids: list[str]) -> None:
    with pytest.raises(ValueError):
        engine.generate_key(user_ids)


def test_public_and_secret_keys_round_trip(engine: OpenPGPEngine, alice: Party) -> None:
    for data in (alice.public, engine.armor(alice.public, kind="public-key")):
        (info,) = engine.parse_certs(data)
        assert info.fingerprint == alice.fpr and info.data == alice.public
        assert not info.has_secret and info.can_encrypt
    (secret,) = engine.parse_certs(engine.armor(alice.secret, kind="secret-key"))
    assert secret.has_secret and secret.fingerprint == alice.fpr


def test_keyring_with_several_certs(
    engine: OpenPGPEngine, alice: Party, bob: Party, carol: Party
) -> None:
    ring = alice.public + bob.secret + carol.public
    infos = engine.parse_certs(engine.armor(ring, kind="public-key"))
    assert [i.fingerprint for i in infos] == [alice.fpr, bob.fpr, carol.fpr]
    assert [i.has_secret for i in infos] == [False, True, False]
    blocks = (
        engine.armor(alice.public, "public-key") + b"\n" + engine.armor(bob.public, "public-key")
    )
    assert [i.fingerprint for i in engine.parse_certs(blocks)] == [alice.fpr, bob.fpr]
    assert engine.public_only(ring) == alice.public + bob.public + carol.public


def test_armor_kinds(engine: OpenPGPEngine, alice: Party) -> None:
    headers = {
        "message": b"PGP MESSAGE",
        "public-key": b"PGP PUBLIC KEY BLOCK",
        "secret-key": b"PGP PRIVATE KEY BLOCK",
        "signature": b"PGP SIGNATURE",
    }
    for kind, header in headers.items():
        armored = engine.armor(alice.public, kind=kind)
        assert armored.startswith(b"-----BEGIN " + header + b"-----")
        assert engine.armor(armored, kind=kind) == armored
    with pytest.raises(ValueError):
        engine.armor(alice.public, kind="bogus")


# --------------------------------------------------------------------------- encrypt, decrypt


def test_round_trip_without_signature(engine: OpenPGPEngine, bob: Party) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public])
    assert ciphertext.startswith(b"-----BEGIN PGP MESSAGE-----")
    result = engine.decrypt(ciphertext, [bob.secret])
    assert result.plaintext == MESSAGE and result.signatures == ()
    assert result.decrypted_with == bob.info.subkey_fingerprints[0]
    assert result.recipients == (bob.info.key_ids[1],)


def test_round_trip_signed(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public], signer=alice.secret, armor=False)
    assert ciphertext[0] & 0x80, "binary when asked"
    result = engine.decrypt(ciphertext, [engine.armor(bob.secret, "secret-key")], [alice.public])
    assert result.plaintext == MESSAGE
    (signature,) = result.signatures
    assert signature.status is VALID and signature.valid
    assert signature.fingerprint == alice.fpr and signature.key_id in alice.info.key_ids


@pytest.mark.parametrize("spooled", [False, True], ids=["in-memory", "spooled"])
def test_encrypt_armored_from_pieces(
    engine: OpenPGPEngine,
    alice: Party,
    bob: Party,
    spooled: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path,
) -> None:
    """Pieces in, prefix + CRLF armor out; large input goes through files, of which only
    the ciphertext one is on disk, and none is left behind."""
    openpgp = __import__("localproxy.crypto.openpgp", fromlist=["x"])
    monkeypatch.setattr(openpgp, "SPOOL_THRESHOLD", 0 if spooled else 1 << 40)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    written: list[bytes] = []
    encrypt_file = openpgp.pysequoia.encrypt_file

    def watched(source: str, target: str, *args: object, **kwargs: object) -> None:
        encrypt_file(source, target, *args, **kwargs)
        written.extend(p.read_bytes() for p in tmp_path.iterdir())

    monkeypatch.setattr(openpgp.pysequoia, "encrypt_file", watched)
    pieces = [b"Subject: pieces\r\n", b"\r\n", memoryview(MESSAGE)[:7], memoryview(MESSAGE)[7:]]
    built = engine.encrypt_armored(pieces, [bob.public], signer=alice.secret, prefix=b"HEAD\r\n")
    assert isinstance(built, bytearray) and built.startswith(b"HEAD\r\n-----BEGIN PGP MESSAGE")
    armor = bytes(built[6:])
    assert armor.count(b"\n") == armor.count(b"\r\n"), "CRLF line ends only"
    result = engine.decrypt(armor, [bob.secret], [alice.public])
    assert result.plaintext == b"Subject: pieces\r\n\r\n" + MESSAGE
    assert [s.status for s in result.signatures] == [VALID]
    assert bool(written) == spooled
    plain = b"from the contract tests"
    assert all(plain not in data and data[0] & 0x80 for data in written), "ciphertext only"
    assert list(tmp_path.iterdir()) == []


def test_unknown_signer_still_decrypts(
    engine: OpenPGPEngine, alice: Party, bob: Party, carol: Party
) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public], signer=alice.secret)
    for certs in ((), (carol.public,)):
        result = engine.decrypt(ciphertext, [bob.secret], certs)
        assert result.plaintext == MESSAGE
        (signature,) = result.signatures
        assert signature.status is UNKNOWN_KEY and signature.key_id in alice.info.key_ids


def test_certificates_can_be_looked_up_on_demand(
    engine: OpenPGPEngine, alice: Party, bob: Party
) -> None:
    asked: list[str] = []

    def lookup(handles: object) -> list[bytes]:
        asked.extend(handles)  # type: ignore[call-overload]
        return [alice.public]

    ciphertext = engine.encrypt(MESSAGE, [bob.public], signer=alice.secret)
    (signature,) = engine.decrypt(ciphertext, [bob.secret], lookup).signatures
    assert signature.status is VALID
    assert any(h in (alice.fpr, alice.info.key_ids[0]) for h in asked)


def test_multiple_recipients(engine: OpenPGPEngine, alice: Party, bob: Party, carol: Party) -> None:
    ciphertext = engine.encrypt(MESSAGE, [alice.public, bob.public, carol.secret, bob.public])
    for party in (alice, bob, carol):
        result = engine.decrypt(ciphertext, [party.secret])
        assert result.plaintext == MESSAGE
        assert len(result.recipients) == 3, "duplicates are encrypted to once"


@pytest.mark.parametrize("plaintext", [b"", bytes(range(256)) * 3, os.urandom(3 << 20)])
def test_any_plaintext(engine: OpenPGPEngine, bob: Party, plaintext: bytes) -> None:
    ciphertext = engine.encrypt(plaintext, [bob.public], armor=False)
    assert engine.decrypt(ciphertext, [bob.secret]).plaintext == plaintext


def test_wrong_key_names_the_recipients(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public])
    with pytest.raises(DecryptionFailed) as caught:
        engine.decrypt(ciphertext, [alice.secret])
    assert caught.value.recipients == (bob.info.key_ids[1],)
    assert bob.info.key_ids[1] in str(caught.value)
    with pytest.raises(DecryptionFailed):
        engine.decrypt(ciphertext, [bob.public])  # a public key cannot decrypt


@pytest.mark.parametrize("from_end", [1, 10, 21, 22, 23, 300, 900])
def test_tampered_ciphertext_releases_nothing(
    engine: OpenPGPEngine, alice: Party, bob: Party, from_end: int
) -> None:
    ciphertext = bytearray(engine.encrypt(MESSAGE, [bob.public], signer=alice.secret, armor=False))
    ciphertext[-from_end] ^= 0x01
    with pytest.raises(IntegrityError):
        engine.decrypt(bytes(ciphertext), [bob.secret], [alice.public])


def test_crafted_messages_decrypt(engine: OpenPGPEngine, bob: Party) -> None:
    # The helpers build real messages, so the refusals below are about integrity alone.
    message = encrypt_raw(bob.public, literal(b"crafted"))
    assert engine.decrypt(message, [bob.secret]).plaintext == b"crafted"


def test_message_without_mdc_is_refused(engine: OpenPGPEngine, bob: Party) -> None:
    message = encrypt_raw(bob.public, literal(b"EFAIL"), integrity=False)
    with pytest.raises(IntegrityError, match="integrity"):
        engine.decrypt(message, [bob.secret])


def test_wrong_mdc_is_refused(engine: OpenPGPEngine, bob: Party) -> None:
    message = encrypt_raw(bob.public, literal(b"forged"), mdc=bytes(20))
    with pytest.raises(IntegrityError):
        engine.decrypt(message, [bob.secret])


def test_anonymous_recipient(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    message = encrypt_raw(bob.public, literal(b"hidden recipient"), anonymous=True)
    result = engine.decrypt(message, [alice.secret, bob.secret])
    assert result.plaintext == b"hidden recipient" and result.recipients == ("anonymous",)


def test_passphrase_only_message(engine: OpenPGPEngine, bob: Party) -> None:
    skesk = packet(3, b"\x04\x09\x00\x08")  # v4, AES-256, simple S2K with SHA-256
    message = skesk + seipd(os.urandom(32), literal(b"x"))
    with pytest.raises(DecryptionFailed, match="passphrase"):
        engine.decrypt(message, [bob.secret])


def test_signed_message_is_not_an_encrypted_one(engine: OpenPGPEngine, alice: Party) -> None:
    signed = inline_signed(b"x", engine.sign_detached(b"x", alice.secret, armor=False))
    with pytest.raises(MalformedData):
        engine.decrypt(signed, [alice.secret])
    with pytest.raises(MalformedData):
        engine.verify_inline(engine.encrypt(b"x", [alice.public]), [alice.public])


@pytest.mark.parametrize("algo", [1, 2, 3])
def test_compressed_signed_messages_verify(
    engine: OpenPGPEngine, alice: Party, bob: Party, algo: int
) -> None:
    # What GnuPG and RNP send by default: encrypted(compressed(signed(literal))).
    signed = inline_signed(MESSAGE, engine.sign_detached(MESSAGE, alice.secret, armor=False))
    message = encrypt_raw(bob.public, compressed(signed, algo))
    result = engine.decrypt(message, [bob.secret], [alice.public])
    assert result.plaintext == MESSAGE
    assert [s.status for s in result.signatures] == [VALID]


@pytest.fixture(scope="module")
def bombs() -> dict[int, bytes]:
    return {2: bomb(256 << 20, 2), 3: bomb(64 << 20, 3)}


@pytest.mark.parametrize("seipd", [1, 2])
@pytest.mark.parametrize("algo", [2, 3])
def test_compression_bomb_is_capped(
    engine: OpenPGPEngine, bob: Party, bombs: dict[int, bytes], algo: int, seipd: int
) -> None:
    if seipd == 1:
        message = encrypt_raw(bob.public, bombs[algo])
    else:  # 4 MiB chunks; Sequoia would expand this without a bound
        message = encrypt_raw_v2(bob.public, bombs[algo], chunk_octet=16)
    assert len(message) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(OutputTooLarge):
            engine.decrypt(message, [bob.secret], max_output=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, "a real bound, not decompress-then-check"


def test_nested_compression_is_bounded(engine: OpenPGPEngine, bob: Party) -> None:
    inner = literal(b"deep")
    for _ in range(40):
        inner = compressed(inner)
    with pytest.raises(MalformedData):
        engine.decrypt(encrypt_raw(bob.public, inner), [bob.secret])


def test_output_limit(engine: OpenPGPEngine, bob: Party) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public])
    assert engine.decrypt(ciphertext, [bob.secret], max_output=len(MESSAGE)).plaintext == MESSAGE
    with pytest.raises(OutputTooLarge):
        engine.decrypt(ciphertext, [bob.secret], max_output=len(MESSAGE) - 1)


def test_encrypt_needs_recipients(engine: OpenPGPEngine, alice: Party) -> None:
    with pytest.raises(NoUsableKey):
        engine.encrypt(b"x", [])
    signing_only = without(alice.public, {14})
    (info,) = engine.parse_certs(signing_only)
    assert not info.can_encrypt and info.can_sign
    assert info.problem is not None and "encryption" in info.problem
    with pytest.raises(NoUsableKey) as caught:
        engine.encrypt(b"x", [signing_only])
    assert caught.value.fingerprint == alice.fpr and alice.fpr in str(caught.value)


# --------------------------------------------------------------------------- signatures


def test_detached_signatures(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    signature = engine.sign_detached(MESSAGE, alice.secret)
    assert signature.startswith(b"-----BEGIN PGP SIGNATURE-----")
    assert engine.micalg(signature) in {"pgp-sha256", "pgp-sha384", "pgp-sha512"}
    (good,) = engine.verify_detached(MESSAGE, signature, [alice.public])
    assert good.status is VALID and good.fingerprint == alice.fpr
    assert good.created is not None and abs(good.created - now()) < timedelta(minutes=1)
    (bad,) = engine.verify_detached(MESSAGE + b"!", signature, [alice.public])
    assert bad.status is INVALID and bad.fingerprint == alice.fpr
    for certs in ((), (bob.public,)):
        (unknown,) = engine.verify_detached(MESSAGE, signature, certs)
        assert unknown.status is UNKNOWN_KEY and unknown.key_id in alice.info.key_ids
    binary = engine.sign_detached(MESSAGE, alice.secret, armor=False)
    assert [r.status for r in engine.verify_detached(MESSAGE, binary, [alice.public])] == [VALID]


def test_several_signatures_in_one_block(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    both = engine.sign_detached(MESSAGE, alice.secret, armor=False) + engine.sign_detached(
        MESSAGE, bob.secret, armor=False
    )
    results = engine.verify_detached(MESSAGE, both, [alice.public])
    assert [(r.status, r.fingerprint) for r in results] == [
        (VALID, alice.fpr),
        (UNKNOWN_KEY, results[1].fingerprint),
    ]


def test_inline_signed_messages(engine: OpenPGPEngine, alice: Party) -> None:
    signed = inline_signed(MESSAGE, engine.sign_detached(MESSAGE, alice.secret, armor=False))
    for variant in (signed, engine.armor(signed), compressed(signed, 1)):
        content, results = engine.verify_inline(variant, [alice.public])
        assert content == MESSAGE and [r.status for r in results] == [VALID]
    forged = signed.replace(b"contract", b"CONTRACT")
    content, results = engine.verify_inline(forged, [alice.public])
    assert [r.status for r in results] == [INVALID]
    content, results = engine.verify_inline(literal(b"plain"), [alice.public])
    assert (content, results) == (b"plain", ())


# --------------------------------------------------------------------------- expiry, revocation


def test_expired_key(engine: OpenPGPEngine) -> None:
    old = make_party(
        engine,
        "Old <old@example.org>",
        created=now() - timedelta(days=10),
        expires_in=timedelta(days=1),
    )
    assert old.info.expires is not None and old.info.expires < now()
    assert not old.info.can_encrypt and not old.info.can_sign
    assert old.info.problem is not None and "expired" in old.info.problem
    with pytest.raises(KeyExpired) as caught:
        engine.encrypt(b"x", [old.public])
    assert caught.value.fingerprint == old.fpr and old.fpr in str(caught.value)
    with pytest.raises(KeyExpired):
        engine.sign_detached(b"x", old.secret)
    # Mail that arrived while the key was valid stays readable.
    message = encrypt_raw(old.public, literal(b"old mail"))
    assert engine.decrypt(message, [old.secret]).plaintext == b"old mail"


def test_signature_by_a_key_that_expired_since(engine: OpenPGPEngine) -> None:
    soon = make_party(
        engine,
        "Soon <soon@example.org>",
        created=now() - timedelta(seconds=60),
        expires_in=timedelta(seconds=62),
    )
    signature = engine.sign_detached(MESSAGE, soon.secret)
    assert [r.status for r in engine.verify_detached(MESSAGE, signature, [soon.public])] == [VALID]
    assert soon.info.expires is not None
    time.sleep(max(0.0, (soon.info.expires - now()).total_seconds()) + 1.1)
    (result,) = engine.verify_detached(MESSAGE, signature, [soon.public])
    assert result.status is SignatureStatus.EXPIRED and "good signature" in result.detail


def test_revoked_key(engine: OpenPGPEngine, bob: Party) -> None:
    party = make_party(engine, "Rev <rev@example.org>")
    signature = engine.sign_detached(MESSAGE, party.secret)
    earlier = engine.encrypt(b"before revocation", [party.public])
    revoked = engine.revoke(party.secret)
    (info,) = engine.parse_certs(revoked)
    assert info.revoked and info.has_secret and not info.can_encrypt
    assert info.problem is not None and "revoked" in info.problem
    public = engine.public_only(revoked)
    with pytest.raises(KeyRevoked) as caught:
        engine.encrypt(b"x", [bob.public, public])
    assert caught.value.fingerprint == party.fpr
    with pytest.raises(KeyRevoked):
        engine.sign_detached(b"x", revoked)
    (result,) = engine.verify_detached(MESSAGE, signature, [public])
    assert result.status is SignatureStatus.REVOKED
    assert engine.decrypt(earlier, [revoked]).plaintext == b"before revocation"


# --------------------------------------------------------------------------- passphrases


def test_passphrase_protection(engine: OpenPGPEngine) -> None:
    info = engine.generate_key(["Locked <locked@example.org>"], passphrase="correct horse")
    assert info.has_secret and info.secret_locked
    public = engine.public_only(info.data)
    ciphertext = engine.encrypt(MESSAGE, [public])
    with pytest.raises(KeyLocked):
        engine.decrypt(ciphertext, [info.data])
    with pytest.raises(KeyLocked):
        engine.sign_detached(b"x", info.data)
    with pytest.raises(BadPassphrase):
        engine.unlock(info.data, "wrong horse")
    unlocked = engine.unlock(info.data, "correct horse")
    assert not engine.parse_certs(unlocked)[0].secret_locked
    assert engine.decrypt(ciphertext, [unlocked]).plaintext == MESSAGE
    assert engine.unlock(unlocked, "anything") == unlocked, "nothing to unlock"
    relocked = engine.protect(unlocked, "pässwörd ✓")
    assert engine.parse_certs(relocked)[0].secret_locked
    with pytest.raises(BadPassphrase):
        engine.unlock(relocked, "correct horse")
    assert engine.decrypt(ciphertext, [engine.unlock(relocked, "pässwörd ✓")]).plaintext == MESSAGE
    with pytest.raises(BadPassphrase):
        engine.protect(unlocked, "")
    with pytest.raises(KeyLocked):
        engine.protect(relocked, "again")
    with pytest.raises(NoUsableKey):
        engine.unlock(public, "x")


# --------------------------------------------------------------------------- merge


def test_merge_adds_a_new_subkey(engine: OpenPGPEngine, alice: Party) -> None:
    without_subkey = without(alice.public, {14})
    assert not engine.parse_certs(without_subkey)[0].can_encrypt
    merged = engine.merge(without_subkey, alice.public)
    assert merged.can_encrypt and merged.subkey_fingerprints == alice.info.subkey_fingerprints
    assert engine.merge(alice.public, without_subkey).can_encrypt, "merged, not replaced"


def test_merge_adds_a_revocation_and_keeps_user_ids(engine: OpenPGPEngine) -> None:
    info = engine.generate_key(["One <one@example.org>", "Two <two@example.org>"])
    public = engine.public_only(info.data)
    update = without(engine.public_only(engine.revoke(info.data)), set(), b"Two <two@example.org>")
    assert engine.parse_certs(update)[0].user_ids == ("One <one@example.org>",)
    merged = engine.merge(public, update)
    assert merged.revoked and not merged.can_encrypt
    assert set(merged.user_ids) == {"One <one@example.org>", "Two <two@example.org>"}
    assert not merged.has_secret


def test_merge_keeps_secret_material(engine: OpenPGPEngine, alice: Party) -> None:
    assert engine.merge(alice.secret, alice.public).has_secret
    assert engine.merge(alice.public, alice.secret).has_secret


def test_merge_refuses_another_key(engine: OpenPGPEngine, alice: Party, bob: Party) -> None:
    with pytest.raises(MalformedData):
        engine.merge(alice.public, bob.public)


# --------------------------------------------------------------------------- SEIPDv2

# A Sequoia-native key (it advertises SEIPDv2) and a signed SEIPDv2 message to it, as
# another Sequoia-based sender would send it; generated once with pysequoia 0.1.35.
V2_KEY = b"""\
-----BEGIN PGP PRIVATE KEY BLOCK-----
Comment: 9418 2607 0801 36F9 71D7  1826 1FD9 9505 7BCB 2CD0
Comment: V2 Recipient <v2@example.org>

xVgEawdOFRYJKwYBBAHaRw8BAQdAJodw28JuX0H1HjymJvlyy0iE5F/KyUfwty5K
XI8XoI0AAQCbSMQmSyTat3l6QepSYQoOqEq7ddswROKBUwkTO4uCGA1awsALBB8W
CgB9BYJrB04VAwsJBwkQH9mVBXvLLNBHFAAAAAAAHgAgc2FsdEBub3RhdGlvbnMu
c2VxdW9pYS1wZ3Aub3Jn6B9hMP3U2ZA3e2MyFesEdV9sCbK3Lo1ZSTqR2VAmYJ8D
FQoIApsBAh4JFiEElBgmBwgBNvlx1xgmH9mVBXvLLNAAAN0UAQCItWpYDD7YHZ9R
Wte5J0yy5p/gJI2AbZig8kGVG/MpuwD/WpgBSeI7AKH4X3SAVde26vULDFPUd948
INZaxR9VoQTNHVYyIFJlY2lwaWVudCA8djJAZXhhbXBsZS5vcmc+wsAOBBMWCgCA
BYJrB04VAwsJBwkQH9mVBXvLLNBHFAAAAAAAHgAgc2FsdEBub3RhdGlvbnMuc2Vx
dW9pYS1wZ3Aub3JnEmh67nwqSBIw2Pbl9euIp+IcQIAiDl/xery7ImmWkhIDFQoI
ApkBApsBAh4JFiEElBgmBwgBNvlx1xgmH9mVBXvLLNAAABz0AQCmKVKedlvmafwA
vN9Vm7h+L0FxqABt8fVhX12QnnV3ngD/Uy8HS6jvrIHirMb0PghH67bCWJvdp0hq
NQV75TDpqwDHWARrB04VFgkrBgEEAdpHDwEBB0AyxR25DWRnlTcO5qBEcRsnTzyT
PeNTKVpc5j8U7trYYAABAN2bQHdGWqY9hdNu3VLZ4uskDpiG4TbUnyha1OG6hYj/
EiXCwL8EGBYKATEFgmsHThUJEB/ZlQV7yyzQRxQAAAAAAB4AIHNhbHRAbm90YXRp
b25zLnNlcXVvaWEtcGdwLm9yZ7DXj6yvnGhmb5BGip4HEhWWf9kMfzSMpO0lN2qD
IKpZApsCvqAEGRYKAG8FgmsHThUJEKwYRcMktRk+RxQAAAAAAB4AIHNhbHRAbm90
YXRpb25zLnNlcXVvaWEtcGdwLm9yZ8q6yw6G38o2pKPFQkQcbb1FAqg63h4pfTDd
8F4T3Z1SFiEExb+u/qNnj7X06CtOrBhFwyS1GT4AAJu6AQCwrUVPbxC4kEWd2LcN
jlI/Wjy6tXKOTzFYcG0lwlqKIwEA64AmVWFpWcPmXDtDtWjHy/ChmOjMg9f5wOvV
9yTkNw0WIQSUGCYHCAE2+XHXGCYf2ZUFe8ss0AAAIAEA/iWQvp5MmYyiVGGNEd03
bjceFcM/NyTuXxw7cYFoCAM3AQCI2DEcBdrrtoni8csJIyeJ9JPaxdiGpUL+y/Hq
JdweAsddBGsHThUSCisGAQQBl1UBBQEBB0AI+Pmdv445ih58pdFRfnfTAt1ld3Jl
ANGZifNghtjUSQMBCAcAAP9MJtTHOee1BRO5schJfMfROEHL3L9vsmKlugxcquec
kBJuwsAABBgWCgByBYJrB04VCRAf2ZUFe8ss0EcUAAAAAAAeACBzYWx0QG5vdGF0
aW9ucy5zZXF1b2lhLXBncC5vcmeTxH6tfEThnxNycNwDX/T43F10S9XIn/WM/Usi
UPJCbwKbDBYhBJQYJgcIATb5cdcYJh/ZlQV7yyzQAADjIwEAwCwNJmz94T7C16+R
bz6CJeacrHDZJ+TKSfNjCdfOMF4BAOEPZ7JCxFzlWDprJ5n1p5v4kLi/eWTV1Ne6
uGoW2KwF
=lXpf
-----END PGP PRIVATE KEY BLOCK-----
"""
V2_SENDER = b"""\
-----BEGIN PGP PUBLIC KEY BLOCK-----
Comment: 62CC EE92 ABDF EAB4 6376  22CD 30CF EAD4 4109 CAF5
Comment: V2 Sender <v2sender@example.org>

xjMEawdOFRYJKwYBBAHaRw8BAQdASe4Dve9UDAno/V6TtmPFZ9+LzwSoBUT+MHEB
xLBlJ4/CwAsEHxYKAH0FgmsHThUDCwkHCRAwz+rUQQnK9UcUAAAAAAAeACBzYWx0
QG5vdGF0aW9ucy5zZXF1b2lhLXBncC5vcmf2xnYYid6cl0wZa9zrmV2b+VbEning
U9+yoixgzr/5hQMVCggCmwECHgkWIQRizO6Sq9/qtGN2Is0wz+rUQQnK9QAAJhUB
AOeEWEQyn/eEWwLSHSindMy2DNziiVclTeY7rfSlwztiAP4ysXzmgtvAcL2PYSty
c7aAEmDDeIOxxiO6twGBfGx9Bc0gVjIgU2VuZGVyIDx2MnNlbmRlckBleGFtcGxl
Lm9yZz7CwA4EExYKAIAFgmsHThUDCwkHCRAwz+rUQQnK9UcUAAAAAAAeACBzYWx0
QG5vdGF0aW9ucy5zZXF1b2lhLXBncC5vcmeTk6srlCxLMO9vZmnu+HNzSkLf1yrh
Katp34KCHpjbOQMVCggCmQECmwECHgkWIQRizO6Sq9/qtGN2Is0wz+rUQQnK9QAA
ejwBAOylrW+F2yR/SnZL9KFdOa5t3EjhbZMqjkssSuX35JtBAP9DCo8RSTG3ZTWM
pKh2Wl7e1n8BvgPAXDL/+hJlJgIrDM4zBGsHThUWCSsGAQQB2kcPAQEHQKgRh5MY
LI5aMSEy3fIp+5UQ0oWo4yRYRMhsUJHkjEapwsC/BBgWCgExBYJrB04VCRAwz+rU
QQnK9UcUAAAAAAAeACBzYWx0QG5vdGF0aW9ucy5zZXF1b2lhLXBncC5vcmckVWyq
pvFzzCzgEBH/lhkrsmASl9w7TN2hy2eY6hm6bQKbAr6gBBkWCgBvBYJrB04VCRBX
qWkkxO61L0cUAAAAAAAeACBzYWx0QG5vdGF0aW9ucy5zZXF1b2lhLXBncC5vcmeD
5TwJV8rYKhGzo6sei9Rmc+VvVdrxI3u76FQoipOe+RYhBKS9HnGeHCwnWuqlU1ep
aSTE7rUvAACs5wEAsZVoOKtwgYZyTI6GYcHaS99lqyGvBfsTwjT1qszxhH8BAOwX
W1DW+Hljo+6BCdpafnkOaKmBu2vnHUXA3YmhZ0YIFiEEYszukqvf6rRjdiLNMM/q
1EEJyvUAAKbvAP9ac3xTiyojanQdZMEpW6TLFUixavWRPyysYOMwc/zc4QEArUhx
hWn9JdQOWesOQcj97HoproAwFfvJfQRJj8JkrQLOOARrB04VEgorBgEEAZdVAQUB
AQdA8emZrr3uIaTrpYElhWqmpFN1OnobbtpXNjeY9s2ifSADAQgHwsAABBgWCgBy
BYJrB04VCRAwz+rUQQnK9UcUAAAAAAAeACBzYWx0QG5vdGF0aW9ucy5zZXF1b2lh
LXBncC5vcmcuAdXDVf+hcjy9W+V/EKNNjtUkELomtbX6xCIJ0yBUvwKbDBYhBGLM
7pKr3+q0Y3YizTDP6tRBCcr1AACIVAEAxM1vgeK8YFC377i7llfei+49Gt+v2D2I
fhVf+JN5UsoA/0litCltqvZsdmcU9wIcfJY+Y54QohKXVbuDAmmdDMAJ
=ARrw
-----END PGP PUBLIC KEY BLOCK-----
"""
V2_MESSAGE = b"""\
-----BEGIN PGP MESSAGE-----

wWwGFQSktWg81JF8KHG7sMcdY8FK6n6ZRRIBB0CDpHtrT7soVYKjRg4tkHugG66k
q+y7ZLd/6MircrC+IzDmp0cUZZ4q6i2Xu1ByR8dXbsAwO6kFSyVp93jp/DPa6wFI
LlzsH5gV2h78zZtbG8bSwGwCCQIGeMtaauVd6HX0U3wKQxDT5FmGdQztY/Q0lPI8
eE0C/9ywlQJ4TF5t8ICXRDNJey7uw/b6ljzjG2uzwWgGlNE6G0R60ntVEba6cPvs
EdtFxSg2rN4aq6UA/k87DWwSwhbIIgIerR0dCjVRd41raBUz1gP8KYhnV79ypQhF
fL5gi/sjnV7eTT+zNHdNh/IzB9wXiZljXQi0hHkHPSjJ78I64l/hMPmmNQoc1YdL
QUYJQA5EcM7pnKjtgHegph3qpnrOHSWRjriVP1jiVSKap1p48dKo4PHySm/qi+90
r4d60r9Ni69k9r1iJM2laTBZhKW/rmE6x56YRyjFckoPVSxZ6bO4sZrS6CSQj6FT
8FdRUp+c46LXD35Ferq70drkqLJl4wSX/XD8yPQ=
-----END PGP MESSAGE-----
"""


def test_seipd_v2_message_from_a_sequoia_sender(engine: OpenPGPEngine) -> None:
    result = engine.decrypt(V2_MESSAGE, [V2_KEY], [V2_SENDER])
    assert result.plaintext == b"sent with SEIPDv2\n"
    (signature,) = result.signatures
    assert signature.status is VALID
    assert signature.fingerprint == engine.parse_certs(V2_SENDER)[0].fingerprint
    (unknown,) = engine.decrypt(V2_MESSAGE, [V2_KEY]).signatures
    assert unknown.status is UNKNOWN_KEY
    with pytest.raises(OutputTooLarge):
        engine.decrypt(V2_MESSAGE, [V2_KEY], max_output=4)


@pytest.mark.parametrize("chunk_octet", [0, 1, 6])
def test_seipd_v2_in_chunks(engine: OpenPGPEngine, bob: Party, chunk_octet: int) -> None:
    text = bytes(range(256)) * 20  # 5 KB: 80, 40 or 2 chunks
    message = encrypt_raw_v2(bob.public, literal(text), chunk_octet)
    assert engine.decrypt(message, [bob.secret]).plaintext == text
    with inline_only():  # decrypted in Python, with its bounds: fine on an event loop
        assert engine.decrypt(message, [bob.secret]).plaintext == text


def v2_parts(message: bytes) -> tuple[bytes, bytearray]:
    """The PKESK packet and the SEIPDv2 body: version, cipher, AEAD, chunk size octet,
    32 octets of salt, the chunks (each with its 16-octet tag), the final tag."""
    (_, pkesk_body), (tag, body) = packets(message)
    assert tag == 18 and body[0] == 2
    return packet(1, pkesk_body), bytearray(body)


# Offsets into the SEIPDv2 body of a 300-octet literal in 128-octet chunks.
V2_SPOTS = {"chunk size": 3, "salt": 10, "first chunk": 40, "last chunk": -21, "final tag": -1}


@pytest.mark.parametrize("spot", V2_SPOTS)
def test_seipd_v2_tampered_releases_nothing(engine: OpenPGPEngine, bob: Party, spot: str) -> None:
    pkesk, body = v2_parts(encrypt_raw_v2(bob.public, literal(b"y" * 300), chunk_octet=1))
    body[V2_SPOTS[spot]] ^= 0x01
    with pytest.raises(IntegrityError):
        engine.decrypt(pkesk + packet(18, bytes(body)), [bob.secret])


@pytest.mark.parametrize("cut", ["a chunk", "the final tag"])
def test_seipd_v2_truncated_releases_nothing(engine: OpenPGPEngine, bob: Party, cut: str) -> None:
    # 64-octet chunks; the final tag covers the length, so a dropped chunk shows.
    pkesk, body = v2_parts(encrypt_raw_v2(bob.public, literal(b"z" * 250), chunk_octet=0))
    start, end = (-16 - 80, -16) if cut == "a chunk" else (-16, len(body))
    del body[start:end]
    with pytest.raises(IntegrityError):
        engine.decrypt(pkesk + packet(18, bytes(body)), [bob.secret])


def test_a_message_only_sequoia_reads_is_not_decrypted_within_an_inline_budget(
    engine: OpenPGPEngine, bob: Party
) -> None:
    # GnuPG's own OCB packet (tag 20): Sequoia decompresses without a bound, so it is
    # not done on an event loop, whatever the size.
    ((_, pkesk_body), _seipd) = packets(encrypt_raw(bob.public, literal(b"x")))
    aead = packet(1, pkesk_body) + packet(20, b"\x01\x09\x02\x06" + bytes(16 + 40))
    with inline_only(), pytest.raises(NeedsWorker):
        engine.decrypt(aead, [bob.secret])


# --------------------------------------------------------------------------- hostile input

DEEP = literal(b"x")
for _ in range(100):
    DEEP = packet(8, b"\x00" + DEEP)  # uncompressed "compression" layers

HOSTILE = [
    b"",
    b"garbage",
    bytes(16),
    b"\xff" * 16,
    b"\xc6\xff\xff\xff\xff\xff",  # public key packet claiming a 4 GiB body
    b"\x99\xff\xff",
    b"\xcb\xe0" + b"x",  # partial length chunk, truncated
    b"\xcb" + b"\xe0x" * 5000,  # thousands of one-byte partial chunks
    b"\xc1\xe9" + bytes(600),  # partial length on a session key packet
    DEEP,
    packet(18, b"\x01" + os.urandom(64)),  # encrypted data without session keys
    packet(18, b"\x07" + os.urandom(64)),
    packet(9, os.urandom(64)),
    b"-----BEGIN PGP MESSAGE-----\n\nAAAA\n",
    b"-----BEGIN PGP MESSAGE-----\n\n!!!!\n-----END PGP MESSAGE-----\n",
    b"-----BEGIN PGP MESSAGE-----\n\nYWJj=\n=abcd\n-----END PGP MESSAGE-----\n",
    b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n",
    b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\ntext\n",
    b"-----BEGIN PGP SIGNED MESSAGE-----\n\ntext\n-----BEGIN PGP SIGNATURE-----\n\nAAAA\n",
]


@dataclass(frozen=True)
class Samples:
    """Real data to combine with hostile data: a message (SEIPDv1, and SEIPDv2 in
    three chunks) and a signature for bob."""

    message: bytes
    signature: bytes
    message_v2: bytes


@pytest.fixture(scope="module")
def samples(engine: OpenPGPEngine, bob: Party) -> Samples:
    return Samples(
        engine.encrypt(MESSAGE, [bob.public], armor=False),
        engine.sign_detached(MESSAGE, bob.secret, armor=False),
        encrypt_raw_v2(bob.public, compressed(literal(MESSAGE * 4)), chunk_octet=0),
    )


def every_operation(
    engine: OpenPGPEngine, party: Party, samples: Samples, data: bytes
) -> dict[str, Callable[[], object]]:
    """Every engine operation, fed data wherever it takes OpenPGP input."""
    return {
        "parse_certs": lambda: engine.parse_certs(data),
        "public_only": lambda: engine.public_only(data),
        "merge-update": lambda: engine.merge(party.public, data),
        "merge-existing": lambda: engine.merge(data, party.public),
        "unlock": lambda: engine.unlock(data, "x"),
        "protect": lambda: engine.protect(data, "x"),
        "revoke": lambda: engine.revoke(data),
        "encrypt-to": lambda: engine.encrypt(b"x", [data]),
        "encrypt-signer": lambda: engine.encrypt(b"x", [party.public], signer=data),
        "decrypt": lambda: engine.decrypt(data, [party.secret], [party.public], max_output=1 << 20),
        "decrypt-key": lambda: engine.decrypt(samples.message, [data]),
        "decrypt-certs": lambda: engine.decrypt(samples.message, [party.secret], [data]),
        "sign": lambda: engine.sign_detached(b"x", data),
        "micalg": lambda: engine.micalg(data),
        "verify-signature": lambda: engine.verify_detached(MESSAGE, data, [party.public]),
        "verify-certs": lambda: engine.verify_detached(MESSAGE, samples.signature, [data]),
        "verify-inline": lambda: engine.verify_inline(data, [party.public], max_output=1 << 20),
        "armor": lambda: engine.armor(data),
    }


@pytest.mark.parametrize("index", range(len(HOSTILE)))
def test_hostile_input_raises_crypto_errors(
    engine: OpenPGPEngine, bob: Party, samples: Samples, index: int
) -> None:
    for name, operation in every_operation(engine, bob, samples, HOSTILE[index]).items():
        if name in ("armor", "decrypt-certs", "verify-certs"):
            survives(operation)  # armor is base64 of anything; bad certs only lose a signer
            continue
        with pytest.raises(CryptoError):
            operation()


def test_truncated_keys_and_messages(
    engine: OpenPGPEngine, alice: Party, bob: Party, samples: Samples
) -> None:
    ciphertext = engine.encrypt(MESSAGE, [bob.public], signer=alice.secret, armor=False)
    armored = engine.armor(ciphertext)
    for data in (alice.secret, alice.public, ciphertext, armored, samples.signature):
        for size in range(0, len(data), max(1, len(data) // 37)):
            for operation in every_operation(engine, bob, samples, data[:size]).values():
                survives(operation)
    for size in range(0, len(ciphertext) - 1, 7):
        with pytest.raises(CryptoError):
            engine.decrypt(ciphertext[:size], [bob.secret], [alice.public])


# LOCALPROXY_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("LOCALPROXY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(data=st.binary(max_size=1024))
def test_any_bytes_end_in_a_result_or_a_crypto_error(
    engine: OpenPGPEngine, bob: Party, samples: Samples, data: bytes
) -> None:
    for operation in every_operation(engine, bob, samples, data).values():
        survives(operation)


@FUZZ
@given(items=st.lists(st.tuples(st.integers(1, 21), st.binary(max_size=200)), max_size=6))
def test_any_packet_sequence_ends_in_a_result_or_a_crypto_error(
    engine: OpenPGPEngine, bob: Party, samples: Samples, items: list[tuple[int, bytes]]
) -> None:
    data = join(items)
    armored = (
        b"-----BEGIN PGP MESSAGE-----\n\n"
        + base64.b64encode(data)
        + b"\n-----END PGP MESSAGE-----\n"
    )
    for variant in (data, armored):
        for operation in every_operation(engine, bob, samples, variant).values():
            survives(operation)


@FUZZ
@given(inner=st.lists(st.tuples(st.integers(1, 21), st.binary(max_size=100)), max_size=5))
def test_any_decrypted_content_ends_in_a_result_or_a_crypto_error(
    engine: OpenPGPEngine, bob: Party, inner: list[tuple[int, bytes]]
) -> None:
    survives(lambda: engine.decrypt(encrypt_raw(bob.public, join(inner)), [bob.secret]))


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3)
)
@pytest.mark.parametrize("seipd", [1, 2])
def test_modified_messages_never_yield_other_plaintext(
    engine: OpenPGPEngine, bob: Party, samples: Samples, seipd: int, flips: list[tuple[int, int]]
) -> None:
    original, plaintext = (
        (samples.message, MESSAGE) if seipd == 1 else (samples.message_v2, MESSAGE * 4)
    )
    message = bytearray(original)
    for position, mask in flips:
        message[position % len(message)] ^= mask
    try:
        result = engine.decrypt(bytes(message), [bob.secret], max_output=1 << 20)
    except CryptoError:
        return
    assert result.plaintext == plaintext


@pytest.fixture(scope="module")
def key_material(engine: OpenPGPEngine, alice: Party) -> list[bytes]:
    locked = engine.protect(alice.secret, "pw")
    signed = inline_signed(MESSAGE, engine.sign_detached(MESSAGE, alice.secret, armor=False))
    return [alice.secret, alice.public, locked, signed, compressed(signed)]


@FUZZ
@given(
    choice=st.integers(0, 4),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_modified_keys_and_signed_messages_end_in_a_result_or_a_crypto_error(
    engine: OpenPGPEngine,
    bob: Party,
    samples: Samples,
    key_material: list[bytes],
    choice: int,
    flips: list[tuple[int, int]],
) -> None:
    data = bytearray(key_material[choice])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    operations = every_operation(engine, bob, samples, bytes(data))
    operations["unlock-pw"] = lambda: engine.unlock(bytes(data), "pw")
    for operation in operations.values():
        survives(operation)


def test_packets_helper_sees_our_structure(engine: OpenPGPEngine, bob: Party) -> None:
    tags = [tag for tag, _ in packets(engine.encrypt(b"x", [bob.public], armor=False))]
    assert tags == [1, 18], "one session key packet, then SEIPD (v1, see the MDC tests)"
