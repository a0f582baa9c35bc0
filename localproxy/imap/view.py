"""FETCH data of one message, computed from its bytes alone (pure, no I/O).

The IMAP relay serves decrypted messages: every content-derived FETCH item must come
from the decrypted bytes, and must look exactly like what a real server would send
for a message with those bytes. `MessageView` computes them: RFC822.SIZE, ENVELOPE,
BODY, BODYSTRUCTURE, BODY[section]<partial>, BINARY[part] / BINARY.SIZE (RFC 3516),
RFC822, RFC822.HEADER and RFC822.TEXT. Values are IMAP-encoded bytes (lists with
quoted strings or literals made by `localproxy.imap.wire`) or the raw octets of a
section, which the caller wraps in a literal.

The model is Dovecot 2.3.19, checked item by item against a real Dovecot
(tests/e2e/test_view_vs_dovecot.py):

* Line endings are canonicalised first (`mime.to_crlf`): CRLF, bare LF and bare CR each
  become CRLF, and everything, RFC822.SIZE included, is computed on those bytes, so the
  sizes always match the bytes served. Dovecot (maildir) stores LF and serves CRLF, so
  CRLF and bare-LF input come out the same there; a bare CR Dovecot keeps inside the
  line (we end the line), and "\r\r\n" or a CR at the very end it loses.
* NUL octets are served as 0x80 in BODY[...] / RFC822* (IMAP literals must not contain
  NUL), read as U+FFFD in header strings and as the end of an address field;
  BINARY[...] keeps them (and says to send a literal8).
* MIME structure follows Dovecot's parser, not mime.py's splitter: a delimiter line
  only has to *begin* with "--" + boundary (the longest active boundary wins, innermost
  first, boundaries longer than 80 octets are cut), the line break before a delimiter
  belongs to the delimiter, an outer boundary closes inner parts, a multipart without a
  usable boundary has no children (BODYSTRUCTURE shows one empty text/plain child), a
  header without a blank line may be ended by a delimiter line, a part of
  multipart/digest without Content-Type is message/rfc822, nesting deeper than 100
  levels is an opaque leaf.
* Header fields: the name is everything before the first ':' (trailing blanks dropped),
  blanks after the colon are skipped, folded lines are joined without their line breaks
  (Dovecot's "nolf"). ENVELOPE takes the *last* Date/Subject/In-Reply-To/Message-ID and
  adds up repeated address fields; Subject and display names have blank runs made one
  space. Without MIME-Version or Content-Type a header's Content-* fields are ignored;
  otherwise BODYSTRUCTURE takes the first Content-* field of each kind. Parameters follow
  Dovecot's RFC 2231 merging ("name*" keeps the charset'lang'%XX value undecoded, a text
  part without charset gets "charset" "us-ascii" appended). RFC 2047 words are never
  decoded.
* Section numbers follow Dovecot: [1] of a non-multipart message is its body and
  [1.MIME] its header; [n.1] of a leaf part n is part n itself; HEADER / TEXT /
  HEADER.FIELDS of a part that is not message/rfc822 and any part that does not exist
  are empty strings.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from localproxy.imap import wire
from localproxy.mime import to_crlf

__all__ = ["BinaryError", "MessageView"]

CRLF = b"\r\n"
MAX_NESTED_PARTS = 100  # Dovecot's default max_nested_mime_parts
BOUNDARY_MAX_LEN = 80  # Dovecot truncates boundary parameters to 70 + 10 octets
BOUNDARY_LINE_MAX = BOUNDARY_MAX_LEN + 4
DEFAULT_CHARSET = b'"charset" "us-ascii"'
EMPTY_BODY = b'("text" "plain" (' + DEFAULT_CHARSET + b') NIL NIL "7bit" 0 0)'
EMPTY_BODYSTRUCTURE = (
    b'("text" "plain" (' + DEFAULT_CHARSET + b') NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'
)
BINARY_CTE_FIELD = b"Content-Transfer-Encoding: binary\r\n"
REPLACEMENT_CHAR = "\ufffd".encode()
_LWSP = b" \t"


class BinaryError(ValueError):
    """BINARY[...] cannot be served; `code` is the IMAP response code for the NO.

    "UNKNOWN-CTE" (RFC 3516): the part has a Content-Transfer-Encoding we cannot decode.
    "PARSE": the encoded data is broken (Dovecot answers "NO [PARSE] Invalid data in
    MIME part"; for truncated base64/QP at the very end Dovecot drops the connection
    instead, we answer the same NO [PARSE]).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _string(value: bytes) -> bytes:
    """An IMAP string (quoted or literal); NUL, which no IMAP string may hold, becomes 0x80."""
    return wire.string(value.replace(b"\0", b"\x80"))


def _nstring(value: bytes | None) -> bytes:
    return b"NIL" if value is None else _string(value)


_number = wire.number


# ---------------------------------------------------------------------------------------------
# RFC 822 tokenizing, as Dovecot's rfc822-parser.c does it (return values: -1 error, 0 end of
# input reached, 1 more input follows)

# 1: atext, 2: alphanumeric or 8-bit (atext), 4: atext that is a MIME tspecial ('/', '=', '?')
_ATEXT = bytes(
    [0] * 32
    + [0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 4]
    + [2] * 10
    + [0, 0, 0, 4, 0, 4]
    + [0]
    + [2] * 26
    + [0, 0, 0, 1, 1]
    + [1]
    + [2] * 26
    + [1, 1, 1, 1, 0]
    + [2] * 128
)


def _is_atext(c: int) -> bool:
    return _ATEXT[c] != 0


def _is_token_char(c: int) -> bool:
    return (_ATEXT[c] & 3) != 0 or c == 0x2E  # MIME token chars ('.' included)


class _Rfc822:
    """A cursor over one header value."""

    def __init__(self, data: bytes, last_comment: bytearray | None = None) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.last_comment = last_comment

    def cur(self) -> int:
        """The current octet; 0 at the end (Dovecot reads the terminating NUL there)."""
        return self.data[self.pos] if self.pos < self.end else 0

    def skip_comment(self) -> int:
        data, level = self.data, 1
        if self.last_comment is not None:
            self.last_comment.clear()
        self.pos += 1
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0x28:  # (
                level += 1
            elif c == 0x29:  # )
                level -= 1
                if level == 0:
                    if self.last_comment is not None:
                        self.last_comment += data[start : self.pos]
                    self.pos += 1
                    return 1 if self.pos < self.end else 0
            elif c == 0x5C:  # backslash
                if self.last_comment is not None:
                    self.last_comment += data[start : self.pos]
                start = self.pos + 1
                self.pos += 1
                if self.pos >= self.end:
                    return -1
            self.pos += 1
        return -1

    def skip_lwsp(self) -> int:
        while self.pos < self.end:
            c = self.data[self.pos]
            if c in (0x20, 0x09, 0x0D, 0x0A):
                self.pos += 1
                continue
            if c != 0x28:
                break
            if self.skip_comment() < 0:
                return -1
        return 1 if self.pos < self.end else 0

    def parse_atom(self, out: bytearray) -> int:
        if self.pos >= self.end or not _is_atext(self.data[self.pos]):
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if _is_atext(self.data[self.pos]):
                self.pos += 1
                continue
            out += self.data[start : self.pos]
            return self.skip_lwsp()
        out += self.data[start : self.pos]
        return 0

    def parse_dot_atom(self, out: bytearray) -> int:
        if self.pos >= self.end or not _is_atext(self.data[self.pos]):
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if _is_atext(self.data[self.pos]):
                self.pos += 1
                continue
            out += self.data[start : self.pos]
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            if self.data[self.pos] != 0x2E:
                return 1
            self.pos += 1
            out += b"."
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            start = self.pos
        out += self.data[start : self.pos]
        return 0

    def parse_mime_token(self, out: bytearray) -> int:
        start = self.pos
        while self.pos < self.end:
            if _is_token_char(self.data[self.pos]):
                self.pos += 1
                continue
            out += self.data[start : self.pos]
            return self.skip_lwsp()
        out += self.data[start : self.pos]
        return 0

    def parse_quoted_string(self, out: bytearray) -> int:
        data = self.data
        self.pos += 1  # the opening quote
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0x22:
                out += data[start : self.pos]
                self.pos += 1
                return self.skip_lwsp()
            if c == 0x0A:  # folding inside the string: drop the line break
                stop = self.pos - 1 if self.pos > start and data[self.pos - 1] == 0x0D else self.pos
                out += data[start:stop]
                start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                out += data[start : self.pos - 1]
                start = self.pos
            self.pos += 1
        return -1

    def _parse_atom_or_dot(self, out: bytearray) -> int:
        start = self.pos
        while self.pos < self.end:
            c = self.data[self.pos]
            if _is_atext(c) or c == 0x2E:
                self.pos += 1
                continue
            out += self.data[start : self.pos]
            return self.skip_lwsp()
        out += self.data[start : self.pos]
        return 0

    def parse_phrase(self, out: bytearray) -> int:
        if self.pos >= self.end:
            return 0
        if self.data[self.pos] == 0x2E:
            return -1
        while True:
            if self.data[self.pos] == 0x22:
                ret = self.parse_quoted_string(out)
            else:
                ret = self._parse_atom_or_dot(out)
            if ret <= 0:
                return ret
            c = self.data[self.pos]
            if not _is_atext(c) and c not in (0x22, 0x2E):
                break
            out += b" "
        return self.skip_lwsp()

    def _parse_domain_literal(self, out: bytearray) -> int:
        start = self.pos
        while self.pos < self.end:
            c = self.data[self.pos]
            if c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    break
            elif c == 0x5D:  # ]
                self.pos += 1
                out += self.data[start : self.pos]
                return self.skip_lwsp()
            self.pos += 1
        return -1

    def parse_domain(self, out: bytearray) -> int:
        self.pos += 1  # the '@'
        if self.skip_lwsp() <= 0:
            return -1
        if self.data[self.pos] == 0x5B:  # [
            return self._parse_domain_literal(out)
        return self.parse_dot_atom(out)

    def parse_content_type(self, out: bytearray) -> int:
        if self.skip_lwsp() <= 0:
            return -1
        if self.parse_mime_token(out) <= 0:
            return -1
        if self.cur() != 0x2F:
            return -1
        self.pos += 1
        if self.skip_lwsp() <= 0:
            return -1
        out += b"/"
        return self.parse_mime_token(out)

    def parse_content_param(self) -> tuple[int, bytes, bytes]:
        """(-1 | 0 | 1, key, value) for the next ';' key=value."""
        value = bytearray()
        if self.pos >= self.end:
            return 0, b"", b""
        if self.data[self.pos] != 0x3B:  # ;
            return -1, b"", b""
        self.pos += 1
        if self.skip_lwsp() <= 0:
            return -1, b"", b""
        key = bytearray()
        if self.parse_mime_token(key) <= 0:
            return -1, b"", b""
        if self.cur() != 0x3D:  # =
            return -1, b"", b""
        self.pos += 1
        ret = self.skip_lwsp()
        if ret <= 0:
            pass  # broken / no value
        elif self.data[self.pos] == 0x22:
            ret = self.parse_quoted_string(value)
        elif self.data[self.pos] == 0x3D:  # workaround for name==?utf-8?b?...?=
            while self.pos < self.end and self.data[self.pos] not in b"; \t\r\n":
                value.append(self.data[self.pos])
                self.pos += 1
        else:
            ret = self.parse_mime_token(value)
        return (-1 if ret < 0 else 1), bytes(key), bytes(value)

    def parse_params(self) -> list[tuple[bytes, bytes]]:
        """All parameters, RFC 2231 continuations merged (Dovecot's rfc2231_parse)."""
        result: list[tuple[bytes, bytes]] = []
        extended_params: list[tuple[bytes, bytes, int, bool]] = []
        idx = 0  # Dovecot reuses this across parameters when "key*" has no index
        while True:
            ret, key, value = self.parse_content_param()
            if ret == 0:
                break
            if ret < 0:  # skip one octet and try again
                if self.pos >= self.end:
                    break
                self.pos += 1
                continue
            star = key.find(b"*")
            if star < 0:
                result.append((key, value))
                continue
            p = star
            if p + 1 < len(key):
                p += 1
                idx = 0
                while p < len(key) and 0x30 <= key[p] <= 0x39:
                    idx = idx * 10 + key[p] - 0x30
                    p += 1
            extended = p < len(key) and key[p] == 0x2A
            if extended:
                p += 1
            if p != len(key):
                result.append((key, value))
            else:
                extended_params.append((key[:star], value, idx, extended))
        extended_params.sort(key=lambda item: (item[0], item[2]))
        i = 0
        while i < len(extended_params):
            name = extended_params[i][0].lower()
            j, ok, have_extended = i, True, False
            while j < len(extended_params) and extended_params[j][0].lower() == name:
                ok = ok and extended_params[j][2] == j - i
                have_extended = have_extended or extended_params[j][3]
                j += 1
            group = extended_params[i:j]
            if not ok:  # missing indexes: keep them apart, as written
                for key, value, index, ext in group:
                    result.append((key + b"*%d" % index + (b"*" if ext else b""), value))
            else:
                merged = b"''" if not group[0][3] and have_extended else b""
                for _key, value, _index, ext in group:
                    merged += value.replace(b"%", b"%25") if have_extended and not ext else value
                result.append((group[0][0] + (b"*" if have_extended else b""), merged))
            i = j
        return result


# ---------------------------------------------------------------------------------------------
# Addresses (Dovecot's message_address_parse with FILL_MISSING)


@dataclass
class _Address:
    name: bytes | None = None
    route: bytes | None = None
    mailbox: bytes | None = None
    domain: bytes | None = None
    invalid: bool = False


class _AddressParser:
    def __init__(self, value: bytes) -> None:
        self.r = _Rfc822(value, bytearray())
        self.addrs: list[_Address] = []
        self.addr = _Address()
        self.s = bytearray()

    def parse(self) -> list[_Address]:
        if self.r.skip_lwsp() > 0:
            self._address_list()
        return self.addrs

    def _add(self) -> None:
        self.addrs.append(self.addr)
        self.addr = _Address()

    def _add_fixed(self) -> None:
        if self.addr.mailbox is None:
            self.addr.mailbox = b"MISSING_MAILBOX"
            self.addr.invalid = True
        if not self.addr.domain:
            self.addr.domain = b"MISSING_DOMAIN"
            self.addr.invalid = True
        self._add()

    def _local_part(self) -> int:
        self.s.clear()
        if self.r.cur() == 0x22:
            ret = self.r.parse_quoted_string(self.s)
        else:
            ret = self.r.parse_dot_atom(self.s)
        if ret < 0:
            return -1
        self.addr.mailbox = bytes(self.s)
        return ret

    def _domain(self) -> int:
        self.s.clear()
        ret = self.r.parse_domain(self.s)
        if ret < 0:
            return -1
        self.addr.domain = bytes(self.s)
        return ret

    def _domain_list(self) -> int:
        r = self.r
        self.s.clear()
        while True:
            if r.pos >= r.end:
                return 0
            if r.data[r.pos] != 0x40:
                break
            if self.s:
                self.s += b","
            self.s += b"@"
            ret = r.parse_domain(self.s)
            if ret <= 0:
                return ret
            while r.skip_lwsp() > 0 and r.data[r.pos] == 0x2C:
                r.pos += 1
        self.addr.route = bytes(self.s)
        return 1

    def _angle_addr(self) -> int:
        r = self.r
        r.pos += 1  # '<'
        if r.skip_lwsp() <= 0:
            return -1
        if r.cur() == 0x40:
            if self._domain_list() > 0 and r.cur() == 0x3A:
                r.pos += 1
            else:
                self.addr.route = b"INVALID_ROUTE"
                if r.pos >= r.end:
                    return -1
            if r.skip_lwsp() <= 0:
                return -1
        if r.cur() != 0x3E:  # not "<>"
            if self._local_part() <= 0:
                return -1
            if r.cur() == 0x40 and self._domain() <= 0:
                return -1
        if r.cur() != 0x3E:
            return -1
        r.pos += 1
        return r.skip_lwsp()

    def _name_addr(self) -> int:
        r = self.r
        self.s.clear()
        if r.parse_phrase(self.s) <= 0 or r.cur() != 0x3C:
            return -1
        self.addr.name = bytes(self.s) or None
        if self._angle_addr() < 0:
            self.addr.domain = b"SYNTAX_ERROR"
            self.addr.invalid = True
        return 1 if r.pos < r.end else 0

    def _addr_spec(self) -> int:
        r = self.r
        assert r.last_comment is not None
        r.last_comment.clear()
        quoted = r.cur() == 0x22
        ret = self._local_part()
        if ret <= 0:
            self.addr.invalid = True
        ret2 = -2
        if ret != 0 and r.pos < r.end and r.data[r.pos] == 0x40:
            ret2 = self._domain()
            if ret2 <= 0:
                ret = ret2
        if r.last_comment:
            self.addr.name = bytes(r.last_comment)
        elif ret2 == -2:
            # "user" alone is a mailbox, but "user more words" is a display name
            self.s += b" "
            before = len(self.s)
            r.parse_phrase(self.s)
            if len(self.s) != before:
                self.addr.mailbox = None
                self.addr.name = bytes(self.s)
            elif not quoted:
                self.addr.domain = b""
            self.addr.invalid = True
            ret = -1
        return ret

    def _mailbox(self) -> int:
        start = self.r.pos
        ret = self._name_addr()
        if ret < 0:
            self.r.pos = start
            ret = self._addr_spec()
            a = self.addr
            if a.invalid and a.name is None and a.mailbox is not None and a.domain is None:
                a.name, a.mailbox = a.mailbox, None
        if ret < 0:
            self.addr.invalid = True
        self._add_fixed()
        return ret

    def _group(self) -> int:
        r = self.r
        self.s.clear()
        if r.parse_phrase(self.s) <= 0 or r.cur() != 0x3A:
            return -1
        r.pos += 1
        ret = r.skip_lwsp()
        if ret <= 0:
            self.addr.invalid = True
        self.addr.mailbox = bytes(self.s)
        self._add()
        if ret > 0 and r.cur() != 0x3B:
            while True:
                self._mailbox()
                if r.pos >= r.end or r.data[r.pos] != 0x2C:
                    break
                r.pos += 1
                if r.skip_lwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if r.pos >= r.end or r.data[r.pos] != 0x3B:
                ret = -1
            else:
                r.pos += 1
                ret = r.skip_lwsp()
        if ret < 0:
            self.addr.invalid = True
        self._add()  # end of group: all fields NIL
        return 0 if ret == 0 else 1

    def _address_list(self) -> None:
        r = self.r
        while True:
            start = r.pos
            ret = self._group()
            if ret < 0:
                r.pos = start
                ret = self._mailbox()
            if ret == 0:
                break
            if r.pos >= r.end or r.data[r.pos] != 0x2C:
                break
            r.pos += 1
            ret = r.skip_lwsp()
            if ret <= 0:
                if ret < 0:
                    self._add_fixed()
                break


# ---------------------------------------------------------------------------------------------
# Header fields


@dataclass
class _Field:
    name: bytes  # as written, without the colon and the blanks before it
    raw: bytes  # the whole field as in the message, continuation lines and line end included
    value: bytes  # blanks after the colon skipped, CRLF kept between folded lines

    @classmethod
    def parse(cls, raw: bytes) -> _Field:
        lines = raw.split(b"\n")
        first = lines[0].removesuffix(b"\r")
        colon = first.find(b":")
        if colon < 0:
            name, value = first, b""
        else:
            name = first[:colon].rstrip(_LWSP)
            value = first[colon + 1 :]
            stripped = value.lstrip(_LWSP)
            if stripped:
                value = stripped
            elif value:  # only blanks: skip just one
                value = value[1:]
        for line in lines[1:]:
            if line:
                value += b"\r\n" + line.removesuffix(b"\r")
        return cls(name, raw, value)

    @cached_property
    def lname(self) -> bytes:
        return self.name.lower()


# ---------------------------------------------------------------------------------------------
# MIME structure (Dovecot's message-parser.c, sizes accounted the same way)


@dataclass(eq=False)
class _Part:
    parent: _Part | None
    pos: int  # offset of the header in the message
    depth: int
    is_mime: bool = False
    hsize: int = 0
    bsize: int = 0
    eoh: bool = False  # the header ended with a blank line
    fields: list[_Field] = field(default_factory=list)
    multipart: bool = False
    digest: bool = False
    rfc822: bool = False
    children: list[_Part] = field(default_factory=list)

    @property
    def body_pos(self) -> int:
        return self.pos + self.hsize

    @property
    def end(self) -> int:
        return self.pos + self.hsize + self.bsize


@dataclass(eq=False)
class _Boundary:
    part: _Part
    text: bytes


def _boundary_at(
    data: bytes, line: int, boundaries: list[_Boundary]
) -> tuple[_Boundary, bool] | None:
    """The boundary whose delimiter starts the line at `line`, and whether it closes."""
    if not data.startswith(b"--", line):
        return None
    rest = line + 2
    lf = data.find(b"\n", rest)
    if lf >= 0:
        size = lf - rest
        if size > 0 and data[rest + size - 1] == 0x0D:
            size -= 1
        if size > 2 and data[rest + size - 2 : rest + size] == b"--":
            size -= 2
    else:
        size = min(len(data) - rest, BOUNDARY_LINE_MAX)
    best = None
    for boundary in reversed(boundaries):  # innermost first, the longest match wins
        length = len(boundary.text)
        if (
            length <= size
            and data.startswith(boundary.text, rest)
            and (best is None or len(best.text) < length)
        ):
            best = boundary
            if length == size:
                break
    if best is None:
        return None
    end = rest + len(best.text)
    return best, data[end : end + 2] == b"--"


def _find_delimiter(
    data: bytes, pos: int, boundaries: list[_Boundary]
) -> tuple[int, int, _Boundary, bool] | None:
    """(start of the delimiter incl. the line break before it, line start, boundary, closes)."""
    hit = _boundary_at(data, pos, boundaries)
    if hit is not None:
        return pos, pos, hit[0], hit[1]
    search = pos
    while True:
        nl = data.find(b"\n--", search)
        if nl < 0:
            return None
        hit = _boundary_at(data, nl + 1, boundaries)
        if hit is not None:
            start = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
            return start, nl + 1, hit[0], hit[1]
        search = nl + 1


def _field_end(data: bytes, pos: int) -> int:
    """The end of the header field starting at `pos`, continuation lines included."""
    n = len(data)
    end = data.find(b"\n", pos)
    end = n if end < 0 else end + 1
    while end < n and data[end] in _LWSP:
        nxt = data.find(b"\n", end)
        end = n if nxt < 0 else nxt + 1
    return end


def _read_header(data: bytes, pos: int) -> tuple[list[_Field], bool]:
    """The fields from `pos` to the first blank line or the end, and whether there was one."""
    fields = []
    while pos < len(data):
        if data.startswith(CRLF, pos):
            return fields, True
        end = _field_end(data, pos)
        fields.append(_Field.parse(data[pos:end]))
        pos = end
    return fields, False


def _parse_header(
    data: bytes, part: _Part, pos: int, boundaries: list[_Boundary]
) -> tuple[bool, int]:
    """Read the header of `part` from `pos`: (its multipart body begins, where reading goes on).

    A delimiter line may end a header that has no blank line; the line break before the
    delimiter then counts in the parent's body, as in Dovecot.
    """
    n = len(data)
    start = pos
    seen_content_type = False
    boundary: bytes | None = None
    registered = False
    cut = 0
    while pos < n:
        if data.startswith(CRLF, pos):  # end of header
            if boundary is not None and part.is_mime and part.depth + 1 < MAX_NESTED_PARTS:
                boundaries.append(_Boundary(part, boundary))
                registered = True
            pos += 2
            part.eoh = True
            break
        if boundaries:
            hit = _boundary_at(data, pos, boundaries)
            if hit is not None and hit[0].part is not part:
                # a delimiter ends the header; the line break before it is the parent's
                if pos > start and part.parent is not None:
                    cut = 2
                    part.parent.bsize += 2
                break
        end = _field_end(data, pos)
        hdr = _Field.parse(data[pos:end])
        part.fields.append(hdr)
        pos = end
        if hdr.lname == b"mime-version":
            part.is_mime = True
        elif hdr.lname == b"content-type":
            part.is_mime = True
            if seen_content_type:
                continue
            seen_content_type = True
            r = _Rfc822(hdr.value)
            r.skip_lwsp()
            ctype = bytearray()
            ret = r.parse_content_type(ctype)
            lowered = bytes(ctype).lower()
            if lowered == b"message/rfc822":
                part.rfc822 = True
            elif lowered.startswith(b"multipart/"):
                part.multipart = True
                part.digest = lowered[10:] == b"digest"
            if ret >= 0 and part.multipart:
                for key, value in r.parse_params():
                    if key.lower() == b"boundary":
                        boundary = value[:BOUNDARY_MAX_LEN]
                        break
    part.hsize = pos - start - cut
    if not part.is_mime:
        part.multipart = part.digest = part.rfc822 = False
    if not seen_content_type or not part.is_mime:
        part.rfc822 = part.parent is not None and part.parent.digest
    if part.depth + 1 >= MAX_NESTED_PARTS:  # too deep: an opaque leaf, as Dovecot does
        part.multipart = part.digest = part.rfc822 = False
    return registered, pos


def _parse_structure(data: bytes) -> _Part:
    n = len(data)
    root = cur = _Part(None, 0, 0)
    boundaries: list[_Boundary] = []
    pos = 0
    mode = "header"
    while True:
        if mode == "header":
            multipart_body, pos = _parse_header(data, cur, pos, boundaries)
            if multipart_body:
                mode = "boundary"
            elif cur.rfc822:
                mode = "rfc822"
            else:
                mode = "boundary" if boundaries else "eof"
        elif mode == "rfc822":
            child = _Part(cur, cur.end, cur.depth + 1)
            cur.children.append(child)
            cur = child
            mode = "header"
        elif mode == "eof":
            cur.bsize += n - pos
            break
        else:
            found = _find_delimiter(data, pos, boundaries)
            if found is None:
                cur.bsize += n - pos
                break
            start, line, boundary, closes = found
            cur.bsize += start - pos
            while cur is not boundary.part and cur.parent is not None:
                cur.parent.bsize += cur.hsize + cur.bsize
                cur = cur.parent
            index = next(i for i, b in enumerate(boundaries) if b is boundary)
            del boundaries[index if closes else index + 1 :]
            lf = data.find(b"\n", line + 2 + len(boundary.text) + (2 if closes else 0))
            if lf < 0:
                cur.bsize += n - start
                break
            cur.bsize += lf + 1 - start
            pos = lf + 1
            if boundaries and boundaries[-1].part is cur:
                child = _Part(cur, cur.end, cur.depth + 1, is_mime=True)
                cur.children.append(child)
                cur = child
                mode = "header"
            else:  # epilogue
                mode = "boundary" if boundaries else "eof"
    while cur.parent is not None:
        cur.parent.bsize += cur.hsize + cur.bsize
        cur = cur.parent
    return root


# ---------------------------------------------------------------------------------------------
# BODYSTRUCTURE data of one part (Dovecot's message-part-data.c)


@dataclass
class _PartData:
    type: bytes | None = None
    subtype: bytes | None = None
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    cte: bytes | None = None
    id: bytes | None = None
    description: bytes | None = None
    disposition: bytes | None = None
    disposition_params: list[tuple[bytes, bytes]] = field(default_factory=list)
    language: list[bytes] | None = None
    location: bytes | None = None
    md5: bytes | None = None


def _part_data(part: _Part) -> _PartData:
    data = _PartData()
    if not part.is_mime:  # without MIME-Version or Content-Type, Content-* are ignored
        return data
    for hdr in part.fields:
        if not hdr.lname.startswith(b"content-"):
            continue
        kind, value = hdr.lname[8:], hdr.value
        if kind == b"id" and data.id is None:
            data.id = value
        elif kind == b"md5" and data.md5 is None:
            data.md5 = value
        elif kind == b"type" and data.type is None:
            r = _Rfc822(value)
            r.skip_lwsp()
            ctype = bytearray()
            ret = r.parse_content_type(ctype)
            main, slash, sub = bytes(ctype).partition(b"/")
            data.type, data.subtype = main, (sub if slash else None)
            if ret >= 0:
                data.params = r.parse_params()
        elif kind == b"transfer-encoding" and data.cte is None:
            r = _Rfc822(value)
            r.skip_lwsp()
            token = bytearray()
            if r.parse_mime_token(token) >= 0 and r.skip_lwsp() == 0 and token:
                data.cte = bytes(token)
        elif kind == b"language" and data.language is None:
            r = _Rfc822(value)
            r.skip_lwsp()
            langs: list[bytes] = []
            atom = bytearray()
            while r.parse_atom(atom) >= 0:
                langs.append(bytes(atom))
                atom.clear()
                if r.pos >= r.end or r.data[r.pos] != 0x2C:
                    break
                r.pos += 1
                r.skip_lwsp()
            data.language = langs or None
        elif kind == b"location" and data.location is None:
            data.location = value
        elif kind == b"description" and data.description is None:
            data.description = value
        elif kind == b"disposition" and not data.disposition_params:
            r = _Rfc822(value)
            r.skip_lwsp()
            token = bytearray()
            if r.parse_mime_token(token) >= 0:
                data.disposition = bytes(token)
                data.disposition_params = r.parse_params()
    return data


# ---------------------------------------------------------------------------------------------
# Serialisation


def _for_humans(value: bytes) -> bytes:
    """Dovecot's form of Subject and display names: blank runs become one space, trimmed."""
    out = bytearray()
    blank = True
    for c in value:
        if c in (0x20, 0x09, 0x0D, 0x0A):
            if not blank:
                out.append(0x20)
            blank = True
        else:
            out.append(0x80 if c == 0 else c)
            blank = False
    if blank and out:
        out.pop()
    return bytes(out)


def _unnul(value: bytes | None) -> bytes | None:
    """A NUL in a Content-* value is U+FFFD, as Dovecot's header parser makes it."""
    return None if value is None else value.replace(b"\0", REPLACEMENT_CHAR)


def _nolf(value: bytes | None) -> bytes | None:
    """Dovecot's imap_append_nstring_nolf: CR and LF dropped, a space put where the next
    line does not begin with a blank."""
    if value is None or (b"\r" not in value and b"\n" not in value):
        return value
    out = bytearray()
    for i, c in enumerate(value):
        if c not in (0x0D, 0x0A):
            out.append(c)
        elif i + 1 < len(value) and value[i + 1] not in (0x20, 0x09, 0x0D, 0x0A):
            out.append(0x20)
    return bytes(out)


def _params(params: Sequence[tuple[bytes, bytes]], default_charset: bool) -> bytes:
    if not params and not default_charset:
        return b"NIL"
    items = [_string(k) + b" " + _string(v) for k, v in params]
    if default_charset and not any(k.lower() == b"charset" for k, _ in params):
        items.append(DEFAULT_CHARSET)
    return b"(" + b" ".join(items) + b")"


def _ext_common(data: _PartData) -> bytes:
    if data.disposition is None:
        disposition = b"NIL"
    else:
        disposition = (
            b"(" + _string(data.disposition) + b" " + _params(data.disposition_params, False) + b")"
        )
    language = b"NIL" if not data.language else b"(" + b" ".join(map(_string, data.language)) + b")"
    return b" " + disposition + b" " + language + b" " + _nstring(_nolf(_unnul(data.location)))


def _addresses(addrs: list[_Address] | None) -> bytes:
    if not addrs:
        return b"NIL"
    out = []
    for a in addrs:
        name = b"NIL" if a.name is None else _string(_for_humans(a.name))
        fields = [name, _nstring(a.route), _nstring(a.mailbox), _nstring(a.domain)]
        out.append(b"(" + b" ".join(fields) + b")")
    return b"(" + b"".join(out) + b")"


def _envelope(fields: Iterable[_Field]) -> bytes:
    """ENVELOPE from a header: the last Date/Subject/In-Reply-To/Message-ID wins, repeated
    address fields add up (Dovecot). A NUL is U+FFFD in strings and ends an address field."""
    strings: dict[bytes, bytes] = {}
    addrs: dict[bytes, list[_Address]] = {}
    for hdr in fields:
        if hdr.lname in (b"date", b"subject", b"in-reply-to", b"message-id"):
            strings[hdr.lname] = hdr.value.replace(b"\0", REPLACEMENT_CHAR)
        elif hdr.lname in (b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc"):
            value = hdr.value.split(b"\0", 1)[0]  # parsed as a C string
            addrs.setdefault(hdr.lname, []).extend(_AddressParser(value).parse())
    subject = strings.get(b"subject")
    sender = addrs.get(b"from")
    items = [
        _nstring(_nolf(strings.get(b"date"))),
        b"NIL" if subject is None else _string(_for_humans(subject)),
        _addresses(sender),
        _addresses(addrs.get(b"sender") or sender),
        _addresses(addrs.get(b"reply-to") or sender),
        _addresses(addrs.get(b"to")),
        _addresses(addrs.get(b"cc")),
        _addresses(addrs.get(b"bcc")),
        _nstring(_nolf(strings.get(b"in-reply-to"))),
        _nstring(_nolf(strings.get(b"message-id"))),
    ]
    return b"(" + b" ".join(items) + b")"


# ---------------------------------------------------------------------------------------------
# Content-Transfer-Encoding decoding for BINARY (Dovecot's qp-decoder.c and base64 rules)

_CTE_78BIT, _CTE_BINARY, _CTE_QP, _CTE_BASE64, _CTE_UNKNOWN = range(5)
_CTE_NAMES = {
    b"7bit": _CTE_78BIT,
    b"8bit": _CTE_78BIT,
    b"binary": _CTE_BINARY,
    b"quoted-printable": _CTE_QP,
    b"base64": _CTE_BASE64,
}
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_QP_MAX_BLANKS = 76
_QP_SPECIAL = re.compile(rb"[=\r\n \t]")
_BLANKS = re.compile(rb"[ \t\r\n]+")


def _cte_of(part: _Part) -> int:
    """The transfer encoding BINARY decodes, as Dovecot 2.3 reads it: the last field wins,
    a folded field is not understood, and after the token only a comment or ';' may follow."""
    cte = _CTE_78BIT
    for hdr in part.fields:
        if hdr.lname != b"content-transfer-encoding":
            continue
        if b"\n" in hdr.raw.rstrip(b"\r\n"):
            cte = _CTE_UNKNOWN
            continue
        r = _Rfc822(hdr.value)
        r.skip_lwsp()
        token = bytearray()
        if r.parse_mime_token(token) > 0 and r.cur() != 0x3B:
            cte = _CTE_UNKNOWN
        else:
            cte = _CTE_NAMES.get(bytes(token).lower(), _CTE_UNKNOWN)
    return cte


def _qp_invalid(what: str) -> BinaryError:
    return BinaryError("PARSE", f"Invalid data in MIME part (quoted-printable: {what})")


def _qp_decode(src: bytes) -> bytes:
    """Quoted-printable as Dovecot decodes it; any invalid sequence is an error."""
    text, blank, equals, equals_blank, hex2, cr, softcr = range(7)
    out = bytearray()
    blanks = bytearray()
    state = text
    hexchar = 0
    i, n = 0, len(src)
    while i < n:
        if state == text:  # copy ordinary octets in one go
            special = _QP_SPECIAL.search(src, i)
            stop = n if special is None else special.start()
            out += src[i:stop]
            i = stop
            if i == n:
                break
        c = src[i]
        if state == text:
            if c == 0x3D:
                state = equals
            elif c == 0x0D:
                state = cr
            elif c == 0x0A:
                out += CRLF
            else:  # blank
                state = blank
                blanks.append(c)
        elif state == blank:
            if c in (0x20, 0x09):
                if len(blanks) <= _QP_MAX_BLANKS:
                    blanks.append(c)
            elif c == 0x0D:
                state = cr
            elif c == 0x0A:  # trailing blanks are dropped
                out += CRLF
                blanks.clear()
            else:
                out += blanks
                if len(blanks) > _QP_MAX_BLANKS:
                    raise _qp_invalid("too much whitespace")
                blanks.clear()
                state = text
                continue
        elif state == equals:
            if c in _HEX:
                hexchar = c
                state = hex2
            elif c in (0x20, 0x09):
                blanks.append(c)
                state = equals_blank
            elif c == 0x0D:
                state = softcr
            elif c == 0x0A:
                state = text
            else:
                raise _qp_invalid("'=' not followed by two hex digits")
        elif state == hex2:
            if c not in _HEX:
                raise _qp_invalid("'=<hex>' not followed by a hex digit")
            out.append(int(bytes([hexchar, c]), 16))
            state = text
        elif state == equals_blank:
            if c in (0x20, 0x09):
                if len(blanks) <= _QP_MAX_BLANKS:
                    blanks.append(c)
            elif c == 0x0D:
                state = softcr
            elif c == 0x0A:
                blanks.clear()
                state = text
            else:
                raise _qp_invalid("'=<whitespace>' not followed by newline")
        else:  # cr, softcr
            if c != 0x0A:
                raise _qp_invalid("CR not followed by LF")
            blanks.clear()
            if state == cr:
                out += CRLF
            state = text
        i += 1
    if state not in (text, blank):
        raise _qp_invalid("truncated escape at the end")
    return bytes(out)


def _base64_decode(src: bytes) -> bytes:
    """Base64 with blanks and line breaks anywhere; nothing but blanks after the padding."""
    try:
        return binascii.a2b_base64(_BLANKS.sub(b"", src), strict_mode=True)
    except binascii.Error as exc:
        raise BinaryError("PARSE", f"Invalid data in MIME part (base64: {exc})") from None


# ---------------------------------------------------------------------------------------------
# The view


class MessageView:
    """All content-derived FETCH items of one message (lazily computed, cached).

    `raw` is the message as served: line endings canonicalised to CRLF.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = to_crlf(raw)
        self._text = self.raw.replace(b"\0", b"\x80")  # what BODY[...] serves
        self._bodystructures: dict[bool, bytes] = {}
        self._binaries: dict[tuple[int, ...], tuple[bytes, bool] | BinaryError] = {}

    # -- structure ---------------------------------------------------------------------------

    @cached_property
    def _root(self) -> _Part:
        return _parse_structure(self.raw)

    def _find(self, path: Sequence[int]) -> _Part | None:
        """The part a section number names (Dovecot's imap_msgpart_find)."""
        part: _Part | None = self._root
        for i, num in enumerate(path):
            if part is None:
                return None
            more = i + 1 < len(path)
            if part.multipart:
                index = max(num, 1) - 1
                part = part.children[index] if index < len(part.children) else None
            elif num != 1 or (more and not part.rfc822):
                part = None
            if part is not None and part.rfc822 and more:
                part = part.children[0]
        return part

    def part_paths(self) -> list[tuple[int, ...]]:
        """Every section number with content, in BODYSTRUCTURE order (for tests and tools)."""
        paths: list[tuple[int, ...]] = []

        def walk(part: _Part, prefix: tuple[int, ...]) -> None:
            if part.multipart:
                for i, child in enumerate(part.children, 1):
                    paths.append((*prefix, i))
                    walk(child, (*prefix, i))
            elif part.rfc822 and part.children:
                inner = part.children[0]
                if inner.multipart:
                    walk(inner, prefix)
                elif prefix:
                    paths.append((*prefix, 1))
                    walk(inner, (*prefix, 1))

        root = self._root
        if not root.multipart:
            paths.append((1,))
            if root.rfc822 and root.children:
                inner = root.children[0]
                if inner.multipart:
                    walk(inner, (1,))
                else:
                    paths.append((1, 1))
                    walk(inner, (1, 1))
        else:
            walk(root, ())
        return paths

    def _header(self, part: _Part) -> bytes:
        return self._text[part.pos : part.body_pos]

    def _body(self, part: _Part) -> bytes:
        return self._text[part.body_pos : part.end]

    # -- simple items ------------------------------------------------------------------------

    def rfc822_size(self) -> int:
        """RFC822.SIZE: octets of the message as served."""
        return len(self.raw)

    def rfc822(self) -> bytes:
        """RFC822 (= BODY[])."""
        return self._text

    def rfc822_header(self) -> bytes:
        """RFC822.HEADER (= BODY.PEEK[HEADER]), blank line included."""
        return self._header(self._root)

    def rfc822_text(self) -> bytes:
        """RFC822.TEXT (= BODY[TEXT])."""
        return self._body(self._root)

    def envelope(self) -> bytes:
        """ENVELOPE as a parenthesised list."""
        return self._envelope_value

    @cached_property
    def _envelope_value(self) -> bytes:
        return _envelope(self._root.fields)

    def bodystructure(self, extensible: bool = True) -> bytes:
        """BODYSTRUCTURE (extension data included) or, with extensible=False, BODY."""
        cache = self._bodystructures
        if extensible not in cache:
            cache[extensible] = b"(" + self._write(self._root, extensible) + b")"
        return cache[extensible]

    def _write(self, part: _Part, ext: bool) -> bytes:
        data = _part_data(part)
        if part.multipart:
            if part.children:
                out = b"".join(b"(" + self._write(child, ext) + b")" for child in part.children)
            else:  # no parts: Dovecot shows one empty text/plain part
                out = EMPTY_BODYSTRUCTURE if ext else EMPTY_BODY
            out += b" " + _string(data.subtype or b"")
            if ext:
                out += b" " + _params(data.params, False) + _ext_common(data)
            return out
        if part.rfc822:
            out = b'"message" "rfc822"'
            text = False
        elif data.type is None:
            out = b'"text" "plain"'
            text = True
        else:
            out = _string(data.type) + b" " + _string(data.subtype or b"")
            text = data.type.lower() == b"text"
        out += b" " + _params(data.params, text)
        out += b" " + _nstring(_nolf(_unnul(data.id)))
        out += b" " + _nstring(_nolf(_unnul(data.description)))
        out += b" " + (b'"7bit"' if data.cte is None else _string(data.cte))
        out += b" " + _number(part.bsize)
        if text:
            out += b" " + _number(self._body(part).count(b"\n"))
        elif part.rfc822 and part.children:
            inner = part.children[0]
            out += b" " + _envelope(inner.fields)
            out += b" (" + self._write(inner, ext) + b")"
            out += b" " + _number(self._body(part).count(b"\n"))
        if ext:
            out += b" " + _nstring(_nolf(_unnul(data.md5))) + _ext_common(data)
        return out

    # -- sections ----------------------------------------------------------------------------

    def section(
        self,
        part: Sequence[int] = (),
        text: str | None = None,
        fields: Iterable[str | bytes] = (),
    ) -> bytes:
        """The octets of BODY[section]: `part` is the section number (() for the message),
        `text` one of None, "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"
        (any case), `fields` the field names of HEADER.FIELDS[.NOT].

        HEADER includes the blank line. HEADER.FIELDS is the matching fields in message
        order followed by CRLF; HEADER.FIELDS.NOT is the other fields followed by the blank
        line if the header has one (that difference is Dovecot's). A part that does not
        exist, or HEADER/TEXT of a part that is not message/rfc822, gives b"".
        Raises ValueError for section forms IMAP does not allow.
        """
        if isinstance(fields, (str, bytes)):
            raise TypeError("fields is a sequence of field names")
        kind = (text or "").upper()
        if kind not in ("", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"):
            raise ValueError(f"unknown section text {text!r}")
        names = {(f if isinstance(f, bytes) else f.encode("utf-8")).lower() for f in fields}
        if kind.startswith("HEADER.FIELDS") and not names:
            raise ValueError("HEADER.FIELDS needs at least one field name")
        if any(n < 0 for n in part):
            raise ValueError("section numbers are positive")
        target: _Part | None = self._root
        if not part:
            if kind == "":
                return self._text
            if kind == "MIME":
                raise ValueError("MIME needs a part number")
        else:
            target = self._find(part)
            if target is None:
                return b""
            if kind == "":
                return self._body(target)
            if kind == "MIME":
                return self._header(target)
            if not target.rfc822 or not target.children:
                return b""
            target = target.children[0]
        assert target is not None
        if kind == "HEADER":
            return self._header(target)
        if kind == "TEXT":
            return self._body(target)
        include = kind == "HEADER.FIELDS"
        out = bytearray()
        if not part:  # the message's own header (Dovecot's header cache): always CRLF-closed
            offset = target.pos
            for hdr in target.fields:
                raw = self._text[offset : min(offset + len(hdr.raw), target.body_pos)]
                offset += len(hdr.raw)
                if (hdr.lname in names) == include:
                    out += raw
                    if include and not raw.endswith(b"\n"):
                        out += CRLF
            if include or target.eoh:
                out += CRLF
            return bytes(out)
        # a message/rfc822 part's header is read again from its start up to the first blank
        # line, MIME boundaries notwithstanding (Dovecot's header filter does that)
        fields, eoh = _read_header(self._text, target.pos)
        for hdr in fields:
            if (hdr.lname in names) == include:
                out += hdr.raw
        if eoh:
            out += CRLF
        return bytes(out)

    @staticmethod
    def partial(data: bytes, offset: int, length: int | None = None) -> bytes:
        """<offset.length> of a section; the response names it BODY[...]<offset>.

        An offset at or past the end gives b"" (RFC 3501 6.4.5)."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("partial offset and length are non-negative")
        if offset >= len(data):
            return b""
        return data[offset:] if length is None else data[offset : offset + length]

    # -- BINARY (RFC 3516) -------------------------------------------------------------------

    def binary(self, part: Sequence[int] = ()) -> bytes:
        """BINARY[part]: the part's body with its Content-Transfer-Encoding removed.

        `()` is BINARY[]: the whole message, every base64/quoted-printable leaf decoded and
        its Content-Transfer-Encoding field replaced by "binary" at the end of its header.
        A multipart or message/rfc822 part gives its body converted the same way. A part
        that does not exist gives b"". Raises BinaryError (UNKNOWN-CTE, PARSE).
        Send the result as literal8 (~{n}) when `binary_literal8` says so.
        """
        return self._binary(part)[0]

    def binary_size(self, part: Sequence[int] = ()) -> int:
        """BINARY.SIZE[part]: the length of BINARY[part]."""
        return len(self._binary(part)[0])

    def binary_literal8(self, part: Sequence[int] = ()) -> bool:
        """Whether BINARY[part] goes out as literal8: something was decoded or there is a NUL
        in it or in a header on the way (Dovecot's rule; a plain literal otherwise)."""
        data, literal8 = self._binary(part)
        return literal8 or b"\0" in data

    def _binary(self, path: Sequence[int]) -> tuple[bytes, bool]:
        key = tuple(path)
        if key not in self._binaries:
            target = self._find(path) if path else self._root
            if target is None:
                self._binaries[key] = (b"", False)
            else:
                out = bytearray()
                try:
                    literal8 = self._convert(target, not path, out)
                    self._binaries[key] = (bytes(out), literal8)
                except BinaryError as exc:
                    self._binaries[key] = exc
        value = self._binaries[key]
        if isinstance(value, BinaryError):
            raise value
        return value

    def _convert(self, part: _Part, include_header: bool, out: bytearray) -> bool:
        """Append BINARY of `part` to `out` (Dovecot's add_binary_part); True if the result
        should go out as literal8."""
        raw = self.raw  # NULs stay in BINARY
        # Dovecot sends literal8 when it decoded something or saw a NUL, in a header too
        literal8 = b"\0" in raw[part.pos : part.body_pos]
        cte = _cte_of(part)
        if cte == _CTE_UNKNOWN:
            raise BinaryError("UNKNOWN-CTE", "Unknown Content-Transfer-Encoding")
        if include_header:
            if cte in (_CTE_QP, _CTE_BASE64):  # the field moves to the end and says binary
                offset = part.pos
                for hdr in part.fields:
                    end = min(offset + len(hdr.raw), part.body_pos)
                    if hdr.lname != b"content-transfer-encoding":
                        out += raw[offset:end]
                    offset += len(hdr.raw)
                if part.eoh:
                    out += BINARY_CTE_FIELD + CRLF
            else:
                out += raw[part.pos : part.body_pos]
        if part.children:
            pos = part.body_pos
            for child in part.children:
                out += raw[pos : child.pos]
                literal8 |= self._convert(child, True, out)
                pos = child.end
            out += raw[pos : part.end]
        elif part.bsize:
            body = raw[part.body_pos : part.end]
            if cte == _CTE_QP:
                out += _qp_decode(body)
                literal8 = True
            elif cte == _CTE_BASE64:
                out += _base64_decode(body)
                literal8 = True
            else:
                out += body
        return literal8
