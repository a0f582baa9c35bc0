"""The control endpoint: Unix socket, and loopback TCP with a token file (Windows)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from localproxy import control
from localproxy.config import parse_config


def use(kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("LOCALPROXY_RUNTIME_DIR", str(tmp_path / "run"))
    if kind == "tcp":
        monkeypatch.setenv("LOCALPROXY_CONTROL", "tcp")
    else:
        monkeypatch.delenv("LOCALPROXY_CONTROL", raising=False)
    return kind


@pytest.fixture(params=["unix", "tcp"])
def transport(request: pytest.FixtureRequest, monkeypatch, tmp_path) -> str:
    return use(request.param, monkeypatch, tmp_path)


@pytest.fixture
def tcp(monkeypatch, tmp_path) -> str:
    return use("tcp", monkeypatch, tmp_path)


@pytest.fixture
def unix(monkeypatch, tmp_path) -> str:
    return use("unix", monkeypatch, tmp_path)


@pytest.fixture
def config(tmp_path):
    server = {"host": "mail.example.org", "port": 465, "security": "tls"}
    return parse_config(
        {
            "proxy": {"data_dir": str(tmp_path / "data")},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": server | {"port": 993}, "smtp": server},
                }
            ],
        }
    )


async def handler(command: str) -> dict[str, Any]:
    return {"ok": True, "echo": command}


async def ask(config, command: str) -> dict[str, Any]:
    return await asyncio.to_thread(control.request, config, command, 5.0)


async def test_a_command_gets_its_answer(transport, config):
    server = await control.serve(config, handler)
    try:
        assert await ask(config, "status") == {"ok": True, "echo": "status"}
    finally:
        server.close()
    assert not any(path.exists() for path in server.files), "socket or token file removed"
    with pytest.raises(control.NotRunning, match="not running"):
        await ask(config, "status")


async def test_the_tcp_endpoint_is_loopback_and_its_token_private(tcp, config):
    server = await control.serve(config, handler)
    try:
        token_file = control.token_path(config)
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.parent.stat().st_mode & 0o077 == 0
        saved = json.loads(token_file.read_text())
        assert len(saved["token"]) >= 40
        (listening,) = server.server.sockets
        assert listening.getsockname() == ("127.0.0.1", saved["port"])
        for offered in ({}, {"token": "guess"}, {"token": saved["token"][:-1]}, {"token": 7}):
            answer = await asyncio.to_thread(raw_request, saved["port"], offered)
            assert answer == {"ok": False, "error": "wrong control token"}
        right = await asyncio.to_thread(raw_request, saved["port"], {"token": saved["token"]})
        assert right == {"ok": True, "echo": "status"}
    finally:
        server.close()


def raw_request(port: int, extra: dict[str, Any]) -> dict[str, Any]:
    line = json.dumps({"command": "status", **extra}).encode() + b"\n"
    return exchange(socket.create_connection(("127.0.0.1", port), timeout=5), line)


def exchange(sock: socket.socket, line: bytes) -> dict[str, Any]:
    """Send one line, read the one-line JSON answer."""
    with sock:
        sock.sendall(line)
        return json.loads(sock.makefile("rb").readline())


async def test_the_unix_socket_is_private(unix, config):
    server = await control.serve(config, handler)
    try:
        path = control.socket_path(config)
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o077 == 0
    finally:
        server.close()


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="needs chown (root)")
async def test_a_runtime_dir_of_another_user_is_refused(transport, config, tmp_path):
    """In a shared temp dir another user may have made our directory first."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)  # nobody
    with pytest.raises(control.UnsafeRuntimeDir, match="belongs to another user"):
        await control.serve(config, handler)
    with pytest.raises(control.UnsafeRuntimeDir):
        control.acquire_lock(config)


async def test_a_runtime_dir_that_is_a_link_is_refused(transport, config, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(elsewhere)
    with pytest.raises(control.UnsafeRuntimeDir, match="is a link"):
        await control.serve(config, handler)


async def test_stale_endpoints_mean_not_running(transport, config):
    """A daemon killed with SIGKILL leaves its socket or token file behind."""
    server = await control.serve(config, handler)
    stale = server.files[0]
    server.server.close()
    await server.server.wait_closed()
    assert stale.exists()
    with pytest.raises(control.NotRunning):
        await ask(config, "status")
    restarted = await control.serve(config, handler)  # replaces the stale file
    try:
        assert (await ask(config, "reload"))["echo"] == "reload"
    finally:
        restarted.close()


async def test_bad_requests_get_an_answer(transport, config):
    server = await control.serve(config, handler)
    try:
        reply = await asyncio.to_thread(send_line, config, b"not json\n")
        assert reply == {"ok": False, "error": "bad request"}
    finally:
        server.close()


def send_line(config, line: bytes) -> dict[str, Any]:
    if control.uses_tcp():
        port = json.loads(control.token_path(config).read_text())["port"]
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(str(control.socket_path(config)))
    return exchange(sock, line)


def test_a_damaged_token_file_is_explained(tcp, config):
    path = control.token_path(config)
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    with pytest.raises(control.NotRunning, match="damaged"):
        control.request(config, "status")


def test_one_daemon_per_data_dir(transport, config):
    fd = control.acquire_lock(config)
    try:
        with pytest.raises(control.AlreadyRunning) as other:
            control.acquire_lock(config)
        assert str(other.value).isdigit()
        assert Path(control.lock_path(config)).stat().st_mode & 0o777 == 0o600
    finally:
        os.close(fd)
    os.close(control.acquire_lock(config))  # released with its descriptor
