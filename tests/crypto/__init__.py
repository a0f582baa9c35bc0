"""Helpers for the crypto tests: crafting OpenPGP packets an engine must handle or refuse.

Written independently of localproxy's own packet code on purpose, so the tests do
not share its bugs. Only what the tests need: new-format packets, v4 Cv25519 ECDH
recipients, SEIPDv1 (with MDC), SEIPDv2 (OCB, v6 PKESK) and SED (without) encryption.
"""

from __future__ import annotations

import bz2
import hashlib
import os
import zlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment]

CV25519_OID = bytes.fromhex("2b060104019755010501")


def packet(tag: int, body: bytes) -> bytes:
    """A new-format packet (five-octet length when needed)."""
    short = len(body) < 192
    head = bytes([len(body)]) if short else b"\xff" + len(body).to_bytes(4, "big")
    return bytes([0xC0 | tag]) + head + body


def packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of binary OpenPGP data without partial lengths."""
    out, pos = [], 0
    while pos < len(data):
        ctb = data[pos]
        if ctb & 0x40:
            tag, first = ctb & 0x3F, data[pos + 1]
            if first < 192:
                size, head = first, 2
            elif first < 224:
                size, head = ((first - 192) << 8) + data[pos + 2] + 192, 3
            else:
                size, head = int.from_bytes(data[pos + 2 : pos + 6], "big"), 6
        else:
            tag, n = (ctb >> 2) & 0x0F, (1, 2, 4)[ctb & 3]
            size, head = int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), 1 + n
        out.append((tag, data[pos + head : pos + head + size]))
        pos += head + size
    return out


def join(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(packet(tag, body) for tag, body in items)


def literal(data: bytes) -> bytes:
    return packet(11, b"b\x00" + b"\x00\x00\x00\x00" + data)


def compressed(inner: bytes, algo: int = 2) -> bytes:
    """A compressed data packet: 1 ZIP (raw deflate), 2 ZLIB, 3 BZip2."""
    if algo == 1:
        squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = squeezer.compress(inner) + squeezer.flush()
    elif algo == 2:
        data = zlib.compress(inner, 9)
    else:
        data = bz2.compress(inner, 9)
    return packet(8, bytes([algo]) + data)


def bomb(size: int, algo: int = 2) -> bytes:
    """A compressed literal packet that expands to more than size bytes."""
    head = b"\xcb\xff" + (size + 6).to_bytes(4, "big") + b"b\x00\x00\x00\x00\x00"
    if algo == 3:
        return packet(8, b"\x03" + bz2.compress(head + bytes(size), 9))
    squeezer = zlib.compressobj(9)
    chunks = [squeezer.compress(head)]
    block = bytes(1 << 20)
    for _ in range(size >> 20):
        chunks.append(squeezer.compress(block))
    chunks.append(squeezer.flush())
    return packet(8, b"\x02" + b"".join(chunks))


@dataclass(frozen=True)
class Recipient:
    """What a sender needs from a v4 Cv25519 encryption subkey."""

    key_id: bytes
    fingerprint: bytes
    point: bytes
    kdf: bytes  # with its length octet


def cv25519_recipient(cert: bytes) -> Recipient:
    """The first Cv25519 ECDH (sub)key of a binary certificate."""
    for tag, body in packets(cert):
        if tag in (6, 14) and body[5] == 18 and body[7 : 7 + body[6]] == CV25519_OID:
            pos = 7 + body[6]
            bits = int.from_bytes(body[pos : pos + 2], "big")
            point = body[pos + 2 : pos + 2 + (bits + 7) // 8]
            pos += 2 + len(point)
            kdf = body[pos : pos + 1 + body[pos]]
            framed = b"\x99" + len(body).to_bytes(2, "big") + body
            fpr = hashlib.sha1(framed).digest()
            return Recipient(fpr[-8:], fpr, point, kdf)
    raise ValueError("no Cv25519 encryption key in certificate")


def pkesk(
    recipient: Recipient,
    session: bytes,
    cipher: int = 9,
    anonymous: bool = False,
    version: int = 3,
) -> bytes:
    """A v3 (or v6, RFC 9580 5.1.2) PKESK packet wrapping session for recipient (RFC 6637)."""
    ephemeral = x25519.X25519PrivateKey.generate()
    shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient.point[1:]))
    params = (
        bytes([len(CV25519_OID)])
        + CV25519_OID
        + b"\x12"
        + recipient.kdf
        + b"Anonymous Sender    "
        + recipient.fingerprint
    )
    hash_name = {8: "sha256", 9: "sha384", 10: "sha512"}[recipient.kdf[2]]
    kek_size = {7: 16, 8: 24, 9: 32}[recipient.kdf[3]]
    kek = hashlib.new(hash_name, b"\0\0\0\1" + shared + params).digest()[:kek_size]
    message = session + (sum(session) & 0xFFFF).to_bytes(2, "big")
    if version == 3:  # a v6 PKESK leaves the cipher to the SEIPDv2 packet
        message = bytes([cipher]) + message
    pad = 8 - len(message) % 8
    wrapped = aes_key_wrap(kek, message + bytes([pad]) * pad)
    point = b"\x40" + ephemeral.public_key().public_bytes_raw()
    if version == 6:
        names = b"" if anonymous else b"\x04" + recipient.fingerprint
        head = b"\x06" + bytes([len(names)]) + names
    else:
        head = b"\x03" + (bytes(8) if anonymous else recipient.key_id)
    body = head + b"\x12" + (263).to_bytes(2, "big") + point + bytes([len(wrapped)]) + wrapped
    return packet(1, body)


def _cfb(key: bytes, iv: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), CFB(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def seipd(session: bytes, inner: bytes, mdc: bytes | None = None) -> bytes:
    """A SEIPDv1 packet; mdc overrides the correct MDC (to test that it is checked)."""
    prefix = os.urandom(16)
    plain = prefix + prefix[-2:] + inner + b"\xd3\x14"
    plain += mdc if mdc is not None else hashlib.sha1(plain).digest()
    return packet(18, b"\x01" + _cfb(session, bytes(16), plain))


def seipd_v2(session: bytes, inner: bytes, chunk_octet: int = 0) -> bytes:
    """A SEIPDv2 packet, AES-256 OCB, chunks of 2 ** (chunk_octet + 6) octets."""
    header = bytes([0xD2, 2, 9, 2, chunk_octet])
    salt = os.urandom(32)
    derived = HKDF(hashes.SHA256(), 32 + 15 - 8, salt, header).derive(session)
    ocb, iv = AESOCB3(derived[:32]), derived[32:]
    size, sealed = 1 << (chunk_octet + 6), []
    pieces = [inner[i : i + size] for i in range(0, len(inner), size)]
    for index, piece in enumerate(pieces):
        sealed.append(ocb.encrypt(iv + index.to_bytes(8, "big"), piece, header))
    final = header + len(inner).to_bytes(8, "big")
    sealed.append(ocb.encrypt(iv + len(pieces).to_bytes(8, "big"), b"", final))
    return packet(18, header[1:] + salt + b"".join(sealed))


def sed(session: bytes, inner: bytes) -> bytes:
    """A symmetrically encrypted data packet: no MDC, OpenPGP CFB with resync."""
    prefix = os.urandom(16)
    head = _cfb(session, bytes(16), prefix + prefix[-2:])
    return packet(9, head + _cfb(session, head[2:18], inner))


def encrypt_raw(
    cert: bytes,
    inner: bytes,
    *,
    integrity: bool = True,
    anonymous: bool = False,
    mdc: bytes | None = None,
) -> bytes:
    """A message to the Cv25519 key of cert whose decrypted content is inner."""
    session = os.urandom(32)
    head = pkesk(cv25519_recipient(cert), session, anonymous=anonymous)
    return head + (seipd(session, inner, mdc) if integrity else sed(session, inner))


def encrypt_raw_v2(cert: bytes, inner: bytes, chunk_octet: int = 0) -> bytes:
    """The same as RFC 9580 v2 encryption: a v6 PKESK and a SEIPDv2 packet."""
    session = os.urandom(32)
    head = pkesk(cv25519_recipient(cert), session, version=6)
    return head + seipd_v2(session, inner, chunk_octet)


def inline_signed(data: bytes, signature: bytes) -> bytes:
    """One-pass signed message (OPS, literal, signature) from a binary v4 detached sig."""
    ((_, sig),) = packets(signature)
    sig_type, pk_algo, hash_algo = sig[1], sig[2], sig[3]
    found = dict(subpackets(sig))
    key_id = found[16] if 16 in found else found[33][-8:]  # issuer, or issuer fingerprint
    ops = packet(4, bytes([3, sig_type, hash_algo, pk_algo]) + key_id + b"\x01")
    return ops + literal(data) + packet(2, sig)


def subpackets(sig: bytes) -> list[tuple[int, bytes]]:
    """(type, value) of the hashed then unhashed subpackets of a v4 signature body."""
    out, pos = [], 4
    for _ in range(2):
        end = pos + 2 + int.from_bytes(sig[pos : pos + 2], "big")
        pos += 2
        while pos < end:
            first = sig[pos]
            if first < 192:
                size, pos = first, pos + 1
            elif first < 255:
                size, pos = ((first - 192) << 8) + sig[pos + 1] + 192, pos + 2
            else:
                size, pos = int.from_bytes(sig[pos + 1 : pos + 5], "big"), pos + 5
            out.append((sig[pos] & 0x7F, sig[pos + 1 : pos + size]))
            pos += size
    return out


def features(cert: bytes) -> list[bytes]:
    """The Features subpacket (type 30) of every signature in a binary certificate."""
    return [
        value
        for tag, body in packets(cert)
        if tag == 2 and body[0] == 4
        for kind, value in subpackets(body)
        if kind == 30
    ]


def without(cert: bytes, drop: set[int], after_user_id: bytes | None = None) -> bytes:
    """cert minus packets: tags in drop together with the signatures following them,
    or (after_user_id) that user ID and its signatures."""
    out, skipping = [], False
    for tag, body in packets(cert):
        if tag != 2:
            skipping = tag in drop or (tag == 13 and body == after_user_id)
        if not skipping:
            out.append((tag, body))
    return join(out)
