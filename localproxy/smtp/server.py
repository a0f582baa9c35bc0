"""The local SMTP listener: authenticate against the provider, encrypt, relay.

Each client session gets one upstream connection, opened when the client
authenticates with the client's own credentials, so the client sees the
provider's verdict on AUTH and RCPT with the provider's own codes. MAIL is
answered here and goes upstream with the first RCPT, in one write (RFC 2920
pipelining): a sender the provider refuses is refused at that RCPT, as Postfix
itself does by default (smtpd_delay_reject). At DATA the message is composed
into copies (compose.py). A single copy is sent in the transaction the client
already opened upstream; several copies are sent one transaction each. The
client gets 250 only after the provider accepted the first copy; later copies
that fail go to the durable outbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import json
import logging
import re
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from localproxy.config import Account, Config, is_loopback
from localproxy.crypto.openpgp import OpenPGPEngine
from localproxy.keys.store import KeyStore
from localproxy.mime import to_crlf
from localproxy.smtp.compose import Copy, PolicyRefusal, compose, refusal_for_recipient
from localproxy.smtp.data import END_MARK, DataProblem, DataReceiver
from localproxy.smtp.outbox import Outbox, OutboxItem, PermanentFailure, TemporaryFailure
from localproxy.smtp.pipe import Pipe, checked
from localproxy.tls import Failure, UpstreamError
from localproxy.upstream import connect_smtp

log = logging.getLogger(__name__)
# aiosmtpd logs raw protocol lines at DEBUG: SASL exchanges and, with "DATA readline",
# the plaintext of every message. Dropped by a filter too, so turning the logger up
# for debugging cannot put secrets into a log file.
_aiosmtpd_log = logging.getLogger("mail.log")
_aiosmtpd_log.setLevel(logging.WARNING)
_aiosmtpd_log.addFilter(lambda record: record.levelno > logging.DEBUG)
# `localproxy run --log-traffic` turns this one on: protocol lines, SASL redacted.
traffic = logging.getLogger("localproxy.traffic")
traffic.setLevel(logging.WARNING)  # off unless asked for, whatever the root level
TRAFFIC_CHARS = 200

MAX_RECIPIENTS = 100
MAX_SESSIONS = 20  # per listener
READ_BUFFER = 64 * 1024  # octets the client's stream may buffer: DATA pieces, SASL lines
INLINE_COMPOSE = 256 * 1024  # octets: smaller messages are composed on the event loop
SASL_LINE_LIMIT = 12288  # an AUTH command line may be this long (RFC 4954 4)
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


async def open_upstream(account: Account, credentials: Credentials) -> Pipe:
    """A verified-TLS upstream connection logged in with the client's credentials."""
    smtp, _info = await connect_smtp(account.smtp)
    try:
        await _authenticate(smtp, credentials)
        return Pipe(smtp)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
        smtp.close()
        # Says nothing about the password: temporary (454), so no client asks again.
        failure = Failure.TIMEOUT if isinstance(exc, TimeoutError) else Failure.NETWORK
        detail = f"the connection was lost during AUTH ({exc or type(exc).__name__})"
        raise UpstreamError(failure, account.smtp.host, account.smtp.port, detail) from None
    except BaseException:
        smtp.close()
        raise


async def _authenticate(smtp: aiosmtplib.SMTP, creds: Credentials) -> None:
    """Raises UpstreamRefused with the provider's verdict; a lost connection passes."""
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
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        raise
    except aiosmtplib.SMTPException as exc:
        raise UpstreamRefused(504, f"5.5.4 provider: {exc}") from None


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}"


# --------------------------------------------------------------------------- handler


class ProxySession:
    """Per client connection: credentials and the upstream connection."""

    def __init__(self, credentials: Credentials, upstream: Pipe) -> None:
        self.credentials = credentials
        self.upstream: Pipe | None = upstream
        self.transaction_open = False  # the provider took a MAIL (and maybe RCPTs)
        self.pending_mail: bytes | None = None  # the client's MAIL, sent with its first RCPT

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
        self.in_flight = 0  # DATA transactions being sent upstream right now
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
        if size := upstream.extensions.get("size", "").strip():
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
        encoding = _address_encoding(address, envelope.smtp_utf8)
        if encoding is None:
            return _needs_smtputf8(address)
        try:
            await self._upstream(proxy)
        except (UpstreamError, UpstreamRefused, aiosmtplib.SMTPException) as exc:
            return f"451 4.4.1 localproxy: provider unavailable ({exc})"
        # Sent with the first RCPT, one round trip for both (see the module docstring).
        proxy.pending_mail = _command(b"MAIL FROM:", address, _pass_options(mail_options), encoding)
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
        encoding = _address_encoding(address, envelope.smtp_utf8)
        if encoding is None:
            return _needs_smtputf8(address)
        refusal = refusal_for_recipient(address, self.account, self.config.policy, self.store)
        if refusal:
            return refusal
        proxy = _proxy(session)
        try:
            rcpt = _command(b"RCPT TO:", address, rcpt_options, encoding)
            await self._recipient_upstream(proxy, rcpt)
        except aiosmtplib.SMTPResponseException as exc:
            return _reply(exc)
        except (aiosmtplib.SMTPException, UpstreamError, UpstreamRefused) as exc:
            return f"451 4.4.1 localproxy: provider unavailable ({exc})"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _recipient_upstream(self, proxy: ProxySession, rcpt: bytes) -> None:
        """RCPT upstream, after the pending MAIL (and an RSET when a transaction is
        still open) in the same write; SMTPResponseException with the first refusal."""
        upstream = await self._upstream(proxy)
        if proxy.pending_mail is None:
            await upstream.command(rcpt, RCPT_OK)
            return
        lines = [proxy.pending_mail, rcpt]
        if proxy.transaction_open:
            lines.insert(0, b"RSET")
        replies = await upstream.commands(*lines)
        mail_reply, rcpt_reply = replies[-2:]
        checked(mail_reply, (250,))  # a refused sender is this RCPT's answer
        proxy.pending_mail, proxy.transaction_open = None, True
        checked(rcpt_reply, RCPT_OK)

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        proxy = session.auth_data
        if isinstance(proxy, ProxySession):
            proxy.pending_mail = None
            if proxy.upstream and proxy.transaction_open:
                try:
                    await proxy.upstream.command(b"RSET")
                except aiosmtplib.SMTPException:
                    proxy.close()  # the next MAIL reconnects
                proxy.transaction_open = False
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd's default reply is "500 Error: (Type) text": permanent, so the client
        # would give up on a message that a retry may well deliver.
        log.error("SMTP session failed", exc_info=error)
        return "451 4.3.0 localproxy: internal error, please try again later"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        proxy = _proxy(session)
        raw = envelope.original_content or b""
        prepare = functools.partial(
            compose,
            raw,
            envelope.rcpt_tos,
            account=self.account,
            policy=self.config.policy,
            store=self.store,
            engine=self.engine,
        )
        try:
            # A thread hand-off costs more than composing a small message; a large one
            # goes to a worker so the loop still gets turns between its Python steps.
            copies = prepare() if len(raw) <= INLINE_COMPOSE else await asyncio.to_thread(prepare)
        except PolicyRefusal as refusal:
            await self.handle_RSET(server, session, envelope)
            return str(refusal)
        except Exception:  # a bug must not lose the message silently: the client keeps it
            log.exception("composing the outgoing message failed")
            await self.handle_RSET(server, session, envelope)
            return "451 4.3.0 localproxy: could not prepare the message; it was not sent"
        self.in_flight += 1
        try:
            # Shielded: a shutdown must not cut off the copies after the first one.
            reply = await asyncio.shield(self._send_copies(proxy, envelope, copies))
        finally:
            self.in_flight -= 1
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
            # Dropped or timed out before the provider confirmed: the client keeps the
            # message and retries (at worst a duplicate, never a loss).
            proxy.close()
            return (
                "451 4.4.2 localproxy: the provider did not confirm the message "
                f"({str(exc) or type(exc).__name__}); please try again"
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
                response = await upstream.send_message(to_crlf(copy.message))
            except aiosmtplib.SMTPResponseException as exc:
                raise UpstreamRefused(exc.code, exc.message) from None
            return f"{response.code} {response.message}"
        reset = proxy.transaction_open
        proxy.transaction_open = False
        return await _transaction(
            upstream, envelope.mail_from, copy, envelope.mail_options, reset=reset
        )

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

    async def _upstream(self, proxy: ProxySession) -> Pipe:
        if proxy.upstream is None or not proxy.upstream.is_connected:
            proxy.close()
            proxy.upstream = await open_upstream(self.account, proxy.credentials)
            proxy.transaction_open = False
        return proxy.upstream


async def _transaction(
    upstream: Pipe,
    mail_from: str | None,
    copy: Copy,
    mail_options: list[str],
    reset: bool = False,
) -> str:
    """One MAIL/RCPT/DATA exchange, the envelope in one write (RFC 2920);
    UpstreamRefused with the provider's first refusal."""
    options, encoding = _pass_options(mail_options), "ascii"
    # Outbox items do not keep the client's MAIL options: non-ASCII addresses decide.
    if not all(a.isascii() for a in (mail_from or "", *copy.recipients)):
        encoding = "utf-8"
        if "SMTPUTF8" not in (o.upper() for o in options):
            options.append("SMTPUTF8")
    envelope = [_command(b"MAIL FROM:", mail_from or "", options, encoding)]
    envelope += [_command(b"RCPT TO:", r, [], encoding) for r in copy.recipients]
    try:
        replies = await upstream.commands(*([b"RSET"] if reset else []), *envelope)
        checked(replies[-len(envelope)], (250,))
        for reply in replies[-len(envelope) + 1 :]:
            checked(reply, RCPT_OK)
        response = await upstream.send_message(to_crlf(copy.message))
    except aiosmtplib.SMTPResponseException as exc:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await upstream.command(b"RSET")
        raise UpstreamRefused(exc.code, exc.message) from None
    return f"{response.code} {response.message}"


RCPT_OK = (250, 251)


def _command(verb: bytes, address: str, options: Iterable[str], encoding: str) -> bytes:
    """``MAIL FROM:<a> OPTIONS`` / ``RCPT TO:<a>``, as aiosmtplib would write it."""
    parts = [verb + b"<" + address.encode(encoding) + b">"]
    parts += [option.encode("ascii") for option in options]
    return b" ".join(parts)


def _pass_options(options: list[str]) -> list[str]:
    """SIZE changes once a message is encrypted; BODY/SMTPUTF8 stay as the client said."""
    return [o for o in options if not o.upper().startswith("SIZE=")]


def _address_encoding(address: str, smtputf8: bool) -> str | None:
    """How to send an address upstream; None when it is non-ASCII without SMTPUTF8.

    aiosmtplib encodes addresses as ASCII unless told otherwise, so a non-ASCII one
    would raise UnicodeEncodeError; RFC 6531 allows it only after MAIL ... SMTPUTF8.
    """
    if address.isascii():
        return "ascii"
    return "utf-8" if smtputf8 else None


def _needs_smtputf8(address: str) -> str:
    return f"553 5.6.7 <{address}>: a non-ASCII address needs MAIL FROM with SMTPUTF8"


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


# <dot-atom@domain>, the form nearly every client sends; anything else (quoted local
# parts, comments, source routes, address literals) takes the full RFC 5322 parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")


def simple_path(arg: str) -> tuple[str, str] | None:
    """``(address, rest)`` for a plain ``<local@domain>`` path, else None; the same
    answer as get_angle_addr at a hundredth of its cost."""
    found = _SIMPLE_PATH.match(arg)
    if found is None:
        return None
    rest = arg[found.end() :].lstrip(" \t")  # the parser takes the folding space too
    return None if rest.startswith("(") else (found.group(1), rest)  # (a comment)


def _parse_path(arg: str) -> tuple[str, str] | None:
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, rest = parse(arg)
    except HeaderParseError:
        return None
    return address.addr_spec, rest


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- listener


class SessionLimit:
    """Concurrent client sessions of one listener."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self.active = 0
        self.open: set[LocalSMTP] = set()


class LocalSMTP(SMTP):
    """aiosmtpd's SMTP with a session cap, clearer limit replies, DATA read in blocks,
    and the upstream connection closed with the client's."""

    # aiosmtpd sizes its stream buffer by this. Its own meaning, the DATA line limit,
    # is enforced by smtp_DATA below; a bigger buffer lets DATA arrive in large pieces
    # and an OAuth token (XOAUTH2) in one SASL line.
    line_length_limit = READ_BUFFER

    def __init__(self, handler: SmtpHandler, *, sessions: SessionLimit, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd's is one dict shared by every instance (a class attribute).
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self.command_size_limits["AUTH"] = SASL_LINE_LIMIT
        self.sessions = sessions
        self._refused = False
        self._in_sasl = False  # for the traffic log: the last reply was a 334

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sessions.active += 1
        if self.sessions.active > self.sessions.limit:
            self._refused = True
            transport.write(b"421 4.7.0 localproxy: too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.sessions.open.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.active -= 1
        self.sessions.open.discard(self)
        if self._refused:
            return  # aiosmtpd never set this connection up; its teardown would fail
        if self.session is not None and isinstance(self.session.auth_data, ProxySession):
            self.session.auth_data.close()
        super().connection_lost(error)

    def goodbye(self) -> None:
        """Shutdown: tell the client to come back later (RFC 5321 3.8) and hang up."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.3.2 localproxy is shutting down, try again later\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, reading the message in pieces (see data.py)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        receiver = DataReceiver(self.data_size_limit)
        if not await self._receive(receiver):
            return  # the client hung up mid-message
        if receiver.problem is not None:
            self._set_post_data_state()
            await self.push(self._data_refusal(receiver.problem))
            return
        self.envelope.content = self.envelope.original_content = receiver.content()
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _receive(self, receiver: DataReceiver) -> bool:
        """Feed the client's octets up to the end of the data; False if it hung up."""
        while True:
            try:
                piece = await self._reader.readuntil(END_MARK)
            except asyncio.LimitOverrunError as full:  # no mark in a whole buffer
                piece = await self._reader.read(full.consumed)
            except asyncio.IncompleteReadError:
                return False
            except asyncio.CancelledError:
                self._writer.close()  # the connection was lost during DATA
                raise
            end = receiver.feed(piece)
            if end is not None:
                # readuntil() stops at the first mark, so nothing follows the data here.
                assert end == len(piece), "DATA piece read past the end of the data"
                return True

    def _data_refusal(self, problem: DataProblem) -> str:
        if problem is DataProblem.TOO_MUCH:
            return self._too_big()
        return "500 5.5.2 Line too long: at most 1000 octets per line (RFC 5321 4.5.3.1.6)"

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser for MAIL and RCPT, without the typing.Protocol
        class it defines on every call, and with a fast path for plain addresses."""
        if not arg:
            return "", ""
        parsed = simple_path(arg) or _parse_path(arg)
        if parsed is None:
            return None, None
        addr, rest = parsed
        local_part = addr.rpartition("@")[0]
        if self.local_part_limit and len(local_part) > self.local_part_limit:
            return None, None
        return addr, rest

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(reader, writer)
        if traffic.isEnabledFor(logging.DEBUG):
            readuntil = reader.readuntil  # readline() and DATA lines go through it too

            async def logged(separator: bytes = b"\n") -> bytes:
                line = await readuntil(separator)
                traffic.debug("smtp C: %r", self._traffic_line(line))
                return line

            reader.readuntil = logged  # type: ignore[method-assign]

    def _traffic_line(self, line: bytes) -> bytes:
        """A client line for the traffic log: SASL data never, whatever the mechanism."""
        if self._in_sasl:
            return b"<SASL response redacted>"
        words = line.split(None, 2)
        if words and words[0].upper() == b"AUTH" and len(words) > 2:
            return b"AUTH " + words[1] + b" <redacted>"
        return line[:TRAFFIC_CHARS]

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = self._limit_reply(status)
        if traffic.isEnabledFor(logging.DEBUG):
            raw = status.encode("utf-8", "replace") if isinstance(status, str) else status
            self._in_sasl = raw.startswith(b"334")  # the client's next line answers SASL
            traffic.debug("smtp S: %r", raw[:TRAFFIC_CHARS])
        await super().push(status)

    def _limit_reply(self, status: str) -> str:
        """aiosmtpd's replies for its limits, with enhanced status codes and the limit."""
        if status.startswith("552 Error:"):  # MAIL ... SIZE= above the limit
            return self._too_big()
        if status == "500 Command line too long":
            return "500 5.5.2 Command line too long"
        return status

    def _too_big(self) -> str:
        return f"552 5.3.4 Message too big: at most {self.data_size_limit} bytes"


class SmtpProxy:
    """One listener of one account: plain with optional STARTTLS (`tls_context`), or
    implicit TLS (`implicit_tls`, the smtps port).

    AUTH needs TLS first when `require_tls_for_auth`; by default that is so unless the
    host is loopback (in clear there it never leaves the machine).
    """

    def __init__(
        self,
        handler: SmtpHandler,
        *,
        host: str,
        port: int,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        require_tls_for_auth: bool | None = None,
    ) -> None:
        if tls_context is not None and implicit_tls is not None:
            raise ValueError("a listener offers either STARTTLS or implicit TLS")
        if require_tls_for_auth is None:
            require_tls_for_auth = not is_loopback(host)
        if require_tls_for_auth and tls_context is None and implicit_tls is None:
            raise ValueError(f"{host}: AUTH requires TLS here, but no certificate was given")
        self.handler = handler
        self.host, self.port = host, port
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.require_tls_for_auth = require_tls_for_auth
        self.sessions = SessionLimit()
        self._server: asyncio.base_events.Server | None = None

    def _factory(self) -> SMTP:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            return LocalSMTP(
                self.handler,
                sessions=self.sessions,
                data_size_limit=self.handler.size_limit(),
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname="localproxy",
                ident="localproxy ESMTP",
                auth_required=True,
                # With implicit TLS the whole connection is encrypted already, but
                # aiosmtpd only knows about TLS it started itself (STARTTLS).
                auth_require_tls=self.require_tls_for_auth and self.implicit_tls is None,
                tls_context=self.tls_context,
                require_starttls=False,
                auth_exclude_mechanism=["CRAM-MD5"],
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, self.host, self.port, ssl=self.implicit_tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "SMTP%s for %s listening on %s:%d",
            "S" if self.implicit_tls else "",
            self.handler.account.name,
            self.host,
            self.port,
        )

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting; let messages already in DATA finish (a copy sent but its
        siblings not yet queued would otherwise be lost), then 421 to the rest."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.handler.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.sessions.open):
            connection.goodbye()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


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
