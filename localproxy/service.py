"""`localproxy service ...`: run localproxy in the background as the user's own service.

One file per platform, produced by pure builders: a systemd user unit on Linux, a launchd
LaunchAgent on macOS, a Scheduled Task started at logon on Windows. Nothing needs root
or elevation. Every external command goes through `Host.run` (default `run_tool`), so
tests replace it and no real service manager is touched.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import os
import plistlib
import re
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

from rich.console import Console
from rich.markup import escape

from localproxy.config import load_config, resolve_config_path

UNIT_NAME = "localproxy.service"
LAUNCHD_LABEL = "org.localproxy.agent"
TASK_NAME = "localproxy"
TOOL_TIMEOUT = 30.0
RESTART_DELAY_SECONDS = 5
CONFIG_ERROR_EXIT = 2  # cli.EXIT_USAGE: a broken config does not heal by restarting
EXIT_OK, EXIT_FAILED = 0, 1
NOT_FOUND, TIMED_OUT, NOT_RUNNABLE = 127, 124, 126  # shell conventions for tool failures

Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


class ServiceError(Exception):
    """A service command that cannot be done; printed as one line, exit 1."""


def run_tool(
    args: Sequence[str], timeout: float = TOOL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a service-manager tool; a missing tool or a hang becomes an exit code, not a crash."""
    argv = list(args)
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, NOT_FOUND, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, TIMED_OUT, "", f"no answer within {timeout:g} s")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, NOT_RUNNABLE, "", f"{argv[0]}: {exc.strerror}")


@dataclass(frozen=True)
class Host:
    """The machine facts the service commands depend on, injectable for tests."""

    platform: str  # sys.platform
    home: Path
    env: Mapping[str, str]
    uid: int
    user: str
    run: Runner = run_tool

    @classmethod
    def current(cls) -> Host:
        return cls(
            platform=sys.platform,
            home=Path.home(),
            env=dict(os.environ),
            uid=os.getuid() if hasattr(os, "getuid") else 0,
            user=_user_name(),
        )


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no passwd entry and no USER/LOGNAME variable
        return str(os.getuid()) if hasattr(os, "getuid") else ""


def service_exec_args(config_path: Path, python: str | None = None) -> list[str]:
    """The command the service runs: this very Python, so the service uses this install."""
    interpreter = python or sys.executable
    if not interpreter:
        raise ServiceError("cannot tell which Python is running (sys.executable is empty)")
    # abspath, not resolve(): resolving a virtualenv's python symlink would leave the venv.
    absolute_config = Path(os.path.abspath(config_path))
    return [
        os.path.abspath(interpreter),
        "-m",
        "localproxy",
        "--config",
        str(absolute_config),
        "run",
    ]


def readme_uri() -> str | None:
    """The README as a file: URI when running from a checkout (an installed wheel has none)."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    return readme.as_uri() if readme.is_file() else None


# --------------------------------------------------------------------------- systemd


_SYSTEMD_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def systemd_quote(arg: str, first: bool = False) -> str:
    """One ExecStart= word: quoted for systemd's splitter, with % and $ kept literal."""
    escaped = arg.replace("%", "%%")  # specifiers are expanded everywhere, even in quotes
    if not first:
        # $VAR is expanded in arguments; systemd never expands the executable path.
        escaped = escaped.replace("$", "$$")
    if _SYSTEMD_SAFE.fullmatch(arg):
        return escaped
    # Inside double quotes systemd honours C escapes, so backslash and quote are escaped
    # and control characters spelt out.
    body = "".join(_c_escape(ch) for ch in escaped)
    return f'"{body}"'


def _c_escape(ch: str) -> str:
    if ch in '\\"':
        return "\\" + ch
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02x}"
    return ch


def systemd_command_line(exec_args: Sequence[str]) -> str:
    return " ".join(systemd_quote(arg, first=i == 0) for i, arg in enumerate(exec_args))


def systemd_unit(
    exec_args: Sequence[str], config_path: Path, documentation: Sequence[str] = ()
) -> str:
    """A systemd user unit running `exec_args`, restarted on failure."""
    docs = " ".join(uri.replace("%", "%%") for uri in documentation)
    lines = [
        "# Written by `localproxy service install`; reinstalling replaces this file.",
        f"# Config: {_one_line(str(config_path))}",
        "[Unit]",
        "Description=localproxy mail-encryption proxy",
        *([f"Documentation={docs}"] if docs else []),
        # A user manager has no network-online.target of its own (systemd issue #3312), so
        # these only take effect where one is linked in; localproxy connects to the
        # provider per client session, so starting before the network is up is harmless.
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={systemd_command_line(exec_args)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_SECONDS}",
        f"RestartPreventExitStatus={CONFIG_ERROR_EXIT}",
        "Environment=PYTHONUNBUFFERED=1",
        # Hardening that works in an unprivileged user manager: prctl, umask and seccomp.
        # Mount-namespace options (PrivateTmp, ProtectSystem, ProtectHome) are left out:
        # a user manager needs unprivileged user namespaces for them, which many systems
        # disable, and the unit would then fail to start at all.
        "UMask=0077",
        "NoNewPrivileges=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "SystemCallArchitectures=native",
        # AF_UNIX: control socket and the keyring's D-Bus; AF_NETLINK: glibc's getaddrinfo.
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# --------------------------------------------------------------------------- launchd


def launchd_plist(exec_args: Sequence[str], log_path: Path) -> bytes:
    """A LaunchAgent started at login and restarted when it exits with an error."""
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(exec_args),  # an array: no quoting at all
        "RunAtLoad": True,
        # Like systemd's Restart=on-failure: a crash is restarted, a clean exit is not.
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": str(log_path),
        "StandardErrorPath": str(log_path),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }
    return plistlib.dumps(agent)


# --------------------------------------------------------------------------- Windows

TASK_NAMESPACE = "http://schemas.microsoft.com/windows/2004/02/mit/task"
_WINDOWS_VARIABLE = re.compile(r"%[^%\s]+%")


def windows_task_xml(exec_args: Sequence[str], user: str | None = None) -> str:
    """A Task Scheduler task started at the user's logon, without elevation."""
    if any(_WINDOWS_VARIABLE.search(arg) for arg in exec_args):
        # Task Scheduler expands %NAME% in Command and Arguments and has no escape for it.
        raise ServiceError(f"a scheduled task cannot pass %NAME% literally: {exec_args}")
    task = ET.Element("Task", version="1.2", xmlns=TASK_NAMESPACE)
    info = ET.SubElement(task, "RegistrationInfo")
    _text(info, "Description", "localproxy mail-encryption proxy")
    _text(info, "URI", f"\\{TASK_NAME}")
    trigger = ET.SubElement(ET.SubElement(task, "Triggers"), "LogonTrigger")
    _text(trigger, "Enabled", "true")
    principal = ET.SubElement(ET.SubElement(task, "Principals"), "Principal", id="Author")
    if user:
        # Only this user's logon: a trigger for any user would need administrator rights.
        _text(trigger, "UserId", user)
        _text(principal, "UserId", user)
    _text(principal, "LogonType", "InteractiveToken")  # runs in the session, no password
    _text(principal, "RunLevel", "LeastPrivilege")
    _task_settings(ET.SubElement(task, "Settings"))
    action = ET.SubElement(ET.SubElement(task, "Actions", Context="Author"), "Exec")
    # Quoted like Task Scheduler's own editor does for paths with spaces.
    _text(action, "Command", f'"{exec_args[0]}"' if " " in exec_args[0] else exec_args[0])
    # The C runtime's argv rules, which Python itself uses to split its command line.
    _text(action, "Arguments", subprocess.list2cmdline(exec_args[1:]))
    ET.indent(task)
    body = ET.tostring(task, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-16"?>\n{body}\n'


def _task_settings(settings: ET.Element) -> None:
    for name, value in (
        ("MultipleInstancesPolicy", "IgnoreNew"),
        ("DisallowStartIfOnBatteries", "false"),  # laptops: the defaults would stop mail
        ("StopIfGoingOnBatteries", "false"),
        ("AllowHardTerminate", "true"),
        ("StartWhenAvailable", "true"),
        ("RunOnlyIfNetworkAvailable", "false"),
        ("AllowStartOnDemand", "true"),
        ("Enabled", "true"),
        ("Hidden", "false"),
        ("RunOnlyIfIdle", "false"),
        ("ExecutionTimeLimit", "PT0S"),  # no limit: the default (72 h) would kill the proxy
        ("Priority", "7"),
    ):
        _text(settings, name, value)
    restart = ET.SubElement(settings, "RestartOnFailure")
    _text(restart, "Interval", "PT1M")  # the shortest interval Task Scheduler accepts
    _text(restart, "Count", "5")


def _text(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text


# --------------------------------------------------------------------------- managers


class Change(StrEnum):
    NEW = "new"
    UNCHANGED = "unchanged"
    REPLACED = "replaced"


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    data: bytes  # exactly what is written
    text: str  # the same, for showing and diffing
    encoding: str = "utf-8"

    def change(self) -> Change:
        if not self.path.exists():
            return Change.NEW
        return Change.UNCHANGED if self.path.read_bytes() == self.data else Change.REPLACED

    def diff(self) -> str:
        old = self.path.read_bytes().decode(self.encoding, errors="replace")
        lines = difflib.unified_diff(
            old.splitlines(), self.text.splitlines(), "installed", "new", lineterm=""
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class Step:
    """One service-manager command; `may_fail` for undoing what may already be undone."""

    args: tuple[str, ...]
    may_fail: bool = False


def _steps(*commands: Sequence[str]) -> list[Step]:
    return [Step(tuple(c)) for c in commands]


class ServiceManager(ABC):
    """What differs per platform: the file, how it is rendered and the commands."""

    kind: ClassVar[str] = "service"

    def __init__(self, host: Host) -> None:
        self.host = host

    @property
    @abstractmethod
    def path(self) -> Path: ...

    @abstractmethod
    def render(self, exec_args: Sequence[str], config_path: Path) -> ServiceFile: ...

    @abstractmethod
    def problem(self) -> str | None:
        """Why the platform tool cannot be used here, or None when it can."""

    @abstractmethod
    def manual_steps(self) -> list[str]:
        """What a person does to start the installed service once `problem` is solved."""

    @abstractmethod
    def install_steps(self, change: Change) -> list[Step]: ...

    @abstractmethod
    def uninstall_steps(self) -> list[Step]: ...

    def after_removal_steps(self) -> list[Step]:
        return []

    def leftovers(self) -> list[Path]:
        """Files the tool would remove on disable, removed by hand if it cannot run."""
        return []

    @abstractmethod
    def control_steps(self, action: str) -> list[Step]: ...

    def hint(self) -> str | None:
        return None


class SystemdUser(ServiceManager):
    kind = "systemd user unit"

    @property
    def path(self) -> Path:
        config_home = self.host.env.get("XDG_CONFIG_HOME", "")
        # The XDG spec says to ignore a relative XDG_CONFIG_HOME, and systemd does.
        base = Path(config_home) if os.path.isabs(config_home) else self.host.home / ".config"
        return base / "systemd" / "user" / UNIT_NAME

    def render(self, exec_args: Sequence[str], config_path: Path) -> ServiceFile:
        readme = readme_uri()
        text = systemd_unit(exec_args, config_path, [readme] if readme else [])
        return ServiceFile(self.path, text.encode(), text)

    def problem(self) -> str | None:
        probe = self.host.run(["systemctl", "--user", "is-system-running"])
        if probe.returncode == NOT_FOUND:
            return "systemctl is not installed: this system does not run systemd"
        state = probe.stdout.strip()
        if state in ("running", "degraded", "starting", "initializing"):
            return None
        said = (probe.stderr.strip() or state or f"exit {probe.returncode}").splitlines()[0]
        reason = f"`systemctl --user` finds no user service manager ({said})"
        missing = [v for v in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS") if not self._env(v)]
        if missing:
            reason += (
                f"; this session has no {' and no '.join(missing)}, as with su, sudo, cron, "
                "containers and logins that did not go through pam_systemd"
            )
        return reason

    def _env(self, name: str) -> str:
        return self.host.env.get(name, "")

    def manual_steps(self) -> list[str]:
        user = self.host.user
        return [
            f"loginctl enable-linger {user}   # let your user manager run without a login "
            "(headless machines)",
            f"log in again as {user} (a new ssh or desktop login, not su or sudo)",
            "systemctl --user daemon-reload && systemctl --user enable --now localproxy",
        ]

    def install_steps(self, change: Change) -> list[Step]:
        reload = ["systemctl", "--user", "daemon-reload"]
        if change is Change.REPLACED:  # enable --now would leave the old version running
            return _steps(
                reload,
                ["systemctl", "--user", "enable", UNIT_NAME],
                ["systemctl", "--user", "restart", UNIT_NAME],
            )
        enable_now = _steps(["systemctl", "--user", "enable", "--now", UNIT_NAME])
        # Unchanged: the manager already has this file; enable --now just makes sure it runs.
        return enable_now if change is Change.UNCHANGED else [*_steps(reload), *enable_now]

    def uninstall_steps(self) -> list[Step]:
        return _steps(["systemctl", "--user", "disable", "--now", UNIT_NAME])

    def after_removal_steps(self) -> list[Step]:
        return _steps(["systemctl", "--user", "daemon-reload"])

    def leftovers(self) -> list[Path]:
        return [self.path.parent / "default.target.wants" / UNIT_NAME]

    def control_steps(self, action: str) -> list[Step]:
        if action == "status":
            return _steps(["systemctl", "--user", "status", "--no-pager", "--lines=20", UNIT_NAME])
        return _steps(["systemctl", "--user", action, UNIT_NAME])

    def hint(self) -> str | None:
        probe = self.host.run(["loginctl", "show-user", self.host.user, "--property=Linger"])
        if probe.returncode != 0 or probe.stdout.strip() != "Linger=no":
            return None
        return (
            f"Lingering is off for {self.host.user}: localproxy runs only while you are "
            "logged in. On a headless machine, or to run it from boot: "
            f"loginctl enable-linger {self.host.user}"
        )


class LaunchAgent(ServiceManager):
    kind = "launchd LaunchAgent"

    @property
    def path(self) -> Path:
        return self.host.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"

    @property
    def log_path(self) -> Path:
        return self.host.home / "Library" / "Logs" / "localproxy.log"

    @property
    def domain(self) -> str:
        return f"gui/{self.host.uid}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LAUNCHD_LABEL}"

    def render(self, exec_args: Sequence[str], config_path: Path) -> ServiceFile:
        data = launchd_plist(exec_args, self.log_path)
        return ServiceFile(self.path, data, data.decode())

    def problem(self) -> str | None:
        probe = self.host.run(["launchctl", "print", self.domain])
        if probe.returncode == NOT_FOUND:
            return "launchctl is not installed"
        if probe.returncode != 0:
            return (
                f"there is no GUI login session for uid {self.host.uid} ({self.domain}); "
                "LaunchAgents run in it, so log in at the Mac's desktop once"
            )
        return None

    def manual_steps(self) -> list[str]:
        return [
            "log in at the Mac's desktop (LaunchAgents start with the GUI session)",
            f"launchctl bootstrap {self.domain} {shlex.quote(str(self.path))}",
        ]

    def _loaded(self) -> bool:
        return self.host.run(["launchctl", "print", self.target]).returncode == 0

    def _bootstrap(self) -> list[Step]:
        # enable first: a job once disabled with `launchctl disable` refuses to bootstrap.
        return _steps(
            ["launchctl", "enable", self.target],
            ["launchctl", "bootstrap", self.domain, str(self.path)],
        )

    def install_steps(self, change: Change) -> list[Step]:
        loaded = self._loaded()
        if change is Change.UNCHANGED and loaded:
            return []
        bootout = _steps(["launchctl", "bootout", self.target]) if loaded else []
        return bootout + self._bootstrap()

    def uninstall_steps(self) -> list[Step]:
        return _steps(["launchctl", "bootout", self.target]) if self._loaded() else []

    def control_steps(self, action: str) -> list[Step]:
        if action == "status":
            return _steps(["launchctl", "print", self.target])
        loaded = self._loaded()
        if action == "start":
            kickstart = _steps(["launchctl", "kickstart", self.target])
            return kickstart if loaded else self._bootstrap()
        # bootout, not kill: with KeepAlive a killed agent would be started again.
        return _steps(["launchctl", "bootout", self.target]) if loaded else []


class ScheduledTask(ServiceManager):
    kind = "Windows scheduled task"

    @property
    def path(self) -> Path:
        local = self.host.env.get("LOCALAPPDATA")
        base = Path(local) if local else self.host.home / "AppData" / "Local"
        return base / "localproxy" / "localproxy-task.xml"

    def render(self, exec_args: Sequence[str], config_path: Path) -> ServiceFile:
        text = windows_task_xml(exec_args, self._user_id())
        # UTF-16 with a byte order mark, as Task Scheduler itself exports tasks.
        return ServiceFile(self.path, text.encode("utf-16"), text, "utf-16")

    def _user_id(self) -> str | None:
        domain = self.host.env.get("USERDOMAIN")
        return f"{domain}\\{self.host.user}" if domain else self.host.user or None

    def problem(self) -> str | None:
        probe = self.host.run(["schtasks", "/Query", "/TN", TASK_NAME])
        return "schtasks is not available" if probe.returncode == NOT_FOUND else None

    def manual_steps(self) -> list[str]:
        return [f'schtasks /Create /TN {TASK_NAME} /XML "{self.path}" /F']

    def _registered(self) -> bool:
        return self.host.run(["schtasks", "/Query", "/TN", TASK_NAME]).returncode == 0

    def install_steps(self, change: Change) -> list[Step]:
        steps = []
        if change is Change.REPLACED and self._registered():
            steps.append(Step(("schtasks", "/End", "/TN", TASK_NAME), may_fail=True))
        create = ["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(self.path), "/F"]
        return [*steps, *_steps(create, ["schtasks", "/Run", "/TN", TASK_NAME])]

    def uninstall_steps(self) -> list[Step]:
        if not self._registered():
            return []
        return [
            Step(("schtasks", "/End", "/TN", TASK_NAME), may_fail=True),  # may not be running
            Step(("schtasks", "/Delete", "/TN", TASK_NAME, "/F")),
        ]

    def control_steps(self, action: str) -> list[Step]:
        commands = {
            "start": ["schtasks", "/Run", "/TN", TASK_NAME],
            "stop": ["schtasks", "/End", "/TN", TASK_NAME],
            "status": ["schtasks", "/Query", "/TN", TASK_NAME, "/V", "/FO", "LIST"],
        }
        return _steps(commands[action])


def manager_for(host: Host) -> ServiceManager:
    if host.platform.startswith("linux"):
        return SystemdUser(host)
    if host.platform == "darwin":
        return LaunchAgent(host)
    if host.platform == "win32":
        return ScheduledTask(host)
    raise ServiceError(
        f"no supported service manager on {host.platform}; start "
        "`localproxy run` from your system's own autostart instead"
    )


# --------------------------------------------------------------------------- operations


def install(
    host: Host,
    console: Console,
    config_path: Path,
    *,
    dry_run: bool = False,
    force: bool = False,
    python: str | None = None,
) -> int:
    manager = manager_for(host)
    exec_args = service_exec_args(config_path, python)
    service_file = manager.render(exec_args, config_path)
    change = service_file.change()
    if dry_run:
        _show_dry_run(console, service_file, change)
        return EXIT_OK
    diff = service_file.diff() if change is Change.REPLACED else ""
    if change is not Change.UNCHANGED or force:
        _write(service_file)
    _report_change(console, service_file, change, diff, force)
    if problem := manager.problem():
        headline = f"the {manager.kind} is installed but not started"
        _explain_unusable(console, manager, f"{headline}: {problem}", _display(exec_args, host))
        return EXIT_OK  # the file is in place; starting it is up to the person now
    steps = manager.install_steps(Change.REPLACED if force else change)
    if not _run_steps(host, console, steps):
        return EXIT_FAILED
    if hint := manager.hint():
        console.print(f"[yellow]note:[/] {escape(hint)}", soft_wrap=True)
    return EXIT_OK


def uninstall(host: Host, console: Console) -> int:
    manager = manager_for(host)
    if not manager.path.exists():
        console.print(f"Not installed: {escape(str(manager.path))} does not exist.", soft_wrap=True)
        return EXIT_OK
    problem = manager.problem()
    ok = True
    if problem is None:
        ok = _run_steps(host, console, manager.uninstall_steps())
    else:
        console.print(
            f"[yellow]warning:[/] cannot stop the {manager.kind}: {escape(problem)}",
            soft_wrap=True,
        )
    manager.path.unlink()
    console.print(f"Removed {escape(str(manager.path))}", soft_wrap=True)
    for leftover in manager.leftovers():
        if leftover.is_symlink():  # only when the tool could not disable it
            leftover.unlink()
            console.print(f"Removed {escape(str(leftover))}", soft_wrap=True)
    if problem is None:
        ok = _run_steps(host, console, manager.after_removal_steps()) and ok
    return EXIT_OK if ok else EXIT_FAILED


def control(host: Host, console: Console, action: str) -> int:
    """start, stop or status of the installed service."""
    manager = manager_for(host)
    if not manager.path.exists():
        console.print(
            f"[red]Not installed[/] ({escape(str(manager.path))} does not exist): "
            "run `localproxy service install` first.",
            soft_wrap=True,
        )
        return EXIT_FAILED
    if problem := manager.problem():
        headline = f"cannot {action} the {manager.kind}"
        _explain_unusable(console, manager, f"{headline}: {problem}", None)
        return EXIT_FAILED
    steps = manager.control_steps(action)
    if action == "status":
        result = host.run(steps[0].args)
        if output := (result.stdout + result.stderr).rstrip("\n"):
            console.out(output, highlight=False)
        return result.returncode
    if not steps:
        console.print(f"localproxy is not loaded; nothing to {action}.")
        return EXIT_OK
    return EXIT_OK if _run_steps(host, console, steps) else EXIT_FAILED


def _show_dry_run(console: Console, service_file: ServiceFile, change: Change) -> None:
    state = {
        Change.NEW: "a new file",
        Change.UNCHANGED: "the same content as installed",
        Change.REPLACED: "different content from the installed file",
    }[change]
    console.print(
        f"# --dry-run: would write {escape(str(service_file.path))} ({state}); nothing written",
        soft_wrap=True,
        highlight=False,
    )
    console.out(service_file.text.rstrip("\n"), highlight=False)


def _report_change(
    console: Console, service_file: ServiceFile, change: Change, diff: str, force: bool
) -> None:
    where = escape(str(service_file.path))
    if change is Change.NEW:
        console.print(f"Wrote {where}", soft_wrap=True)
    elif change is Change.UNCHANGED:
        rewritten = " (rewritten and restarted: --force)" if force else ""
        console.print(f"{where} already installed, unchanged{rewritten}.", soft_wrap=True)
    else:
        console.print(f"Replaced {where}, which differed:", soft_wrap=True)
        console.out(diff, highlight=False)


def _write(service_file: ServiceFile) -> None:
    """Atomically, so a crash never leaves a half-written unit for the manager to load."""
    directory = service_file.path.parent
    temporary: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".localproxy-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(service_file.data)
        os.chmod(temporary, 0o644)  # launchd refuses group- or world-writable plists
        os.replace(temporary, service_file.path)
    except OSError as exc:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise ServiceError(f"cannot write {service_file.path}: {exc.strerror}") from None


def _explain_unusable(
    console: Console, manager: ServiceManager, what: str, foreground: str | None
) -> None:
    console.print(f"[yellow]warning:[/] {escape(what)}.", soft_wrap=True)
    console.print("To start it as a service:")
    for number, step in enumerate(manager.manual_steps(), 1):
        console.print(f"  {number}. {escape(step)}", soft_wrap=True, highlight=False)
    if foreground:
        console.print(f"Or run it in this terminal now: {escape(foreground)}", soft_wrap=True)


def _run_steps(host: Host, console: Console, steps: Sequence[Step]) -> bool:
    """Run each step, printing the command and its result; stop at the first failure."""
    for step in steps:
        console.print(f"$ {escape(_display(step.args, host))}", style="bold", highlight=False)
        result = host.run(step.args)
        output = (result.stdout + result.stderr).strip()
        for line in output.splitlines():
            console.print(f"  {escape(line)}", style="dim", highlight=False, soft_wrap=True)
        if result.returncode == 0:
            console.print("  [green]ok[/]")
        elif step.may_fail:
            console.print(f"  exit {result.returncode} (fine: nothing to undo)")
        else:
            console.print(f"  [red]failed (exit {result.returncode})[/]")
            return False
    return True


def _display(args: Sequence[str], host: Host) -> str:
    joined = subprocess.list2cmdline if host.platform == "win32" else shlex.join
    return joined(list(args))


# --------------------------------------------------------------------------- commands


def add_service_commands(commands: argparse._SubParsersAction) -> None:
    service = commands.add_parser(
        "service",
        help="run localproxy in the background as your user's service",
        description="Install localproxy as a background service of your user: a systemd "
        "user unit on Linux, a LaunchAgent on macOS, a scheduled task at logon on "
        "Windows. No root or administrator rights are needed.",
    )
    sub = service.add_subparsers(dest="service_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "install",
        help="write the service file and start it (idempotent)",
        description="Write the service file for this Python and config, then enable and "
        "start it. Running it again changes nothing unless the file would differ.",
    )
    p.add_argument("--dry-run", action="store_true", help="print the file; write nothing")
    p.add_argument(
        "--force", action="store_true", help="rewrite and restart even if the file is unchanged"
    )
    p.set_defaults(handler=cmd_install)

    p = sub.add_parser("uninstall", help="stop and disable the service and remove its file")
    p.set_defaults(handler=cmd_uninstall)
    for action, text in (
        ("start", "start the installed service"),
        ("stop", "stop the installed service (it starts again at the next login)"),
        ("status", "show the service manager's view of the service"),
    ):
        p = sub.add_parser(action, help=text)
        p.set_defaults(handler=cmd_control, action=action)


def cmd_install(args: argparse.Namespace) -> int:
    config_path = resolve_config_path(args.config)
    load_config(config_path)  # a service restarting on a broken config helps nobody
    return install(Host.current(), Console(), config_path, dry_run=args.dry_run, force=args.force)


def cmd_uninstall(args: argparse.Namespace) -> int:
    return uninstall(Host.current(), Console())


def cmd_control(args: argparse.Namespace) -> int:
    return control(Host.current(), Console(), args.action)
