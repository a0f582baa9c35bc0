"""`localproxy demo`: the whole product on one machine, in under a minute.

A sandbox provider (real Dovecot and Postfix on loopback, with a private CA),
two accounts, alice and bob, with fresh keys that know each other, and a real
`localproxy run` in front of them. alice sends bob a message through the
proxy; the demo shows what the provider stored (ciphertext) beside what bob's
mail client reads through the proxy (plaintext, signature checked), then the
status view. Everything it started is stopped and removed afterwards, unless
--keep.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import TYPE_CHECKING

from rich.columns import Columns
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.rule import Rule

if TYPE_CHECKING:
    from localproxy.sandbox.provider import Provider

DEMO_TEXT = "Hi Bob,\n\nthe provider only ever sees ciphertext of this.\n\nAlice\n"


class DemoError(Exception):
    """The demo cannot run here; str() says what is missing."""


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the whole thing on a sandbox provider on this machine",
        description="Start a sandbox mail provider on loopback (Dovecot + Postfix), two "
        "accounts with fresh keys and the proxy, send an encrypted message and show what "
        "the provider stored next to what the mail client reads.",
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave everything running and print how to connect a mail client",
    )
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from localproxy.sandbox.provider import (
        ProviderUnavailable,
        become_subreaper,
        check_available,
        start_provider,
    )

    try:
        check_available()
    except ProviderUnavailable as exc:
        raise DemoError(
            f"the demo needs Dovecot and Postfix ({exc}); `scripts/demo` installs them on Debian"
        ) from None
    console = Console()
    become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="localproxy-demo-"))
    try:
        with start_provider(root) as provider:
            console.print(Rule("localproxy demo"))
            console.print(
                f"Sandbox provider: IMAP {provider.hostname}:{provider.imap_port} "
                f"(STARTTLS), submission {provider.hostname}:"
                f"{provider.submission_port}, private CA [bold]{provider.ca_name}"
                "[/]"
            )
            daemon = _Demo(root, provider, console)
            try:
                daemon.run(keep=args.keep)
            finally:
                daemon.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


class _Demo:
    def __init__(self, root: Path, provider: Provider, console: Console) -> None:
        self.root, self.provider, self.console = root, provider, console
        self.config = root / "config.toml"
        self.env = {
            **os.environ,
            "LOCALPROXY_RUNTIME_DIR": str(root / "run"),
            "COLUMNS": str(console.width),
        }
        self.ports = {
            name: {"imap": _free_port(), "smtp": _free_port()} for name in ("alice", "bob")
        }
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "localproxy", "--config", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise DemoError(f"`localproxy {' '.join(args)}` failed: {done.stderr.strip()}")
        return done

    def run(self, keep: bool) -> None:
        self._write_config()
        for name in ("alice", "bob"):
            self.cli("keys", "generate", name)
        self.console.print(
            "Generated OpenPGP keys for alice and bob (they share one key "
            "store here, so they know each other)."
        )
        self._start_daemon()
        self._send()
        self._show_side_by_side()
        self.console.print(Rule("localproxy status"))
        self.console.print(self.cli("status").stdout)
        if keep:
            self._wait_for_ctrl_c()

    def _write_config(self) -> None:
        p = self.provider
        accounts = "".join(
            f"""
[[account]]
name = "{name}"
addresses = ["{p.users[name].address}"]
[account.local]
imap_port = {self.ports[name]["imap"]}
smtp_port = {self.ports[name]["smtp"]}
[account.upstream.imap]
host = "{p.hostname}"
port = {p.imap_port}
security = "starttls"
ca_file = "{p.ca_file}"
[account.upstream.smtp]
host = "{p.hostname}"
port = {p.submission_port}
security = "starttls"
ca_file = "{p.ca_file}"
"""
            for name in ("alice", "bob")
        )
        self.config.write_text(f'[proxy]\ndata_dir = "{self.root / "data"}"\n{accounts}')

    def _start_daemon(self) -> None:
        log = (self.root / "daemon.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localproxy", "--config", str(self.config), "run"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for port in (ports[kind] for ports in self.ports.values() for kind in ports):
            _wait_listening(port, self.process)
        self.console.print(f"localproxy is running (pid {self.process.pid}).")

    def _send(self) -> None:
        alice = self.provider.users["alice"]
        message = EmailMessage()
        message["From"], message["To"] = "Alice <alice@example.org>", "Bob <bob@example.org>"
        message["Subject"] = "Our secret plan"
        message.set_content(DEMO_TEXT)
        with smtplib.SMTP("127.0.0.1", self.ports["alice"]["smtp"], timeout=60) as smtp:
            smtp.login(alice.login, alice.password)
            smtp.sendmail(alice.address, ["bob@example.org"], message.as_bytes(policy=SMTP_POLICY))
        self.provider.wait_for_messages("bob", 1)
        self.console.print("alice sent bob a message through localproxy's SMTP port.")

    def _show_side_by_side(self) -> None:
        (stored,) = self.provider.stored_messages("bob")
        bob = self.provider.users["bob"]
        client = imaplib.IMAP4("127.0.0.1", self.ports["bob"]["imap"], timeout=60)
        client.login(bob.login, bob.password)
        client.select("INBOX", readonly=True)
        _typ, data = client.fetch("1", "(BODY.PEEK[])")
        client.logout()
        seen = data[0][1]
        if b"the provider only ever sees ciphertext" in stored:
            raise DemoError("the provider stored the message in clear; this is a bug")
        if b"the provider only ever sees ciphertext" not in seen:
            raise DemoError("bob's client did not get the decrypted message; see daemon.log")
        if b"signature=valid" not in seen.partition(b"\r\n\r\n")[0]:
            raise DemoError("bob's client did not see alice's signature as valid")
        self.console.print(
            Columns(
                [
                    Panel(escape(_excerpt(stored)), title="what the provider stored", width=62),
                    Panel(escape(_excerpt(seen)), title="what bob's mail client reads", width=62),
                ]
            )
        )

    def _wait_for_ctrl_c(self) -> None:
        lines = [
            f"Point a mail client at 127.0.0.1 (connection security: none or STARTTLS; "
            f"the local certificate is in {self.root / 'data' / 'local-tls'}):"
        ]
        for name, ports in self.ports.items():
            user = self.provider.users[name]
            lines.append(
                f"  {name}: IMAP port {ports['imap']}, SMTP port {ports['smtp']}, "
                f"user {user.login}, password {user.password}"
            )
        lines.append(f"Config: {self.config}. Press Ctrl-C to stop and clean up.")
        self.console.print("\n".join(lines))
        try:
            while self.process is not None and self.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_HIDDEN = ("received", "return-path", "delivered-to", "autocrypt", "mime-version")


def _excerpt(raw: bytes, lines: int = 24) -> str:
    """The lines a person wants to compare: headers that matter, then the body's start."""
    kept, hiding = [], False
    for line in raw.decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t"):
            if not hiding:
                kept.append(line)
            continue
        hiding = line.split(":", 1)[0].lower() in _HIDDEN
        if not hiding:
            kept.append(line)
    text = "\n".join(kept[:lines])
    return text + ("\n…" if len(kept) > lines else "")


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"localproxy exited with status {process.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise DemoError(f"localproxy did not start listening on port {port}")
