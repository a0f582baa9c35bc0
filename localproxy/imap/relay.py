"""The IMAP relay: one local listener per account, one upstream session per client session.

Traffic passes through byte-exact except where the relay must step in:

* capabilities (greeting, CAPABILITY, tagged OK after login, ENABLED) are filtered with one
  policy, and commands for extensions the relay cannot carry are refused locally;
* client literals are collected whole (the relay answers "+" itself) and re-announced to the
  provider as LITERAL+ when it offers that, else synchronizing (its "+" is not forwarded);
* IDLE and AUTHENTICATE follow the provider's "+": the client is only treated as idling
  or answering a challenge once the provider said so;
* FETCH: every command asking for a content-derived item is sent upstream with UID and two
  probe items added (top-level content headers, first octets of the text); one such command
  is in flight at a time, so its responses are attributable and stay in order. Messages
  whose probes show encryption, a signature or one of our status headers are served from a
  view: the stored message (taken from the response when it carries BODY[]/RFC822 whole,
  else fetched by UID through a separate upstream session, never by injecting commands
  into the client's session) goes through `transformer`, the result is cached, and every
  content item is computed from `MessageView`. Everything else is forwarded as the provider
  sent it minus the relay's additions, each remaining item spliced byte for byte.
  With a header observer, the header probe also asks for From, Date, Auto-Submitted and
  Autocrypt, and the observer gets those fields of every probed message (Autocrypt from
  plain mail); it runs beside the session and can neither delay nor fail a FETCH;
* local TLS is the relay's own: STARTTLS (clear-text bytes the client pipelined after it
  are dropped unread) and an implicit-TLS port share one certificate; off loopback,
  LOGIN/AUTHENTICATE wait for TLS (LOGINDISABLED, NO [PRIVACYREQUIRED]).

If a view cannot be built, the message's FETCH response is withheld and the command ends
with `NO [UNAVAILABLE]`: a client caches what it is served under its UID for good, so
serving ciphertext (or a message with a forged status header) because of a passing
failure would be permanent. The client retries later instead.

Not rewritten (the provider only knows the stored, encrypted text): SEARCH, SORT and THREAD
on content; COPY/MOVE need no rewriting.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import quopri
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TypeAlias

from localproxy.aio import cancel_and_wait
from localproxy.config import Account, UpstreamServer, is_loopback
from localproxy.imap.cache import ViewCache, ViewKey
from localproxy.imap.codec import (
    Atom,
    CapabilityPolicy,
    ClientParser,
    Command,
    Continuation,
    ContinuationLine,
    ContinuationNeeded,
    Fatal,
    FetchItem,
    FetchItemSpan,
    IdleDone,
    ImapSyntaxError,
    Literal,
    LiteralForm,
    Nil,
    Number,
    PList,
    Quoted,
    RawFetch,
    Rejected,
    ResponseCode,
    Section,
    SequenceSet,
    ServerEvent,
    ServerParser,
    Tagged,
    Token,
    Unparsed,
    Untagged,
    astring_value,
    build_command,
    capabilities_of,
    capability_allowed,
    fetch_item_spans,
    parse_fetch_item,
    parse_fetch_request,
    parse_fetch_response,
    rewrite_capabilities,
    serialize_fetch_response,
    status_response,
)
from localproxy.imap.view import BinaryError, MessageView
from localproxy.mime import content_type_of, parse_headers, split_header_body
from localproxy.tls import UpstreamError
from localproxy.upstream import ImapUpstream, connect_imap

log = logging.getLogger(__name__)
# `localproxy run --log-traffic` turns this one on: protocol lines, credentials redacted.
traffic = logging.getLogger("localproxy.traffic")
traffic.setLevel(logging.WARNING)  # off unless asked for, whatever the root level
TRAFFIC_CHARS = 200

MiB = 1024 * 1024
DEFAULT_MAX_LITERAL = 64 * MiB
READ_SIZE = 64 * 1024
# Writes to the provider go out in pieces of this size, each due within the upstream
# timeout: a provider that stops reading is found out, a slow link is not taken for one.
WRITE_CHUNK = 256 * 1024
CRLF = b"\r\n"

# The view computes BINARY[...] and BINARY.SIZE (RFC 3516), so BINARY may be offered;
# it still only reaches the client when the provider offers it too (plain messages are
# served by the provider). IMAP4rev2 and UTF8=ACCEPT stay off until tested end to end.
CAPABILITY_POLICY = CapabilityPolicy(binary=True)

STATUS_HEADER_PREFIX = "x-localproxy-"
# HEADER.FIELDS cannot match a prefix: these are the status header names the relay can
# spot on the fast path. A transformer must only ever add headers from this list.
STATUS_HEADER_NAMES = ("X-LOCALPROXY-SECURITY", "X-LOCALPROXY-STATUS")
TEXT_PROBE_LENGTH = 128
PROBE_HEADER_NAMES = ("CONTENT-TYPE", "CONTENT-TRANSFER-ENCODING", *STATUS_HEADER_NAMES)
# Probed as well when a header observer is set: what deciding on an Autocrypt header
# needs (sender, effective date, auto-replies).
OBSERVED_HEADER_NAMES = ("FROM", "DATE", "AUTO-SUBMITTED", "AUTOCRYPT")
TEXT_PROBE = FetchItem("BODY", Section((), "TEXT"), (0, TEXT_PROBE_LENGTH), peek=True)
UID_ITEM = FetchItem("UID")
# Observers run beside the session; past this many unfinished ones, further messages
# are not observed (a later FETCH of them is).
MAX_PENDING_OBSERVERS = 256
OBSERVER_GRACE = 10.0  # close() waits this long for observers still at work
TLS_HANDSHAKE_TIMEOUT = 30.0
# Top-level types whose view differs from the stored message (decrypted or verified).
VIEW_TYPES = frozenset(
    {
        "multipart/encrypted",
        "multipart/signed",
        "application/pkcs7-mime",
        "application/x-pkcs7-mime",
        "application/pgp",  # pre-RFC 3156 PGP messages
    }
)
ARMOR_LINES = (b"-----BEGIN PGP MESSAGE-----", b"-----BEGIN PGP SIGNED MESSAGE-----")
# SASL mechanisms whose client responses do not depend on a server challenge, so the
# side session can replay them.
REPLAYABLE_MECHANISMS = frozenset({b"PLAIN", b"LOGIN", b"XOAUTH2", b"OAUTHBEARER"})
# Commands of extensions the relay never offers; forwarding them would change the
# session under the relay (compression, re-authentication) or hand out stored content
# the relay cannot rewrite. STARTTLS is answered locally (see ImapSession._on_starttls).
NO_LOCAL_TLS = "STARTTLS is not offered on this local port"
BLOCKED_COMMANDS = {
    b"COMPRESS": "compression is not available through localproxy",
    b"UNAUTHENTICATE": "UNAUTHENTICATE is not available through localproxy",
    b"REPLACE": "REPLACE is not available through localproxy",
    b"UID REPLACE": "REPLACE is not available through localproxy",
    b"URLFETCH": "URLAUTH is not available through localproxy",
    b"GENURLAUTH": "URLAUTH is not available through localproxy",
    b"RESETKEY": "URLAUTH is not available through localproxy",
    b"NOTIFY": "NOTIFY is not available through localproxy",
}
SPECIAL_USE_APPEND = frozenset({b"\\SENT", b"\\DRAFTS"})
# Mailboxes larger than this get no sequence-number map (memory); FETCHes there keep
# their probes unless they name UIDs.
MAX_SEQUENCE_MAP = 1_000_000
MAX_UID = 2**32 - 1


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class MessageContext:
    """Where the message being transformed lives."""

    account: str  # Account.name
    mailbox: str  # as the client named it (modified UTF-7), decoded leniently
    uidvalidity: int
    uid: int


Transformer: TypeAlias = Callable[[bytes, MessageContext], Awaitable[bytes]]
AppendTransformer: TypeAlias = Callable[[str, bytes], Awaitable[bytes]]
# Sees the probed header fields (OBSERVED_HEADER_NAMES among them) of every message a
# rewritten FETCH touches; runs beside the session and never affects what the client gets.
HeaderObserver: TypeAlias = Callable[[bytes, MessageContext], Awaitable[None]]


def strip_status_headers(raw: bytes) -> bytes:
    """The message without any X-LocalProxy-* header field (a sender could forge them).
    Same rule as localproxy.crypto.pgpmime.strip_headers, kept here so the relay does not
    load the OpenPGP engine."""
    header, separator, body = split_header_body(raw)
    kept = [h.raw for h in parse_headers(header) if not _is_status_header(h.name)]
    return b"".join(kept) + separator + body


async def default_transformer(raw: bytes, context: MessageContext) -> bytes:
    """Until decryption is plugged in: serve the stored message, forged headers removed."""
    return strip_status_headers(raw)


def _is_status_header(name: str) -> bool:
    return name.lower().startswith(STATUS_HEADER_PREFIX)


@dataclass(frozen=True, repr=False)
class Credentials:
    """How the client logged in, kept in memory only so the side session can log in the
    same way. `mechanism` None means the LOGIN command; otherwise a SASL mechanism whose
    client responses (base64 lines, the initial response first) are replayed as-is, which
    re-uses an OAuth token for XOAUTH2 / OAUTHBEARER."""

    mechanism: bytes | None
    login: tuple[bytes, bytes] = (b"", b"")
    initial: bytes | None = None  # the SASL-IR argument as sent ("=" for empty)
    responses: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        return f"Credentials({(self.mechanism or b'LOGIN').decode()}, <redacted>)"


# --------------------------------------------------------------------------- the listener


class ImapProxy:
    """The local IMAP listener of one account.

    With a `tls_context` the clear-text port offers STARTTLS and, when the account sets
    `local.imaps_port`, a second port speaks implicit TLS with the same context. Login
    before TLS is refused with LOGINDISABLED / PRIVACYREQUIRED when `login_requires_tls`
    (default: the listen address is not loopback, so credentials would cross a network).
    """

    def __init__(
        self,
        account: Account,
        transformer: Transformer = default_transformer,
        *,
        append_transformer: AppendTransformer | None = None,
        append_mailboxes: Iterable[str] = (),
        max_literal_size: int = DEFAULT_MAX_LITERAL,
        cache: ViewCache | None = None,
        tls_context: ssl.SSLContext | None = None,
        login_requires_tls: bool | None = None,
        header_observer: HeaderObserver | None = None,
    ) -> None:
        self.account = account
        self.transformer = transformer
        self.append_transformer = append_transformer
        self.max_literal_size = max_literal_size
        self.cache = cache if cache is not None else ViewCache()
        self.tls_context = tls_context
        if login_requires_tls is None:
            login_requires_tls = not is_loopback(account.local.host)
        self.login_requires_tls = login_requires_tls
        self.header_observer = header_observer
        extra = OBSERVED_HEADER_NAMES if header_observer is not None else ()
        self.probes = Probes(extra)
        # Mailboxes whose APPENDs go through append_transformer: configured names plus
        # those a LIST response flagged \Sent or \Drafts (RFC 6154).
        self.append_mailboxes = {_mailbox_key(name.encode()) for name in append_mailboxes}
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._observers: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)

    @property
    def port(self) -> int:
        """The bound port (useful when the account says port 0)."""
        return _bound_port(self._server)

    @property
    def imaps_port(self) -> int:
        """The bound implicit-TLS port."""
        return _bound_port(self._tls_server)

    async def start(self) -> None:
        local = self.account.local
        if self.login_requires_tls and self.tls_context is None:
            log.warning(
                "imap[%s] on %s without a TLS certificate: no client can log in",
                self.account.name,
                local.host,
            )
        self._server = await asyncio.start_server(self._on_client, local.host, local.imap_port)
        log.info("imap[%s] listening on %s:%d", self.account.name, local.host, self.port)
        if local.imaps_port is None:
            return
        if self.tls_context is None:
            log.warning(
                "imap[%s] imaps_port %d needs the local certificate; not listening there",
                self.account.name,
                local.imaps_port,
            )
            return
        try:
            self._tls_server = await asyncio.start_server(
                self._on_client,
                local.host,
                local.imaps_port,
                ssl=self.tls_context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            await self.close()
            raise ImapsListenError(exc, local.imaps_port) from exc
        except BaseException:
            await self.close()
            raise
        log.info("imap[%s] TLS on %s:%d", self.account.name, local.host, self.imaps_port)

    def session_count(self) -> int:
        """Client sessions open right now (for `localproxy status`)."""
        return len(self._sessions)

    async def close(self) -> None:
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        for server in servers:
            server.close()
        await cancel_and_wait(self._sessions)
        for server in servers:
            await server.wait_closed()
        self._server = self._tls_server = None
        if self._observers:  # they run in threads: let them finish with the key store
            await asyncio.wait(list(self._observers), timeout=OBSERVER_GRACE)

    def observe_in_background(self, header: bytes, context: MessageContext) -> None:
        """Hand a message's probed header fields to the observer, beside the session."""
        if self.header_observer is None:
            return
        if len(self._observers) >= MAX_PENDING_OBSERVERS:
            log.debug(
                "imap[%s] observers busy; uid %d not observed", self.account.name, context.uid
            )
            return
        task = asyncio.create_task(self._observe(self.header_observer, header, context))
        self._observers.add(task)
        task.add_done_callback(self._observers.discard)

    async def _observe(
        self, observer: HeaderObserver, header: bytes, context: MessageContext
    ) -> None:
        try:
            await observer(header, context)
        except Exception:
            log.warning(
                "imap[%s] header observer failed on uid %d",
                self.account.name,
                context.uid,
                exc_info=True,
            )

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await ImapSession(self, reader, writer, next(self._numbers)).run()
        except asyncio.CancelledError:
            # close() cancelled us; ending normally keeps asyncio's stream callback from
            # reporting the cancellation as an error
            pass
        finally:
            self._sessions.discard(task)


class ImapsListenError(OSError):
    """The implicit-TLS listener could not start (the plain one did): says which port."""

    def __init__(self, error: OSError, port: int) -> None:
        super().__init__(error.errno, error.strerror)
        self.port = port


def _bound_port(server: asyncio.Server | None) -> int:
    if server is None or not server.sockets:
        raise RuntimeError("the proxy is not listening")
    return int(server.sockets[0].getsockname()[1])


# --------------------------------------------------------------------------- per-session state


@dataclass(frozen=True)
class Selected:
    mailbox: bytes
    uidvalidity: int


ItemKey: TypeAlias = tuple[
    str, tuple[tuple[int, ...], str | None, tuple[str, ...]] | None, int | None
]


def item_key(item: FetchItem) -> ItemKey:
    """What identifies a fetch item in a response: name, section, partial origin."""
    section = None
    if item.section is not None:
        fields = tuple(name.upper() for name in item.section.fields)
        section = (item.section.part, item.section.text, fields)
    return item.name, section, item.partial[0] if item.partial else None


UID_KEY = item_key(UID_ITEM)


class Probes:
    """The items a rewritten FETCH gets on top of the client's: some top-level header
    fields (extra names for a header observer) and the first octets of the text."""

    def __init__(self, extra_header_names: Iterable[str] = ()) -> None:
        names = (*PROBE_HEADER_NAMES, *extra_header_names)
        self.header = FetchItem("BODY", Section((), "HEADER.FIELDS", names), peek=True)
        self.text = TEXT_PROBE
        self.header_key = item_key(self.header)
        self.text_key = item_key(self.text)
        self.keys = (self.header_key, self.text_key)


DEFAULT_PROBES = Probes()


@dataclass
class FetchContext:
    """A client FETCH the relay rewrote: what the client asked, what the relay added."""

    tag: bytes
    requested: list[FetchItem]
    added: set[ItemKey]  # items the client did not ask for: removed from responses
    # sent without probes: every message it names was known plain beforehand
    unprobed: bool = False
    # whole-message items asked upstream as a 1-octet partial (the view is cached): the
    # partial's response key -> the client's item, which the response must carry instead
    substituted: dict[ItemKey, FetchItem] = field(default_factory=dict)
    failure: str | None = None
    failure_code: bytes = b"UNAVAILABLE"
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def request_for(self, key: ItemKey) -> FetchItem | None:
        return next((item for item in self.requested if item_key(item) == key), None)

    def fail(self, reason: str, code: bytes = b"UNAVAILABLE") -> None:
        if self.failure is None:
            self.failure, self.failure_code = reason, code


@dataclass
class Pending:
    """A command sent upstream, waiting for its tagged response."""

    verb: bytes
    mailbox: bytes | None = None  # SELECT / EXAMINE
    uidvalidity: int | None = None
    credentials: Credentials | None = None  # LOGIN
    mechanism: bytes | None = None  # AUTHENTICATE
    sasl_initial: bytes | None = None
    sasl_responses: list[bytes] = field(default_factory=list)
    fetch: FetchContext | None = None


class ViewUnavailable(Exception):
    """The view of a message cannot be built; str() is fit for a NO text and a log line."""

    def __init__(self, reason: str, code: bytes = b"UNAVAILABLE") -> None:
        super().__init__(reason)
        self.code = code


class _UpstreamBroken(Exception):
    """The provider's side of the session is gone or unusable."""


class _ClientBroken(Exception):
    """The client broke the protocol in a way the relay cannot follow."""


@dataclass
class _ResponseItem:
    """One `name value` pair of a FETCH response: name and value as the provider wrote
    them (spliced unchanged into what the client gets), and the value parsed."""

    name: bytes
    value: bytes
    token: Token
    item: FetchItem | None  # None: a name the codec does not know
    key: ItemKey | None

    @property
    def content_derived(self) -> bool:
        return self.item.content_derived if self.item is not None else True


# --------------------------------------------------------------------------- the session


class ImapSession:
    """One client connection and its upstream connection."""

    def __init__(
        self,
        proxy: ImapProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        self.proxy = proxy
        self.account = proxy.account
        self.client_reader = reader
        self.client_writer = writer
        # After STARTTLS: the clear-text writer, kept so that collecting it cannot close
        # the connection the TLS layer now runs on
        self.plain_writer: asyncio.StreamWriter | None = None
        self.client_tls = writer.get_extra_info("sslcontext") is not None  # implicit TLS
        self.authenticated = False
        # while the client's TLS handshake runs, output waits here (None: write directly)
        self.held_output: list[bytes] | None = None
        # while the upstream loop handles one read, output collects here and goes out in
        # one write: one send() per response was a large share of a big FETCH
        self.client_out: list[bytes] | None = None
        self.name = f"imap[{self.account.name}#{number}]"
        self.probes = proxy.probes
        self.client = ClientParser(max_literal_size=proxy.max_literal_size)
        self.server = ServerParser(lazy_fetch=True)
        self.upstream: ImapUpstream | None = None
        self.upstream_caps: set[bytes] = set()
        self.pending: dict[bytes, Pending] = {}
        self.selected: Selected | None = None
        self.credentials: Credentials | None = None
        self.side: SideSession | None = None
        self.fetch: FetchContext | None = None
        self.literal_wait: tuple[bytes, asyncio.Future[bool]] | None = None
        self.auth_tag: bytes | None = None
        self.idle_tag: bytes | None = None
        # set while the client parser expects a DONE or SASL line instead of a command
        self.client_mode: str | None = None
        self.upstream_said_bye = False
        # The timeout of the upstream read in progress: armed while the provider owes an
        # answer (see _watch_provider); `writing` counts writes to it in progress.
        self.read_timer: asyncio.Timeout | None = None
        self.writing = 0
        # UID of each sequence number in the selected mailbox, None where not learned
        # yet; the whole map None when it may be wrong. Kept exact from the EXISTS,
        # EXPUNGE and FETCH responses, in the order the provider sent them.
        self.seq_uids: list[int | None] | None = None
        self.map_select_tag: bytes | None = None  # the SELECT whose EXISTS starts a map

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        peer = self.client_writer.get_extra_info("peername")
        log.info("%s client connected from %s", self.name, _peer(peer))
        try:
            if await self._connect_upstream():
                await self._relay()
        except asyncio.CancelledError:  # the proxy is shutting down: say so (RFC 9051 7.1.5)
            self._bye(b"UNAVAILABLE", "localproxy is shutting down")
            raise
        except Exception:
            log.exception("%s internal error", self.name)
            self._bye(b"SERVERBUG", "internal error in localproxy")
        finally:
            await self._shutdown()
            log.info("%s closed", self.name)

    async def _connect_upstream(self) -> bool:
        """Connect first, greet afterwards: some clients talk before the greeting."""
        try:
            self.upstream = await connect_imap(self.account.imap)
        except UpstreamError as exc:
            log.warning("%s provider unavailable: %s", self.name, exc)
            self._bye(b"UNAVAILABLE", f"localproxy: {exc}")
            return False
        except Exception as exc:
            log.warning("%s provider unavailable: %r", self.name, exc)
            self._bye(b"UNAVAILABLE", f"localproxy: cannot reach {self.account.imap.address}")
            return False
        greeting = trusted_greeting(self.upstream)
        parser = ServerParser()
        parser.feed(greeting)
        event = parser.next_event()
        if isinstance(event, Untagged):
            self._learn_capabilities(event)
            self.authenticated = event.status == b"PREAUTH"
        log.info("%s provider connected (%s)", self.name, self.upstream.tls.version)
        self._to_client(self._client_capabilities(greeting))
        return True

    async def _relay(self) -> None:
        tasks = [
            asyncio.create_task(self._client_loop(), name=f"{self.name} client"),
            asyncio.create_task(self._upstream_loop(), name=f"{self.name} upstream"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(tasks)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def _shutdown(self) -> None:
        # After a failed TLS handshake the connection is already gone, and the clear-text
        # writer would never learn it (the TLS layer had taken its place): do not wait.
        self._end_batch()
        connected = self.held_output is None
        if connected:
            with contextlib.suppress(Exception):
                await self.client_writer.drain()
        self.client_writer.close()
        if self.side is not None:
            await self.side.close()
        if self.upstream is not None:
            await self.upstream.close()
        if connected:
            with contextlib.suppress(Exception):
                await self.client_writer.wait_closed()
        if self.plain_writer is not None:
            self.plain_writer.close()

    def _to_client(self, data: bytes) -> None:
        if traffic.isEnabledFor(logging.DEBUG):
            traffic.debug("%s S: %r", self.name, data[:TRAFFIC_CHARS])
        if self.held_output is not None:
            self.held_output.append(data)
        elif self.client_out is not None:
            self.client_out.append(data)
        elif not self.client_writer.is_closing():
            self.client_writer.write(data)

    def _write_collected(self) -> None:
        """Send what the current batch collected so far (the batch goes on)."""
        out = self.client_out
        if out:
            self.client_out = []
            if self.held_output is not None:
                self.held_output.extend(out)
            elif not self.client_writer.is_closing():
                self.client_writer.write(b"".join(out))

    def _end_batch(self) -> None:
        self._write_collected()
        self.client_out = None

    def _bye(self, code: bytes, text: str) -> None:
        self._to_client(status_response(None, b"BYE", text, ResponseCode.build(code)))

    # -- client -> upstream -----------------------------------------------------------------

    async def _client_loop(self) -> None:
        try:
            while True:
                data = await self.client_reader.read(READ_SIZE)
                if not data:
                    log.info("%s client disconnected", self.name)
                    return
                self.client.feed(data)
                while (event := self.client.next_event()) is not None:
                    if not await self._on_client_event(event):
                        return
                await self.client_writer.drain()
        except _UpstreamBroken as exc:
            self._upstream_gone(str(exc))
        except OSError as exc:
            log.info("%s client connection failed: %r", self.name, exc)

    async def _on_client_event(self, event: object) -> bool:
        """Handle one client event; False ends the session."""
        if traffic.isEnabledFor(logging.DEBUG):
            traffic.debug("%s C: %r", self.name, _traffic_line(event))
        match event:
            case Command():
                await self._on_command(event)
            case ContinuationNeeded():
                self._to_client(b"+ Ready for literal data\r\n")
            case IdleDone(raw=raw):
                self.client_mode = None
                await self._write_upstream(raw)
            case ContinuationLine():
                self.client_mode = None
                self._on_continuation_line(event)
                await self._write_upstream(event.raw)
            case Rejected(tag=tag, reason=reason):
                log.info("%s rejected a client command: %s", self.name, reason)
                code = ResponseCode.build(b"TOOBIG") if _too_big(reason) else None
                self._to_client(status_response(tag, b"BAD", reason, code))
            case Fatal(reason=reason):
                log.warning("%s client stream unusable: %s", self.name, reason)
                self._bye(b"TOOBIG" if _too_big(reason) else b"CLIENTBUG", reason)
                return False
        return True

    def _on_continuation_line(self, event: ContinuationLine) -> None:
        pending = self.pending.get(self.auth_tag) if self.auth_tag else None
        if pending is not None and not event.cancelled:
            pending.sasl_responses.append(event.data)

    async def _on_command(self, command: Command) -> None:
        verb = command.verb
        if verb in BLOCKED_COMMANDS:
            self._to_client(status_response(command.tag, b"BAD", BLOCKED_COMMANDS[verb]))
            return
        if verb in (b"LOGIN", b"AUTHENTICATE") and self._login_disabled():
            text = "log in after STARTTLS: this port is reachable from the network"
            code = ResponseCode.build(b"PRIVACYREQUIRED")
            self._to_client(status_response(command.tag, b"NO", text, code))
            return
        handler = {
            b"STARTTLS": self._on_starttls,
            b"LOGIN": self._on_login,
            b"AUTHENTICATE": self._on_authenticate,
            b"IDLE": self._on_idle,
            b"SELECT": self._on_select,
            b"EXAMINE": self._on_select,
            b"FETCH": self._on_fetch,
            b"UID FETCH": self._on_fetch,
            b"APPEND": self._on_append,
            b"ENABLE": self._on_enable,
        }.get(verb)
        if handler is not None:
            await handler(command)
        else:
            await self._send(command, Pending(verb))

    # -- local TLS ------------------------------------------------------------------------------

    def _login_disabled(self) -> bool:
        return self.proxy.login_requires_tls and not self.client_tls

    def _client_capabilities(self, raw: bytes) -> bytes:
        """A capability line for the client: the provider's list filtered, plus what the
        relay itself offers before login (STARTTLS, LOGINDISABLED)."""
        return rewrite_capabilities(raw, CAPABILITY_POLICY, self._local_capabilities())

    def _local_capabilities(self) -> tuple[bytes, ...]:
        login_pending = any(p.verb in (b"LOGIN", b"AUTHENTICATE") for p in self.pending.values())
        if self.authenticated or login_pending or self.client_tls:
            return ()
        offered = (b"STARTTLS",) if self.proxy.tls_context is not None else ()
        return offered + ((b"LOGINDISABLED",) if self._login_disabled() else ())

    async def _on_starttls(self, command: Command) -> None:
        refusal = self._starttls_refusal(command)
        if refusal is not None:
            self._to_client(status_response(command.tag, b"BAD", refusal))
            return
        self._to_client(status_response(command.tag, b"OK", "Begin TLS negotiation now"))
        # Whatever the client sent after STARTTLS arrived in clear and may have been
        # injected by someone on the path: drop it unread (RFC 9051 11.1).
        self.client = ClientParser(max_literal_size=self.proxy.max_literal_size)
        try:
            await self._upgrade_client()
        except OSError as exc:  # ssl.SSLError, timeouts and resets included
            log.info("%s TLS handshake with the client failed: %r", self.name, exc)
            raise
        log.info("%s client switched to TLS", self.name)

    def _starttls_refusal(self, command: Command) -> str | None:
        if self.proxy.tls_context is None:
            return NO_LOCAL_TLS
        if self.client_tls:
            return "TLS is already active"
        if self.authenticated:
            return "STARTTLS is only allowed before login"
        if command.args:
            return "STARTTLS takes no arguments"
        if self.pending:
            return "STARTTLS must wait until the commands before it are complete"
        return None

    async def _upgrade_client(self) -> None:
        """TLS on the client connection. A fresh reader and protocol take over, so bytes
        that reached the clear-text reader before the handshake are never read."""
        context = self.proxy.tls_context
        assert context is not None
        self._end_batch()  # the OK above must go out in clear, before the handshake
        plain = self.client_writer
        self.held_output = []  # the provider's lines must not go out in clear meanwhile
        await plain.drain()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport = await loop.start_tls(
            plain.transport,
            protocol,
            context,
            server_side=True,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )
        protocol.connection_made(transport)  # start_tls leaves this to the caller
        self.plain_writer = plain
        self.client_reader = reader
        self.client_writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self.client_tls = True
        held, self.held_output = self.held_output, None
        for data in held:
            self._to_client(data)

    async def _send(self, command: Command, pending: Pending) -> None:
        """Send a command upstream; synchronizing literals wait for the provider's "+"."""
        self.pending[command.tag] = pending
        chunks = command.chunks(
            literal_plus=b"LITERAL+" in self.upstream_caps,
            literal_minus=b"LITERAL-" in self.upstream_caps,
        )
        for chunk in chunks:
            await self._write_upstream(chunk.head)
            if chunk.literal is None:
                continue
            if not await self._upstream_continuation(command.tag):
                return  # refused: the provider's tagged answer went to the client
            await self._write_upstream(chunk.literal)

    async def _write_upstream(self, data: bytes) -> None:
        """Send to the provider; each WRITE_CHUNK must leave within the upstream timeout.
        While sending, the provider owes no answer yet (a big literal on a slow link)."""
        assert self.upstream is not None
        writer, limit = self.upstream.writer, self.account.imap.timeout
        view = memoryview(data)
        self.writing += 1
        self._watch_provider()
        try:
            for start in range(0, len(view), WRITE_CHUNK):
                writer.write(view[start : start + WRITE_CHUNK])
                timer = asyncio.timeout(limit)
                try:
                    async with timer:
                        await writer.drain()
                except TimeoutError as exc:
                    if not timer.expired():
                        raise
                    text = f"the provider took no data for {limit:g} s (timeout)"
                    raise _UpstreamBroken(text) from exc
        except OSError as exc:
            raise _UpstreamBroken(f"sending to the provider failed ({exc})") from exc
        finally:
            self.writing -= 1
            self._watch_provider()

    def _watch_provider(self) -> None:
        """Time the provider while it owes an answer: a command is in flight, it is not
        the client's turn (IDLE, a SASL challenge) and the relay is not still sending.
        The clock restarts with every read, so only silence counts, not a slow answer."""
        timer = self.read_timer
        if timer is None or timer.expired():
            return
        if not self.pending or self.client_mode is not None or self.writing:
            timer.reschedule(None)
        elif timer.when() is None:
            timer.reschedule(asyncio.get_running_loop().time() + self.account.imap.timeout)

    async def _upstream_continuation(self, tag: bytes) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.literal_wait = (tag, future)
        try:
            return await future
        finally:
            self.literal_wait = None

    async def _on_login(self, command: Command) -> None:
        values = [astring_value(arg) for arg in command.args]
        credentials = None
        if len(values) == 2 and None not in values:
            user, password = values
            assert user is not None and password is not None
            credentials = Credentials(None, (user, password))
        await self._send(command, Pending(command.verb, credentials=credentials))

    async def _on_authenticate(self, command: Command) -> None:
        args = command.args
        mechanism = args[0].value.upper() if args and isinstance(args[0], Atom) else None
        initial = astring_value(args[1]) if len(args) > 1 else None
        pending = Pending(command.verb, mechanism=mechanism, sasl_initial=initial)
        self.auth_tag = command.tag
        await self._send(command, pending)

    async def _on_idle(self, command: Command) -> None:
        self.idle_tag = command.tag
        await self._send(command, Pending(command.verb))

    async def _on_select(self, command: Command) -> None:
        mailbox = astring_value(command.args[0]) if command.args else None
        # Only a SELECT with nothing else in flight starts a map: its EXISTS is then
        # surely about the new mailbox. Otherwise the map ends with the SELECT.
        self.map_select_tag = None if self.pending else command.tag
        if not self.pending:
            self.seq_uids = None
        await self._send(command, Pending(command.verb, mailbox=mailbox))

    async def _on_enable(self, command: Command) -> None:
        """Only extensions the client may see can be enabled upstream."""
        allowed = [
            arg
            for arg in command.args
            if isinstance(arg, Atom) and capability_allowed(arg.value, CAPABILITY_POLICY)
        ]
        if len(allowed) == len(command.args):
            await self._send(command, Pending(command.verb))
        elif allowed:
            await self._send(build_command(command.tag, b"ENABLE", allowed), Pending(b"ENABLE"))
        else:
            self._to_client(b"* ENABLED\r\n" + status_response(command.tag, b"OK", "ENABLE done"))

    # -- APPEND ---------------------------------------------------------------------------------

    async def _on_append(self, command: Command) -> None:
        target = self._append_target(command)
        if target is None:
            await self._send(command, Pending(command.verb))
            return
        mailbox, message = target
        transform = self.proxy.append_transformer
        assert transform is not None
        try:
            data = await transform(mailbox.decode("utf-8", "replace"), message.data)
        except Exception as exc:
            log.warning("%s APPEND to a protected mailbox failed: %r", self.name, exc)
            text = f"localproxy: could not prepare the message for this mailbox ({exc})"
            self._to_client(status_response(command.tag, b"NO", text))
            return
        args = (*command.args[:-1], Literal(data, message.form))
        log.info("%s APPEND to a \\Sent/\\Drafts mailbox transformed", self.name)
        await self._send(build_command(command.tag, b"APPEND", args), Pending(command.verb))

    def _append_target(self, command: Command) -> tuple[bytes, Literal] | None:
        """(mailbox, message) of a single-message APPEND into a Sent/Drafts mailbox."""
        args = command.args
        if self.proxy.append_transformer is None or not 2 <= len(args) <= 4:
            return None
        mailbox, message = astring_value(args[0]), args[-1]
        if mailbox is None or not isinstance(message, Literal):
            return None
        if not all(isinstance(arg, PList | Quoted) for arg in args[1:-1]):
            return None  # UTF8 (...), CATENATE or something new: not ours to rewrite
        if _mailbox_key(mailbox) not in self.proxy.append_mailboxes:
            return None
        return mailbox, message

    def _learn_special_use(self, response: Untagged) -> None:
        tokens = response.tokens
        if len(tokens) < 4 or not isinstance(tokens[1], PList):
            return
        flags = {t.value.upper() for t in tokens[1].items if isinstance(t, Atom)}
        name = astring_value(tokens[3])
        if name is not None and flags & SPECIAL_USE_APPEND:
            self.proxy.append_mailboxes.add(_mailbox_key(name))

    # -- FETCH: the request ---------------------------------------------------------------------

    async def _on_fetch(self, command: Command) -> None:
        try:
            request = parse_fetch_request(command.args)
        except ImapSyntaxError:
            await self._send(command, Pending(command.verb))  # the provider answers BAD
            return
        if not any(item.content_derived for item in request.items):
            await self._send(command, Pending(command.verb))
            return
        uid_command = command.subcommand is not None
        if self._all_viewed(request.sequence_set, uid_command) and await self._fetch_from_views(
            command, request.items, uid_command
        ):
            return
        if (
            not uid_command
            and not self.pending
            and self._mostly_known(request.sequence_set)
            and not self._all_known_plain(request.sequence_set, uid_command)
        ):
            await self._fetch_with_uid(command, request.items)
            return
        if self._all_known_plain(request.sequence_set, uid_command):
            context = FetchContext(command.tag, request.items, set(), unprobed=True)
            log.debug(
                "%s FETCH %s of known plain messages sent without probes", self.name, command.tag
            )
            await self._send_fetch(command, context)
            return
        items, added = _upstream_fetch_items(
            command.args[1], request.items, uid_command, self.probes
        )
        context = FetchContext(command.tag, request.items, added)
        args = (command.args[0], PList(tuple(items)), *command.args[2:])
        rewritten = build_command(command.tag, command.name, args, command.subcommand)
        await self._send_fetch(rewritten, context)

    async def _fetch_with_uid(self, command: Command, requested: list[FetchItem]) -> None:
        """The FETCH with UID added but no probes: each response then says by its UID
        whether the message is known plain (UID removed, passed on) or not (a view)."""
        items, added = _upstream_fetch_items(command.args[1], requested, False, None)
        context = FetchContext(command.tag, requested, added, unprobed=True)
        args = (command.args[0], PList(tuple(items)), *command.args[2:])
        rewritten = build_command(command.tag, command.name, args, command.subcommand)
        log.debug(
            "%s FETCH %s of mostly plain messages sent without probes", self.name, command.tag
        )
        await self._send_fetch(rewritten, context)

    async def _fetch_from_views(
        self, command: Command, requested: list[FetchItem], uid_command: bool
    ) -> bool:
        """The FETCH with each whole-message item replaced by a 1-octet partial: the
        views are cached, so the ciphertext need not cross the wire again. The partial
        keeps the item's place and, without .PEEK, its setting of \\Seen. False (nothing
        sent) when the request has no such item or the stand-ins would be ambiguous."""
        items, added = _upstream_fetch_items(command.args[1], requested, uid_command, None)
        stand_ins = _stand_ins(items, requested)
        if stand_ins is None:
            return False
        tokens, substituted = stand_ins
        context = FetchContext(
            command.tag, requested, added, unprobed=True, substituted=substituted
        )
        args = (command.args[0], PList(tuple(tokens)), *command.args[2:])
        rewritten = build_command(command.tag, command.name, args, command.subcommand)
        log.debug("%s FETCH %s served from cached views", self.name, command.tag)
        await self._send_fetch(rewritten, context)
        return True

    async def _send_fetch(self, command: Command, context: FetchContext) -> None:
        self.fetch = context
        try:
            await self._send(command, Pending(command.verb, fetch=context))
            # One rewritten FETCH at a time: its untagged responses are then attributable,
            # and they go out in order even while a view is being built.
            await context.done.wait()
        finally:
            self.fetch = None

    # -- upstream -> client -----------------------------------------------------------------

    async def _upstream_loop(self) -> None:
        assert self.upstream is not None
        try:
            while True:
                self.server.feed(await self._read_upstream())
                self.client_out = []
                try:
                    while (event := self.server.next_event()) is not None:
                        await self._on_server_event(event)
                finally:
                    self._end_batch()
                await self.client_writer.drain()
        except _UpstreamBroken as exc:
            self._upstream_gone(str(exc))
        except _ClientBroken as exc:
            log.warning("%s client protocol violation: %s", self.name, exc)
            self._bye(b"CLIENTBUG", str(exc))
        except OSError as exc:  # writing to the client
            log.info("%s client connection failed: %r", self.name, exc)

    async def _read_upstream(self) -> bytes:
        assert self.upstream is not None
        timer = asyncio.timeout(None)
        try:
            async with timer:
                self.read_timer = timer
                self._watch_provider()
                data = await self.upstream.reader.read(READ_SIZE)
        except OSError as exc:  # TimeoutError included
            if isinstance(exc, TimeoutError) and timer.expired():
                limit = self.account.imap.timeout
                text = f"the provider did not answer within {limit:g} s (timeout)"
                raise _UpstreamBroken(text) from exc
            raise _UpstreamBroken(f"connection to the provider failed ({exc!r})") from exc
        finally:
            self.read_timer = None
        if not data:
            raise _UpstreamBroken("the provider closed the connection")
        return data

    def _end_literal_wait(self, go_ahead: bool) -> None:
        if self.literal_wait is not None and not self.literal_wait[1].done():
            self.literal_wait[1].set_result(go_ahead)

    def _upstream_gone(self, reason: str) -> None:
        self._end_literal_wait(False)
        if self.client_writer.is_closing():
            return
        if self.upstream_said_bye:
            log.info("%s provider ended the session", self.name)
            return
        log.warning("%s provider connection lost: %s", self.name, reason)
        self._bye(b"UNAVAILABLE", f"localproxy: {reason}")

    async def _on_server_event(self, event: ServerEvent) -> None:
        match event:
            case RawFetch():
                await self._on_raw_fetch(event)
            case Untagged():
                await self._on_untagged(event)
            case Tagged():
                self._on_tagged(event)
            case Continuation():
                self._on_continuation(event)
            case Unparsed():
                self._on_unparsed(event)
            case Fatal(reason=reason):
                raise _UpstreamBroken(f"unusable response from the provider: {reason}")

    async def _on_untagged(self, response: Untagged) -> None:
        has_caps = self._learn_capabilities(response)
        if response.status == b"BYE":
            self.upstream_said_bye = True
        if response.code is not None and response.code.name == b"UIDVALIDITY":
            self._on_uidvalidity(response.code)
        if response.status is None:
            if response.name == b"FETCH":
                await self._on_fetch_response(response)
                return
            self._track_sequence(response)
            if response.name in (b"LIST", b"XLIST"):
                self._learn_special_use(response)
            has_caps = has_caps or response.name == b"ENABLED"
        raw = response.raw
        self._to_client(self._client_capabilities(raw) if has_caps else raw)

    def _on_tagged(self, response: Tagged) -> None:
        if self.literal_wait is not None and self.literal_wait[0] == response.tag:
            self._end_literal_wait(False)  # refused instead of "+"
        has_caps = self._learn_capabilities(response)
        raw = response.raw
        pending = self.pending.pop(response.tag, None)
        if pending is not None:
            raw = self._complete(pending, response) or raw
        self._to_client(self._client_capabilities(raw) if has_caps else raw)
        if pending is not None and pending.fetch is not None:
            pending.fetch.done.set()

    def _complete(self, pending: Pending, response: Tagged) -> bytes | None:
        """State changes of a completed command; returns a replacement tagged line."""
        ok = response.status == b"OK"
        if pending.verb in (b"LOGIN", b"AUTHENTICATE"):
            self._on_login_done(pending, ok)
        elif pending.verb == b"IDLE":
            self.idle_tag = None
            self._back_to_commands()
        elif pending.verb in (b"SELECT", b"EXAMINE"):
            if not ok or response.tag != self.map_select_tag:
                self.seq_uids = None
            self.map_select_tag = None
            if ok and pending.mailbox is not None and pending.uidvalidity is not None:
                self.selected = Selected(pending.mailbox, pending.uidvalidity)
            elif response.status != b"BAD":
                self.selected = None
        elif pending.verb in (b"CLOSE", b"UNSELECT") and ok:
            self.selected = None
            self.seq_uids = None
        elif pending.fetch is not None and pending.fetch.failure is not None and ok:
            context = pending.fetch
            text = f"localproxy: {context.failure}"
            code = ResponseCode.build(context.failure_code)
            return status_response(response.tag, b"NO", text, code)
        return None

    def _on_login_done(self, pending: Pending, ok: bool) -> None:
        if pending.verb == b"AUTHENTICATE":
            self.auth_tag = None
            self._back_to_commands()
        if not ok:
            return
        self.authenticated = True
        credentials = pending.credentials
        if pending.verb == b"AUTHENTICATE" and pending.mechanism in REPLAYABLE_MECHANISMS:
            credentials = Credentials(
                pending.mechanism,
                initial=pending.sasl_initial,
                responses=tuple(pending.sasl_responses),
            )
        self.credentials = credentials
        if self.side is not None:
            self.side.credentials = credentials
        mechanism = (pending.mechanism or b"LOGIN").decode("ascii", "replace")
        log.info("%s logged in (%s)", self.name, mechanism)

    def _on_continuation(self, response: Continuation) -> None:
        if self.literal_wait is not None:
            self._end_literal_wait(True)
            return  # our own literal: the client already had its "+" from us
        if self.auth_tag is not None:
            self._switch_client("sasl", self.client.expect_continuation_line)
        elif self.idle_tag is not None and self.client_mode is None:
            self._switch_client("done", self.client.expect_done)
        self._to_client(response.raw)

    def _switch_client(self, mode: str, switch: Callable[[], None]) -> None:
        """Before forwarding "+": the client's next line answers it, not a new command."""
        try:
            switch()
        except RuntimeError:
            raise _ClientBroken("command sent before the server's continuation") from None
        self.client_mode = mode

    def _back_to_commands(self) -> None:
        """IDLE or AUTHENTICATE ended without the client's line (rejected, or the server
        ended it): the client's next line is a command again."""
        if self.client_mode is not None:
            self.client.expect_command()
            self.client_mode = None

    def _on_unparsed(self, response: Unparsed) -> None:
        if _FETCH_HEAD.match(response.raw):
            self._unreadable_fetch(response.raw)
            return
        self._to_client(response.raw)

    def _learn_capabilities(self, response: Untagged | Tagged) -> bool:
        caps = capabilities_of(response)
        if caps is None:
            return False
        self.upstream_caps = {cap.upper() for cap in caps}
        return True

    def _on_uidvalidity(self, code: ResponseCode) -> None:
        if not code.args or not isinstance(code.args[0], Number):
            return
        value = code.args[0].value
        for pending in self.pending.values():
            if pending.verb in (b"SELECT", b"EXAMINE"):
                pending.uidvalidity = value
        if self.selected is not None and not any(
            p.verb in (b"SELECT", b"EXAMINE") for p in self.pending.values()
        ):
            self.selected = Selected(self.selected.mailbox, value)
            self.seq_uids = None  # a new UIDVALIDITY outside SELECT: every UID changed

    # -- the sequence-number map ------------------------------------------------------------

    def _track_sequence(self, response: Untagged) -> None:
        """Keep `seq_uids` exact: EXISTS adds unknown messages at the end, EXPUNGE
        renumbers, VANISHED (QRESYNC) removes messages the map cannot place."""
        name, number = response.name, response.number
        if name == b"EXISTS" and number is not None:
            self._on_exists(number)
        elif name == b"EXPUNGE" and self.seq_uids is not None:
            if number is not None and 1 <= number <= len(self.seq_uids):
                del self.seq_uids[number - 1]
            else:
                self.seq_uids = None
        elif name == b"VANISHED" and not _vanished_earlier(response):
            self.seq_uids = None  # (EARLIER) only reports the past: no renumbering

    def _on_exists(self, count: int) -> None:
        if count > MAX_SEQUENCE_MAP:
            self.seq_uids = None
        elif self.map_select_tag is not None and self.map_select_tag in self.pending:
            self.seq_uids = [None] * count
        elif self.seq_uids is not None:
            if count < len(self.seq_uids):  # EXISTS never shrinks the mailbox
                self.seq_uids = None
            else:
                self.seq_uids.extend([None] * (count - len(self.seq_uids)))

    def _learn_uid(self, sequence: int, uid: int) -> None:
        uids = self.seq_uids
        if uids is None:
            return
        if 1 <= sequence <= len(uids):
            uids[sequence - 1] = uid
        else:
            self.seq_uids = None  # a message the map never heard of: it is not exact

    def _uid_at(self, sequence: int) -> int | None:
        uids = self.seq_uids
        return uids[sequence - 1] if uids is not None and 1 <= sequence <= len(uids) else None

    def _plain_uids(self) -> AbstractSet[int]:
        selected = self.selected
        if selected is None:
            return frozenset()
        return self.proxy.cache.plain_uids(
            self.account.name, selected.mailbox, selected.uidvalidity
        )

    def _mostly_known(self, sequence_set: SequenceSet) -> bool:
        """After a new SELECT the map is empty, yet the mailbox may be well known: are at
        least as many of its UIDs known plain as the FETCH names messages? Then asking
        for UIDs alone is worth it; a message not known plain is still served right,
        from a view."""
        uids = self.seq_uids
        if uids is None or sequence_set.saved or not uids:
            return False
        named = sum(high - low + 1 for low, high in sequence_set.resolve(len(uids)))
        return len(self._plain_uids()) >= named

    def _all_known_plain(self, sequence_set: SequenceSet, uid_command: bool) -> bool:
        """Does this FETCH name only messages known to be plain? Then it needs neither
        probes nor rewriting. Decided only with nothing else in flight: no response the
        relay has yet to read can renumber the mailbox under it."""
        uids = self.seq_uids
        if self.pending or uids is None or sequence_set.saved or self.selected is None:
            return False
        plain = self._plain_uids()
        if not uid_command:
            ranges = sequence_set.resolve(len(uids))
            if not ranges or ranges[-1][1] > len(uids):
                return False
            return all(uids[n - 1] in plain for low, high in ranges for n in range(low, high + 1))
        if None in uids:
            return False  # which UIDs exist is not known
        known = [uid for uid in uids if uid is not None]
        ranges = sequence_set.resolve(max(known, default=0))
        named = [uid for uid in known if any(low <= uid <= high for low, high in ranges)]
        return bool(named) and all(uid in plain for uid in named)

    def _all_viewed(self, sequence_set: SequenceSet, uid_command: bool) -> bool:
        """Does every message this FETCH names have a cached view, and none is known
        plain? Exact where the sequence-number map is known; for a UID FETCH after a new
        SELECT a bet like _mostly_known. A lost bet costs time, not correctness: an
        uncached message is served from a view built through the side session."""
        uids, selected = self.seq_uids, self.selected
        if self.pending or not uids or sequence_set.saved or selected is None:
            return False
        viewed = self.proxy.cache.viewed_uids(
            self.account.name, selected.mailbox, selected.uidvalidity
        )
        if not viewed:
            return False
        if not uid_command:
            ranges = sequence_set.resolve(len(uids))
            if not ranges or ranges[-1][1] > len(uids):
                return False
            return all(uids[n - 1] in viewed for low, high in ranges for n in range(low, high + 1))
        ranges = sequence_set.resolve(MAX_UID)  # "*" may stand for any UID

        def named(uid: int) -> bool:
            return any(low <= uid <= high for low, high in ranges)

        if any(named(uid) for uid in self._plain_uids()):
            return False
        if None not in uids:
            hits = [uid for uid in uids if uid is not None and named(uid)]
            return bool(hits) and all(uid in viewed for uid in hits)
        span = sum(high - low + 1 for low, high in ranges)
        return sum(1 for uid in viewed if named(uid)) >= min(len(uids), span)

    # -- FETCH: the responses -------------------------------------------------------------------

    def _unreadable_fetch(self, raw: bytes) -> None:
        """A FETCH response that breaks the grammar: it may carry content, so a rewritten
        FETCH fails rather than pass it on; an unsolicited one goes out as it came."""
        log.warning("%s unreadable FETCH response from the provider", self.name)
        if self.fetch is not None:
            self.fetch.fail("unreadable FETCH response from the provider")
        else:
            self._to_client(raw)

    async def _on_raw_fetch(self, event: RawFetch) -> None:
        """Most FETCH responses of a big mailbox are about known plain messages and go
        out unchanged: those are never tokenized."""
        forward = self._plain_passthrough(event.raw, event.number)
        if forward is not None:
            self._to_client(forward)
        else:
            await self._on_server_event(event.parse())

    def _plain_passthrough(self, raw: bytes, sequence: int) -> bytes | None:
        """What to send for a response about a known plain message that carries nothing
        of the relay's but, perhaps, a UID it added; None: read it in full. The message
        is known by a UID among the leading simple items, else by the sequence-number
        map (exact, see _track_sequence). A malformed response about a plain message is
        passed on as received: it holds nothing the relay would change."""
        context = self.fetch
        if context is not None and context.substituted:
            return None  # its items are stand-ins: they must be replaced
        head = _HEAD_UID.match(raw)
        uid = int(head[1]) if head is not None else self._uid_at(sequence)
        if uid is None or uid not in self._plain_uids():
            return None
        if context is None or not context.added:
            return raw  # nothing of ours in it, nothing to change
        if context.unprobed and context.added == {UID_KEY}:
            return self._without_added_uid(raw)
        return None

    async def _on_fetch_response(self, response: Untagged) -> None:
        context = self.fetch
        passthrough = context is None or not context.substituted
        if (
            passthrough
            and (context is None or not context.added)
            and self._known_plain_response(response)
        ):
            self._to_client(response.raw)  # nothing of ours in it, nothing to change
            return
        if passthrough and context is not None and context.unprobed and context.added == {UID_KEY}:
            stripped = self._without_added_uid(response.raw)
            if stripped is not None:
                self._to_client(stripped)
                return
        parsed = _response_items(response)
        if parsed is None:
            self._unreadable_fetch(response.raw)
            return
        sequence, items = parsed
        uid = _uid_of(items)
        if uid is not None:
            self._learn_uid(sequence, uid)
        # Only a response carrying the probes answers the rewritten command; others (an
        # earlier pipelined UID FETCH FLAGS, a flag update) keep everything they have.
        ours = context is not None and any(i.key in self.probes.keys for i in items)
        ours = ours or (context is not None and context.unprobed)
        added = context.added if ours and context is not None else set()
        content = [i for i in items if i.content_derived and i.key not in added]
        if ours:
            self._observe_headers(items)
        # Without probes (unsolicited, or split off by the provider) nothing tells a
        # plain message from an encrypted one: the view is always right.
        known = uid is not None and uid in self._plain_uids()
        plain = known or (ours and not _needs_view(items, self.probes))
        if ours and context is not None and any(i.key in context.substituted for i in items):
            plain = False  # a stand-in, not the message: only a view can answer
        if plain and not known and uid is not None and self.selected is not None:
            key = ViewKey(self.account.name, self.selected.mailbox, self.selected.uidvalidity, uid)
            self.proxy.cache.mark_plain(key)
        if not content or plain:
            self._forward_fetch(response.raw, sequence, items, added)
        else:
            await self._serve_view(sequence, items, added, context)

    def _without_added_uid(self, raw: bytes) -> bytes | None:
        """A known-plain response minus the UID the relay added, cut out of the bytes
        when the provider put it first (as Dovecot does); None: take the long way."""
        match = _LEADING_UID.match(raw)
        if match is None or int(match[3]) not in self._plain_uids():
            return None
        self._learn_uid(int(match[1]), int(match[3]))
        return raw[: match.start(2)] + raw[match.end(2) :]

    def _known_plain_response(self, response: Untagged) -> bool:
        """Is this response about a message known to be plain? By its UID item, else by
        the sequence-number map; anything unsure is no."""
        pairs = _fetch_pair_tokens(response)
        if pairs is None or response.number is None:
            return False  # the full parse decides what to do with it
        uid = _quick_uid(pairs)
        if uid is None:
            uid = self._uid_at(response.number)
        return uid is not None and uid in self._plain_uids()

    def _observe_headers(self, items: list[_ResponseItem]) -> None:
        if self.proxy.header_observer is None or self.selected is None:
            return
        header = next((i.token for i in items if i.key == self.probes.header_key), None)
        header_block, uid = _string_value(header), _uid_of(items)
        if header_block is None or uid is None:
            return
        mailbox = self.selected.mailbox.decode("utf-8", "replace")
        context = MessageContext(self.account.name, mailbox, self.selected.uidvalidity, uid)
        self.proxy.observe_in_background(header_block, context)

    def _forward_fetch(
        self, raw: bytes, sequence: int, items: list[_ResponseItem], added: set[ItemKey]
    ) -> None:
        """The provider's response, minus the relay's additions; every item kept is
        spliced byte for byte."""
        kept = [i for i in items if i.key not in added]
        if len(kept) == len(items):
            self._to_client(raw)
        else:
            self._to_client(serialize_fetch_response(sequence, [(i.name, i.value) for i in kept]))

    async def _serve_view(
        self,
        sequence: int,
        items: list[_ResponseItem],
        added: set[ItemKey],
        context: FetchContext | None,
    ) -> None:
        uid = _uid_of(items)
        if uid is None:  # a FETCH sent without probes carries no UID unless asked
            uid = self._uid_at(sequence)
        served: list[tuple[bytes, Token | bytes]]
        self._write_collected()  # building a view may take a while: send what is ready
        try:
            view = await self._view(uid, _whole_message(items))
            served = _view_items(view, items, added, context)
        except Exception as exc:
            code = _failure_code(exc)
            if not isinstance(exc, ViewUnavailable | BinaryError):
                log.exception("%s view of uid %s failed", self.name, uid)
                exc = ViewUnavailable(f"internal error ({exc.__class__.__name__})")
            log.warning("%s message uid %s withheld: %s", self.name, uid, exc)
            if context is not None:
                context.fail(f"message UID {uid} is not available right now: {exc}", code)
                return
            # unsolicited: pass on what does not depend on content, if anything
            served = [(i.name, i.value) for i in items if not i.content_derived]
            if not served:
                return
        self._to_client(serialize_fetch_response(sequence, served))

    async def _view(self, uid: int | None, stored: bytes | None) -> MessageView:
        """The cached view of a message, built from `stored` (the whole message, when the
        provider's response happens to carry it) or from a side-session fetch."""
        if uid is None:
            raise ViewUnavailable("the provider's FETCH response carries no UID")
        if self.selected is None:
            raise ViewUnavailable("the selected mailbox is unknown")
        selected = self.selected
        key = ViewKey(self.account.name, selected.mailbox, selected.uidvalidity, uid)
        return await self.proxy.cache.get_or_build(key, lambda: self._build_view(key, stored))

    async def _build_view(self, key: ViewKey, stored: bytes | None) -> bytes:
        if stored is None:
            stored = await self._fetch_stored(key)
        mailbox = key.mailbox.decode("utf-8", "replace")
        context = MessageContext(self.account.name, mailbox, key.uidvalidity, key.uid)
        try:
            view = await self.proxy.transformer(stored, context)
        except Exception as exc:
            raise ViewUnavailable(
                f"transforming the message failed ({exc.__class__.__name__})"
            ) from exc
        log.info("%s built the view of uid %d (%d octets)", self.name, key.uid, len(view))
        return view

    async def _fetch_stored(self, key: ViewKey) -> bytes:
        if self.credentials is None:
            raise ViewUnavailable("the login method cannot be reused for fetching the message")
        if self.side is None:
            self.side = SideSession(self.account.imap, self.credentials, self.name)
        try:
            return await self.side.fetch(key.mailbox, key.uidvalidity, key.uid)
        except SideSessionError as exc:
            raise ViewUnavailable(str(exc)) from exc


# --------------------------------------------------------------------------- FETCH helpers


def _upstream_fetch_items(
    requested_token: Token,
    requested: list[FetchItem],
    uid_command: bool,
    probes: Probes | None = DEFAULT_PROBES,
) -> tuple[list[Token], set[ItemKey]]:
    """The client's items as it wrote them, plus UID and the probes it did not ask for."""
    if isinstance(requested_token, PList):
        tokens = list(requested_token.items)
    elif isinstance(requested_token, Atom) and b"[" not in requested_token.value:
        # a macro (ALL, FAST, FULL) or a single atom: spelled out, as macros cannot be
        # combined with other items
        tokens = [Atom(item.request_bytes()) for item in requested]
    else:
        tokens = [requested_token]
    present = {item_key(item) for item in requested}
    added: set[ItemKey] = set()
    extras = [probes.header, probes.text] if probes is not None else []
    if not uid_command:
        extras.insert(0, UID_ITEM)
    for extra in extras:
        key = item_key(extra)
        if key not in present:
            tokens.append(Atom(extra.request_bytes()))
            added.add(key)
    return tokens, added


# `* 12 FETCH (UID 7 ...`: group 2 is the UID item and its space, for cutting it out
# after nothing but simple items (no string or literal that could hold "UID 1 " itself);
# Dovecot writes FLAGS and RFC822.SIZE before UID
_LEADING_UID = re.compile(
    rb"\* (\d+) FETCH \("
    rb'(?:FLAGS \([^()"{]*\) |RFC822\.SIZE \d+ |INTERNALDATE "[^"]*" |MODSEQ \(\d+\) )*'
    rb"(UID (\d+) )(?=[A-Za-z])"
)
# `* 12 FETCH (FLAGS (\Seen) UID 7 ...`: the UID when only simple items precede it
_HEAD_UID = re.compile(
    rb"\* \d+ FETCH \("
    rb'(?:FLAGS \([^()"{]*\) |RFC822\.SIZE \d+ |INTERNALDATE "[^"]*" |MODSEQ \(\d+\) )*'
    rb"UID (\d+)[ )]"
)
# An Unparsed event that is a FETCH response (see _on_unparsed)
_FETCH_HEAD = re.compile(rb"\* +\d+ +FETCH\b", re.I)


def _stand_ins(
    tokens: list[Token], requested: list[FetchItem]
) -> tuple[list[Token], dict[ItemKey, FetchItem]] | None:
    """`tokens` (the client's items first, in order, as _upstream_fetch_items gives them)
    with BODY[], BODY.PEEK[] and RFC822 as BODY[]<0.1> (.PEEK kept; RFC822 sets \\Seen
    as BODY[] does), and what each stand-in's response key stands for. None when there
    is none, or when a response item could not be told apart: two stand-ins, or a
    partial of the client's own with the same response name (BODY[]<0>)."""
    out = list(tokens)
    substituted: dict[ItemKey, FetchItem] = {}
    for index, item in enumerate(requested):
        if item_key(item) not in _WHOLE_MESSAGE_KEYS:
            continue
        stand_in = FetchItem("BODY", Section(), (0, 1), peek=item.peek)
        key = item_key(stand_in)
        if key in substituted:
            return None
        substituted[key] = item
        out[index] = Atom(stand_in.request_bytes())
    if not substituted or any(item_key(item) in substituted for item in requested):
        return None
    return out, substituted


def _response_items(response: Untagged) -> tuple[int, list[_ResponseItem]] | None:
    """The pairs of `* n FETCH (name value ...)`, each with its exact bytes, so items the
    relay does not change are forwarded byte for byte. None if it is not readable."""
    try:
        spans = fetch_item_spans(response)
    except ImapSyntaxError:
        return None
    sequence = response.number
    assert sequence is not None  # fetch_item_spans checked the response's form
    return sequence, [_response_item(span) for span in spans]


def _response_item(span: FetchItemSpan) -> _ResponseItem:
    try:
        item: FetchItem | None = parse_fetch_item(span.name_token, response=True)
    except ImapSyntaxError:
        item = None
    key = item_key(item) if item is not None else None
    return _ResponseItem(span.name, span.raw, span.value, item, key)


_WHOLE_MESSAGE_KEYS = (("BODY", ((), None, ()), None), ("RFC822", None, None))


def _whole_message(items: list[_ResponseItem]) -> bytes | None:
    """The stored message itself, if the response carries it whole (BODY[] or RFC822)."""
    for entry in items:
        if entry.key in _WHOLE_MESSAGE_KEYS:
            return _string_value(entry.token)
    return None


def _fetch_pair_tokens(response: Untagged) -> tuple[Token, ...] | None:
    """The name/value tokens of a well-formed `* n FETCH (...)`, without splitting the
    response into items; None when it is not of that form."""
    tokens = response.tokens
    if len(tokens) != 3 or not isinstance(tokens[0], Number):
        return None
    if not isinstance(tokens[2], PList) or len(tokens[2].items) % 2:
        return None
    return tokens[2].items


def _quick_uid(pairs: tuple[Token, ...]) -> int | None:
    for index in range(0, len(pairs), 2):
        name = pairs[index]
        if isinstance(name, Atom) and name.value.upper() == b"UID":
            value = pairs[index + 1]
            return value.value if isinstance(value, Number) else None
    return None


def _vanished_earlier(response: Untagged) -> bool:
    tokens = response.tokens
    if len(tokens) < 2 or not isinstance(tokens[1], PList):
        return False
    return any(isinstance(t, Atom) and t.value.upper() == b"EARLIER" for t in tokens[1].items)


def _uid_of(items: list[_ResponseItem]) -> int | None:
    for entry in items:
        if entry.key == UID_KEY:
            return entry.token.value if isinstance(entry.token, Number) else None
    return None


def _string_value(value: Token | None) -> bytes | None:
    if isinstance(value, Literal):
        return value.data
    if isinstance(value, Quoted):
        return value.value
    return None


def _needs_view(items: list[_ResponseItem], probes: Probes = DEFAULT_PROBES) -> bool:
    """From the probes: must this message be served from a view? Unknown means yes: the
    view is always right, only slower."""
    values = {i.key: _string_value(i.token) for i in items if i.key in probes.keys}
    header = values.get(probes.header_key)
    if header is None:
        return True
    fields = parse_headers(header)
    if any(_is_status_header(f.name) for f in fields):
        return True
    content_type = next((f for f in fields if f.name.lower() == "content-type"), None)
    ctype, _ = content_type_of(content_type)
    if ctype in VIEW_TYPES:
        return True
    if ctype != "text/plain":
        return False
    encoding = next((f for f in fields if f.name.lower() == "content-transfer-encoding"), None)
    text = values.get(probes.text_key)
    return _may_be_armored(text, encoding.value.lower() if encoding else "")


def _may_be_armored(text: bytes | None, encoding: str) -> bool:
    """Does a text/plain body start (after whitespace) with an OpenPGP armor line? Only
    the first TEXT_PROBE_LENGTH octets are known; undecidable counts as yes."""
    if text is None:
        return True
    cut_short = len(text) >= TEXT_PROBE_LENGTH
    try:
        decoded = _decode_prefix(text, encoding)
    except (binascii.Error, ValueError):
        return True
    start = decoded.lstrip()
    for armor in ARMOR_LINES:
        if start.startswith(armor):
            return True
        if cut_short and len(start) < len(armor) and armor.startswith(start):
            return True
    return False


def _decode_prefix(text: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        compact = b"".join(text.split())
        return base64.b64decode(compact[: len(compact) // 4 * 4])
    if encoding == "quoted-printable":
        return quopri.decodestring(text)
    return text


def _view_items(
    view: MessageView,
    items: list[_ResponseItem],
    added: set[ItemKey],
    context: FetchContext | None,
) -> list[tuple[bytes, Token | bytes]]:
    """The response with every content item computed from the view, names and metadata
    as the provider sent them (bytes), the relay's own additions removed."""
    served: list[tuple[bytes, Token | bytes]] = []
    for entry in items:
        if entry.key in added:
            continue
        if not entry.content_derived:
            served.append((entry.name, entry.value))
            continue
        name, item = entry.name, _requested_item(entry, context)
        if context is not None and entry.key in context.substituted:
            item = context.substituted[entry.key]  # named as the client asked, whole
            name = item.response_name()
        value = view_value(view, item) if item is not None else None
        if value is None:
            log.warning("cannot compute FETCH item %r from a view; left out", entry.name)
            continue
        served.append((name, value))
    return served


def _requested_item(entry: _ResponseItem, context: FetchContext | None) -> FetchItem | None:
    """The request behind a response item: it has the partial length a response lacks."""
    if entry.item is None or entry.key is None:
        return None
    requested = context.request_for(entry.key) if context is not None else None
    if requested is not None:
        return requested
    if entry.item.partial is not None:  # unsolicited partial: the rest of the section
        return FetchItem(entry.item.name, entry.item.section, (entry.item.partial[0], None))
    return entry.item


def view_value(view: MessageView, item: FetchItem) -> Token | None:
    """The value of one content-derived item from the view; None for items it cannot
    compute. Pre-encoded lists travel as Atom, which serializes its bytes unchanged."""
    name, section = item.name, item.section
    if name == "RFC822.SIZE":
        return Number(view.rfc822_size())
    if name == "ENVELOPE":
        return Atom(view.envelope())
    if name == "BODYSTRUCTURE":
        return Atom(view.bodystructure())
    if name == "BODY" and section is None:
        return Atom(view.bodystructure(extensible=False))
    if name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
        data = {"RFC822": view.rfc822, "RFC822.HEADER": view.rfc822_header}.get(
            name, view.rfc822_text
        )()
        return Literal(data)
    if section is None:
        return None
    if name == "BODY":
        data = view.section(section.part, section.text, section.fields)
        return Literal(_partial(data, item.partial))
    if name == "BINARY":
        data = _partial(view.binary(section.part), item.partial)
        binary = view.binary_literal8(section.part)
        return Literal(data, LiteralForm.BINARY if binary else LiteralForm.SYNC)
    if name == "BINARY.SIZE":
        return Number(view.binary_size(section.part))
    return None


def _partial(data: bytes, partial: tuple[int, int | None] | None) -> bytes:
    if partial is None:
        return data
    return MessageView.partial(data, partial[0], partial[1])


def _failure_code(exc: Exception) -> bytes:
    if isinstance(exc, BinaryError):
        return exc.code.encode("ascii")  # UNKNOWN-CTE or PARSE, as a server would say
    if isinstance(exc, ViewUnavailable):
        return exc.code
    return b"UNAVAILABLE"


def _too_big(reason: str) -> bool:
    return "larger than" in reason or "longer than" in reason or "too large" in reason


_GREETING_CAPABILITY = re.compile(rb"\[CAPABILITY [^\]]*\] ?", re.I)


def trusted_greeting(upstream: ImapUpstream) -> bytes:
    """The upstream greeting, minus a capability list that travelled in clear: after
    STARTTLS those capabilities are void (RFC 3501 6.2.1) and the client asks again."""
    if upstream.tls.starttls:
        return _GREETING_CAPABILITY.sub(b"", upstream.greeting, count=1)
    return upstream.greeting


def _mailbox_key(name: bytes) -> bytes:
    """INBOX is case-insensitive (RFC 3501 5.1); every other name is exact."""
    return b"INBOX" if name.upper() == b"INBOX" else name


def _traffic_line(event: object) -> bytes:
    """A client event for the traffic log; credentials and SASL responses redacted."""
    if isinstance(event, ContinuationLine):
        return b"<SASL response redacted>"
    if isinstance(event, Command) and event.verb in (b"LOGIN", b"AUTHENTICATE"):
        return event.tag + b" " + event.verb + b" <redacted>"
    if isinstance(event, Command | IdleDone):
        return event.raw[:TRAFFIC_CHARS]
    return f"<{type(event).__name__}>".encode()  # a rejected line may hold a password


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


# --------------------------------------------------------------------------- side session


class SideSessionError(Exception):
    """The side session could not deliver the message; str() says why, without secrets."""


class _SideLost(Exception):
    """The side connection broke; worth one reconnect."""


class SideSession:
    """The relay's own upstream session for fetching stored messages by UID. It logs in
    the way the client did, EXAMINEs (read-only, so \\Seen never changes) and uses
    BODY.PEEK[]. One per client session, connected on first use, reconnected once if the
    provider dropped it (idle timeouts)."""

    def __init__(self, server: UpstreamServer, credentials: Credentials, name: str) -> None:
        self.server_config = server
        self.credentials = credentials
        self.name = f"{name} side"
        self._conn: ImapUpstream | None = None
        self._parser = ServerParser()
        self._caps: set[bytes] = set()
        self._mailbox: Selected | None = None
        self._lock = asyncio.Lock()
        self._tags = itertools.count(1)

    async def fetch(self, mailbox: bytes, uidvalidity: int, uid: int) -> bytes:
        async with self._lock:
            for attempt in range(2):
                try:
                    async with asyncio.timeout(self.server_config.timeout):
                        await self._ready(Selected(mailbox, uidvalidity))
                        return await self._uid_fetch(uid)
                except (_SideLost, OSError, TimeoutError) as exc:
                    await self.close()
                    if attempt:
                        reason = str(exc) or exc.__class__.__name__
                        raise SideSessionError(f"provider session failed: {reason}") from exc
                    log.info("%s reconnecting after: %r", self.name, exc)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._mailbox = None
        if conn is not None:
            await conn.close()

    async def _ready(self, mailbox: Selected) -> None:
        if self._conn is None:
            await self._connect()
        if self._mailbox != mailbox:
            await self._examine(mailbox)

    async def _connect(self) -> None:
        try:
            self._conn = await connect_imap(self.server_config)
        except UpstreamError as exc:
            raise SideSessionError(f"cannot reach the provider: {exc}") from exc
        try:
            await self._greet_and_login()
        except BaseException:
            await self.close()  # never keep a connection that is not logged in
            raise
        log.info("%s connected", self.name)

    async def _greet_and_login(self) -> None:
        assert self._conn is not None
        self._parser = ServerParser()
        self._caps = set()
        self._parser.feed(trusted_greeting(self._conn))
        greeting = await self._event()
        if isinstance(greeting, Untagged):
            self._learn(greeting)
        if not self._caps:
            await self._command(build_command(self._tag(), b"CAPABILITY"))
        await self._login()

    async def _login(self) -> None:
        credentials = self.credentials
        if credentials.mechanism is None:
            user, password = credentials.login
            command = build_command(self._tag(), b"LOGIN", [Quoted(user), Quoted(password)])
            _, tagged = await self._command(command)
        else:
            tagged = await self._authenticate(credentials)
        if tagged.status != b"OK":
            text = tagged.text.decode("utf-8", "replace")
            raise SideSessionError(f"the provider refused the login: {text}")
        self._learn(tagged)

    async def _authenticate(self, credentials: Credentials) -> Tagged:
        assert credentials.mechanism is not None
        responses = list(credentials.responses)
        args: list[Token] = [Atom(credentials.mechanism)]
        if credentials.initial is not None:
            if b"SASL-IR" in self._caps:
                args.append(Atom(credentials.initial))
            else:  # RFC 4959: "=" stands for an empty initial response
                responses.insert(0, b"" if credentials.initial == b"=" else credentials.initial)
        tag = self._tag()
        await self._write(build_command(tag, b"AUTHENTICATE", args).raw)
        while True:
            event = await self._event()
            if isinstance(event, Continuation):
                await self._write((responses.pop(0) if responses else b"*") + CRLF)
            elif isinstance(event, Tagged) and event.tag == tag:
                return event

    async def _examine(self, mailbox: Selected) -> None:
        self._mailbox = None
        untagged, tagged = await self._command(
            build_command(self._tag(), b"EXAMINE", [Quoted(mailbox.mailbox)])
        )
        if tagged.status != b"OK":
            text = tagged.text.decode("utf-8", "replace")
            raise SideSessionError(f"cannot open the mailbox: {text}")
        uidvalidity = next(
            (
                u.code.args[0].value
                for u in untagged
                if u.code is not None
                and u.code.name == b"UIDVALIDITY"
                and u.code.args
                and isinstance(u.code.args[0], Number)
            ),
            None,
        )
        if uidvalidity != mailbox.uidvalidity:
            raise SideSessionError("the mailbox changed (UIDVALIDITY differs); select it again")
        self._mailbox = mailbox

    async def _uid_fetch(self, uid: int) -> bytes:
        command = build_command(self._tag(), b"UID", [Number(uid), Atom(b"BODY.PEEK[]")], b"FETCH")
        untagged, tagged = await self._command(command)
        if tagged.status != b"OK":
            text = tagged.text.decode("utf-8", "replace")
            raise SideSessionError(f"the provider could not fetch the message: {text}")
        for response in untagged:
            message = _stored_message(response, uid)
            if message is not None:
                return message
        raise SideSessionError(f"message UID {uid} no longer exists")

    async def _command(self, command: Command) -> tuple[list[Untagged], Tagged]:
        untagged: list[Untagged] = []
        chunks = command.chunks(literal_plus=b"LITERAL+" in self._caps)
        for chunk in chunks:
            await self._write(chunk.head)
            if chunk.literal is None:
                continue
            event = await self._until_continuation(command.tag, untagged)
            if isinstance(event, Tagged):
                return untagged, event
            await self._write(chunk.literal)
        while True:
            event = await self._event()
            if isinstance(event, Tagged) and event.tag == command.tag:
                self._learn(event)
                return untagged, event
            if isinstance(event, Untagged):
                self._learn(event)
                untagged.append(event)

    async def _until_continuation(
        self, tag: bytes, untagged: list[Untagged]
    ) -> Continuation | Tagged:
        while True:
            event = await self._event()
            if isinstance(event, Continuation):
                return event
            if isinstance(event, Tagged) and event.tag == tag:
                return event
            if isinstance(event, Untagged):
                untagged.append(event)

    async def _event(self) -> ServerEvent:
        assert self._conn is not None
        while True:
            event = self._parser.next_event()
            if isinstance(event, Fatal):
                raise _SideLost(event.reason)
            if isinstance(event, Untagged) and event.status == b"BYE":
                raise _SideLost("the provider ended the session")
            if event is not None:
                return event
            data = await self._conn.reader.read(READ_SIZE)
            if not data:
                raise _SideLost("the provider closed the connection")
            self._parser.feed(data)

    async def _write(self, data: bytes) -> None:
        if self._conn is None:
            raise _SideLost("not connected")
        self._conn.writer.write(data)
        await self._conn.writer.drain()

    def _learn(self, event: Untagged | Tagged) -> None:
        caps = capabilities_of(event)
        if caps is not None:
            self._caps = {cap.upper() for cap in caps}

    def _tag(self) -> bytes:
        return b"LPS%d" % next(self._tags)


def _stored_message(response: Untagged, uid: int) -> bytes | None:
    if response.status is not None or response.name != b"FETCH":
        return None
    try:
        _, items = parse_fetch_response(response)
    except ImapSyntaxError:
        return None
    values = {name.upper(): value for name, value in items}
    if values.get(b"UID") != Number(uid):
        return None
    body = values.get(b"BODY[]")
    if isinstance(body, Nil):
        return None
    return _string_value(body) if body is not None else None
