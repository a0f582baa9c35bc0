"""The relay's fast paths: FETCH responses framed without tokenizing (RawFetch), output
collected per read, whole-message items asked as a 1-octet stand-in when the view is
cached. The end-to-end checks against Dovecot are in tests/e2e/test_imap_relay.py."""

from __future__ import annotations

import pytest

from localproxy.imap.cache import ViewCache, ViewKey
from localproxy.imap.codec import (
    Atom,
    FetchItem,
    RawFetch,
    Section,
    ServerParser,
    Untagged,
    parse_fetch_request,
    serialize,
    tokenize,
)
from localproxy.imap.relay import _HEAD_UID, _stand_ins, _upstream_fetch_items, item_key

ENVELOPE = (
    b'* 3 FETCH (FLAGS (\\Seen) UID 17 RFC822.SIZE 12 ENVELOPE ("d" "s" NIL NIL NIL NIL '
    b"NIL NIL NIL NIL))\r\n"
)
LITERAL = b"* 4 FETCH (UID 18 BODY[] {5}\r\nhello)\r\n"


def _events(data: bytes, *, lazy: bool) -> list[object]:
    parser = ServerParser(lazy_fetch=lazy)
    parser.feed(data)
    return list(parser)


def test_lazy_parser_frames_fetch_responses_without_tokens():
    data = ENVELOPE + LITERAL + b"* 5 EXISTS\r\n* OK [UIDNEXT 9] x\r\na1 OK done\r\n"
    lazy, eager = _events(data, lazy=True), _events(data, lazy=False)
    assert [type(e) for e in lazy[:2]] == [RawFetch, RawFetch]
    assert [(e.raw, e.number) for e in lazy[:2]] == [(ENVELOPE, 3), (LITERAL, 4)]
    # parse() gives exactly what the eager parser gives; the rest is not affected
    assert [e.parse() for e in lazy[:2]] == eager[:2]
    assert lazy[2:] == eager[2:]
    assert all(isinstance(e, Untagged) for e in eager[:2])


def test_lazy_parser_frames_literals_split_across_reads():
    parser = ServerParser(lazy_fetch=True)
    for index in range(len(LITERAL)):
        parser.feed(LITERAL[index : index + 1])
        event = parser.next_event()
        if index < len(LITERAL) - 1:
            assert event is None
    assert event == RawFetch(LITERAL, 4)


@pytest.mark.parametrize(
    "odd", [b"* 03 FETCH (UID 1)\r\n", b"*  3 FETCH (UID 1)\r\n", b"* 3 FETCH UID\r\n"]
)
def test_odd_fetch_forms_are_still_tokenized(odd: bytes):
    (event,) = _events(odd, lazy=True)
    assert not isinstance(event, RawFetch)


def test_head_uid_reads_only_a_uid_after_simple_items():
    assert int(_HEAD_UID.match(ENVELOPE)[1]) == 17
    assert int(_HEAD_UID.match(LITERAL)[1]) == 18
    # a "UID 5 " inside a string is not the UID item
    assert _HEAD_UID.match(b'* 1 FETCH (ENVELOPE ("UID 5 " NIL) UID 7)\r\n') is None
    assert _HEAD_UID.match(b"* 1 FETCH (FLAGS (\\Seen))\r\n") is None


def _stand_ins_of(items: bytes, uid_command: bool = True):
    args = tokenize(b"1:* " + items)
    requested = parse_fetch_request(args).items
    tokens, _ = _upstream_fetch_items(args[1], requested, uid_command, None)
    return _stand_ins(tokens, requested)


WHOLE_KEY = item_key(FetchItem("BODY", Section(), (0, 1)))


@pytest.mark.parametrize(
    ("items", "sent", "stands_for"),
    [
        (b"(BODY.PEEK[])", b"BODY.PEEK[]<0.1>", FetchItem("BODY", Section(), peek=True)),
        (b"(FLAGS BODY[])", b"BODY[]<0.1>", FetchItem("BODY", Section())),
        # RFC822 sets \Seen: its stand-in must too, so no .PEEK
        (b"RFC822", b"BODY[]<0.1>", FetchItem("RFC822")),
    ],
)
def test_stand_ins_replace_whole_message_items(items: bytes, sent: bytes, stands_for: FetchItem):
    result = _stand_ins_of(items)
    assert result is not None
    tokens, substituted = result
    assert Atom(sent) in tokens
    assert substituted == {WHOLE_KEY: stands_for}
    assert stands_for.response_name() in (b"BODY[]", b"RFC822")


def test_stand_ins_keep_the_other_items_and_add_uid_to_a_plain_fetch():
    result = _stand_ins_of(b"(ENVELOPE BODY.PEEK[HEADER] BODY.PEEK[])", uid_command=False)
    assert result is not None
    tokens, _ = result
    text = serialize(tokens)
    assert text == b"ENVELOPE BODY.PEEK[HEADER] BODY.PEEK[]<0.1> UID"


@pytest.mark.parametrize(
    "items",
    [
        b"(FLAGS ENVELOPE)",  # nothing to stand in for
        b"(BODY.PEEK[]<0.10>)",  # the client's own partial is already small
        b"(BODY.PEEK[] BODY.PEEK[]<0.10>)",  # both would come back as BODY[]<0>
        b"(BODY.PEEK[] RFC822)",  # two stand-ins with one response name
    ],
)
def test_no_stand_ins_when_ambiguous_or_useless(items: bytes):
    assert _stand_ins_of(items) is None


def test_cache_tracks_viewed_uids_through_eviction_and_invalidation():
    from localproxy.imap.view import MessageView

    message = b"Subject: x\r\n\r\n" + b"a" * 1000 + b"\r\n"
    cache = ViewCache(max_bytes=2 * 2 * len(message) + 10)  # room for two views
    keys = [ViewKey("acct", b"INBOX", 1, uid) for uid in (1, 2, 3)]
    for key in keys:
        cache._store(key, MessageView(message))
    assert set(cache.viewed_uids("acct", b"INBOX", 1)) == {2, 3}  # 1 was evicted
    assert not cache.viewed_uids("acct", b"INBOX", 2)
    cache.invalidate("acct")
    assert not cache.viewed_uids("acct", b"INBOX", 1)
    assert cache.total_bytes == 0
