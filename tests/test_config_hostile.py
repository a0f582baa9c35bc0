"""Hostile config files: load_config on random and mutated TOML text.

Starting from config.example.toml: byte edits (cuts, duplicated lines, stray brackets,
quotes, invalid UTF-8), values swapped for hostile ones (wrong types, huge and non-finite
numbers, NUL, paths that cannot be resolved, deep nesting), tables repeated, plus random
text. Property: every file gives a Config or a ConfigError whose message names the
problem, within a time limit; nothing else escapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localproxy.config import Config, ConfigError, load_config
from tests.harness.hostile import mutations, time_limit

HOSTILE = settings(max_examples=300, deadline=2000)
EXAMPLE = (Path(__file__).resolve().parent.parent / "config.example.toml").read_bytes()
# Every `key = value` line, also the commented ones, so that optional keys get values too.
ASSIGNMENT = re.compile(rb"^(?:# ?)?([a-z_]+) = .*$", re.M)
ASSIGNMENTS = [m.span() for m in ASSIGNMENT.finditer(EXAMPLE)]

FRAGMENTS = [
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b'"',
    b"'''",
    b'"""',
    b"\\",
    b"\\u0000",
    b"\n",
    b"\r",
    b"#",
    b".",
    b"{",
    b"}",
    b",",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"[account]\n",
    b"[[account]]\n",
    b"[proxy]\n",
    b"[account.upstream.imap]\n",
    b"[policy.domain.x]\n",
]
VALUES = [
    b"-1",
    b"0",
    b"65536",
    b"99999999999999999999999999",
    b"1e400",
    b"nan",
    b"-inf",
    b"0.5",
    b"true",
    b'""',
    b'" "',
    b'"\\u0000"',
    b'"::1"',
    b'"none"',
    b"[]",
    b'[1, "a", []]',
    b"{}",
    b"{ a = 1 }",
    b"1979-05-27T07:32:00Z",
    b"07:32:00",
    b'"' + b"x" * 20_000 + b'"',
    b"[" * 2000 + b"]" * 2000,
    b"{ a = " * 2000 + b"1" + b" }" * 2000,
]


PATH_KEYS = {b"data_dir", b"smime_ca_file", b"ca_file", b"client_cert", b"client_key"}
PATHS = [
    b'"~"',
    b'"~nosuchuser-localproxy/x"',
    b'"/"',
    b'"."',
    b'"/dev/null"',
    b'"no/such/file.pem"',
    b'"config.toml"',
    b'"a\\u0000b"',
    b'"' + b"x" * 300 + b'"',  # over NAME_MAX
]


PATH_ASSIGNMENTS = [
    span for span in ASSIGNMENTS if ASSIGNMENT.match(EXAMPLE, *span)[1] in PATH_KEYS
]


@st.composite
def swapped_values(draw: st.DrawFn, paths_only: bool = False) -> bytes:
    """The example with 1-4 of its values (commented or not) replaced by hostile ones;
    a path gets a hostile path or, unless paths_only, any hostile value."""
    text = EXAMPLE
    spans = PATH_ASSIGNMENTS if paths_only else ASSIGNMENTS
    chosen = draw(st.lists(st.sampled_from(spans), min_size=1, max_size=4, unique=True))
    for start, end in sorted(chosen, reverse=True):
        key = ASSIGNMENT.match(text, start, end)[1]
        values = PATHS if key in PATH_KEYS and (paths_only or draw(st.booleans())) else VALUES
        text = text[:start] + key + b" = " + draw(st.sampled_from(values)) + text[end:]
    return text


def repeated_accounts(count: int) -> bytes:
    """More [[account]] tables, all with the same name and ports."""
    return EXAMPLE + EXAMPLE[EXAMPLE.index(b"[[account]]") :] * count


hostile_configs = st.one_of(
    swapped_values(),
    swapped_values(paths_only=True),
    mutations(EXAMPLE, FRAGMENTS, max_steps=4),
    swapped_values().flatmap(lambda text: mutations(text, FRAGMENTS, max_steps=2)),
    st.sampled_from([1, 2, 300]).map(repeated_accounts),
    st.text(max_size=300).map(str.encode),
    st.binary(max_size=300),
)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config") / "config.toml"


def check_load(path: Path, text: bytes) -> None:
    path.write_bytes(text)
    with time_limit():
        try:
            config = load_config(path)
        except ConfigError as error:
            assert error.problems and str(error).startswith(str(path))
            return
    assert isinstance(config, Config) and config.source == path


def test_the_example_loads(config_path: Path):
    config_path.write_bytes(EXAMPLE)
    config = load_config(config_path)
    assert [a.name for a in config.accounts] == ["personal"]


@HOSTILE
@given(text=hostile_configs)
def test_hostile_config_text_gives_a_config_or_a_config_error(config_path: Path, text: bytes):
    check_load(config_path, text)


# --------------------------------------------------------------------------- regressions


def test_deeply_nested_arrays_are_a_config_error(config_path: Path):
    """tomllib recurses per level: this used to escape as RecursionError."""
    for value in (b"[" * 2000 + b"]" * 2000, b"{ a = " * 2000 + b"1" + b" }" * 2000):
        config_path.write_bytes(EXAMPLE.replace(b"timeout = 30", b"timeout = " + value))
        with pytest.raises(ConfigError, match="nested too deeply"):
            load_config(config_path)


def with_value(key: bytes, value: bytes) -> bytes:
    """The example with the (maybe commented) `key = ...` line set to value."""
    line = re.search(rb"^(# )?" + key + rb" = .*$", EXAMPLE, re.M)[0]
    return EXAMPLE.replace(line, key + b" = " + value, 1)


@pytest.mark.parametrize("key", [b"data_dir", b"smime_ca_file", b"ca_file"])
def test_a_home_directory_of_an_unknown_user_is_a_config_error(config_path: Path, key: bytes):
    """Path.expanduser raises RuntimeError for ~name of an unknown user; it escaped."""
    config_path.write_bytes(with_value(key, b'"~nosuchuser-localproxy/x"'))
    with pytest.raises(ConfigError, match="known users"):
        load_config(config_path)


@pytest.mark.parametrize("key", [b"smime_ca_file", b"ca_file", b"client_cert"])
def test_a_file_name_too_long_is_a_config_error(config_path: Path, key: bytes):
    """Path.exists() raises OSError (ENAMETOOLONG) for it; found by the suite above."""
    config_path.write_bytes(with_value(key, b'"' + b"x" * 20_000 + b'"'))
    with pytest.raises(ConfigError, match="cannot be looked up"):
        load_config(config_path)
