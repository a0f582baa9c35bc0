"""scripts/bench.py works: the whole benchmark at tiny counts yields every figure.

Only that the rig runs and its numbers are sane; the timings themselves are compared
against their targets by the benchmark (`scripts/bench`), never asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from localproxy.sandbox.provider import ProviderUnavailable, check_available

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
FIGURES = {
    "smtp.batch",
    "smtp.batch_machine_cpu",
    "smtp.provider_share",
    "smtp.large",
    "smtp.large_rss",
    "imap.fetch_envelope",
    "imap.fetch_envelope_probed",
    "imap.cold",
    "imap.warm",
    "imap.cached_rss",
    "imap.idle_rss",
}
CRYPTO_TOOLS = ("gpg", "sq", "rnp")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def expected_figures() -> set[str]:
    keys = set(FIGURES)
    for tool in filter(shutil.which, CRYPTO_TOOLS):
        for operation in ("encrypt", "decrypt"):
            keys |= {f"crypto.{operation}.small.{tool}", f"crypto.{operation}.large.{tool}"}
            keys.add(f"crypto.{operation}.large.{tool}.rss")
    return keys


def test_quick_benchmark_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        check_available()
    except ProviderUnavailable as exc:
        if os.environ.get("LOCALPROXY_REQUIRE_SERVERS"):
            pytest.fail(f"real mail provider unavailable: {exc}")
        pytest.skip(f"real mail provider unavailable: {exc}")
    bench = load_bench()
    results = bench.run(bench.QUICK)
    bench.print_table(results)
    report = json.loads(json.dumps(results.as_json()))

    figures = {f["key"]: f for f in report["figures"]}
    assert set(figures) >= expected_figures()
    for key, figure in figures.items():
        values = [figure["proxy"], figure["reference"], figure["ratio"]]
        for value in filter(lambda v: v is not None, values):
            assert math.isfinite(value) and value > 0, (key, figure)
        if figure["target"]:
            assert isinstance(figure["passed"], bool), (key, figure)
    # Memory is the proxy child's own: more than an interpreter, far less than the machine.
    for key in ("smtp.large_rss", "imap.cached_rss", "imap.idle_rss"):
        assert 10 < figures[key]["proxy"] < 4000, figures[key]
    assert "localproxy benchmark" in capsys.readouterr().out
