"""The status snapshot schema and its rendering, from hand-built snapshots."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console, RenderableType

from localproxy.status import (
    BAD,
    EXIT_NOT_RUNNING,
    NEUTRAL,
    OK,
    RECENT_EVENTS,
    SCHEMA_VERSION,
    WARN,
    AccountStatus,
    Counters,
    Event,
    KeyStatus,
    Listener,
    OutboxStatus,
    Snapshot,
    SnapshotError,
    UpstreamStatus,
    account_style,
    age,
    expiry_style,
    outbox_style,
    own_key_style,
    render,
    render_not_running,
    upstream_style,
    worst,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"


def text_of(renderable: RenderableType) -> str:
    console = Console(width=120, record=True, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def shown(snapshot: Snapshot) -> str:
    return text_of(render(snapshot, tz=UTC))


def account(**changes) -> AccountStatus:
    values = dict(
        name="personal",
        addresses=["alice@example.org"],
        listeners=[
            Listener("imap", "127.0.0.1", 1143, tls=False),
            Listener("smtps", "127.0.0.1", 1465, tls=True),
        ],
        upstream={
            "imap": UpstreamStatus(
                "imap.example.org",
                993,
                "tls",
                reachable=True,
                checked_at=NOW - timedelta(minutes=2),
                tls_version="TLSv1.3",
                issuer="Let's Encrypt R11",
                expires_at=NOW + timedelta(days=40),
            ),
            "smtp": UpstreamStatus(
                "smtp.example.org",
                587,
                "starttls",
                reachable=False,
                checked_at=NOW,
                error="connection refused",
            ),
        },
        sessions={"imap": 2, "smtp": 1},
        counters_total=Counters(11, 12, 13, 14, 15, 16),
        counters_today=Counters(1, 2, 3, 4, 5, 0),
        outbox=OutboxStatus(queued=3, failed=1, oldest=NOW - timedelta(hours=2, minutes=5)),
        own_key=KeyStatus(FINGERPRINT, expires=NOW + timedelta(days=300)),
        recipients_known=42,
        key_warning=None,
    )
    return AccountStatus(**{**values, **changes})


def snapshot(**changes) -> Snapshot:
    values = dict(
        version="0.1.0",
        pid=4242,
        started_at=NOW - timedelta(hours=3),
        now=NOW,
        config_path=Path("/home/alice/.config/localproxy/config.toml"),
        accounts=[account()],
        events=[
            Event(NOW - timedelta(minutes=5), "info", "personal", "smtp.sent", "sent to bob"),
            Event(NOW - timedelta(minutes=3), "error", None, "upstream", "smtp refused"),
            Event(NOW - timedelta(minutes=1), "warning", "personal", "key", "bob's key expires"),
        ],
        warnings=["config changed on disk; restart to apply"],
    )
    return Snapshot(**{**values, **changes})


# --------------------------------------------------------------------------- what is shown


def test_header_says_running_since_when_with_pid_and_config():
    text = shown(snapshot())
    assert "localproxy 0.1.0 running since 09:00:00 (up 3 h 0 min)" in text
    assert "pid 4242" in text and "/home/alice/.config/localproxy/config.toml" in text
    assert "warning: config changed on disk; restart to apply" in text


def test_account_panel_shows_listeners_and_upstream_tls():
    text = shown(snapshot())
    assert "personal (alice@example.org)" in text
    assert "imap 127.0.0.1:1143 (no TLS)" in text and "smtps 127.0.0.1:1465 (local TLS)" in text
    assert "imap.example.org:993" in text and "smtp.example.org:587" in text
    assert "TLSv1.3" in text and "Let's Encrypt R11" in text
    assert "2025-04-10 (in 40 days)" in text
    assert "reachable" in text and "11:58:00 (2 min ago)" in text
    assert "unreachable: connection refused" in text


def test_sessions_counters_outbox_and_keys():
    text = shown(snapshot())
    assert "Sessions open: imap 2 · smtp 1" in text
    for header in ("encrypted", "signed", "plain", "decrypted", "verified", "failed"):
        assert header in text
    assert numbers_on_row(text, "since start") == [11, 12, 13, 14, 15, 16]
    assert numbers_on_row(text, "today") == [1, 2, 3, 4, 5, 0]
    assert "Outbox: 3 queued, 1 failed, oldest 2 h 5 min old (since 09:55:00)" in text
    assert "0123 4567 89AB CDEF 0123 4567 89AB CDEF 0123 4567" in text
    assert "expires 2025-12-26 (in 300 days)" in text
    assert "Recipients known: 42" in text


def numbers_on_row(text: str, label: str) -> list[int]:
    (line,) = [line for line in text.splitlines() if f" {label} " in line]
    return [int(n) for n in re.findall(r"\b\d+\b", line)]


def test_events_in_order_with_times_levels_and_accounts():
    text = shown(snapshot()).split("Recent events")[1]
    lines = [line for line in text.splitlines() if re.search(r"\d\d:\d\d:\d\d ", line)]
    events = [line for line in lines if any(m in line for m in ("bob", "refused"))]
    assert [re.search(r"\d\d:\d\d:\d\d", line)[0] for line in events] == [
        "11:55:00",
        "11:57:00",
        "11:59:00",
    ]
    assert "info" in events[0] and "personal" in events[0] and "sent to bob" in events[0]
    assert "error" in events[1] and "smtp refused" in events[1]
    assert "warning" in events[2]


def test_each_account_panel_shows_its_last_event_and_last_error():
    events = [
        Event(NOW - timedelta(hours=2), "error", "personal", "send-failed", "gave up on carol"),
        Event(NOW - timedelta(minutes=9), "error", "work", "auth-failed", "work's problem"),
        Event(NOW - timedelta(minutes=5), "info", "personal", "reload", "config reloaded"),
    ]
    panel = text_of(render(snapshot(events=events), tz=UTC)).split("Recent events")[0]
    assert "Last event: 11:55:00 config reloaded" in panel
    assert "Last error: 10:00:00 gave up on carol" in panel
    assert "work's problem" not in panel, "another account's event stays out"


def test_only_the_recent_events_are_listed_and_older_errors_are_kept_apart():
    old_error = Event(NOW - timedelta(hours=1), "error", "personal", "smtp", "relay said 554")
    infos = [
        Event(NOW - timedelta(minutes=30 - i), "info", None, "imap", f"tick {i}")
        for i in range(RECENT_EVENTS + 2)
    ]
    text = shown(snapshot(events=[old_error, *infos]))
    assert "tick 0" not in text and "tick 1 " not in text and f"tick {RECENT_EVENTS + 1}" in text
    earlier = text.split("Earlier errors")[1]
    assert "relay said 554" in earlier and "11:00:00" in earlier


def test_expiry_counts_days_in_words():
    soon = UpstreamStatus("h", 993, "tls", reachable=True, expires_at=NOW + timedelta(days=1.5))
    text = shown(snapshot(accounts=[account(upstream={"imap": soon})]))
    assert "2025-03-03 (in 1 day)" in text


def test_events_from_another_day_show_the_date():
    yesterday = Event(NOW - timedelta(days=1), "info", None, "start", "started")
    assert "2025-02-28 12:00" in shown(snapshot(events=[yesterday]))


def test_missing_own_key_says_how_to_make_one():
    text = shown(snapshot(accounts=[account(own_key=None)]))
    assert "Own key: none: run `localproxy keys generate personal`" in text


def test_expired_or_broken_own_key_says_how_to_replace_it():
    expired = KeyStatus(FINGERPRINT, expires=NOW - timedelta(days=3))
    text = shown(snapshot(accounts=[account(own_key=expired)]))
    assert "expires 2025-02-26 (expired 3 days ago)" in text
    assert "run `localproxy keys generate personal`" in text
    revoked = KeyStatus(FINGERPRINT, problem="revoked")
    text = shown(snapshot(accounts=[account(own_key=revoked)]))
    assert "4567 revoked" in text and "run `localproxy keys generate personal`" in text


def test_key_store_fallback_warning_is_shown():
    warning = "no OS keyring available: the store key is in /data/store.key (mode 0600)"
    text = shown(snapshot(accounts=[account(key_warning=warning)]))
    assert f"warning: {warning}" in text


def test_text_from_the_daemon_is_never_read_as_markup():
    event = Event(NOW, "error", None, "smtp", "server said [bold]no[/bold] [red]")
    text = shown(snapshot(events=[event]))
    assert "server said [bold]no[/bold] [red]" in text


def test_an_empty_snapshot_renders():
    text = shown(snapshot(accounts=[], events=[], warnings=[]))
    assert "No accounts configured" in text and "none yet" in text


def test_an_account_with_every_optional_field_empty_renders():
    bare = AccountStatus(
        name="bare", addresses=[], upstream={"imap": UpstreamStatus("h", 1, "tls")}
    )
    text = shown(snapshot(accounts=[bare], events=[]))
    assert "bare (-)" in text and "Listening: nothing" in text
    assert "not checked yet" in text and "not yet" in text
    assert "Sessions open: none" in text and "Outbox: 0 queued, 0 failed" in text


def test_render_defaults_to_the_snapshot_clock_and_local_time():
    assert "up 3 h 0 min" in text_of(render(snapshot()))
    later = text_of(render(snapshot(), now=NOW + timedelta(hours=1), tz=UTC))
    assert "up 4 h 0 min" in later


def test_not_running_says_so_and_how_to_start_it():
    text = text_of(render_not_running(Path("/home/alice/my config.toml")))
    assert "localproxy is not running" in text and "/home/alice/my config.toml" in text
    assert "localproxy service start" in text
    assert "localproxy --config '/home/alice/my config.toml' run" in text
    assert "localproxy run" in text_of(render_not_running(None))
    assert EXIT_NOT_RUNNING == 3


# --------------------------------------------------------------------------- colour decisions


@pytest.mark.parametrize(
    ("days", "style"),
    [(None, NEUTRAL), (-1, BAD), (0, WARN), (13, WARN), (14, OK), (400, OK)],
)
def test_certificate_expiry_turns_yellow_under_14_days(days, style):
    assert expiry_style(days) == style


def test_key_expiry_uses_its_own_threshold():
    assert expiry_style(20, warn_days=30) == WARN and expiry_style(20) == OK


def test_upstream_style():
    server = UpstreamStatus("h", 993, "tls", reachable=True, expires_at=NOW + timedelta(days=90))
    assert upstream_style(server, NOW) == OK
    soon = UpstreamStatus("h", 993, "tls", reachable=True, expires_at=NOW + timedelta(days=13.9))
    assert upstream_style(soon, NOW) == WARN
    assert upstream_style(UpstreamStatus("h", 993, "tls", reachable=False), NOW) == BAD
    assert upstream_style(UpstreamStatus("h", 993, "tls"), NOW) == NEUTRAL


def test_outbox_style():
    assert outbox_style(OutboxStatus(), NOW) == OK
    assert outbox_style(OutboxStatus(queued=2, oldest=NOW - timedelta(minutes=5)), NOW) == OK
    assert outbox_style(OutboxStatus(queued=2, oldest=NOW - timedelta(hours=2)), NOW) == WARN
    assert outbox_style(OutboxStatus(failed=1), NOW) == BAD


def test_own_key_style():
    assert own_key_style(None, NOW) == BAD
    assert own_key_style(KeyStatus(FINGERPRINT, problem="revoked"), NOW) == BAD
    assert own_key_style(KeyStatus(FINGERPRINT, expires=NOW - timedelta(days=1)), NOW) == BAD
    assert own_key_style(KeyStatus(FINGERPRINT, expires=NOW + timedelta(days=10)), NOW) == WARN
    assert own_key_style(KeyStatus(FINGERPRINT), NOW) == OK


def test_account_border_takes_the_worst_state():
    assert worst([OK, NEUTRAL, WARN]) == WARN and worst([]) == OK
    healthy = account(
        upstream={"imap": UpstreamStatus("h", 993, "tls", reachable=True)},
        outbox=OutboxStatus(),
    )
    assert account_style(healthy, NOW) == OK
    assert account_style(account(key_warning="fallback file"), NOW) == BAD  # smtp unreachable
    from dataclasses import replace

    assert account_style(replace(healthy, key_warning="fallback file"), NOW) == WARN
    assert account_style(replace(healthy, own_key=None), NOW) == BAD


def test_age_is_short_and_human():
    assert [age(timedelta(seconds=s)) for s in (-5, 42, 600, 7500, 200000)] == [
        "0 s",
        "42 s",
        "10 min",
        "2 h 5 min",
        "2 d 7 h",
    ]


# --------------------------------------------------------------------------- JSON


def test_json_round_trip():
    original = snapshot()
    assert Snapshot.from_json(original.to_json()) == original
    data = json.loads(original.to_json())
    assert data["schema"] == SCHEMA_VERSION
    assert data["accounts"][0]["upstream"]["imap"]["expires_at"] == "2025-04-10T12:00:00+00:00"
    assert data["config_path"] == "/home/alice/.config/localproxy/config.toml"


def test_from_json_names_the_exact_place_of_a_bad_value():
    data = json.loads(snapshot().to_json())
    data["accounts"][0]["listeners"][1]["port"] = "1465"
    with pytest.raises(SnapshotError, match=r"snapshot\.accounts\[0\]\.listeners\[1\]\.port"):
        Snapshot.from_json(json.dumps(data))
    data = json.loads(snapshot().to_json())
    data["accounts"][0]["recipients_known"] = True  # a bool is not a count
    with pytest.raises(SnapshotError, match="recipients_known"):
        Snapshot.from_json(json.dumps(data))
    data = json.loads(snapshot().to_json())
    del data["accounts"][0]["name"]
    del data["accounts"][0]["own_key"]  # optional: not reported as missing
    with pytest.raises(SnapshotError, match=r"accounts\[0\]: missing name$"):
        Snapshot.from_json(json.dumps(data))


def test_from_json_rejects_other_schemas_and_non_snapshots():
    data = json.loads(snapshot().to_json())
    data["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(SnapshotError, match="different localproxy versions"):
        Snapshot.from_json(json.dumps(data))
    with pytest.raises(SnapshotError, match="not JSON"):
        Snapshot.from_json("{")
    with pytest.raises(SnapshotError, match="not a JSON object"):
        Snapshot.from_json("[]")
    data["schema"] = SCHEMA_VERSION
    data["started_at"] = "yesterday"
    with pytest.raises(SnapshotError, match="started_at: 'yesterday' is not an ISO 8601 time"):
        Snapshot.from_json(json.dumps(data))


def test_from_json_ignores_unknown_fields_and_reads_naive_times_as_utc():
    data = json.loads(snapshot().to_json())
    data["accounts"][0]["added_later"] = {"x": 1}
    data["now"] = "2025-03-01T12:00:00"
    parsed = Snapshot.from_json(json.dumps(data))
    assert parsed == snapshot()


# --------------------------------------------------------------------------- any snapshot


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
words = st.text(max_size=20)
counts = st.integers(min_value=0, max_value=10**6)
ports = st.integers(min_value=1, max_value=65535)
kinds = st.sampled_from(["imap", "smtp"])
upstreams = st.builds(
    UpstreamStatus,
    host=words,
    port=ports,
    security=st.sampled_from(["tls", "starttls"]),
    reachable=optional(st.booleans()),
    checked_at=optional(times),
    tls_version=optional(words),
    issuer=optional(words),
    expires_at=optional(times),
    error=optional(words),
)
listeners = st.builds(
    Listener, st.sampled_from(["imap", "smtp", "imaps", "smtps"]), words, ports, st.booleans()
)
counters = st.builds(Counters, counts, counts, counts, counts, counts, counts)
accounts = st.builds(
    AccountStatus,
    name=words,
    addresses=st.lists(words, max_size=3),
    listeners=st.lists(
        st.builds(
            Listener,
            st.sampled_from(["imap", "smtp", "imaps", "smtps"]),
            words,
            ports,
            st.booleans(),
        ),
        max_size=4,
    ),
    upstream=st.dictionaries(kinds, upstreams, max_size=2),
    sessions=st.dictionaries(kinds, counts, max_size=2),
    counters_total=counters,
    counters_today=counters,
    outbox=st.builds(OutboxStatus, counts, counts, optional(times)),
    own_key=optional(
        st.builds(
            KeyStatus,
            st.text(alphabet="0123456789ABCDEF", min_size=40, max_size=40),
            optional(times),
            optional(words),
        )
    ),
    recipients_known=counts,
    key_warning=optional(words),
)
events = st.builds(
    Event,
    time=times,
    level=st.sampled_from(["info", "warning", "error"]),
    account=optional(words),
    kind=words,
    message=words,
)
snapshots = st.builds(
    Snapshot,
    version=words,
    pid=st.integers(min_value=1, max_value=2**22),
    started_at=times,
    now=times,
    config_path=st.text(alphabet="abc /.", min_size=1, max_size=20).map(Path),
    accounts=st.lists(accounts, max_size=2),
    events=st.lists(events, max_size=RECENT_EVENTS + 3),
    warnings=st.lists(words, max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(snapshots)
def test_any_snapshot_renders_and_survives_json(any_snapshot):
    assert Snapshot.from_json(any_snapshot.to_json()) == any_snapshot
    assert "localproxy" in text_of(render(any_snapshot, tz=UTC))
