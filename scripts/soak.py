#!/usr/bin/env python3
"""Soak test (issue 8): many concurrent IMAP sessions and SMTP senders through the proxy
against a fresh Dovecot/Postfix harness, all on loopback, bounded in time and count.

    scripts/soak MINUTES [--imap N] [--smtp M] [--json PATH]

Each IMAP worker holds one session through the IMAP proxy and one straight to Dovecot and
runs the same random operation on both, one after the other: FETCH of a random message
(plain or encrypted), a short IDLE, or APPEND to Drafts. Each SMTP worker sends the same
letter through the SMTP proxy and straight to Postfix submission, to the sender's own
address (encrypted to her own key): the IMAP sessions use bob's INBOX, and some fifty
deliveries a second into the mailbox they IDLE on make Dovecot's own IDLE take up to
30 s on either path, which would measure Dovecot's index locking, not the proxy. The
proxies run in their own processes (as in scripts/bench), sampled every half second for
RSS (/proc/PID/status VmRSS) and open descriptors (/proc/PID/fd).

Reported: throughput, p50/p99 latency through the proxy and direct (and the difference),
errors, RSS over time and descriptors. Exit status 1 when there was any error, when the
descriptors did not return to their baseline (+ slack) after the clients left, or when RSS
still grew in the last third of the run (least-squares slope over that window, growth over
the window above both 10 % of the median RSS and 16 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import importlib.util
import json
import os
import random
import re
import shutil
import smtplib
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_INTERVAL = 0.5  # seconds
FD_SLACK = 4
FD_SETTLE = 10.0  # seconds for the proxies to close everything once clients are gone
RSS_GROWTH_FRACTION = 0.10
RSS_GROWTH_FLOOR = 16 * 1024 * 1024
IDLE_SECONDS = 0.2
SMTP_FROM = SMTP_TO = "alice@example.org"  # not bob, whose INBOX the IMAP sessions use
OP_TIMEOUT = 60.0
OPERATIONS = ("fetch", "idle", "append", "smtp")


def load_bench() -> ModuleType:
    """scripts/bench.py as a module: its provider, proxy children and clients."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


bench = load_bench()


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latency: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ops: int = 0

    def add(self, op: str, path: str, seconds: float) -> None:
        with self.lock:
            self.latency.setdefault((op, path), []).append(seconds)
            if path == "proxy":
                self.ops += 1

    def error(self, where: str, exc: BaseException) -> None:
        text = f"{where}: {type(exc).__name__}: {exc}"
        with self.lock:
            self.errors.append(text)
        print(text, file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / den


def rss_of(pid: int) -> int:
    found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else 0


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """RSS and descriptor count of each proxy child, every SAMPLE_INTERVAL seconds."""

    def __init__(self, pids: dict[str, int], start: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.start_time = pids, start
        self.samples: dict[str, list[dict[str, float]]] = {name: [] for name in pids}
        self.halt = threading.Event()

    def sample(self) -> None:
        now = time.monotonic() - self.start_time
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.samples[name].append(
                    {"t": round(now, 2), "rss": rss_of(pid), "fds": fds_of(pid)}
                )

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_INTERVAL):
            self.sample()


# --------------------------------------------------------------------------- clients


def idle(conn: imaplib.IMAP4) -> None:
    """IDLE for IDLE_SECONDS, then DONE; raises unless the server says OK."""
    tag = conn._new_tag()  # type: ignore[attr-defined]
    conn.send(tag + b" IDLE\r\n")
    while not (line := conn.readline()).startswith(b"+"):
        if not line or line.startswith(tag):
            raise RuntimeError(f"IDLE refused: {line!r}")
    time.sleep(IDLE_SECONDS)
    conn.send(b"DONE\r\n")
    while not (line := conn.readline()).startswith(tag):
        if not line:
            raise RuntimeError("connection closed during IDLE")
    if not line[len(tag) :].strip().startswith(b"OK"):
        raise RuntimeError(f"IDLE ended with {line!r}")


def check(result: tuple[str, Any], what: str) -> Any:
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"{what}: {typ} {data!r}")
    return data


def imap_op(conn: imaplib.IMAP4, op: str, seq: int, draft: bytes) -> None:
    if op == "fetch":
        data = check(conn.fetch(str(seq), "(FLAGS BODY.PEEK[])"), f"FETCH {seq}")
        if not data or not isinstance(data[0], tuple) or not data[0][1]:
            raise RuntimeError(f"FETCH {seq}: no body in {data!r:.200}")
    elif op == "idle":
        idle(conn)
    else:
        check(conn.append("Drafts", None, None, draft), "APPEND Drafts")


def imap_worker(
    rig: Any, port: int, stats: Stats, end: float, max_ops: int, seed: int, messages: int
) -> None:
    rng = random.Random(seed)
    conns: dict[str, imaplib.IMAP4] = {}
    try:
        conns["proxy"] = bench.imap_proxy(rig.provider, port, bench.RECIPIENT)
        conns["direct"] = bench.imap_direct(rig.provider, bench.RECIPIENT)
        for conn in conns.values():
            conn.sock.settimeout(OP_TIMEOUT)
            check(conn.select("INBOX"), "SELECT INBOX")
        done = 0
        while time.monotonic() < end and done < max_ops:
            op = rng.choices(("fetch", "idle", "append"), (6, 2, 2))[0]
            seq = rng.randint(1, messages)
            draft = bench.letter(rng.randrange(10**6), 2000, "draft")
            for path in rng.sample(("proxy", "direct"), 2):
                start = time.perf_counter()
                try:
                    imap_op(conns[path], op, seq, draft)
                except Exception as exc:
                    stats.error(f"imap {op} via {path}", exc)
                    return
                elapsed = time.perf_counter() - start
                stats.add(op, path, elapsed - (IDLE_SECONDS if op == "idle" else 0))
            done += 1
    except Exception as exc:
        stats.error("imap session", exc)
    finally:
        for conn in conns.values():
            with contextlib.suppress(Exception):
                conn.logout()


def smtp_worker(
    rig: Any, port: int, stats: Stats, end: float, max_ops: int, seed: int, per_session: int
) -> None:
    rng = random.Random(seed)
    connect: dict[str, Callable[[], smtplib.SMTP]] = {
        "proxy": lambda: bench.smtp_proxy(rig.provider, port, bench.SENDER),
        "direct": lambda: bench.smtp_direct(rig.provider, bench.SENDER),
    }
    conns: dict[str, smtplib.SMTP] = {}
    done = 0
    try:
        while time.monotonic() < end and done < max_ops:
            if done % per_session == 0:  # a fresh session now and then: AUTH, TLS, QUIT too
                for conn in conns.values():
                    with contextlib.suppress(Exception):
                        conn.quit()
                conns = {path: make() for path, make in connect.items()}
            raw = bench.letter(rng.randrange(10**6), rng.choice((2000, 20000)), "soak")
            for path in rng.sample(("proxy", "direct"), 2):
                start = time.perf_counter()
                try:
                    refused = conns[path].sendmail(SMTP_FROM, [SMTP_TO], raw)
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
                except Exception as exc:
                    stats.error(f"smtp via {path}", exc)
                    return
                stats.add("smtp", path, time.perf_counter() - start)
            done += 1
    except Exception as exc:
        stats.error("smtp session", exc)
    finally:
        for conn in conns.values():
            with contextlib.suppress(Exception):
                conn.quit()


# --------------------------------------------------------------------------- the run


def populate(rig: Any, plain: int, encrypted: int) -> int:
    """bob's INBOX: plain letters and letters encrypted as the SMTP proxy sends them."""
    provider = rig.provider
    scale = bench.Scale(message_size=8000)
    with provider.imap(bench.RECIPIENT) as conn:
        with contextlib.suppress(imaplib.IMAP4.error):
            conn.create("Drafts")
        for i in range(plain):
            check(conn.append("INBOX", None, None, bench.letter(i, 8000, "plain")), "APPEND")
        for raw in bench.encrypted_letters(rig, scale, encrypted):
            check(conn.append("INBOX", None, None, raw), "APPEND")
    return plain + encrypted


def run(args: argparse.Namespace) -> dict[str, Any]:
    bench.no_os_keyring()
    root = Path(tempfile.mkdtemp(prefix="localproxy-soak-provider-"))
    work = Path(tempfile.mkdtemp(prefix="localproxy-soak-"))
    try:
        with bench.start_bench_provider(root) as provider:
            rig = bench.make_rig(provider, work)
            messages = populate(rig, args.messages, args.messages)
            with (
                rig.child("imap", "imap", bench.RECIPIENT) as imap_child,
                rig.child("smtp", "smtp", bench.SENDER) as smtp_child,
            ):
                return soak(args, rig, imap_child, smtp_child, messages)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def soak(args: argparse.Namespace, rig: Any, imap_child: Any, smtp_child: Any, messages: int):
    children = {"imap": imap_child, "smtp": smtp_child}
    pids = {name: child.pid for name, child in children.items()}
    # Warm-up (imports, TLS, key loading), then the descriptor baseline with no client.
    warm = Stats()
    imap_worker(rig, imap_child.port, warm, time.monotonic() + 30, 3, 0, messages)
    smtp_worker(rig, smtp_child.port, warm, time.monotonic() + 30, 1, 0, 1)
    if warm.errors:
        raise RuntimeError(f"warm-up failed: {warm.errors}")
    time.sleep(1.0)
    baseline_fds = {name: fds_of(pid) for name, pid in pids.items()}
    baseline_rss = {name: rss_of(pid) for name, pid in pids.items()}

    stats = Stats()
    duration = args.minutes * 60
    start = time.monotonic()
    end = start + duration
    sampler = Sampler(pids, start)
    sampler.sample()
    sampler.start()
    threads = [
        threading.Thread(
            target=imap_worker,
            args=(rig, imap_child.port, stats, end, args.max_ops, 100 + i, messages),
        )
        for i in range(args.imap)
    ] + [
        threading.Thread(
            target=smtp_worker,
            args=(rig, smtp_child.port, stats, end, args.max_ops, 200 + i, args.per_session),
        )
        for i in range(args.smtp)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 4 * OP_TIMEOUT)
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        stats.errors.append(f"{stuck} client thread(s) still running after the deadline")
    elapsed = time.monotonic() - start

    # Clients are gone: descriptors must come back to the baseline.
    settle_deadline = time.monotonic() + FD_SETTLE
    while time.monotonic() < settle_deadline and any(
        fds_of(pid) > baseline_fds[name] + FD_SLACK for name, pid in pids.items()
    ):
        time.sleep(0.25)
    final_fds = {name: fds_of(pid) for name, pid in pids.items()}
    sampler.halt.set()
    sampler.join()
    sampler.sample()
    return summarize(args, stats, sampler, elapsed, baseline_fds, final_fds, baseline_rss)


def rss_verdict(samples: list[dict[str, float]], elapsed: float) -> dict[str, Any]:
    window = [s for s in samples if s["t"] >= elapsed * 2 / 3 and s["t"] <= elapsed]
    rss = [s["rss"] for s in samples]
    median_rss = statistics.median(rss) if rss else 0
    if len(window) < 4:
        return {"slope_bytes_per_s": None, "growth_last_third": None, "plateau": True}
    per_second = slope([(s["t"], s["rss"]) for s in window])
    growth = per_second * (window[-1]["t"] - window[0]["t"])
    limit = max(RSS_GROWTH_FRACTION * median_rss, RSS_GROWTH_FLOOR)
    return {
        "slope_bytes_per_s": round(per_second),
        "growth_last_third": round(growth),
        "growth_limit": round(limit),
        "plateau": growth <= limit,
    }


def summarize(
    args: argparse.Namespace,
    stats: Stats,
    sampler: Sampler,
    elapsed: float,
    baseline_fds: dict[str, int],
    final_fds: dict[str, int],
    baseline_rss: dict[str, int],
) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    for op in OPERATIONS:
        proxy = stats.latency.get((op, "proxy"), [])
        direct = stats.latency.get((op, "direct"), [])
        if not proxy:
            continue
        row = {"count": len(proxy)}
        for path, values in (("proxy", proxy), ("direct", direct)):
            row[f"{path}_p50_ms"] = round(percentile(values, 0.5) * 1000, 2)
            row[f"{path}_p99_ms"] = round(percentile(values, 0.99) * 1000, 2)
        row["added_p50_ms"] = round(row["proxy_p50_ms"] - row["direct_p50_ms"], 2)
        row["added_p99_ms"] = round(row["proxy_p99_ms"] - row["direct_p99_ms"], 2)
        ops[op] = row
    proxies: dict[str, Any] = {}
    for name, samples in sampler.samples.items():
        rss = [s["rss"] for s in samples]
        proxies[name] = {
            "rss_baseline": baseline_rss[name],
            "rss_max": max(rss) if rss else None,
            "rss_final": rss[-1] if rss else None,
            "rss": rss_verdict(samples, elapsed),
            "fds_baseline": baseline_fds[name],
            "fds_max": max((s["fds"] for s in samples), default=None),
            "fds_final": final_fds[name],
            "fds_returned": final_fds[name] <= baseline_fds[name] + FD_SLACK,
            "samples": samples,
        }
    checks = {
        "no_errors": not stats.errors,
        "fds_returned": all(p["fds_returned"] for p in proxies.values()),
        "rss_plateau": all(p["rss"]["plateau"] for p in proxies.values()),
        "did_work": stats.ops > 0,
    }
    return {
        "minutes": args.minutes,
        "imap_sessions": args.imap,
        "smtp_senders": args.smtp,
        "elapsed_s": round(elapsed, 2),
        "operations": stats.ops,
        "throughput_ops_per_s": round(stats.ops / elapsed, 2) if elapsed else 0,
        "errors": len(stats.errors),
        "error_samples": stats.errors[:20],
        "ops": ops,
        "proxies": proxies,
        "checks": checks,
        "passed": all(checks.values()),
    }


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=(
            f"soak: {result['imap_sessions']} IMAP sessions + {result['smtp_senders']} SMTP "
            f"senders for {result['elapsed_s']} s: {result['operations']} operations through "
            f"the proxy, {result['throughput_ops_per_s']} ops/s, errors {result['errors']}"
        )
    )
    for column in ("operation", "count", "proxy p50", "direct p50", "added p50"):
        table.add_column(column, justify="right")
    for column in ("proxy p99", "direct p99", "added p99"):
        table.add_column(column, justify="right")
    for op, row in result["ops"].items():
        table.add_row(
            op,
            str(row["count"]),
            *(f"{row[k]:.1f} ms" for k in ("proxy_p50_ms", "direct_p50_ms", "added_p50_ms")),
            *(f"{row[k]:.1f} ms" for k in ("proxy_p99_ms", "direct_p99_ms", "added_p99_ms")),
        )
    console.print(table)
    mib = 1024 * 1024
    resources = Table(title="proxy processes")
    for column in ("proxy", "RSS base", "RSS max", "RSS end", "slope last third", "plateau"):
        resources.add_column(column, justify="right")
    for column in ("fds base", "fds max", "fds end", "returned"):
        resources.add_column(column, justify="right")
    for name, p in result["proxies"].items():
        slope_value = p["rss"]["slope_bytes_per_s"]
        resources.add_row(
            name,
            f"{p['rss_baseline'] / mib:.1f} MiB",
            f"{(p['rss_max'] or 0) / mib:.1f} MiB",
            f"{(p['rss_final'] or 0) / mib:.1f} MiB",
            "n/a" if slope_value is None else f"{slope_value / 1024:+.1f} KiB/s",
            "yes" if p["rss"]["plateau"] else "NO",
            str(p["fds_baseline"]),
            str(p["fds_max"]),
            str(p["fds_final"]),
            "yes" if p["fds_returned"] else "NO",
        )
    console.print(resources)
    for name, p in result["proxies"].items():
        trace = " ".join(
            f"{s['rss'] / mib:.0f}" for s in p["samples"][:: max(1, len(p["samples"]) // 30)]
        )
        console.print(f"RSS over time, {name} (MiB): {trace}")
    for text in result["error_samples"]:
        console.print(f"[red]error[/red] {text}")
    verdict = ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in result["checks"].items())
    console.print(("PASS" if result["passed"] else "FAIL") + f": {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("minutes", type=float, help="how long the load runs (e.g. 0.2)")
    parser.add_argument("--imap", type=int, default=16, help="IMAP sessions (default 16)")
    parser.add_argument("--smtp", type=int, default=4, help="SMTP senders (default 4)")
    parser.add_argument("--max-ops", type=int, default=100_000, help="cap on operations per client")
    parser.add_argument("--messages", type=int, default=20, help="plain and encrypted each")
    parser.add_argument("--per-session", type=int, default=10, help="messages per SMTP session")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("MINUTES must be positive")
    result = run(args)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
