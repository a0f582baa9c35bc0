"""Running proxies in tests: an event loop in a thread, accounts for the harness."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from concurrent.futures import Future
from typing import Any

from localproxy.config import Account, LocalListen, UpstreamServer
from localproxy.imap.relay import ImapProxy
from localproxy.sandbox.provider import Provider

TIMEOUT = 10.0


class ProxyThread:
    """The relay on its own event loop, so the tests can use blocking clients."""

    def __init__(self, proxy: ImapProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coroutine: Awaitable[Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        return future.result(TIMEOUT)

    def __enter__(self) -> ProxyThread:
        self.thread.start()
        self.run(self.proxy.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    @property
    def port(self) -> int:
        return self.proxy.port


def make_account(provider: Provider, user: str = "alice", implicit_tls: bool = False) -> Account:
    account = provider.users[user]

    def server(port: int, security: str = "starttls") -> UpstreamServer:
        return UpstreamServer(
            provider.hostname, port, security, ca_file=provider.ca_file, timeout=TIMEOUT
        )

    imap = server(provider.imaps_port, "tls") if implicit_tls else server(provider.imap_port)
    return Account(
        name=user,
        addresses=(account.address,),
        local=LocalListen(host="127.0.0.1", imap_port=0),
        imap=imap,
        smtp=server(provider.submission_port),
        username=account.login,
    )
