"""The status snapshot the daemon reports, and its rich rendering for `localproxy status`.

The daemon fills a Snapshot and sends `snapshot.to_json()` over its control socket; the
status command turns it back with `Snapshot.from_json()` and prints `render(snapshot)`.
Rendering is a pure function of the snapshot (and the clock passed in), so every
colour decision can be tested without a daemon. Times are timezone-aware, in UTC on
the wire, and shown in the viewer's local time.
"""

from __future__ import annotations

import json
import shlex
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

SCHEMA_VERSION = 1
EXIT_NOT_RUNNING = 3  # LSB "program is not running"
CERT_WARNING_DAYS = 14
KEY_WARNING_DAYS = 30  # the same threshold `localproxy keys list` uses
OUTBOX_STALE_AFTER = timedelta(hours=1)  # a queued item this old means delivery is stuck
RECENT_EVENTS = 10
EARLIER_ERRORS = 5

OK, WARN, BAD, NEUTRAL = "green", "yellow", "red", "default"
_SEVERITY = {NEUTRAL: 0, OK: 0, WARN: 1, BAD: 2}
_LEVEL_STYLES = {"error": BAD, "warning": WARN}


class SnapshotError(ValueError):
    """JSON that is not a status snapshot this version understands."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Listener:
    """One local port the mail client connects to."""

    kind: str  # "imap", "smtp", "imaps" or "smtps"
    host: str
    port: int
    tls: bool  # local TLS (implicit TLS or STARTTLS offered to the client)


@dataclass(frozen=True)
class UpstreamStatus:
    """What the daemon last learnt about one provider server."""

    host: str
    port: int
    security: str  # "tls" or "starttls"
    reachable: bool | None = None  # None: not checked yet
    checked_at: datetime | None = None
    tls_version: str | None = None  # e.g. "TLSv1.3"
    issuer: str | None = None  # the server certificate's issuer, e.g. "Let's Encrypt R11"
    expires_at: datetime | None = None  # the server certificate's notAfter
    error: str | None = None  # why the last check failed


@dataclass(frozen=True)
class Counters:
    sent_encrypted: int = 0
    sent_signed: int = 0
    sent_plain: int = 0
    received_decrypted: int = 0
    received_verified: int = 0
    received_failed: int = 0


@dataclass(frozen=True)
class OutboxStatus:
    queued: int = 0
    failed: int = 0  # given up on; needs a person
    oldest: datetime | None = None  # when the oldest queued item was accepted


@dataclass(frozen=True)
class KeyStatus:
    """The account's own OpenPGP key."""

    fingerprint: str
    expires: datetime | None = None
    problem: str | None = None  # e.g. "revoked", "no encryption subkey"; None when usable


@dataclass(frozen=True)
class Event:
    time: datetime
    level: str  # "info", "warning" or "error"
    account: str | None
    kind: str  # short machine word, e.g. "smtp.sent", "upstream.unreachable"
    message: str


@dataclass(frozen=True)
class AccountStatus:
    name: str
    addresses: list[str]
    listeners: list[Listener] = field(default_factory=list)
    upstream: dict[str, UpstreamStatus] = field(default_factory=dict)  # "imap", "smtp"
    sessions: dict[str, int] = field(default_factory=dict)  # open client sessions per kind
    counters_total: Counters = field(default_factory=Counters)  # since the daemon started
    counters_today: Counters = field(default_factory=Counters)  # since local midnight
    outbox: OutboxStatus = field(default_factory=OutboxStatus)
    own_key: KeyStatus | None = None  # None: the account has no own key
    recipients_known: int = 0  # certificates of other people in the key store
    key_warning: str | None = None  # key store caveat, e.g. store key in a fallback file


@dataclass(frozen=True)
class Snapshot:
    version: str  # localproxy version of the daemon
    pid: int
    started_at: datetime
    now: datetime  # the daemon's clock when it took the snapshot
    config_path: Path
    accounts: list[AccountStatus] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)  # oldest first
    warnings: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_encode(self), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"status snapshot is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise SnapshotError("status snapshot is not a JSON object")
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            raise SnapshotError(
                f"status snapshot schema {schema!r} is not {SCHEMA_VERSION}: the daemon and "
                "this command come from different localproxy versions; restart the daemon"
            )
        return _decode(cls, data, "snapshot")


# --------------------------------------------------------------------------- JSON codec


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(kind: Any, value: Any, where: str) -> Any:
    """Turn JSON data into `kind`, naming the exact place of any mismatch."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if origin is list:
        return [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(_of(list, value, where))]
    if origin is dict:
        items = _of(dict, value, where).items()
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in items}
    if is_dataclass(kind):
        return _decode_dataclass(kind, _of(dict, value, where), where)
    if kind is datetime:
        return _decode_time(_of(str, value, where), where)
    if kind is Path:
        return Path(_of(str, value, where))
    return _of(kind, value, where)


def _decode_dataclass(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    # Unknown keys are ignored so a daemon may add fields without breaking older viewers.
    values = {k: _decode(hints[k], v, f"{where}.{k}") for k, v in data.items() if k in known}
    try:
        return cls(**values)
    except TypeError:
        required = (f for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
        missing = sorted(f.name for f in required if f.name not in data)
        raise SnapshotError(f"{where}: missing {', '.join(missing)}") from None


def _decode_time(text: str, where: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SnapshotError(f"{where}: {text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # the wire format is UTC


def _of(kind: type, value: Any, where: str) -> Any:
    # bool is an int in Python but never a count or a port in a snapshot.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SnapshotError(f"{where}: expected {kind.__name__}, found {value!r}")
    return value


# --------------------------------------------------------------------------- colour decisions


def days_until(when: datetime, now: datetime) -> int:
    """Whole days left (negative once past): 13.9 days left is 13."""
    return (when - now).days


def expiry_style(days: int | None, warn_days: int = CERT_WARNING_DAYS) -> str:
    if days is None:
        return NEUTRAL
    if days < 0:
        return BAD
    return WARN if days < warn_days else OK


def upstream_style(upstream: UpstreamStatus, now: datetime) -> str:
    if upstream.reachable is False:
        return BAD
    if upstream.reachable is None:
        return NEUTRAL  # not checked yet: nothing to alarm about, nothing to vouch for
    if upstream.expires_at is None:
        return OK
    return expiry_style(days_until(upstream.expires_at, now))


def outbox_style(outbox: OutboxStatus, now: datetime) -> str:
    if outbox.failed:
        return BAD
    if outbox.queued and outbox.oldest and now - outbox.oldest > OUTBOX_STALE_AFTER:
        return WARN
    return OK


def own_key_style(key: KeyStatus | None, now: datetime) -> str:
    if key is None or key.problem:
        return BAD
    if key.expires is None:
        return OK
    return expiry_style(days_until(key.expires, now), KEY_WARNING_DAYS)


def account_style(account: AccountStatus, now: datetime) -> str:
    """The worst state in the account, for its panel border."""
    styles = [upstream_style(u, now) for u in account.upstream.values()]
    styles += [outbox_style(account.outbox, now), own_key_style(account.own_key, now)]
    styles += [WARN] if account.key_warning else []
    return worst(styles)


def worst(styles: list[str]) -> str:
    return max(styles, key=lambda s: _SEVERITY.get(s, 0), default=OK)


# --------------------------------------------------------------------------- rendering


def render(snapshot: Snapshot, now: datetime | None = None, tz: tzinfo | None = None) -> Group:
    """The whole status view; `now` defaults to the daemon's clock, `tz` to local time."""
    now = now or snapshot.now
    clock = _Clock(now, tz)
    parts: list[RenderableType] = [_header(snapshot, clock)]
    parts += [Text(f"warning: {w}", style=WARN) for w in snapshot.warnings]
    parts += [_account_panel(a, clock, snapshot.events) for a in snapshot.accounts] or [
        Text("No accounts configured: add an [[account]] to the config file.", style=WARN)
    ]
    parts += _event_panels(snapshot.events, clock)
    return Group(*parts)


def render_not_running(config_path: Path | None) -> Panel:
    config = f" --config {shlex.quote(str(config_path))}" if config_path else ""
    body = Text.assemble(
        ("localproxy is not running", f"bold {BAD}"),
        f" (no daemon answered{f' for {config_path}' if config_path else ''}).\n\n",
        "Start it in the background (once `localproxy service install` has set it up):\n",
        ("  localproxy service start\n", "bold"),
        "or in this terminal:\n",
        (f"  localproxy{config} run", "bold"),
    )
    return Panel(body, title="localproxy status", border_style=BAD, expand=False)


@dataclass(frozen=True)
class _Clock:
    """`now` and the viewer's time zone, for consistent time and age text."""

    now: datetime
    tz: tzinfo | None

    def time(self, when: datetime) -> str:
        local, today = when.astimezone(self.tz), self.now.astimezone(self.tz)
        return f"{local:%H:%M:%S}" if local.date() == today.date() else f"{local:%Y-%m-%d %H:%M}"

    def date(self, when: datetime) -> str:
        return f"{when.astimezone(self.tz):%Y-%m-%d}"

    def ago(self, when: datetime) -> str:
        return f"{self.time(when)} ({age(self.now - when)} ago)"


def age(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _header(snapshot: Snapshot, clock: _Clock) -> Text:
    return Text.assemble(
        (f"localproxy {snapshot.version}", "bold"),
        (" running", f"bold {OK}"),
        f" since {clock.time(snapshot.started_at)} (up {age(clock.now - snapshot.started_at)})",
        f" · pid {snapshot.pid} · config {snapshot.config_path}",
    )


def _account_panel(account: AccountStatus, clock: _Clock, events: list[Event]) -> Panel:
    rows: list[RenderableType] = [
        _listeners_line(account.listeners),
        _upstream_table(account.upstream, clock),
        _sessions_line(account.sessions),
        _counters_table(account.counters_total, account.counters_today),
        _outbox_line(account.outbox, clock),
        _own_key_line(account, clock),
        Text(f"Recipients known: {account.recipients_known}"),
    ]
    if account.key_warning:
        rows.append(Text(f"warning: {account.key_warning}", style=WARN))
    rows += _last_events(account.name, events, clock)
    title = Text.assemble((account.name, "bold"), f" ({', '.join(account.addresses) or '-'})")
    border = account_style(account, clock.now)
    return Panel(Group(*rows), title=title, title_align="left", border_style=border)


def _last_events(name: str, events: list[Event], clock: _Clock) -> list[Text]:
    """The account's newest event, and its newest error when that is another one."""
    own = [e for e in events if e.account == name]
    errors = [e for e in own if e.level == "error"]
    shown = [("Last event", own[-1])] if own else []
    if errors and errors[-1] is not own[-1]:
        shown.append(("Last error", errors[-1]))
    return [
        Text.assemble(
            f"{label}: {clock.time(event.time)} ",
            (event.message, _LEVEL_STYLES.get(event.level, NEUTRAL)),
        )
        for label, event in shown
    ]


def _listeners_line(listeners: list[Listener]) -> Text:
    line = Text("Listening: ")
    if not listeners:
        return line.append("nothing", style=WARN)
    for i, listener in enumerate(listeners):
        line.append(" · " if i else "")
        line.append(f"{listener.kind} {_address(listener.host, listener.port)}", style="bold")
        line.append(" (local TLS)" if listener.tls else " (no TLS)")
    return line


def _upstream_table(upstream: dict[str, UpstreamStatus], clock: _Clock) -> Table | Text:
    """One column per server, so long host names and errors have room at 120 columns."""
    if not upstream:
        return Text("Upstream: none reported")
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
    table.add_column("Upstream", style="bold", no_wrap=True)
    for kind in upstream:
        table.add_column(kind.upper(), overflow="fold", ratio=1)
    servers = list(upstream.values())
    rows: list[tuple[str, Callable[[UpstreamStatus], Text]]] = [
        ("Server", lambda u: Text(f"{_address(u.host, u.port)} ({u.security})")),
        ("State", _reachability),
        ("TLS", lambda u: Text(u.tls_version or "-")),
        ("Cert issuer", lambda u: Text(u.issuer or "-")),
        ("Cert expires", lambda u: _expiry(u.expires_at, clock, CERT_WARNING_DAYS)),
        ("Checked", lambda u: Text(clock.ago(u.checked_at) if u.checked_at else "not yet")),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(u) for u in servers))
    return table


def _reachability(server: UpstreamStatus) -> Text:
    if server.reachable is None:
        return Text("not checked yet")
    if server.reachable:
        return Text("reachable", style=OK)
    return Text(f"unreachable: {server.error or 'no reason given'}", style=BAD)


def _expiry(expires: datetime | None, clock: _Clock, warn_days: int) -> Text:
    if expires is None:
        return Text("-")
    days = days_until(expires, clock.now)
    left = f"expired {_days(-days)} ago" if days < 0 else f"in {_days(days)}"
    return Text(f"{clock.date(expires)} ({left})", style=expiry_style(days, warn_days))


def _days(count: int) -> str:
    return "1 day" if count == 1 else f"{count} days"


def _sessions_line(sessions: dict[str, int]) -> Text:
    counts = " · ".join(f"{kind} {count}" for kind, count in sessions.items())
    return Text(f"Sessions open: {counts or 'none'}")


def _counters_table(total: Counters, today: Counters) -> Table:
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
    table.add_column("Messages", style="bold", no_wrap=True)
    names = [f.name for f in fields(Counters)]
    for name in names:
        table.add_column(name.replace("_", "\n"), justify="right")  # "sent\nencrypted"
    for label, counters in (("since start", total), ("today", today)):
        cells = [_count(name, getattr(counters, name)) for name in names]
        table.add_row(Text(label), *cells)
    return table


def _count(name: str, value: int) -> Text:
    return Text(str(value), style=BAD if name == "received_failed" and value else NEUTRAL)


def _outbox_line(outbox: OutboxStatus, clock: _Clock) -> Text:
    text = f"{outbox.queued} queued, {outbox.failed} failed"
    if outbox.oldest:
        text += f", oldest {age(clock.now - outbox.oldest)} old (since {clock.time(outbox.oldest)})"
    return Text("Outbox: ").append(text, style=outbox_style(outbox, clock.now))


def _own_key_line(account: AccountStatus, clock: _Clock) -> Text:
    key, line = account.own_key, Text("Own key: ")
    generate = f"run `localproxy keys generate {account.name}`"
    if key is None:
        return line.append(f"none: {generate}", style=BAD)
    line.append(spaced_fingerprint(key.fingerprint), style="bold")
    if key.problem:
        return line.append(f" {key.problem}\n  {generate}", style=BAD)
    if key.expires is None:
        return line.append(" (does not expire)", style=OK)
    line.append(" expires ").append(_expiry(key.expires, clock, KEY_WARNING_DAYS))
    if days_until(key.expires, clock.now) < 0:
        line.append(f"\n  {generate}", style=BAD)  # its own line: the command must not wrap
    return line


def _event_panels(events: list[Event], clock: _Clock) -> list[Panel]:
    recent = events[-RECENT_EVENTS:]
    older = events[: max(0, len(events) - RECENT_EVENTS)]
    # An error that scrolled out of the recent window still matters to a person.
    earlier_errors = [e for e in older if e.level == "error"]
    panels = [Panel(_events_table(recent, clock), title="Recent events", title_align="left")]
    if earlier_errors:
        table = _events_table(earlier_errors[-EARLIER_ERRORS:], clock)
        panels.append(Panel(table, title="Earlier errors", title_align="left", border_style=BAD))
    return panels


def _events_table(events: list[Event], clock: _Clock) -> Table | Text:
    if not events:
        return Text("none yet")
    table = Table(expand=True, show_edge=False, box=None)
    for column in ("Time", "Level", "Account", "Event", "Message"):
        table.add_column(column, overflow="fold", ratio=4 if column == "Message" else None)
    for event in events:
        style = _LEVEL_STYLES.get(event.level, NEUTRAL)
        table.add_row(
            Text(clock.time(event.time)),
            Text(event.level, style=style),
            Text(event.account or "-"),
            Text(event.kind),
            Text(event.message, style=style),
        )
    return table


def spaced_fingerprint(fingerprint: str) -> str:
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
