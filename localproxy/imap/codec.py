"""Sans-IO IMAP codec: bytes in, events out, in both directions (RFC 3501, RFC 9051).

`ClientParser` frames what a mail client sends into `Command` events; `ServerParser`
frames what the provider sends into `Untagged` / `Tagged` / `Continuation` events. Neither
does I/O: the relay calls `feed(data)`, then pulls events with `next_event()` (or iterates
the parser) and writes whatever it decides. Literals are framed by byte count, everything
else by CRLF. Every event with a `raw` field holds the exact bytes received, so traffic
the relay does not change is forwarded verbatim.

Literal announcements accepted at the end of a line:

    {N}     synchronizing (RFC 3501); a client waits for "+" before sending the octets
    {N+}    non-synchronizing (RFC 7888 LITERAL+; LITERAL- is the same syntax, N <= 4096)
    {N-}    in no RFC; accepted as non-synchronizing, because a client that sends it
            does not wait for "+" and treating it otherwise would desynchronize us
    ~{N}    literal8 (RFC 3516, RFC 9051); ~{N+} is its LITERAL+ form (RFC 3516 grammar)

Events are produced lazily by `next_event()`, so a mode switch (`expect_done()`,
`expect_continuation_line()`) made right after an event applies to bytes already fed.

Adjacent lists. The response grammar writes some lists of lists without a space between
the members: the sub-bodies of a multipart body (RFC 3501 `body-type-mpart = 1*body SP
media-subtype ...`), the addresses of an envelope field (`"(" 1*address ")"`), namespace
descriptors (RFC 2342) and threads (RFC 5256 `thread-list`). Server data is therefore read
with `(` allowed right after `)` (and nothing else without a space), so Dovecot's
`(("text" ...)("text" ...) "alternative")` parses. Strict mode (client commands) still
refuses `)(` with "missing space between arguments": no production of the command grammar
(RFC 3501, RFC 9051) joins two arguments without SP.

The writer emits the response form: inside a list, the lists that open it are written
back to back (a multipart body's parts, an address or namespace list) and every other pair
of tokens is separated by one space (`"rfc822" ... 489 (envelope) (body) 22`,
`("attachment" (...)) ("de" "en")`), which is Dovecot's output byte for byte. Not covered:
nested threads after thread members (`(3 6 (4 23)(44 7))`) and lists at the top level of a
response (`* THREAD (4)(1)`) come out with spaces; the relay forwards such responses as
received. `build_command` writes the command form (one space between all arguments).
`fetch_item_spans` gives each FETCH item's exact bytes for splicing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, TypeAlias

from localproxy.imap import wire

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

CRLF = b"\r\n"
_SP = 0x20
_MAX_DEPTH = 64  # nesting of lists and sections; real traffic stays far below
_MAX_DIGITS = 19  # number64 (RFC 9051); longer counts are absurd, and int() of huge
# digit strings is slow or refused by Python
# Tokens read per byte of input. Without backtracking every token takes a byte or more;
# each section that fails to close makes the rest be read once more (see _bracketed).
_TOKENS_PER_BYTE = 2


class ImapSyntaxError(ValueError):
    """An argument that breaks the grammar; str(error) is plain ASCII fit for a BAD text."""


# --------------------------------------------------------------------------- tokens


class LiteralForm(Enum):
    """How a literal was announced; the relay may re-announce it differently upstream."""

    SYNC = "{N}"
    PLUS = "{N+}"
    MINUS = "{N-}"
    BINARY = "~{N}"
    BINARY_PLUS = "~{N+}"

    @property
    def synchronizing(self) -> bool:
        return self in (LiteralForm.SYNC, LiteralForm.BINARY)

    @property
    def binary(self) -> bool:
        return self in (LiteralForm.BINARY, LiteralForm.BINARY_PLUS)

    def as_sync(self) -> LiteralForm:
        return LiteralForm.BINARY if self.binary else LiteralForm.SYNC

    def as_nonsync(self) -> LiteralForm:
        return LiteralForm.BINARY_PLUS if self.binary else LiteralForm.PLUS

    def announce(self, size: int) -> bytes:
        """The announcement including its CRLF, e.g. b"~{12+}\\r\\n"."""
        return self.value.replace("N", str(size)).encode("ascii") + CRLF


def _form_of(binary: bool, marker: bytes) -> LiteralForm:
    if binary:
        return LiteralForm.BINARY if not marker else LiteralForm.BINARY_PLUS
    return {b"": LiteralForm.SYNC, b"+": LiteralForm.PLUS, b"-": LiteralForm.MINUS}[marker]


@dataclass(frozen=True, slots=True)
class Atom:
    """An atom as sent (case kept): keywords, flags like \\Seen, sequence sets like 1:*."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Number:
    """An atom made of digits in canonical form (no leading zero), so it re-serializes
    byte-exact; "007" stays an Atom."""

    value: int


@dataclass(frozen=True, slots=True)
class Quoted:
    """A quoted string, unescaped."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Literal:
    data: bytes
    form: LiteralForm = LiteralForm.SYNC


@dataclass(frozen=True, slots=True)
class Nil:
    """The atom NIL (any case)."""


NIL = Nil()


@dataclass(frozen=True, slots=True)
class PList:
    """A parenthesized list."""

    items: tuple[Token, ...]


@dataclass(frozen=True, slots=True)
class SectionAtom:
    """An atom with a bracketed part, as in fetch attributes: BODY.PEEK[1.2.MIME]<0.100>
    is SectionAtom(b"BODY.PEEK", (Atom(b"1.2.MIME"),), b"0.100"); BODY[HEADER.FIELDS (A B)]
    has section (Atom(b"HEADER.FIELDS"), PList(...)). An atom that merely contains
    brackets, like the mailbox [Gmail]/Sent, stays an Atom."""

    name: bytes
    section: tuple[Token, ...]
    partial: bytes | None = None  # the text between < and >, e.g. b"0.1024"


Token: TypeAlias = Atom | Number | Quoted | Literal | Nil | PList | SectionAtom


def astring_value(token: Token) -> bytes | None:
    """The string an astring/nstring argument stands for; None for a list or section."""
    match token:
        case Atom(value) | Quoted(value):
            return value
        case Literal(data):
            return data
        case Number(value):
            return wire.number(value)
        case Nil():
            return b"NIL"
    return None


# --------------------------------------------------------------------------- serializing


@dataclass(frozen=True, slots=True)
class LiteralSpan:
    """Where a literal sits in a command's raw bytes: announcement at [start, data_start),
    octets at [data_start, end)."""

    start: int
    data_start: int
    end: int
    form: LiteralForm

    @property
    def size(self) -> int:
        return self.end - self.data_start


class _Writer:
    """Serializes tokens and remembers where the literals went. `command` selects the
    command form (one space between all tokens) over the response form, in which the
    lists opening a list are written back to back (see the module docstring)."""

    def __init__(self, *, command: bool = False) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.spans: list[LiteralSpan] = []
        self.join_lists = not command

    def getvalue(self) -> bytes:
        return b"".join(self.parts)

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    def tokens(self, tokens: Iterable[Token], *, in_list: bool = False) -> None:
        joined = in_list and self.join_lists  # still in the run of lists opening the list
        for index, token in enumerate(tokens):
            joined = joined and isinstance(token, PList)
            if index and not joined:
                self.write(b" ")
            self.token(token)

    def token(self, token: Token) -> None:
        match token:
            case Atom(value):
                self.write(value)
            case Number(value):
                self.write(wire.number(value))
            case Nil():
                self.write(b"NIL")
            case Quoted(value):
                encoded = wire.string(value)
                if encoded.startswith(b'"'):
                    self.write(encoded)
                else:  # wire.string chose a literal (8-bit, CR/LF, long): track it
                    self.literal(Literal(value))
            case Literal():
                self.literal(token)
            case PList(items):
                self.write(b"(")
                self.tokens(items, in_list=True)
                self.write(b")")
            case SectionAtom(name, section, partial):
                self.write(name + b"[")
                self.tokens(section)
                self.write(b"]" if partial is None else b"]<" + partial + b">")
            case _:
                raise TypeError(f"not a token: {token!r}")

    def literal(self, literal: Literal) -> None:
        start = self.size
        if literal.form is LiteralForm.SYNC:
            encoded = wire.literal(literal.data)
        else:
            encoded = literal.form.announce(len(literal.data)) + literal.data
        self.write(encoded)
        data_start = self.size - len(literal.data)
        self.spans.append(LiteralSpan(start, data_start, self.size, literal.form))


def serialize(tokens: Iterable[Token]) -> bytes:
    """Tokens in the response form: separated by single spaces, except that the lists
    opening a list are written back to back (`(("text" ...)("text" ...) "alternative")`,
    RFC 3501 body-type-mpart). Quoted strings via wire.string (which may turn them into
    literals), literals in the form they carry."""
    writer = _Writer()
    writer.tokens(tokens)
    return writer.getvalue()


def serialize_untagged(tokens: Iterable[Token]) -> bytes:
    """An untagged data response: * tokens CRLF."""
    return b"* " + serialize(tokens) + CRLF


# --------------------------------------------------------------------------- tokenizer


class _Incomplete(Exception):
    """The data ends inside a token; only expected while checking a command prefix."""


class _TooComplex(ImapSyntaxError):
    """Over the tokenizer's work budget; unlike other errors, never taken to mean that a
    section is just an atom with brackets in it."""


def _char_class(chars: Iterable[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(chars)) + b"]+"


_BASE_ATOM = frozenset(range(0x21, 0x7F)) - frozenset(b'(){"[]')
_EIGHT_BIT = frozenset(range(0x80, 0x100))
# Keyed by (8-bit allowed, "]" allowed, "[" allowed). "]" is an ASTRING-CHAR except
# inside brackets, where it closes the section or response code.
_ATOM_RUNS = {
    (eight, close, open_): re.compile(
        _char_class(
            _BASE_ATOM
            | (_EIGHT_BIT if eight else frozenset())
            | (frozenset(b"]") if close else frozenset())
            | (frozenset(b"[") if open_ else frozenset())
        )
    )
    for eight in (False, True)
    for close in (False, True)
    for open_ in (False, True)
}
_QUOTED_STRICT = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_QUOTED_LENIENT = re.compile(rb'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_UNESCAPE = re.compile(rb"\\(.)", re.S)
_LITERAL_HEAD = re.compile(rb"(~?)\{(\d{1,19})([+-]?)\}\r\n")
_PARTIAL = re.compile(rb"<([0-9.]{1,41})>")


def _atom_token(value: bytes) -> Token:
    if value.isdigit() and len(value) <= _MAX_DIGITS and (value[0] != 0x30 or len(value) == 1):
        return Number(int(value))
    if value.upper() == b"NIL":
        return NIL
    return Atom(value)


def _bad_char(byte: int) -> str:
    if byte >= 0x80:
        return "8-bit characters are allowed only in quoted strings and literals"
    if byte < 0x20 or byte == 0x7F:
        return "control character outside a literal"
    return f"unexpected {chr(byte)!r}"


class _Tokenizer:
    """Recursive descent over data[pos:end]. `strict` is for client commands (ASCII atoms,
    valid UTF-8 in quoted strings, only \\\\ and \\" escapes, SP between all arguments);
    `partial` means the data may stop inside a token (a command prefix waiting for a
    synchronizing literal). Without `copy_literals`, literals come out empty: for finding
    where tokens end without copying their octets again."""

    def __init__(
        self,
        data: bytes,
        pos: int,
        end: int,
        *,
        strict: bool,
        partial: bool = False,
        copy_literals: bool = True,
    ) -> None:
        self.data, self.pos, self.end = data, pos, end
        self.strict, self.partial = strict, partial
        self.copy_literals = copy_literals
        self.depth = 0
        # The contents of the brackets opening at each position: see _bracketed.
        self.brackets: dict[int, tuple[tuple[Token, ...], int] | None] = {}
        self.budget = _TOKENS_PER_BYTE * (end - pos) + 64

    def sequence(self, closer: int | None = None) -> tuple[Token, ...]:
        """Tokens up to `closer` (consumed) or, when closer is None, to the end."""
        items: list[Token] = []
        need_space = False
        while True:
            if self.pos >= self.end:
                if closer is None:
                    return tuple(items)
                raise self._cut_short(f"missing {chr(closer)!r}")
            byte = self.data[self.pos]
            if byte == closer:
                self.pos += 1
                return tuple(items)
            if byte == _SP:  # lenient: runs of spaces, leading and trailing spaces
                self.skip_spaces()
                need_space = False
                continue
            if need_space and not self._joined(byte, items[-1]):
                raise ImapSyntaxError("missing space between arguments")
            items.append(self._token(closer))
            need_space = True

    def skip_spaces(self) -> None:
        while self.pos < self.end and self.data[self.pos] == _SP:
            self.pos += 1

    def _joined(self, byte: int, previous: Token) -> bool:
        """`(` right after `)`: lists of lists in server data (module docstring)."""
        return byte == 0x28 and isinstance(previous, PList) and not self.strict

    def _cut_short(self, reason: str) -> Exception:
        return _Incomplete() if self.partial else ImapSyntaxError(reason)

    @contextmanager
    def _nested(self) -> Iterator[None]:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ImapSyntaxError("arguments nested too deeply")
        try:
            yield
        finally:
            self.depth -= 1

    def token(self, closer: int | None) -> Token:
        """One token at pos; `closer` is that of the enclosing list or section."""
        if self.pos >= self.end:
            raise self._cut_short("argument expected")
        return self._token(closer)

    def _token(self, closer: int | None) -> Token:
        self.budget -= 1
        if self.budget < 0:
            raise _TooComplex("arguments too complex")
        byte = self.data[self.pos]
        if byte == 0x28:  # (
            self.pos += 1
            with self._nested():
                return PList(self.sequence(0x29))
        if byte == 0x22:  # "
            return self._quoted()
        if byte == 0x7B or (byte == 0x7E and self.data[self.pos + 1 : self.pos + 2] == b"{"):
            return self._literal()
        if byte == 0x29:
            raise ImapSyntaxError("unexpected ')'")
        return self._atomish(closer)

    def _quoted(self) -> Quoted:
        pattern = _QUOTED_STRICT if self.strict else _QUOTED_LENIENT
        match = pattern.match(self.data, self.pos, self.end)
        if match is None:
            raise ImapSyntaxError("unterminated or invalid quoted string")
        self.pos = match.end()
        value = match[1]
        if b"\\" in value:
            value = _UNESCAPE.sub(rb"\1", value)
        if self.strict and not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise ImapSyntaxError("invalid UTF-8 in quoted string") from None
        return Quoted(value)

    def _literal(self) -> Literal:
        match = _LITERAL_HEAD.match(self.data, self.pos, self.end)
        if match is None:
            raise ImapSyntaxError("malformed literal: {N} must end its line")
        start = match.end()
        stop = start + int(match[2])
        if stop > self.end:
            raise self._cut_short("literal cut short")
        self.pos = stop
        data = self.data[start:stop] if self.copy_literals else b""
        return Literal(data, _form_of(bool(match[1]), match[3]))

    def _atomish(self, closer: int | None) -> Token:
        in_brackets = closer == 0x5D
        start = self.pos
        run = _ATOM_RUNS[(not self.strict, not in_brackets, False)].match(
            self.data, start, self.end
        )
        name_end = run.end() if run else start
        if name_end > start and self.data[name_end : name_end + 1] == b"[":
            section = self._section(start, name_end, closer)
            if section is not None:
                return section
        self.pos = start
        plain = _ATOM_RUNS[(not self.strict, not in_brackets, True)].match(
            self.data, start, self.end
        )
        if plain is None:
            raise ImapSyntaxError(_bad_char(self.data[start]))
        self.pos = plain.end()
        return _atom_token(plain.group())

    def _section(self, start: int, bracket: int, closer: int | None) -> SectionAtom | None:
        """name[...]<partial>, or None when the brackets are just part of an atom."""
        contents = self._bracketed(bracket)
        if contents is None:
            return None
        section, self.pos = contents
        partial = None
        match = _PARTIAL.match(self.data, self.pos, self.end)
        if match:
            partial = match[1]
            self.pos = match.end()
        if self.pos < self.end and self.data[self.pos] not in (_SP, 0x29, closer):
            return None  # e.g. foo[1]bar: an atom with brackets in it
        return SectionAtom(self.data[start:bracket], section, partial)

    def _bracketed(self, bracket: int) -> tuple[tuple[Token, ...], int] | None:
        """The tokens between the "[" at `bracket` and its "]" and the position after
        it; None when they do not parse. A section that fails is re-read as an atom and
        what follows it is read again: kept per position, the sections nested in it are
        not parsed again (that doubled the work per level: `A[ (` x 30 ran for hours),
        and the budget bounds the re-reading (k nested failures read the rest k times)."""
        if bracket not in self.brackets:
            self.pos = bracket + 1
            try:
                with self._nested():
                    self.brackets[bracket] = self.sequence(0x5D), self.pos
            except _TooComplex:
                raise
            except ImapSyntaxError:
                self.brackets[bracket] = None
        return self.brackets[bracket]


def tokenize(data: bytes, *, strict: bool = False) -> tuple[Token, ...]:
    """Tokens of a complete argument string (literals inline as {N}CRLF<octets>).
    Raises ImapSyntaxError."""
    return _Tokenizer(data, 0, len(data), strict=strict).sequence()


# --------------------------------------------------------------------------- events


class CommandChunk(NamedTuple):
    """Send `head`; if `literal` is not None, wait for the server's "+", then continue with
    `literal` and the next chunk's head."""

    head: bytes
    literal: bytes | None


@dataclass(frozen=True)
class Command:
    """A complete client command. `raw` is exactly what the client sent (literal octets
    and every CRLF included). For UID commands `name` is b"UID" and `subcommand` the
    command it applies to (b"FETCH"); `args` are the arguments after the (sub)command."""

    tag: bytes
    name: bytes
    raw: bytes
    args: tuple[Token, ...]
    subcommand: bytes | None = None
    literal_spans: tuple[LiteralSpan, ...] = ()

    @property
    def verb(self) -> bytes:
        """b"UID FETCH" for UID commands, else the name: one key for dispatch tables."""
        return self.name if self.subcommand is None else self.name + b" " + self.subcommand

    def chunks(
        self, *, literal_plus: bool = False, literal_minus: bool = False
    ) -> list[CommandChunk]:
        """`raw` re-announced for an upstream: all literals non-synchronizing when it has
        LITERAL+, those of <= 4096 octets when it has LITERAL- (RFC 7888), otherwise
        synchronizing, in which case the command is split at each literal."""
        chunks: list[CommandChunk] = []
        head: list[bytes] = []
        position = 0
        for span in self.literal_spans:
            head.append(self.raw[position : span.start])
            data = self.raw[span.data_start : span.end]
            if literal_plus or (literal_minus and span.size <= 4096):
                head += [span.form.as_nonsync().announce(span.size), data]
            else:
                head.append(span.form.as_sync().announce(span.size))
                chunks.append(CommandChunk(b"".join(head), data))
                head = []
            position = span.end
        head.append(self.raw[position:])
        chunks.append(CommandChunk(b"".join(head), None))
        return chunks


def build_command(
    tag: bytes, name: bytes, args: Sequence[Token] = (), subcommand: bytes | None = None
) -> Command:
    """A Command the relay makes itself; send it with `chunks()`."""
    writer = _Writer(command=True)  # the command grammar has SP between all arguments
    writer.write(tag + b" " + name + (b" " + subcommand if subcommand else b""))
    if args:
        writer.write(b" ")
        writer.tokens(args)
    writer.write(CRLF)
    return Command(
        tag, name.upper(), writer.getvalue(), tuple(args), subcommand, tuple(writer.spans)
    )


@dataclass(frozen=True)
class ContinuationNeeded:
    """The client announced a synchronizing literal: write "+ Ready for literal data\\r\\n"
    to it; the octets follow."""

    tag: bytes
    size: int


@dataclass(frozen=True)
class IdleDone:
    """The DONE line ending IDLE (after expect_done())."""

    raw: bytes


@dataclass(frozen=True)
class ContinuationLine:
    """A client line answering a "+" (AUTHENTICATE), after expect_continuation_line().
    `data` is the line without CRLF: base64, or b"*" to cancel."""

    raw: bytes
    data: bytes

    @property
    def cancelled(self) -> bool:
        return self.data == b"*"


@dataclass(frozen=True)
class Rejected:
    """A command the relay should answer with `tag BAD reason` (tag b"*": untagged BAD)
    and not forward. `raw` holds what was buffered of it (skipped literal octets not
    included). The parser has resynchronized and continues with the next command."""

    tag: bytes
    reason: str
    raw: bytes = b""


@dataclass(frozen=True)
class Fatal:
    """The stream cannot be followed any more (line or literal far over the limits): send
    BYE with `reason` and close. The parser ignores everything after it."""

    reason: str


ClientEvent: TypeAlias = (
    Command | ContinuationNeeded | IdleDone | ContinuationLine | Rejected | Fatal
)


@dataclass(frozen=True)
class ResponseCode:
    """The bracketed code of a status response: [APPENDUID 38505 3955] is
    ResponseCode(b"APPENDUID", (Number(38505), Number(3955)), b"APPENDUID 38505 3955").
    `raw` is the text between the brackets as received."""

    name: bytes
    args: tuple[Token, ...] = ()
    raw: bytes = b""

    @classmethod
    def build(cls, name: bytes, *args: Token) -> ResponseCode:
        return cls(name.upper(), args, name + (b" " + serialize(args) if args else b""))

    def to_bytes(self) -> bytes:
        return b"[" + (self.raw or self.name) + b"]"


@dataclass(frozen=True)
class Untagged:
    """`* ...`. For data responses `tokens` are everything after "* " (literals included);
    for status responses (OK NO BAD BYE PREAUTH) `tokens` is just the status atom and
    `status`, `code`, `text` hold the rest, because resp-text is free text, not tokens."""

    raw: bytes
    tokens: tuple[Token, ...]
    status: bytes | None = None
    code: ResponseCode | None = None
    text: bytes = b""

    @property
    def number(self) -> int | None:
        """12 in `* 12 FETCH ...`."""
        first = self.tokens[0] if self.tokens else None
        return first.value if isinstance(first, Number) else None

    @property
    def name(self) -> bytes:
        """Upper-cased keyword: b"FETCH" for `* 12 FETCH`, b"CAPABILITY", b"OK"."""
        for token in self.tokens[:2]:
            if isinstance(token, Atom):
                return token.value.upper()
        return b""


@dataclass(frozen=True)
class Tagged:
    tag: bytes
    status: bytes  # OK, NO or BAD (PREAUTH and BYE are accepted leniently)
    raw: bytes
    code: ResponseCode | None = None
    text: bytes = b""


@dataclass(frozen=True)
class Continuation:
    """`+ text`: text is a human message or base64 SASL data."""

    raw: bytes
    text: bytes


@dataclass(frozen=True)
class Unparsed:
    """A complete server response that breaks the grammar; framing is intact, so the
    relay can still forward `raw` or drop it."""

    raw: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class RawFetch:
    """`* n FETCH (...)` framed but not tokenized (ServerParser(lazy_fetch=True)): a relay
    that forwards most FETCH responses unchanged skips the tokenizer, the costliest step
    on a big mailbox, and calls `parse()` for the few it must look into."""

    raw: bytes
    number: int

    def parse(self) -> Untagged | Unparsed:
        return _parse_untagged_data(self.raw)


ServerEvent: TypeAlias = Untagged | Tagged | Continuation | Unparsed | Fatal | RawFetch


# --------------------------------------------------------------------------- framing


class _TooLong:
    pass


_TOO_LONG = _TooLong()


def _find_announcement(line: bytes) -> tuple[int, int | None, LiteralForm] | None:
    """A literal announced at the end of a line (CRLF included): (offset of "{" or "~",
    size or None when the count is absurdly long, form)."""
    if not line.endswith(b"}\r\n"):
        return None
    brace = line.rfind(b"{", 0, len(line) - 3)
    if brace < 0:
        return None
    body = line[brace + 1 : -3]
    marker = body[-1:] if body[-1:] in (b"+", b"-") else b""
    digits = body[: len(body) - len(marker)]
    if not digits or not digits.isdigit():
        return None
    binary = line[brace - 1 : brace] == b"~"
    size = int(digits) if len(digits) <= _MAX_DIGITS else None
    return (brace - 1 if binary else brace), size, _form_of(binary, marker)


class _Framer:
    """Byte buffer with CRLF line extraction under a line-length cap."""

    def __init__(self, max_line_length: int) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # leading bytes of the buffer known to hold no CRLF
        self._max_line = max_line_length
        self._dead = False

    def feed(self, data: bytes) -> None:
        """Append received bytes; ignored after a Fatal event."""
        if not self._dead:
            self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet consumed by an event (excludes a command or response
        in progress, see pending_bytes)."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        """True after a Fatal event."""
        return self._dead

    def _take_line(self) -> bytes | _TooLong | None:
        end = self._buffer.find(CRLF, max(0, self._scanned - 1))
        if end < 0:
            self._scanned = len(self._buffer)
            # max_line content bytes plus a CR whose LF has not arrived yet are fine
            return _TOO_LONG if len(self._buffer) > self._max_line + 1 else None
        if end > self._max_line:
            return _TOO_LONG
        return self._take(end + 2)

    def _take(self, count: int) -> bytes:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._scanned = 0
        return data

    def _fatal(self, reason: str) -> Fatal:
        self._dead = True
        self._buffer.clear()
        self._drop_pending()
        return Fatal(reason)

    def _drop_pending(self) -> None:
        """Forget the command or response in progress."""


class _Mode(Enum):
    COMMAND = "command"
    DONE = "done"
    CONTINUATION_LINE = "continuation line"


_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+')
_COMMAND_NAME = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\[\]]+')


def _tag_of(first_line: bytes) -> bytes:
    match = _TAG.match(first_line)
    if match and first_line[match.end() : match.end() + 1] in (b" ", b"\r"):
        return match.group()
    return b"*"


class ClientParser(_Framer):
    """Client -> server. Limits (octets):

    max_line_length: non-literal bytes of one line; over it -> Fatal, because without the
        end of that line we cannot tell whether a literal follows it.
    max_literal_size: one literal. A synchronizing one over it -> Rejected at once (no
        continuation, so the client never sends the octets). A non-synchronizing one over it
        is skipped without buffering, the rest of the command discarded, then Rejected.
    max_command_size: the whole command including literals; treated like the literal cap.
        Defaults to max_literal_size + 1 MiB.
    max_skip_size: a non-synchronizing literal larger than this is not worth reading past:
        Fatal instead of skipping it.
    max_nonsync_literal_size: set it to 4096 when advertising LITERAL- instead of LITERAL+;
        larger non-synchronizing literals are then skipped and Rejected (RFC 7888 asks for
        BAD [TOOBIG]; the relay adds the code).
    """

    def __init__(
        self,
        *,
        max_line_length: int = 64 * KiB,
        max_literal_size: int = 64 * MiB,
        max_command_size: int | None = None,
        max_skip_size: int = GiB,
        max_nonsync_literal_size: int | None = None,
    ) -> None:
        super().__init__(max_line_length)
        self._max_literal = max_literal_size
        self._max_command = (
            max_command_size if max_command_size is not None else max_literal_size + MiB
        )
        self._max_skip = max_skip_size
        self._max_nonsync = max_nonsync_literal_size
        self._mode = _Mode.COMMAND
        self._reset()

    def _drop_pending(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._spans: list[LiteralSpan] = []
        self._literal_left = 0
        self._skipping = False
        self._discard: tuple[bytes, str] | None = None  # (tag, reason) of a command
        self._discard_raw = b""  # being thrown away up to its end

    # -- modes ------------------------------------------------------------------------

    def expect_done(self) -> None:
        """The server accepted IDLE: the next line is DONE (-> IdleDone)."""
        self._set_mode(_Mode.DONE)

    def expect_continuation_line(self) -> None:
        """A "+" went to the client during AUTHENTICATE: the next line is its answer
        (-> ContinuationLine). Call again for every further "+"."""
        self._set_mode(_Mode.CONTINUATION_LINE)

    def expect_command(self) -> None:
        """Back to tagged commands (e.g. the server rejected IDLE or ended AUTHENTICATE)."""
        self._set_mode(_Mode.COMMAND)

    def _set_mode(self, mode: _Mode) -> None:
        if self.in_command:
            raise RuntimeError("cannot switch modes in the middle of a command")
        self._mode = mode

    @property
    def in_command(self) -> bool:
        """Part of a command has been read (e.g. waiting for literal octets)."""
        return bool(self._parts) or self._discard is not None

    @property
    def pending_bytes(self) -> int:
        """Everything held in memory: unparsed buffer plus the command in progress."""
        return len(self._buffer) + self._size

    # -- events -----------------------------------------------------------------------

    def next_event(self) -> ClientEvent | None:
        """The next event, or None when more bytes are needed."""
        while not self._dead:
            if self._literal_left:
                if not self._consume_literal():
                    return None
                continue
            line = self._take_line()
            if line is None:
                return None
            if isinstance(line, _TooLong):
                return self._fatal(f"line longer than {self._max_line} octets")
            event = self._on_line(line)
            if event is not None:
                return event
        return None

    def __iter__(self) -> Iterator[ClientEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def _consume_literal(self) -> bool:
        count = min(self._literal_left, len(self._buffer))
        if not count:
            return False
        if self._skipping:
            del self._buffer[:count]
            self._scanned = 0
        else:
            self._parts.append(self._take(count))
            self._size += count
        self._literal_left -= count
        return True

    def _on_line(self, line: bytes) -> ClientEvent | None:
        if self._mode is _Mode.DONE:
            if line[:-2].upper() == b"DONE":
                self._mode = _Mode.COMMAND
                return IdleDone(line)
            return Rejected(b"*", "expected DONE to end IDLE", line)
        if self._mode is _Mode.CONTINUATION_LINE:
            self._mode = _Mode.COMMAND
            return ContinuationLine(line, line[:-2])
        if self._discard is None and self._size + len(line) > self._max_command:
            tag = _tag_of(self._parts[0] if self._parts else line)
            self._start_discarding(tag, f"command longer than {self._max_command} octets")
        if self._discard is not None:
            return self._on_discarded_line(line)
        self._parts.append(line)
        self._size += len(line)
        announcement = _find_announcement(line)
        if announcement is None:
            return self._finish_command()
        return self._on_announcement(announcement)

    def _on_announcement(
        self, announcement: tuple[int, int | None, LiteralForm]
    ) -> ClientEvent | None:
        offset, size, form = announcement
        tag = _tag_of(self._parts[0])
        if size is None or (not form.synchronizing and size > self._max_skip):
            if form.synchronizing:
                return self._reject_now(tag, "literal too large")
            return self._fatal("non-synchronizing literal too large to skip")
        problem = self._literal_problem(size, form)
        if form.synchronizing:
            problem = problem or self._prefix_problem()
            if problem:
                return self._reject_now(tag, problem)
        elif problem:
            self._start_discarding(tag, problem)
            self._literal_left, self._skipping = size, True
            return None
        start = self._size - len(self._parts[-1]) + offset
        self._spans.append(LiteralSpan(start, self._size, self._size + size, form))
        self._literal_left = size
        return ContinuationNeeded(tag, size) if form.synchronizing else None

    def _literal_problem(self, size: int, form: LiteralForm) -> str | None:
        if size > self._max_literal:
            return f"literal larger than {self._max_literal} octets"
        if self._size + size > self._max_command:
            return f"command longer than {self._max_command} octets"
        if not form.synchronizing and self._max_nonsync is not None and size > self._max_nonsync:
            return f"non-synchronizing literal larger than {self._max_nonsync} octets"
        return None

    def _prefix_problem(self) -> str | None:
        """Check the command so far before inviting the octets with "+" (RFC 3501 7.5
        lets the server answer BAD instead). Only for the first literal: later ones would
        re-scan the growing command, and the final parse catches the rest anyway."""
        if self._spans:
            return None
        result = _parse_command(self._parts[0], partial=True)
        return result.reason if isinstance(result, Rejected) else None

    def _start_discarding(self, tag: bytes, reason: str) -> None:
        self._discard = (tag, reason)
        self._discard_raw = b"".join(self._parts)
        self._parts, self._size, self._spans = [], 0, []

    def _on_discarded_line(self, line: bytes) -> ClientEvent | None:
        """Follow the framing of a command being thrown away until it ends."""
        announcement = _find_announcement(line)
        if announcement is not None and not announcement[2].synchronizing:
            size = announcement[1]
            if size is None or size > self._max_skip:
                return self._fatal("non-synchronizing literal too large to skip")
            self._literal_left, self._skipping = size, True
            return None
        # end of the command, or a synchronizing literal that our BAD will cancel
        assert self._discard is not None
        tag, reason = self._discard
        raw = self._discard_raw or line
        self._reset()
        return Rejected(tag, reason, raw)

    def _reject_now(self, tag: bytes, reason: str) -> Rejected:
        raw = b"".join(self._parts)
        self._reset()
        return Rejected(tag, reason, raw)

    def _finish_command(self) -> Command | Rejected:
        raw = b"".join(self._parts)
        spans = tuple(self._spans)
        self._reset()
        result = _parse_command(raw)
        if isinstance(result, Command):
            return Command(result.tag, result.name, raw, result.args, result.subcommand, spans)
        return result


def _parse_command(raw: bytes, *, partial: bool = False) -> Command | Rejected:
    """Tag, name and arguments of a complete command (or, with partial, of the first
    line of one that continues with a literal)."""
    end = len(raw) if partial else len(raw) - 2
    tag_match = _TAG.match(raw)
    if tag_match is None or raw[tag_match.end() : tag_match.end() + 1] not in (b" ", b"\r"):
        reason = "missing tag" if raw[:1] in (b" ", b"\r") else "invalid tag"
        return Rejected(b"*", reason, raw)
    tag = tag_match.group()
    try:
        name, position = _command_word(raw, tag_match.end() + 1, end, "command name")
        subcommand = None
        if name == b"UID":
            subcommand, position = _command_word(raw, position + 1, end, "UID subcommand")
        tokenizer = _Tokenizer(raw, position, end, strict=True, partial=partial)
        args = tokenizer.sequence()
    except _Incomplete:
        args = ()
    except ImapSyntaxError as error:
        return Rejected(tag, str(error), raw)
    return Command(tag, name, raw, args, subcommand)


def _command_word(raw: bytes, position: int, end: int, what: str) -> tuple[bytes, int]:
    match = _COMMAND_NAME.match(raw, position, end)
    if match is None:
        raise ImapSyntaxError(f"missing {what}")
    if match.end() < end and raw[match.end()] != _SP:
        raise ImapSyntaxError(f"invalid character in {what}")
    return match.group().upper(), match.end()


# --------------------------------------------------------------------------- server side

_STATUS_WORD = re.compile(rb"(OK|NO|BAD|BYE|PREAUTH)(?= |\r\n|\Z)", re.I)
_SERVER_TAG = re.compile(rb"[^\x00-\x20\x7f(){%*\"\\+]+ ")
# What RawFetch stands for: the form Untagged.number and .name would read (canonical
# number, FETCH in any case, then a list); anything odder is tokenized as before
_RAW_FETCH_HEAD = re.compile(rb"\* ([1-9]\d{0,9}) FETCH \(", re.I)


class ServerParser(_Framer):
    """Server -> client. Status responses and continuations are single lines whose text
    is never scanned for literals; other untagged responses may carry literals. Limits:
    max_line_length (default 8 MiB: a SEARCH result on a big mailbox is one long line),
    max_literal_size (256 MiB), max_response_size (default twice the literal cap). Any of
    them exceeded -> Fatal. With lazy_fetch, FETCH responses come out as `RawFetch`."""

    def __init__(
        self,
        *,
        max_line_length: int = 8 * MiB,
        max_literal_size: int = 256 * MiB,
        max_response_size: int | None = None,
        lazy_fetch: bool = False,
    ) -> None:
        super().__init__(max_line_length)
        self._lazy_fetch = lazy_fetch
        self._max_literal = max_literal_size
        self._max_response = (
            max_response_size if max_response_size is not None else 2 * max_literal_size
        )
        self._parts: list[bytes] = []
        self._size = 0
        self._literal_left = 0

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer) + self._size

    def _drop_pending(self) -> None:
        self._parts, self._size, self._literal_left = [], 0, 0

    def next_event(self) -> ServerEvent | None:
        """The next event, or None when more bytes are needed."""
        while not self._dead:
            if self._literal_left:
                count = min(self._literal_left, len(self._buffer))
                if not count:
                    return None
                self._parts.append(self._take(count))
                self._size += count
                self._literal_left -= count
                continue
            line = self._take_line()
            if line is None:
                return None
            if isinstance(line, _TooLong):
                return self._fatal(f"server line longer than {self._max_line} octets")
            event = self._on_line(line)
            if event is not None:
                return event
        return None

    def __iter__(self) -> Iterator[ServerEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def _on_line(self, line: bytes) -> ServerEvent | None:
        if not self._parts and _is_single_line(line):
            return _parse_single_line(line)
        if self._size + len(line) > self._max_response:
            return self._fatal(f"server response longer than {self._max_response} octets")
        self._parts.append(line)
        self._size += len(line)
        announcement = _find_announcement(line)
        if announcement is None:
            raw = b"".join(self._parts)
            self._parts, self._size = [], 0
            if self._lazy_fetch and (head := _RAW_FETCH_HEAD.match(raw)) is not None:
                return RawFetch(raw, int(head[1]))
            return _parse_untagged_data(raw)
        size = announcement[1]
        if size is None or size > self._max_literal:
            return self._fatal(f"server literal larger than {self._max_literal} octets")
        if self._size + size > self._max_response:
            return self._fatal(f"server response longer than {self._max_response} octets")
        self._literal_left = size
        return None


def _is_single_line(line: bytes) -> bool:
    if not line.startswith(b"* "):
        return True  # continuation, tagged status, or garbage: none carries literals
    return _STATUS_WORD.match(line, 2) is not None


def _parse_single_line(line: bytes) -> ServerEvent:
    end = len(line) - 2
    if line.startswith(b"+"):
        return Continuation(line, line[2:end] if line[1:2] == b" " else line[1:end])
    if line.startswith(b"* "):
        status = _STATUS_WORD.match(line, 2)
        assert status is not None
        code, text = _parse_resp_text(line, status.end(), end)
        word = status.group().upper()
        return Untagged(line, (Atom(word),), word, code, text)
    tag = _SERVER_TAG.match(line)
    status = _STATUS_WORD.match(line, tag.end()) if tag else None
    if tag is None or status is None:
        return Unparsed(line, "not a tagged status response")
    code, text = _parse_resp_text(line, status.end(), end)
    return Tagged(tag.group()[:-1], status.group().upper(), line, code, text)


def _parse_resp_text(line: bytes, position: int, end: int) -> tuple[ResponseCode | None, bytes]:
    """[code] text after a status word; text is free text, never tokens."""
    if line[position : position + 1] == b" ":
        position += 1
    if line[position : position + 1] != b"[":
        return None, line[position:end]
    tokenizer = _Tokenizer(line, position + 1, end, strict=False)
    try:
        items = tokenizer.sequence(0x5D)
        close = tokenizer.pos - 1
        if not items or not isinstance(items[0], Atom):
            raise ImapSyntaxError("response code without a name")
        name, args = items[0].value.upper(), items[1:]
    except ImapSyntaxError:  # odd codes like [ALERT: x] or unbalanced: keep them as text
        close = line.find(b"]", position, end)
        if close < 0:
            return None, line[position:end]
        word, _, rest = line[position + 1 : close].partition(b" ")
        name, args = word.upper(), ((Atom(rest),) if rest else ())
    text = line[close + 1 : end]
    return ResponseCode(name, args, line[position + 1 : close]), text.removeprefix(b" ")


def _parse_untagged_data(raw: bytes) -> Untagged | Unparsed:
    try:
        tokens = _Tokenizer(raw, 2, len(raw) - 2, strict=False).sequence()
    except ImapSyntaxError as error:
        return Unparsed(raw, str(error))
    if not tokens:
        return Unparsed(raw, "empty untagged response")
    return Untagged(raw, tokens)


def status_response(
    tag: bytes | None, status: bytes, text: bytes | str, code: ResponseCode | None = None
) -> bytes:
    """`tag STATUS [code] text CRLF` (tag None: untagged). CR and LF in text become
    spaces, so a reason can never inject a line."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    text = text.replace(b"\r", b" ").replace(b"\n", b" ")
    parts = [tag if tag is not None else b"*", status.upper()]
    if code is not None:
        parts.append(code.to_bytes())
    if text:
        parts.append(text)
    return b" ".join(parts) + CRLF


def capabilities_of(event: Untagged | Tagged) -> list[bytes] | None:
    """The capability list in `* CAPABILITY ...` or in a [CAPABILITY ...] code."""
    if isinstance(event, Untagged) and event.status is None and event.name == b"CAPABILITY":
        return [t.value for t in event.tokens[1:] if isinstance(t, Atom)]
    if event.code is not None and event.code.name == b"CAPABILITY":
        return [t.value for t in event.code.args if isinstance(t, Atom)]
    return None


# --------------------------------------------------------------------------- sequence sets

_SEQUENCE_RANGE = re.compile(rb"(\d{1,10}|\*)(?::(\d{1,10}|\*))?")
_MAX_NZ = 2**32 - 1


def _sequence_number(text: bytes) -> int | None:
    if text == b"*":
        return None
    value = int(text)
    if not 0 < value <= _MAX_NZ:
        raise ImapSyntaxError("sequence numbers run from 1 to 4294967295")
    return value


@dataclass(frozen=True)
class SequenceSet:
    """`1:*,3,5:7` as ranges of (first, last) in the order sent, None standing for "*"
    (the largest sequence number or UID in the mailbox). `saved` is `$` (RFC 5182,
    the result of the last SEARCH ... SAVE), which only the server can resolve."""

    ranges: tuple[tuple[int | None, int | None], ...] = ()
    saved: bool = False

    @classmethod
    def parse(cls, text: bytes) -> SequenceSet:
        if text == b"$":
            return cls(saved=True)
        ranges = []
        for piece in text.split(b","):
            match = _SEQUENCE_RANGE.fullmatch(piece)
            if match is None:
                raise ImapSyntaxError("invalid sequence set")
            first = _sequence_number(match[1])
            last = _sequence_number(match[2]) if match[2] else first
            ranges.append((first, last))
        return cls(tuple(ranges))

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges with "*" replaced by `largest`. Not clipped:
        for UIDs `559:*` with largest 50 is 50:559 (RFC 9051 6.4.8 -- it still includes
        the last message), and the caller intersects with the UIDs that exist. With
        largest 0 (empty mailbox) ranges using "*" match nothing."""
        if self.saved:
            raise ValueError("$ refers to a saved search result; only the server knows it")
        ordered = []
        for first, last in self.ranges:
            if largest <= 0 and (first is None or last is None):
                continue
            low, high = sorted((first or largest, last or largest))
            ordered.append((low, high))
        merged: list[tuple[int, int]] = []
        for low, high in sorted(ordered):
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
            else:
                merged.append((low, high))
        return merged

    def contains(self, number: int, largest: int) -> bool:
        return any(low <= number <= high for low, high in self.resolve(largest))

    def to_bytes(self) -> bytes:
        if self.saved:
            return b"$"

        def one(value: int | None) -> bytes:
            return b"*" if value is None else wire.number(value)

        return b",".join(
            one(first) if first == last else one(first) + b":" + one(last)
            for first, last in self.ranges
        )


# --------------------------------------------------------------------------- FETCH

_SECTION_TEXTS = ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext
_ITEM_NAME = re.compile(rb"[A-Z0-9][A-Z0-9.\-_]*")
_SECTIONED = {"BODY", "BINARY", "BINARY.SIZE"}
_NEEDS_SECTION = {"BODY.PEEK", "BINARY", "BINARY.PEEK", "BINARY.SIZE"}
_SETS_SEEN = {"RFC822", "RFC822.TEXT"}
# Items the relay may pass through from upstream unchanged: they do not depend on the
# message content. Anything else (including unknown items) must come from the view.
METADATA_ITEMS = frozenset(
    {
        "UID",
        "FLAGS",
        "INTERNALDATE",
        "MODSEQ",
        "EMAILID",
        "THREADID",
        "SAVEDATE",
        "X-GM-MSGID",
        "X-GM-THRID",
        "X-GM-LABELS",
    }
)
FETCH_MACROS: dict[str, tuple[str, ...]] = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


@dataclass(frozen=True)
class Section:
    """BODY[1.2.HEADER.FIELDS (SUBJECT FROM)] -> Section((1, 2), "HEADER.FIELDS",
    ("SUBJECT", "FROM")). BODY[] is Section(). `text` is one of HEADER, HEADER.FIELDS,
    HEADER.FIELDS.NOT, TEXT, MIME or None; `fields` keep the case they were sent in."""

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        spec = ".".join([*map(str, self.part), *([self.text] if self.text else [])])
        out = spec.encode("ascii")
        if self.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            out += b" " + wire.plist([_field_bytes(name) for name in self.fields])
        return out


def _field_bytes(name: str) -> bytes:
    data = name.encode("ascii")
    return data if _ATOM_RUNS[(False, False, False)].fullmatch(data) else wire.string(data)


@dataclass(frozen=True)
class FetchItem:
    """One fetch attribute. `name` is upper case without ".PEEK" ("BODY", "BINARY",
    "BINARY.SIZE", "RFC822.SIZE", "UID", ...); plain BODY (no section) is the
    non-extensible BODYSTRUCTURE. `partial` is (offset, length) in a request, (offset,
    None) in a response."""

    name: str
    section: Section | None = None
    partial: tuple[int, int | None] | None = None
    peek: bool = False

    @property
    def content_derived(self) -> bool:
        """Must be served from the decrypted view for an encrypted message."""
        return self.name not in METADATA_ITEMS

    @property
    def sets_seen(self) -> bool:
        """Fetching it sets \\Seen (RFC 3501 6.4.5)."""
        if self.section is not None and self.name in ("BODY", "BINARY"):
            return not self.peek
        return self.name in _SETS_SEEN

    def _bytes(self, *, response: bool) -> bytes:
        name = self.name + (".PEEK" if self.peek and not response else "")
        out = name.encode("ascii")
        if self.section is not None:
            out += b"[" + self.section.to_bytes() + b"]"
        if self.partial is not None:
            offset, length = self.partial
            if response or length is None:
                out += b"<%d>" % offset
            else:
                out += b"<%d.%d>" % (offset, length)
        return out

    def request_bytes(self) -> bytes:
        """As a client writes it: BODY.PEEK[1]<0.100>."""
        return self._bytes(response=False)

    def response_name(self) -> bytes:
        """As the server names it in the FETCH response: BODY[1]<0>."""
        return self._bytes(response=True)


class FetchRequest(NamedTuple):
    sequence_set: SequenceSet
    items: list[FetchItem]
    modifiers: tuple[Token, ...]  # e.g. (Atom(b"CHANGEDSINCE"), Number(12345))


def parse_fetch_request(args: Sequence[Token]) -> FetchRequest:
    """Arguments of FETCH / UID FETCH (Command.args): sequence set, items (macros
    expanded), optional modifier list (RFC 4466). Raises ImapSyntaxError."""
    if len(args) not in (2, 3):
        raise ImapSyntaxError("FETCH takes a sequence set, items and optional modifiers")
    sequence = args[0]
    if not isinstance(sequence, Atom | Number):
        raise ImapSyntaxError("invalid sequence set")
    sequence_set = SequenceSet.parse(serialize([sequence]))
    modifiers: tuple[Token, ...] = ()
    if len(args) == 3:
        if not isinstance(args[2], PList):
            raise ImapSyntaxError("FETCH modifiers must be a parenthesized list")
        modifiers = args[2].items
    return FetchRequest(sequence_set, _fetch_items(args[1]), modifiers)


def _fetch_items(token: Token) -> list[FetchItem]:
    if isinstance(token, Atom) and token.value.upper().decode("ascii", "replace") in FETCH_MACROS:
        return [FetchItem(name) for name in FETCH_MACROS[token.value.upper().decode()]]
    if isinstance(token, PList):
        if not token.items:
            raise ImapSyntaxError("empty FETCH item list")
        return [parse_fetch_item(item) for item in token.items]
    return [parse_fetch_item(token)]


def parse_fetch_item(token: Token, *, response: bool = False) -> FetchItem:
    """A fetch attribute as a client requests it, or (response=True) as a server names
    it in a FETCH response. Raises ImapSyntaxError."""
    if isinstance(token, Atom):
        name = _item_name(token.value)
        if name in _NEEDS_SECTION or name in FETCH_MACROS:
            raise ImapSyntaxError(f"invalid FETCH item {name}")
        return FetchItem(name)
    if not isinstance(token, SectionAtom):
        raise ImapSyntaxError("invalid FETCH item")
    name = _item_name(token.name)
    peek = name.endswith(".PEEK") and name != "BINARY.SIZE.PEEK"
    base = name.removesuffix(".PEEK") if peek else name
    if base not in _SECTIONED or (peek and response):
        raise ImapSyntaxError(f"{name} takes no section")
    section = (_body_section if base == "BODY" else _binary_section)(token.section)
    if token.partial is not None and base == "BINARY.SIZE":
        raise ImapSyntaxError("BINARY.SIZE takes no partial")
    return FetchItem(base, section, _partial(token.partial, response), peek)


def _item_name(value: bytes) -> str:
    upper = value.upper()
    if not _ITEM_NAME.fullmatch(upper):
        raise ImapSyntaxError("invalid FETCH item")
    return upper.decode("ascii")


def _section_word(tokens: tuple[Token, ...]) -> str:
    first = tokens[0]
    if isinstance(first, Number):
        return str(first.value)
    if isinstance(first, Atom) and first.value.isascii():
        return first.value.decode("ascii").upper()
    raise ImapSyntaxError("invalid section")


def _split_part(spec: str) -> tuple[tuple[int, ...], str | None]:
    """ "1.2.MIME" -> ((1, 2), "MIME")."""
    pieces = spec.split(".")
    if "" in pieces:
        raise ImapSyntaxError(f"invalid section {spec}")
    part: list[int] = []
    while pieces and pieces[0].isdigit():
        piece = pieces.pop(0)
        if piece.startswith("0") or len(piece) > 10:
            raise ImapSyntaxError("section part numbers start at 1")
        part.append(int(piece))
    text = ".".join(pieces) or None
    if text is not None and text not in _SECTION_TEXTS:
        raise ImapSyntaxError(f"invalid section {spec}")
    if text == "MIME" and not part:
        raise ImapSyntaxError("MIME needs a part number")
    return tuple(part), text


def _body_section(tokens: tuple[Token, ...]) -> Section:
    if not tokens:
        return Section()
    part, text = _split_part(_section_word(tokens))
    if text not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        if len(tokens) > 1:
            raise ImapSyntaxError("unexpected data in section")
        return Section(part, text)
    if len(tokens) != 2 or not isinstance(tokens[1], PList) or not tokens[1].items:
        raise ImapSyntaxError(f"{text} needs a list of header field names")
    return Section(part, text, tuple(_field_name(t) for t in tokens[1].items))


def _field_name(token: Token) -> str:
    value = astring_value(token)
    if value is None or not value.isascii():
        raise ImapSyntaxError("invalid header field name")
    name = value.decode("ascii")
    if not _FIELD_NAME.fullmatch(name):
        raise ImapSyntaxError("invalid header field name")
    return name


def _binary_section(tokens: tuple[Token, ...]) -> Section:
    if not tokens:
        return Section()
    part, text = _split_part(_section_word(tokens))
    if text is not None or len(tokens) > 1:
        raise ImapSyntaxError("BINARY sections name parts only")
    return Section(part)


def _partial(raw: bytes | None, response: bool) -> tuple[int, int | None] | None:
    if raw is None:
        return None
    if response:
        if not re.fullmatch(rb"\d{1,19}", raw):
            raise ImapSyntaxError("invalid partial origin")
        return int(raw), None
    match = re.fullmatch(rb"(\d{1,19})\.(\d{1,19})", raw)
    if match is None or int(match[2]) == 0:
        raise ImapSyntaxError("partial must be <offset.length> with a length above 0")
    return int(match[1]), int(match[2])


class FetchResponse(NamedTuple):
    sequence: int
    items: list[tuple[bytes, Token]]  # (item name as serialized, value)


def _fetch_pairs(tokens: Sequence[Token]) -> tuple[int, list[tuple[Atom | SectionAtom, Token]]]:
    if (
        len(tokens) != 3
        or not isinstance(tokens[0], Number)
        or not isinstance(tokens[1], Atom)
        or tokens[1].value.upper() != b"FETCH"
        or not isinstance(tokens[2], PList)
    ):
        raise ImapSyntaxError("not a FETCH response")
    values = tokens[2].items
    if len(values) % 2:
        raise ImapSyntaxError("FETCH response item without a value")
    pairs = []
    for name, value in zip(values[::2], values[1::2], strict=True):
        if not isinstance(name, Atom | SectionAtom):
            raise ImapSyntaxError("invalid FETCH response item name")
        pairs.append((name, value))
    return tokens[0].value, pairs


def parse_fetch_response(response: Untagged | Sequence[Token]) -> FetchResponse:
    """`* 12 FETCH (UID 7 BODY[] {3}...)` -> (12, [(b"UID", Number(7)), (b"BODY[]",
    Literal(...))]). Names are re-serialized from their tokens, which is byte-exact for
    the single-space form servers send; `fetch_item_spans` has the bytes as received.
    Raises ImapSyntaxError."""
    tokens = response.tokens if isinstance(response, Untagged) else tuple(response)
    sequence, pairs = _fetch_pairs(tokens)
    return FetchResponse(sequence, [(serialize([name]), value) for name, value in pairs])


class FetchItemSpan(NamedTuple):
    """One `name value` pair of a FETCH response: `name` and `raw` (the value) are the
    exact bytes received, `name_token` and `value` their tokens."""

    name: bytes
    raw: bytes
    name_token: Atom | SectionAtom
    value: Token


def fetch_item_spans(response: Untagged) -> list[FetchItemSpan]:
    """The items of a FETCH response with their exact bytes, for a relay that passes some
    on unchanged (`serialize_fetch_response` writes bytes values as they are). The tokens
    are those of `response`; the raw bytes are found by walking `response.raw` again
    without copying literal octets. Raises ImapSyntaxError if it is not a FETCH response."""
    _, pairs = _fetch_pairs(response.tokens)
    raw = response.raw
    walker = _Tokenizer(raw, 2, len(raw) - 2, strict=False, copy_literals=False)
    for _ in range(2):  # the number and FETCH
        walker.skip_spaces()
        walker.token(None)
    walker.skip_spaces()
    if raw[walker.pos : walker.pos + 1] != b"(":
        raise ImapSyntaxError("FETCH response bytes do not match its tokens")
    walker.pos += 1
    spans = []
    for name_token, value in pairs:
        walker.skip_spaces()
        start = walker.pos
        walker.token(0x29)
        name_end = walker.pos
        walker.skip_spaces()
        value_start = walker.pos
        walker.token(0x29)
        spans.append(
            FetchItemSpan(raw[start:name_end], raw[value_start : walker.pos], name_token, value)
        )
    return spans


def serialize_fetch_response(sequence: int, items: Sequence[tuple[bytes, Token | bytes]]) -> bytes:
    """`* seq FETCH (...)` CRLF with UID moved first (clients such as Thunderbird expect
    it there); strings and literals through wire.py. A bytes value is already encoded
    (e.g. `FetchItemSpan.raw`) and written as it is."""
    ordered = sorted(items, key=lambda item: item[0].upper() != b"UID")  # stable
    writer = _Writer()
    writer.write(b"* %d FETCH (" % sequence)
    for index, (name, value) in enumerate(ordered):
        writer.write((b" " if index else b"") + name + b" ")
        if isinstance(value, bytes):
            writer.write(value)
        else:
            writer.token(value)
    writer.write(b")" + CRLF)
    return writer.getvalue()


# --------------------------------------------------------------------------- capabilities

# Allow-list of capabilities passed to the client. Anything not matched here is dropped,
# so a new server extension never reaches the client before we know it is safe through a
# proxy that rewrites message content.
_ALLOWED_EXACT = frozenset(
    {
        b"IMAP4REV1",
        b"IDLE",  # relay handles the + / DONE dance
        b"UIDPLUS",
        b"MOVE",
        b"NAMESPACE",
        b"ID",
        b"ENABLE",
        b"CONDSTORE",  # MODSEQ is metadata
        b"QRESYNC",  # VANISHED / FLAGS only
        b"SPECIAL-USE",
        b"CREATE-SPECIAL-USE",
        b"LIST-EXTENDED",
        b"LIST-STATUS",
        b"LITERAL+",  # literals are framed here; the relay may replace both with its own
        b"LITERAL-",
        b"SASL-IR",
        b"CHILDREN",
        b"UNSELECT",
        b"ESEARCH",
        b"SEARCHRES",
        b"SORT",  # orders by ciphertext headers (e.g. protected Subject): imperfect,
        b"ESORT",  # not unsafe
        b"WITHIN",
        b"QUOTA",
        b"QUOTASET",
        b"ACL",
        b"METADATA",  # mailbox/server annotations, not message content
        b"METADATA-SERVER",
        b"STATUS=SIZE",  # upstream (ciphertext) sizes; informational only
        b"SAVEDATE",
        b"OBJECTID",
        b"LANGUAGE",
        b"LIST-MYRIGHTS",
        b"AUTH=PLAIN",  # SASL passes through the relay; OAuth-only providers need the
        b"AUTH=LOGIN",  # last two
        b"AUTH=XOAUTH2",
        b"AUTH=OAUTHBEARER",
    }
)
_ALLOWED_PREFIXES = (
    b"THREAD=",
    b"SORT=",  # SORT=DISPLAY
    b"CONTEXT=",
    b"APPENDLIMIT=",
    b"I18NLEVEL=",
    b"RIGHTS=",
    b"QUOTA=",  # QUOTA=RES-* (RFC 9208)
)
# Dropped by default, allowed only through the policy flags:
#   IMAP4rev2    changes response forms (no RECENT, ESEARCH by default...); opt-in.
#   BINARY       BINARY[...] and literal8 must then come from the decrypted view.
#   UTF8=ACCEPT  raw UTF-8 headers and APPEND UTF8 (...): opt-in once the view handles it.
# Dropped unless listed in CapabilityPolicy.extra_allowed, e.g. (among unknown ones):
#   AUTH=SCRAM-*  gs2 flag "y" makes a server with -PLUS fail the login as a downgrade,
#                 and the proxy's side session cannot reuse a SCRAM exchange
#   AUTH=CRAM-MD5, DIGEST-MD5, GSSAPI, NTLM  same second-session problem
#   MULTIAPPEND   several messages per APPEND; the relay rewrites APPEND one at a time
#   CATENATE, URLAUTH  the server assembles or hands out message content by reference,
#                 which the proxy cannot rewrite
#   NOTIFY        unsolicited FETCH of content items (headers) from the server
#   PREVIEW, SNIPPET, CONVERT  server-computed content of ciphertext
#   REPLACE       APPEND in disguise; UNAUTHENTICATE resets the session under the relay
#   LOGIN-REFERRALS, MAILBOX-REFERRALS, JMAPACCESS  send the client around the proxy
#   UIDONLY, PARTIAL, X-GM-EXT-1, ...  unknown to the relay
# Never passed, whatever the policy says:
_NEVER_PREFIXES = (
    b"COMPRESS=",  # the relay must see plaintext protocol
    b"UTF8=ONLY",
)
_NEVER_EXACT = frozenset(
    {
        b"STARTTLS",  # about the upstream link; local STARTTLS is the relay's decision
        b"LOGINDISABLED",  # ditto: the relay adds its own if the local link is clear
    }
)


@dataclass(frozen=True)
class CapabilityPolicy:
    imap4rev2: bool = False
    binary: bool = False
    utf8_accept: bool = False
    extra_allowed: frozenset[bytes] = frozenset()  # exact names, or prefixes ending in "*"


def _never(upper: bytes) -> bool:
    if upper in _NEVER_EXACT or upper.startswith(_NEVER_PREFIXES):
        return True
    # channel binding cannot cross a proxy (SCRAM-SHA-256-PLUS and friends)
    return upper.startswith(b"AUTH=") and upper.endswith(b"-PLUS")


def capability_allowed(capability: bytes, policy: CapabilityPolicy = CapabilityPolicy()) -> bool:
    upper = capability.upper()
    if _never(upper):
        return False
    flagged = {b"IMAP4REV2": policy.imap4rev2, b"BINARY": policy.binary}
    flagged[b"UTF8=ACCEPT"] = policy.utf8_accept
    if upper in flagged:
        return flagged[upper]
    if upper in _ALLOWED_EXACT or upper.startswith(_ALLOWED_PREFIXES):
        return True
    for extra in policy.extra_allowed:
        extra = extra.upper()
        if upper == extra or (extra.endswith(b"*") and upper.startswith(extra[:-1])):
            return True
    return False


def filter_capabilities(
    caps: Iterable[bytes], policy: CapabilityPolicy = CapabilityPolicy()
) -> list[bytes]:
    """The capabilities the client may see, in the server's order and spelling."""
    return [cap for cap in caps if capability_allowed(cap, policy)]


_CAPABILITY_DATA = re.compile(rb"(\* (?:CAPABILITY|ENABLED))((?: +[^ \r\n]+)*) *\r\n\Z", re.I)
_CAPABILITY_CODE = re.compile(
    rb"((?:\*|[^ \r\n]+) (?:OK|NO|BAD|BYE|PREAUTH) \[CAPABILITY)((?: +[^ \]\r\n]+)*) *\]", re.I
)


def rewrite_capabilities(
    raw: bytes, policy: CapabilityPolicy = CapabilityPolicy(), add: Sequence[bytes] = ()
) -> bytes:
    """A server line with `* CAPABILITY`, `* ENABLED` or a [CAPABILITY ...] code, with the
    list filtered and `add` appended (capabilities the relay provides itself; not for
    ENABLED). Any other line is returned unchanged."""
    data = _CAPABILITY_DATA.match(raw)
    if data is not None:
        keyword_add = () if data[1].upper().endswith(b"ENABLED") else add
        return data[1] + _capability_list(data[2], policy, keyword_add) + CRLF
    code = _CAPABILITY_CODE.match(raw)
    if code is not None:
        return code[1] + _capability_list(code[2], policy, add) + b"]" + raw[code.end() :]
    return raw


def _capability_list(text: bytes, policy: CapabilityPolicy, add: Sequence[bytes]) -> bytes:
    caps = filter_capabilities(text.split(), policy)
    present = {cap.upper() for cap in caps}
    caps += [cap for cap in add if cap.upper() not in present]
    return b"".join(b" " + cap for cap in caps)


__all__ = [
    "FETCH_MACROS",
    "METADATA_ITEMS",
    "NIL",
    "Atom",
    "CapabilityPolicy",
    "ClientEvent",
    "ClientParser",
    "Command",
    "CommandChunk",
    "Continuation",
    "ContinuationLine",
    "ContinuationNeeded",
    "Fatal",
    "FetchItem",
    "FetchItemSpan",
    "FetchRequest",
    "FetchResponse",
    "IdleDone",
    "ImapSyntaxError",
    "Literal",
    "LiteralForm",
    "LiteralSpan",
    "Nil",
    "Number",
    "PList",
    "Quoted",
    "RawFetch",
    "Rejected",
    "ResponseCode",
    "Section",
    "SectionAtom",
    "SequenceSet",
    "ServerEvent",
    "ServerParser",
    "Tagged",
    "Token",
    "Unparsed",
    "Untagged",
    "astring_value",
    "build_command",
    "capabilities_of",
    "capability_allowed",
    "fetch_item_spans",
    "filter_capabilities",
    "parse_fetch_item",
    "parse_fetch_request",
    "parse_fetch_response",
    "rewrite_capabilities",
    "serialize",
    "serialize_fetch_response",
    "serialize_untagged",
    "status_response",
    "tokenize",
]
