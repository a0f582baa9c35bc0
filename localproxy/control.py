"""The CLI side of the control socket: one JSON request, one JSON answer."""

from __future__ import annotations

import json
import socket
from typing import Any

from localproxy.config import Config
from localproxy.daemon import socket_path


class NotRunning(Exception):
    """No daemon answers on the control socket of this config."""


def request(config: Config, command: str, timeout: float = 30.0) -> dict[str, Any]:
    path = socket_path(config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"localproxy is not running for {config.proxy.data_dir} (no daemon at {path})"
            ) from None
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {"ok": False, "error": "the proxy closed the control connection without an answer"}
