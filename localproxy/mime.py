"""Byte-exact MIME: split messages into headers, bodies and parts without re-rendering.

Python's email package re-folds headers and re-encodes bodies when it writes a
message back. Signatures, IMAP sizes and partial fetches all need the exact
bytes, so this module only ever slices the original bytes; parsing of header
parameters is delegated to the stdlib, which is good at that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message

CRLF = b"\r\n"
MAX_DEPTH = 50  # deeper nesting is hostile; parsed as an opaque leaf
_HEADER_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


@dataclass
class Header:
    name: str  # as written
    raw: bytes  # the whole field, folded lines and line ending included

    @property
    def value(self) -> str:
        """Unfolded value, undecoded (RFC 2047 words stay as they are)."""
        text = self.raw.split(b":", 1)[1].decode("utf-8", "replace")
        return re.sub(r"\r?\n[ \t]", " ", text).strip()


@dataclass
class Entity:
    """One MIME entity as slices of the original bytes."""

    header: bytes  # the header block, each field with its line ending
    separator: bytes  # the blank line ending the header block (b"" if none)
    body: bytes
    headers: list[Header]
    parts: list[Entity] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)  # where this entity sits in its parent's body

    @property
    def raw(self) -> bytes:
        return self.header + self.separator + self.body

    def get(self, name: str) -> Header | None:
        lowered = name.lower()
        return next((h for h in self.headers if h.name.lower() == lowered), None)

    def get_all(self, name: str) -> list[Header]:
        lowered = name.lower()
        return [h for h in self.headers if h.name.lower() == lowered]

    @property
    def content_type(self) -> str:
        return content_type_of(self.get("Content-Type"))[0]

    @property
    def params(self) -> dict[str, str]:
        return content_type_of(self.get("Content-Type"))[1]

    @property
    def is_multipart(self) -> bool:
        return self.content_type.startswith("multipart/")

    @property
    def transfer_encoding(self) -> str:
        cte = self.get("Content-Transfer-Encoding")
        return cte.value.lower() if cte else "7bit"


def split_header_body(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, blank line, body). A message without a blank line is all header."""
    if raw.startswith((b"\r\n", b"\n")):  # no headers at all
        sep = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
        return b"", sep, raw[len(sep) :]
    match = re.search(rb"\r?\n(\r?\n)", raw)
    if match is None:
        return raw, b"", b""
    end = match.start(1)
    return raw[:end], match.group(1), raw[match.end(1) :]


def parse_headers(header: bytes) -> list[Header]:
    """Fields in order; continuation lines stay with their field."""
    fields: list[Header] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line
            continue
        match = _HEADER_NAME.match(line)
        name = match.group(1).decode("ascii") if match else ""
        fields.append(Header(name, line))  # a nameless line stays, so bytes are kept
    return fields


def content_type_of(header: Header | None) -> tuple[str, dict[str, str]]:
    """Lowercased type and parameters; RFC 2045 default for a missing or broken header."""
    if header is None:
        return "text/plain", {"charset": "us-ascii"}
    msg = Message()
    msg["Content-Type"] = header.value
    ctype = msg.get_content_type()  # falls back to text/plain for garbage, as RFC 2045 says
    params = {}
    for key, value in msg.get_params()[1:] if msg.get_params() else []:
        params[key.lower()] = str(msg.get_param(key)) if isinstance(value, tuple) else value
    return ctype, params


def parse_entity(raw: bytes, depth: int = 0) -> Entity:
    header, sep, body = split_header_body(raw)
    entity = Entity(header, sep, body, parse_headers(header))
    entity.span = (0, len(raw))
    boundary = entity.params.get("boundary")
    if entity.is_multipart and boundary and depth < MAX_DEPTH:
        spans = split_multipart(body, boundary.encode("utf-8", "replace"))
        for start, end in spans or []:
            part = parse_entity(body[start:end], depth + 1)
            part.span = (start, end)
            entity.parts.append(part)
    return entity


def replace_parts(entity: Entity, replacements: dict[int, bytes]) -> bytes:
    """The entity's bytes with some parts (by index) swapped, everything else untouched."""
    body = entity.body
    for index in sorted(replacements, reverse=True):
        start, end = entity.parts[index].span
        body = body[:start] + replacements[index] + body[end:]
    return entity.header + entity.separator + body


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[int, int]] | None:
    """Spans (start, end) of each part of a multipart body (RFC 2046 5.1.1).

    The line break before a delimiter belongs to the delimiter. None when there
    is no opening delimiter. A missing close delimiter (truncated mail) leaves
    the last part running to the end of the body.
    """
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r?\n|$)")
    matches = list(delimiter.finditer(body))
    if not matches or matches[0].group(1):
        return None
    spans = []
    for i, match in enumerate(matches):
        if match.group(1):
            break
        end = matches[i + 1].start() if i + 1 < len(matches) else len(body)
        spans.append((_after_line_end(body, match.end()), end))
    return spans


def _after_line_end(body: bytes, pos: int) -> int:
    if body.startswith(b"\r\n", pos):
        return pos + 2
    if body.startswith(b"\n", pos):
        return pos + 1
    return pos


def to_crlf(data: bytes) -> bytes:
    """Canonical line endings (RFC 2049): bare LF and bare CR become CRLF."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


def is_7bit_safe(data: bytes, max_line: int = 998) -> bool:
    if any(b > 0x7F for b in data) or b"\0" in data:
        return False
    return all(len(line) <= max_line for line in data.split(CRLF))


def header_field(name: str, value: str) -> bytes:
    """One header field; values are ASCII here (RFC 2047-encoded when needed by the caller)."""
    return f"{name}: {value}".encode() + CRLF


CONTENT_HEADERS = (
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "content-description",
    "content-language",
    "content-location",
    "content-md5",
)


def is_content_header(header: Header) -> bool:
    return header.name.lower() in CONTENT_HEADERS
