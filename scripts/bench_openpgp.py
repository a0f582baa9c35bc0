#!/usr/bin/env python3
"""Encrypt/decrypt time and peak memory: localproxy's OpenPGP engine vs gpg and sq.

Every measurement runs in a fresh child process; peak memory is that process's
maximum resident set size (for gpg, the gpg-agent that does the private-key step is
a separate, long-running process and is not counted). All three use the same
Ed25519/Cv25519 key made by the engine and the same random (incompressible) input.
Our keys ask for no compression, so no tool compresses.

    .venv/bin/python scripts/bench_openpgp.py                 # 20 KB and 25 MB, 3 runs
    .venv/bin/python scripts/bench_openpgp.py --sizes 1M --repeat 5 --sign
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"K": 1000, "M": 1000**2, "KI": 1024, "MI": 1024**2}


@dataclass(frozen=True)
class Sample:
    seconds: float  # the operation itself (engine) or the whole process (tools)
    peak_kb: int  # maximum resident set size of the process
    base_kb: int  # engine only: peak before the operation (interpreter, input)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix in sorted(UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * UNITS[suffix])
    return int(text)


GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, bytes]:
    """Wall time, peak RSS (KiB) and stdout of one child process.

    On Linux a child's ru_maxrss starts from its parent's RSS at fork/exec, so the
    child is started by GNU time, a small process whose own child is measured
    cleanly. Without GNU time, wait4() is used and tool peaks read high.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        wrapped = [GNU_TIME, "-f", "%M", "-o", report.name, *argv] if GNU_TIME else argv
        start = time.perf_counter()
        child = subprocess.run(wrapped, capture_output=True, env=env, timeout=600, check=False)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])}... failed: {child.stderr[-500:]!r}")
        peak = int(report.read().split()[-1]) if GNU_TIME else 0
    return seconds, peak, child.stdout


# --------------------------------------------------------------------------- engine worker


def worker(operation: str, key: Path, source: Path, target: Path) -> None:
    """Runs inside the child: one engine operation, timed without interpreter start-up.
    Signing uses the secret key next to key (key.sec), verification key.pub."""
    import resource

    from localproxy.crypto.openpgp import default_engine

    engine = default_engine()
    key_data, data = key.read_bytes(), source.read_bytes()
    signing = os.environ.get("BENCH_SIGN") == "1"
    secret, public = key.with_suffix(".sec").read_bytes(), key.with_suffix(".pub").read_bytes()
    engine.parse_certs(key_data)  # warm up: imports, caches
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if operation == "encrypt":
        out = engine.encrypt(data, [key_data], signer=secret if signing else None, armor=False)
    else:
        result = engine.decrypt(data, [key_data], [public] if signing else ())
        assert not signing or [s.status.value for s in result.signatures] == ["valid"]
        out = result.plaintext
    seconds = time.perf_counter() - start
    target.write_bytes(out)
    print(json.dumps({"seconds": seconds, "base_kb": base}))


# --------------------------------------------------------------------------- tools


@dataclass
class Setup:
    work: Path
    secret: Path
    public: Path
    fingerprint: str
    gnupg: Path | None
    sign: bool = False


def prepare(work: Path) -> Setup:
    sys.path.insert(0, str(ROOT))
    from localproxy.crypto.openpgp import default_engine

    engine = default_engine()
    info = engine.generate_key(["Bench <bench@example.org>"])
    secret, public = work / "key.sec", work / "key.pub"
    secret.write_bytes(info.data)
    public.write_bytes(engine.public_only(info.data))
    gnupg = None
    if shutil.which("gpg"):
        gnupg = work / "gnupg"
        gnupg.mkdir(mode=0o700)
        subprocess.run(
            ["gpg", "--homedir", gnupg, "--batch", "--import", secret],
            capture_output=True,
            check=True,
            timeout=60,
        )
    return Setup(work, secret, public, info.fingerprint, gnupg)


def engine_op(setup: Setup, operation: str, source: Path, target: Path) -> Sample:
    key = setup.public if operation == "encrypt" else setup.secret
    argv = [sys.executable, __file__, "--worker", operation, str(key), str(source), str(target)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_SIGN": "1" if setup.sign else "0"}
    _, peak, stdout = run_measured(argv, env=env)
    report = json.loads(stdout)
    return Sample(report["seconds"], peak, report["base_kb"])


def gpg_op(setup: Setup, operation: str, source: Path, target: Path) -> Sample:
    assert setup.gnupg is not None
    base = ["gpg", "--homedir", str(setup.gnupg), "--batch", "--yes", "--trust-model", "always"]
    if operation == "encrypt":
        argv = [*base, "-r", setup.fingerprint, "-o", str(target), "-e", str(source)]
        if setup.sign:
            argv[-1:-1] = ["--pinentry-mode", "loopback", "-u", setup.fingerprint, "-s"]
    else:
        argv = [*base, "--pinentry-mode", "loopback", "-o", str(target), "-d", str(source)]
    seconds, peak, _ = run_measured(argv)
    return Sample(seconds, peak, 0)


def sq_op(setup: Setup, operation: str, source: Path, target: Path) -> Sample:
    if operation == "encrypt":
        argv = ["sq", "--force", "encrypt", "--binary", "--recipient-cert", str(setup.public)]
        argv += ["--signer-key", str(setup.secret)] if setup.sign else []
    else:
        argv = ["sq", "--force", "decrypt", "--recipient-key", str(setup.secret)]
        argv += ["--signer-cert", str(setup.public)] if setup.sign else []
    seconds, peak, _ = run_measured([*argv, "-o", str(target), str(source)])
    return Sample(seconds, peak, 0)


TOOLS: dict[str, tuple[str | None, Callable[[Setup, str, Path, Path], Sample]]] = {
    "engine": (None, engine_op),
    "gpg": ("gpg", gpg_op),
    "sq": ("sq", sq_op),
}


def bench(setup: Setup, size: int, tools: list[str], repeat: int) -> list[str]:
    plain = setup.work / f"plain-{size}"
    plain.write_bytes(os.urandom(size))
    rows = []
    for name in tools:
        binary, op = TOOLS[name]
        if binary and not shutil.which(binary):
            rows.append(f"{name:<7} {size:>10,}  (not installed)")
            continue
        cipher, back = setup.work / f"{name}-{size}.pgp", setup.work / f"{name}-{size}.out"
        encrypted = [op(setup, "encrypt", plain, cipher) for _ in range(repeat)]
        decrypted = [op(setup, "decrypt", cipher, back) for _ in range(repeat)]
        if back.read_bytes() != plain.read_bytes():
            raise RuntimeError(f"{name}: round trip changed the data")
        rows.append(_row(name, size, encrypted, decrypted))
    return rows


def _row(name: str, size: int, encrypted: list[Sample], decrypted: list[Sample]) -> str:
    def cell(samples: list[Sample]) -> str:
        seconds = statistics.median(s.seconds for s in samples) * 1000
        peak = max(s.peak_kb for s in samples) / 1024
        base = max(s.base_kb for s in samples) / 1024
        extra = f" (+{peak - base:5.1f})" if base else "         "
        return f"{seconds:9.1f} ms {peak:7.1f} MiB{extra}"

    return f"{name:<7} {size:>10,}  {cell(encrypted)}  {cell(decrypted)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20K,25M", help="comma-separated, e.g. 20K,1M,25M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tools", default="engine,gpg,sq")
    parser.add_argument("--sign", action="store_true", help="sign and verify as well")
    parser.add_argument("--worker", nargs=4, metavar=("OP", "KEY", "IN", "OUT"), help="internal")
    args = parser.parse_args()
    if args.worker:
        operation, key, source, target = args.worker
        worker(operation, Path(key), Path(source), Path(target))
        return
    with tempfile.TemporaryDirectory(prefix="bench-openpgp-") as tmp:
        setup = prepare(Path(tmp))
        setup.sign = args.sign
        try:
            print("engine: time of the operation alone; gpg, sq: whole process (incl. start-up)")
            print("peak = max RSS of the process; (+n) = engine growth during the operation")
            if not GNU_TIME:
                print("GNU time not found: peak memory is not measured")
            print()
            print(f"{'tool':<7} {'bytes':>10}  {'encrypt':>28}  {'decrypt':>28}")
            for size in (parse_size(s) for s in args.sizes.split(",")):
                for row in bench(setup, size, args.tools.split(","), args.repeat):
                    print(row, flush=True)
        finally:
            if setup.gnupg and shutil.which("gpgconf"):
                subprocess.run(
                    ["gpgconf", "--homedir", setup.gnupg, "--kill", "all"],
                    capture_output=True,
                    check=False,
                    timeout=60,
                )


if __name__ == "__main__":
    main()
