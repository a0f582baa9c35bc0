"""A real mail provider (Dovecot + Postfix) on loopback, started from private configs.

Layout under ``root`` (which must be traversable by the unprivileged ``mail`` and ``postfix``
users, so not under pytest's 0700 ``/tmp/pytest-of-*``)::

    tls/            test CA and server certificate (see ca.py)
    dovecot/        dovecot.conf, users (passwd-file); run/ is Dovecot's base_dir
    mail/ADDRESS/   home of each user, Maildir below it, owned by the ``mail`` user
    postfix/etc/    main.cf, master.cf (config_directory)
    postfix/queue/  queue_directory; postfix/data/ is data_directory
    log/            dovecot.log, maillog, and stderr of both daemons

Decisions (see the module constants):

* Login name is the full address (``alice@example.org``): it is what Postfix hands to Dovecot
  LMTP as the recipient, so one passwd-file serves IMAP login, SASL and delivery unchanged.
* Mail is stored as the Debian ``mail`` user (uid 8): Dovecot refuses uid 0 for mail access,
  ``mail`` exists on every Debian system (base-passwd), and ``dovecot``/``dovenull`` are
  reserved for Dovecot's own processes. ``first_valid_uid`` is lowered to allow uid 8.
* Both Dovecot listeners for IMAP also bind 127.0.0.2 (still loopback). A client on
  127.0.0.1 talking to 127.0.0.2 is not "same source and destination", so Dovecot enforces
  ``ssl = required`` there (LOGINDISABLED before STARTTLS); on 127.0.0.1 it does not.
* Submission rejects every recipient outside example.org at RCPT time (``Relay access
  denied``), and the transports for other domains are ``error:`` so nothing ever leaves.
"""

from __future__ import annotations

import contextlib
import ctypes
import imaplib
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .ca import TestCA, make_test_ca

# Importable everywhere (the unit tests also run on Windows); usable only on Linux.
if sys.platform != "win32":
    import grp
    import pwd

HOST = "127.0.0.1"
STRICT_HOST = "127.0.0.2"  # same listeners, but Dovecot does not treat it as "secure"
HOSTNAME = "localhost"  # the name in the server certificate
DOMAIN = "example.org"
USER_NAMES = ("alice", "bob", "carol", "dave")
MESSAGE_SIZE_LIMIT = 30 * 1024 * 1024
MAIL_ACCOUNT = "mail"  # system user that owns the maildirs
# Created automatically and flagged for RFC 6154 SPECIAL-USE.
SPECIAL_USE = {"Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash", "Junk": "\\Junk"}

DOVECOT = "dovecot"
POSTFIX = "postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
START_TIMEOUT = 10.0
CLIENT_TIMEOUT = 10.0  # seconds for the helpers' own IMAP/SMTP sessions
STOP_TIMEOUT = 5.0
PR_SET_CHILD_SUBREAPER = 36
LOG_TAIL_LINES = 40


class ProviderError(RuntimeError):
    """The provider could not be started or used; the message carries the servers' logs."""


class ProviderUnavailable(ProviderError):
    """This machine cannot run the provider at all (binaries missing, not root)."""


@dataclass(frozen=True)
class User:
    name: str  # "alice"
    address: str  # "alice@example.org"
    login: str  # what to send as IMAP/SMTP user name (the full address)
    password: str


@dataclass(frozen=True)
class Ports:
    imap: int
    imaps: int
    lmtp: int
    auth: int
    submission: int
    submissions: int


# ---------------------------------------------------------------------------------------------
# Process plumbing


def become_subreaper() -> None:
    """Adopt orphaned grandchildren (Postfix/Dovecot workers) so we can reap them.

    PID 1 in our containers does not reap orphans; without this they stay zombies forever.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def check_available() -> None:
    """Raise ProviderUnavailable with a clear reason if this machine cannot run the provider."""
    if not sys.platform.startswith("linux"):
        raise ProviderUnavailable("the Dovecot/Postfix harness runs on Linux only")
    missing = [b for b in (DOVECOT, POSTFIX) if shutil.which(b) is None]
    if not os.access(POSTFIX_MASTER, os.X_OK):
        missing.append(POSTFIX_MASTER)
    if missing:
        raise ProviderUnavailable(
            f"mail servers not installed ({', '.join(missing)}); install dovecot-core "
            "dovecot-imapd dovecot-lmtpd postfix"
        )
    if os.geteuid() != 0:
        raise ProviderUnavailable("the Dovecot/Postfix harness must run as root")
    for account in (MAIL_ACCOUNT, "postfix", "dovecot", "dovenull"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            raise ProviderUnavailable(f"system user {account!r} does not exist") from None


class Guard:
    """Kills the servers if the test process dies without stopping them (SIGKILL, OOM).

    A tiny shell, our child, blocks reading a pipe from us. stop() writes a line, so ``read``
    succeeds and the shell just exits; if we die, the pipe closes, ``read`` fails and the shell
    kills the servers' process groups. (PR_SET_PDEATHSIG is not enough: Postfix's master
    changes its effective ids, which clears that setting.)
    """

    def __init__(self, process_groups: Iterable[int]) -> None:
        groups = " ".join(f"-{pgid}" for pgid in process_groups)
        script = (
            f"read -r line || {{ kill -TERM {groups}; sleep 1; kill -KILL {groups}; }} 2>/dev/null"
        )
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", script], stdin=subprocess.PIPE, start_new_session=True
        )

    def dismiss(self) -> None:
        """Tell the guard the servers were stopped normally, and reap it."""
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(b"stopped\n")
            self.process.stdin.close()
        self.process.wait(timeout=STOP_TIMEOUT)


class Daemon:
    """One server started as our child in its own session, so its workers share its sid.

    ``kill_when_idle``: once stopping and only these worker names are left (besides the
    master), SIGKILL the master instead of waiting. Dovecot's master sleeps a fixed 1 s for
    its ``log`` process before exiting; all it does after that is cleanup in our temp dir,
    and the log process exits as soon as the master's pipes close.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        stderr_file: Path,
        kill_when_idle: frozenset[str] | None = None,
    ) -> None:
        self.name = name
        self.stderr_file = stderr_file
        self.kill_when_idle = kill_when_idle
        with stderr_file.open("ab") as err:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        self.guard = Guard([self.process.pid])

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        """Wait for the master to exit; SIGKILL it at ``deadline`` (or early, see class doc)."""
        while self.process.poll() is None:
            if time.monotonic() > deadline or self._idle():
                self.process.kill()
                self.process.wait()
                break
            time.sleep(0.01)
        self.guard.dismiss()

    def _idle(self) -> bool:
        if self.kill_when_idle is None:
            return False
        busy = [
            p
            for p in session_members({self.pid})
            if p.pid != self.pid and p.state != "Z" and p.comm not in self.kill_when_idle
        ]
        return not busy


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str  # "Z" for a zombie
    comm: str


def session_members(sids: set[int]) -> list[Proc]:
    """Every process (zombies included) whose session id is in ``sids``."""
    members: list[Proc] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..."; comm may itself contain ") ".
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid, _pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(sid) in sids:
            members.append(Proc(int(entry), int(ppid), state, comm))
    return members


def reap_sessions(sids: set[int], timeout: float = STOP_TIMEOUT) -> None:
    """Wait until no process of these sessions is left, killing and reaping stragglers.

    Only processes of the servers' own sessions are reaped (not ``waitpid(-1)``), so exit
    statuses of unrelated children of the test process are never stolen.
    """
    deadline = time.monotonic() + timeout
    me = os.getpid()
    while members := session_members(sids):
        for proc in members:
            if proc.ppid == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, os.WNOHANG)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        if time.monotonic() > deadline + timeout:
            raise ProviderError(f"processes did not go away: {members}")
        time.sleep(0.01)


def free_ports(count: int) -> list[int]:
    """Ports free on both loopback addresses we listen on (bind to port 0, then release)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
            if port not in ports and _bindable(STRICT_HOST, port):
                ports.append(port)
    return ports


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def listening(host: str, port: int) -> bool:
    """True once a socket listens on host:port, read from /proc/net/tcp.

    Probing with connect() would make Dovecot fork an lmtp/auth worker (and Postfix an smtpd)
    for nothing; a worker forked just before shutdown stalled Dovecot's stop by 5 s.
    """
    wanted = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        # Columns: sl local_address rem_address st ...; st 0A is LISTEN.
        return any(f[1] == wanted and f[3] == "0A" for f in map(str.split, table))


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} missing)"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} empty)"


# ---------------------------------------------------------------------------------------------
# Configuration files


def _dovecot_conf(root: Path, ca: TestCA, ports: Ports) -> str:
    users = root / "dovecot" / "users"
    mailboxes = "\n".join(
        f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}"
        for name, flag in SPECIAL_USE.items()
    )
    both = f"{HOST} {STRICT_HOST}"
    # Nothing is included from /etc/dovecot: the instance must not depend on the host config.
    return f"""\
instance_name = localproxy-test-{os.getpid()}-{root.name}
base_dir = {root}/dovecot/run
state_dir = {root}/dovecot/state
protocols = imap lmtp
listen = {HOST}
log_path = {root}/log/dovecot.log
auth_verbose = yes
ssl = required
ssl_cert = <{ca.cert_file}
ssl_key = <{ca.key_file}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = yes
auth_mechanisms = plain login
# Real servers delay failed logins by 2 s; tests of wrong passwords should not wait that
# long. (Dovecot 2.3 flushes delayed failures on a 0.5 s timer, so ~0.5 s remains.)
auth_failure_delay = 0
first_valid_uid = {pwd.getpwnam(MAIL_ACCOUNT).pw_uid}
mail_location = maildir:~/Maildir
shutdown_clients = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%Lu {users}
}}
userdb {{
  driver = passwd-file
  args = username_format=%Lu {users}
}}
namespace inbox {{
  inbox = yes
  separator = /
{mailboxes}
}}
service imap-login {{
  inet_listener imap {{
    address = {both}
    port = {ports.imap}
  }}
  inet_listener imaps {{
    address = {both}
    port = {ports.imaps}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {ports.lmtp}
  }}
}}
# Dovecot delays logins from an IP after failures (2 s, doubling); the auth process skips
# this when it cannot open the anvil-auth-penalty socket, so make that socket unusable.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  inet_listener auth {{
    address = {HOST}
    port = {ports.auth}
  }}
}}
"""


def _dovecot_users(root: Path, users: Iterable[User]) -> str:
    account = pwd.getpwnam(MAIL_ACCOUNT)
    return "".join(
        f"{u.login}:{{PLAIN}}{u.password}:{account.pw_uid}:{account.pw_gid}::"
        f"{root}/mail/{u.address}::\n"
        for u in users
    )


def _postfix_main_cf(root: Path, ca: TestCA, ports: Ports, users: Iterable[User]) -> str:
    mailboxes = ", ".join(f"{u.address}={u.name}" for u in users)
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/postfix/queue
data_directory = {root}/postfix/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-localproxy-test
maillog_file_prefixes = {root}/log
maillog_file = {root}/log/maillog
myhostname = {HOSTNAME}
mydomain = {DOMAIN}
myorigin = {DOMAIN}
mydestination =
mynetworks =
relay_domains =
inet_interfaces = {HOST}
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
smtpd_peername_lookup = no
local_transport = error:local delivery is disabled in the test provider
default_transport = error:the test provider never relays mail off this machine
relay_transport = error:the test provider never relays mail off this machine
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_maps = inline:{{ {mailboxes} }}
virtual_transport = lmtp:inet:{HOST}:{ports.lmtp}
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtpd_tls_cert_file = {ca.cert_file}
smtpd_tls_key_file = {ca.key_file}
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:{HOST}:{ports.auth}
smtpd_sasl_auth_enable = no
smtpd_relay_restrictions = reject_unauth_destination
lmtp_tls_security_level = none
minimal_backoff_time = 1s
maximal_backoff_time = 5s
queue_run_delay = 1s
"""


# Every service runs unchrooted (column 5 = n), so nothing needs copying into the queue dir.
_POSTFIX_SERVICES = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Unauthenticated clients are refused at RCPT; AUTH is offered only after TLS.
_SUBMISSION_OPTIONS = (
    "smtpd_sasl_auth_enable=yes",
    "smtpd_tls_auth_only=yes",
    "smtpd_client_restrictions=permit_sasl_authenticated,reject",
    "smtpd_relay_restrictions=reject_unauth_destination,permit_sasl_authenticated,reject",
)


def _postfix_master_cf(ports: Ports) -> str:
    def service(port: int, name: str, *options: str) -> str:
        opts = "".join(f"\n  -o {o}" for o in (f"syslog_name=postfix/{name}", *options))
        return f"{HOST}:{port} inet n - n - - smtpd{opts}\n"

    submission = service(
        ports.submission, "submission", "smtpd_tls_security_level=encrypt", *_SUBMISSION_OPTIONS
    )
    submissions = service(
        ports.submissions,
        "submissions",
        "smtpd_tls_wrappermode=yes",
        "smtpd_tls_security_level=encrypt",
        *_SUBMISSION_OPTIONS,
    )
    return submission + submissions + _POSTFIX_SERVICES


# ---------------------------------------------------------------------------------------------
# The provider


class Provider:
    """A running Dovecot + Postfix pair with helpers that talk to them directly."""

    def __init__(self, root: Path, ca: TestCA, ports: Ports, users: dict[str, User]) -> None:
        self.root = root
        self.host = HOST
        self.strict_host = STRICT_HOST
        self.hostname = HOSTNAME
        self.domain = DOMAIN
        self.ports = ports
        self.imap_port = ports.imap
        self.imaps_port = ports.imaps
        self.lmtp_port = ports.lmtp
        self.submission_port = ports.submission
        self.submissions_port = ports.submissions
        self.ca = ca
        self.ca_file = ca.ca_file
        self.ca_name = ca.name
        self.message_size_limit = MESSAGE_SIZE_LIMIT
        self.users = users
        self.dovecot_log = root / "log" / "dovecot.log"
        self.postfix_log = root / "log" / "maillog"
        self._daemons: list[Daemon] = []
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Provider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop both servers and reap every process they forked. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        deadline = time.monotonic() + STOP_TIMEOUT
        for daemon in self._daemons:
            daemon.terminate()
        for daemon in self._daemons:
            daemon.wait(deadline)
        reap_sessions({d.pid for d in self._daemons})

    def logs(self) -> str:
        """Tails of every server log, for error messages."""
        parts = [self.dovecot_log, self.postfix_log]
        parts += [d.stderr_file for d in self._daemons]
        return "\n".join(f"--- {p}\n{tail(p)}" for p in parts)

    def _launch(
        self, name: str, argv: list[str], kill_when_idle: frozenset[str] | None = None
    ) -> None:
        stderr_file = self.root / "log" / f"{name}.stderr"
        self._daemons.append(Daemon(name, argv, stderr_file, kill_when_idle))

    def _wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        pending = [
            (HOST, self.imap_port),
            (HOST, self.imaps_port),
            (STRICT_HOST, self.imap_port),
            (STRICT_HOST, self.imaps_port),
            (HOST, self.lmtp_port),
            (HOST, self.ports.auth),
            (HOST, self.submission_port),
            (HOST, self.submissions_port),
        ]
        deadline = time.monotonic() + timeout
        while pending:
            for daemon in self._daemons:
                if (code := daemon.exited()) is not None:
                    raise ProviderError(f"{daemon.name} exited with {code}\n{self.logs()}")
            pending = [(h, p) for h, p in pending if not listening(h, p)]
            if pending and time.monotonic() > deadline:
                raise ProviderError(f"ports not ready after {timeout}s: {pending}\n{self.logs()}")
            if pending:
                time.sleep(0.01)

    # -- direct client access ----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the servers against the test CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def user(self, user: str) -> User:
        """Look up by short name ("alice") or address ("alice@example.org")."""
        return self.users[user.split("@", 1)[0] if user.endswith("@" + DOMAIN) else user]

    def imap(self, user: str) -> imaplib.IMAP4_SSL:
        """A logged-in IMAPS session straight to Dovecot; use it as a context manager."""
        account = self.user(user)
        conn = imaplib.IMAP4_SSL(
            self.host, self.imaps_port, ssl_context=self.ssl_context(), timeout=CLIENT_TIMEOUT
        )
        try:
            conn.login(account.login, account.password)
        except BaseException:
            conn.shutdown()
            raise
        return conn

    def smtp(self, user: str | None = None, implicit_tls: bool = False) -> smtplib.SMTP:
        """An SMTP session straight to Postfix over TLS, authenticated if ``user`` is given."""
        context = self.ssl_context()
        conn: smtplib.SMTP
        if implicit_tls:
            conn = smtplib.SMTP_SSL(
                self.host,
                self.submissions_port,
                local_hostname="localhost",
                context=context,
                timeout=CLIENT_TIMEOUT,
            )
        else:
            # local_hostname avoids socket.getfqdn(), which can stall on DNS without a network.
            conn = smtplib.SMTP(
                self.host, self.submission_port, local_hostname="localhost", timeout=CLIENT_TIMEOUT
            )
        try:
            if not implicit_tls:
                conn.starttls(context=context)
            if user is not None:
                account = self.user(user)
                conn.login(account.login, account.password)
        except BaseException:
            conn.close()
            raise
        return conn

    def mailboxes(self, user: str) -> dict[str, set[str]]:
        """Mailbox name -> LIST attributes (e.g. {"Sent": {"\\HasNoChildren", "\\Sent"}})."""
        with self.imap(user) as conn:
            return list_mailboxes(conn)

    def stored_messages(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Raw RFC 822 bytes of every message in ``mailbox``, in UID order, as Dovecot has them."""
        with self.imap(user) as conn:
            return fetch_all(conn, mailbox)

    def wait_for_messages(
        self, user: str, count: int, mailbox: str = "INBOX", timeout: float = 10
    ) -> list[bytes]:
        """Poll until ``mailbox`` holds at least ``count`` messages; return all of them."""
        deadline = time.monotonic() + timeout
        with self.imap(user) as conn:
            while True:
                messages = fetch_all(conn, mailbox)
                if len(messages) >= count:
                    return messages
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{user}/{mailbox}: {len(messages)} of {count} messages after "
                        f"{timeout}s\n{self.logs()}"
                    )
                time.sleep(0.05)

    def append(self, user: str, raw: bytes, mailbox: str = "INBOX", flags: str = "") -> None:
        """Store ``raw`` directly with IMAP APPEND; ``flags`` like "\\Seen \\Flagged"."""
        with self.imap(user) as conn:
            typ, data = conn.append(quote(mailbox), f"({flags})" if flags else None, None, raw)
            _check(typ, data, f"APPEND to {mailbox}")

    def send(self, from_user: str, to: list[str], raw: bytes) -> None:
        """Submit via the submission port (STARTTLS + AUTH); raise if any recipient is refused."""
        account = self.user(from_user)
        with self.smtp(from_user) as conn:
            refused = conn.sendmail(account.address, to, raw)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def clear(self, user: str) -> None:
        """Delete every message in every mailbox of ``user`` (mailboxes themselves stay)."""
        with self.imap(user) as conn:
            for name, attributes in list_mailboxes(conn).items():
                if "\\noselect" in {a.lower() for a in attributes}:
                    continue
                typ, data = conn.select(quote(name))
                _check(typ, data, f"SELECT {name}")
                if int(data[0] or 0) > 0:
                    _check(*conn.store("1:*", "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
                    _check(*conn.expunge(), "EXPUNGE")
                conn.close()

    def clear_all(self) -> None:
        for name in self.users:
            self.clear(name)


# ---------------------------------------------------------------------------------------------
# IMAP helpers (imaplib leaves quoting and LIST parsing to the caller)


_LIST_LINE = re.compile(rb'\((?P<attrs>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$')


def quote(mailbox: str) -> str:
    """An IMAP quoted string; imaplib sends arguments verbatim."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(name: bytes) -> str:
    if name.startswith(b'"') and name.endswith(b'"'):
        name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
    return name.decode()


def list_mailboxes(conn: imaplib.IMAP4) -> dict[str, set[str]]:
    typ, data = conn.list()
    _check(typ, data, "LIST")
    result: dict[str, set[str]] = {}
    for item in data:
        # A name sent as a literal arrives as (b'(attrs) "/" {n}', b'name').
        line, literal = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        match = _LIST_LINE.match(line or b"")
        if match is None:
            continue
        name = literal.decode() if literal is not None else _unquote(match["name"])
        result[name] = set(match["attrs"].decode().split())
    return result


def fetch_all(conn: imaplib.IMAP4, mailbox: str) -> list[bytes]:
    typ, data = conn.select(quote(mailbox), readonly=True)
    _check(typ, data, f"EXAMINE {mailbox}")
    if int(data[0] or 0) == 0:
        return []
    typ, data = conn.fetch("1:*", "(BODY.PEEK[])")
    _check(typ, data, f"FETCH from {mailbox}")
    # Literals come back as (header, bytes) tuples; bare bytes are closing parens or
    # unsolicited untagged responses.
    return [item[1] for item in data if isinstance(item, tuple)]


def _check(typ: str, data: list[object], what: str) -> None:
    if typ != "OK":
        raise ProviderError(f"{what} failed: {typ} {data!r}")


# ---------------------------------------------------------------------------------------------
# Start-up


def start_provider(root: Path) -> Provider:
    """Start Dovecot and Postfix with configs, certificates, mail and queues under ``root``."""
    check_available()
    become_subreaper()
    root = root.resolve()
    _prepare_root(root)
    ca = make_test_ca(root / "tls")
    ports = Ports(*free_ports(6))
    users = _make_users()
    provider = Provider(root, ca, ports, users)
    try:
        _start_dovecot(provider)
        _start_postfix(provider)
        provider._wait_ready()
    except BaseException:
        provider.stop()
        raise
    return provider


def _make_users() -> dict[str, User]:
    return {
        name: User(name, f"{name}@{DOMAIN}", f"{name}@{DOMAIN}", _password()) for name in USER_NAMES
    }


def _password() -> str:
    """Random, and never starting with "-": command-line clients (swaks, curl) would
    read such a password as an option (a test failed on it about one run in 32)."""
    return "p" + secrets.token_urlsafe(12)


def _prepare_root(root: Path) -> None:
    # Postfix chdir()s into queue_directory before 'check' creates what lies below it.
    for sub in ("dovecot", "mail", "log", "postfix/etc", "postfix/queue"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # The mail and postfix users must be able to walk down to their directories.
    root.chmod(0o711)
    for directory in (root / "mail", root / "postfix", root / "postfix" / "queue"):
        directory.chmod(0o755)
    for parent in root.parents:
        if not parent.stat().st_mode & 0o001:
            raise ProviderError(
                f"{parent} is not searchable by others; the provider root must be reachable "
                "by the 'mail' and 'postfix' users (use tempfile.mkdtemp(), not pytest's tmp_path)"
            )


def _start_dovecot(provider: Provider) -> None:
    root = provider.root
    conf = root / "dovecot" / "dovecot.conf"
    conf.write_text(_dovecot_conf(root, provider.ca, provider.ports))
    users_file = root / "dovecot" / "users"
    users_file.write_text(_dovecot_users(root, provider.users.values()))
    # The auth process runs as the 'dovecot' user and must read the passwd-file.
    os.chown(users_file, 0, grp.getgrnam("dovecot").gr_gid)
    users_file.chmod(0o640)
    account = pwd.getpwnam(MAIL_ACCOUNT)
    for user in provider.users.values():
        home = root / "mail" / user.address
        home.mkdir(mode=0o700, exist_ok=True)
        os.chown(home, account.pw_uid, account.pw_gid)
    argv = [DOVECOT, "-F", "-c", str(conf)]
    provider._launch("dovecot", argv, kill_when_idle=frozenset({"log"}))


def _start_postfix(provider: Provider) -> None:
    root = provider.root
    etc = root / "postfix" / "etc"
    users = provider.users.values()
    (etc / "main.cf").write_text(_postfix_main_cf(root, provider.ca, provider.ports, users))
    (etc / "master.cf").write_text(_postfix_master_cf(provider.ports))
    # Postfix re-reads a main.cf modified within the last second, sleeping 300 ms per try,
    # in case an editor is still writing it; that alone cost ~2 s per start. Backdate it.
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(etc / name, (past, past))
    # 'check' creates the queue and data directories with Postfix's own ownership rules.
    result = subprocess.run(
        [POSTFIX, "-c", str(etc), "check"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise ProviderError(f"postfix check failed:\n{output}\n{provider.logs()}")
    provider._launch("postfix", [POSTFIX_MASTER, "-c", str(etc), "-d"])
