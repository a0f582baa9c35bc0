"""Bounded in-memory cache of message views for the IMAP relay.

A message in IMAP never changes under (mailbox, UIDVALIDITY, UID), so that triple plus
the account is a safe key for the bytes the client is shown (decrypted, status header
added) and for the `MessageView` computed from them. Entries are evicted least recently
used first once the total size passes the limit. Concurrent requests for the same key
share one build, so two client sessions fetching the same message fetch and decrypt it
once. Nothing is written to disk: decrypted mail must not outlive the process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from localproxy.imap.view import MessageView

MiB = 1024 * 1024
DEFAULT_CACHE_BYTES = 128 * MiB
# A MessageView keeps two canonical copies of the message (as served, and with NUL
# replaced for BODY[...]) plus parsed structure: count each entry at about twice its size.
_VIEW_OVERHEAD = 2
# UIDs remembered as plain (served by the provider unchanged), all mailboxes together;
# past this the memory is dropped and relearned from the probes.
MAX_PLAIN_UIDS = 1_000_000


@dataclass(frozen=True)
class ViewKey:
    account: str
    mailbox: bytes  # as the client named it in SELECT/EXAMINE
    uidvalidity: int
    uid: int


class ViewCache:
    """LRU of MessageView by approximate memory use; safe for concurrent coroutines of
    one event loop."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ViewKey, MessageView] = OrderedDict()
        self._building: dict[ViewKey, asyncio.Future[MessageView]] = {}
        self._total = 0
        self.hits = 0
        self.builds = 0
        # Per (account, mailbox, UIDVALIDITY): UIDs whose probes showed plain mail. A
        # message never changes under its UID, so a later FETCH of them needs no probes.
        self._plain: dict[tuple[str, bytes, int], set[int]] = {}
        self._plain_count = 0
        # The UIDs with a view here, per mailbox: lets the relay ask the provider for a
        # 1-octet stand-in instead of a whole message it need not read again
        self._viewed: dict[tuple[str, bytes, int], set[int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._total

    def get(self, key: ViewKey) -> MessageView | None:
        view = self._entries.get(key)
        if view is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return view

    async def get_or_build(
        self, key: ViewKey, build: Callable[[], Awaitable[bytes]]
    ) -> MessageView:
        """The cached view, or the one another coroutine is building, or a new one built
        from `build()` (which returns the bytes the client must see). A build that failed
        for someone else is retried once with our own `build`: the failure may have been
        that session's alone (its upstream connection dropped, its login expired)."""
        for attempt in range(2):
            view = self.get(key)
            if view is not None:
                return view
            pending = self._building.get(key)
            if pending is None:
                return await self._build(key, build)
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # we were cancelled ourselves
            except Exception:
                if attempt:
                    raise
        return await self._build(key, build)

    async def _build(self, key: ViewKey, build: Callable[[], Awaitable[bytes]]) -> MessageView:
        future: asyncio.Future[MessageView] = asyncio.get_running_loop().create_future()
        self._building[key] = future
        try:
            view = MessageView(await build())
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                with contextlib.suppress(BaseException):
                    future.exception()  # waiters may be none: mark it retrieved
            raise
        finally:
            self._building.pop(key, None)
        self.builds += 1
        self._store(key, view)
        future.set_result(view)
        return view

    def _store(self, key: ViewKey, view: MessageView) -> None:
        size = _size(view)
        if size > self.max_bytes:
            return  # served once, never kept: it would evict everything else
        if key in self._entries:
            self._forget(key)
        self._entries[key] = view
        self._total += size
        self._viewed.setdefault(_mailbox_of(key), set()).add(key.uid)
        while self._total > self.max_bytes:
            self._forget(next(iter(self._entries)))

    def _forget(self, key: ViewKey) -> None:
        self._total -= _size(self._entries.pop(key))
        uids = self._viewed.get(_mailbox_of(key))
        if uids is not None:
            uids.discard(key.uid)
            if not uids:
                del self._viewed[_mailbox_of(key)]

    def viewed_uids(self, account: str, mailbox: bytes, uidvalidity: int) -> AbstractSet[int]:
        """The UIDs of that mailbox whose view is cached (live, read-only use)."""
        return self._viewed.get((account, mailbox, uidvalidity), frozenset())

    def mark_plain(self, key: ViewKey) -> None:
        """The provider's copy of this message is what the client may see."""
        if self._plain_count >= MAX_PLAIN_UIDS:
            self._plain.clear()
            self._plain_count = 0
        uids = self._plain.setdefault((key.account, key.mailbox, key.uidvalidity), set())
        if key.uid not in uids:
            uids.add(key.uid)
            self._plain_count += 1

    def plain_uids(self, account: str, mailbox: bytes, uidvalidity: int) -> AbstractSet[int]:
        """The UIDs of that mailbox known to be plain (live, read-only use)."""
        return self._plain.get((account, mailbox, uidvalidity), frozenset())

    def is_plain(self, key: ViewKey) -> bool:
        uids = self._plain.get((key.account, key.mailbox, key.uidvalidity))
        return uids is not None and key.uid in uids

    def invalidate(self, account: str | None = None) -> None:
        """Forget every view (of one account): e.g. after a key was imported, so messages
        that could not be decrypted before are tried again."""
        for key in [k for k in self._entries if account is None or k.account == account]:
            self._forget(key)


def _mailbox_of(key: ViewKey) -> tuple[str, bytes, int]:
    return key.account, key.mailbox, key.uidvalidity


def _size(view: MessageView) -> int:
    return _VIEW_OVERHEAD * len(view.raw)
