"""`localproxy keys ...` as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from localproxy.crypto.openpgp import default_engine

ENGINE = default_engine()

CONFIG = """
[proxy]
data_dir = "{data}"

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


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(data=tmp_path / "data"))
    return path


def keys(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "localproxy", "--config", str(config), "keys", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def listing(config: Path) -> list[dict]:
    result = keys(config, "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_list_and_refuse_a_second_key(config):
    result = keys(config, "generate", "personal")
    assert result.returncode == 0, result.stderr
    assert "Make a backup now" in result.stdout
    assert "no OS keyring available" in result.stdout, "the fallback is said out loud"
    (own,) = listing(config)
    assert own["own"] and own["account"] == "personal" and own["status"] == "usable"
    assert own["addresses"] == ["alice@example.org"] and own["source"] == "generated"
    again = keys(config, "generate", "personal")
    assert again.returncode == 1 and "already has a key; use --force" in again.stderr
    table = keys(config, "list")
    assert own["fingerprint"][:4] + " " + own["fingerprint"][4:8] in table.stdout
    assert "Own keys (1)" in table.stdout and "Recipients (0)" in table.stdout


def test_import_reports_each_item_and_bad_files_cleanly(config, tmp_path):
    bob = ENGINE.generate_key(["Bob <bob@example.org>"])
    carol = ENGINE.generate_key(["Carol <carol@example.org>"])
    ring = tmp_path / "ring.asc"
    ring.write_bytes(
        ENGINE.armor(
            ENGINE.public_only(bob.data) + ENGINE.public_only(carol.data), kind="public-key"
        )
    )
    garbage = tmp_path / "garbage.asc"
    garbage.write_bytes(b"this is not a key\n")
    result = keys(config, "import", str(ring), str(garbage), str(tmp_path / "missing.asc"))
    assert result.returncode == 1
    assert result.stdout.count("added") == 2
    assert "garbage.asc" in result.stdout and "missing.asc: No such file" in result.stdout
    assert "Traceback" not in result.stderr
    assert {c["addresses"][0] for c in listing(config)} == {"bob@example.org", "carol@example.org"}
    assert keys(config, "import", str(ring)).stdout.count("unchanged") == 2


def test_passphrase_protected_secret_key_import(config, tmp_path):
    key = ENGINE.generate_key(["Alice <alice@example.org>"], passphrase="s3cret")
    path = tmp_path / "alice.asc"
    path.write_bytes(ENGINE.armor(key.data, kind="secret-key"))
    wrong = keys(config, "import", str(path), env={"LOCALPROXY_KEY_PASSPHRASE": "nope"})
    assert wrong.returncode == 1 and "skipped" in wrong.stdout
    assert listing(config) == []
    right = keys(config, "import", str(path), env={"LOCALPROXY_KEY_PASSPHRASE": "s3cret"})
    assert right.returncode == 0, right.stdout + right.stderr
    (own,) = listing(config)
    assert own["account"] == "personal", "matched by address"


def test_export_public_and_guarded_secret(config, tmp_path):
    keys(config, "generate", "personal")
    public = keys(config, "export", "alice@example.org")
    assert public.returncode == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in public.stdout
    assert ENGINE.parse_certs(public.stdout.encode())[0].has_secret is False
    (own,) = listing(config)
    refused = keys(config, "export", own["fingerprint"], "--secret")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    out = tmp_path / "secret.asc"
    done = keys(config, "export", own["fingerprint"], "--secret", "--yes", "-o", str(out))
    assert done.returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert ENGINE.parse_certs(out.read_bytes())[0].has_secret
    assert keys(config, "export", "nobody@example.org").returncode == 1


def test_remove_asks_for_own_keys(config):
    keys(config, "generate", "personal")
    (own,) = listing(config)
    refused = keys(config, "remove", own["fingerprint"])
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert keys(config, "remove", own["fingerprint"], "--yes").returncode == 0
    assert listing(config) == []


def test_backup_and_restore_into_a_new_data_dir(config, tmp_path):
    keys(config, "generate", "personal")
    (own,) = listing(config)
    backup = tmp_path / "keys.backup"
    env = {"LOCALPROXY_BACKUP_PASSPHRASE": "correct horse battery"}
    assert keys(config, "backup", str(backup), env=env).returncode == 0
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    other = tmp_path / "other.toml"
    other.write_text(CONFIG.format(data=tmp_path / "data2"))
    wrong = keys(other, "restore", str(backup), env={"LOCALPROXY_BACKUP_PASSPHRASE": "x"})
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr
    restored = keys(other, "restore", str(backup), env=env)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert [c["fingerprint"] for c in listing(other)] == [own["fingerprint"]]
    assert listing(other)[0]["own"]
