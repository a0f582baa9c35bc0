#!/usr/bin/env python3
"""Fuzz targets for the parsers that read untrusted bytes (issue 8). Not run in CI.

    scripts/fuzz SECONDS [TARGET]      # every target gets an equal share of SECONDS
    scripts/fuzz --replay FILE...      # run saved inputs through their target again

Targets: imap-client, imap-server, fetch, mime, openpgp, cms, config, smtp-data,
smtp-compose.
Each target runs in its own child process under atheris (libFuzzer: ``-timeout`` per
input, ``-rss_limit_mb=2048``); without atheris, a hypothesis-driven random loop with a
SIGALRM per input does the same job for the same time. An exception a target expects
(ImapSyntaxError, CryptoError, ConfigError, PolicyRefusal, ...) is a clean rejection;
anything else is a finding, saved as ``tests/fuzz_findings/<target>-<sha1>.bin`` (or
``--findings DIR``) and printed. Hangs and memory blow-ups are libFuzzer's artifacts
(``timeout-``/``oom-`` under the same prefix). Exit status: 1 if anything was found.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
FINDINGS = ROOT / "tests" / "fuzz_findings"
PER_INPUT_SECONDS = 10
RSS_LIMIT_MB = 2048
MAX_LEN = 64 * 1024
MAX_OUTPUT = 1 << 20  # decrypted plaintext cap, as the proxy sets one for mail from strangers
TARGETS = (
    "imap-client",
    "imap-server",
    "fetch",
    "mime",
    "openpgp",
    "cms",
    "config",
    "smtp-data",
    "smtp-compose",
)


class _Timeout(BaseException):
    """Per-input time limit in the fallback loop (BaseException: no target swallows it)."""


@dataclass
class Target:
    run: Callable[[bytes], None]
    expected: tuple[type[BaseException], ...]
    seeds: list[bytes]


# --------------------------------------------------------------------------- fixtures


def _no_os_keyring() -> None:
    import keyring
    from keyring.backends.fail import Keyring as FailKeyring

    keyring.set_keyring(FailKeyring())


def _smime_identity():
    """A fixed self-signed RSA identity for alice@example.org (made once per process)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from localproxy.crypto.smime import SmimeIdentity

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Fuzz Alice")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("alice@example.org")]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return SmimeIdentity(key, cert)


LETTER = (
    b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\nSubject: hi\r\n"
    b"Message-ID: <1@example.org>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nHello Bob.\r\n"
)
MULTIPART = (
    b"From: a@example.org\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\npreamble\r\n--XX\r\n'
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=C3=A9\r\n--XX\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAECAw==\r\n--XX--\r\n"
)


# --------------------------------------------------------------------------- targets


def _imap_client() -> Target:
    from localproxy.imap.codec import ClientParser, Command, IdleDone, ImapSyntaxError

    def run(data: bytes) -> None:
        step = 1 + (data[0] % 64) if data else 1
        parser = ClientParser(
            max_line_length=4096, max_literal_size=64 * 1024, max_skip_size=1 << 20
        )
        for start in range(0, len(data), step):
            parser.feed(data[start : start + step])
            for event in parser:
                if isinstance(event, Command):
                    if event.verb == b"IDLE":
                        parser.expect_done()
                    elif event.verb == b"AUTHENTICATE":
                        parser.expect_continuation_line()
                    list(event.chunks())
                elif isinstance(event, IdleDone):
                    parser.expect_command()
            if parser.closed:
                break
        assert parser.pending_bytes <= len(data) + 64

    seeds = [
        b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n",
        b"a3 APPEND Drafts (\\Seen) {11}\r\nHello World\r\n",
        b"a4 APPEND Drafts {5+}\r\nHello\r\na5 IDLE\r\nDONE\r\n",
        b"a6 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)])\r\n",
        b"a7 AUTHENTICATE PLAIN\r\nAGFsaWNlAHNlY3JldA==\r\na8 LOGOUT\r\n",
        b'a9 SEARCH CHARSET UTF-8 TEXT {4}\r\ncaf\xc3\r\na10 LIST "" "*"\r\n',
    ]
    return Target(run, (ImapSyntaxError,), seeds)


def _imap_server() -> Target:
    from localproxy.imap.codec import (
        ImapSyntaxError,
        RawFetch,
        ServerParser,
        Untagged,
        fetch_item_spans,
        parse_fetch_response,
    )

    def run(data: bytes) -> None:
        step = 1 + (data[0] % 64) if data else 1
        lazy = bool(data) and data[-1] & 1 == 1
        parser = ServerParser(max_line_length=8192, max_literal_size=64 * 1024, lazy_fetch=lazy)
        for start in range(0, len(data), step):
            parser.feed(data[start : start + step])
            for event in parser:
                if isinstance(event, RawFetch):
                    event = event.parse()
                if isinstance(event, Untagged) and event.name == b"FETCH":
                    with contextlib.suppress(ImapSyntaxError):
                        parse_fetch_response(event)
                    with contextlib.suppress(ImapSyntaxError):
                        fetch_item_spans(event)
            if parser.closed:
                break

    seeds = [
        b"* OK [CAPABILITY IMAP4rev1 IDLE LITERAL+] ready\r\n",
        b"* 1 FETCH (UID 7 FLAGS (\\Seen) RFC822.SIZE 12 BODY[] {12}\r\nHello World!)\r\n",
        b'* 2 FETCH (ENVELOPE ("d" "s" (("A" NIL "a" "x.org")) NIL NIL NIL NIL NIL NIL "<i>"))\r\n',
        b"* 3 EXISTS\r\n* 1 RECENT\r\n+ idling\r\na1 OK [READ-WRITE] done\r\n",
        b"* 4 FETCH (BODY[1.MIME] {5}\r\nabcde BINARY[2]<0> ~{3}\r\n\x00\x01\x02)\r\n",
        b'* LIST (\\HasNoChildren) "/" {5}\r\nDraft\r\n* BYE bye\r\n',
    ]
    return Target(run, (ImapSyntaxError,), seeds)


def _fetch() -> Target:
    from localproxy.imap.codec import ImapSyntaxError, parse_fetch_request, tokenize

    def run(data: bytes) -> None:
        tokens = tokenize(data, strict=bool(data) and data[0] & 1 == 1)
        request = parse_fetch_request(tokens)
        for item in request.items:
            item.request_bytes()
            item.response_name()
            _ = item.content_derived, item.sets_seen
        if not request.sequence_set.saved:  # "$": only the server can resolve it
            request.sequence_set.resolve(1000)
        request.sequence_set.to_bytes()

    seeds = [
        b"1:* (FLAGS UID)",
        b"$ (FLAGS)",
        b"1,3:5 ALL",
        b"2 (BODY.PEEK[HEADER.FIELDS.NOT (Subject)]<0.100> BINARY[1.2] RFC822.SIZE)",
        b"* (BODY[1.2.MIME] BODY[TEXT] BINARY.SIZE[1])",
        b"1 FULL (CHANGEDSINCE 12345)",
        b"5:3 (BODYSTRUCTURE ENVELOPE INTERNALDATE BODY[]<10.20>)",
    ]
    return Target(run, (ImapSyntaxError,), seeds)


def _mime() -> Target:
    from localproxy.crypto import pgpmime
    from localproxy.crypto.errors import CryptoError
    from localproxy.crypto.openpgp import default_engine
    from localproxy.mime import parse_entity

    engine = default_engine()
    alice = engine.generate_key(["Alice <alice@example.org>"])
    public = engine.public_only(alice.data)

    def run(data: bytes) -> None:
        entity = parse_entity(data)
        _ = entity.content_type, entity.params
        for part in entity.parts:
            _ = part.body
        pgpmime.classify(entity)
        result = pgpmime.unwrap(data, engine, [alice.data], [public], max_output=MAX_OUTPUT)
        assert isinstance(result.message, bytes)

    encrypted = pgpmime.encrypt_message(LETTER, engine, [public], alice.data)
    signed = pgpmime.sign_message(LETTER, engine, alice.data)
    inline = LETTER.replace(
        b"Hello Bob.\r\n", engine.encrypt(b"Hello Bob.\r\n", [public]).replace(b"\n", b"\r\n")
    )
    seeds = [LETTER, MULTIPART, encrypted, signed, inline]
    return Target(run, (CryptoError,), seeds)


def _openpgp() -> Target:
    from localproxy.crypto.errors import CryptoError
    from localproxy.crypto.openpgp import default_engine

    engine = default_engine()
    alice = engine.generate_key(["Alice <alice@example.org>"])
    public = engine.public_only(alice.data)

    def run(data: bytes) -> None:
        with contextlib.suppress(CryptoError):
            engine.parse_certs(data)
        engine.decrypt(data, [alice.data], [public], max_output=MAX_OUTPUT)

    seeds = [
        public,
        alice.data,
        engine.encrypt(b"hello", [public], alice.data, armor=True),
        engine.encrypt(b"hello", [public], armor=False),
    ]
    return Target(run, (CryptoError,), seeds)


def _cms() -> Target:
    from localproxy.crypto import smime
    from localproxy.crypto.errors import CryptoError

    identity = _smime_identity()
    body = b"Content-Type: text/plain\r\n\r\nHello.\r\n"

    def run(data: bytes) -> None:
        with contextlib.suppress(CryptoError):
            smime.decrypt(data, [identity], max_output=MAX_OUTPUT)
        smime.verify_entity(data, [identity.cert], max_output=MAX_OUTPUT)

    seeds = [
        smime.encrypt(body, [identity.cert]),
        smime.encrypt_der(body, [identity.cert]),
        smime.sign(body, identity.cert, identity.key, detached=True),
        smime.sign(body, identity.cert, identity.key, detached=False),
    ]
    return Target(run, (CryptoError,), seeds)


def _config() -> Target:
    from localproxy.config import ConfigError, parse_config

    def run(data: bytes) -> None:
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            return
        parse_config(raw, Path("fuzz.toml"))

    example = (ROOT / "config.example.toml").read_bytes()
    seeds = [
        example,
        b'[proxy]\ndata_dir = "/tmp/x"\n[[account]]\nname = "a"\naddresses = ["a@x.org"]\n'
        b'[account.upstream.imap]\nhost = "imap.x.org"\nport = 993\nsecurity = "tls"\n'
        b'[account.upstream.smtp]\nhost = "smtp.x.org"\nport = 465\nsecurity = "tls"\n',
        b'[policy]\nencrypt = "always"\nsign = "never"\n[policy.rules."b@x.org"]\n'
        b'encrypt = "never"\n',
    ]
    return Target(run, (ConfigError,), seeds)


def _smtp_data() -> Target:
    """The DATA receiver, fed the input cut where its first byte says: it must find the
    same end and the same message however the input is cut."""
    from localproxy.smtp.data import DataReceiver

    def receive(stream: bytes, step: int) -> tuple[int | None, bytes | None]:
        receiver = DataReceiver(4096, line_limit=200)
        for start in range(0, len(stream), step):
            end = receiver.feed(stream[start : start + step])
            if end is not None:
                content = None if receiver.problem else receiver.content()
                return start + end, content
        return None, None

    def run(data: bytes) -> None:
        step, stream = (data[0] if data else 1) or 1, data[1:]
        assert receive(stream, step) == receive(stream, len(stream) or 1)

    seeds = [b"\x07" + LETTER.replace(b"\n", b"\r\n") + b".\r\n", b"\x01.\r\n", b"\x03..x\r\n.\r\n"]
    return Target(run, (), seeds)


def _smtp_compose() -> Target:
    from localproxy.config import parse_config
    from localproxy.crypto.openpgp import default_engine
    from localproxy.keys.store import KeyStore
    from localproxy.smtp.compose import PolicyRefusal, compose

    _no_os_keyring()
    engine = default_engine()
    work = Path(tempfile.mkdtemp(prefix="fuzz-compose-"))
    server = {"host": "mail.example.org", "port": 465, "security": "tls"}
    config = parse_config(
        {
            "proxy": {"data_dir": str(work / "data")},
            "account": [
                {
                    "name": "alice",
                    "addresses": ["alice@example.org"],
                    "upstream": {"imap": server | {"port": 993}, "smtp": server},
                }
            ],
        }
    )
    store = KeyStore(work / "data", engine)
    store.generate("alice", ("alice@example.org",))
    bob = engine.generate_key(["Bob <bob@example.org>"])
    store.import_keys(engine.public_only(bob.data), "import:fuzz")
    account = config.accounts[0]

    def run(data: bytes) -> None:
        recipients = ["bob@example.org"] + (["carol@example.org"] if data[:1] == b"C" else [])
        for copy in compose(
            data, recipients, account=account, policy=config.policy, store=store, engine=engine
        ):
            assert isinstance(copy.message, bytes | bytearray)

    seeds = [LETTER, MULTIPART, b"C" + LETTER[1:], b"Subject: x\n\nbare lf\n"]
    return Target(run, (PolicyRefusal,), seeds)


FACTORIES: dict[str, Callable[[], Target]] = {
    "imap-client": _imap_client,
    "imap-server": _imap_server,
    "fetch": _fetch,
    "mime": _mime,
    "openpgp": _openpgp,
    "cms": _cms,
    "config": _config,
    "smtp-data": _smtp_data,
    "smtp-compose": _smtp_compose,
}


# --------------------------------------------------------------------------- one input


def checked(name: str, target: Target, findings: Path) -> Callable[[bytes], None]:
    """The target with its expected exceptions swallowed and anything else recorded."""

    def one(data: bytes) -> None:
        try:
            target.run(data)
        except target.expected:
            pass
        except _Timeout:
            record(name, data, findings, "timeout", f"over {PER_INPUT_SECONDS} s")
        except RecursionError as exc:
            record(name, data, findings, "crash", f"RecursionError: {exc}")
        except Exception:
            record(name, data, findings, "crash", traceback.format_exc())

    return one


def record(name: str, data: bytes, findings: Path, kind: str, detail: str) -> None:
    findings.mkdir(parents=True, exist_ok=True)
    path = findings / f"{name}-{hashlib.sha1(data).hexdigest()}.bin"
    fresh = not path.exists()
    path.write_bytes(data)
    if fresh:
        print(f"\n=== FINDING ({kind}) in {name}: {path}", file=sys.stderr)
        print(f"input ({len(data)} bytes): {data[:300]!r}", file=sys.stderr)
        print(detail, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- engines


def have_atheris() -> bool:
    if os.environ.get("LOCALPROXY_FUZZ_ENGINE") == "hypothesis":
        return False
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def run_atheris(name: str, seconds: float, findings: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["localproxy"]):
        import localproxy.config
        import localproxy.crypto.pgpmime
        import localproxy.crypto.smime
        import localproxy.imap.codec
        import localproxy.mime
        import localproxy.smtp.compose  # noqa: F401
    target = FACTORIES[name]()
    one = checked(name, target, findings)
    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for index, seed in enumerate(target.seeds):
        (corpus / f"seed-{index}").write_bytes(seed)
    findings.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-timeout={PER_INPUT_SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={findings}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def run_hypothesis(name: str, seconds: float, findings: Path) -> None:
    """Fallback: random and mutated-seed inputs from hypothesis for ``seconds``."""
    import resource

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    limit = RSS_LIMIT_MB * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit * 4, limit * 4))
    target = FACTORIES[name]()
    one = checked(name, target, findings)
    end = time.monotonic() + seconds
    count = 0

    def alarm(*_: object) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)

    class TimeUp(Exception):
        pass

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(target.seeds)))
        for _ in range(draw(st.integers(0, 8))):
            op = draw(st.integers(0, 2))
            pos = draw(st.integers(0, len(data)))
            if op == 0 and data:
                del data[pos : pos + draw(st.integers(1, 16))]
            elif op == 1:
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif data:
                data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        return bytes(data)

    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(mutated(), st.binary(max_size=4096)))
    def loop(data: bytes) -> None:
        nonlocal count
        if time.monotonic() > end:
            raise TimeUp
        count += 1
        signal.alarm(PER_INPUT_SECONDS)
        try:
            one(data)
        finally:
            signal.alarm(0)

    with contextlib.suppress(TimeUp):
        loop()
    print(f"#{count} DONE (hypothesis fallback)", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- driver


def child(name: str, seconds: float, findings: Path) -> int:
    sys.setrecursionlimit(5000)
    if have_atheris():
        run_atheris(name, seconds, findings)
    else:
        run_hypothesis(name, seconds, findings)
    return 0


_STATS = re.compile(r"^#(\d+)\s+DONE\s+(?:cov: (\d+)\s+ft: (\d+)\s+corp: (\d+))?", re.M)


def drive(seconds: float, names: list[str], findings: Path, json_path: Path | None) -> int:
    engine = "atheris" if have_atheris() else "hypothesis (atheris unavailable)"
    share = seconds / len(names)
    print(f"fuzz: {engine}; {len(names)} target(s), {share:.1f} s each; findings -> {findings}")
    before = set(findings.glob("*")) if findings.exists() else set()
    rows = []
    for name in names:
        started = time.monotonic()
        child_argv = [sys.executable, str(SCRIPT), str(share), "--child"]
        with tempfile.TemporaryFile(mode="w+") as log:
            proc = subprocess.run(
                [*child_argv, name, "--findings", str(findings)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=share + 300,
                check=False,
                env=os.environ | {"PYTHONPATH": str(ROOT)},
            )
            log.seek(0)
            text = log.read()
        found = _STATS.search(text)
        execs = int(found.group(1)) if found else 0
        cov = int(found.group(2)) if found and found.group(2) else None
        new = sorted(set(findings.glob(f"{name}-*")) - before) if findings.exists() else []
        if proc.returncode != 0:
            tail = "\n".join(text.splitlines()[-40:])
            print(f"--- {name}: child exited {proc.returncode}\n{tail}")
        for block in finding_blocks(text):
            print(block)
        elapsed = time.monotonic() - started
        rows.append(
            {
                "target": name,
                "execs": execs,
                "execs_per_s": round(execs / elapsed, 1) if elapsed else 0,
                "coverage": cov,
                "findings": [str(p) for p in new],
                "exit": proc.returncode,
            }
        )
        print(
            f"{name:13} execs {execs:8}  {execs / elapsed:8.1f}/s  cov {cov!s:>6}  "
            f"findings {len(new)}  exit {proc.returncode}",
            flush=True,
        )
    bad = [r for r in rows if r["findings"] or r["exit"] != 0]
    with contextlib.suppress(OSError):
        findings.rmdir()  # only when empty: nothing found, leave no trace
    if json_path is not None:
        json_path.write_text(json.dumps({"engine": engine, "targets": rows}, indent=2))
    print("fuzz: " + ("FINDINGS: " + ", ".join(r["target"] for r in bad) if bad else "clean"))
    return 1 if bad else 0


def finding_blocks(text: str, max_lines: int = 40) -> list[str]:
    """Each finding the child printed: its header, input and traceback (libFuzzer's status
    lines start with '#' or 'INFO', and end a block)."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("=== FINDING"):
            blocks.append([line])
        elif blocks and line.startswith(("#", "INFO:", "=== ")):
            blocks.append([])  # a closed block: the next lines are not part of a finding
        elif blocks and blocks[-1] and len(blocks[-1]) < max_lines:
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks if b]


def replay(files: list[Path]) -> int:
    failed = 0
    for path in files:
        name = next((t for t in TARGETS if path.name.startswith(t + "-")), None)
        if name is None:
            print(f"{path}: no target named in the file name")
            failed += 1
            continue
        target = FACTORIES[name]()
        try:
            target.run(path.read_bytes())
        except target.expected as exc:
            print(f"{path}: rejected cleanly ({type(exc).__name__})")
        except Exception:
            print(f"{path}: STILL FAILS\n{traceback.format_exc()}")
            failed += 1
        else:
            print(f"{path}: handled")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seconds", nargs="?", type=float)
    parser.add_argument("target", nargs="?", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--findings", type=Path, default=FINDINGS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--replay", nargs="+", type=Path)
    parser.add_argument("--child", choices=TARGETS, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args(argv)
    if args.child:
        return child(args.child, args.seconds or 10, args.findings)
    if args.replay:
        return replay(args.replay)
    if args.seconds is None:
        parser.error("SECONDS is required")
    names = list(TARGETS) if args.target == "all" else [args.target]
    return drive(args.seconds, names, args.findings.resolve(), args.json)


if __name__ == "__main__":
    sys.exit(main())
