"""Issue 8 item 5: the security properties, checked against `localproxy run` subprocesses."""

from __future__ import annotations

import base64
import imaplib
import json
import os
import smtplib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from localproxy.crypto.errors import CryptoError
from localproxy.crypto.openpgp import default_engine
from localproxy.keys.store import KeyStore
from localproxy.sandbox.provider import Provider
from localproxy.secretbox import SecretBoxError
from tests.e2e.test_daemon import Running, free_port, launch, write_config

pytestmark = pytest.mark.e2e

TRAFFIC_WARNING = "--log-traffic: protocol lines including message content are logged"


def start(provider: Provider, tmp_path: Path, *extra: str) -> Running:
    config = tmp_path / "config.toml"
    imap_port, smtp_port = free_port(), free_port()
    write_config(config, provider, imap_port, smtp_port)
    env = {**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "run")}
    base = [sys.executable, "-m", "localproxy", "--config", str(config)]
    subprocess.run(
        [*base, "keys", "generate", "alice"], env=env, check=True, capture_output=True, timeout=60
    )
    return launch(config, env, (imap_port, smtp_port), "--log-level", "debug", *extra)


@pytest.fixture
def daemon(clean_provider: Provider, tmp_path: Path) -> Iterator[Running]:
    running = start(clean_provider, tmp_path)
    yield running
    running.stop()


def send_to_self(provider: Provider, port: int, body: bytes, mechanism: str = "PLAIN") -> None:
    """alice to alice: her own key is known, so the message leaves encrypted."""
    alice = provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = alice.login, alice.password
        auth = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        smtp.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
        smtp.sendmail(
            alice.address,
            [alice.address],
            b"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: s\r\n\r\n" + body,
        )


def fetch_all(provider: Provider, port: int, authenticate: bool = False) -> list[bytes]:
    alice = provider.users["alice"]
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    try:
        if authenticate:
            blob = f"\0{alice.login}\0{alice.password}".encode()
            imap.authenticate("PLAIN", lambda _challenge: blob)
        else:
            imap.login(alice.login, alice.password)
        imap.select("INBOX")
        _typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        return [part[1] for part in data if isinstance(part, tuple)]
    finally:
        imap.logout()


# --------------------------------------------------------------------------- network


def _listening_inodes(pid: int) -> list[tuple[str, str]]:
    """(address hex, port hex) of every listening TCP socket the process holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                found.append(tuple(local.split(":")))
    return found


def test_every_listener_is_on_loopback(daemon):
    listeners = _listening_inodes(daemon.process.pid)
    ports = {int(port, 16) for _addr, port in listeners}
    assert {daemon.smtp_port, daemon.imap_port} <= ports
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert {addr for addr, _port in listeners} <= loopback, listeners


def test_no_open_relay(daemon):
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("alice@example.org")
        assert code == 530
        code, _ = smtp.rcpt("victim@elsewhere.example")
        assert code in (503, 530)
        code, _ = smtp.docmd("DATA")
        assert code in (503, 530)


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("log_traffic", [False, True], ids=["default", "log-traffic"])
def test_logs_never_hold_credentials_nor_bodies_unless_asked(clean_provider, tmp_path, log_traffic):
    marker = f"body-marker-{uuid.uuid4().hex}"
    running = start(clean_provider, tmp_path, *(["--log-traffic"] if log_traffic else []))
    try:
        send_to_self(clean_provider, running.smtp_port, marker.encode() + b"\r\n", "PLAIN")
        send_to_self(clean_provider, running.smtp_port, b"second\r\n", "LOGIN")
        clean_provider.wait_for_messages("alice", 2)
        assert any(marker.encode() in m for m in fetch_all(clean_provider, running.imap_port))
        assert len(fetch_all(clean_provider, running.imap_port, authenticate=True)) == 2
    finally:
        log = running.stop()
    alice = clean_provider.users["alice"]
    secrets = {
        "password": alice.password,
        "PLAIN blob": base64.b64encode(f"\0{alice.login}\0{alice.password}".encode()).decode(),
        "LOGIN user blob": base64.b64encode(alice.login.encode()).decode(),
        "LOGIN password blob": base64.b64encode(alice.password.encode()).decode(),
    }
    for what, secret in secrets.items():
        assert secret not in log, f"{what} in the log"
    assert "DEBUG" in log, "not logging at debug level"
    assert (marker in log) is log_traffic
    assert (TRAFFIC_WARNING in log) is log_traffic
    if log_traffic:
        assert "<SASL response redacted>" in log and "AUTH PLAIN <redacted>" in log


# --------------------------------------------------------------------------- disk


def _unique_window(secret: bytes, public: bytes, size: int = 32) -> bytes:
    for start in range(len(secret) - size, 0, -1):
        window = secret[start : start + size]
        if window not in public:
            return window
    raise AssertionError("no secret-only window in the secret key")


def test_keys_and_plaintext_are_sealed_on_disk(clean_provider, tmp_path):
    marker = f"plaintext-marker-{uuid.uuid4().hex}"
    running = start(clean_provider, tmp_path)
    try:
        send_to_self(clean_provider, running.smtp_port, marker.encode() + b"\r\n")
        (stored,) = clean_provider.wait_for_messages("alice", 1)
        assert marker.encode() not in stored, "left in clear"
        (fetched,) = fetch_all(clean_provider, running.imap_port)
        assert marker.encode() in fetched, "not decrypted through the proxy"
    finally:
        running.stop()
    data_dir = tmp_path / "data"
    store = KeyStore(data_dir, default_engine())
    try:
        ((cert, secret),) = store.own_keys("alice")
    finally:
        store.close()
    window = _unique_window(secret, cert.info.data + default_engine().public_only(secret))
    files = [p for p in data_dir.rglob("*") if p.is_file() and p.name != "store.key"]
    assert any(p.name.startswith("keys.sqlite") for p in files)
    for path in files:
        content = path.read_bytes()
        assert window not in content, f"secret key material in {path}"
        assert b"PRIVATE KEY BLOCK" not in content, path
        assert marker.encode() not in content, f"plaintext in {path}"
    (data_dir / "store.key").unlink()  # no keyring secret
    locked = KeyStore(data_dir, default_engine())
    try:
        with pytest.raises(SecretBoxError):
            locked.own_keys("alice")
    finally:
        locked.close()


# --------------------------------------------------------------------------- control socket


def test_control_socket_refuses_other_users(daemon):
    run_dir = Path(daemon.env["LOCALPROXY_RUNTIME_DIR"])
    (sock,) = run_dir.glob("*.sock")
    assert sock.stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o777 == 0o700
    if os.getuid() != 0:
        pytest.skip("switching to another user needs root")
    pid = os.fork()
    if pid == 0:  # the child: become nobody and knock
        code = 2
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(sock))
            code = 1
        except PermissionError:
            code = 0
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "another user reached the control socket"
    assert json.loads(daemon.cli("status", "--json").stdout)["pid"] == daemon.process.pid


# --------------------------------------------------------------------------- forged headers


def _folded(name: str, value: str) -> bytes:
    head, rest = f"{name}: {value}"[:76], f"{name}: {value}"[76:]
    lines = [head] + [" " + rest[i : i + 75] for i in range(0, len(rest), 75)]
    return "\r\n".join(lines).encode() + b"\r\n"


def test_forged_status_and_autocrypt_headers_are_ignored(daemon, clean_provider, tmp_path):
    """A forged status header never reaches the client. Autocrypt is unauthenticated by
    design: a header whose addr is not From is ignored, and a key offered for bob's
    address may be learned, but never displaces the key the user imported for bob."""
    engine = default_engine()
    bob = engine.generate_key(["Bob <bob@example.org>"])
    (tmp_path / "bob.asc").write_bytes(engine.public_only(bob.data))
    assert daemon.cli("keys", "import", str(tmp_path / "bob.asc")).returncode == 0
    mallory = engine.generate_key(["Mallory <mallory@example.org>"])
    impostor = engine.generate_key(["Bob <bob@example.org>"])  # mallory's key, bob's name
    forged = f"forged-{uuid.uuid4().hex}"
    for addr, key in (("mallory@example.org", mallory), ("bob@example.org", impostor)):
        keydata = base64.b64encode(engine.public_only(key.data)).decode()
        clean_provider.append(
            "alice",
            b"From: bob@example.org\r\nTo: alice@example.org\r\nSubject: forged\r\n"
            + f"X-LocalProxy-Security: encrypted; signed; {forged}\r\n".encode()
            + _folded("Autocrypt", f"addr={addr}; keydata={keydata}")
            + b"\r\nplain text claiming to be encrypted\r\n",
        )
    fetched = fetch_all(clean_provider, daemon.imap_port)
    assert len(fetched) == 2 and all(forged.encode() not in m for m in fetched)
    assert all(b"plain text claiming to be encrypted" in m for m in fetched)
    deadline = time.monotonic() + 15  # observation runs beside the session
    while impostor.fingerprint not in (known := daemon.cli("keys", "list", "--json").stdout):
        assert time.monotonic() < deadline, "the Autocrypt header for bob was never read"
        time.sleep(0.2)
    assert mallory.fingerprint not in known, "addr differs from From: ignored"
    alice = clean_provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as smtp:
        smtp.login(alice.login, alice.password)
        smtp.sendmail(
            alice.address,
            ["bob@example.org"],
            b"From: alice@example.org\r\nTo: bob@example.org\r\n\r\nfor bob only\r\n",
        )
    (stored,) = clean_provider.wait_for_messages("bob", 1)
    armored = stored[stored.index(b"-----BEGIN PGP MESSAGE") : stored.index(b"-----END PGP")]
    armored += b"-----END PGP MESSAGE-----\r\n"
    assert b"for bob only" in engine.decrypt(armored, [bob.data]).plaintext
    with pytest.raises(CryptoError):  # encrypted to the imported key only
        engine.decrypt(armored, [impostor.data])
