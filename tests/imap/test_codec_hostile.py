"""Hostile input to the FETCH parsers: tokenize, parse_fetch_request, parse_fetch_item.

Property: every input either parses or is rejected with ImapSyntaxError (a one-line ASCII
reason, fit for a BAD response), within a time limit, and what parses is no bigger than
the input. Accepted FETCH items re-serialize to bytes that parse back to the same item.
The inputs: random bytes, FETCH fragments strung together, valid FETCH arguments cut,
duplicated and spliced with hostile fragments, and deep nestings of lists and sections.
test_codec.py feeds NOISE through the framing parsers; this file aims at the grammar.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from localproxy.imap.codec import (
    Atom,
    ClientParser,
    FetchItem,
    ImapSyntaxError,
    Literal,
    PList,
    Rejected,
    SectionAtom,
    ServerParser,
    Token,
    Unparsed,
    parse_fetch_item,
    parse_fetch_request,
    tokenize,
)
from tests.harness.hostile import mutations, time_limit

HOSTILE = settings(max_examples=400, deadline=2000)

FRAGMENTS = [
    b"[",
    b"]",
    b"(",
    b")",
    b"<",
    b">",
    b".",
    b"..",
    b" ",
    b"-1",
    b"0",
    b"4294967296",
    b"99999999999999999999",
    b"9" * 5000,
    b"{5}\r\n",
    b"{99999999}\r\n",
    b"~{2+}\r\n",
    b'"',
    b'"a\\"b"',
    b"\\",
    b"\x00",
    b"\xff",
    b"\r\n",
    b"NIL",
    b"()",
    b"[]",
    b"<0.5>",
    b"BODY[",
    b"BODY.PEEK[",
    b"BINARY.SIZE[",
    b"A[ (",
    b"HEADER.FIELDS (",
    b".MIME",
    b".PEEK",
]

SEQUENCE_SETS = [b"1", b"1:*", b"*", b"$", b"1,3:5,7:*", b"4294967295", b"4294967296", b"0"]
SECTIONS = [
    b"",
    b"1",
    b"1.2",
    b"1.2.MIME",
    b"HEADER",
    b"2.TEXT",
    b"1.2.HEADER.FIELDS (a b)",
    b'HEADER.FIELDS.NOT ("X-Spam" Date)',
    b"HEADER.FIELDS ({4}\r\nDate)",
    b"9999999999.1",
]
PARTIALS = [b"", b"<0.100>", b"<0>", b"<-1.5>", b"<5.-1>", b"<0.0>", b"<1.2.3>", b"<>"]
PARTIALS += [b"<4294967296.1>", b"<9223372036854775807.9999999999999999999>", b"<0.100"]
SECTIONED = [b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE", b"body.peek"]
PLAIN_ITEMS = [b"UID", b"FLAGS", b"ENVELOPE", b"RFC822.SIZE", b"BODYSTRUCTURE", b"ALL", b"FULL"]

sectioned_items = st.builds(
    lambda name, section, partial: name + b"[" + section + b"]" + partial,
    st.sampled_from(SECTIONED),
    st.sampled_from(SECTIONS),
    st.sampled_from(PARTIALS),
)
fetch_items = st.one_of(st.sampled_from(PLAIN_ITEMS), sectioned_items)
item_lists = st.one_of(
    fetch_items,
    st.lists(fetch_items, min_size=1, max_size=5).map(lambda i: b"(" + b" ".join(i) + b")"),
)
fetch_arguments = st.builds(
    lambda sequence, items, modifiers: sequence + b" " + items + modifiers,
    st.sampled_from(SEQUENCE_SETS),
    item_lists,
    st.sampled_from([b"", b" (CHANGEDSINCE 12345)", b" ()", b" (X (Y))"]),
)
# Some left whole: valid arguments with hostile numbers in them check the round trip.
hostile_arguments = st.one_of(
    fetch_arguments, fetch_arguments.flatmap(lambda data: mutations(data, FRAGMENTS))
)
fragment_soup = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=6)), max_size=40
).map(b"".join)
# Lists and sections opened inside each other, closed or not: the shape that makes a
# parser recurse or backtrack. Most openers end in a separator, so that a section that
# fails to close and is re-read as an atom leaves the nested ones to be read again.
OPENERS = [b"A[ ", b"BODY[1 (", b"(", b"( ", b"A[(", b"B[x (", b'"q" ', b"A[", b"[", b"{0}\r\n "]
CLOSERS = [b")", b"]", b"]<0.5>", b" ", b"x"]
nestings = st.builds(
    lambda openers, closers: openers + b"".join(closers),
    st.one_of(
        st.lists(st.sampled_from(OPENERS), max_size=60).map(b"".join),
        st.builds(bytes.__mul__, st.sampled_from(OPENERS), st.integers(1, 300)),
    ),
    st.lists(st.sampled_from(CLOSERS), max_size=60),
)


# --------------------------------------------------------------------------- checks


def walk(tokens: tuple[Token, ...]) -> Iterator[Token]:
    """Every token, also those inside lists and sections."""
    for token in tokens:
        yield token
        if isinstance(token, PList):
            yield from walk(token.items)
        elif isinstance(token, SectionAtom):
            yield from walk(token.section)


def rejected_cleanly(error: ImapSyntaxError) -> None:
    reason = str(error)
    assert reason and reason.isascii() and "\n" not in reason and "\r" not in reason


def tokens_of(data: bytes, strict: bool) -> tuple[Token, ...] | None:
    try:
        tokens = tokenize(data, strict=strict)
    except ImapSyntaxError as error:
        rejected_cleanly(error)
        return None
    every = list(walk(tokens))
    assert len(every) <= len(data), "more tokens than bytes"
    assert sum(len(t.data) for t in every if isinstance(t, Literal)) <= len(data)
    return tokens


def check_item(token: Token, response: bool) -> None:
    try:
        item = parse_fetch_item(token, response=response)
    except ImapSyntaxError as error:
        rejected_cleanly(error)
        return
    again = item.response_name() if response else item.request_bytes()
    assert reparsed_item(again, response) == item, again


def reparsed_item(data: bytes, response: bool) -> FetchItem:
    (token,) = tokenize(data, strict=not response)
    return parse_fetch_item(token, response=response)


def check_request(tokens: tuple[Token, ...]) -> None:
    try:
        request = parse_fetch_request(tokens)
    except ImapSyntaxError as error:
        rejected_cleanly(error)
        return
    assert request.items
    for item in request.items:
        (again,) = parse_fetch_request(tokenize(b"1 " + item.request_bytes(), strict=True)).items
        assert again == item


def check_everything(data: bytes) -> None:
    """The whole path a FETCH command's arguments take, in both tokenizer modes, plus
    every token on its own as a requested and as a response item."""
    with time_limit():
        for strict in (True, False):
            tokens = tokens_of(data, strict)
            if tokens is None:
                continue
            check_request(tokens)
            for token in walk(tokens):
                check_item(token, response=False)
                check_item(token, response=True)


# --------------------------------------------------------------------------- suites


@HOSTILE
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes):
    check_everything(data)


@HOSTILE
@given(fragment_soup)
def test_fetch_fragments_strung_together(data: bytes):
    check_everything(data)


@HOSTILE
@given(hostile_arguments)
@example(b"1 (BODY.PEEK[1.2.HEADER.FIELDS (a b)]<0.100> BINARY[3] UID)")
@example(b"1 BODY[1.2.HEADER.FIELDS (a b)]]<0.100>")
@example(b"1 BODY[[1]]<-1.5> BODY[]<99999999999999999999.1>")
@example(b"1 BODY[HEADER.FIELDS ((a) b)] BINARY[" + b"9" * 5000 + b"]")
def test_mutated_fetch_arguments(data: bytes):
    check_everything(data)


@HOSTILE
@given(nestings)
@example(b"A[ " * 14)  # found by this suite: exponential backtracking, see below
def test_deep_nesting_of_lists_and_sections(data: bytes):
    check_everything(data)


# --------------------------------------------------------------------------- regressions


@pytest.mark.parametrize("opener", [b"A[ (", b"BODY[1 (", b"A[ (B[ ", b"A[x (", b"A[ "])
def test_nested_sections_that_fail_are_rejected_in_linear_time(opener: bytes):
    """Each section that fails to close is re-read as an atom, and what follows it is
    read again: every level doubled the work (`A[ (` x 20 took 10 s, x 31 hours). Now
    the brackets at each position are parsed once and the re-reading has a budget."""
    for levels in (31, 200, 20_000 // len(opener)):
        with time_limit(1.0):
            for strict in (True, False):
                with pytest.raises(ImapSyntaxError):
                    tokenize(opener * levels, strict=strict)


def test_a_failed_section_or_two_is_within_the_budget():
    """Brackets that never close in a real command cost one more reading of the rest."""
    tokens = tokenize(b"TEXT x[ TEXT y[ " + b"1 " * 10_000, strict=True)
    assert tokens[:4] == (Atom(b"TEXT"), Atom(b"x["), Atom(b"TEXT"), Atom(b"y["))
    assert len(tokens) == 10_004
    with pytest.raises(ImapSyntaxError, match="too complex"):
        tokenize(b"x[ " * 40 + b"1 " * 10_000, strict=True)


def test_a_line_of_nested_sections_stalls_neither_parser():
    """The same from either side of the relay: 85 bytes used to block it for 2.7 s."""
    nested = b"A[ (" * 500
    for parser, line in [
        (ServerParser(), b"* 1 LIST " + nested + b"\r\n"),
        (ClientParser(), b"a1 FETCH 1 " + nested + b"\r\n"),
    ]:
        parser.feed(line)
        with time_limit(0.5):
            (event,) = list(parser)
        assert isinstance(event, Unparsed | Rejected)


def test_sections_that_close_late_still_parse():
    """What memoizing the section attempts must not change."""
    tokens = tokenize(b"A[ (B[ (C[x]) ]) ] D[1]<0.5>", strict=True)
    assert tokens[1] == SectionAtom(b"D", (tokens[1].section[0],), b"0.5")
    (inner,) = tokens[0].section
    assert isinstance(inner, PList) and isinstance(inner.items[0], SectionAtom)
    assert tokenize(b"[Gmail]/Sent A[x") == tokenize(b"[Gmail]/Sent") + tokenize(b"A[x")
