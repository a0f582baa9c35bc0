"""`localproxy run` as a real subprocess against the harness provider."""

from __future__ import annotations

import imaplib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from localproxy.crypto.openpgp import default_engine
from localproxy.keys.store import KeyStore
from localproxy.sandbox.provider import Provider
from localproxy.secretbox import SecretBox
from localproxy.smtp.outbox import Outbox
from localproxy.smtp.server import Credentials

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def write_config(
    path: Path,
    provider: Provider,
    imap_port: int,
    smtp_port: int,
    *,
    up_imap: int | None = None,
    up_smtp: int | None = None,
    smtp_security: str = "starttls",
) -> None:
    """One account, alice, on these local ports; upstream the provider's, unless a
    fault relay's port is given."""
    proxy = f'[proxy]\ndata_dir = "{path.parent / "data"}"\nlog_level = "debug"\n'
    path.write_text(
        proxy
        + account_section(
            provider,
            "alice",
            (imap_port, smtp_port),
            (up_imap or provider.imaps_port, up_smtp or provider.submission_port),
            smtp_security,
        )
    )


def account_section(
    provider: Provider,
    name: str,
    local: tuple[int, int],
    upstream: tuple[int, int],
    smtp_security: str = "starttls",
) -> str:
    """[[account]] for the provider's user `name`: local and upstream (imap, smtp) ports."""
    return f"""
[[account]]
name = "{name}"
addresses = ["{name}@example.org"]
[account.local]
imap_port = {local[0]}
smtp_port = {local[1]}
[account.upstream.imap]
host = "{provider.hostname}"
port = {upstream[0]}
security = "tls"
ca_file = "{provider.ca_file}"
[account.upstream.smtp]
host = "{provider.hostname}"
port = {upstream[1]}
security = "{smtp_security}"
ca_file = "{provider.ca_file}"
"""


@dataclass
class Running:
    config: Path
    env: dict[str, str]
    process: subprocess.Popen[str]
    imap_port: int
    smtp_port: int

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "localproxy", "--config", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _out, err = self.process.communicate(timeout=30)
        return err


def wait_listening(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def start_daemon(provider: Provider, tmp_path: Path, **extra_env: str) -> Running:
    config = tmp_path / "config.toml"
    imap_port, smtp_port = free_port(), free_port()
    write_config(config, provider, imap_port, smtp_port)
    env = {**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "run"), **extra_env}
    base = [sys.executable, "-m", "localproxy", "--config", str(config)]
    subprocess.run(
        [*base, "keys", "generate", "alice"], env=env, check=True, capture_output=True, timeout=60
    )
    return launch(config, env, (imap_port, smtp_port))


def launch(config: Path, env: dict[str, str], ports: tuple[int, int], *args: str) -> Running:
    """`localproxy run` with this config, environment and (imap, smtp) ports."""
    process = subprocess.Popen(
        [sys.executable, "-m", "localproxy", "--config", str(config), "run", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    running = Running(config, env, process, *ports)
    wait_listening(running.smtp_port)
    wait_listening(running.imap_port)
    return running


def relaunch(previous: Running) -> Running:
    return launch(previous.config, previous.env, (previous.imap_port, previous.smtp_port))


@pytest.fixture
def daemon(clean_provider: Provider, tmp_path: Path) -> Iterator[Running]:
    running = start_daemon(clean_provider, tmp_path)
    yield running
    running.stop()


def send(provider: Provider, port: int, body: bytes = b"hello\r\n") -> None:
    alice = provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.login(alice.login, alice.password)
        smtp.sendmail(
            alice.address,
            ["bob@example.org"],
            b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: t\r\n\r\n" + body,
        )


def test_second_instance_is_refused_with_the_pid(daemon):
    second = daemon.cli("run")
    assert second.returncode == 2
    assert (
        f"already running for {daemon.config.parent / 'data'} (pid {daemon.process.pid})"
        in second.stderr
    )
    assert "Traceback" not in second.stderr


@pytest.mark.parametrize("what", ["SMTP", "IMAPS"])
def test_a_taken_port_is_named(clean_provider, tmp_path, what):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        if what == "SMTP":
            write_config(config, clean_provider, free_port(), port)
        else:  # the plain IMAP port is free: the message must not blame it
            write_config(config, clean_provider, free_port(), free_port())
            text = config.read_text().replace(
                "[account.local]\n", f"[account.local]\nimaps_port = {port}\n"
            )
            config.write_text(text)
        done = subprocess.run(
            [sys.executable, "-m", "localproxy", "--config", str(config), "run"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "r")},
        )
    assert done.returncode == 75, "EX_TEMPFAIL: the service manager tries again"
    assert f"port {port} ({what} of account 'alice') is already in use" in done.stderr


def test_sighup_applies_a_changed_port_and_keeps_serving(daemon, clean_provider):
    new_smtp = free_port()
    write_config(daemon.config, clean_provider, daemon.imap_port, new_smtp)
    daemon.process.send_signal(signal.SIGHUP)
    wait_listening(new_smtp)
    send(clean_provider, new_smtp)
    assert len(clean_provider.wait_for_messages("bob", 1)) == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.smtp_port), timeout=1).close()


def add_account(config: Path, provider: Provider, name: str, imap_port: int, smtp_port: int):
    """Append a second account (the provider's user `name`) to a write_config() file."""
    upstream = (provider.imaps_port, provider.submission_port)
    with config.open("a") as out:
        out.write(account_section(provider, name, (imap_port, smtp_port), upstream))


def test_reload_to_a_taken_port_keeps_the_account_and_spares_the_others(clean_provider, tmp_path):
    config = tmp_path / "config.toml"
    alice, bob = (free_port(), free_port()), (free_port(), free_port())
    write_config(config, clean_provider, *alice)
    add_account(config, clean_provider, "bob", *bob)
    env = {**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "run")}
    running = launch(config, env, alice)
    try:
        wait_listening(bob[1])
        alice_user = clean_provider.users["alice"]
        with smtplib.SMTP("127.0.0.1", alice[1], timeout=30) as session:  # open across it
            session.login(alice_user.login, alice_user.password)
            with socket.create_server(("127.0.0.1", 0)) as taken:
                write_config(config, clean_provider, *alice)
                add_account(config, clean_provider, "bob", bob[0], taken.getsockname()[1])
                answer = running.cli("reload")
            assert answer.returncode == 2
            assert "config reloaded, but account 'bob' not changed" in answer.stderr
            assert "keeps its old settings" in answer.stderr
            session.sendmail(alice_user.address, ["bob@example.org"], b"Subject: t\r\n\r\nx\r\n")
        wait_listening(bob[1])  # bob still serves on its old port
        send(clean_provider, alice[1])
        assert len(clean_provider.wait_for_messages("bob", 2)) == 2
        accounts = {a["name"] for a in status_json(running)["accounts"]}
        assert accounts == {"alice", "bob"}
    finally:
        log = running.stop()
    assert "not changed" in log and "Traceback" not in log


def test_broken_config_on_reload_keeps_the_old_one(daemon, clean_provider):
    daemon.config.write_text(daemon.config.read_text() + "\nnot toml [\n")
    answer = daemon.cli("reload")  # the CLI itself names the mistake
    assert answer.returncode == 2 and "found invalid TOML" in answer.stderr
    daemon.process.send_signal(signal.SIGHUP)  # the daemon keeps its old config
    time.sleep(0.5)
    send(clean_provider, daemon.smtp_port)
    assert len(clean_provider.wait_for_messages("bob", 1)) == 1
    assert "config not reloaded" in daemon.stop()


def test_sigterm_in_the_middle_of_data_answers_421_and_sends_nothing(daemon, clean_provider):
    """The client is half-way through its message when the daemon is told to stop: it
    hears 421 (RFC 5321 3.8: try again later), so it keeps the message; nothing of the
    half message reaches the provider."""
    alice = clean_provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
        smtp.login(alice.login, alice.password)
        smtp.mail(alice.address)
        smtp.rcpt("bob@example.org")
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(b"From: alice@example.org\r\nTo: bob@example.org\r\n\r\nfirst half\r\n")
        daemon.process.send_signal(signal.SIGTERM)
        code, text = smtp.getreply()
        assert (code, text) == (421, b"4.3.2 localproxy is shutting down, try again later")
    assert daemon.process.wait(30) == 0
    assert clean_provider.stored_messages("bob") == []


def test_sigterm_during_data_loses_nothing(daemon, clean_provider):
    body = (b"x" * 76 + b"\r\n") * 60_000  # ~4.7 MB: DATA takes a moment
    outcome: dict[str, object] = {}

    def sender() -> None:
        try:
            send(clean_provider, daemon.smtp_port, body)
            outcome["accepted"] = True
        except (smtplib.SMTPException, OSError) as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    time.sleep(0.3)
    log = daemon.stop()
    thread.join(60)
    assert daemon.process.returncode == 0, log[-2000:]
    stored = clean_provider.stored_messages("bob")
    if outcome.get("accepted"):
        assert len(stored) == 1, "acknowledged, so it must have been delivered"
    else:
        assert "error" in outcome, "the client was told, so it keeps the message"


def test_logs_never_contain_credentials(daemon, clean_provider):
    send(clean_provider, daemon.smtp_port)
    clean_provider.wait_for_messages("bob", 1)
    log = daemon.stop()
    password = clean_provider.users["alice"].password
    assert password not in log
    assert "sent encrypted" in log or "sent plain" in log


def test_control_socket_is_private(daemon):
    run_dir = Path(daemon.env["LOCALPROXY_RUNTIME_DIR"])
    (sock,) = run_dir.glob("*.sock")
    assert sock.stat().st_mode & 0o777 == 0o600
    assert run_dir.stat().st_mode & 0o077 == 0


def test_the_windows_control_endpoint_tcp_with_a_token(clean_provider, tmp_path):
    """What Windows uses (no private Unix sockets there): status, reload and the outbox
    over loopback TCP, the token from a 0600 file; a stale file after a kill is fine."""
    running = start_daemon(clean_provider, tmp_path, LOCALPROXY_CONTROL="tcp")
    try:
        run_dir = Path(running.env["LOCALPROXY_RUNTIME_DIR"])
        assert not list(run_dir.glob("*.sock"))
        (token_file,) = run_dir.glob("*.control")
        assert token_file.stat().st_mode & 0o777 == 0o600
        send(clean_provider, running.smtp_port)
        clean_provider.wait_for_messages("bob", 1)
        assert status_json(running)["accounts"][0]["counters_total"]["sent_plain"] == 1
        assert running.cli("reload").returncode == 0
        assert running.cli("outbox", "flush").returncode == 0
        running.process.kill()
        running.process.wait()
        assert token_file.exists() and running.cli("status").returncode == 3
        restarted = relaunch(running)
        try:
            assert status_json(restarted)["pid"] == restarted.process.pid
        finally:
            restarted.stop()
        assert not token_file.exists(), "removed on a clean shutdown"
    finally:
        running.stop()


def test_not_running_is_explained(clean_provider, tmp_path):
    config = tmp_path / "config.toml"
    write_config(config, clean_provider, free_port(), free_port())
    done = subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "r")},
    )
    assert done.returncode == 3
    assert "not running" in done.stderr and "localproxy run" in done.stderr


def test_status_json_when_not_running_is_json_too(clean_provider, tmp_path):
    config = tmp_path / "config.toml"
    write_config(config, clean_provider, free_port(), free_port())
    done = subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "r")},
    )
    assert done.returncode == 3
    assert json.loads(done.stdout) == {
        "running": False,
        "config": str(config),
        "start": "localproxy run",
    }


def status_json(daemon: Running) -> dict:
    done = daemon.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_json_reflects_the_traffic_exactly(daemon, clean_provider):
    before = status_json(daemon)["accounts"][0]
    assert before["counters_total"]["sent_plain"] == 0
    for _ in range(3):
        send(clean_provider, daemon.smtp_port)
    clean_provider.wait_for_messages("bob", 3)
    account = status_json(daemon)["accounts"][0]
    assert account["counters_total"]["sent_plain"] == 3
    assert account["counters_today"]["sent_plain"] >= 3
    assert account["counters_total"]["sent_encrypted"] == 0, "bob's key is not known"
    assert account["own_key"]["fingerprint"] and account["own_key"]["problem"] is None
    assert {(x["kind"], x["port"]) for x in account["listeners"]} >= {
        ("smtp", daemon.smtp_port),
        ("imap", daemon.imap_port),
    }
    assert account["outbox"]["queued"] == 0


def test_status_counts_encrypted_mail_both_ways(daemon, clean_provider):
    """alice writes to herself: one copy sent encrypted (and signed, inside); fetched
    through the proxy it counts as decrypted and verified, each exactly once."""
    alice = clean_provider.users["alice"]
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=60) as smtp:
        smtp.login(alice.login, alice.password)
        smtp.sendmail(
            alice.address,
            [alice.address],
            b"From: alice@example.org\r\nTo: alice@example.org\r\nSubject: n\r\n\r\nnote\r\n",
        )
    (stored,) = clean_provider.wait_for_messages("alice", 1)
    assert b"multipart/encrypted" in stored and b"note" not in stored.partition(b"\r\n\r\n")[2]
    client = imaplib.IMAP4("127.0.0.1", daemon.imap_port, timeout=60)
    try:
        client.login(alice.login, alice.password)
        client.select("INBOX")
        _typ, data = client.fetch("1", "(BODY.PEEK[])")
        assert b"note" in data[0][1] and b"signature=valid" in data[0][1]
    finally:
        client.logout()
    counters = status_json(daemon)["accounts"][0]["counters_total"]
    assert counters == {
        "sent_encrypted": 1,
        "sent_signed": 0,
        "sent_plain": 0,
        "received_decrypted": 1,
        "received_verified": 1,
        "received_failed": 0,
    }


def test_a_copy_that_fails_for_good_is_reported_in_the_inbox(daemon, clean_provider):
    """The client got 250 long ago: the user learns of the failure from a delivery
    report in their INBOX (besides the log and status)."""
    alice = clean_provider.users["alice"]
    data_dir = daemon.config.parent / "data"
    with KeyStore(data_dir) as store:
        outbox = Outbox(data_dir / "outbox.sqlite", SecretBox(store.store_key.key))
    credentials = Credentials("PLAIN", alice.login, alice.password).to_bytes()
    copy = b"From: alice@example.org\r\nTo: carol@example.org\r\nSubject: q\r\n\r\ntext\r\n"
    refusal = "550 5.1.1 <carol@example.org>: Recipient address rejected"
    outbox.add(
        "alice",
        alice.address,
        ["carol@example.org"],
        copy,
        credentials,
        error=refusal,
        permanent=True,
    )
    outbox.close()
    assert daemon.cli("outbox", "flush").returncode == 0
    (report,) = clean_provider.wait_for_messages("alice", 1)
    assert b"Subject: Undelivered mail: 1 recipient(s)" in report
    assert b"report-type=delivery-status" in report
    assert b"Final-Recipient: rfc822; carol@example.org" in report and b"Status: 5.1.1" in report
    assert b"\r\ntext\r\n" not in report
    events = status_json(daemon)["events"]
    assert any("gave up sending to carol@example.org" in e["message"] for e in events)


def test_status_view_renders_what_a_person_needs(daemon, clean_provider):
    deadline = time.monotonic() + 15
    while status_json(daemon)["accounts"][0]["upstream"]["imap"]["reachable"] is None:
        assert time.monotonic() < deadline, "the first upstream check never finished"
        time.sleep(0.2)
    env = {**daemon.env, "COLUMNS": "140"}
    done = subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(daemon.config), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for needed in (
        "alice",
        str(daemon.smtp_port),
        str(daemon.imap_port),
        "TLSv1.3",
        clean_provider.ca_name,
    ):
        assert needed in text, f"{needed!r} missing from the status view:\n{text}"


def test_status_when_not_running_exits_3(clean_provider, tmp_path):
    config = tmp_path / "config.toml"
    write_config(config, clean_provider, free_port(), free_port())
    done = subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOCALPROXY_RUNTIME_DIR": str(tmp_path / "r"), "COLUMNS": "300"},
    )
    assert done.returncode == 3
    assert "is not running" in done.stdout and " run" in done.stdout


def test_open_imap_sessions_get_bye_on_shutdown(daemon):
    with socket.create_connection(("127.0.0.1", daemon.imap_port), timeout=10) as client:
        assert client.recv(4096).startswith(b"* OK")
        daemon.process.send_signal(signal.SIGTERM)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    assert b"* BYE [UNAVAILABLE] localproxy is shutting down" in received
    assert daemon.process.wait(30) == 0


def test_locked_keys_are_loud_and_never_mean_plaintext(clean_provider, tmp_path):
    """Keyring locked: mail to carol (key known) is refused, not sent unprotected; mail
    to bob (no key: plain by policy anyway) still goes out."""
    running = start_daemon(clean_provider, tmp_path)
    running.stop()
    carol = tmp_path / "carol.asc"
    engine = default_engine()
    carol.write_bytes(engine.public_only(engine.generate_key(["carol@example.org"]).data))
    assert running.cli("keys", "import", str(carol)).returncode == 0
    (tmp_path / "data" / "store.key").unlink()  # the keyring entry is gone
    locked = relaunch(running)
    alice = clean_provider.users["alice"]
    try:
        account = status_json(locked)["accounts"][0]
        assert "cannot be unlocked" in " ".join(status_json(locked)["warnings"])
        assert account["own_key"]["problem"] and "keys restore" in account["own_key"]["problem"]
        with smtplib.SMTP("127.0.0.1", locked.smtp_port, timeout=60) as smtp:
            smtp.login(alice.login, alice.password)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail(
                    alice.address,
                    ["carol@example.org"],
                    b"From: alice@example.org\r\nTo: carol@example.org\r\n\r\nsecret\r\n",
                )
            assert refused.value.smtp_code == 451
            assert b"own keys cannot be unlocked" in refused.value.smtp_error
        send(clean_provider, locked.smtp_port, b"plain by policy\r\n")
        assert b"plain by policy" in clean_provider.wait_for_messages("bob", 1)[0]
    finally:
        locked.stop()
    assert clean_provider.stored_messages("carol") == []


def test_a_stale_socket_file_does_not_block_the_start(clean_provider, tmp_path):
    running = start_daemon(clean_provider, tmp_path)
    (sock,) = Path(running.env["LOCALPROXY_RUNTIME_DIR"]).glob("*.sock")
    running.process.kill()  # SIGKILL: the socket file stays behind
    running.process.wait()
    assert sock.exists()
    restarted = relaunch(running)
    try:
        assert status_json(restarted)["pid"] == restarted.process.pid
    finally:
        restarted.stop()
