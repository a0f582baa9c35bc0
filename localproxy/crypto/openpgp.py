"""OpenPGP engine: the interface the rest of localproxy uses, and its Sequoia implementation.

Nothing else in localproxy imports pysequoia. Everything goes through
:class:`OpenPGPEngine` with plain bytes, str and dataclasses in and out, and every
failure is a :class:`~localproxy.crypto.errors.CryptoError` with a readable message.

Who does what, and why (pysequoia 0.1.35):

* Sequoia parses and validates certificates (self-signatures, policy, expiry,
  revocation), encrypts, signs, verifies every signature, and decrypts the messages
  the Python path below does not handle (EAX, GnuPG's OCB packets, X25519/X448
  keys, ElGamal, exotic ciphers).
* This module does in Python, with ``cryptography``, what pysequoia offers no way to do:

  - Key generation. pysequoia's keys advertise SEIPDv2 (features 0x01|0x08) and
    pysequoia then encrypts to them with SEIPDv2, which GnuPG 2.2, RNP 0.16 and sq
    0.27 cannot read. Ours are v4 Ed25519 (certify+sign) + Cv25519 (encrypt) and
    advertise MDC only: never AEAD 0x02, never 0x08.
  - Setting or removing a passphrase (pysequoia can only use one).
  - Opening SEIPDv1 messages (MDC) and SEIPDv2 ones (OCB or GCM chunks, RFC 9580
    5.13.2; v6 PKESK): session key from our RSA/ECDH key, integrity check before any
    plaintext is released, decompression with a real output bound. pysequoia
    0.1.35 rejects signatures inside compressed messages ("Unexpected message
    structure"), which is what GnuPG and RNP send by default, cannot bound
    decompression, holds the GIL while it works, and refuses to decrypt with an
    expired or revoked own key (old mail).
    The unwrapped signed message is handed back to Sequoia to verify signatures.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import functools
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import ParamSpec, Protocol, TypeAlias, TypeVar, runtime_checkable

import pysequoia
from cryptography.exceptions import InvalidKey, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

try:  # cryptography >= 47 keeps CFB (which OpenPGP needs) among the "decrepit" modes
    from cryptography.hazmat.decrepit.ciphers.modes import CFB as _CFB
except ImportError:  # pragma: no cover - older cryptography
    _CFB = modes.CFB  # type: ignore[misc,assignment]

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

# anyhow (inside pysequoia) captures a Rust backtrace for every error when RUST_BACKTRACE
# is set: slow, and useless to users. Panics keep their backtraces.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")

# ============================================================================ interface


class SignatureStatus(StrEnum):
    VALID = "valid"  # good signature by a valid key
    INVALID = "invalid"  # does not match the data, or not acceptable (e.g. weak hash)
    UNKNOWN_KEY = "unknown-key"  # we do not have the signer's certificate
    EXPIRED = "expired"  # the signer's key has expired (detail says if the math was good)
    REVOKED = "revoked"  # the signer's key is revoked (detail says if the math was good)
    UNVERIFIABLE = "unverifiable"  # this engine cannot check it (detail says why)


@dataclass(frozen=True)
class SignatureResult:
    status: SignatureStatus
    fingerprint: str | None  # signer's certificate (primary key) if known, else issuer's
    key_id: str | None  # 16 hex digits of the (sub)key that made the signature
    created: datetime | None
    detail: str  # one human-readable sentence

    @property
    def valid(self) -> bool:
        return self.status is SignatureStatus.VALID


@dataclass(frozen=True)
class CertInfo:
    fingerprint: str  # upper-case hex, no spaces
    user_ids: tuple[str, ...]  # valid, non-revoked user IDs
    emails: tuple[str, ...]  # from user_ids; domain lower-cased, local part kept
    algorithm: str  # e.g. "EdDSA/Ed25519 + ECDH/Cv25519"
    created: datetime
    expires: datetime | None
    revoked: bool
    can_encrypt: bool  # a valid, alive, non-revoked encryption-capable key now
    can_sign: bool
    has_secret: bool
    secret_locked: bool  # secret material is passphrase-protected
    data: bytes = field(repr=False)  # binary transferable key (secret key if has_secret)
    subkey_fingerprints: tuple[str, ...] = ()
    problem: str | None = None  # why it cannot be used for encryption now, in words

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Key IDs of the primary key and every subkey (how messages name keys)."""
        return tuple(_key_id(f) for f in (self.fingerprint, *self.subkey_fingerprints))


@dataclass(frozen=True)
class DecryptResult:
    plaintext: bytes = field(repr=False)
    signatures: tuple[SignatureResult, ...]
    decrypted_with: str  # fingerprint of our key or subkey that opened the message
    recipients: tuple[str, ...] = ()  # key IDs the message is encrypted to ("anonymous")


# Certificates for signature checks: a list of certs (keyrings allowed), or a lookup
# called with the issuer fingerprints / key IDs (upper-case hex) a message names.
CertSource: TypeAlias = Sequence[bytes] | Callable[[Sequence[str]], Sequence[bytes]]


@runtime_checkable
class OpenPGPEngine(Protocol):
    """OpenPGP operations on plain bytes. Keys and messages may be armored or binary;
    results are binary unless ``armor`` is asked for. Failures raise CryptoError."""

    name: str

    def parse_certs(self, data: bytes) -> list[CertInfo]:
        """Every certificate or secret key in data (one, or a keyring)."""
        ...

    def generate_key(
        self,
        user_ids: Sequence[str],
        passphrase: str | None = None,
        *,
        expires_in: timedelta | None = None,
        created: datetime | None = None,
    ) -> CertInfo:
        """A new v4 key: Ed25519 primary (certify+sign) and Cv25519 encryption subkey,
        features MDC only. ``created`` backdates it (tests, reproducible fixtures)."""
        ...

    def merge(self, existing: bytes, update: bytes) -> CertInfo:
        """Union of two copies of one certificate (new subkeys, signatures, revocations)."""
        ...

    def public_only(self, cert: bytes) -> bytes: ...

    def unlock(self, secret: bytes, passphrase: str) -> bytes:
        """The secret key with its secret material decrypted, for in-memory use."""
        ...

    def protect(self, secret: bytes, passphrase: str) -> bytes:
        """The secret key with its secret material encrypted under passphrase."""
        ...

    def revoke(self, secret: bytes) -> bytes:
        """The secret key with a key revocation signature added."""
        ...

    def encrypt(
        self,
        plaintext: bytes,
        recipients: Sequence[bytes],
        signer: bytes | None = None,
        armor: bool = True,
    ) -> bytes:
        """SEIPDv1 with MDC (SEIPDv2 only if every recipient asks for it), AES-256 when
        every recipient allows it, signed inside when signer is given. Revoked, expired
        or unusable recipients raise KeyRevoked, KeyExpired or NoUsableKey."""
        ...

    def encrypt_armored(
        self,
        parts: Sequence[bytes | memoryview],
        recipients: Sequence[bytes],
        signer: bytes | None = None,
        *,
        prefix: bytes = b"",
    ) -> bytearray:
        """``prefix`` + encrypt(b"".join(parts), armor=True) with CRLF line ends, in one
        buffer: a MIME wrapper around it needs no second copy of a large message."""
        ...

    def decrypt(
        self,
        ciphertext: bytes,
        secret_keys: Sequence[bytes],
        verify_certs: CertSource = (),
        max_output: int | None = None,
    ) -> DecryptResult:
        """Plaintext and signature results. Nothing is released unless integrity
        protection holds (IntegrityError; messages without MDC are refused).
        max_output caps the plaintext after decompression (OutputTooLarge); None means
        no cap, so pass one for mail from strangers. Secret keys must be unlocked."""
        ...

    def sign_detached(self, data: bytes, signer: bytes, armor: bool = True) -> bytes: ...

    def micalg(self, signature: bytes) -> str:
        """The PGP/MIME micalg parameter for a signature, e.g. "pgp-sha512"."""
        ...

    def verify_detached(
        self, data: bytes, signature: bytes, certs: CertSource = ()
    ) -> tuple[SignatureResult, ...]: ...

    def verify_inline(
        self, signed_message: bytes, certs: CertSource = (), max_output: int | None = None
    ) -> tuple[bytes, tuple[SignatureResult, ...]]:
        """Content and signature results of a cleartext-signed or inline-signed message."""
        ...

    def armor(self, data: bytes, kind: str = "message") -> bytes:
        """ASCII armor; kind is message, public-key, secret-key or signature."""
        ...


# ============================================================================ packets

# Packet tags (RFC 9580 section 5.)
_PKESK, _SIGNATURE, _SKESK, _ONE_PASS = 1, 2, 3, 4
_SECRET_KEY, _PUBLIC_KEY, _SECRET_SUBKEY, _COMPRESSED = 5, 6, 7, 8
_SED, _MARKER, _LITERAL, _TRUST, _USER_ID, _PUBLIC_SUBKEY = 9, 10, 11, 12, 13, 14
_SEIPD, _AEAD, _PADDING = 18, 20, 21

_SECRET_TAGS = frozenset({_SECRET_KEY, _SECRET_SUBKEY})
_KEY_TAGS = frozenset({_SECRET_KEY, _PUBLIC_KEY, _SECRET_SUBKEY, _PUBLIC_SUBKEY})
_PARTIAL_OK = frozenset({_COMPRESSED, _SED, _LITERAL, _SEIPD, _AEAD})  # may use partial lengths
_IGNORED = frozenset({_MARKER, _PADDING})
_TAG_NAMES = {
    _PKESK: "encrypted session key",
    _SIGNATURE: "signature",
    _SKESK: "passphrase-encrypted session key",
    _ONE_PASS: "one-pass signature",
    _SECRET_KEY: "secret key",
    _PUBLIC_KEY: "public key",
    _SECRET_SUBKEY: "secret subkey",
    _COMPRESSED: "compressed data",
    _SED: "encrypted data without integrity protection",
    _LITERAL: "literal data",
    _USER_ID: "user ID",
    _PUBLIC_SUBKEY: "public subkey",
    _SEIPD: "encrypted data",
    _AEAD: "AEAD encrypted data",
}

_MAX_NESTING = 8  # compression layers inside one message (Sequoia allows 16 packets deep)
_SLACK = 1 << 16  # packet framing and signatures on top of the plaintext limit


def _tag_name(tag: int) -> str:
    return _TAG_NAMES.get(tag, f"packet type {tag}")


# Large message bodies are read through memoryviews: slicing them copies nothing.
_Buffer: TypeAlias = bytes | memoryview


class _Reader:
    """Bounds-checked reading: running past the end is MalformedData, never IndexError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: _Buffer, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> _Buffer:
        if n < 0 or n > self.left():
            raise MalformedData(f"{self.what} is truncated or has a bad length")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def mpi(self) -> bytes:
        return bytes(self.take((self.u16() + 7) // 8))

    def rest(self) -> _Buffer:
        return self.take(self.left())


@dataclass(frozen=True, slots=True)
class _Packet:
    tag: int
    body: _Buffer  # bytes, or a memoryview into a large message


def _packets(data: _Buffer, what: str) -> list[_Packet]:
    reader, out = _Reader(data, what), []
    while reader.left():
        out.append(_next_packet(reader))
    return out


def _next_packet(r: _Reader) -> _Packet:
    ctb = r.u8()
    if not ctb & 0x80:
        raise MalformedData(f"{r.what}: not an OpenPGP packet at byte {r.pos - 1}")
    if ctb & 0x40:
        tag = ctb & 0x3F
        body = _new_format_body(r, tag)
    else:
        tag, kind = (ctb >> 2) & 0x0F, ctb & 3
        length = r.left() if kind == 3 else int.from_bytes(r.take((1, 2, 4)[kind]), "big")
        body = r.take(length)
    if tag == 0:
        raise MalformedData(f"{r.what}: packet with reserved type 0")
    return _Packet(tag, body)


def _new_format_body(r: _Reader, tag: int) -> _Buffer:
    first = r.u8()
    if first < 224 or first == 255:
        return r.take(_new_length(r, first))
    if tag not in _PARTIAL_OK:
        raise MalformedData(f"{r.what}: partial length on a {_tag_name(tag)} packet")
    # Tiny partial chunks would make this loop slow on hostile input; real producers
    # use chunks of 512 bytes or more, so require that on average.
    budget, parts = 2 + r.left() // 512, []
    while 224 <= first < 255:
        budget -= 1
        if budget < 0:
            raise MalformedData(f"{r.what}: too many partial-length chunks")
        parts.append(r.take(1 << (first & 0x1F)))
        first = r.u8()
    parts.append(r.take(_new_length(r, first)))
    return b"".join(parts)  # one copy of the body, however many chunks


def _new_length(r: _Reader, first: int) -> int:
    if first < 192:
        return first
    if first < 224:
        return ((first - 192) << 8) + r.u8() + 192
    return r.u32()


def _header(tag: int, n: int) -> bytes:
    if n < 192:
        return bytes([0xC0 | tag, n])
    if n < 8384:
        return bytes([0xC0 | tag, ((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    return bytes([0xC0 | tag, 0xFF]) + n.to_bytes(4, "big")


def _encode(tag: int, body: _Buffer) -> bytes:
    return _header(tag, len(body)) + body


def _join(packets: Sequence[_Packet]) -> bytes:
    """Packets serialized; large bodies are copied once, not once per step."""
    return b"".join(part for p in packets for part in (_header(p.tag, len(p.body)), p.body))


# ---------------------------------------------------------------------------- armor

_ARMOR_LINE = re.compile(rb"-----(BEGIN|END) PGP ([A-Z0-9 ,/]+)-----")
_CLEARTEXT_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"


def _dearmor(data: bytes) -> bytes:
    """Binary OpenPGP as is; ASCII armor (one or several blocks) decoded."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"OpenPGP data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if data[:1] and data[0] & 0x80:
        return data
    single = _SINGLE_ARMOR.fullmatch(data)
    if single is not None and single.group(1) != b"SIGNED MESSAGE":
        # The usual case, one well-formed block, decoded without a Python loop over its
        # lines; anything else goes the line by line way below.
        return _base64_payload(single.group(2), single.group(1).decode())
    return _dearmor_lines(data)


def _dearmor_lines(data: bytes) -> bytes:
    """Armor blocks among any other lines, read line by line."""
    lines, blocks = iter(data.splitlines()), []
    for line in lines:
        match = _ARMOR_LINE.fullmatch(line.strip())
        if match is None or match.group(1) != b"BEGIN":
            continue
        if match.group(2) == b"SIGNED MESSAGE":
            raise MalformedData("cleartext-signed text where binary OpenPGP data was expected")
        blocks.append(_armor_payload(lines, match.group(2).decode()))
    if not blocks:
        raise MalformedData("not OpenPGP data: neither OpenPGP packets nor ASCII armor")
    return b"".join(blocks)


# One armor block alone: BEGIN, header lines (they have a ':'), an optional blank
# line, base64 lines (none starting with '='), the optional CRC-24 line, END.
_SINGLE_ARMOR = re.compile(
    rb"\s*-----BEGIN PGP ([A-Z0-9 ,/]+)-----\r?\n"
    rb"(?:[^\r\n:]*:[^\r\n]*\r?\n)*(?:\r?\n)?"
    rb"((?:[A-Za-z0-9+/][A-Za-z0-9+/=]*\r?\n)*)"
    rb"(?:=[A-Za-z0-9+/]{4}\r?\n)?"
    rb"-----END PGP \1-----\s*"
)


def _base64_payload(encoded: bytes, kind: str) -> bytes:
    try:
        return base64.b64decode(encoded)  # line ends are not in the alphabet: skipped
    except (binascii.Error, ValueError):
        raise MalformedData(f"bad base64 in ASCII armor ({kind})") from None


def _armor_payload(lines: Iterator[bytes], kind: str) -> bytes:
    payload, in_headers = [], True
    for raw in lines:
        line = raw.strip()
        if line.startswith(b"-----END PGP"):
            return _base64_payload(b"".join(payload), kind)
        if in_headers and b":" in line:  # armor headers ("Version: ..."); base64 has no ':'
            continue
        in_headers = False
        if line and not line.startswith(b"="):  # '=XXXX' is the optional CRC-24 line
            payload.append(line)
    raise MalformedData(f"ASCII armor ({kind}) has no END line: truncated")


# ---------------------------------------------------------------------------- keys

_ED25519_OID = bytes.fromhex("2b06010401da470f01")
_CV25519_OID = bytes.fromhex("2b060104019755010501")
_CURVES = {
    _ED25519_OID: "Ed25519",
    _CV25519_OID: "Cv25519",
    bytes.fromhex("2a8648ce3d030107"): "NIST P-256",
    bytes.fromhex("2b81040022"): "NIST P-384",
    bytes.fromhex("2b81040023"): "NIST P-521",
    bytes.fromhex("2b2403030208010107"): "brainpoolP256r1",
    bytes.fromhex("2b240303020801010b"): "brainpoolP384r1",
    bytes.fromhex("2b240303020801010d"): "brainpoolP512r1",
    bytes.fromhex("2b6571"): "Ed448",
    bytes.fromhex("2b656f"): "X448",
}
_NIST_CURVES: dict[str, ec.EllipticCurve] = {
    "NIST P-256": ec.SECP256R1(),
    "NIST P-384": ec.SECP384R1(),
    "NIST P-521": ec.SECP521R1(),
}
_ALGORITHMS = {
    1: "RSA",
    2: "RSA",
    3: "RSA",
    16: "ElGamal",
    17: "DSA",
    18: "ECDH",
    19: "ECDSA",
    20: "ElGamal",
    22: "EdDSA",
    25: "X25519",
    26: "X448",
    27: "Ed25519",
    28: "Ed448",
}
_MPI_COUNT = {1: 2, 2: 2, 3: 2, 16: 3, 20: 3, 17: 4}  # public MPIs of the classic algorithms
_NATIVE_SIZE = {25: 32, 26: 56, 27: 32, 28: 57}  # RFC 9580 native key sizes
_ECC = frozenset({18, 19, 22})
_RSA, _ECDH = frozenset({1, 2}), 18
_GNU_DUMMY = b"\xff\x00\x65\x00GNU\x01"  # S2K usage 255, GNU extension 101: no secret here
_STUB_TAG = {_PUBLIC_KEY: _SECRET_KEY, _PUBLIC_SUBKEY: _SECRET_SUBKEY}


def _fingerprint(public_body: bytes) -> str:
    version = public_body[0] if public_body else 0
    if version == 4:
        framed = b"\x99" + len(public_body).to_bytes(2, "big") + public_body
        return hashlib.sha1(framed, usedforsecurity=False).hexdigest().upper()
    if version in (5, 6):
        prefix = b"\x9a" if version == 5 else b"\x9b"
        framed = prefix + len(public_body).to_bytes(4, "big") + public_body
        return hashlib.sha256(framed).hexdigest().upper()
    raise MalformedData(f"unsupported key packet version {version}")


def _key_id(fingerprint: str) -> str:
    """v4 key IDs are the last 8 bytes of the fingerprint, v5/v6 ones the first 8."""
    return fingerprint[-16:] if len(fingerprint) == 40 else fingerprint[:16]


@dataclass(frozen=True, slots=True)
class _Key:
    tag: int
    version: int
    created: datetime
    algo: int
    oid: bytes | None
    public: tuple[bytes, ...]  # algorithm-specific public fields (MPIs, native bytes)
    kdf: bytes | None  # ECDH KDF parameters, with their length octet
    public_body: bytes  # the public part: what fingerprints and signatures hash
    secret: bytes  # everything after the public part (empty for public keys)

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.public_body)

    @property
    def key_id(self) -> str:
        return _key_id(self.fingerprint)

    @property
    def description(self) -> str:
        name = _ALGORITHMS.get(self.algo, f"algorithm {self.algo}")
        if self.oid is not None:
            return f"{name}/{_CURVES.get(self.oid, 'curve ' + self.oid.hex())}"
        if self.algo in _MPI_COUNT and self.public:
            return f"{name}-{_mpi_bits(self.public[0])}"
        return name


def _mpi_bits(value: bytes) -> int:
    value = value.lstrip(b"\0")
    return (len(value) - 1) * 8 + value[0].bit_length() if value else 0


def _mpi(value: bytes) -> bytes:
    value = value.lstrip(b"\0")
    return _mpi_bits(value).to_bytes(2, "big") + value


def _parse_key(packet: _Packet) -> _Key:
    r = _Reader(packet.body, _tag_name(packet.tag) + " packet")
    version = r.u8()
    if version not in (4, 6):
        raise MalformedData(f"unsupported key packet version {version}")
    created, algo = r.u32(), r.u8()
    if version == 6:
        r = _Reader(r.take(r.u32()), "v6 key material")
    oid = kdf = None
    if algo in _MPI_COUNT:
        public = tuple(r.mpi() for _ in range(_MPI_COUNT[algo]))
    elif algo in _ECC:
        size = r.u8()
        if size in (0, 0xFF):
            raise MalformedData("key packet has a reserved curve OID length")
        oid, public = r.take(size), (r.mpi(),)
        if algo == _ECDH:
            size = r.u8()
            kdf = bytes([size]) + r.take(size)
    elif algo in _NATIVE_SIZE:
        public = (r.take(_NATIVE_SIZE[algo]),)
    elif packet.tag in _SECRET_TAGS and version == 4:
        raise MalformedData(f"secret key uses unsupported public-key algorithm {algo}")
    else:  # a public key of an algorithm we do not know: all of it is public
        public = (r.rest(),)
    end = len(packet.body) - (len(r.data) - r.pos) if version == 4 else 10 + len(r.data)
    return _Key(
        packet.tag,
        version,
        datetime.fromtimestamp(created, UTC),
        algo,
        oid,
        public,
        kdf,
        packet.body[:end],
        packet.body[end:],
    )


# ---------------------------------------------------------------------------- secret keys

_HASHES = {
    1: "md5",
    2: "sha1",
    3: "ripemd160",
    8: "sha256",
    9: "sha384",
    10: "sha512",
    11: "sha224",
    12: "sha3_256",
    14: "sha3_512",
}
_MICALG_NAMES = {12: "sha3-256", 14: "sha3-512"}
_AES = {7: 16, 8: 24, 9: 32}  # cipher id -> key size; AES is the only cipher done in Python
_AES_BLOCK = 16
_S2K_ITERATED, _S2K_GNU = 3, 101


@dataclass(frozen=True, slots=True)
class _Secret:
    usage: int  # 0: plain; 254/255: passphrase-protected
    cipher: int
    s2k: bytes
    iv: bytes
    data: bytes  # MPIs and checksum if plain, else ciphertext

    @property
    def stub(self) -> bool:
        """GnuPG's "no secret here" marker (primary key offline, smartcard)."""
        return self.usage != 0 and self.s2k[:1] == bytes([_S2K_GNU])


def _parse_secret(key: _Key) -> _Secret:
    if key.version != 4:
        raise MalformedData(f"secret key {key.fingerprint}: only v4 secret keys are supported")
    r = _Reader(key.secret, "secret key material")
    usage = r.u8()
    if usage == 0:
        return _Secret(0, 0, b"", b"", r.rest())
    if usage not in (254, 255):
        raise MalformedData(
            f"secret key {key.fingerprint} uses an obsolete or unsupported protection "
            f"(S2K usage {usage})"
        )
    cipher, s2k = r.u8(), _read_s2k(r)
    if s2k[0] == _S2K_GNU:
        return _Secret(usage, cipher, s2k, b"", r.rest())
    return _Secret(usage, cipher, s2k, r.take(_AES_BLOCK if cipher in _AES else 8), r.rest())


def _read_s2k(r: _Reader) -> bytes:
    start, kind = r.pos, r.u8()
    sizes = {0: 1, 1: 9, _S2K_ITERATED: 10}
    if kind in sizes:
        r.take(sizes[kind])
    elif kind == _S2K_GNU:
        r.take(1)
        if r.take(3) != b"GNU":
            raise MalformedData("unknown private S2K extension in secret key")
        if r.u8() == 2:  # divert to smartcard: serial number follows
            r.take(r.u8())
    else:
        raise MalformedData(f"secret key uses unsupported S2K type {kind}")
    return r.data[start : r.pos]


def _secret_state(packet: _Packet) -> str:
    """'plain', 'locked' or 'stub' for a secret key packet."""
    key = _parse_key(packet)
    if key.version != 4:
        return "plain" if key.secret[:1] == b"\0" else "locked"
    secret = _parse_secret(key)
    if secret.stub:
        return "stub"
    return "plain" if secret.usage == 0 else "locked"


def _tolerant_state(packet: _Packet) -> str:
    """Like _secret_state, but a protection we cannot read counts as locked."""
    try:
        return _secret_state(packet)
    except MalformedData:
        return "locked"


def _checksum16(data: bytes) -> bytes:
    return (sum(data) & 0xFFFF).to_bytes(2, "big")


def _s2k_key(s2k: bytes, passphrase: bytes, size: int) -> bytes:
    """RFC 4880 3.7.1: simple, salted and iterated+salted string-to-key."""
    kind, hash_name = s2k[0], _HASHES.get(s2k[1])
    if hash_name is None:
        raise MalformedData(f"secret key protection uses unsupported hash {s2k[1]}")
    salt = s2k[2:10] if kind in (1, _S2K_ITERATED) else b""
    data = salt + passphrase
    count = len(data)
    if kind == _S2K_ITERATED:
        count = max(count, (16 + (s2k[10] & 15)) << ((s2k[10] >> 4) + 6))
    out, preload = b"", 0
    while len(out) < size:
        digest = hashlib.new(hash_name, b"\0" * preload)
        _feed_repeated(digest, data, count)
        out, preload = out + digest.digest(), preload + 1
    return out[:size]


def _feed_repeated(digest: hashlib._Hash, data: bytes, count: int) -> None:
    if not data:
        return
    block = data * max(1, 65536 // len(data))
    while count >= len(block):
        digest.update(block)
        count -= len(block)
    digest.update((data * (count // len(data) + 1))[:count])


def _aes_cfb(key: bytes, iv: bytes, data: bytes, *, encrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), _CFB(iv))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


def _unlocked_secret(key: _Key, passphrase: bytes, cache: dict[bytes, bytes]) -> bytes:
    """The secret part of a key packet with its material decrypted."""
    secret = _parse_secret(key)
    if secret.usage == 0 or secret.stub:
        return key.secret
    if secret.cipher not in _AES:
        raise MalformedData(
            f"secret key {key.fingerprint} is protected with cipher {secret.cipher}; "
            "only AES protection can be unlocked (re-export it from GnuPG 2.x)"
        )
    size = _AES[secret.cipher]
    cache_key = bytes([size]) + secret.s2k
    if cache_key not in cache:  # one derivation per S2K, not per packet: it is slow
        cache[cache_key] = _s2k_key(secret.s2k, passphrase, size)
    plain = _aes_cfb(cache[cache_key], secret.iv, secret.data)
    if secret.usage == 254:
        material, check = plain[:-20], plain[-20:]
        good = hashlib.sha1(material, usedforsecurity=False).digest()
    else:
        material, check = plain[:-2], plain[-2:]
        good = _checksum16(material)
    if len(plain) <= len(check) or not hmac.compare_digest(good, check):
        raise BadPassphrase(f"wrong passphrase for secret key {key.fingerprint}")
    return b"\0" + material + _checksum16(material)


def _protected_secret(key: _Key, aes_key: bytes, s2k: bytes) -> bytes:
    secret = _parse_secret(key)
    if secret.stub:
        return key.secret
    if secret.usage != 0:
        raise KeyLocked(
            f"secret key {key.fingerprint} is already passphrase-protected; unlock it first",
            key.fingerprint,
        )
    material = secret.data[:-2]
    if _checksum16(material) != secret.data[-2:]:
        raise MalformedData(f"secret key {key.fingerprint} has a bad checksum")
    iv = secrets.token_bytes(_AES_BLOCK)
    plain = material + hashlib.sha1(material, usedforsecurity=False).digest()
    return bytes([254, 9]) + s2k + iv + _aes_cfb(aes_key, iv, plain, encrypt=True)


def _plain_material(key: _Key) -> _Reader:
    secret = _parse_secret(key)
    if secret.usage != 0:
        raise KeyLocked(
            f"secret key {key.fingerprint} is passphrase-protected; unlock it first",
            key.fingerprint,
        )
    return _Reader(secret.data[:-2], f"secret key {key.fingerprint}")


# ---------------------------------------------------------------------------- generation

_FEATURES_MDC = b"\x01"  # SEIPDv1 only: no AEAD (0x02), no SEIPDv2 (0x08)
_PREFERRED_CIPHERS = bytes([9, 8, 7])  # AES-256, AES-192, AES-128
_PREFERRED_HASHES = bytes([10, 8])  # SHA-512, SHA-256
# Uncompressed only: GnuPG honours it, so our contacts send no compression bombs and
# nothing pysequoia 0.1.35 cannot verify.
_PREFERRED_COMPRESSION = b"\x00"
_ECDH_KDF = bytes([3, 1, 8, 7])  # SHA-256, AES-128 key wrap (what GnuPG uses for Cv25519)


def _subpacket(kind: int, data: bytes, critical: bool = False) -> bytes:
    body = bytes([kind | (0x80 if critical else 0)]) + data
    return bytes([len(body)]) + body  # every subpacket here is shorter than 192 bytes


def _key_frame(public_body: bytes) -> bytes:
    return b"\x99" + len(public_body).to_bytes(2, "big") + public_body


def _self_signature(
    key: ed25519.Ed25519PrivateKey,
    fingerprint: bytes,
    sig_type: int,
    hashed_input: bytes,
    subpackets: bytes,
    created: int,
) -> bytes:
    """A v4 EdDSA self-signature (SHA-512) over hashed_input."""
    hashed = (
        _subpacket(2, created.to_bytes(4, "big"), critical=True)
        + _subpacket(33, b"\x04" + fingerprint)
        + subpackets
    )
    head = bytes([4, sig_type, 22, 10]) + len(hashed).to_bytes(2, "big") + hashed
    digest = hashlib.sha512(hashed_input + head + b"\x04\xff" + len(head).to_bytes(4, "big"))
    raw = key.sign(digest.digest())  # legacy EdDSA signs the digest
    unhashed = _subpacket(16, fingerprint[-8:])
    return (
        head
        + len(unhashed).to_bytes(2, "big")
        + unhashed
        + digest.digest()[:2]
        + _mpi(raw[:32])
        + _mpi(raw[32:])
    )


def _generate_tsk(
    user_ids: Sequence[str], created: datetime, expires_in: timedelta | None
) -> bytes:
    when = int(created.timestamp())
    stamp = when.to_bytes(4, "big")
    signing = ed25519.Ed25519PrivateKey.generate()
    primary = (
        b"\x04"
        + stamp
        + bytes([22, len(_ED25519_OID)])
        + _ED25519_OID
        + _mpi(b"\x40" + signing.public_key().public_bytes_raw())
    )
    native = bytearray(secrets.token_bytes(32))  # clamped as RFC 7748 and GnuPG do
    native[0] &= 248
    native[31] = (native[31] & 127) | 64
    encryption = x25519.X25519PrivateKey.from_private_bytes(bytes(native))
    subkey = (
        b"\x04"
        + stamp
        + bytes([18, len(_CV25519_OID)])
        + _CV25519_OID
        + _mpi(b"\x40" + encryption.public_key().public_bytes_raw())
        + _ECDH_KDF
    )
    fpr = bytes.fromhex(_fingerprint(primary))
    expiry = b""
    if expires_in is not None:
        expiry = _subpacket(9, int(expires_in.total_seconds()).to_bytes(4, "big"))
    preferences = (
        _subpacket(11, _PREFERRED_CIPHERS)
        + _subpacket(21, _PREFERRED_HASHES)
        + _subpacket(22, _PREFERRED_COMPRESSION)
        + _subpacket(30, _FEATURES_MDC)
    )
    packets = [_encode(_SECRET_KEY, primary + _plain(signing.private_bytes_raw()))]
    for index, user_id in enumerate(user_ids):
        uid = user_id.encode("utf-8")
        flags = _subpacket(27, b"\x03", critical=True) + expiry + preferences
        if index == 0:
            flags += _subpacket(25, b"\x01")  # primary user ID
        framed = _key_frame(primary) + b"\xb4" + len(uid).to_bytes(4, "big") + uid
        signature = _self_signature(signing, fpr, 0x13, framed, flags, when)
        packets += [_encode(_USER_ID, uid), _encode(_SIGNATURE, signature)]
    binding_input = _key_frame(primary) + _key_frame(subkey)
    binding_flags = _subpacket(27, b"\x0c", critical=True) + expiry
    binding = _self_signature(signing, fpr, 0x18, binding_input, binding_flags, when)
    packets += [
        _encode(_SECRET_SUBKEY, subkey + _plain(bytes(reversed(native)))),
        _encode(_SIGNATURE, binding),
    ]
    return b"".join(packets)


def _plain(secret_value: bytes) -> bytes:
    material = _mpi(secret_value)
    return b"\0" + material + _checksum16(material)


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class _Pkesk:
    version: int
    key_id: str | None  # None: anonymous recipient ("--throw-keyids")
    algo: int
    data: bytes


@dataclass(frozen=True, slots=True)
class _Envelope:
    binary: bytes
    pkesks: tuple[_Pkesk, ...]
    passphrase_only: bool
    tag: int  # SEIPD, SED or AEAD
    body: bytes

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(p.key_id or "anonymous" for p in self.pkesks)


class _Unsupported(Exception):
    """Not handled by the Python path: let Sequoia try."""


class _NoSessionKey(Exception):
    """This key does not open this session key packet."""


def _parse_pkesk(body: bytes) -> _Pkesk | None:
    r = _Reader(body, "encrypted session key packet")
    version = r.u8()
    if version == 3:
        key_id = r.take(8).hex().upper()
        return _Pkesk(3, None if key_id == "0" * 16 else key_id, r.u8(), r.rest())
    if version == 6:
        size = r.u8()
        fpr = r.take(size)[1:].hex().upper() if size else ""
        return _Pkesk(6, _key_id(fpr) if fpr else None, r.u8(), r.rest())
    return None  # unknown versions are skipped, as RFC 9580 asks


def _envelope(binary: bytes) -> _Envelope:
    pkesks, passphrases, data = [], 0, None
    for packet in _packets(memoryview(binary), "encrypted message"):
        if packet.tag in _IGNORED:
            continue
        if data is not None:
            raise MalformedData(f"unexpected {_tag_name(packet.tag)} packet after encrypted data")
        if packet.tag == _PKESK:
            pkesk = _parse_pkesk(packet.body)
            if pkesk is not None:
                pkesks.append(pkesk)
        elif packet.tag == _SKESK:
            passphrases += 1
        elif packet.tag in (_SEIPD, _SED, _AEAD):
            data = packet
        elif packet.tag in (_LITERAL, _COMPRESSED, _ONE_PASS, _SIGNATURE):
            raise MalformedData("not an encrypted message: it is a signed or plain OpenPGP message")
        else:
            raise MalformedData(f"not an encrypted message: found a {_tag_name(packet.tag)}")
    if data is None:
        raise MalformedData("encrypted message has no encrypted data: truncated")
    return _Envelope(binary, tuple(pkesks), passphrases > 0 and not pkesks, data.tag, data.body)


def _session_key(pkesk: _Pkesk, key: _Key) -> tuple[int | None, bytes]:
    """(cipher, session key) from a v3 or v6 PKESK with our RSA or ECDH key. A v6 PKESK
    names no cipher (RFC 9580 5.1.3: the SEIPDv2 packet does): None."""
    if pkesk.version not in (3, 6) or key.version != 4:
        raise _Unsupported
    if pkesk.algo in _RSA and key.algo in _RSA:
        message = _rsa_session(pkesk, key)
    elif pkesk.algo == _ECDH and key.algo == _ECDH:
        message = _ecdh_session(pkesk, key)
    else:
        raise _Unsupported
    if pkesk.version == 6:
        session, check = message[:-2], message[-2:]
        if len(session) not in _AES.values() or _checksum16(session) != check:
            raise _NoSessionKey
        return None, session
    cipher, session, check = message[0], message[1:-2], message[-2:]
    if len(message) < 4 or _checksum16(session) != check:
        raise _NoSessionKey
    if _AES.get(cipher) != len(session):
        raise _Unsupported  # another cipher (or a bad key): Sequoia knows them all
    return cipher, session


def _rsa_session(pkesk: _Pkesk, key: _Key) -> bytes:
    n, e = (int.from_bytes(v, "big") for v in key.public)
    r = _plain_material(key)
    d, p, q = (int.from_bytes(r.mpi(), "big") for _ in range(3))
    encrypted = _Reader(pkesk.data, "RSA session key").mpi()
    try:
        private = rsa.RSAPrivateNumbers(
            p, q, d, d % (p - 1), d % (q - 1), rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, n)
        ).private_key()
        size = (n.bit_length() + 7) // 8
        return private.decrypt(encrypted.rjust(size, b"\0"), padding.PKCS1v15())
    except (ValueError, ZeroDivisionError, UnsupportedAlgorithm):
        raise _NoSessionKey from None


def _ecdh_session(pkesk: _Pkesk, key: _Key) -> bytes:
    """RFC 6637: ECDH shared point, KDF, AES key unwrap."""
    r = _Reader(pkesk.data, "ECDH session key")
    point, wrapped = r.mpi(), bytes(r.take(r.u8()))
    secret = _plain_material(key).mpi()
    curve, kdf = _CURVES.get(key.oid or b""), key.kdf or b""
    if len(kdf) < 4 or kdf[2] not in _HASHES or kdf[3] not in _AES:
        raise _Unsupported
    try:
        shared = _ecdh_shared(curve, secret, point)
    except (ValueError, UnsupportedAlgorithm):
        raise _NoSessionKey from None
    assert key.oid is not None
    params = (
        bytes([len(key.oid)])
        + key.oid
        + bytes([_ECDH])
        + kdf
        + b"Anonymous Sender    "
        + bytes.fromhex(key.fingerprint)
    )
    digest = hashlib.new(_HASHES[kdf[2]], b"\0\0\0\1" + shared + params).digest()
    try:
        message = aes_key_unwrap(digest[: _AES[kdf[3]]], wrapped)
    except (InvalidUnwrap, ValueError):
        raise _NoSessionKey from None
    pad = message[-1] if message else 0
    if not 0 < pad <= 8 or message[-pad:] != bytes([pad]) * pad:
        raise _NoSessionKey
    return message[:-pad]


def _ecdh_shared(curve: str | None, secret: bytes, point: bytes) -> bytes:
    if curve == "Cv25519":
        if len(point) != 33 or point[0] != 0x40 or len(secret) > 32:
            raise ValueError("bad Curve25519 point or key")
        native = bytes(reversed(secret.rjust(32, b"\0")))  # OpenPGP stores it big-endian
        peer = x25519.X25519PublicKey.from_public_bytes(point[1:])
        return x25519.X25519PrivateKey.from_private_bytes(native).exchange(peer)
    if curve in _NIST_CURVES:
        nist = _NIST_CURVES[curve]
        private = ec.derive_private_key(int.from_bytes(secret, "big"), nist)
        peer_key = ec.EllipticCurvePublicKey.from_encoded_point(nist, point)
        return private.exchange(ec.ECDH(), peer_key)
    raise _Unsupported


def _open_seipd_v1(body: _Buffer, cipher: int, session: bytes) -> _Buffer:
    """Decrypt a SEIPDv1 body and check its MDC; nothing is returned unless it holds."""
    plain = _aes_cfb(session, b"\0" * _AES_BLOCK, memoryview(body)[1:])
    prefix = _AES_BLOCK + 2
    if len(plain) < prefix + 22:
        raise IntegrityError("encrypted data is truncated; refusing to decrypt it")
    if plain[prefix - 4 : prefix - 2] != plain[prefix - 2 : prefix]:
        raise IntegrityError("encrypted data is corrupted (session key check failed)")
    digest = hashlib.sha1(memoryview(plain)[:-20], usedforsecurity=False).digest()
    if plain[-22:-20] != b"\xd3\x14" or not hmac.compare_digest(digest, plain[-20:]):
        raise IntegrityError(
            "integrity check (MDC) failed: the message was modified or corrupted; "
            "no plaintext released"
        )
    return memoryview(plain)[prefix:-22]


# RFC 9580 5.13.2: AEAD modes done in Python (EAX is not in `cryptography`: Sequoia's).
_AEAD_MODES: dict[int, tuple[Callable[[bytes], AESOCB3 | AESGCM], int]] = {
    2: (AESOCB3, 15),  # OCB, nonce octets
    3: (AESGCM, 12),  # GCM
}
_AEAD_TAG = 16
_MAX_CHUNK_OCTET = 16  # chunks of at most 4 MiB (RFC 9580 5.13.2)


def _open_seipd_v2(body: _Buffer, session: bytes) -> bytes:
    """Decrypt a SEIPDv2 body chunk by chunk; nothing is returned unless every chunk's
    tag and the final tag (which covers the total length: no truncation) hold."""
    r = _Reader(memoryview(body), "SEIPDv2 packet")
    version, cipher, aead, chunk_octet = r.u8(), r.u8(), r.u8(), r.u8()
    salt = bytes(r.take(32))
    if aead not in _AEAD_MODES or _AES.get(cipher) != len(session):
        raise _Unsupported
    if chunk_octet > _MAX_CHUNK_OCTET:
        raise MalformedData(f"SEIPDv2 chunk size octet {chunk_octet} is out of range")
    mode, nonce_size = _AEAD_MODES[aead]
    header = bytes([0xC0 | _SEIPD, version, cipher, aead, chunk_octet])
    derived = HKDF(hashes.SHA256(), len(session) + nonce_size - 8, salt, header).derive(session)
    sealer, iv = mode(derived[: len(session)]), derived[len(session) :]
    data = r.rest()
    if len(data) < _AEAD_TAG:
        raise IntegrityError("encrypted data is truncated; refusing to decrypt it")
    chunks, final = data[:-_AEAD_TAG], data[-_AEAD_TAG:]
    step, plain, index = (1 << (chunk_octet + 6)) + _AEAD_TAG, bytearray(), 0
    for start in range(0, len(chunks), step):
        plain += _aead_open(sealer, iv, index, chunks[start : start + step], header)
        index += 1
    _aead_open(sealer, iv, index, final, header + len(plain).to_bytes(8, "big"))
    return bytes(plain)


def _aead_open(
    sealer: AESOCB3 | AESGCM, iv: bytes, index: int, sealed: _Buffer, associated: bytes
) -> bytes:
    try:
        return sealer.decrypt(iv + index.to_bytes(8, "big"), bytes(sealed), associated)
    except (InvalidTag, ValueError):
        raise IntegrityError(
            "integrity check (AEAD) failed: the message was modified, truncated or "
            "corrupted; no plaintext released"
        ) from None


def _flatten(data: bytes, limit: int | None, depth: int = 0) -> list[_Packet]:
    """The packets of a (decrypted) message with compression layers opened."""
    out: list[_Packet] = []
    for packet in _packets(data, "OpenPGP message"):
        if packet.tag == _COMPRESSED:
            if depth >= _MAX_NESTING:
                raise MalformedData("OpenPGP message nests compressed data too deeply")
            out += _flatten(_decompress(packet.body, limit), limit, depth + 1)
        elif packet.tag in (_LITERAL, _ONE_PASS, _SIGNATURE):
            out.append(packet)
        elif packet.tag in (_PKESK, _SKESK, _SEIPD, _SED, _AEAD):
            raise MalformedData("encrypted data inside the message: not supported")
        elif packet.tag not in _IGNORED:
            raise MalformedData(f"unexpected {_tag_name(packet.tag)} packet in an OpenPGP message")
    return out


INLINE_OUTPUT = 1 << 20  # octets of plaintext that inline_only() lets through
_INLINE_BUDGET: ContextVar[int | None] = ContextVar("inline_budget", default=None)


@contextmanager
def inline_only(budget: int = INLINE_OUTPUT) -> Iterator[None]:
    """Within: decrypting stays cheap enough for an event loop, or raises NeedsWorker.
    That is a plaintext of more than budget octets after decompression, or a message
    only Sequoia reads (it decompresses into memory without a bound)."""
    token = _INLINE_BUDGET.set(budget)
    try:
        yield
    finally:
        _INLINE_BUDGET.reset(token)


def inline_budget() -> int | None:
    return _INLINE_BUDGET.get()


def _decompress(body: bytes, limit: int | None) -> bytes:
    """Decompress with a bound: never more than limit (+ framing slack) bytes of output."""
    if not body:
        raise MalformedData("empty compressed data packet")
    algo, data = body[0], body[1:]
    cap = 0 if limit is None else limit + _SLACK + 1
    budget = _INLINE_BUDGET.get()
    inline = False  # the event loop's budget, tighter than the caller's limit, applies
    if budget is not None and (not cap or budget + _SLACK + 1 < cap):
        cap, inline = budget + _SLACK + 1, True
    try:
        if algo == 0:
            out = data
        elif algo in (1, 2):  # ZIP is raw deflate, ZLIB has a header
            out = zlib.decompressobj(-15 if algo == 1 else 15).decompress(data, cap)
        elif algo == 3:
            out = bz2.BZ2Decompressor().decompress(data, cap or -1)
        else:
            raise MalformedData(f"unknown compression algorithm {algo}")
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise MalformedData(f"compressed data is corrupt ({exc})") from None
    if cap and len(out) >= cap:
        if inline:
            raise NeedsWorker(f"the compressed plaintext exceeds {budget} octets")
        raise _too_large(limit)
    return out


def _too_large(limit: int | None) -> OutputTooLarge:
    return OutputTooLarge(
        f"decrypted message is larger than the limit of {limit} bytes "
        "(possibly a compression bomb); not decrypted",
        limit,
    )


def _literal_view(packets: Sequence[_Packet], limit: int | None) -> memoryview:
    """The content of the message's one literal data packet, not yet copied."""
    literals = [p for p in packets if p.tag == _LITERAL]
    if len(literals) != 1:
        raise MalformedData(
            f"OpenPGP message has {len(literals)} literal data packets instead of one"
        )
    r = _Reader(memoryview(literals[0].body), "literal data packet")
    r.u8()  # format: binary, text or UTF-8; the bytes are what they are
    r.take(r.u8())  # file name
    r.take(4)  # date
    content = memoryview(r.rest())
    if limit is not None and len(content) > limit:
        raise _too_large(limit)
    return content


# ---------------------------------------------------------------------------- signatures


@dataclass(frozen=True, slots=True)
class _SigInfo:
    hash_algo: int | None
    created: datetime | None
    issuer_fpr: str | None
    issuer_key_id: str | None

    @property
    def handle(self) -> str | None:
        return self.issuer_fpr or self.issuer_key_id

    @property
    def key_id(self) -> str | None:
        return self.issuer_key_id or (_key_id(self.issuer_fpr) if self.issuer_fpr else None)


def _sig_info(body: bytes) -> _SigInfo:
    r = _Reader(body, "signature packet")
    version = r.u8()
    if version == 3:
        r.take(2)  # hashed length (5), type
        created = datetime.fromtimestamp(r.u32(), UTC)
        key_id = r.take(8).hex().upper()
        r.u8()
        return _SigInfo(r.u8(), created, None, key_id)
    if version not in (4, 6):
        raise MalformedData(f"unsupported signature version {version}")
    r.take(2)  # type, public-key algorithm
    hash_algo = r.u8()
    length = r.u16 if version == 4 else r.u32
    hashed = dict(_subpackets(r.take(length())))
    everything = {**dict(_subpackets(r.take(length()))), **hashed}
    created = hashed.get(2)
    issuer_fpr = everything.get(33)
    issuer = everything.get(16)
    return _SigInfo(
        hash_algo,
        datetime.fromtimestamp(int.from_bytes(created, "big"), UTC)
        if created and len(created) == 4
        else None,
        issuer_fpr[1:].hex().upper() if issuer_fpr and len(issuer_fpr) > 1 else None,
        issuer.hex().upper() if issuer and len(issuer) == 8 else None,
    )


def _subpackets(data: bytes) -> Iterator[tuple[int, bytes]]:
    r = _Reader(data, "signature subpacket area")
    while r.left():
        first = r.u8()
        if first < 192:
            size = first
        elif first < 255:
            size = ((first - 192) << 8) + r.u8() + 192
        else:
            size = r.u32()
        body = r.take(size)
        if body:
            yield body[0] & 0x7F, body[1:]


def _signature_packets(signature: bytes) -> list[_Packet]:
    packets = [p for p in _packets(_dearmor(signature), "signature") if p.tag not in _IGNORED]
    if not packets or any(p.tag != _SIGNATURE for p in packets):
        raise MalformedData("not a detached OpenPGP signature")
    return packets


# ============================================================================ Sequoia side

_NO_VALID_SIGNATURE = "no valid signatures found"
_BAD_STRUCTURE = "Unexpected message structure"
_NOT_SUITABLE = "No suitable"


def _error_text(exc: BaseException) -> str:
    text = str(exc).split("\n\nStack backtrace")[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _sequoia(what: str, default: type[CryptoError] = MalformedData) -> Iterator[None]:
    """Turn whatever pysequoia raises (RuntimeError, ValueError, Rust panics) into
    a CryptoError saying what we were doing."""
    try:
        yield
    except CryptoError:
        raise
    except Exception as exc:
        raise _converted(what, exc, default) from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":  # pyo3 panics derive from BaseException
            raise
        raise _converted(what, exc, CryptoError) from None


def _converted(what: str, exc: BaseException, default: type[CryptoError]) -> CryptoError:
    text = _error_text(exc)
    if "secret key material is encrypted" in text:
        return KeyLocked(f"{what}: the secret key is passphrase-protected; unlock it first")
    if type(exc).__name__ == "PanicException":
        return CryptoError(f"{what}: the OpenPGP library failed ({text})")
    return default(f"{what}: {text}")


_P = ParamSpec("_P")
_T = TypeVar("_T")


class _UsageError(ValueError):
    """A caller's mistake (bad argument), as opposed to bad OpenPGP data."""


def _guarded(func: Callable[_P, _T]) -> Callable[_P, _T]:
    """Last line of defence at the API boundary: hostile input that slips past the
    explicit checks still ends as CryptoError, never as IndexError or a crash."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return func(*args, **kwargs)
        except (CryptoError, TypeError, _UsageError):
            raise
        except RecursionError:
            raise MalformedData(f"{func.__name__}: input nests too deeply") from None
        except MemoryError:
            raise OutputTooLarge(f"{func.__name__}: input too large to process") from None
        except (ValueError, IndexError, KeyError, OverflowError, InvalidKey) as exc:
            raise MalformedData(
                f"{func.__name__}: malformed input ({type(exc).__name__}: {exc})"
            ) from None

    return wrapper


@dataclass(frozen=True)
class _Loaded:
    """One certificate as Sequoia sees it, plus what Python needs to know about it."""

    cert: pysequoia.Cert  # public part
    tsk: pysequoia.Tsk | None  # with secrets, if any
    fingerprint: str
    key_fingerprints: tuple[str, ...]  # primary first
    public_keys: tuple[_Key, ...]
    user_id_order: tuple[str, ...]  # as in the data given (Sequoia sorts them)
    # Time-dependent answers (capabilities, signer) and when they go stale: a parsed
    # key is cached (_load_public, _load_secret), and every message asks again.
    memo: dict[str, tuple[float, object]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @property
    def user_ids(self) -> tuple[str, ...]:
        """Valid user IDs in the order of the data (the primary one first, usually)."""
        valid = _user_ids(self.cert)
        rank = {u: i for i, u in enumerate(self.user_id_order)}
        return tuple(sorted(valid, key=lambda u: rank.get(u, len(rank))))

    @property
    def label(self) -> str:
        user_ids = self.user_ids
        return f"{self.fingerprint} ({user_ids[0]})" if user_ids else self.fingerprint


def _split_certs(binary: bytes) -> list[list[_Packet]]:
    groups: list[list[_Packet]] = []
    for packet in _packets(binary, "key data"):
        if packet.tag in (_PUBLIC_KEY, _SECRET_KEY):
            groups.append([packet])
        elif packet.tag in (_TRUST, _MARKER, _PADDING):  # GnuPG keyrings carry trust packets
            continue
        elif not groups:
            raise MalformedData(
                f"not an OpenPGP key: data starts with a {_tag_name(packet.tag)} packet"
            )
        else:
            groups[-1].append(packet)
    if not groups:
        raise MalformedData("no OpenPGP key found")
    return groups


def _load_group(group: Sequence[_Packet]) -> _Loaded:
    data = _join(group)
    with _sequoia("reading key"):
        if any(p.tag in _SECRET_TAGS for p in group):
            tsk = pysequoia.Tsk.from_bytes(data)
            cert = tsk.extract_certificate()
        else:
            tsk, cert = None, pysequoia.Cert.from_bytes(data)
        public = bytes(cert)
    keys = tuple(_parse_key(p) for p in _packets(public, "key") if p.tag in _KEY_TAGS)
    fingerprints = tuple(k.fingerprint for k in keys)
    order = tuple(p.body.decode("utf-8", "replace") for p in group if p.tag == _USER_ID)
    return _Loaded(cert, tsk, fingerprints[0], fingerprints, keys, order)


@functools.lru_cache(maxsize=512)
def _load_public(data: bytes) -> _Loaded:
    """Parsed public certificates are cached: verification looks them up often."""
    return _load_group(_packets(data, "key"))


@functools.lru_cache(maxsize=16)
def _load_secret(data: bytes) -> _Loaded:
    """The accounts' own keys, parsed once (not per message to sign); the store key
    that unseals them lives in this process anyway."""
    return _load_group(_packets(data, "secret key"))


def _load_all(data: bytes) -> tuple[_Loaded, ...]:
    # Cached too: splitting a keyring into certificates is Python packet parsing, and
    # every outgoing message names its recipients' certificates again. Not a whole
    # keyring file being imported, though: it would stay in memory.
    return (_load_all_cached if _cacheable(data) else _load_all_now)(data)


LOAD_CACHE_LIMIT = 64 * 1024  # octets: a certificate with many signatures fits


def _cacheable(data: object) -> bool:
    return type(data) is bytes and len(data) <= LOAD_CACHE_LIMIT


@functools.lru_cache(maxsize=512)
def _load_all_cached(data: bytes) -> tuple[_Loaded, ...]:
    return _load_all_now(data)


def _load_all_now(data: bytes) -> tuple[_Loaded, ...]:
    loaded = []
    for group in _split_certs(_dearmor(data)):
        secret = any(p.tag in _SECRET_TAGS for p in group)
        loaded.append((_load_secret if secret else _load_public)(_join(group)))
    return tuple(loaded)


MEMO_TTL = 60.0  # seconds; whole-certificate expiry ends a memo earlier, exactly


def _memo(loaded: _Loaded, name: str, compute: Callable[[], _T]) -> _T:
    """compute(), reused for MEMO_TTL but never past the certificate's expiry."""
    now = time.monotonic()
    known = loaded.memo.get(name)
    if known is not None and now < known[0]:
        return known[1]  # type: ignore[return-value]
    value = compute()
    deadline = now + MEMO_TTL
    expires = _expiration(loaded.cert)
    if expires is not None:
        deadline = min(deadline, now + (expires - datetime.now(UTC)).total_seconds())
    loaded.memo[name] = deadline, value
    return value


def _load_one(data: bytes, what: str) -> _Loaded:
    loaded = _load_all(data)
    if len(loaded) != 1:
        raise MalformedData(f"{what}: expected one key, found {len(loaded)}")
    return loaded[0]


def _user_ids(cert: pysequoia.Cert) -> tuple[str, ...]:
    try:
        return tuple(str(u) for u in cert.user_ids)
    except Exception:  # no valid self-signature under Sequoia's policy
        return ()


def _expiration(cert: pysequoia.Cert) -> datetime | None:
    try:
        return cert.expiration
    except Exception:
        return None


_ADDRESS_IN_BRACKETS = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>")
_BARE_ADDRESS = re.compile(r"[^<>\s@]+@[^<>\s@]+")


def _email(user_id: str) -> str | None:
    found = _ADDRESS_IN_BRACKETS.findall(user_id)
    address = found[-1] if found else user_id.strip()
    if not _BARE_ADDRESS.fullmatch(address):
        return None
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def _problem(loaded: _Loaded, now: datetime) -> tuple[SignatureStatus, str] | None:
    """Why a certificate is unusable as a whole right now: revoked or expired."""
    if loaded.cert.is_revoked:
        return SignatureStatus.REVOKED, f"key {loaded.fingerprint} has been revoked"
    expires = _expiration(loaded.cert)
    if expires is not None and expires <= now:
        return SignatureStatus.EXPIRED, f"key {loaded.fingerprint} expired on {expires:%Y-%m-%d}"
    return None


def _unusable_because(
    loaded: _Loaded, problem: tuple[SignatureStatus, str] | None, can_encrypt: bool
) -> str | None:
    if problem is not None:
        return problem[1]
    try:
        loaded.cert.user_ids  # noqa: B018 - raises when no self-signature is valid
    except Exception as exc:
        return (
            f"key {loaded.fingerprint} has no valid self-signature under Sequoia's policy "
            f"(e.g. SHA-1 or a weak algorithm): {_error_text(exc)}"
        )
    if not can_encrypt:
        return f"key {loaded.fingerprint} has no valid encryption-capable subkey"
    return None


def _capabilities(loaded: _Loaded) -> tuple[bool, bool]:
    """(can encrypt, can sign) by Sequoia's own rules: bound, alive, not revoked, flags."""
    return _memo(loaded, "capabilities", lambda: _probe_capabilities(loaded))


def _probe_capabilities(loaded: _Loaded) -> tuple[bool, bool]:
    """_capabilities() without the memo.

    pysequoia only applies those rules when choosing a secret key, so we give it the
    certificate with GnuPG "no secret here" stubs as secret keys and ask it for a
    decryptor and a signer: "No suitable ..." means there is no such key; anything
    else (the stub cannot be used) means there is one.
    """
    stubbed = b"".join(
        _encode(_STUB_TAG[p.tag], p.body + _GNU_DUMMY)
        if p.tag in _STUB_TAG
        else _encode(p.tag, p.body)
        for p in _packets(bytes(loaded.cert), "key")
    )
    try:
        probe = pysequoia.Tsk.from_bytes(stubbed)
    except Exception:  # e.g. v6 keys, which have no GnuPG stubs: ask the encryptor
        return _encrypts(loaded.cert), False
    return _offers(probe.decryptor), _offers(probe.signer)


def _offers(make: Callable[[], object]) -> bool:
    try:
        make()
    except Exception as exc:
        return _NOT_SUITABLE not in str(exc)
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        return False
    return True


def _encrypts(cert: pysequoia.Cert) -> bool:
    try:
        pysequoia.encrypt(b"", [cert], armor=False)
    except Exception:
        return False
    return True


class _CertLookup:
    """Sequoia's store callback: certificates by any of their key handles.

    It records the handles Sequoia asked for (the issuers of the signatures it saw)
    and never raises: an exception would escape through Rust into the caller.
    """

    def __init__(self, source: CertSource) -> None:
        self._fetch = source if callable(source) else None
        self._by_handle: dict[str, _Loaded] = {}
        self.requested: list[str] = []
        self.failure: str | None = None
        if not callable(source):
            for data in source:
                self._add_data(data)

    def _add_data(self, data: bytes) -> None:
        # A certificate we cannot read only costs its signatures a status, never the
        # whole message.
        try:
            self._add(_load_all(data))
        except CryptoError as exc:
            self.failure = f"unreadable certificate skipped: {exc}"

    def _add(self, loaded: Sequence[_Loaded]) -> None:
        for item in loaded:
            for fpr in item.key_fingerprints:
                self._by_handle.setdefault(fpr, item)
                self._by_handle.setdefault(_key_id(fpr), item)

    def find(self, handle: str | None) -> _Loaded | None:
        return self._by_handle.get(handle.upper()) if handle else None

    def __call__(self, handles: Sequence[str]) -> list[pysequoia.Cert]:
        try:
            wanted = [h.upper() for h in handles]
            self.requested += [h for h in wanted if h not in self.requested]
            if self._fetch is not None and wanted:
                for data in self._fetch(wanted):
                    self._add_data(data)
            found = {id(c): c for c in (self.find(h) for h in wanted) if c is not None}
            return [c.cert for c in found.values()]
        except Exception as exc:  # a broken cert or lookup must not abort the message
            self.failure = f"certificate lookup failed: {exc}"
            return []


def _signature_result(
    info: _SigInfo,
    valid: list[tuple[str, str]],
    lookup: _CertLookup,
    now: datetime,
) -> SignatureResult:
    """Status of one signature from what Sequoia accepted (valid: signing key and cert
    fingerprints, consumed as matched) and the state of the signer's certificate."""
    match = next((v for v in valid if _made_by(info, v[0])), None)
    if match is not None:
        valid.remove(match)
    loaded = lookup.find(match[1]) if match else lookup.find(info.handle)
    if loaded is None and info.handle != info.key_id:
        loaded = lookup.find(info.key_id)
    if loaded is None:
        detail = f"signed by unknown key {info.handle or '(no issuer given)'}"
        if lookup.failure:
            detail += f" ({lookup.failure})"
        return SignatureResult(
            SignatureStatus.UNKNOWN_KEY, info.issuer_fpr, info.key_id, info.created, detail
        )
    problem = _problem(loaded, now)
    status, detail = SignatureStatus.VALID, f"good signature by {loaded.label}"
    if problem and match:
        status, detail = problem[0], f"good signature, but {problem[1]}"
    elif problem:
        status, detail = problem[0], f"signature not accepted: {problem[1]}"
    elif not match:
        status = SignatureStatus.INVALID
        detail = f"bad signature: it does not match the data, or is not acceptable ({loaded.label})"
    return SignatureResult(status, loaded.fingerprint, info.key_id, info.created, detail)


def _made_by(info: _SigInfo, signing_key: str) -> bool:
    return info.issuer_fpr == signing_key or info.key_id == _key_id(signing_key)


def _sequoia_verify(
    signed: bytes, lookup: _CertLookup, signature: pysequoia.Sig | None = None
) -> tuple[bytes | None, list[tuple[str, str]]]:
    """Content and (signing key, certificate) of every signature Sequoia accepts."""
    try:
        result = pysequoia.verify(bytes=signed, store=lookup, signature=signature)
    except Exception as exc:
        if _NO_VALID_SIGNATURE in str(exc):
            return None, []
        raise _converted("verifying signature", exc, MalformedData) from None
    valid = [(v.signing_key.upper(), v.certificate.upper()) for v in result.valid_sigs]
    return result.bytes, valid


@dataclass(frozen=True, slots=True)
class _OwnKey:
    loaded: _Loaded
    key: _Key  # the (sub)key a session key packet names
    state: str  # plain, locked or stub


def _own_keys(secret_keys: Sequence[bytes]) -> list[_OwnKey]:
    return [
        own
        for data in secret_keys
        for own in (_cached_own_keys if _cacheable(data) else _own_keys_of)(data)
    ]


def _own_keys_of(data: bytes) -> tuple[_OwnKey, ...]:
    out = []
    for group in _split_certs(_dearmor(data)):
        secret = [p for p in group if p.tag in _SECRET_TAGS]
        if not secret:
            continue
        loaded = _load_group(group)
        for packet in secret:
            try:
                out.append(_OwnKey(loaded, _parse_key(packet), _secret_state(packet)))
            except MalformedData:  # a key we cannot use must not hide the others
                continue
    return tuple(out)


# Own secret keys, parsed once like _load_secret's; each message to decrypt asks again.
_cached_own_keys = functools.lru_cache(maxsize=16)(_own_keys_of)


def _candidates(envelope: _Envelope, own: Sequence[_OwnKey]) -> list[tuple[_Pkesk, _OwnKey]]:
    pairs = []
    for pkesk in envelope.pkesks:
        for mine in own:
            if pkesk.key_id is None:  # anonymous: try every key of the same algorithm
                if mine.key.algo == pkesk.algo:
                    pairs.append((pkesk, mine))
            elif mine.key.key_id == pkesk.key_id:
                pairs.append((pkesk, mine))
    return pairs


SPOOL_THRESHOLD = 1 << 20  # octets of plaintext from which encryption streams
_READ_CHUNK = 1 << 20


def _can_spool() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _crlf(armored: bytes) -> bytes:
    return armored.replace(b"\n", b"\r\n")  # Sequoia armors with LF line ends only


def _encrypt_spooled(
    parts: Sequence[bytes | memoryview],
    certs: list[pysequoia.Cert],
    signing: pysequoia.PySigner | None,
    out: bytearray,
) -> bytearray:
    """Encrypt through files, so that Sequoia neither gets a joined copy of the
    plaintext nor grows its output in memory (about three times the message):
    the plaintext goes in through an anonymous memory file, never the disk, and the
    ciphertext comes out through a temporary file (ciphertext only), armored here
    into ``out`` (Sequoia's own armor writes line by line: eight times slower)."""
    plain = os.memfd_create("localproxy-plaintext", os.MFD_CLOEXEC)
    try:
        for part in parts:
            _write_all(plain, part)
        with tempfile.NamedTemporaryFile(prefix="localproxy-ciphertext-") as cipher:
            with _sequoia("encrypting"):
                pysequoia.encrypt_file(
                    f"/proc/self/fd/{plain}", cipher.name, certs, signer=signing, armor=False
                )
            os.close(plain)  # the plaintext copy goes before the ciphertext comes in
            plain = -1
            _armor_into(out, cipher.fileno())
    finally:
        if plain >= 0:
            os.close(plain)
    return out


_ARMOR_OCTETS = 48  # octets per armor line: 64 base64 characters, as Sequoia writes
_ARMOR_CHUNK = _ARMOR_OCTETS * 21_000  # about 1 MB read at a time, whole lines


def _armor_into(out: bytearray, fd: int) -> None:
    """An armored PGP MESSAGE (RFC 9580 6.2, no CRC like Sequoia's) of the binary
    data in fd, appended to out with CRLF line ends."""
    out += b"-----BEGIN PGP MESSAGE-----\r\n\r\n"
    pending = b""
    while chunk := os.read(fd, _ARMOR_CHUNK):
        pending += chunk
        whole = len(pending) - len(pending) % _ARMOR_OCTETS
        _armor_lines(out, pending[:whole])
        pending = pending[whole:]
    _armor_lines(out, pending)
    out += b"-----END PGP MESSAGE-----\r\n"


def _armor_lines(out: bytearray, data: bytes) -> None:
    encoded = binascii.b2a_base64(data, newline=False)
    width = _ARMOR_OCTETS * 4 // 3
    for start in range(0, len(encoded), width):
        out += encoded[start : start + width]
        out += b"\r\n"


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class SequoiaEngine:
    """The default engine: Sequoia-PGP through pysequoia, see the module docstring."""

    name = "sequoia"

    def __init__(self, *, s2k_count: int = 0xFF) -> None:
        # Iterated S2K count octet for protect(): 0xFF hashes 65 MB, about 0.05 s.
        self._s2k_count = s2k_count

    # ------------------------------------------------------------------ keys

    @_guarded
    def parse_certs(self, data: bytes) -> list[CertInfo]:
        return [self._info(loaded) for loaded in _load_all(data)]

    def _info(self, loaded: _Loaded) -> CertInfo:
        now = datetime.now(UTC)
        user_ids = loaded.user_ids
        emails = dict.fromkeys(e for e in map(_email, user_ids) if e)
        problem = _problem(loaded, now)
        can_encrypt, can_sign = _capabilities(loaded) if problem is None else (False, False)
        states = []
        if loaded.tsk is not None:
            tsk_packets = _packets(bytes(loaded.tsk), "secret key")
            states = [_tolerant_state(p) for p in tsk_packets if p.tag in _SECRET_TAGS]
        real = [s for s in states if s != "stub"]
        algorithms_ = dict.fromkeys(k.description for k in loaded.public_keys)
        return CertInfo(
            fingerprint=loaded.fingerprint,
            user_ids=user_ids,
            emails=tuple(emails),
            algorithm=" + ".join(algorithms_),
            created=loaded.public_keys[0].created,
            expires=_expiration(loaded.cert),
            revoked=loaded.cert.is_revoked,
            can_encrypt=can_encrypt,
            can_sign=can_sign,
            has_secret=bool(real),
            secret_locked="locked" in real,
            data=bytes(loaded.tsk) if loaded.tsk is not None else bytes(loaded.cert),
            subkey_fingerprints=loaded.key_fingerprints[1:],
            problem=_unusable_because(loaded, problem, can_encrypt),
        )

    @_guarded
    def generate_key(
        self,
        user_ids: Sequence[str],
        passphrase: str | None = None,
        *,
        expires_in: timedelta | None = None,
        created: datetime | None = None,
    ) -> CertInfo:
        user_ids = list(user_ids)
        if not user_ids or any(not u.strip() or set(u) & set("\r\n\0") for u in user_ids):
            raise _UsageError(f"user IDs must be non-empty single lines: {user_ids!r}")
        if expires_in is not None and expires_in.total_seconds() < 1:
            raise _UsageError("expires_in must be at least one second")
        when = (created or datetime.now(UTC)).replace(microsecond=0)
        data = _generate_tsk(user_ids, when, expires_in)
        if passphrase:
            data = self.protect(data, passphrase)
        return self._info(_load_group(_packets(data, "generated key")))

    @_guarded
    def merge(self, existing: bytes, update: bytes) -> CertInfo:
        base = _split_certs(_dearmor(existing))
        if len(base) != 1:
            raise MalformedData(f"merge: expected one existing key, found {len(base)}")
        fingerprint = _parse_key(base[0][0]).fingerprint
        updates = [
            g for g in _split_certs(_dearmor(update)) if _parse_key(g[0]).fingerprint == fingerprint
        ]
        if not updates:
            raise MalformedData(f"merge: the update holds no copy of key {fingerprint}")
        merged = base[0]
        for group in updates:
            merged = _merge_groups(merged, group)
        return self._info(_load_group(merged))

    @_guarded
    def public_only(self, cert: bytes) -> bytes:
        return b"".join(bytes(loaded.cert) for loaded in _load_all(cert))

    @_guarded
    def unlock(self, secret: bytes, passphrase: str) -> bytes:
        packets = self._secret_packets(secret, "unlock")
        derived: dict[bytes, bytes] = {}
        secret_bytes = passphrase.encode("utf-8")
        out = []
        for packet in packets:
            if packet.tag in _SECRET_TAGS:
                key = _parse_key(packet)
                packet = _Packet(
                    packet.tag, key.public_body + _unlocked_secret(key, secret_bytes, derived)
                )
            out.append(packet)
        with _sequoia("unlocking secret key"):
            return bytes(pysequoia.Tsk.from_bytes(_join(out)))

    @_guarded
    def protect(self, secret: bytes, passphrase: str) -> bytes:
        if not passphrase:
            raise BadPassphrase("refusing to protect a secret key with an empty passphrase")
        packets = self._secret_packets(secret, "protect")
        s2k = bytes([_S2K_ITERATED, 8]) + secrets.token_bytes(8) + bytes([self._s2k_count])
        aes_key = _s2k_key(s2k, passphrase.encode("utf-8"), 32)
        out = []
        for packet in packets:
            if packet.tag in _SECRET_TAGS:
                key = _parse_key(packet)
                packet = _Packet(packet.tag, key.public_body + _protected_secret(key, aes_key, s2k))
            out.append(packet)
        with _sequoia("protecting secret key"):
            return bytes(pysequoia.Tsk.from_bytes(_join(out)))

    @staticmethod
    def _secret_packets(secret: bytes, what: str) -> list[_Packet]:
        groups = _split_certs(_dearmor(secret))
        if len(groups) != 1:
            raise MalformedData(f"{what}: expected one secret key, found {len(groups)} keys")
        if not any(p.tag in _SECRET_TAGS for p in groups[0]):
            fingerprint = _parse_key(groups[0][0]).fingerprint
            raise NoUsableKey(
                f"{what}: {fingerprint} is a public key, not a secret key", fingerprint
            )
        return groups[0]

    @_guarded
    def revoke(self, secret: bytes) -> bytes:
        loaded = self._one_secret(secret)
        assert loaded.tsk is not None
        with _sequoia("revoking key"):
            signature = loaded.cert.revoke(loaded.tsk.certifier())
            revocation = _packets(bytes(signature), "revocation")
            packets = _packets(bytes(loaded.tsk), "secret key")
            merged = [packets[0], *revocation, *packets[1:]]
            return bytes(pysequoia.Tsk.from_bytes(_join(merged)))

    def _one_secret(self, secret: bytes) -> _Loaded:
        loaded = _load_one(secret, "secret key")
        if loaded.tsk is None:
            raise NoUsableKey(
                f"{loaded.fingerprint} is a public key; a secret key is needed", loaded.fingerprint
            )
        return loaded

    # ------------------------------------------------------------------ encrypt, sign

    @_guarded
    def encrypt(
        self,
        plaintext: bytes,
        recipients: Sequence[bytes],
        signer: bytes | None = None,
        armor: bool = True,
    ) -> bytes:
        certs, signing = self._encryption_keys(recipients, signer)
        with _sequoia("encrypting"):
            return bytes(pysequoia.encrypt(plaintext, certs, signer=signing, armor=armor))

    @_guarded
    def encrypt_armored(
        self,
        parts: Sequence[bytes | memoryview],
        recipients: Sequence[bytes],
        signer: bytes | None = None,
        *,
        prefix: bytes = b"",
    ) -> bytearray:
        certs, signing = self._encryption_keys(recipients, signer)
        if sum(map(len, parts)) < SPOOL_THRESHOLD or not _can_spool():
            with _sequoia("encrypting"):
                armored = pysequoia.encrypt(b"".join(parts), certs, signer=signing)
            return bytearray(prefix) + _crlf(armored)
        return _encrypt_spooled(parts, certs, signing, bytearray(prefix))

    def _encryption_keys(
        self, recipients: Sequence[bytes], signer: bytes | None
    ) -> tuple[list[pysequoia.Cert], pysequoia.PySigner | None]:
        certs = {}
        for data in recipients:
            for loaded in _load_all(data):
                certs.setdefault(loaded.fingerprint, loaded)
        if not certs:
            raise NoUsableKey("encrypt: no recipients given")
        for loaded in certs.values():
            self._check_recipient(loaded)
        signing = self._signer(signer) if signer is not None else None
        return [c.cert for c in certs.values()], signing

    @staticmethod
    def _check_recipient(loaded: _Loaded) -> None:
        # pysequoia falls back to expired subkeys and ignores certificate revocation,
        # so every recipient is checked here first.
        problem = _problem(loaded, datetime.now(UTC))
        if problem is not None:
            kind = KeyRevoked if problem[0] is SignatureStatus.REVOKED else KeyExpired
            raise kind(f"cannot encrypt to {loaded.label}: {problem[1]}", loaded.fingerprint)
        if not _capabilities(loaded)[0]:
            raise NoUsableKey(
                f"cannot encrypt to {loaded.label}: no valid encryption-capable subkey "
                "(missing, expired or revoked)",
                loaded.fingerprint,
            )

    def _signer(self, secret: bytes) -> pysequoia.PySigner:
        loaded = self._one_secret(secret)
        tsk = loaded.tsk
        assert tsk is not None
        try:
            return _memo(loaded, "signer", tsk.signer)
        except Exception as exc:
            if _NOT_SUITABLE not in str(exc):
                raise _converted(f"signing with {loaded.fingerprint}", exc, MalformedData) from None
        problem = _problem(loaded, datetime.now(UTC))
        if problem is not None:
            kind = KeyRevoked if problem[0] is SignatureStatus.REVOKED else KeyExpired
            raise kind(f"cannot sign with {loaded.label}: {problem[1]}", loaded.fingerprint)
        raise NoUsableKey(
            f"cannot sign with {loaded.label}: no valid signing-capable key", loaded.fingerprint
        )

    @_guarded
    def sign_detached(self, data: bytes, signer: bytes, armor: bool = True) -> bytes:
        signing = self._signer(signer)
        with _sequoia("signing"):
            mode = pysequoia.SignatureMode.DETACHED
            return bytes(pysequoia.sign(signing, data, mode=mode, armor=armor))

    @_guarded
    def micalg(self, signature: bytes) -> str:
        hash_algo = _sig_info(_signature_packets(signature)[0].body).hash_algo
        if hash_algo not in _HASHES:
            raise MalformedData(f"signature uses unknown hash algorithm {hash_algo}")
        return "pgp-" + _MICALG_NAMES.get(hash_algo, _HASHES[hash_algo])

    @_guarded
    def armor(self, data: bytes, kind: str = "message") -> bytes:
        kinds = {
            "message": pysequoia.ArmorKind.Message,
            "public-key": pysequoia.ArmorKind.PublicKey,
            "secret-key": pysequoia.ArmorKind.SecretKey,
            "private-key": pysequoia.ArmorKind.SecretKey,
            "signature": pysequoia.ArmorKind.Signature,
        }
        if kind not in kinds:
            raise _UsageError(f"unknown armor kind {kind!r}; expected one of {sorted(kinds)}")
        binary = _dearmor(data)
        with _sequoia("armoring"):
            return pysequoia.armor(binary, kinds[kind]).encode("ascii")

    # ------------------------------------------------------------------ verify

    @_guarded
    def verify_detached(
        self, data: bytes, signature: bytes, certs: CertSource = ()
    ) -> tuple[SignatureResult, ...]:
        lookup, now, results = _CertLookup(certs), datetime.now(UTC), []
        for packet in _signature_packets(signature):
            info = _sig_info(packet.body)
            try:
                with _sequoia("reading signature"):
                    sig = pysequoia.Sig.from_bytes(_encode(_SIGNATURE, packet.body))
                _, valid = _sequoia_verify(data, lookup, sig)
            except CryptoError as exc:
                results.append(_unverifiable(info, str(exc)))
                continue
            results.append(_signature_result(info, valid, lookup, now))
        return tuple(results)

    @_guarded
    def verify_inline(
        self, signed_message: bytes, certs: CertSource = (), max_output: int | None = None
    ) -> tuple[bytes, tuple[SignatureResult, ...]]:
        lookup = _CertLookup(certs)
        if bytes(signed_message[:4096]).lstrip().startswith(_CLEARTEXT_BEGIN):
            text, signature = _parse_cleartext(signed_message)
            content, valid = _sequoia_verify(signed_message, lookup)
            infos = [_sig_info(p.body) for p in _signature_packets(signature)]
        else:
            packets = _flatten(_dearmor(signed_message), max_output)
            text = bytes(_literal_view(packets, max_output))
            infos = [_sig_info(p.body) for p in packets if p.tag == _SIGNATURE]
            content, valid = _sequoia_verify(_join(packets), lookup) if infos else (None, [])
        now = datetime.now(UTC)
        results = tuple(_signature_result(i, valid, lookup, now) for i in infos)
        # What a valid signature covers is what Sequoia read, never our own parse:
        # no room for two parsers to disagree about the signed text.
        return (content if content is not None else text), results

    # ------------------------------------------------------------------ decrypt

    @_guarded
    def decrypt(
        self,
        ciphertext: bytes,
        secret_keys: Sequence[bytes],
        verify_certs: CertSource = (),
        max_output: int | None = None,
    ) -> DecryptResult:
        envelope = _envelope(_dearmor(ciphertext))
        if envelope.tag == _SED:
            raise IntegrityError(
                "message has no integrity protection (encrypted without MDC); refusing to "
                "decrypt it, as a modified message could leak its plaintext (EFAIL)"
            )
        own = _own_keys(secret_keys)
        pairs = self._usable_pairs(envelope, own)
        lookup = _CertLookup(verify_certs)
        result = self._decrypt_python(envelope, pairs, lookup, max_output)
        if result is None:
            result = self._decrypt_sequoia(envelope, pairs, lookup, max_output)
        return result

    @staticmethod
    def _usable_pairs(envelope: _Envelope, own: Sequence[_OwnKey]) -> list[tuple[_Pkesk, _OwnKey]]:
        recipients = envelope.recipients
        if envelope.passphrase_only:
            raise DecryptionFailed("message is encrypted with a passphrase, not to a key")
        pairs = _candidates(envelope, own)
        if not pairs:
            ours = ", ".join(dict.fromkeys(o.key.key_id for o in own)) or "none"
            raise DecryptionFailed(
                f"message is not encrypted to any of our keys: it is for key ID(s) "
                f"{', '.join(recipients) or 'none'}; our keys are {ours}",
                recipients,
            )
        usable = [(p, o) for p, o in pairs if o.state == "plain"]
        if not usable:
            _, mine = pairs[0]
            if mine.state == "locked":
                raise KeyLocked(
                    f"secret key {mine.key.fingerprint} is passphrase-protected; unlock it first",
                    mine.key.fingerprint,
                )
            raise DecryptionFailed(
                f"the secret part of key {mine.key.fingerprint} is not available here "
                "(offline key or smartcard stub)",
                recipients,
            )
        return usable

    def _decrypt_python(
        self,
        envelope: _Envelope,
        pairs: Sequence[tuple[_Pkesk, _OwnKey]],
        lookup: _CertLookup,
        limit: int | None,
    ) -> DecryptResult | None:
        version = envelope.body[0] if envelope.tag == _SEIPD and envelope.body else None
        if version not in (1, 2):
            return None  # GnuPG's OCB packets and the like: Sequoia's job
        failed, unsupported = [], False
        for pkesk, mine in pairs:
            try:
                if pkesk.version != (3 if version == 1 else 6):
                    raise _Unsupported  # RFC 9580 pairs v3 with SEIPDv1, v6 with v2
                cipher, session = _session_key(pkesk, mine.key)
                if cipher is not None:
                    inner = _open_seipd_v1(envelope.body, cipher, session)
                else:
                    inner = _open_seipd_v2(envelope.body, session)
            except _Unsupported:
                unsupported = True
                continue
            except _NoSessionKey:
                failed.append(mine.key.fingerprint)
                continue
            return self._unwrapped(inner, mine.key.fingerprint, envelope, lookup, limit)
        if unsupported:
            return None
        raise DecryptionFailed(
            f"could not decrypt the session key with {', '.join(failed)}: the message is "
            "corrupted or was not encrypted to this key",
            envelope.recipients,
        )

    @staticmethod
    def _unwrapped(
        inner: bytes,
        decrypted_with: str,
        envelope: _Envelope,
        lookup: _CertLookup,
        limit: int | None,
    ) -> DecryptResult:
        packets = _flatten(inner, limit)
        literal = _literal_view(packets, limit)
        infos = [_sig_info(p.body) for p in packets if p.tag == _SIGNATURE]
        results: tuple[SignatureResult, ...] = ()
        content = None
        if infos:
            try:
                content, valid = _sequoia_verify(_join(packets), lookup)
            except CryptoError as exc:  # integrity held: the plaintext is the sender's
                results = tuple(_unverifiable(i, str(exc), SignatureStatus.INVALID) for i in infos)
            else:
                now = datetime.now(UTC)
                results = tuple(_signature_result(i, valid, lookup, now) for i in infos)
        plaintext = content if content is not None else bytes(literal)
        return DecryptResult(plaintext, results, decrypted_with, envelope.recipients)

    def _decrypt_sequoia(
        self,
        envelope: _Envelope,
        pairs: Sequence[tuple[_Pkesk, _OwnKey]],
        lookup: _CertLookup,
        limit: int | None,
    ) -> DecryptResult:
        """Messages the Python path does not handle. Limitations: pysequoia decrypts
        into memory first (max_output is checked afterwards), uses only the newest
        alive encryption subkey, and cannot verify signatures in compressed messages."""
        if _INLINE_BUDGET.get() is not None:
            raise NeedsWorker("only Sequoia decrypts this message, without a bound")
        errors: list[CryptoError] = []
        tried: set[str] = set()
        for _, mine in pairs:
            if mine.loaded.fingerprint in tried:
                continue
            tried.add(mine.loaded.fingerprint)
            try:
                return self._sequoia_once(envelope, mine, lookup, limit)
            except (DecryptionFailed, NoUsableKey) as exc:
                errors.append(exc)
        raise errors[0]

    def _sequoia_once(
        self, envelope: _Envelope, mine: _OwnKey, lookup: _CertLookup, limit: int | None
    ) -> DecryptResult:
        assert mine.loaded.tsk is not None
        tsk, fpr = mine.loaded.tsk, mine.loaded.fingerprint
        try:
            tsk.decryptor()
        except Exception as exc:
            if _NOT_SUITABLE in str(exc):
                raise NoUsableKey(
                    f"key {fpr} has no alive encryption subkey that this engine can decrypt with",
                    fpr,
                ) from None
            raise _converted(f"decrypting with {fpr}", exc, MalformedData) from None
        note = None
        try:
            result = self._sequoia_decrypt_call(envelope.binary, tsk, lookup)
        except _SequoiaSignatureTrouble as trouble:
            note = trouble.note
            result = self._sequoia_decrypt_call(envelope.binary, tsk, None)
        plaintext = result.bytes or b""
        if limit is not None and len(plaintext) > limit:
            raise _too_large(limit)
        valid = [(v.signing_key.upper(), v.certificate.upper()) for v in result.valid_sigs]
        now = datetime.now(UTC)
        results = []
        for handle in lookup.requested:
            fpr_or_id = (handle, None) if len(handle) > 16 else (None, handle)
            info = _SigInfo(None, None, *fpr_or_id)
            if note is not None and not any(_made_by(info, v[0]) for v in valid):
                results.append(_unverifiable(info, note))
            else:
                results.append(_signature_result(info, valid, lookup, now))
        return DecryptResult(plaintext, tuple(results), mine.key.fingerprint, envelope.recipients)

    @staticmethod
    def _sequoia_decrypt_call(
        binary: bytes, tsk: pysequoia.Tsk, lookup: _CertLookup | None
    ) -> pysequoia.Decrypted:
        try:
            return pysequoia.decrypt(binary, tsk.decryptor(), store=lookup)
        except Exception as exc:
            text = _error_text(exc)
            if lookup is not None and _BAD_STRUCTURE in text:
                raise _SequoiaSignatureTrouble(
                    "pysequoia 0.1.35 cannot verify signatures inside compressed messages"
                ) from None
            if lookup is not None and _NO_VALID_SIGNATURE in text:
                raise _SequoiaSignatureTrouble(None) from None
            raise _decrypt_error(text) from None


class _SequoiaSignatureTrouble(Exception):
    def __init__(self, note: str | None) -> None:
        super().__init__(note)
        self.note = note


def _decrypt_error(text: str) -> CryptoError:
    lowered = text.lower()
    if any(s in lowered for s in ("manipulated", "mdc", "authentication", "missing session key")):
        return IntegrityError(f"integrity check failed, no plaintext released: {text}")
    if "policy rejected packet type" in lowered:
        return IntegrityError(f"message uses a packet type refused for safety: {text}")
    if "no key to decrypt" in lowered:
        return DecryptionFailed(f"our key does not open this message: {text}")
    return MalformedData(f"decrypting: {text}")


def _unverifiable(
    info: _SigInfo, why: str, status: SignatureStatus = SignatureStatus.UNVERIFIABLE
) -> SignatureResult:
    return SignatureResult(status, info.issuer_fpr, info.key_id, info.created, why)


def _parse_cleartext(message: bytes) -> tuple[bytes, bytes]:
    """(text, armored signature) of a cleartext-signed message (RFC 9580 section 7)."""
    lines = message.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == _CLEARTEXT_BEGIN), None)
    if start is None:
        raise MalformedData("not a cleartext-signed message")
    body = start + 1
    while body < len(lines) and lines[body].strip():  # "Hash: ..." headers
        body += 1
    end = next(
        (
            i
            for i in range(body + 1, len(lines))
            if lines[i].strip() == b"-----BEGIN PGP SIGNATURE-----"
        ),
        None,
    )
    if end is None:
        raise MalformedData("cleartext-signed message has no signature block: truncated")
    text = [line[2:] if line.startswith(b"- ") else line for line in lines[body + 1 : end]]
    return b"\n".join(text), b"\n".join(lines[end:])


def _merge_groups(base: list[_Packet], update: list[_Packet]) -> list[_Packet]:
    """Both copies' packets, the update's key-level signatures right after the primary
    key; Sequoia then merges duplicates and keeps every valid signature."""
    if not any(p.tag in _SECRET_TAGS for p in base) and any(p.tag in _SECRET_TAGS for p in update):
        base, update = update, base

    def split(group: list[_Packet]) -> tuple[list[_Packet], list[_Packet]]:
        n = 1
        while n < len(group) and group[n].tag == _SIGNATURE:
            n += 1
        return group[1:n], group[n:]

    base_sigs, base_rest = split(base)
    update_sigs, update_rest = split(update)
    return [base[0], *base_sigs, *update_sigs, *base_rest, *update_rest]


ENGINES: dict[str, Callable[[], OpenPGPEngine]] = {"sequoia": SequoiaEngine}


@functools.cache
def default_engine() -> OpenPGPEngine:
    return SequoiaEngine()
