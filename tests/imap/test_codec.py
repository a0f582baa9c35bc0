"""The sans-IO IMAP codec: framing, tokens, limits, modes, FETCH helpers, capabilities."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localproxy.imap.codec import (
    NIL,
    Atom,
    CapabilityPolicy,
    ClientParser,
    Command,
    CommandChunk,
    Continuation,
    ContinuationLine,
    ContinuationNeeded,
    Fatal,
    FetchItem,
    IdleDone,
    ImapSyntaxError,
    Literal,
    LiteralForm,
    Number,
    PList,
    Quoted,
    Rejected,
    ResponseCode,
    Section,
    SectionAtom,
    SequenceSet,
    ServerParser,
    Tagged,
    Token,
    Unparsed,
    Untagged,
    build_command,
    capabilities_of,
    fetch_item_spans,
    filter_capabilities,
    parse_fetch_item,
    parse_fetch_request,
    parse_fetch_response,
    rewrite_capabilities,
    serialize,
    serialize_fetch_response,
    serialize_untagged,
    status_response,
    tokenize,
)

MiB = 1024 * 1024


def client_events(data: bytes, **limits: int) -> list:
    parser = ClientParser(**limits)
    parser.feed(data)
    return list(parser)


def server_events(data: bytes, **limits: int) -> list:
    parser = ServerParser(**limits)
    parser.feed(data)
    return list(parser)


def one_command(data: bytes) -> Command:
    (event,) = [e for e in client_events(data) if not isinstance(e, ContinuationNeeded)]
    assert isinstance(event, Command), event
    return event


# --------------------------------------------------------------------------- client side


def test_simple_command_keeps_raw_and_uppercases_name():
    cmd = one_command(b"a1 noop\r\n")
    assert (cmd.tag, cmd.name, cmd.args, cmd.raw) == (b"a1", b"NOOP", (), b"a1 noop\r\n")


def test_uid_command_exposes_subcommand():
    cmd = one_command(b"A7 uid fetch 1:* (FLAGS)\r\n")
    assert (cmd.name, cmd.subcommand, cmd.verb) == (b"UID", b"FETCH", b"UID FETCH")
    assert cmd.args == (Atom(b"1:*"), PList((Atom(b"FLAGS"),)))


def test_arguments_become_tokens():
    cmd = one_command(b'a LOGIN "us\\"er" NIL 42 007 \\Seen [Gmail]/Sent\r\n')
    assert cmd.args == (
        Quoted(b'us"er'),
        NIL,
        Number(42),
        Atom(b"007"),
        Atom(b"\\Seen"),
        Atom(b"[Gmail]/Sent"),
    )


def test_synchronizing_literal_asks_for_continuation_then_completes():
    parser = ClientParser()
    parser.feed(b"a LOGIN {4}\r\n")
    assert list(parser) == [ContinuationNeeded(b"a", 4)]
    assert parser.in_command
    parser.feed(b'fred "pw"\r\n')
    (cmd,) = list(parser)
    assert cmd.raw == b'a LOGIN {4}\r\nfred "pw"\r\n'
    assert cmd.args == (Literal(b"fred"), Quoted(b"pw"))
    assert not parser.in_command


def test_zero_length_synchronizing_literal_still_needs_continuation():
    events = client_events(b"a LOGIN {0}\r\n pw\r\n")
    assert events[0] == ContinuationNeeded(b"a", 0)
    assert events[1].args == (Literal(b""), Atom(b"pw"))


@pytest.mark.parametrize(
    ("announcement", "form"),
    [
        (b"{5+}", LiteralForm.PLUS),
        (b"{5-}", LiteralForm.MINUS),
        (b"~{5}", LiteralForm.BINARY),
        (b"~{5+}", LiteralForm.BINARY_PLUS),
    ],
)
def test_other_literal_forms_need_no_continuation(announcement: bytes, form: LiteralForm):
    data = b"a APPEND INBOX " + announcement + b"\r\na\x00\r\n)\r\n"
    if form is LiteralForm.BINARY:  # literal8 without + is synchronizing
        events = client_events(data)
        assert events[0] == ContinuationNeeded(b"a", 5)
        events = events[1:]
    else:
        events = client_events(data)
    (cmd,) = events
    assert cmd.raw == data
    assert cmd.args[-1] == Literal(b"a\x00\r\n)", form)


def test_literal_data_may_look_like_protocol():
    data = b"a APPEND INBOX {12+}\r\nb NOOP {3}\r\n\r\nc NOOP\r\n"
    events = client_events(data)
    assert [e.tag for e in events] == [b"a", b"c"]
    assert events[0].args[1] == Literal(b"b NOOP {3}\r\n", LiteralForm.PLUS)


def test_multiple_literals_and_spans():
    cmd = one_command(b"a LOGIN {3+}\r\nabc {2}\r\nxy\r\n")
    assert [(s.size, s.form) for s in cmd.literal_spans] == [
        (3, LiteralForm.PLUS),
        (2, LiteralForm.SYNC),
    ]
    assert cmd.raw[cmd.literal_spans[1].data_start : cmd.literal_spans[1].end] == b"xy"


def test_chunks_for_an_upstream_without_literal_plus():
    cmd = one_command(b"a LOGIN {3+}\r\nabc ~{2+}\r\nxy\r\n")
    assert cmd.chunks() == [
        CommandChunk(b"a LOGIN {3}\r\n", b"abc"),
        CommandChunk(b" ~{2}\r\n", b"xy"),
        CommandChunk(b"\r\n", None),
    ]
    assert cmd.chunks(literal_plus=True) == [
        CommandChunk(b"a LOGIN {3+}\r\nabc ~{2+}\r\nxy\r\n", None)
    ]


def test_chunks_with_literal_minus_only_inline_small_literals():
    big = b"x" * 5000
    cmd = one_command(b"a LOGIN {1}\r\nu {5000+}\r\n" + big + b"\r\n")
    assert cmd.chunks(literal_minus=True) == [
        CommandChunk(b"a LOGIN {1+}\r\nu {5000}\r\n", big),
        CommandChunk(b"\r\n", None),
    ]


def test_build_command_tracks_its_literals():
    cmd = build_command(b"p1", b"APPEND", [Atom(b"INBOX"), Literal(b"hello\r\n")])
    assert cmd.raw == b"p1 APPEND INBOX {7}\r\nhello\r\n\r\n"
    assert cmd.chunks() == [
        CommandChunk(b"p1 APPEND INBOX {7}\r\n", b"hello\r\n"),
        CommandChunk(b"\r\n", None),
    ]
    parsed = one_command(cmd.raw)
    assert parsed.args == cmd.args and parsed.literal_spans == cmd.literal_spans


def test_build_command_turns_unquotable_strings_into_tracked_literals():
    cmd = build_command(b"p", b"SELECT", [Quoted("Entwürfe".encode())])
    assert len(cmd.literal_spans) == 1
    assert cmd.chunks()[0].head == b"p SELECT {9}\r\n"


# -- limits


def test_synchronizing_literal_over_cap_is_rejected_without_continuation():
    events = client_events(b"a APPEND INBOX {101}\r\nb NOOP\r\n", max_literal_size=100)
    assert isinstance(events[0], Rejected) and events[0].tag == b"a"
    assert "literal" in events[0].reason
    assert events[1].name == b"NOOP"
    assert not any(isinstance(e, ContinuationNeeded) for e in events)


def test_non_synchronizing_literal_over_cap_is_skipped_without_buffering():
    parser = ClientParser(max_literal_size=1000)
    parser.feed(b"a APPEND INBOX {100000+}\r\n")
    assert list(parser) == []
    for _ in range(100):
        parser.feed(b"z" * 1000)
        assert list(parser) == []
        assert parser.pending_bytes < 100
    parser.feed(b" {3+}\r\nabc\r\nb NOOP\r\n")  # the rest of the command, then the next
    events = list(parser)
    assert [type(e) for e in events] == [Rejected, Command]
    assert events[0].tag == b"a" and events[1].name == b"NOOP"


def test_absurd_non_synchronizing_literal_is_fatal_without_allocating():
    parser = ClientParser()
    parser.feed(b"a APPEND INBOX {2147483648+}\r\n" + b"x" * 1000)
    (event,) = list(parser)
    assert isinstance(event, Fatal)
    assert parser.closed and parser.pending_bytes == 0
    parser.feed(b"b NOOP\r\n")
    assert list(parser) == []


def test_absurd_digit_count_is_handled():
    assert isinstance(client_events(b"a X {" + b"9" * 5000 + b"+}\r\n")[0], Fatal)
    (event,) = client_events(b"a X {" + b"9" * 5000 + b"}\r\n")
    assert isinstance(event, Rejected) and event.tag == b"a"


def test_megabyte_line_is_fatal_whole_or_in_pieces():
    line = b"a NOOP " + b"x" * MiB + b"\r\n"
    assert isinstance(client_events(line)[0], Fatal)
    parser = ClientParser()
    parser.feed(line[:70000])
    (event,) = list(parser)
    assert isinstance(event, Fatal) and "line" in event.reason


def test_line_exactly_at_the_limit_is_accepted():
    line = b"a X " + b"y" * 96
    assert len(line) == 100
    events = client_events(line + b"\r\n", max_line_length=100)
    assert isinstance(events[0], Command)
    parser = ClientParser(max_line_length=100)
    parser.feed(line + b"\r")  # the LF is still on its way
    assert list(parser) == []
    parser.feed(b"\n")
    assert isinstance(next(iter(parser)), Command)


def test_command_size_cap_counts_all_literals():
    data = b"a LOGIN {60+}\r\n" + b"u" * 60 + b" {60+}\r\n" + b"p" * 60 + b"\r\nb NOOP\r\n"
    events = client_events(data, max_literal_size=100, max_command_size=120)
    assert [type(e) for e in events] == [Rejected, Command]
    assert "command longer" in events[0].reason


def test_literal_minus_limit_for_non_synchronizing_literals():
    data = b"a APPEND INBOX {4097+}\r\n" + b"m" * 4097 + b"\r\n"
    (event,) = client_events(data, max_nonsync_literal_size=4096)
    assert isinstance(event, Rejected)
    assert isinstance(client_events(data)[0], Command)


# -- malformed input


@pytest.mark.parametrize(
    ("data", "tag", "reason"),
    [
        (b'a LOGIN "\xff\xfe" x\r\n', b"a", "UTF-8"),
        (b"a LOGIN \xc3\xa9 x\r\n", b"a", "8-bit"),
        (b"a1 (\r\n", b"a1", "missing"),
        (b"a1 LOGIN (a b\r\n", b"a1", "missing"),
        (b"a1 LOGIN )\r\n", b"a1", "')'"),
        (b"a1 LOGIN a)\r\n", b"a1", "space"),
        (b"a1 LOGIN \x01\r\n", b"a1", "control"),
        (b'a1 LOGIN "open\r\n', b"a1", "quoted"),
        (b'a1 LOGIN "a\\x"\r\n', b"a1", "quoted"),
        (b'a1 LOGIN "a""b"\r\n', b"a1", "space"),
        (b"a1 SEARCH (FROM a)(TO b)\r\n", b"a1", "space"),  # no list of lists in commands
        (b"a1 SEARCH ((FROM a)(TO b))\r\n", b"a1", "space"),
        (b"a1 LOGIN {3}x\r\n", b"a1", "literal"),
        (b"a1\r\n", b"a1", "command name"),
        (b"a1 N(OOP\r\n", b"a1", "command name"),
        (b"a1 UID\r\n", b"a1", "UID subcommand"),
        (b" NOOP\r\n", b"*", "missing tag"),
        (b"\r\n", b"*", "missing tag"),
        (b"* NOOP\r\n", b"*", "invalid tag"),
        (b"+ NOOP\r\n", b"*", "invalid tag"),
        (b"\xffa NOOP\r\n", b"*", "invalid tag"),
        (b"a" + b"(" * 100 + b"\r\n", b"*", "invalid tag"),
        (b"a X " + b"(" * 100 + b")" * 100 + b"\r\n", b"a", "nested"),
    ],
)
def test_malformed_commands_are_rejected_cleanly(data: bytes, tag: bytes, reason: str):
    events = client_events(data + b"z NOOP\r\n")
    assert isinstance(events[0], Rejected), events
    assert events[0].tag == tag
    assert reason in events[0].reason
    assert events[0].reason.isascii() and "\n" not in events[0].reason
    assert events[1].tag == b"z"  # the parser resynchronized


def test_bad_prefix_is_rejected_before_inviting_a_literal():
    events = client_events(b'a LOGIN "\xff" {5}\r\nb NOOP\r\n')
    assert isinstance(events[0], Rejected) and events[0].tag == b"a"
    assert events[1].tag == b"b"


def test_unterminated_literal_at_eof_stays_pending():
    parser = ClientParser()
    parser.feed(b"a APPEND INBOX {10+}\r\nabc")
    assert list(parser) == []
    assert parser.in_command and parser.pending_bytes == len(b"a APPEND INBOX {10+}\r\nabc")
    parser.feed(b"defghij\r\n")
    assert isinstance(next(iter(parser)), Command)


# -- IDLE and AUTHENTICATE


def test_idle_done():
    parser = ClientParser()
    parser.feed(b"a IDLE\r\n")
    assert next(iter(parser)).name == b"IDLE"
    parser.expect_done()
    parser.feed(b"done\r\nb NOOP\r\n")
    assert list(parser) == [IdleDone(b"done\r\n"), one_command(b"b NOOP\r\n")]


def test_idle_done_applies_to_bytes_already_fed():
    parser = ClientParser()
    parser.feed(b"a IDLE\r\nDONE\r\n")
    assert parser.next_event().name == b"IDLE"
    parser.expect_done()
    assert parser.next_event() == IdleDone(b"DONE\r\n")


def test_other_lines_while_idling_are_rejected_and_idle_continues():
    parser = ClientParser()
    parser.expect_done()
    parser.feed(b"b NOOP\r\nDONE\r\n")
    events = list(parser)
    assert isinstance(events[0], Rejected) and "DONE" in events[0].reason
    assert events[1] == IdleDone(b"DONE\r\n")


def test_without_expect_done_done_is_a_malformed_command():
    (event,) = client_events(b"DONE\r\n")
    assert isinstance(event, Rejected)


def test_authenticate_continuation_lines():
    parser = ClientParser()
    parser.feed(b"a AUTHENTICATE PLAIN\r\n")
    assert next(iter(parser)).args == (Atom(b"PLAIN"),)
    parser.expect_continuation_line()
    parser.feed(b"AHVzZXIAcGFzcw==\r\n")
    (line,) = list(parser)
    assert line == ContinuationLine(b"AHVzZXIAcGFzcw==\r\n", b"AHVzZXIAcGFzcw==")
    assert not line.cancelled
    parser.expect_continuation_line()
    parser.feed(b"*\r\n")
    assert next(iter(parser)).cancelled


def test_mode_switch_in_the_middle_of_a_command_is_a_programming_error():
    parser = ClientParser()
    parser.feed(b"a LOGIN {3}\r\n")
    list(parser)
    with pytest.raises(RuntimeError):
        parser.expect_done()


# --------------------------------------------------------------------------- server side


def test_greeting_with_capability_code():
    (event,) = server_events(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n")
    assert isinstance(event, Untagged)
    assert (event.status, event.name, event.text) == (b"OK", b"OK", b"Dovecot ready.")
    assert event.code == ResponseCode(
        b"CAPABILITY", (Atom(b"IMAP4rev1"), Atom(b"AUTH=PLAIN")), b"CAPABILITY IMAP4rev1 AUTH=PLAIN"
    )
    assert capabilities_of(event) == [b"IMAP4rev1", b"AUTH=PLAIN"]


@pytest.mark.parametrize(
    ("line", "name", "args"),
    [
        (b"a OK [APPENDUID 38505 3955] done", b"APPENDUID", (Number(38505), Number(3955))),
        (
            b"a OK [COPYUID 38505 304,319:320 3956:3958] Done",
            b"COPYUID",
            (Number(38505), Atom(b"304,319:320"), Atom(b"3956:3958")),
        ),
        (b"* OK [UIDVALIDITY 3857529045] UIDs valid", b"UIDVALIDITY", (Number(3857529045),)),
        (b"* NO [ALERT] quota", b"ALERT", ()),
        (
            b"* OK [PERMANENTFLAGS (\\Deleted \\*)] Limited",
            b"PERMANENTFLAGS",
            (PList((Atom(b"\\Deleted"), Atom(b"\\*"))),),
        ),
        (b"a NO [ALERT: odd {5}] text", b"ALERT:", (Atom(b"odd {5}"),)),
    ],
)
def test_response_codes(line: bytes, name: bytes, args: tuple):
    (event,) = server_events(line + b"\r\n")
    assert event.code.name == name and event.code.args == args
    assert event.code.to_bytes() in line


def test_tagged_continuation_and_status_text_never_holds_literals():
    data = b"a1 ok done {5}\r\n+ idling\r\n+\r\n* BYE bye {3}\r\nb NO nope\r\n"
    events = server_events(data)
    assert events == [
        Tagged(b"a1", b"OK", b"a1 ok done {5}\r\n", None, b"done {5}"),
        Continuation(b"+ idling\r\n", b"idling"),
        Continuation(b"+\r\n", b""),
        Untagged(b"* BYE bye {3}\r\n", (Atom(b"BYE"),), b"BYE", None, b"bye {3}"),
        Tagged(b"b", b"NO", b"b NO nope\r\n", None, b"nope"),
    ]


def test_fetch_body_literal_with_protocol_lookalikes():
    body = b"line)\r\n* 2 FETCH (\r\n\x00a OK\r\n"
    data = b"* 12 FETCH (UID 7 BODY[] {%d}\r\n%s)\r\na OK done\r\n" % (len(body), body)
    events = server_events(data)
    assert events[0].raw == data[: -len(b"a OK done\r\n")]
    assert parse_fetch_response(events[0]).items == [
        (b"UID", Number(7)),
        (b"BODY[]", Literal(body)),
    ]
    assert isinstance(events[1], Tagged)


def test_fetch_binary_literal8():
    (event,) = server_events(b"* 1 FETCH (BINARY[1] ~{3}\r\na\x00b)\r\n")
    assert parse_fetch_response(event).items == [
        (b"BINARY[1]", Literal(b"a\x00b", LiteralForm.BINARY))
    ]


def test_untagged_data_responses():
    events = server_events(
        b"* 3 EXISTS\r\n"
        b'* LIST (\\HasNoChildren) "/" [Gmail]/Sent\r\n'
        b"* CAPABILITY IMAP4rev1 IDLE\r\n"
        b"* LIST () NIL {5}\r\nIN)BX\r\n"
    )
    assert (events[0].number, events[0].name) == (3, b"EXISTS")
    assert events[1].tokens[-1] == Atom(b"[Gmail]/Sent")
    assert capabilities_of(events[2]) == [b"IMAP4rev1", b"IDLE"]
    assert events[3].tokens[-1] == Literal(b"IN)BX")


# Verbatim from Dovecot 2.3 (tests/e2e/test_view_vs_dovecot.py's "forwarded" message):
# sub-bodies back to back, message/rfc822 envelope and body separated by spaces.
DOVECOT_MULTIPART = (
    b'* 3 FETCH (UID 3 ENVELOPE (NIL "Fwd: something" ((NIL NIL "a" "example.org")) ((NIL '
    b'NIL "a" "example.org")) ((NIL NIL "a" "example.org")) NIL NIL NIL NIL NIL) BODY '
    b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 10 0)("message" "rfc822" NIL '
    b'NIL NIL "7bit" 489 ("Tue, 2 Jan 2024 08:00:00 +0100" '
    b'"=?utf-8?q?Weitergeleitet_=C3=BC?=" (("Inner Sender" NIL "inner" "example.net")) '
    b'(("Inner Sender" NIL "inner" "example.net")) (("Inner Sender" NIL "inner" '
    b'"example.net")) ((NIL NIL "outer" "example.org")) NIL NIL NIL "<inner@example.net>") '
    b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 23 2)("text" "html" ("charset" '
    b'"utf-8") NIL NIL "quoted-printable" 41 2) "alternative") 22)("image" "png" ("name" '
    b'"dot.png") "<dot@example.org>" NIL "base64" 98) "mixed") BODYSTRUCTURE (("text" '
    b'"plain" ("charset" "us-ascii") NIL NIL "7bit" 10 0 NIL NIL NIL NIL)("message" "rfc822" '
    b'NIL NIL NIL "7bit" 489 ("Tue, 2 Jan 2024 08:00:00 +0100" '
    b'"=?utf-8?q?Weitergeleitet_=C3=BC?=" (("Inner Sender" NIL "inner" "example.net")) '
    b'(("Inner Sender" NIL "inner" "example.net")) (("Inner Sender" NIL "inner" '
    b'"example.net")) ((NIL NIL "outer" "example.org")) NIL NIL NIL "<inner@example.net>") '
    b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 23 2 NIL NIL NIL NIL)("text" '
    b'"html" ("charset" "utf-8") NIL NIL "quoted-printable" 41 2 NIL NIL NIL NIL) '
    b'"alternative" ("boundary" "inner-b") NIL NIL NIL) 22 NIL ("attachment" ("filename" '
    b'"fwd.eml")) NIL NIL)("image" "png" ("name" "dot.png") "<dot@example.org>" NIL "base64" '
    b'98 NIL ("inline" ("filename" "dot.png")) NIL NIL) "mixed" ("boundary" "outer") NIL NIL '
    b"NIL))\r\n"
)


def test_dovecot_multipart_bodystructure_parses_and_round_trips():
    (event,) = server_events(DOVECOT_MULTIPART)
    assert isinstance(event, Untagged), event
    response = parse_fetch_response(event)
    assert [name for name, _ in response.items] == [b"UID", b"ENVELOPE", b"BODY", b"BODYSTRUCTURE"]
    body = response.items[3][1]
    assert isinstance(body, PList)
    message, subtype, parameters = body.items[1], body.items[3], body.items[4]
    assert subtype == Quoted(b"mixed")
    assert parameters == PList((Quoted(b"boundary"), Quoted(b"outer")))
    assert isinstance(message, PList)
    assert message.items[:2] == (Quoted(b"message"), Quoted(b"rfc822"))
    inner = message.items[8]  # the body of the attached message: multipart/alternative
    assert isinstance(inner, PList) and inner.items[2] == Quoted(b"alternative")
    assert serialize_untagged(event.tokens) == DOVECOT_MULTIPART
    assert serialize_fetch_response(*response) == DOVECOT_MULTIPART
    spans = fetch_item_spans(event)
    assert b" ".join(s.name + b" " + s.raw for s in spans) == DOVECOT_MULTIPART[11:-3]
    assert [s.value for s in spans] == [value for _, value in response.items]
    for cut in range(1, len(DOVECOT_MULTIPART)):  # chunking invariance
        parser = ServerParser()
        parser.feed(DOVECOT_MULTIPART[:cut])
        early = list(parser)
        parser.feed(DOVECOT_MULTIPART[cut:])
        assert early + list(parser) == [event]


@pytest.mark.parametrize(
    "raw",
    [
        # envelope address lists (RFC 3501 env-from = "(" 1*address ")")
        b'* 4 FETCH (ENVELOPE (NIL "s" (("Doe, John" NIL "john" "example.org")(NIL NIL "jo" '
        b'"x.y")) NIL NIL ((NIL NIL "g" NIL)(NIL NIL "a" "b.c")(NIL NIL NIL NIL)) NIL NIL NIL '
        b"NIL))\r\n",
        # nested multiparts open with their first part: "(((((("
        b'* 6 FETCH (BODY ((("text" "plain" NIL NIL NIL "7bit" 2 1)("text" "html" NIL NIL NIL '
        b'"7bit" 4 1) "alternative")("image" "png" NIL NIL NIL "base64" 98) "related"))\r\n',
        b'* NAMESPACE (("" "/")("Shared/" "/")) NIL NIL\r\n',
        # body-fld-dsp SP body-fld-lang: two lists with a space, after other items
        b'* 5 FETCH (BODYSTRUCTURE ("text" "plain" ("format" "flowed") NIL NIL "7bit" 6 1 NIL '
        b'("inline" ("w" "x")) ("en-US" "de") NIL))\r\n',
    ],
)
def test_lists_of_lists_round_trip(raw: bytes):
    (event,) = server_events(raw)
    assert isinstance(event, Untagged), event
    assert serialize_untagged(event.tokens) == raw


def test_adjacent_lists_only_where_the_grammar_has_them():
    assert tokenize(b"(a)(b)") == (PList((Atom(b"a"),)), PList((Atom(b"b"),)))
    for joined in (b"(a)b", b'(a)"b"', b'"a"(b)', b"a(b)", b"(a){1}\r\nb", b"BODY[](a)"):
        with pytest.raises(ImapSyntaxError, match="space"):
            tokenize(joined)
    with pytest.raises(ImapSyntaxError, match="space"):
        tokenize(b"(a)(b)", strict=True)
    # threads (RFC 5256) parse; nested threads after members are written with a space
    (thread,) = server_events(b"* THREAD (4)(1 (2)(3))\r\n")
    assert isinstance(thread, Untagged) and len(thread.tokens) == 3
    assert serialize_untagged(thread.tokens) == b"* THREAD (4) (1 (2) (3))\r\n"


def test_writer_joins_only_the_lists_opening_a_list():
    a, b = PList((Atom(b"a"),)), PList((Atom(b"b"),))
    assert serialize([PList((a, b, Quoted(b"x"), a, b))]) == b'((a)(b) "x" (a) (b))'
    assert serialize([PList((PList((a, b)), PList(())))]) == b"(((a)(b))())"
    assert serialize([a, b]) == b"(a) (b)"  # top level: arguments, not list members
    section = SectionAtom(b"BODY", (Atom(b"HEADER.FIELDS"), a))
    assert serialize([section]) == b"BODY[HEADER.FIELDS (a)]"
    # commands keep the command grammar: SP between every pair of arguments
    command = build_command(b"t", b"SEARCH", [PList((a, b))])
    assert command.raw == b"t SEARCH ((a) (b))\r\n"
    assert one_command(command.raw).args == command.args


def test_fetch_item_spans_are_exact():
    raw = (
        b'* 3 FETCH ( UID 9  FLAGS (\\Seen)  BODY[HEADER.FIELDS (SUBJECT "X-A")] '
        b"{13}\r\nSubject: )(\r\n BODY[]<0> ~{2}\r\n\x00) X-GM-LABELS (a)(b) )\r\n"
    )
    (event,) = server_events(raw)
    assert isinstance(event, Untagged)
    with pytest.raises(ImapSyntaxError):  # "(a)(b)": one value too many
        fetch_item_spans(event)
    raw = raw.replace(b" X-GM-LABELS (a)(b)", b" X-GM-LABELS ((a)(b))")
    (event,) = server_events(raw)
    spans = fetch_item_spans(event)
    assert [(s.name, s.raw) for s in spans] == [
        (b"UID", b"9"),
        (b"FLAGS", b"(\\Seen)"),
        (b'BODY[HEADER.FIELDS (SUBJECT "X-A")]', b"{13}\r\nSubject: )(\r\n"),
        (b"BODY[]<0>", b"~{2}\r\n\x00)"),
        (b"X-GM-LABELS", b"((a)(b))"),
    ]
    assert spans[3].value == Literal(b"\x00)", LiteralForm.BINARY)  # octets from the parse
    assert spans[2].name_token == SectionAtom(
        b"BODY", (Atom(b"HEADER.FIELDS"), PList((Atom(b"SUBJECT"), Quoted(b"X-A"))))
    )
    for not_fetch in (b"* 1 EXISTS\r\n", b"* 1 FETCH (UID)\r\n"):
        with pytest.raises(ImapSyntaxError):
            fetch_item_spans(server_events(not_fetch)[0])
    assert serialize_fetch_response(3, [(s.name, s.raw) for s in spans]) == (
        b"* 3 FETCH (UID 9 FLAGS (\\Seen) " + raw[raw.index(b"BODY[HEADER") : -4] + b")\r\n"
    )


def test_unparsable_server_lines_keep_framing():
    events = server_events(b"* LIST (\r\nxyz\r\n* 1 EXISTS\r\n")
    assert [type(e) for e in events] == [Unparsed, Unparsed, Untagged]
    assert events[0].raw == b"* LIST (\r\n"


def test_server_limits_are_fatal():
    assert isinstance(server_events(b"* 1 FETCH (BODY[] {101}\r\n", max_literal_size=100)[0], Fatal)
    assert isinstance(server_events(b"* " + b"1 " * 100, max_line_length=100)[0], Fatal)
    events = server_events(b"* X {60}\r\n" + b"a" * 60 + b" {60}\r\n", max_response_size=100)
    assert isinstance(events[0], Fatal)


def test_server_literal_pending_at_eof():
    parser = ServerParser()
    parser.feed(b"* 1 FETCH (BODY[] {10}\r\nabc")
    assert list(parser) == [] and parser.pending_bytes > 0


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("text", "token"),
    [
        (
            b"BODY[HEADER.FIELDS (SUBJECT FROM)]<0.1024>",
            SectionAtom(
                b"BODY",
                (Atom(b"HEADER.FIELDS"), PList((Atom(b"SUBJECT"), Atom(b"FROM")))),
                b"0.1024",
            ),
        ),
        (b"BODY.PEEK[1.2.MIME]", SectionAtom(b"BODY.PEEK", (Atom(b"1.2.MIME"),))),
        (b"BINARY.PEEK[1]<0.100>", SectionAtom(b"BINARY.PEEK", (Number(1),), b"0.100")),
        (b"BINARY.SIZE[2]", SectionAtom(b"BINARY.SIZE", (Number(2),))),
        (b"BODY[]", SectionAtom(b"BODY", ())),
        (b"RFC822.SIZE", Atom(b"RFC822.SIZE")),
        (b"foo[1]bar", Atom(b"foo[1]bar")),
        (b'"a\\\\b\\"c"', Quoted(b'a\\b"c')),
        (b"nil", NIL),
    ],
)
def test_tokens(text: bytes, token):
    assert tokenize(text) == (token,)


def test_serialize():
    tokens = (
        Atom(b"A"),
        Number(5),
        NIL,
        Quoted(b'x"y'),
        Quoted(b"\xc3\xa9"),
        PList((Literal(b"ab"), Literal(b"c", LiteralForm.BINARY_PLUS))),
        SectionAtom(b"BODY", (Number(1),), b"0"),
    )
    assert serialize(tokens) == b'A 5 NIL "x\\"y" {2}\r\n\xc3\xa9 ({2}\r\nab ~{1+}\r\nc) BODY[1]<0>'
    assert serialize_untagged([Number(1), Atom(b"EXISTS")]) == b"* 1 EXISTS\r\n"


def test_status_response():
    code = ResponseCode.build(b"APPENDUID", Number(1), Number(2))
    assert status_response(b"a", b"ok", "done", code) == b"a OK [APPENDUID 1 2] done\r\n"
    assert status_response(None, b"BAD", b"x\r\ny") == b"* BAD x  y\r\n"


# --------------------------------------------------------------------------- FETCH


def fetch(text: bytes):
    return parse_fetch_request(tokenize(text, strict=True))


def test_fetch_request_with_modifiers():
    request = fetch(b"1:*,3 (UID BODY.PEEK[]<0.65536>) (CHANGEDSINCE 5)")
    assert request.sequence_set == SequenceSet(((1, None), (3, 3)))
    assert request.items == [
        FetchItem("UID"),
        FetchItem("BODY", Section(), (0, 65536), peek=True),
    ]
    assert request.modifiers == (Atom(b"CHANGEDSINCE"), Number(5))


@pytest.mark.parametrize(
    ("macro", "names"),
    [
        (b"ALL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]),
        (b"fast", ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]),
        (b"FULL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]),
    ],
)
def test_fetch_macros(macro: bytes, names: list[str]):
    assert [item.name for item in fetch(b"1 " + macro).items] == names


@pytest.mark.parametrize(
    ("text", "item"),
    [
        (b"BODY[]", FetchItem("BODY", Section())),
        (b"BODY", FetchItem("BODY")),
        (b"BODYSTRUCTURE", FetchItem("BODYSTRUCTURE")),
        (b"BODY[TEXT]", FetchItem("BODY", Section((), "TEXT"))),
        (b"BODY[HEADER]", FetchItem("BODY", Section((), "HEADER"))),
        (b"BODY[1]", FetchItem("BODY", Section((1,)))),
        (b"body.peek[1.2.MIME]", FetchItem("BODY", Section((1, 2), "MIME"), peek=True)),
        (b"BODY[3.HEADER]", FetchItem("BODY", Section((3,), "HEADER"))),
        (b"BODY[2.1.TEXT]<10.20>", FetchItem("BODY", Section((2, 1), "TEXT"), (10, 20))),
        (
            b"BODY.PEEK[HEADER.FIELDS (Subject FROM)]<0.1024>",
            FetchItem("BODY", Section((), "HEADER.FIELDS", ("Subject", "FROM")), (0, 1024), True),
        ),
        (
            b'BODY[1.HEADER.FIELDS.NOT ("X-Spam" {4}\r\nDate)]',
            FetchItem("BODY", Section((1,), "HEADER.FIELDS.NOT", ("X-Spam", "Date"))),
        ),
        (b"BINARY[1]", FetchItem("BINARY", Section((1,)))),
        (b"BINARY.PEEK[1]<0.100>", FetchItem("BINARY", Section((1,)), (0, 100), True)),
        (b"BINARY.SIZE[2]", FetchItem("BINARY.SIZE", Section((2,)))),
        (b"BINARY[]", FetchItem("BINARY", Section())),
        (b"RFC822.SIZE", FetchItem("RFC822.SIZE")),
        (b"X-GM-MSGID", FetchItem("X-GM-MSGID")),
    ],
)
def test_fetch_items(text: bytes, item: FetchItem):
    (parsed,) = fetch(b"1 " + text).items
    assert parsed == item
    assert fetch(b"1 " + parsed.request_bytes()).items == [item]


@pytest.mark.parametrize(
    "text",
    [
        b"BODY[0]",
        b"BODY[01]",
        b"BODY[1.]",
        b"BODY[MIME]",
        b"BODY[FOO]",
        b"BODY[HEADER.FIELDS]",
        b"BODY[HEADER.FIELDS ()]",
        b'BODY[HEADER.FIELDS ("a:b")]',
        b"BODY[TEXT (X)]",
        b"BODY[]<0.0>",
        b"BODY[]<5>",
        b"BODY[]<a.b>",
        b"BODY.PEEK",
        b"BINARY",
        b"BINARY[HEADER]",
        b"BINARY.SIZE[1]<0.5>",
        b"BINARY.SIZE.PEEK[1]",
        b"RFC822.SIZE[1]",
        b"(ALL)",
        b"()",
        b'"UID"',
        b"(UID (FLAGS))",
    ],
)
def test_invalid_fetch_items(text: bytes):
    with pytest.raises(ImapSyntaxError):
        fetch(b"1 " + text)


@pytest.mark.parametrize("args", [b"1", b"1 UID X", b"0 UID", b"a:b UID", b"1 UID 5", b"1,,2 UID"])
def test_invalid_fetch_arguments(args: bytes):
    with pytest.raises(ImapSyntaxError):
        fetch(args)


def test_fetch_item_names_and_semantics():
    item = fetch(b"1 BODY.PEEK[1.HEADER.FIELDS (A B)]<0.10>").items[0]
    assert item.request_bytes() == b"BODY.PEEK[1.HEADER.FIELDS (A B)]<0.10>"
    assert item.response_name() == b"BODY[1.HEADER.FIELDS (A B)]<0>"
    assert item.content_derived and not item.sets_seen
    assert fetch(b"1 BODY[]").items[0].sets_seen
    assert fetch(b"1 RFC822").items[0].sets_seen
    assert not FetchItem("FLAGS").content_derived
    assert parse_fetch_item(SectionAtom(b"BODY", (), b"0"), response=True).partial == (0, None)
    with pytest.raises(ImapSyntaxError):
        parse_fetch_item(SectionAtom(b"BODY.PEEK", ()), response=True)


def test_fetch_response_round_trip_puts_uid_first():
    raw = b"* 12 FETCH (UID 7 FLAGS (\\Seen) RFC822.SIZE 4 BODY[]<0> {4}\r\na\r\nb)\r\n"
    (event,) = server_events(raw)
    response = parse_fetch_response(event)
    assert response.sequence == 12
    assert [name for name, _ in response.items] == [b"UID", b"FLAGS", b"RFC822.SIZE", b"BODY[]<0>"]
    assert serialize_fetch_response(*response) == raw
    moved = serialize_fetch_response(3, [(b"FLAGS", PList(())), (b"UID", Number(9))])
    assert moved == b"* 3 FETCH (UID 9 FLAGS ())\r\n"


@pytest.mark.parametrize(
    "raw", [b"* 1 EXISTS\r\n", b"* 1 FETCH (UID)\r\n", b"* 1 FETCH ((X) 1)\r\n", b"* FETCH 1\r\n"]
)
def test_not_fetch_responses(raw: bytes):
    with pytest.raises(ImapSyntaxError):
        parse_fetch_response(server_events(raw)[0])


# --------------------------------------------------------------------------- sequence sets


def test_sequence_sets():
    seq = SequenceSet.parse(b"1:*,3,7:5,559:*")
    assert seq.ranges == ((1, None), (3, 3), (7, 5), (559, None))
    assert seq.to_bytes() == b"1:*,3,7:5,559:*"
    assert SequenceSet.parse(b"2,9:*,4:3").resolve(10) == [(2, 4), (9, 10)]
    assert SequenceSet.parse(b"559:*").resolve(50) == [(50, 559)]
    assert SequenceSet.parse(b"1:*").resolve(0) == []
    assert SequenceSet.parse(b"*").contains(10, 10)
    assert SequenceSet.parse(b"$").saved
    with pytest.raises(ValueError):
        SequenceSet.parse(b"$").resolve(5)
    for bad in (b"", b"0", b"1:", b"4294967296", b"1,a", b"$,1"):
        with pytest.raises(ImapSyntaxError):
            SequenceSet.parse(bad)


# --------------------------------------------------------------------------- capabilities

UPSTREAM_CAPS = [
    b"IMAP4rev1",
    b"IMAP4rev2",
    b"SASL-IR",
    b"LOGIN-REFERRALS",
    b"ID",
    b"ENABLE",
    b"IDLE",
    b"LITERAL+",
    b"STARTTLS",
    b"LOGINDISABLED",
    b"AUTH=PLAIN",
    b"AUTH=XOAUTH2",
    b"AUTH=SCRAM-SHA-256",
    b"AUTH=SCRAM-SHA-256-PLUS",
    b"COMPRESS=DEFLATE",
    b"THREAD=REFERENCES",
    b"BINARY",
    b"CATENATE",
    b"URLAUTH",
    b"MULTIAPPEND",
    b"NOTIFY",
    b"PREVIEW",
    b"UTF8=ACCEPT",
    b"APPENDLIMIT=35651584",
    b"X-GM-EXT-1",
    b"SPECIAL-USE",
]


def test_filter_capabilities_default_allow_list():
    assert filter_capabilities(UPSTREAM_CAPS) == [
        b"IMAP4rev1",
        b"SASL-IR",
        b"ID",
        b"ENABLE",
        b"IDLE",
        b"LITERAL+",
        b"AUTH=PLAIN",
        b"AUTH=XOAUTH2",
        b"THREAD=REFERENCES",
        b"APPENDLIMIT=35651584",
        b"SPECIAL-USE",
    ]


def test_filter_capabilities_policy():
    policy = CapabilityPolicy(
        imap4rev2=True,
        binary=True,
        extra_allowed=frozenset({b"x-gm-ext-1", b"AUTH=SCRAM-*", b"COMPRESS=*", b"STARTTLS"}),
    )
    kept = filter_capabilities(UPSTREAM_CAPS, policy)
    assert {b"IMAP4rev2", b"BINARY", b"X-GM-EXT-1", b"AUTH=SCRAM-SHA-256"} <= set(kept)
    # never, whatever the policy says
    assert not {b"AUTH=SCRAM-SHA-256-PLUS", b"COMPRESS=DEFLATE", b"STARTTLS"} & set(kept)


def test_rewrite_capabilities_in_all_places():
    caps = b"IMAP4rev1 COMPRESS=DEFLATE IDLE STARTTLS"
    assert (
        rewrite_capabilities(b"* CAPABILITY " + caps + b"\r\n", add=[b"LITERAL+", b"IDLE"])
        == b"* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n"
    )
    assert (
        rewrite_capabilities(b"* OK [CAPABILITY " + caps + b"] Dovecot ready.\r\n")
        == b"* OK [CAPABILITY IMAP4rev1 IDLE] Dovecot ready.\r\n"
    )
    assert (
        rewrite_capabilities(b"a1 OK [CAPABILITY " + caps + b"] Logged in\r\n")
        == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    )
    assert (
        rewrite_capabilities(b"* ENABLED CONDSTORE X-FOO\r\n", add=[b"IDLE"])
        == b"* ENABLED CONDSTORE\r\n"
    )
    for other in (b"* 1 EXISTS\r\n", b"a OK [ALERT] CAPABILITY\r\n"):
        assert rewrite_capabilities(other) == other


# --------------------------------------------------------------------------- properties

ATOM_TEXT = st.text("ABCXYZabcxyz.-_\\%*&+:0", min_size=1, max_size=8).map(str.encode)
atoms = ATOM_TEXT.filter(lambda v: not v.isdigit() and v.upper() != b"NIL").map(Atom)
numbers = st.integers(0, 2**32).map(Number)
quoted = st.binary(max_size=30).map(lambda b: Quoted(bytes(c % 95 + 32 for c in b)))
literal_data = st.binary(max_size=40)
section_atoms = st.builds(
    SectionAtom,
    st.sampled_from([b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.SIZE"]),
    st.sampled_from(
        [(), (Number(1),), (Atom(b"1.2.MIME"),), (Atom(b"HEADER.FIELDS"), PList((Atom(b"A"),)))]
    ),
    st.sampled_from([None, b"0", b"0.1024"]),
)


def token_strategy(literal_forms: list[LiteralForm]):
    literals = st.builds(Literal, literal_data, st.sampled_from(literal_forms))
    leaves = st.one_of(atoms, numbers, quoted, literals, st.just(NIL), section_atoms)

    def lists(inner):
        return st.lists(inner, max_size=4).map(lambda items: PList(tuple(items)))

    return st.recursive(leaves, lists, max_leaves=12)


client_tokens = token_strategy(list(LiteralForm))
server_tokens = token_strategy([LiteralForm.SYNC, LiteralForm.BINARY])

# Dovecot-style BODY / BODYSTRUCTURE values, as (token, bytes) with the bytes written the way
# Dovecot's imap-bodystructure.c does, independently of the codec's writer: sub-bodies back
# to back, everything else separated by one space. Envelopes too (address lists back to back).
Encoded = tuple[Token, bytes]
NIL_ENCODED: Encoded = (NIL, b"NIL")


def _quote(value: bytes) -> Encoded:
    return Quoted(value), b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _list(items: list[Encoded], separator: bytes = b" ") -> Encoded:
    return PList(tuple(t for t, _ in items)), b"(" + separator.join(b for _, b in items) + b")"


strings = st.text('abcXYZ 09-=?_.@<>"\\/', max_size=12).map(lambda t: _quote(t.encode()))
nstrings = st.one_of(st.just(NIL_ENCODED), strings)
counts = st.integers(0, 10**6).map(lambda n: (Number(n), b"%d" % n))
params = st.one_of(
    st.just(NIL_ENCODED),
    st.lists(st.tuples(strings, strings), min_size=1, max_size=3).map(
        lambda pairs: _list([item for pair in pairs for item in pair])
    ),
)
dispositions = st.one_of(
    st.just(NIL_ENCODED), st.tuples(strings, params).map(lambda d: _list(list(d)))
)
languages = st.one_of(
    nstrings, st.lists(strings, min_size=1, max_size=3).map(lambda langs: _list(langs))
)
addresses = st.one_of(
    st.just(NIL_ENCODED),
    st.lists(st.lists(nstrings, min_size=4, max_size=4).map(_list), min_size=1, max_size=3).map(
        lambda group: _list(group, b"")
    ),
)
envelopes = st.tuples(nstrings, nstrings, *[addresses] * 6, nstrings, nstrings).map(
    lambda fields: _list(list(fields))
)


@st.composite
def bodies(draw, extended: bool, depth: int = 0) -> Encoded:
    kinds = ["text", "other"] + (["message", "multipart", "multipart"] if depth < 3 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "multipart":
        parts = draw(st.lists(bodies(extended, depth + 1), min_size=1, max_size=3))
        fields = [draw(strings)]
        if extended:
            fields += [draw(params), draw(dispositions), draw(languages), draw(nstrings)]
        token = PList(tuple(t for t, _ in parts) + tuple(t for t, _ in fields))
        data = b"".join(b for _, b in parts) + b" " + b" ".join(b for _, b in fields)
        return token, b"(" + data + b")"
    media = {"text": (b"text", b"plain"), "other": (b"image", b"png")}
    kind_type, subtype = media.get(kind, (b"message", b"rfc822"))
    fields = [_quote(kind_type), _quote(subtype), draw(params), draw(nstrings), draw(nstrings)]
    fields += [draw(strings), draw(counts)]  # encoding, size
    if kind == "text":
        fields.append(draw(counts))
    elif kind == "message":
        fields += [draw(envelopes), draw(bodies(extended, depth + 1)), draw(counts)]
    if extended:
        fields += [draw(nstrings), draw(dispositions), draw(languages), draw(nstrings)]
    return _list(fields)


body_values = st.booleans().flatmap(lambda extended: bodies(extended))
tags = st.text("abcdefgh0123456789.", min_size=1, max_size=6).map(str.encode)


@st.composite
def command_streams(draw) -> tuple[bytes, list[tuple[bytes, tuple]]]:
    commands = []
    for _ in range(draw(st.integers(1, 5))):
        tag = draw(tags)
        name = draw(st.sampled_from([b"LOGIN", b"APPEND", b"XYZZY", b"SEARCH"]))
        args = tuple(draw(st.lists(client_tokens, max_size=5)))
        commands.append((build_command(tag, name, args).raw, args))
    return b"".join(raw for raw, _ in commands), commands


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def drain(parser, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        parser.feed(chunk)
        events.extend(parser)
    return events


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.data())
def test_client_chunking_invariance_and_raw_concatenation(data):
    stream, commands = data.draw(command_streams())
    whole = drain(ClientParser(), [stream])
    pieces = drain(ClientParser(), data.draw(chunked(stream)))
    assert whole == pieces
    parsed = [e for e in whole if isinstance(e, Command)]
    assert b"".join(c.raw for c in parsed) == stream
    assert [c.args for c in parsed] == [args for _, args in commands]
    sync_count = sum(s.form.synchronizing for c in parsed for s in c.literal_spans)
    assert sum(isinstance(e, ContinuationNeeded) for e in whole) == sync_count
    for cmd in parsed:  # re-announcing keeps the literal octets and the rest
        joined = b"".join(chunk.head + (chunk.literal or b"") for chunk in cmd.chunks())
        shorter = sum(not s.form.synchronizing for s in cmd.literal_spans)
        assert len(joined) == len(cmd.raw) - shorter


@st.composite
def server_responses(draw) -> bytes:
    kinds = ["data", "fetch", "bodystructure", "tagged", "untagged-status", "continuation"]
    kind = draw(st.sampled_from(kinds))
    text = draw(st.text("abc XYZ{}[]()*+0123", max_size=20).map(str.encode)).strip()
    text = text.lstrip(b"[")  # "[" right after the status starts a response code
    code = draw(
        st.one_of(
            st.none(),
            st.builds(
                lambda n, a: ResponseCode.build(n, *a), st.just(b"X"), st.lists(atoms, max_size=3)
            ),
        )
    )
    if kind == "data":
        return serialize_untagged([draw(atoms), *draw(st.lists(server_tokens, max_size=4))])
    if kind == "fetch":
        names = st.one_of(st.sampled_from([Atom(b"UID"), Atom(b"FLAGS")]), section_atoms)
        items = draw(st.lists(st.tuples(names, server_tokens), max_size=4))
        return serialize_untagged(
            [Number(draw(st.integers(1, 99))), Atom(b"FETCH"), PList(sum(items, ()))]
        )
    if kind == "bodystructure":
        _, body = draw(body_values)
        return b"* 3 FETCH (UID 9 BODYSTRUCTURE " + body + b")\r\n"
    if kind == "tagged":
        return status_response(
            draw(tags), draw(st.sampled_from([b"OK", b"NO", b"BAD"])), text, code
        )
    if kind == "untagged-status":
        return status_response(None, draw(st.sampled_from([b"OK", b"BYE", b"PREAUTH"])), text, code)
    return b"+ " + text + b"\r\n"


@FAST
@given(st.lists(server_responses(), min_size=1, max_size=5), st.data())
def test_server_chunking_invariance_and_round_trip(responses, data):
    stream = b"".join(responses)
    whole = drain(ServerParser(), [stream])
    assert whole == drain(ServerParser(), data.draw(chunked(stream)))
    assert [e.raw for e in whole] == responses
    for event in whole:
        if isinstance(event, Untagged) and event.status is None:
            assert serialize_untagged(event.tokens) == event.raw
            if event.name == b"FETCH":
                assert serialize_fetch_response(*parse_fetch_response(event)).startswith(b"* ")
        elif isinstance(event, Tagged | Untagged):
            tag = event.tag if isinstance(event, Tagged) else None
            assert status_response(tag, event.status, event.text, event.code) == event.raw
        else:
            assert isinstance(event, Continuation)


@FAST
@given(st.data())
def test_fetch_response_serialize_parse_round_trip(data):
    uid = [(b"UID", Number(data.draw(st.integers(1, 10**6))))]
    rest = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from([b"FLAGS", b"RFC822.SIZE", b"BODY[]", b"BODY[1]<0>"]), server_tokens
            ),
            max_size=4,
        )
    )
    raw = serialize_fetch_response(7, uid + rest)
    (event,) = server_events(raw)
    assert serialize_fetch_response(*parse_fetch_response(event)) == raw


@FAST
@given(body_values, envelopes, st.data())
def test_dovecot_style_bodystructure_round_trip(body: Encoded, envelope: Encoded, data):
    (body_token, body_bytes), (envelope_token, envelope_bytes) = body, envelope
    assert serialize([body_token]) == body_bytes  # the writer emits Dovecot's form
    assert tokenize(body_bytes) == (body_token,)
    items = [(b"UID", Number(9)), (b"ENVELOPE", envelope_token), (b"BODYSTRUCTURE", body_token)]
    raw = serialize_fetch_response(5, items)
    assert raw == b"* 5 FETCH (UID 9 ENVELOPE %s BODYSTRUCTURE %s)\r\n" % (
        envelope_bytes,
        body_bytes,
    )
    events = drain(ServerParser(), data.draw(chunked(raw)))
    assert events == server_events(raw)
    (event,) = events
    assert isinstance(event, Untagged) and event.raw == raw
    assert parse_fetch_response(event) == (5, items)
    assert serialize_fetch_response(*parse_fetch_response(event)) == raw
    spans = fetch_item_spans(event)
    assert [s.raw for s in spans] == [b"9", envelope_bytes, body_bytes]


NOISE = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from(
            [
                b"\r\n",
                b"{5}\r\n",
                b"{3+}\r\n",
                b"~{2}\r\n",
                b"{99999+}\r\n",
                b"{9999999999+}\r\n",
                b"a ",
                b"* ",
                b"+ ",
                b"(",
                b")",
                b"[",
                b"]",
                b'"',
                b"\\",
                b"DONE\r\n",
                b"* OK [",
                b"BODY[",
                b"<0.5>",
                b"\xff",
            ]
        ),
    ),
    max_size=40,
).map(b"".join)


@FAST
@given(NOISE, st.data())
def test_any_bytes_give_only_clean_client_events(noise, data):
    limits = dict(max_line_length=64, max_literal_size=50, max_command_size=200, max_skip_size=5000)
    parser = ClientParser(**limits)
    for chunk in data.draw(chunked(noise)):
        parser.feed(chunk)
        for event in parser:
            if isinstance(event, Rejected | Fatal):
                assert event.reason.isascii() and "\n" not in event.reason
        if not parser.in_command and not parser.closed:  # wander through the modes too
            mode = data.draw(st.sampled_from(["command", "done", "line"]))
            if mode == "done":
                parser.expect_done()
            elif mode == "line":
                parser.expect_continuation_line()
        assert parser.pending_bytes <= 200 + 64 + 2
    whole = ClientParser(**limits)
    whole.feed(noise)
    list(whole)


@FAST
@given(NOISE, st.data())
def test_any_bytes_give_only_clean_server_events(noise, data):
    parser = ServerParser(max_line_length=64, max_literal_size=50, max_response_size=200)
    for chunk in data.draw(chunked(noise)):
        parser.feed(chunk)
        for event in parser:
            assert isinstance(event, Untagged | Tagged | Continuation | Unparsed | Fatal)
        assert parser.pending_bytes <= 200 + 64 + 2
