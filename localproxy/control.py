"""The control endpoint between the CLI and the daemon: one JSON request, one answer.

On Linux and macOS it is a Unix socket, mode 0600, in the user's runtime dir. On
Windows, where a socket file's mode protects nothing, it is a loopback TCP port,
and every request must carry a random token that the daemon writes to a file
only the user can read (in the per-user runtime dir: %LOCALAPPDATA% on Windows);
other local users can reach the port but not the token. LOCALPROXY_CONTROL=tcp
selects the TCP endpoint anywhere (the tests use it on Linux).

This module also keeps the one-daemon-per-data-dir lock, next to the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import platformdirs

from localproxy.config import Config

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[dict[str, Any]]]
REQUEST_TIMEOUT = 10.0  # seconds the daemon waits for a client's request line
MAX_REQUEST = 64 * 1024


class NotRunning(Exception):
    """No daemon answers on the control endpoint of this config."""


class AlreadyRunning(Exception):
    """Another daemon holds the lock of this data dir; str() is its pid or "?"."""


# --------------------------------------------------------------------------- locations


def runtime_dir() -> Path:
    """Where the endpoint lives: $LOCALPROXY_RUNTIME_DIR, the platform's runtime dir,
    or a private folder in the temp dir when there is none (no XDG_RUNTIME_DIR)."""
    if env := os.environ.get("LOCALPROXY_RUNTIME_DIR"):
        return Path(env)
    fallback = Path(tempfile.gettempdir()) / f"localproxy-{_user_tag()}"
    if sys.platform.startswith("linux") and not os.environ.get("XDG_RUNTIME_DIR"):
        return fallback  # platformdirs would warn and guess /tmp/runtime-UID
    base = Path(platformdirs.user_runtime_dir("localproxy"))
    if base.parent.is_dir() and os.access(base.parent, os.W_OK):
        return base
    return fallback


def _user_tag() -> str:
    getuid = getattr(os, "getuid", None)  # not on Windows
    return str(getuid()) if getuid is not None else getpass.getuser()


def _base(config: Config) -> Path:
    # One daemon per data dir; the hash keeps the path under the 108-byte socket limit.
    digest = hashlib.sha256(str(config.proxy.data_dir.resolve()).encode()).hexdigest()[:12]
    return runtime_dir() / digest


def socket_path(config: Config) -> Path:
    return _base(config).with_suffix(".sock")


def token_path(config: Config) -> Path:
    """The TCP endpoint's port and token (JSON), readable by the user only."""
    return _base(config).with_suffix(".control")


def lock_path(config: Config) -> Path:
    return _base(config).with_suffix(".lock")


def uses_tcp() -> bool:
    return os.name == "nt" or os.environ.get("LOCALPROXY_CONTROL") == "tcp"


class UnsafeRuntimeDir(Exception):
    """The runtime directory is someone else's, or a link: the endpoint cannot live there."""


def _private_dir(path: Path) -> None:
    """Create the endpoint's directory private (0700); an existing one must be ours: in
    a shared temp dir another user could have made it first, to answer in the
    daemon's place."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.name != "posix":
        return
    info = path.lstat()  # the files in it are 0600 each, so a looser mode is the user's call
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise UnsafeRuntimeDir(
            f"{path} belongs to another user or is a link; remove it, or choose "
            "another place with LOCALPROXY_RUNTIME_DIR"
        )


# --------------------------------------------------------------------------- single instance


def acquire_lock(config: Config) -> int:
    """An open, locked file descriptor (closing it releases the lock); raises
    AlreadyRunning with the other daemon's pid."""
    path = lock_path(config)
    _private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _lock(fd)
    except OSError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(other) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _lock(fd: int) -> None:
    """Non-blocking exclusive lock; OSError when another process holds it."""
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


# --------------------------------------------------------------------------- daemon side


class ControlServer:
    """The daemon's endpoint; close() also removes its socket or token file."""

    def __init__(self, server: asyncio.base_events.Server, files: list[Path]) -> None:
        self.server = server
        self.files = files

    def close(self) -> None:
        self.server.close()
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def serve(config: Config, handle: Handler) -> ControlServer:
    """Start the endpoint; a stale socket or token file is replaced (the caller holds
    the lock, so no other daemon owns it)."""
    if uses_tcp():
        return await _serve_tcp(config, handle)
    path = socket_path(config)
    _private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old_umask = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(_connection(handle, None), path)
    finally:
        os.umask(old_umask)
    path.chmod(0o600)
    return ControlServer(server, [path])


async def _serve_tcp(config: Config, handle: Handler) -> ControlServer:
    token = secrets.token_urlsafe(32)
    server = await asyncio.start_server(_connection(handle, token), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = token_path(config)
    _private_dir(path.parent)
    _write_private(path, json.dumps({"port": port, "token": token, "pid": os.getpid()}))
    return ControlServer(server, [path])


def _write_private(path: Path, text: str) -> None:
    """Replace path atomically with a file created 0600 (never readable by others,
    not even between creation and chmod)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a full disk leaves no stray token behind
        raise


def _connection(
    handle: Handler, token: str | None
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await _answer(reader, handle, token)
        except Exception as exc:  # the CLI must get an answer, not a closed socket
            log.exception("control command failed")
            answer = {"ok": False, "error": f"internal error: {exc}"}
        writer.write(json.dumps(answer).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return on_connection


async def _answer(
    reader: asyncio.StreamReader, handle: Handler, token: str | None
) -> dict[str, Any]:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            line = await reader.readline()
        request = json.loads(line[:MAX_REQUEST])
        command = request["command"]
        offered = request.get("token", "")
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError, TimeoutError, ValueError):
        return {"ok": False, "error": "bad request"}
    if token is not None and not (
        isinstance(offered, str) and hmac.compare_digest(offered.encode(), token.encode())
    ):
        log.warning("control request with a wrong token refused")
        return {"ok": False, "error": "wrong control token"}
    return await handle(str(command))


# --------------------------------------------------------------------------- CLI side


def request(config: Config, command: str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the daemon of this config; NotRunning if there is none."""
    message: dict[str, Any] = {"command": command}
    if uses_tcp():
        address, message["token"] = _tcp_address(config)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        where: Any = address
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = str(socket_path(config))
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except (FileNotFoundError, ConnectionRefusedError):
            raise _not_running(config, where) from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = _read_line(sock)
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"ok": False, "error": "the proxy closed the control connection without an answer"}


def _tcp_address(config: Config) -> tuple[tuple[str, int], str]:
    path = token_path(config)
    try:
        found = json.loads(path.read_text())
        return ("127.0.0.1", int(found["port"])), str(found["token"])
    except FileNotFoundError:
        raise _not_running(config, path) from None
    except (ValueError, KeyError, TypeError) as exc:
        damaged = f"the control file {path} is damaged ({exc}); restart localproxy"
        raise NotRunning(damaged) from None


def _not_running(config: Config, where: object) -> NotRunning:
    return NotRunning(
        f"localproxy is not running for {config.proxy.data_dir} (no daemon at {where})"
    )


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
