"""ASCII armor decoding: the one-block fast path agrees with the line-by-line reader.

_dearmor decodes a lone well-formed block with one regular expression and hands
everything else to _dearmor_lines; on real armor (GnuPG-style headers, CRC line, CRLF
or LF) and on mutations of it, both give the same bytes or both refuse it.
"""

from __future__ import annotations

import base64

from hypothesis import example, given, settings
from hypothesis import strategies as st

from localproxy.crypto.errors import MalformedData
from localproxy.crypto.openpgp import _dearmor, _dearmor_lines
from tests.harness.hostile import mutations

PAYLOAD = bytes(range(256)) * 3
FRAGMENTS = [b"\r\n", b"\n", b"\r", b"=", b":", b"-----END PGP MESSAGE-----", b"  ", b"\x00"]


def armored(payload: bytes, eol: bytes, headers: bool, crc: bool, kind: bytes) -> bytes:
    encoded = base64.b64encode(payload)
    lines = [b"-----BEGIN PGP " + kind + b"-----"]
    if headers:
        lines += [b"Version: Test 1.0", b"Comment: armor test", b""]
    lines += [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    if crc:
        lines.append(b"=njUN")
    lines.append(b"-----END PGP " + kind + b"-----")
    return eol.join(lines) + eol


def decoded(data: bytes) -> bytes | str:
    try:
        return _dearmor(data)
    except MalformedData as exc:
        return f"refused: {type(exc).__name__}"


def decoded_lines(data: bytes) -> bytes | str:
    if data[:1] and data[0] & 0x80:
        return data  # binary OpenPGP: not armor at all, for either path
    try:
        return _dearmor_lines(data)
    except MalformedData as exc:
        return f"refused: {type(exc).__name__}"


ARMOR_PARTS = (
    st.binary(min_size=0, max_size=300) | st.just(PAYLOAD),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
    st.booleans(),
)


@given(*ARMOR_PARTS, st.sampled_from([b"MESSAGE", b"PUBLIC KEY BLOCK", b"SIGNATURE"]))
@settings(max_examples=200)
def test_well_formed_armor_decodes_to_its_payload(
    payload: bytes, eol: bytes, headers: bool, crc: bool, kind: bytes
) -> None:
    data = armored(payload, eol, headers, crc, kind)
    assert _dearmor(data) == _dearmor_lines(data) == payload


def test_cleartext_signed_text_is_refused_on_both_paths() -> None:
    data = armored(b"text", b"\n", False, False, b"SIGNED MESSAGE")
    assert decoded(data) == decoded_lines(data) == "refused: MalformedData"


@st.composite
def mutated_armor(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([b"MESSAGE", b"PUBLIC KEY BLOCK", b"SIGNED MESSAGE"]))
    armor = armored(*(draw(part) for part in ARMOR_PARTS), kind)
    return draw(mutations(armor, FRAGMENTS))


EXTRA_CRC = armored(PAYLOAD, b"\n", True, True, b"MESSAGE").replace(b"=njUN", b"=njUN\n=AAAA")
TWO_BLOCKS = armored(b"one", b"\n", False, True, b"MESSAGE") * 2
MISMATCHED_END = armored(PAYLOAD, b"\r\n", True, False, b"MESSAGE").replace(
    b"END PGP MESSAGE", b"END PGP SIGNATURE"
)


@given(mutated_armor())
@settings(max_examples=400)
@example(EXTRA_CRC)
@example(TWO_BLOCKS)
@example(MISMATCHED_END)
@example(b"junk before\n" + armored(PAYLOAD, b"\n", False, False, b"MESSAGE"))
def test_mutated_armor_decodes_as_line_by_line(armor: bytes) -> None:
    assert decoded(armor) == decoded_lines(armor)
