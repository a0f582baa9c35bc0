"""Byte-exact MIME splitting: nothing is re-rendered, hostile input never crashes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from localproxy.mime import (
    MAX_DEPTH,
    is_7bit_safe,
    parse_entity,
    replace_parts,
    split_header_body,
    to_crlf,
)

MIXED = (
    b"From: a@example.org\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
    b'Content-Type: multipart/mixed;\r\n boundary="XX"\r\n\r\n'
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
    b"--XX\r\n\r\nno headers\r\n--XX--\r\nepilogue\r\n"
)


def test_headers_keep_their_folding_and_order():
    entity = parse_entity(MIXED)
    assert [h.name for h in entity.headers] == ["From", "Subject", "Content-Type"]
    assert entity.get("content-type").raw == b'Content-Type: multipart/mixed;\r\n boundary="XX"\r\n'
    assert entity.get("Subject").value == "=?utf-8?q?caf=C3=A9?="
    assert entity.raw == MIXED


def test_parts_are_exact_slices():
    entity = parse_entity(MIXED)
    assert entity.content_type == "multipart/mixed" and entity.params["boundary"] == "XX"
    assert [p.raw for p in entity.parts] == [
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello",
        b"\r\nno headers",
    ]
    assert entity.parts[1].content_type == "text/plain", "RFC 2045 default"
    for part in entity.parts:
        start, end = part.span
        assert entity.body[start:end] == part.raw


def test_boundary_prefix_lines_are_not_delimiters():
    raw = (
        b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\none\r\n--abc\r\n"
        b"still one\r\n--ab--\r\n"
    )
    (part,) = parse_entity(raw).parts
    assert part.body == b"one\r\n--abc\r\nstill one"


def test_truncated_multipart_keeps_the_last_part():
    raw = b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n\r\nfirst\r\n--B\r\n\r\ncut"
    assert [p.body for p in parse_entity(raw).parts] == [b"first", b"cut"]


def test_bare_lf_messages_parse():
    raw = b"Subject: x\nContent-Type: multipart/mixed; boundary=B\n\n--B\n\nbody\n--B--\n"
    entity = parse_entity(raw)
    assert entity.separator == b"\n"
    assert [p.body for p in entity.parts] == [b"body"]


def test_message_without_body_or_headers():
    assert split_header_body(b"Subject: only headers\r\n") == (
        b"Subject: only headers\r\n",
        b"",
        b"",
    )
    assert split_header_body(b"\r\nbody only") == (b"", b"\r\n", b"body only")


def test_deep_nesting_stops_at_the_limit():
    raw = b"x"
    for i in range(MAX_DEPTH + 20):
        raw = (
            f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode()
            + raw
            + f"\r\n--b{i}--\r\n".encode()
        )
    entity, depth = parse_entity(raw), 0
    while entity.parts:
        entity, depth = entity.parts[0], depth + 1
    assert depth == MAX_DEPTH


def test_replace_parts_swaps_only_what_is_asked():
    entity = parse_entity(MIXED)
    changed = replace_parts(entity, {1: b"\r\nNEW"})
    assert changed == MIXED.replace(b"\r\nno headers", b"\r\nNEW")
    assert replace_parts(entity, {}) == MIXED


def test_canonical_line_endings_and_7bit_check():
    assert to_crlf(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
    assert is_7bit_safe(b"plain\r\ntext")
    assert not is_7bit_safe("café".encode())
    assert not is_7bit_safe(b"x" * 999)


_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def multipart_messages(draw):
    boundary = draw(st.from_regex(r"[A-Za-z0-9'()+_,./:=?-]{1,30}", fullmatch=True))
    bodies = draw(st.lists(st.lists(_line, max_size=4).map(b"\r\n".join), min_size=1, max_size=4))
    bodies = [b for b in bodies if f"--{boundary}".encode() not in b]
    parts = [b"Content-Type: text/plain\r\n\r\n" + b for b in bodies] or [b"\r\n"]
    delimiter = f"--{boundary}".encode()
    body = b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + b"--\r\n"
    header = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'.encode()
    return header + b"\r\n" + body, parts


@settings(max_examples=300, deadline=None)
@given(multipart_messages())
def test_generated_multiparts_split_back_into_their_parts(case):
    raw, parts = case
    entity = parse_entity(raw)
    assert [p.raw for p in entity.parts] == parts
    assert replace_parts(entity, {}) == raw


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_parse_without_error_and_keep_their_bytes(raw):
    entity = parse_entity(raw)
    assert entity.raw == raw
    for part in entity.parts:
        assert entity.body[part.span[0] : part.span[1]] == part.raw


def test_to_crlf_returns_canonical_input_itself():
    data = b"a\r\nb\r\n"
    assert to_crlf(data) is data, "no copy of a message that is CRLF already"
    assert to_crlf(b"a\nb\n") == b"a\r\nb\r\n"
    assert to_crlf(b"\r\r\n\n\r") == b"\r\n\r\n\r\n\r\n"


def test_part_bodies_are_views_until_read():
    entity = parse_entity(MIXED)
    assert isinstance(entity.parts[0].body_view, memoryview)
    assert entity.parts[0].body == b"hello" and isinstance(entity.parts[0].body, bytes)
