"""scripts/fuzz and scripts/soak work (issue 8): a few seconds of each, tiny concurrency.

Only that the rigs run and report their figures; the long runs are for people, not CI.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from localproxy.sandbox.provider import ProviderUnavailable, check_available

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"imap-client", "imap-server", "fetch", "mime", "openpgp", "cms", "config"}
TARGETS |= {"smtp-data", "smtp-compose"}


def test_fuzz_runs_every_target_cleanly(tmp_path: Path) -> None:
    findings, report = tmp_path / "findings", tmp_path / "fuzz.json"
    done = subprocess.run(
        [ROOT / "scripts" / "fuzz", "6", "--findings", findings, "--json", report],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert {row["target"] for row in result["targets"]} == TARGETS
    for row in result["targets"]:
        assert row["execs"] > 0, row
        assert row["findings"] == [] and row["exit"] == 0, row
    assert not findings.exists() or not any(findings.iterdir())


def test_soak_reports_every_figure(tmp_path: Path) -> None:
    try:
        check_available()
    except ProviderUnavailable as exc:
        if os.environ.get("LOCALPROXY_REQUIRE_SERVERS"):
            pytest.fail(f"real mail provider unavailable: {exc}")
        pytest.skip(f"real mail provider unavailable: {exc}")
    report = tmp_path / "soak.json"
    argv = [ROOT / "scripts" / "soak", "0.15", "--imap", "2", "--smtp", "1", "--messages", "5"]
    done = subprocess.run(
        [*argv, "--json", report], capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert result["errors"] == 0 and result["passed"], result["checks"]
    assert result["operations"] > 0 and result["throughput_ops_per_s"] > 0
    assert set(result["ops"]) <= {"fetch", "idle", "append", "smtp"}
    assert {"fetch", "smtp"} <= set(result["ops"])
    for row in result["ops"].values():
        for key in ("proxy_p50_ms", "proxy_p99_ms", "direct_p50_ms", "direct_p99_ms"):
            assert row[key] > 0, (key, row)
        assert "added_p50_ms" in row and "added_p99_ms" in row
    for name in ("imap", "smtp"):
        proxy = result["proxies"][name]
        assert 10 * 2**20 < proxy["rss_max"] < 4 * 2**30, proxy["rss_max"]
        assert proxy["fds_returned"] and proxy["fds_final"] > 0
        assert len(proxy["samples"]) >= 5
