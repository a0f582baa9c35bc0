"""The local SMTP listener: authenticate against the provider, encrypt, relay.

Each client session gets one upstream connection, opened when the client
authenticates with the client's own credentials, so the client sees the
provider's verdict on AUTH, MAIL and RCPT with the provider's own codes. At
DATA the message is composed into copies (compose.py). A single copy is sent
in the transaction the client already opened upstream; several copies are
sent one transaction each. The client gets 250 only after the provider
accepted the first copy; later copies that fail go to the durable outbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from localproxy.config import Account, Config
from localproxy.crypto.openpgp import OpenPGPEngine
from localproxy.keys.store import KeyStore
from localproxy.smtp.compose import Copy, PolicyRefusal, compose, refusal_for_recipient
from localproxy.smtp.outbox import Outbox, OutboxItem, PermanentFailure, TemporaryFailure
from localproxy.tls import UpstreamError
from localproxy.upstream import connect_smtp

log = logging.getLogger(__name__)
# aiosmtpd logs every raw command line (AUTH PLAIN <base64> included) at DEBUG.
logging.getLogger("mail.log").setLevel(logging.WARNING)

MAX_RECIPIENTS = 100
MAX_SESSIONS = 20
# Armor and MIME framing make an encrypted message about a third larger than the
# original: advertise a SIZE that still fits the provider's limit once encrypted.
ENCRYPTION_GROWTH = 1.4
AUTH_DELAY_CAP = 8.0  # seconds; repeated failures are slowed down up to this
EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Credentials:
    """What the client authenticated with; kept in memory (and sealed in the outbox)."""

    mechanism: str  # PLAIN, LOGIN or XOAUTH2
    username: str
    secret: str  # password or OAuth token

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Credentials:
        return cls(**json.loads(data))

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials({self.mechanism}, {self.username!r}, <redacted>)"


class UpstreamRefused(Exception):
    """The provider answered with an error; str() is its reply, code and text."""

    def __init__(self, code: int, text: str) -> None:
        self.code, self.text = code, text
        super().__init__(f"{code} {text}")


async def open_upstream(account: Account, credentials: Credentials) -> aiosmtplib.SMTP:
    """A verified-TLS upstream connection logged in with the client's credentials."""
    smtp, _info = await connect_smtp(account.smtp)
    try:
        await _authenticate(smtp, credentials)
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _authenticate(smtp: aiosmtplib.SMTP, creds: Credentials) -> None:
    try:
        if creds.mechanism == "XOAUTH2":
            await smtp.auth_xoauth2(creds.username, creds.secret)
        elif creds.mechanism.lower() in smtp.server_auth_methods:
            method = smtp.auth_plain if creds.mechanism == "PLAIN" else smtp.auth_login
            await method(creds.username, creds.secret)
        else:
            await smtp.login(creds.username, creds.secret)
    except aiosmtplib.SMTPResponseException as exc:
        raise UpstreamRefused(exc.code, exc.message) from None
    except aiosmtplib.SMTPException as exc:
        raise UpstreamRefused(504, f"5.5.4 provider: {exc}") from None


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}"


# --------------------------------------------------------------------------- handler


class ProxySession:
    """Per client connection: credentials and the upstream connection."""

    def __init__(self, credentials: Credentials, upstream: aiosmtplib.SMTP) -> None:
        self.credentials = credentials
        self.upstream: aiosmtplib.SMTP | None = upstream
        self.transaction_open = False

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None


class SmtpHandler:
    """aiosmtpd handler: auth_* and handle_* hooks (see aiosmtpd's documentation)."""

    def __init__(
        self,
        account: Account,
        config: Config,
        store: KeyStore,
        engine: OpenPGPEngine,
        outbox: Outbox | None,
        on_event: EventSink | None = None,
    ) -> None:
        self.account = account
        self.config = config
        self.store = store
        self.engine = engine
        self.outbox = outbox
        self.on_event = on_event or (lambda kind, data: None)
        self.outbox_wake: Callable[[], None] = lambda: None
        self.upstream_size: int | None = None  # the provider's SIZE, once seen
        self._auth_failures = 0

    def size_limit(self) -> int:
        limit = self.config.proxy.max_message_size
        if self.upstream_size:  # 0 means "no limit" in RFC 1870
            limit = min(limit, int(self.upstream_size / ENCRYPTION_GROWTH))
        return limit

    # ----------------------------------------------------------------------- AUTH

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        data = await _initial_or_challenge(server, args, b"")
        if data is None:
            return AuthResult(success=False, handled=True)
        try:
            _authzid, login, password = data.split(b"\0")
        except ValueError:
            await server.push("501 5.5.2 Cannot split the PLAIN data")
            return AuthResult(success=False, handled=True)
        return await self._verify(Credentials("PLAIN", _text(login), _text(password)))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _initial_or_challenge(server, args, b"Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(b"Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._verify(Credentials("LOGIN", _text(login), _text(password)))

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        data = await _initial_or_challenge(server, args, b"")
        if data is None:
            return AuthResult(success=False, handled=True)
        fields = dict(part.split("=", 1) for part in _text(data).split("\x01") if "=" in part)
        user, auth = fields.get("user", ""), fields.get("auth", "")
        if not user or not auth.lower().startswith("bearer "):
            await server.push("501 5.5.2 Malformed XOAUTH2 data")
            return AuthResult(success=False, handled=True)
        return await self._verify(Credentials("XOAUTH2", user, auth[7:]))

    async def _verify(self, creds: Credentials) -> AuthResult:
        try:
            upstream = await open_upstream(self.account, creds)
        except UpstreamRefused as refused:
            await self._slow_down()
            self.on_event("auth-failed", {"user": creds.username, "reply": str(refused)})
            return AuthResult(success=False, handled=False, message=str(refused))
        except UpstreamError as exc:
            self.on_event("upstream-error", {"error": str(exc)})
            return AuthResult(success=False, handled=False, message=f"454 4.7.0 localproxy: {exc}")
        self._auth_failures = 0
        if size := upstream.esmtp_extensions.get("size", "").strip():
            self.upstream_size = int(size) if size.isdigit() else None
        return AuthResult(success=True, auth_data=ProxySession(creds, upstream))

    async def _slow_down(self) -> None:
        self._auth_failures += 1
        await asyncio.sleep(min(AUTH_DELAY_CAP, 0.25 * 2 ** (self._auth_failures - 1)))

    # ----------------------------------------------------------------------- transaction

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        proxy = _proxy(session)
        try:
            upstream = await self._upstream(proxy)
            if proxy.transaction_open:
                await upstream.rset()
            await upstream.mail(address, options=_pass_options(mail_options))
        except aiosmtplib.SMTPResponseException as exc:
            return _reply(exc)
        except (UpstreamError, UpstreamRefused, aiosmtplib.SMTPException) as exc:
            return f"451 4.4.1 localproxy: provider unavailable ({exc})"
        proxy.transaction_open = True
        envelope.mail_from, envelope.mail_options = address, mail_options
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return f"452 4.5.3 Too many recipients (at most {MAX_RECIPIENTS} per message)"
        refusal = refusal_for_recipient(address, self.account, self.config.policy, self.store)
        if refusal:
            return refusal
        proxy = _proxy(session)
        try:
            assert proxy.upstream is not None
            await proxy.upstream.rcpt(address, options=rcpt_options)
        except aiosmtplib.SMTPResponseException as exc:
            return _reply(exc)
        except (aiosmtplib.SMTPException, AssertionError) as exc:
            return f"451 4.4.1 localproxy: provider unavailable ({exc})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        proxy = session.auth_data
        if isinstance(proxy, ProxySession) and proxy.upstream and proxy.transaction_open:
            try:
                await proxy.upstream.rset()
            except aiosmtplib.SMTPException:
                proxy.close()  # the next MAIL reconnects
            proxy.transaction_open = False
        return "250 2.0.0 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        proxy = _proxy(session)
        raw = envelope.original_content or b""
        try:
            copies = await asyncio.to_thread(
                compose,
                raw,
                envelope.rcpt_tos,
                account=self.account,
                policy=self.config.policy,
                store=self.store,
                engine=self.engine,
            )
        except PolicyRefusal as refusal:
            await self.handle_RSET(server, session, envelope)
            return str(refusal)
        except Exception:  # a bug must not lose the message silently: the client keeps it
            log.exception("composing the outgoing message failed")
            await self.handle_RSET(server, session, envelope)
            return "451 4.3.0 localproxy: could not prepare the message; it was not sent"
        reply = await self._send_copies(proxy, envelope, copies)
        proxy.transaction_open = False
        return reply

    async def _send_copies(
        self, proxy: ProxySession, envelope: Envelope, copies: list[Copy]
    ) -> str:
        first, rest = copies[0], copies[1:]
        try:
            reply = await self._send_first(proxy, envelope, first, single=not rest)
        except UpstreamRefused as refused:
            return str(refused)
        except (aiosmtplib.SMTPException, OSError) as exc:
            proxy.close()
            return (
                f"451 4.4.2 localproxy: connection to the provider lost, nothing was sent ({exc})"
            )
        self._count(first)
        for copy in rest:
            await self._send_or_queue(proxy, envelope, copy)
        return reply

    async def _send_first(
        self, proxy: ProxySession, envelope: Envelope, copy: Copy, single: bool
    ) -> str:
        upstream = await self._upstream(proxy)
        if single and proxy.transaction_open and copy.recipients == tuple(envelope.rcpt_tos):
            try:
                response = await upstream.data(copy.message)
            except aiosmtplib.SMTPResponseException as exc:
                raise UpstreamRefused(exc.code, exc.message) from None
            return f"{response.code} {response.message}"
        await upstream.rset()
        return await _transaction(upstream, envelope.mail_from, copy, envelope.mail_options)

    async def _send_or_queue(self, proxy: ProxySession, envelope: Envelope, copy: Copy) -> None:
        try:
            upstream = await self._upstream(proxy)
            await _transaction(upstream, envelope.mail_from, copy, envelope.mail_options)
            self._count(copy)
            return
        except UpstreamRefused as refused:
            error, permanent = str(refused), refused.code >= 500
        except (aiosmtplib.SMTPException, OSError, UpstreamError) as exc:
            proxy.close()
            error, permanent = f"connection to the provider lost ({exc})", False
        self._queue(proxy, envelope, copy, error, permanent)

    def _queue(
        self, proxy: ProxySession, envelope: Envelope, copy: Copy, error: str, permanent: bool
    ) -> None:
        if self.outbox is None:
            log.error(
                "copy for %s failed and no outbox is configured: %s",
                ", ".join(copy.recipients),
                error,
            )
            return
        self.outbox.add(
            self.account.name,
            envelope.mail_from or "",
            copy.recipients,
            copy.message,
            proxy.credentials.to_bytes(),
            error=error,
            permanent=permanent,
            notify=False,
        )
        kind = "send-failed" if permanent else "queued"
        self.on_event(kind, {"recipients": list(copy.recipients), "error": error})
        self.outbox_wake()

    def _count(self, copy: Copy) -> None:
        self.on_event(
            f"sent-{copy.kind}", {"recipients": list(copy.recipients), "size": len(copy.message)}
        )

    async def _upstream(self, proxy: ProxySession) -> aiosmtplib.SMTP:
        if proxy.upstream is None or not proxy.upstream.is_connected:
            proxy.close()
            proxy.upstream = await open_upstream(self.account, proxy.credentials)
            proxy.transaction_open = False
        return proxy.upstream


async def _transaction(
    upstream: aiosmtplib.SMTP, mail_from: str | None, copy: Copy, mail_options: list[str]
) -> str:
    """One MAIL/RCPT/DATA exchange; UpstreamRefused with the provider's reply on error."""
    try:
        await upstream.mail(mail_from or "", options=_pass_options(mail_options))
        for recipient in copy.recipients:
            await upstream.rcpt(recipient)
        response = await upstream.data(copy.message)
    except aiosmtplib.SMTPResponseException as exc:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await upstream.rset()
        raise UpstreamRefused(exc.code, exc.message) from None
    return f"{response.code} {response.message}"


def _pass_options(options: list[str]) -> list[str]:
    """SIZE changes once a message is encrypted; BODY/SMTPUTF8 stay as the client said."""
    return [o for o in options if not o.upper().startswith("SIZE=")]


def _proxy(session: Session) -> ProxySession:
    proxy = session.auth_data
    assert isinstance(proxy, ProxySession), "aiosmtpd enforces AUTH before MAIL"
    return proxy


async def _initial_or_challenge(server: SMTP, args: list[str], prompt: bytes) -> bytes | None:
    """The SASL initial response if the client sent one, else what it answers to 334."""
    if len(args) > 1:
        try:
            return base64.b64decode(args[1], validate=True)
        except (binascii.Error, ValueError):
            await server.push("501 5.5.2 Cannot decode base64")
            return None
    answer = await server.challenge_auth(prompt)
    return None if answer is MISSING else answer


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- listener


class LocalSMTP(SMTP):
    """aiosmtpd's SMTP with a session cap and the upstream closed with the client."""

    active = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        LocalSMTP.active += 1
        if LocalSMTP.active > MAX_SESSIONS:
            transport.write(b"421 4.7.0 localproxy: too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        LocalSMTP.active -= 1
        if self.session is not None and isinstance(self.session.auth_data, ProxySession):
            self.session.auth_data.close()
        super().connection_lost(error)


class SmtpProxy:
    """The listener of one account."""

    def __init__(
        self, handler: SmtpHandler, *, host: str, port: int, tls_context: Any = None
    ) -> None:
        self.handler = handler
        self.host, self.port = host, port
        self.tls_context = tls_context
        self._server: asyncio.base_events.Server | None = None

    def _factory(self) -> SMTP:
        # Loopback in clear is fine (it never leaves the machine); a remote
        # listener must have TLS before credentials cross the network.
        loopback = self.host in ("127.0.0.1", "::1", "localhost")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return LocalSMTP(
                self.handler,
                data_size_limit=self.handler.size_limit(),
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname="localproxy",
                ident="localproxy ESMTP",
                auth_required=True,
                auth_require_tls=not loopback,
                tls_context=self.tls_context,
                require_starttls=False,
                auth_exclude_mechanism=["CRAM-MD5"],
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("SMTP for %s listening on %s:%d", self.handler.account.name, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --------------------------------------------------------------------------- outbox delivery


def outbox_sender(accounts: dict[str, Account]) -> Callable[[OutboxItem], Awaitable[None]]:
    """The OutboxWorker's send(): one fresh upstream connection per retry."""

    async def send(item: OutboxItem) -> None:
        account = accounts.get(item.account)
        if account is None:
            raise PermanentFailure(f"account {item.account!r} is no longer configured")
        started = time.monotonic()
        try:
            upstream = await open_upstream(account, Credentials.from_bytes(item.credentials))
        except UpstreamRefused as refused:
            raise (
                PermanentFailure
                if refused.code >= 500 and refused.code != 535
                else TemporaryFailure
            )(str(refused)) from None
        except UpstreamError as exc:
            raise TemporaryFailure(str(exc)) from None
        try:
            copy = Copy(item.recipients, item.message, "queued")
            await _transaction(upstream, item.mail_from, copy, [])
        except UpstreamRefused as refused:
            kind = PermanentFailure if refused.code >= 500 else TemporaryFailure
            raise kind(str(refused)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporaryFailure(f"connection lost: {exc}") from None
        finally:
            upstream.close()
        log.info(
            "outbox: delivered %s to %d recipients in %.1f s",
            item.id,
            len(item.recipients),
            time.monotonic() - started,
        )

    return send
