"""`localproxy run`: every account's listeners, the outbox, and the control socket.

One process serves all accounts. It refuses to start twice for the same data
dir (a lock file), names any port that is taken, reloads the config on SIGHUP
without touching unchanged accounts, and shuts down gracefully on
SIGTERM/SIGINT. The CLI talks to it over the control endpoint (control.py: a
Unix socket, mode 0600; loopback TCP with a token file on Windows).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import logging.handlers
import os
import re
import secrets
import signal
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from localproxy import __version__, control
from localproxy.aio import cancel_and_wait
from localproxy.check import check_service
from localproxy.config import Account, load_config
from localproxy.crypto.openpgp import default_engine
from localproxy.imap.relay import ImapProxy, ImapsListenError
from localproxy.incoming import IncomingProcessor
from localproxy.keys.store import KeyStore
from localproxy.localtls import ensure_local_certificate, server_context
from localproxy.mime import content_type_of, parse_headers, split_header_body
from localproxy.notice import failure_report, put_in_inbox
from localproxy.secretbox import SecretBox, SecretBoxError
from localproxy.smtp.outbox import Outbox, OutboxItem, OutboxWorker
from localproxy.smtp.server import Credentials, SmtpHandler, SmtpProxy, outbox_sender
from localproxy.state import State
from localproxy.status import (
    AccountStatus,
    Counters,
    Event,
    KeyStatus,
    Listener,
    OutboxStatus,
    Snapshot,
    UpstreamStatus,
)

log = logging.getLogger(__name__)

CHECK_INTERVAL = 300.0  # seconds between upstream reachability checks
SHUTDOWN_GRACE = 10.0
_COUNTED = {
    "sent-encrypted": "sent_encrypted",
    "sent-signed": "sent_signed",
    "sent-plain": "sent_plain",
    "received-decrypted": "received_decrypted",
    "received-verified": "received_verified",
    "received-failed": "received_failed",
}
_LEVELS = {
    "auth-failed": "warning",
    "queued": "warning",
    "send-failed": "error",
    "upstream-error": "error",
    "received-failed": "warning",
}


class DaemonError(Exception):
    """The daemon cannot run as configured; str() says why and what to do."""


class ListenError(DaemonError):
    """A port is in use, maybe only for now (held by a program that is exiting): a
    restart by the service manager may well succeed."""


# --------------------------------------------------------------------------- logging


_SECRETS = [
    re.compile(r"(?i)\b(AUTH(?:ENTICATE)?\s+\S+\s+)\S+"),
    re.compile(r"(?i)\b(LOGIN\s+\S+\s+)\S+"),
    re.compile(r"(?i)(password[\"']?\s*[:=]\s*)\S+"),
]


class _Redact(logging.Filter):
    """Last line of defence: credentials never reach a log line, whatever logged them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redacted(record.getMessage()), None
        return True


def redacted(text: str) -> str:
    for pattern in _SECRETS:
        text = pattern.sub(r"\1<redacted>", text)
    return text


class OneLineFormatter(logging.Formatter):
    """One line per event, as journald and `grep` expect: a traceback's lines are joined
    with " | " (and redacted like messages: an exception text can quote a command)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if "\n" not in text:
            return text
        return redacted(" | ".join(line for line in text.splitlines() if line.strip()))


TRAFFIC_WARNING = (
    "--log-traffic: protocol lines including message content are logged; credentials stay redacted"
)


def setup_logging(level: str, log_file: Path | None = None, log_traffic: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_file, maxBytes=5 * 2**20, backupCount=5, encoding="utf-8"
            )
        )
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(OneLineFormatter())
        handler.addFilter(_Redact())
        root.addHandler(handler)
    root.setLevel(level.upper())
    smtpd_log = logging.getLogger("mail.log")
    smtpd_log.setLevel(logging.WARNING)  # aiosmtpd logs raw AUTH lines at DEBUG
    smtpd_log.addFilter(_known_smtpd_noise)
    # Protocol lines only on request, whatever the level: they carry message content.
    logging.getLogger("localproxy.traffic").setLevel(
        logging.DEBUG if log_traffic else logging.WARNING
    )
    if log_traffic:
        log.warning(TRAFFIC_WARNING)


def _known_smtpd_noise(record: logging.LogRecord) -> bool:
    """aiosmtpd warns about choices made on purpose (clear AUTH on loopback only) and
    about its own deprecated attribute; neither helps a user."""
    text = record.getMessage()
    return not ("auth_require_tls == False" in text or "login_data is deprecated" in text)


# --------------------------------------------------------------------------- accounts


@dataclass
class AccountRuntime:
    account: Account
    smtp: SmtpProxy
    imap: ImapProxy
    smtps: SmtpProxy | None = None
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    key_warning: str | None = None

    async def close(self) -> None:
        listeners = [self.smtp, self.imap] + ([self.smtps] if self.smtps else [])
        await asyncio.gather(*(x.close() for x in listeners), return_exceptions=True)


class Daemon:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.started_at = datetime.now(UTC)
        self.engine = default_engine()
        self.accounts: dict[str, AccountRuntime] = {}
        self.warnings: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock_fd: int | None = None
        self._control: control.ControlServer | None = None
        self._counter_base: dict[str, dict[str, int]] = {}

    # ----------------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        self._acquire_lock()
        try:
            await self._start()
            self._install_signals()
            log.info(
                "localproxy %s running (pid %d, %d accounts)",
                __version__,
                os.getpid(),
                len(self.accounts),
            )
            await self._stop.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _start(self) -> None:
        data_dir = self.config.proxy.data_dir
        self.state = State(data_dir / "state.sqlite")
        self.store = KeyStore(data_dir, self.engine)
        self.tls = server_context(ensure_local_certificate(data_dir))
        self.outbox = Outbox(data_dir / "outbox.sqlite", SecretBox(self._store_key()))
        # The same dict object is updated on reload, so the worker sees new settings.
        self.outbox_accounts = self._account_map()
        self.worker = OutboxWorker(
            self.outbox,
            outbox_sender(self.outbox_accounts),
            on_failed=self._outbox_failed,
            on_delivered=self._outbox_delivered,
        )
        self._spawn(self.worker.run())
        self._control = await control.serve(self.config, self._command)
        for account in self.config.accounts:
            self.accounts[account.name] = await self._start_account(account)
        self._spawn(self._check_loop())

    def _store_key(self) -> bytes:
        try:
            return self.store.store_key.key  # its warning shows in each account's panel
        except SecretBoxError as exc:
            # Keep serving, loudly: own keys stay locked (nothing is signed or decrypted,
            # and mail that needs them is refused with 451), and the outbox seals with a
            # key that lives only as long as this process.
            self.warnings.append(f"own keys cannot be unlocked: {exc}")
            return secrets.token_bytes(32)

    def _account_map(self) -> dict[str, Account]:
        return {a.name: a for a in self.config.accounts}

    async def _start_account(self, account: Account) -> AccountRuntime:
        on_event = self._sink(account.name)
        self._counter_base.setdefault(account.name, self.state.counters(account.name))
        handler = SmtpHandler(
            account, self.config, self.store, self.engine, self.outbox, on_event=on_event
        )
        handler.outbox_wake = self.worker.wake
        incoming = IncomingProcessor(
            account, self.config, self.store, self.engine, on_event=on_event
        )
        smtp = SmtpProxy(
            handler, host=account.local.host, port=account.local.smtp_port, tls_context=self.tls
        )
        smtps = None
        if account.local.smtps_port:
            smtps = SmtpProxy(
                handler,
                host=account.local.host,
                port=account.local.smtps_port,
                implicit_tls=self.tls,
            )
        imap = ImapProxy(
            account,
            incoming.transform,
            append_transformer=incoming.encrypt_for_self,
            tls_context=self.tls,
            header_observer=incoming.observe_headers,
        )
        runtime = AccountRuntime(
            account, smtp, imap, smtps=smtps, key_warning=self._key_warning(account)
        )
        try:
            await self._listen(runtime, "SMTP", account.local.smtp_port, smtp.start)
            if smtps is not None:
                await self._listen(runtime, "SMTPS", account.local.smtps_port, smtps.start)
            await self._listen(runtime, "IMAP", account.local.imap_port, imap.start)
        except BaseException:
            await runtime.close()
            raise
        if runtime.key_warning:
            self.state.event("error", "keys", runtime.key_warning, account.name)
        return runtime

    async def _listen(self, runtime: AccountRuntime, what: str, port: int, start: Any) -> None:
        try:
            await start()
        except OSError as exc:
            if isinstance(exc, ImapsListenError):
                what, port = "IMAPS", exc.port
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"port {port} ({what} of account {runtime.account.name!r}) "
                    "is already in use by another program; choose another "
                    f"port in {self.config_path}"
                ) from None
            raise DaemonError(
                f"cannot listen on {runtime.account.local.host}:{port} for {what}: {exc.strerror}"
            ) from None

    def _key_warning(self, account: Account) -> str | None:
        try:
            own = self.store.own_keys(account.name)
        except SecretBoxError as exc:
            return f"own keys of {account.name!r} cannot be unlocked: {exc}"
        if not own:
            return (
                f"account {account.name!r} has no own key: mail is not signed and "
                f"encrypted mail cannot be read (`localproxy keys generate {account.name}`)"
            )
        if not any(stored.info.can_encrypt for stored, _secret in own):
            return f"the own key of {account.name!r} is expired or revoked"
        return None

    async def _shutdown(self) -> None:
        log.info("shutting down")
        if self._control is not None:
            self._control.close()
        await asyncio.gather(*(rt.close() for rt in self.accounts.values()), return_exceptions=True)
        if hasattr(self, "worker"):
            await self.worker.stop(grace=SHUTDOWN_GRACE)
        await cancel_and_wait(self._tasks)
        for name in ("outbox", "store", "state"):
            if hasattr(self, name):
                getattr(self, name).close()
        self._release_lock()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        except (NotImplementedError, AttributeError):  # Windows: no SIGHUP, no loop handlers
            # Ctrl-C and Ctrl-Break stop it; `localproxy reload` replaces SIGHUP.
            for name in ("SIGINT", "SIGBREAK"):
                if (number := getattr(signal, name, None)) is not None:
                    signal.signal(number, lambda *_: loop.call_soon_threadsafe(self.stop))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------------- single instance

    def _acquire_lock(self) -> None:
        try:
            self._lock_fd = control.acquire_lock(self.config)
        except control.AlreadyRunning as other:
            raise DaemonError(
                f"localproxy is already running for {self.config.proxy.data_dir}"
                f" (pid {other}); see `localproxy status`"
            ) from None
        except control.UnsafeRuntimeDir as exc:
            raise DaemonError(f"cannot start: {exc}") from None

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------------- reload

    async def reload(self) -> dict[str, Any]:
        """Re-read the config; restart only accounts whose settings changed. An account
        whose new settings cannot start (a port taken) keeps running as it was."""
        try:
            new = load_config(self.config_path)
        except Exception as exc:  # keep running on the old config, loudly
            self.state.event("error", "reload", f"config not reloaded: {exc}")
            log.error("config not reloaded: %s", exc)
            return {"ok": False, "error": str(exc)}
        global_change = (new.policy, new.proxy) != (self.config.policy, self.config.proxy)
        self.config = new
        wanted = {a.name: a for a in new.accounts}
        changed, failed = [], []
        for name in sorted(set(self.accounts) | set(wanted)):
            running = self.accounts.get(name)
            if running is not None and running.account == wanted.get(name) and not global_change:
                continue
            changed.append(name)
            if (error := await self._replace_account(name, wanted.get(name))) is not None:
                failed.append(error)
        self.outbox_accounts.clear()
        self.outbox_accounts.update({name: rt.account for name, rt in self.accounts.items()})
        message = f"config reloaded; restarted: {', '.join(changed) or 'nothing'}"
        self.state.event("error" if failed else "info", "reload", "; ".join([message, *failed]))
        (log.error if failed else log.info)("; ".join([message, *failed]))
        if failed:
            return {"ok": False, "error": "; ".join(failed), "restarted": changed}
        return {"ok": True, "restarted": changed}

    async def _replace_account(self, name: str, wanted: Account | None) -> str | None:
        """Stop the account's listeners and start them with its new settings (none: it
        was removed); on failure restart the old ones. Returns what went wrong."""
        old = self.accounts.pop(name, None)
        if old is not None:
            await old.close()
        if wanted is None:
            return None
        try:
            self.accounts[name] = await self._start_account(wanted)
            return None
        except (DaemonError, OSError) as exc:
            problem = f"account {name!r} not changed: {exc}"
        if old is None:
            return problem
        try:
            self.accounts[name] = await self._start_account(old.account)
        except (DaemonError, OSError) as exc:
            return f"{problem}; its old settings cannot start either: {exc}"
        return f"{problem}; it keeps its old settings"

    # ----------------------------------------------------------------------- events

    def _sink(self, account: str) -> Any:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            if counter := _COUNTED.get(kind):
                self.state.count(account, counter)
            if kind.startswith(("sent-", "received-")) and kind not in _LEVELS:
                who = ", ".join(data.get("recipients", [])) or "-"
                log.info("%s: %s %s", account, kind.replace("-", " "), who)
                return  # counted; too frequent to be a status event
            level = _LEVELS.get(kind, "info")
            text = data.get("error") or data.get("reply") or ", ".join(data.get("recipients", []))
            self.state.event(level, kind, str(text), account)

        return on_event

    def _outbox_delivered(self, item: OutboxItem) -> None:
        """A queued copy went out: it counts as sent like one sent at once."""
        self._sink(item.account)(f"sent-{sent_kind(item.message)}", {"recipients": item.recipients})

    async def _outbox_failed(self, item: OutboxItem) -> None:
        self.state.event(
            "error",
            "send-failed",
            f"gave up sending to {', '.join(item.recipients)}: {item.last_error}",
            item.account,
        )
        account = self.outbox_accounts.get(item.account)
        if account is None or not item.readable:
            return  # nobody to log in as: the status event is all there is
        await self._report_in_inbox(account, item)

    async def _report_in_inbox(self, account: Account, item: OutboxItem) -> None:
        """A bounce-style report in the account's INBOX (notice.py); best effort."""
        credentials = Credentials.from_bytes(item.credentials)
        report = failure_report(
            account.addresses[0],
            item.recipients,
            item.last_error or "permanent failure",
            item.message,
            item.created,
            item.attempts,
        )
        login = (credentials.mechanism, credentials.username, credentials.secret)
        try:
            await put_in_inbox(account, login, report)
        except Exception as exc:  # the failure is in status and the log already
            log.warning("could not put the delivery report into %s's INBOX: %s", account.name, exc)
            return
        log.info("delivery report for %s put into the INBOX", ", ".join(item.recipients))

    async def _check_loop(self) -> None:
        while True:
            for runtime in list(self.accounts.values()):
                for service in ("imap", "smtp"):
                    result = await check_service(runtime.account, service, None)
                    runtime.upstream[service] = {
                        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
                        **result.as_dict(),
                    }
            await asyncio.sleep(CHECK_INTERVAL)

    # ----------------------------------------------------------------------- control endpoint

    async def _command(self, command: str) -> dict[str, Any]:
        if command == "status":
            return {"ok": True, "snapshot": self.snapshot()}
        if command == "reload":
            return await self.reload()
        if command == "flush-outbox":
            return {"ok": True, "delivered": await self.worker.flush()}
        if command == "stop":
            self.stop()
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r}"}

    # ----------------------------------------------------------------------- status

    def snapshot(self) -> dict[str, Any]:
        snapshot = Snapshot(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            now=datetime.now(UTC),
            config_path=self.config_path,
            accounts=[self._account_status(rt) for rt in self.accounts.values()],
            events=[
                Event(e.time, e.level, e.account, e.kind, e.message) for e in self.state.recent(30)
            ],
            warnings=self.warnings
            + [rt.key_warning for rt in self.accounts.values() if rt.key_warning],
        )
        return json.loads(snapshot.to_json())

    def _account_status(self, runtime: AccountRuntime) -> AccountStatus:
        account = runtime.account
        name = account.name
        total = self.state.counters(name)
        base = self._counter_base.setdefault(name, total)
        since_start = {k: total[k] - base.get(k, 0) for k in total}
        return AccountStatus(
            name=name,
            addresses=list(account.addresses),
            listeners=self._listeners(runtime),
            upstream={
                service: _upstream_status(account, service, runtime.upstream.get(service))
                for service in ("imap", "smtp")
            },
            sessions={"imap": runtime.imap.session_count(), "smtp": _smtp_sessions(runtime)},
            counters_total=Counters(**since_start),
            counters_today=Counters(**self.state.counters(name, date.today())),
            outbox=self._outbox_status(name),
            own_key=self._own_key(name),
            recipients_known=self.store.count_recipients(),
            key_warning=self._store_key_warning(),
        )

    def _store_key_warning(self) -> str | None:
        try:
            return self.store.store_key.warning
        except SecretBoxError as exc:
            return f"own keys cannot be unlocked: {exc}"

    @staticmethod
    def _listeners(runtime: AccountRuntime) -> list[Listener]:
        host = runtime.account.local.host
        found = [
            Listener("imap", host, runtime.imap.port, True),
            Listener("smtp", host, runtime.smtp.port, True),
        ]
        if runtime.account.local.imaps_port:
            found.append(Listener("imaps", host, runtime.imap.imaps_port, True))
        if runtime.smtps is not None:
            found.append(Listener("smtps", host, runtime.smtps.port, True))
        return found

    def _outbox_status(self, account: str) -> OutboxStatus:
        items = [s for s in self.outbox.summaries() if s.account == account]
        queued = [s for s in items if s.state != "failed"]
        return OutboxStatus(
            queued=len(queued),
            failed=len(items) - len(queued),
            oldest=min((s.created for s in queued), default=None),
        )

    def _own_key(self, account: str) -> KeyStatus | None:
        try:
            own = self.store.own_keys(account)
        except SecretBoxError as exc:
            return KeyStatus(fingerprint="(locked)", problem=str(exc))
        if not own:
            return None
        stored = max((s for s, _secret in own), key=lambda s: s.info.created)
        problem = None if stored.info.can_encrypt else "expired, revoked or no encryption key"
        return KeyStatus(stored.fingerprint, stored.info.expires, problem)


def _upstream_status(
    account: Account, service: str, result: dict[str, Any] | None
) -> UpstreamStatus:
    server = account.imap if service == "imap" else account.smtp
    status = UpstreamStatus(server.host, server.port, server.security)
    if result is None:
        return status
    tls = result.get("tls") or {}
    return UpstreamStatus(
        server.host,
        server.port,
        server.security,
        reachable=result["ok"],
        checked_at=datetime.fromisoformat(result["checked_at"]),
        tls_version=tls.get("version"),
        issuer=tls.get("issuer"),
        expires_at=datetime.fromisoformat(tls["not_after"]) if tls else None,
        error=(result.get("error") or {}).get("message"),
    )


def _smtp_sessions(runtime: AccountRuntime) -> int:
    listeners = [runtime.smtp] + ([runtime.smtps] if runtime.smtps else [])
    return sum(listener.sessions.active for listener in listeners)


def sent_kind(message: bytes) -> str:
    """ "encrypted", "signed" or "plain": what an outgoing copy's top-level type says."""
    header, _sep, _body = split_header_body(message)
    field = next((h for h in parse_headers(header) if h.name.lower() == "content-type"), None)
    ctype, _params = content_type_of(field)
    if ctype in ("multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime"):
        return "encrypted"
    return "signed" if ctype == "multipart/signed" else "plain"


def run_daemon(config_path: Path) -> int:
    """Entry point of `localproxy run`; returns the exit code."""
    asyncio.run(Daemon(config_path).run())
    return 0
