"""`localproxy service`: the generated files, and install/uninstall/start/stop/status run
against a recording fake of the platform tools (no real systemctl, launchctl or schtasks)."""

from __future__ import annotations

import argparse
import configparser
import io
import plistlib
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import pytest
from rich.console import Console

from localproxy import service
from localproxy.config import ConfigError
from localproxy.service import (
    LAUNCHD_LABEL,
    NOT_FOUND,
    TASK_NAMESPACE,
    UNIT_NAME,
    Host,
    ServiceError,
    control,
    install,
    launchd_plist,
    run_tool,
    service_exec_args,
    systemd_unit,
    uninstall,
    windows_task_xml,
)

PYTHON = "/opt/local proxy/bin/python3"
CONFIG = Path("/home/alice/mail settings/config.toml")
EXEC_ARGS = service_exec_args(CONFIG, PYTHON)
TASK = {"t": TASK_NAMESPACE}

USER_SYSTEMD = {
    ("systemctl", "--user", "is-system-running"): (0, "running\n", ""),
    ("loginctl", "show-user"): (0, "Linger=yes\n", ""),
}
NO_USER_SYSTEMD = {("systemctl", "--user", "is-system-running"): (1, "offline\n", "")}


class FakeTools:
    """Records each command; answers by the longest matching command prefix (default: ok)."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str, str]]) -> None:
        self.answers = dict(answers)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        command = tuple(args)
        self.calls.append(command)
        matches = [p for p in self.answers if command[: len(p)] == p]
        code, out, err = self.answers[max(matches, key=len)] if matches else (0, "", "")
        return subprocess.CompletedProcess(command, code, out, err)

    def actions(self) -> list[str]:
        """The commands that change something (probes left out)."""
        probes = ("is-system-running", "show-user", "print", "/Query")
        return [shlex.join(c) for c in self.calls if not any(p in c for p in probes)]


class Machine:
    """A fake host plus the console its output goes to."""

    def __init__(self, tmp_path: Path, answers, platform: str = "linux", env=None) -> None:
        self.tools = FakeTools(answers)
        self.home = tmp_path / "home"
        self.host = Host(
            platform=platform,
            home=self.home,
            env={"XDG_RUNTIME_DIR": "/run/user/1000"} if env is None else env,
            uid=1000,
            user="alice",
            run=self.tools,
        )
        self.output = io.StringIO()
        self.console = Console(file=self.output, width=200, color_system=None)

    def install(self, **options) -> int:
        return install(self.host, self.console, CONFIG, python=PYTHON, **options)

    def said(self) -> str:
        return self.output.getvalue()

    @property
    def unit(self) -> Path:
        return self.home / ".config" / "systemd" / "user" / UNIT_NAME


@pytest.fixture
def linux(tmp_path: Path) -> Machine:
    return Machine(tmp_path, USER_SYSTEMD)


# --------------------------------------------------------------------------- systemd unit


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def test_systemd_unit_directives():
    unit = parse_unit(systemd_unit(EXEC_ARGS, CONFIG, ["file:///src/README.md"]))
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Unit"]["Documentation"] == "file:///src/README.md"
    assert unit["Unit"]["After"] == unit["Unit"]["Wants"] == "network-online.target"
    service_section = unit["Service"]
    assert service_section["Type"] == "simple"
    assert service_section["Restart"] == "on-failure" and service_section["RestartSec"] == "5"
    assert service_section["RestartPreventExitStatus"] == "2"
    assert service_section["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service_section["Environment"] == "PYTHONUNBUFFERED=1"
    assert service_section["NoNewPrivileges"] == "yes" and service_section["UMask"] == "0077"
    for needs_namespaces in ("PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateDevices"):
        assert needs_namespaces not in service_section
    assert unit["Install"]["WantedBy"] == "default.target"


def test_exec_start_quotes_paths_with_spaces():
    exec_start = parse_unit(systemd_unit(EXEC_ARGS, CONFIG))["Service"]["ExecStart"]
    assert exec_start == (
        '"/opt/local proxy/bin/python3" -m localproxy '
        '--config "/home/alice/mail settings/config.toml" run'
    )
    assert shlex.split(exec_start) == EXEC_ARGS


def test_exec_start_keeps_percent_dollar_quote_and_backslash_literal():
    args = ["/usr/bin/python3", "-m", "localproxy", "--config", '/c/50% $HOME "q"\\x.toml', "run"]
    exec_start = parse_unit(systemd_unit(args, CONFIG))["Service"]["ExecStart"]
    assert exec_start.endswith(r'--config "/c/50%% $$HOME \"q\"\\x.toml" run')
    assert exec_start.startswith("/usr/bin/python3 -m localproxy")  # no needless quotes


def test_unit_without_documentation_has_no_documentation_line():
    assert "Documentation" not in parse_unit(systemd_unit(EXEC_ARGS, CONFIG))["Unit"]


def test_exec_args_use_this_python_and_an_absolute_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(tmp_path / "config.toml")
    expected = [sys.executable, "-m", "localproxy", "--config", config, "run"]
    assert service_exec_args(Path("config.toml")) == expected


# --------------------------------------------------------------------------- launchd plist


def test_launchd_plist():
    log = Path("/Users/alice/Library/Logs/localproxy.log")
    agent = plistlib.loads(launchd_plist(EXEC_ARGS, log))
    assert agent["Label"] == LAUNCHD_LABEL
    assert agent["ProgramArguments"] == EXEC_ARGS  # an array: spaces need no quoting
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == agent["StandardErrorPath"] == str(log)
    assert agent["EnvironmentVariables"] == {"PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- Windows task


WINDOWS_ARGS = [
    r"C:\Program Files\Python311\python.exe",
    "-m",
    "localproxy",
    "--config",
    r"C:\Users\Alice Smith\AppData\Roaming\localproxy\config.toml",
    "run",
]


def test_windows_task_runs_at_this_users_logon_without_elevation():
    task = ET.fromstring(windows_task_xml(WINDOWS_ARGS, r"PC\alice"))
    assert task.tag == f"{{{TASK_NAMESPACE}}}Task"
    trigger = task.find("t:Triggers/t:LogonTrigger", TASK)
    assert trigger is not None and trigger.findtext("t:UserId", namespaces=TASK) == r"PC\alice"
    principal = task.find("t:Principals/t:Principal", TASK)
    assert principal.findtext("t:RunLevel", namespaces=TASK) == "LeastPrivilege"
    assert principal.findtext("t:LogonType", namespaces=TASK) == "InteractiveToken"
    settings = task.find("t:Settings", TASK)
    assert settings.findtext("t:ExecutionTimeLimit", namespaces=TASK) == "PT0S"
    assert settings.findtext("t:DisallowStartIfOnBatteries", namespaces=TASK) == "false"
    assert settings.findtext("t:RestartOnFailure/t:Interval", namespaces=TASK) == "PT1M"


def test_windows_task_quotes_command_and_arguments_the_windows_way():
    task = ET.fromstring(windows_task_xml(WINDOWS_ARGS))
    action = task.find("t:Actions/t:Exec", TASK)
    assert action.findtext("t:Command", namespaces=TASK) == (
        r'"C:\Program Files\Python311\python.exe"'
    )
    assert action.findtext("t:Arguments", namespaces=TASK) == (
        r'-m localproxy --config "C:\Users\Alice Smith\AppData\Roaming\localproxy\config.toml" run'
    )
    assert task.find("t:Triggers/t:LogonTrigger/t:UserId", TASK) is None


def test_windows_task_refuses_what_task_scheduler_would_expand():
    with pytest.raises(ServiceError, match="%NAME%"):
        windows_task_xml([*WINDOWS_ARGS[:4], r"C:\%APPDATA%\config.toml", "run"])


# --------------------------------------------------------------------------- install (Linux)


def test_dry_run_prints_the_unit_and_writes_nothing(linux):
    assert linux.install(dry_run=True) == 0
    said = linux.said()
    assert f"would write {linux.unit} (a new file); nothing written" in said
    assert "[Unit]" in said and "WantedBy=default.target" in said
    assert 'ExecStart="/opt/local proxy/bin/python3" -m localproxy' in said
    assert not linux.unit.exists() and linux.tools.calls == []


def test_install_writes_the_unit_then_enables_and_starts_it(linux):
    assert linux.install() == 0
    readme = service.readme_uri()  # the checkout's README, named in Documentation=
    assert linux.unit.read_text() == systemd_unit(EXEC_ARGS, CONFIG, [readme] if readme else [])
    assert f"Wrote {linux.unit}" in linux.said()
    assert linux.tools.actions() == [
        "systemctl --user daemon-reload",
        f"systemctl --user enable --now {UNIT_NAME}",
    ]
    assert f"$ systemctl --user enable --now {UNIT_NAME}\n  ok" in linux.said()


def test_install_twice_changes_nothing(linux):
    linux.install()
    written = linux.unit.read_bytes()
    linux.tools.calls.clear()
    assert linux.install() == 0
    assert f"{linux.unit} already installed, unchanged." in linux.said()
    assert linux.unit.read_bytes() == written
    assert linux.tools.actions() == [f"systemctl --user enable --now {UNIT_NAME}"]


def test_install_replaces_a_different_unit_shows_the_diff_and_restarts(linux):
    linux.unit.parent.mkdir(parents=True)
    linux.unit.write_text("[Service]\nExecStart=/old/python -m localproxy run\n")
    assert linux.install() == 0
    said = linux.said()
    assert f"Replaced {linux.unit}, which differed:" in said
    assert "-ExecStart=/old/python -m localproxy run" in said and "+ExecStart=" in said
    assert linux.tools.actions()[-1] == f"systemctl --user restart {UNIT_NAME}"


def test_force_rewrites_and_restarts_an_unchanged_unit(linux):
    linux.install()
    linux.tools.calls.clear()
    assert linux.install(force=True) == 0
    assert linux.tools.actions()[-1] == f"systemctl --user restart {UNIT_NAME}"


def test_force_says_what_it_did(linux):
    linux.install()
    linux.install(force=True)
    assert "already installed, unchanged (rewritten and restarted: --force)." in linux.said()


def test_an_unwritable_location_is_one_clear_error(linux):
    linux.home.mkdir()
    (linux.home / ".config").write_text("a file where a directory should be")
    with pytest.raises(ServiceError, match=r"cannot write .*localproxy\.service"):
        linux.install()
    assert linux.tools.calls == [] and "Wrote" not in linux.said()


def test_unit_location_follows_xdg_config_home(tmp_path):
    machine = Machine(tmp_path, USER_SYSTEMD, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    machine.install()
    assert (tmp_path / "xdg" / "systemd" / "user" / UNIT_NAME).exists()
    relative = Machine(tmp_path, USER_SYSTEMD, env={"XDG_CONFIG_HOME": "relative"})
    relative.install()
    assert relative.unit.exists(), "a relative XDG_CONFIG_HOME is ignored, as the spec says"


def test_without_a_user_systemd_the_unit_is_written_and_the_way_to_start_it_explained(tmp_path):
    machine = Machine(tmp_path, NO_USER_SYSTEMD, env={})
    assert machine.install() == 0
    assert machine.unit.exists()
    said = " ".join(machine.said().split())
    assert "warning: the systemd user unit is installed but not started" in said
    assert "finds no user service manager (offline)" in said
    assert "no XDG_RUNTIME_DIR and no DBUS_SESSION_BUS_ADDRESS" in said
    assert "1. loginctl enable-linger alice" in said
    assert "2. log in again as alice" in said
    assert "3. systemctl --user daemon-reload && systemctl --user enable --now localproxy" in said
    assert "Or run it in this terminal now: '/opt/local proxy/bin/python3' -m localproxy" in said
    assert machine.tools.actions() == [], "nothing is enabled without a user manager"


def test_without_systemd_at_all_it_says_so(tmp_path):
    machine = Machine(tmp_path, {("systemctl",): (NOT_FOUND, "", "systemctl: command not found")})
    assert machine.install() == 0
    assert "this system does not run systemd" in machine.said()


def test_a_failing_command_stops_the_install_with_its_message(tmp_path):
    answers = {
        **USER_SYSTEMD,
        ("systemctl", "--user", "enable"): (1, "", "Failed to enable unit: Access denied"),
    }
    machine = Machine(tmp_path, answers)
    assert machine.install() == 1
    said = machine.said()
    assert "  Failed to enable unit: Access denied\n  failed (exit 1)" in said


def test_lingering_off_gets_a_hint(tmp_path):
    machine = Machine(tmp_path, {**USER_SYSTEMD, ("loginctl", "show-user"): (0, "Linger=no\n", "")})
    assert machine.install() == 0
    said = " ".join(machine.said().split())
    assert "note: Lingering is off for alice" in said and "loginctl enable-linger alice" in said


# --------------------------------------------------------------------------- uninstall (Linux)


def test_uninstall_disables_then_removes_and_is_idempotent(linux):
    linux.install()
    linux.tools.calls.clear()
    assert uninstall(linux.host, linux.console) == 0
    assert not linux.unit.exists()
    assert linux.tools.actions() == [
        f"systemctl --user disable --now {UNIT_NAME}",
        "systemctl --user daemon-reload",
    ]
    assert f"Removed {linux.unit}" in linux.said()
    assert uninstall(linux.host, linux.console) == 0
    assert f"Not installed: {linux.unit} does not exist." in linux.said()


def test_uninstall_without_a_user_systemd_removes_the_file_and_the_enable_link(tmp_path):
    machine = Machine(tmp_path, NO_USER_SYSTEMD, env={})
    machine.install()
    wants = machine.unit.parent / "default.target.wants" / UNIT_NAME
    wants.parent.mkdir()
    wants.symlink_to(machine.unit)
    assert uninstall(machine.host, machine.console) == 0
    assert not machine.unit.exists() and not wants.is_symlink()
    assert "cannot stop the systemd user unit" in machine.said()


# --------------------------------------------------------------------------- start/stop/status


def test_start_stop_status_call_systemctl(linux):
    linux.install()
    linux.tools.calls.clear()
    linux.tools.answers[("systemctl", "--user", "status")] = (3, "○ localproxy.service\n", "")
    assert control(linux.host, linux.console, "start") == 0
    assert control(linux.host, linux.console, "stop") == 0
    assert control(linux.host, linux.console, "status") == 3, "systemctl's exit code"
    assert linux.tools.actions() == [
        f"systemctl --user start {UNIT_NAME}",
        f"systemctl --user stop {UNIT_NAME}",
        f"systemctl --user status --no-pager --lines=20 {UNIT_NAME}",
    ]
    assert "○ localproxy.service" in linux.said()


def test_start_when_not_installed_or_without_user_systemd_explains(tmp_path, linux):
    assert control(linux.host, linux.console, "start") == 1
    assert "run `localproxy service install` first" in linux.said()
    machine = Machine(tmp_path, NO_USER_SYSTEMD, env={})
    machine.install()
    assert control(machine.host, machine.console, "start") == 1
    assert "loginctl enable-linger alice" in machine.said()


# --------------------------------------------------------------------------- macOS, Windows


def test_macos_writes_a_launch_agent_and_bootstraps_it(tmp_path):
    not_loaded = {("launchctl", "print", f"gui/1000/{LAUNCHD_LABEL}"): (113, "", "not found")}
    mac = Machine(tmp_path, not_loaded, platform="darwin")
    assert mac.install() == 0
    plist = mac.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    agent = plistlib.loads(plist.read_bytes())
    assert agent["StandardOutPath"] == str(mac.home / "Library" / "Logs" / "localproxy.log")
    assert mac.tools.actions() == [
        f"launchctl enable gui/1000/{LAUNCHD_LABEL}",
        f"launchctl bootstrap gui/1000 {plist}",
    ]


def test_macos_install_twice_leaves_a_loaded_agent_alone(tmp_path):
    mac = Machine(tmp_path, {}, platform="darwin")  # every probe answers "loaded"
    mac.install()
    mac.tools.calls.clear()
    assert mac.install() == 0
    assert mac.tools.actions() == []


def test_macos_uninstall_boots_out_then_removes(tmp_path):
    mac = Machine(tmp_path, {}, platform="darwin")
    mac.install()
    mac.tools.calls.clear()
    assert uninstall(mac.host, mac.console) == 0
    assert mac.tools.actions() == [f"launchctl bootout gui/1000/{LAUNCHD_LABEL}"]
    assert not (mac.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist").exists()


def test_windows_writes_utf16_task_xml_and_registers_it(tmp_path):
    env = {"LOCALAPPDATA": str(tmp_path / "AppData" / "Local"), "USERDOMAIN": "PC"}
    windows = Machine(tmp_path, {}, platform="win32", env=env)
    assert windows.install() == 0
    xml_file = tmp_path / "AppData" / "Local" / "localproxy" / "localproxy-task.xml"
    data = xml_file.read_bytes()
    assert data[:2] in (b"\xff\xfe", b"\xfe\xff"), "UTF-16 with a byte order mark"
    task = ET.fromstring(data)
    assert task.findtext("t:Principals/t:Principal/t:UserId", namespaces=TASK) == r"PC\alice"
    assert windows.tools.actions() == [
        shlex.join(["schtasks", "/Create", "/TN", "localproxy", "/XML", str(xml_file), "/F"]),
        "schtasks /Run /TN localproxy",
    ]
    assert "$ schtasks /Create /TN localproxy /XML" in windows.said()


def test_platform_is_chosen_by_sys_platform(tmp_path):
    assert isinstance(service.manager_for(Machine(tmp_path, {}).host), service.SystemdUser)
    mac = Machine(tmp_path, {}, platform="darwin").host
    assert isinstance(service.manager_for(mac), service.LaunchAgent)
    windows = Machine(tmp_path, {}, platform="win32").host
    assert isinstance(service.manager_for(windows), service.ScheduledTask)
    with pytest.raises(ServiceError, match="no supported service manager on freebsd14"):
        Machine(tmp_path, {}, platform="freebsd14").install()


# --------------------------------------------------------------------------- the CLI handlers


VALID_CONFIG = """
[[account]]
name = "personal"
addresses = ["alice@example.org"]
[account.upstream.imap]
host = "imap.example.org"
security = "tls"
[account.upstream.smtp]
host = "smtp.example.org"
security = "tls"
"""


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="localproxy")
    parser.add_argument("--config")
    commands = parser.add_subparsers(dest="command", required=True)
    service.add_service_commands(commands)
    return parser.parse_args(argv)


@pytest.fixture
def fake_host(tmp_path, monkeypatch) -> Machine:
    machine = Machine(tmp_path, USER_SYSTEMD)
    monkeypatch.setattr(Host, "current", classmethod(lambda cls: machine.host))
    return machine


def test_cli_install_dry_run_uses_the_config_and_this_python(tmp_path, fake_host, capsys):
    config = tmp_path / "my config.toml"
    config.write_text(VALID_CONFIG)
    args = parse("--config", str(config), "service", "install", "--dry-run")
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert f'--config "{config}" run' in out and sys.executable in out
    assert not fake_host.unit.exists()


def test_cli_install_refuses_a_broken_config(tmp_path, fake_host):
    config = tmp_path / "config.toml"
    config.write_text("[[account]]\nname = 1\n")
    args = parse("--config", str(config), "service", "install")
    with pytest.raises(ConfigError):
        args.handler(args)
    assert not fake_host.unit.exists()


def test_cli_subcommands_reach_the_tools(fake_host, capsys):
    fake_host.unit.parent.mkdir(parents=True)
    fake_host.unit.write_text("[Unit]\n")
    for action in ("start", "stop", "status"):
        args = parse("service", action)
        assert args.handler(args) == 0
    args = parse("service", "uninstall")
    assert args.handler(args) == 0 and not fake_host.unit.exists()
    assert f"systemctl --user disable --now {UNIT_NAME}" in fake_host.tools.actions()


# --------------------------------------------------------------------------- the real runner


def test_run_tool_turns_a_missing_tool_into_exit_127():
    result = run_tool(["localproxy-no-such-tool-anywhere"])
    assert result.returncode == NOT_FOUND and "command not found" in result.stderr


def test_run_tool_gives_up_after_its_timeout():
    result = run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert result.returncode == 124 and "no answer within 0.5 s" in result.stderr
