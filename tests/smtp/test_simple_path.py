"""The fast path for MAIL/RCPT addresses gives the full parser's answer, or none."""

from __future__ import annotations

from email._header_value_parser import get_angle_addr

from hypothesis import example, given
from hypothesis import strategies as st

from localproxy.smtp.server import _parse_path, simple_path

PIECES = st.sampled_from(
    [
        "a",
        "Z",
        "0",
        ".",
        "@",
        "<",
        ">",
        " ",
        '"',
        "(",
        ")",
        "[",
        "]",
        ":",
        ",",
        "\\",
        "-",
        "+",
        "=",
        "é",
        "\t",
        "SIZE=10",
        " BODY=8BITMIME",
        "example.org",
        "x.y",
    ]
)


TEXT = st.lists(PIECES, max_size=8).map("".join)
ATOMS = st.lists(st.sampled_from(["a", "Z", "0", ".", "+", "-", "_", "é"]), min_size=1).map("".join)
PATHS = (
    st.builds("<{}@{}>{}".format, ATOMS, ATOMS, TEXT)
    | st.builds("<{}@{}>{}".format, TEXT, TEXT, TEXT)
    | st.builds("".join, st.lists(PIECES))
)


@given(PATHS)
@example("<alice@example.org>")
@example("<alice@example.org> SIZE=1000 BODY=8BITMIME")
@example("<a.b+tag@sub.example.org>")
@example("<a..b@example.org>")
@example("<.a@example.org>")
@example("<a@example..org>")
@example("<a@-example.org>")
def test_fast_path_agrees_with_the_full_parser(arg: str) -> None:
    fast = simple_path(arg)
    if fast is not None:
        assert fast == _parse_path(arg)


def test_fast_path_takes_the_usual_forms() -> None:
    assert simple_path("<alice@example.org>") == ("alice@example.org", "")
    assert simple_path("<bob+x@mail.example.net> SIZE=9") == ("bob+x@mail.example.net", "SIZE=9")
    for unusual in ('<"a b"@example.org>', "<@relay:a@example.org>", "<a@[127.0.0.1]>", "<>"):
        assert simple_path(unusual) is None
    address, rest = get_angle_addr('<"a b"@example.org>')
    assert _parse_path('<"a b"@example.org>') == (address.addr_spec, rest)
