#!/usr/bin/env python3
"""The proxy path against the direct path, side by side in one run, on a fresh provider.

SMTP (issue 4): N x 20 KB messages to a known recipient through the SMTP proxy and
straight to Postfix submission; one message with a 25 MB attachment (wall time, and the
proxy's peak RSS). IMAP (issue 5): FETCH (FLAGS ENVELOPE RFC822.SIZE) over plain
messages; full download of encrypted messages cold and warm (view cache) against a direct
download of the same messages in plain; RSS of the proxy holding idle IDLE sessions.
OpenPGP: the engine against gpg, sq and rnp, via scripts/bench_openpgp.py.

Every proxy runs in its own child process (``--serve``), so the RSS figures are the
proxy's alone; the clients run here. Timings are medians of ``--reps`` repetitions, proxy
and direct interleaved so that drift hits both. Nothing here asserts a timing: targets
are reported as pass/fail in the table.

    scripts/bench                        # full run (about two minutes)
    scripts/bench --quick --json r.json  # tiny counts: proves the rig works
    scripts/bench --only smtp --reps 1 --profile /tmp/prof   # py-spy the proxy (on PATH)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import imaplib
import importlib.util
import inspect
import json
import os
import random
import re
import select
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from localproxy.config import Account, Config, LocalListen, parse_config
from localproxy.crypto.openpgp import OpenPGPEngine, default_engine
from localproxy.imap.relay import ImapProxy
from localproxy.incoming import IncomingProcessor
from localproxy.keys.store import KeyStore
from localproxy.mime import to_crlf
from localproxy.smtp.compose import compose
from localproxy.smtp.pipe import checked
from localproxy.smtp.server import Credentials, SmtpHandler, SmtpProxy, open_upstream

if TYPE_CHECKING:
    from localproxy.sandbox.provider import Provider

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
KB, MB = 1000, 1000**2
# Postfix must take the 25 MB attachment once encrypted: base64 in MIME (x1.37), then
# armored ciphertext (x1.37), and the proxy advertises only limit / 1.4 to its clients.
BENCH_SIZE_LIMIT = 100 * MB
# One user, 100+ sessions through the proxy, each with its own upstream connection (and
# imap-login process, which stays to carry TLS): Dovecot's defaults stop at 10 per
# user and IP and 100 processes per service.
DOVECOT_LIMITS = """
default_process_limit = 400
protocol imap {
  mail_max_userip_connections = 400
}
"""
CLIENT_TIMEOUT = 300.0  # seconds; the proxy encrypts a 25 MB message before it answers
DELIVERY_TIMEOUT = 120.0
START_TIMEOUT = 60.0  # for a proxy child to print its port
SENDER, RECIPIENT = "alice", "bob"
STATUS_DECRYPTED = b"X-LocalProxy-Security: decrypted"


@dataclass(frozen=True)
class Scale:
    smtp_messages: int = 200
    message_size: int = 20 * KB
    attachment_size: int = 25 * MB
    envelope_messages: int = 5000
    download_messages: int = 1000
    idle_sessions: int = 100
    crypto_small: str = "20K"
    crypto_large: str = "25M"
    reps: int = 3


QUICK = Scale(
    smtp_messages=5,
    attachment_size=1 * MB,
    envelope_messages=100,
    download_messages=20,
    idle_sessions=5,
    crypto_large="1M",
    reps=1,
)


@dataclass
class Figure:
    """One row of the table: the proxy's value next to the direct path's or a tool's."""

    key: str
    label: str
    unit: str
    proxy: float
    reference: float | None = None
    reference_label: str = "direct"
    ratio: float | None = None  # proxy cost / reference cost (>1: the proxy is slower)
    target: str = ""
    passed: bool | None = None  # None: informational, no target


@dataclass
class Results:
    scale: Scale
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    def as_json(self) -> dict[str, Any]:
        return {
            "scale": asdict(self.scale),
            "figures": [asdict(f) for f in self.figures],
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- the provider


def harness() -> ModuleType:
    """localproxy.sandbox.provider; the repository root is not on sys.path for a script."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import localproxy.sandbox.provider as module

    return module


@contextlib.contextmanager
def bench_limits(module: ModuleType) -> Iterator[None]:
    """Raise the size and connection limits only while this run's configs are written,
    so a test process that imported the harness keeps its defaults."""
    size, dovecot_conf = module.MESSAGE_SIZE_LIMIT, module._dovecot_conf
    module.MESSAGE_SIZE_LIMIT = BENCH_SIZE_LIMIT
    module._dovecot_conf = lambda *args: dovecot_conf(*args) + DOVECOT_LIMITS
    try:
        yield
    finally:
        module.MESSAGE_SIZE_LIMIT, module._dovecot_conf = size, dovecot_conf


def start_bench_provider(root: Path) -> Provider:
    module = harness()
    module.become_subreaper()
    with bench_limits(module):
        return module.start_provider(root)


def proxy_config(provider: Provider, user: str, data: Path) -> dict[str, Any]:
    """The raw config of one account, as tests/e2e/test_pipeline.py builds it."""

    def upstream(port: int) -> dict[str, Any]:
        host = provider.hostname
        return {
            "host": host,
            "port": port,
            "security": "starttls",
            "ca_file": str(provider.ca_file),
        }

    return {
        "proxy": {"data_dir": str(data)},
        "account": [
            {
                "name": user,
                "addresses": [provider.users[user].address],
                "upstream": {
                    "imap": upstream(provider.imap_port),
                    "smtp": upstream(provider.submission_port),
                },
            }
        ],
    }


# --------------------------------------------------------------------------- proxy child


def serve(spec_file: Path) -> None:
    """Child process: run one proxy until stdin closes (the parent ended or died)."""
    no_os_keyring()
    spec = json.loads(spec_file.read_text())
    asyncio.run(_serve(spec["role"], parse_config(spec["config"])))


async def _serve(role: str, config: Config) -> None:
    account = config.accounts[0]
    store = KeyStore(config.proxy.data_dir)
    engine = default_engine()
    proxy: SmtpProxy | ImapProxy
    if role == "smtp":
        handler = SmtpHandler(account, config, store, engine, None)
        proxy = SmtpProxy(handler, host="127.0.0.1", port=0)
    else:
        incoming = IncomingProcessor(account, config, store, engine)
        local = replace(account, local=LocalListen(imap_port=0, smtp_port=0))
        extra = {"header_observer": incoming.observe_headers} if observer_supported() else {}
        proxy = ImapProxy(
            local, incoming.transform, append_transformer=incoming.encrypt_for_self, **extra
        )
    await proxy.start()
    print(json.dumps({"port": proxy.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, daemon=True).start()
    await stop.wait()
    await proxy.close()
    store.close()


def observer_supported() -> bool:
    """Whether this version of the relay takes Autocrypt's header observer (added while
    this bench was written): wired like the service wires it, when it exists."""
    return "header_observer" in inspect.signature(ImapProxy).parameters and hasattr(
        IncomingProcessor, "observe_headers"
    )


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)
    return {name: int(kb) * 1024 for name, kb in found}


class ProxyChild:
    """A proxy in its own process: its port, and its memory from /proc."""

    def __init__(
        self, work: Path, name: str, role: str, config: dict[str, Any], profile: Path | None
    ) -> None:
        spec = work / f"{name}.json"
        spec.write_text(json.dumps({"role": role, "config": config}))
        self.log = work / f"{name}.log"
        with self.log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--serve", str(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"proxy child {name} did not start:\n{self.log.read_text()}")
        self.port: int = json.loads(line)["port"]
        self.profiler = None if profile is None else self._profile(profile / f"{name}.txt")

    def _profile(self, output: Path) -> subprocess.Popen[bytes]:
        """py-spy on the child, every thread (crypto runs in worker threads), collapsed
        stacks written when the child exits."""
        argv = ["py-spy", "record", "--pid", str(self.pid), "--threads", "--rate", "250"]
        argv += ["--format", "raw", "--output", str(output)]
        with self.log.open("ab") as err:
            profiler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        time.sleep(0.5)  # attached before the first request
        return profiler

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak since start or reset_peak), in bytes."""
        return proc_memory(self.pid)

    def reset_peak(self) -> None:
        # "5" resets VmHWM to the current RSS (proc(5), clear_refs; Linux 4.0+).
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.profiler is not None:
            self.profiler.wait(timeout=60)

    def __enter__(self) -> ProxyChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def no_os_keyring() -> None:
    """Store keys go to a 0600 file in the bench's data dir, never the user's keyring."""
    import keyring
    from keyring.backends.fail import Keyring as FailKeyring

    keyring.set_keyring(FailKeyring())


# --------------------------------------------------------------------------- messages


_VOCABULARY = (
    "meeting budget draft review schedule project quarter invoice travel report the a of "
    "and to in for is on that with as was at by this be are from or it an have which"
)
WORDS = _VOCABULARY.split()


def letter(index: int, size: int, tag: str = "bench") -> bytes:
    """A text message of about ``size`` octets from alice to bob; words, not noise, so
    it looks like mail (our keys ask for no compression, so it is not compressed)."""
    rng = random.Random(index)
    lines, total = [], 0
    while total < size - 600:  # leave room for the header
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(line)
        total += len(line) + 2
    msg = EmailMessage()
    msg["From"], msg["To"] = "Alice <alice@example.org>", "Bob <bob@example.org>"
    msg["Subject"] = f"{tag} message {index}"
    msg["Message-ID"] = f"<{tag}-{index}-{os.getpid()}@example.org>"
    msg["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    msg.set_content("\n".join(lines) + "\n")
    return msg.as_bytes(policy=email.policy.SMTP)


def with_attachment(size: int) -> bytes:
    """A short letter with ``size`` octets of random (incompressible) data attached."""
    msg = EmailMessage()
    msg["From"], msg["To"] = "Alice <alice@example.org>", "Bob <bob@example.org>"
    msg["Subject"] = f"attachment of {size} octets"
    msg.set_content("The file is attached.\n")
    msg.add_attachment(
        os.urandom(size), maintype="application", subtype="octet-stream", filename="data.bin"
    )
    return msg.as_bytes(policy=email.policy.SMTP)


# --------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    provider: Provider
    work: Path
    engine: OpenPGPEngine
    configs: dict[str, dict[str, Any]]  # raw proxy config per user
    profile: Path | None = None  # py-spy output directory

    def child(self, name: str, role: str, user: str) -> ProxyChild:
        return ProxyChild(self.work, name, role, self.configs[user], self.profile)

    def store(self, user: str) -> KeyStore:
        return KeyStore(Path(self.configs[user]["proxy"]["data_dir"]), self.engine)


def make_rig(provider: Provider, work: Path, profile: Path | None = None) -> Rig:
    """alice and bob with fresh keys, each knowing the other's (bob has seen alice's
    mail before: the steady state of a correspondence)."""
    engine = default_engine()
    configs = {u: proxy_config(provider, u, work / u) for u in (SENDER, RECIPIENT)}
    rig = Rig(provider, work, engine, configs, profile)
    public = {}
    for user in configs:
        with rig.store(user) as store:
            info = store.generate(user, (provider.users[user].address,))
            public[user] = store.export_public([info.fingerprint])
    for user, other in ((SENDER, RECIPIENT), (RECIPIENT, SENDER)):
        with rig.store(user) as store:
            store.import_keys(public[other], f"import:{other}.asc")
    return rig


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- SMTP


def no_delay(sock: socket.socket | None) -> socket.socket | None:
    """Send small writes at once, as asyncio does for the proxy's own connections: without
    it, smtplib's last TLS record of a message waits for a delayed ACK (Nagle), ~40 ms per
    message on the direct path alone, which would flatter the proxy."""
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def smtp_direct(provider: Provider, user: str) -> smtplib.SMTP:
    conn = smtplib.SMTP(
        provider.host, provider.submission_port, local_hostname="localhost", timeout=CLIENT_TIMEOUT
    )
    no_delay(conn.sock)
    conn.starttls(context=provider.ssl_context())
    account = provider.users[user]
    conn.login(account.login, account.password)
    return conn


def smtp_proxy(provider: Provider, port: int, user: str) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", port, local_hostname="localhost", timeout=CLIENT_TIMEOUT)
    no_delay(conn.sock)
    account = provider.users[user]
    conn.login(account.login, account.password)
    return conn


def send_all(connect: Callable[[], smtplib.SMTP], messages: list[bytes]) -> float:
    """Seconds for one client session (connect, AUTH, every message, QUIT)."""
    start = time.perf_counter()
    with connect() as conn:
        for raw in messages:
            refused = conn.sendmail("alice@example.org", ["bob@example.org"], raw)
            if refused:
                raise RuntimeError(f"recipient refused: {refused}")
    return time.perf_counter() - start


class Mailbox:
    """Counts what has been delivered to one mailbox, to wait for Postfix's queue."""

    def __init__(self, provider: Provider, user: str, name: str = "INBOX") -> None:
        self.provider, self.user, self.name = provider, user, name
        self.expected = self.count()

    def count(self) -> int:
        with self.provider.imap(self.user) as conn:
            typ, data = conn.status(self.name, "(MESSAGES)")
            assert typ == "OK", data
            return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))

    def wait(self, more: int) -> None:
        """Until ``more`` further messages arrived: the background delivery of one phase
        must not load the CPU during the next."""
        self.expected += more
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while (have := self.count()) < self.expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{have} of {self.expected} delivered\n{self.provider.logs()}")
            time.sleep(0.1)

    def last_content_type(self) -> bytes:
        with self.provider.imap(self.user) as conn:
            conn.select(self.name, readonly=True)
            typ, data = conn.fetch("*", "(BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE)])")
            assert typ == "OK", data
            return data[0][1]


def bench_smtp(rig: Rig, scale: Scale, results: Results) -> None:
    provider = rig.provider
    inbox = Mailbox(provider, RECIPIENT)
    batch = [letter(i, scale.message_size, "smtp") for i in range(scale.smtp_messages)]
    with rig.child("smtp", "smtp", SENDER) as child:
        direct = lambda: smtp_direct(provider, SENDER)  # noqa: E731
        proxied = lambda: smtp_proxy(provider, child.port, SENDER)  # noqa: E731
        for connect in (direct, proxied):  # warm-up: imports, TLS session setup
            send_all(connect, batch[:1])
        inbox.wait(2)
        if b"multipart/encrypted" not in inbox.last_content_type():
            raise RuntimeError("the SMTP proxy did not encrypt to the known recipient")
        times: dict[str, list[float]] = {"direct": [], "proxy": []}
        machine: dict[str, list[MachineCpu]] = {"direct": [], "proxy": []}
        for _ in range(scale.reps):
            for name, connect in (("direct", direct), ("proxy", proxied)):
                before = machine_busy()
                times[name].append(send_all(connect, batch))
                sent = machine_busy()
                inbox.wait(len(batch))
                machine[name].append(MachineCpu(before, sent, machine_busy(), times[name][-1]))
        _smtp_batch_figure(results, scale, median(times["proxy"]), median(times["direct"]))
        _smtp_machine_figures(results, scale, machine)
        _smtp_provider_share(rig, scale, results, inbox, median(times["direct"]))
        _bench_attachment(rig, scale, results, child, inbox)


def _smtp_batch_figure(results: Results, scale: Scale, proxy: float, direct: float) -> None:
    count = scale.smtp_messages
    ratio = proxy / direct
    results.add(
        Figure(
            "smtp.batch",
            f"SMTP: {count} x {scale.message_size // KB} KB to a known recipient",
            "msg/s",
            count / proxy,
            count / direct,
            ratio=ratio,
            target="time <= 1.5x direct",
            passed=ratio <= 1.5,
        )
    )


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, every core)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class MachineCpu:
    """Busy CPU seconds of the whole machine at the start of a batch, when the client
    was done, and when Postfix had delivered the last message; the batch's wall time."""

    start: float
    sent: float
    delivered: float
    wall: float

    def per_message(self, count: int) -> float:
        return (self.delivered - self.start) / count

    @property
    def busy(self) -> float:
        """Cores in use while the client was sending (2.0: both of two cores)."""
        return (self.sent - self.start) / self.wall


def _smtp_machine_figures(
    results: Results, scale: Scale, machine: dict[str, list[MachineCpu]]
) -> None:
    """What sending costs the whole machine (client, proxy, Postfix, Dovecot delivery):
    where the direct path already keeps every core busy, the proxy's own CPU shows in
    the batch figure at once, whatever its latency."""
    count = scale.smtp_messages
    proxy = median(m.per_message(count) for m in machine["proxy"]) * 1000
    direct = median(m.per_message(count) for m in machine["direct"]) * 1000
    results.add(
        Figure(
            "smtp.batch_machine_cpu",
            "SMTP: the same, CPU of the whole machine per message (send and delivery)",
            "ms",
            proxy,
            direct,
            ratio=proxy / direct if direct else None,  # /proc/stat counts in 10 ms ticks
        )
    )
    busy = {name: median(m.busy for m in runs) for name, runs in machine.items()}
    results.notes.append(
        f"Cores busy while the {count} messages were sent: {busy['direct']:.2f} direct, "
        f"{busy['proxy']:.2f} through the proxy, of {os.cpu_count()}. CPU per message "
        "counts every process from the first message until Postfix delivered the last."
    )


def _smtp_provider_share(
    rig: Rig, scale: Scale, results: Results, inbox: Mailbox, direct: float
) -> None:
    """Postfix's share of the proxy path: the batch's ciphertexts, composed beforehand,
    sent by the proxy's own upstream code (one logged-in pipe, MAIL and RCPT in one
    write, BDAT), with no client and no compose in the timing."""
    count = scale.smtp_messages
    ciphertexts = [to_crlf(message) for message in encrypted_letters(rig, scale, count, tag="smtp")]
    account = parse_config(rig.configs[SENDER]).accounts[0]
    user = rig.provider.users[SENDER]
    credentials = Credentials("PLAIN", user.login, user.password)
    seconds = []
    for _ in range(scale.reps):
        seconds.append(asyncio.run(pipe_send_all(account, credentials, ciphertexts)))
        inbox.wait(count)  # delivered before the next phase, as for the batch
    share = median(seconds)
    results.add(
        Figure(
            "smtp.provider_share",
            "SMTP: the same ciphertexts straight to Postfix (its share of the proxy path)",
            "msg/s",
            count / share,
            count / direct,
            ratio=share / direct,
        )
    )


async def pipe_send_all(account: Account, credentials: Credentials, messages: list[bytes]) -> float:
    """Seconds to send every message over one upstream pipe, as the proxy sends a copy."""
    pipe = await open_upstream(account, credentials)
    try:
        start = time.perf_counter()
        for message in messages:
            envelope = (b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.org>")
            for reply in await pipe.commands(*envelope):
                checked(reply, (250,))
            await pipe.send_message(message)
        return time.perf_counter() - start
    finally:
        pipe.close()


def _bench_attachment(
    rig: Rig, scale: Scale, results: Results, child: ProxyChild, inbox: Mailbox
) -> None:
    raw = with_attachment(scale.attachment_size)
    before = child.memory()["VmRSS"]
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    peak = footprint_peak = 0  # the highest of the repetitions
    for _ in range(scale.reps):
        child.reset_peak()
        with FootprintSampler(child.pid) as footprint:
            times["proxy"].append(
                send_all(lambda: smtp_proxy(rig.provider, child.port, SENDER), [raw])
            )
        peak = max(peak, child.memory()["VmHWM"])
        footprint_peak = max(footprint_peak, footprint.peak)
        inbox.wait(1)
        times["direct"].append(send_all(lambda: smtp_direct(rig.provider, SENDER), [raw]))
        inbox.wait(1)
    proxy, direct = median(times["proxy"]), median(times["direct"])
    label = f"SMTP: one {scale.attachment_size // MB} MB attachment"
    results.add(
        Figure("smtp.large", f"{label}, wall time", "s", proxy, direct, ratio=proxy / direct)
    )
    ratio = peak / len(raw)
    results.add(
        Figure(
            "smtp.large_rss",
            f"{label}: proxy peak RSS vs message ({len(raw) / MB:.1f} MB)",
            "MB",
            peak / MB,
            len(raw) / MB,
            "message",
            ratio=ratio,
            target="< 5x message",
            passed=ratio < 5,
        )
    )
    results.notes.append(
        f"SMTP proxy RSS before the {scale.attachment_size // MB} MB message: "
        f"{before / MB:.1f} MB; the peak includes it. The message is {len(raw):,} octets "
        "(the attachment base64-encoded). The plaintext handed to Sequoia sits in an "
        "anonymous memory file, which RSS does not count: RSS plus those files, sampled "
        f"every {FootprintSampler.INTERVAL * 1000:.0f} ms, peaked at "
        f"{footprint_peak / MB:.0f} MB (times: medians, peaks: the highest of {scale.reps} "
        "runs)."
    )


class FootprintSampler:
    """Polls a process's RSS plus the size of its memfd files (anonymous memory that
    RSS leaves out), keeping the peak: the RSS figure must not hide memory there."""

    INTERVAL = 0.002

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FootprintSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, self._sample())

    def _sample(self) -> int:
        rss = proc_memory(self.pid)["VmRSS"]
        fds = Path(f"/proc/{self.pid}/fd")
        memfds: dict[int, int] = {}  # inode -> size: Sequoia opens the same file again
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("/memfd:"):
                    info = fd.stat()
                    memfds[info.st_ino] = info.st_size
        return rss + sum(memfds.values())


# --------------------------------------------------------------------------- IMAP setup


def append_all(provider: Provider, user: str, mailbox: str, messages: Iterable[bytes]) -> int:
    """APPEND pipelined with LITERAL+ in one session: thousands of messages in seconds."""
    quote = harness().quote
    count = 0
    with provider.imap(user) as conn:
        conn.create(quote(mailbox))
        if b"LITERAL+" not in _capabilities(conn):
            raise RuntimeError("the provider does not offer LITERAL+")
        for chunk in _chunks(messages, 100):
            tags = []
            for raw in chunk:
                count += 1
                tag = f"X{count}".encode()
                head = f" APPEND {quote(mailbox)} {{{len(raw)}+}}\r\n".encode()
                conn.send(tag + head + raw + b"\r\n")
                tags.append(tag)
            _await_tags(conn, tags)
    return count


def _capabilities(conn: imaplib.IMAP4) -> bytes:
    typ, data = conn.capability()
    assert typ == "OK", data
    return data[0].upper()


def _chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _await_tags(conn: imaplib.IMAP4, tags: list[bytes]) -> None:
    waiting = set(tags)
    while waiting:
        line = conn.readline()
        if not line:
            raise RuntimeError("the provider closed the connection during APPEND")
        tag, _, rest = line.partition(b" ")
        if tag in waiting:
            if not rest.startswith(b"OK"):
                raise RuntimeError(f"APPEND failed: {line!r}")
            waiting.discard(tag)


def encrypted_letters(rig: Rig, scale: Scale, count: int, tag: str = "download") -> Iterator[bytes]:
    """What the SMTP proxy sends for each letter (encrypted to bob and alice, signed by
    alice, Autocrypt header): compose() is the code the proxy runs at DATA."""
    with rig.store(SENDER) as store:
        config = parse_config(rig.configs[SENDER])
        for i in range(count):
            copies = compose(
                letter(i, scale.message_size, tag),
                ["bob@example.org"],
                account=config.accounts[0],
                policy=config.policy,
                store=store,
                engine=rig.engine,
            )
            assert copies[0].kind == "encrypted", copies[0].kind
            yield copies[0].message


# --------------------------------------------------------------------------- IMAP


def imap_direct(provider: Provider, user: str) -> imaplib.IMAP4:
    conn = provider.imap(user)
    no_delay(conn.sock)
    return conn


def imap_proxy(provider: Provider, port: int, user: str) -> imaplib.IMAP4:
    conn = imaplib.IMAP4("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
    no_delay(conn.sock)
    account = provider.users[user]
    conn.login(account.login, account.password)
    return conn


ENVELOPE_ITEMS = "FLAGS ENVELOPE RFC822.SIZE"
# What the relay asks upstream for those items (relay.py: UID, the top-level content and
# status header fields, the first 128 octets of the text), spelled out here so the bench
# does not depend on the relay's internals; the header observer adds four more fields.
PROBE_FIELDS = "CONTENT-TYPE CONTENT-TRANSFER-ENCODING X-LOCALPROXY-SECURITY X-LOCALPROXY-STATUS"
OBSERVED_FIELDS = "FROM DATE AUTO-SUBMITTED AUTOCRYPT"


def probed_items() -> str:
    fields = f"{PROBE_FIELDS} {OBSERVED_FIELDS}" if observer_supported() else PROBE_FIELDS
    return f"{ENVELOPE_ITEMS} UID BODY.PEEK[HEADER.FIELDS ({fields})] BODY.PEEK[TEXT]<0.128>"


def fetch_envelopes(
    conn: imaplib.IMAP4, mailbox: str, count: int, items: str = ENVELOPE_ITEMS
) -> float:
    conn.select(mailbox, readonly=True)
    start = time.perf_counter()
    typ, data = conn.fetch("1:*", f"({items})")
    seconds = time.perf_counter() - start
    answered = sum(1 for item in data if b"ENVELOPE" in _head(item))
    if typ != "OK" or answered != count:
        raise RuntimeError(f"FETCH ENVELOPE: {typ}, {answered} of {count} answered")
    return seconds


def download(conn: imaplib.IMAP4, mailbox: str, count: int, decrypted: bool) -> float:
    """Seconds for one UID FETCH 1:* BODY.PEEK[] of the whole mailbox."""
    conn.select(mailbox, readonly=True)
    start = time.perf_counter()
    typ, data = conn.uid("FETCH", "1:*", "(BODY.PEEK[])")
    seconds = time.perf_counter() - start
    bodies = [item[1] for item in data if isinstance(item, tuple)]
    if typ != "OK" or len(bodies) != count:
        raise RuntimeError(f"download: {typ}, {len(bodies)} of {count} messages")
    if decrypted and not all(STATUS_DECRYPTED in body[:4096] for body in bodies):
        raise RuntimeError("download through the proxy: not every message was decrypted")
    return seconds


def _head(item: object) -> bytes:
    if isinstance(item, tuple):
        return item[0]
    return item if isinstance(item, bytes) else b""


def bench_fetch_envelope(rig: Rig, scale: Scale, results: Results) -> None:
    provider, count, mailbox = rig.provider, scale.envelope_messages, "bench-envelope"
    letters = (letter(i, scale.message_size, "envelope") for i in range(count))
    append_all(provider, RECIPIENT, mailbox, letters)
    times: dict[str, list[float]] = {"direct": [], "proxy": [], "probed": []}
    with rig.child("imap-envelope", "imap", RECIPIENT) as child:
        sessions = {
            "direct": imap_direct(provider, RECIPIENT),
            "proxy": imap_proxy(provider, child.port, RECIPIENT),
        }
        for conn in sessions.values():
            fetch_envelopes(conn, mailbox, count)  # warm-up: Dovecot builds its cache
        probed_items_ = probed_items()
        fetch_envelopes(sessions["direct"], mailbox, count, probed_items_)
        for _ in range(scale.reps):
            for name, conn in sessions.items():
                times[name].append(fetch_envelopes(conn, mailbox, count))
            probed = fetch_envelopes(sessions["direct"], mailbox, count, probed_items_)
            times["probed"].append(probed)
        for conn in sessions.values():
            conn.logout()
    _envelope_figures(results, count, {k: median(v) for k, v in times.items()})


def _envelope_figures(results: Results, count: int, seconds: dict[str, float]) -> None:
    proxy, direct = seconds["proxy"], seconds["direct"]
    results.add(
        Figure(
            "imap.fetch_envelope",
            f"IMAP: FETCH (FLAGS ENVELOPE RFC822.SIZE) of {count} plain messages",
            "s",
            proxy,
            direct,
            ratio=proxy / direct,
            target="<= 1.2x direct",
            passed=proxy / direct <= 1.2,
        )
    )
    results.add(
        Figure(
            "imap.fetch_envelope_probed",
            "IMAP: the same FETCH with the relay's UID and probe items, direct (Dovecot's share)",
            "s",
            seconds["probed"],
            direct,
            ratio=seconds["probed"] / direct,
        )
    )


def bench_download(rig: Rig, scale: Scale, results: Results) -> None:
    provider, count = rig.provider, scale.download_messages
    size = scale.message_size
    append_all(
        provider, RECIPIENT, "bench-plain", (letter(i, size, "download") for i in range(count))
    )
    append_all(provider, RECIPIENT, "bench-encrypted", encrypted_letters(rig, scale, count))
    times: dict[str, list[float]] = {k: [] for k in ("plain", "cipher", "cold", "warm")}
    cached_rss = 0
    for rep in range(scale.reps):
        with imap_direct(provider, RECIPIENT) as direct:
            times["plain"].append(download(direct, "bench-plain", count, False))
            times["cipher"].append(download(direct, "bench-encrypted", count, False))
        # A fresh proxy per repetition: "cold" means its view cache is empty.
        with rig.child(f"imap-download-{rep}", "imap", RECIPIENT) as child:
            conn = imap_proxy(provider, child.port, RECIPIENT)
            times["cold"].append(download(conn, "bench-encrypted", count, True))
            times["warm"].append(download(conn, "bench-encrypted", count, True))
            conn.logout()
            cached_rss = child.memory()["VmRSS"]
    _download_figures(results, scale, {k: count / median(v) for k, v in times.items()})
    results.add(
        Figure(
            "imap.cached_rss",
            f"IMAP: proxy RSS holding {count} decrypted views in its cache",
            "MB",
            cached_rss / MB,
        )
    )


def _download_figures(results: Results, scale: Scale, rate: dict[str, float]) -> None:
    label = f"IMAP: download {scale.download_messages} x {scale.message_size // KB} KB encrypted"
    results.add(
        Figure(
            "imap.cold",
            f"{label}, cold cache (ref: same ciphertext, direct)",
            "msg/s",
            rate["cold"],
            rate["cipher"],
            ratio=rate["cipher"] / rate["cold"],
            target=">= 300 msg/s",
            passed=rate["cold"] >= 300,
        )
    )
    warm_ratio = rate["plain"] / rate["warm"]
    results.add(
        Figure(
            "imap.warm",
            f"{label}, warm cache (ref: same messages in plain, direct)",
            "msg/s",
            rate["warm"],
            rate["plain"],
            "direct plain",
            ratio=warm_ratio,
            target="time <= 1.5x direct plain",
            passed=warm_ratio <= 1.5,
        )
    )


class IdleClient:
    """A raw IMAP session through the proxy, left in IDLE."""

    def __init__(self, port: int, login: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")
        self._expect(b"* OK")
        self._command(b"a", f'LOGIN "{login}" "{password}"')
        self._command(b"b", "SELECT INBOX")
        self.sock.sendall(b"c IDLE\r\n")
        self._expect(b"+")

    def _command(self, tag: bytes, text: str) -> None:
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        self._expect(tag + b" OK")

    def _expect(self, start: bytes) -> None:
        while not (line := self.file.readline()).startswith(start):
            if not line or line.split(b" ", 1)[0] in (b"a", b"b", b"c"):
                raise RuntimeError(f"IMAP session through the proxy: {line!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"DONE\r\nd LOGOUT\r\n")
        self.file.close()
        self.sock.close()


def bench_idle(rig: Rig, scale: Scale, results: Results) -> None:
    account = rig.provider.users[RECIPIENT]
    with rig.child("imap-idle", "imap", RECIPIENT) as child:
        # One session first, so the baseline includes what any session loads once.
        IdleClient(child.port, account.login, account.password).close()
        time.sleep(0.5)
        baseline = child.memory()["VmRSS"]
        clients = []
        try:
            for _ in range(scale.idle_sessions):
                clients.append(IdleClient(child.port, account.login, account.password))
            time.sleep(1.0)  # idle: let every session settle
            rss = child.memory()["VmRSS"]
        finally:
            for client in clients:
                client.close()
    results.add(
        Figure(
            "imap.idle_rss",
            f"IMAP: proxy RSS with {scale.idle_sessions} sessions in IDLE (ref: none open)",
            "MB",
            rss / MB,
            baseline / MB,
            "no sessions",
            ratio=rss / baseline,
            target="< 150 MB",
            passed=rss < 150 * MB,
        )
    )


# --------------------------------------------------------------------------- OpenPGP


def openpgp_module() -> ModuleType:
    """scripts/bench_openpgp.py: the engine/gpg/sq measurements, reused as they are."""
    spec = importlib.util.spec_from_file_location(
        "bench_openpgp", SCRIPT.with_name("bench_openpgp.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def rnp_op(pgp: ModuleType) -> Callable[[Any, str, Path, Path], Any]:
    """rnp in the shape of bench_openpgp's gpg_op/sq_op; keys from files, no keyring."""

    def op(setup: Any, operation: str, source: Path, target: Path) -> Any:
        argv = ["rnp", "--homedir", str(setup.work / "rnp"), "--overwrite", "--output", str(target)]
        if operation == "encrypt":
            argv += ["--keyfile", str(setup.public), "-e", "-r", setup.fingerprint]
        else:
            argv += ["--keyfile", str(setup.secret), "-d"]
        seconds, peak, _ = pgp.run_measured([*argv, str(source)])
        return pgp.Sample(seconds, peak, 0)

    return op


def bench_openpgp(rig: Rig, scale: Scale, results: Results) -> None:
    work = rig.work
    pgp = openpgp_module()
    tools = {
        name: op for name, (binary, op) in pgp.TOOLS.items() if not binary or shutil.which(binary)
    }
    if shutil.which("rnp"):
        tools["rnp"] = rnp_op(pgp)
    (work / "openpgp").mkdir()
    setup = pgp.prepare(work / "openpgp")
    try:
        for size_name, text in (("small", scale.crypto_small), ("large", scale.crypto_large)):
            samples = _crypto_samples(pgp, setup, tools, pgp.parse_size(text), scale.reps)
            _crypto_figures(results, samples, size_name, text)
    finally:
        if setup.gnupg is not None:
            stop_gpg_agent(setup.gnupg)
    results.notes.append(
        "OpenPGP: engine = the operation alone in a fresh process (scripts/bench_openpgp.py); "
        "gpg, sq, rnp = the whole process, start-up included. RSS = the process's peak; for "
        "gpg the gpg-agent's is not counted."
    )


def stop_gpg_agent(home: Path) -> None:
    """Stop the agent of ``home`` and reap it: gpg-agent daemonizes, and the orphan is
    adopted by us (the harness makes this process a subreaper), so it would stay a zombie."""
    if not shutil.which("gpgconf"):
        return
    agents = _children_named("gpg-agent")
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "all"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    deadline = time.monotonic() + 5
    while agents and time.monotonic() < deadline:
        agents = [pid for pid in agents if os.waitpid(pid, os.WNOHANG) == (0, 0)]
        time.sleep(0.02)


def _children_named(comm: str) -> list[int]:
    """Our own child processes called ``comm`` (from /proc/PID/stat)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path("/proc", entry, "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if name == comm and ppid == os.getpid():
                found.append(int(entry))
    return found


def _crypto_samples(
    pgp: ModuleType, setup: Any, tools: dict[str, Callable[..., Any]], size: int, reps: int
) -> dict[tuple[str, str], list[Any]]:
    """(tool, operation) -> samples; every tool's round trip must give the input back."""
    work: Path = setup.work
    plain = work / f"plain-{size}"
    plain.write_bytes(os.urandom(size))
    samples: dict[tuple[str, str], list[Any]] = {}
    for name, op in tools.items():
        cipher, back = work / f"{name}-{size}.pgp", work / f"{name}-{size}.out"
        samples[name, "encrypt"] = [op(setup, "encrypt", plain, cipher) for _ in range(reps)]
        samples[name, "decrypt"] = [op(setup, "decrypt", cipher, back) for _ in range(reps)]
        if back.read_bytes() != plain.read_bytes():
            raise RuntimeError(f"{name}: the round trip changed the data")
    return samples


def _crypto_figures(
    results: Results, samples: dict[tuple[str, str], list[Any]], size_name: str, text: str
) -> None:
    tools = sorted({tool for tool, _ in samples} - {"engine"})
    for operation in ("encrypt", "decrypt"):
        ms = {
            t: median(s.seconds for s in samples[t, operation]) * 1000 for t in ["engine", *tools]
        }
        peak = {t: max(s.peak_kb for s in samples[t, operation]) * 1024 / MB for t in ms}
        for tool in tools:
            label = f"OpenPGP {operation} {text}B: engine vs {tool}"
            key = f"crypto.{operation}.{size_name}.{tool}"
            results.add(
                Figure(
                    key,
                    f"{label}, time",
                    "ms",
                    ms["engine"],
                    ms[tool],
                    tool,
                    ms["engine"] / ms[tool],
                )
            )
            if size_name == "large" and peak[tool] and peak["engine"]:
                ratio = peak["engine"] / peak[tool]
                results.add(
                    Figure(
                        f"{key}.rss",
                        f"{label}, peak RSS",
                        "MB",
                        peak["engine"],
                        peak[tool],
                        tool,
                        ratio,
                    )
                )


PHASES: dict[str, Callable[[Rig, Scale, Results], None]] = {
    "smtp": bench_smtp,
    "envelope": bench_fetch_envelope,
    "download": bench_download,
    "idle": bench_idle,
    "openpgp": bench_openpgp,
}


# --------------------------------------------------------------------------- report


def print_table(results: Results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="localproxy benchmark: proxy vs direct, engine vs tools")
    for name, justify in (
        ("figure", "left"),
        ("unit", "left"),
        ("proxy", "right"),
        ("direct / reference", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("result", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in results.figures:
        reference = "" if f.reference is None else f"{_number(f.reference)} ({f.reference_label})"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "info"}[f.passed]
        table.add_row(f.label, f.unit, _number(f.proxy), reference, ratio, f.target, verdict)
    console = Console(width=200)
    console.print(table)
    for note in results.notes:
        console.print(f"- {note}", highlight=False)


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}" if value < 1 else f"{value:.1f}"


# --------------------------------------------------------------------------- main


def run(
    scale: Scale,
    keep: bool = False,
    phases: Iterable[str] = PHASES,
    profile: Path | None = None,
) -> Results:
    """The benchmark on a fresh provider; every process it starts is gone after."""
    results = Results(scale)
    no_os_keyring()
    # The provider's root must be reachable by the mail and postfix users (mkdtemp's
    # 0700 directory is traversed by root only, so it gets its own).
    root = Path(tempfile.mkdtemp(prefix="localproxy-bench-provider-"))
    work = Path(tempfile.mkdtemp(prefix="localproxy-bench-"))
    try:
        with start_bench_provider(root) as provider:
            results.notes.append(
                f"Harness for this run only: Postfix message_size_limit {BENCH_SIZE_LIMIT:,} "
                f"(default {harness().MESSAGE_SIZE_LIMIT:,} cannot take a 25 MB attachment "
                "encrypted); Dovecot process and per-user connection limits raised for the "
                "IDLE sessions."
            )
            rig = make_rig(provider, work, profile)
            for phase in phases:
                PHASES[phase](rig, scale, results)
    finally:
        if keep:
            print(f"kept {root} and {work}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (the smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--reps", type=int, help="repetitions per timing (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the provider and work dirs")
    parser.add_argument(
        "--only", metavar="PHASES", help=f"comma-separated subset of: {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy every proxy child into DIR (collapsed stacks)"
    )
    parser.add_argument("--serve", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return
    scale = QUICK if args.quick else Scale()
    if args.reps:
        scale = replace(scale, reps=args.reps)
    phases = args.only.split(",") if args.only else list(PHASES)
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        if not shutil.which("py-spy"):
            parser.error("--profile needs py-spy on PATH")
        profile.mkdir(parents=True, exist_ok=True)
    results = run(scale, keep=args.keep, phases=phases, profile=profile)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results.as_json(), indent=2) + "\n")


if __name__ == "__main__":
    main()
