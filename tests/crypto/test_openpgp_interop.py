"""Interoperability of the OpenPGP engines with GnuPG, Sequoia's sq and RNP (Thunderbird).

Each tool runs in its own temporary home, every invocation under a timeout; a tool
that is not installed is skipped. Tool keys are made by the tool (GnuPG and sq:
Ed25519/Cv25519, RNP: its default RSA-2048), so both of our decryption paths and
both key types are exercised.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from localproxy.crypto.errors import IntegrityError
from localproxy.crypto.openpgp import ENGINES, OpenPGPEngine, SignatureStatus
from tests.crypto import packets

pytestmark = pytest.mark.interop

TIMEOUT = 60
MESSAGE = "Interop: Grüße, ünïcödé and a trailing newline\n".encode() * 20
VALID = SignatureStatus.VALID


def call(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a tool, bounded in time, never failing by itself."""
    return subprocess.run(
        [str(a) for a in args],
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )


def run(*args: str | Path, stdin: bytes | None = None) -> bytes:
    """stdout of a tool that must succeed; a failure shows the tool's stderr."""
    result = call(*args, stdin=stdin)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}: {result.stderr!r}")
    return result.stdout


@dataclass
class Tool:
    """One external OpenPGP implementation with its own key."""

    name: str
    home: Path
    fingerprint: str = ""
    secret: bytes = b""
    public: bytes = b""
    extra: dict[str, str] = field(default_factory=dict)

    def file(self, name: str, data: bytes) -> Path:
        path = self.home / name
        path.write_bytes(data)
        return path

    # Each tool implements these.
    def generate(self, user_id: str) -> None:
        raise NotImplementedError

    def import_cert(self, cert: bytes) -> None:
        raise NotImplementedError

    def encrypt_sign(self, data: bytes, recipient: bytes) -> bytes:
        raise NotImplementedError

    def decrypt_verify(self, message: bytes, signer: bytes) -> tuple[bytes, bool]:
        raise NotImplementedError

    def sign_detached(self, data: bytes) -> bytes:
        raise NotImplementedError

    def verify_detached(self, data: bytes, signature: bytes, signer: bytes) -> bool:
        raise NotImplementedError

    def knows(self, fingerprint: str) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class GnuPG(Tool):
    BASE = (
        "--batch",
        "--yes",
        "--no-tty",
        "--pinentry-mode",
        "loopback",
        "--trust-model",
        "always",
    )

    def gpg(self, *args: str | Path, stdin: bytes | None = None) -> bytes:
        return run("gpg", "--homedir", self.home, *self.BASE, *args, stdin=stdin)

    def try_gpg(
        self, *args: str | Path, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return call("gpg", "--homedir", self.home, *self.BASE, *args, stdin=stdin)

    def generate(self, user_id: str) -> None:
        self.gpg(
            "--passphrase", "", "--quick-gen-key", user_id, "future-default", "default", "never"
        )
        listing = self.gpg("--list-keys", "--with-colons").decode()
        self.fingerprint = re.findall(r"^fpr:+([0-9A-F]{40}):", listing, re.M)[0]
        self.public = self.gpg("--export", self.fingerprint)
        self.secret = self.gpg("--passphrase", "", "--export-secret-keys", self.fingerprint)

    def import_cert(self, cert: bytes) -> None:
        self.gpg("--import", stdin=cert)

    def encrypt_sign(self, data: bytes, recipient: bytes) -> bytes:
        self.import_cert(recipient)
        (their,) = _fingerprints(recipient)
        return self.gpg(
            "--passphrase", "", "-u", self.fingerprint, "-r", their, "--sign", "--encrypt",
            stdin=data,
        )  # fmt: skip

    def decrypt_verify(self, message: bytes, signer: bytes) -> tuple[bytes, bool]:
        self.import_cert(signer)
        (their,) = _fingerprints(signer)
        result = self.try_gpg("--status-fd", "2", "--passphrase", "", "--decrypt", stdin=message)
        return result.stdout, _gpg_validsig(result.stderr, their)

    def sign_detached(self, data: bytes) -> bytes:
        return self.gpg("--passphrase", "", "-u", self.fingerprint, "--detach-sign", stdin=data)

    def verify_detached(self, data: bytes, signature: bytes, signer: bytes) -> bool:
        self.import_cert(signer)
        (their,) = _fingerprints(signer)
        sig, payload = self.file("v.sig", signature), self.file("v.dat", data)
        return _gpg_validsig(
            self.try_gpg("--status-fd", "1", "--verify", sig, payload).stdout, their
        )

    def knows(self, fingerprint: str) -> bool:
        listing = self.try_gpg("--list-keys", "--with-colons", fingerprint).stdout.decode()
        encryption_subkey = re.search(r"^sub:[-u]:(?:[^:]*:){9}e:", listing, re.M)
        return f"fpr:::::::::{fingerprint}:" in listing and encryption_subkey is not None

    def stop(self) -> None:
        if shutil.which("gpgconf"):
            subprocess.run(
                ["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )


def _gpg_validsig(status: bytes, primary: str) -> bool:
    """GnuPG's VALIDSIG line names the primary key fingerprint as its last field."""
    for line in status.decode(errors="replace").splitlines():
        if line.startswith("[GNUPG:] VALIDSIG ") and line.split()[-1] == primary:
            return True
    return False


class Sq(Tool):
    """sq 0.27 is stateless: keys and certificates are files."""

    def generate(self, user_id: str) -> None:
        key = self.home / "key.pgp"
        run("sq", "key", "generate", "--userid", user_id, "--export", key)
        self.secret = key.read_bytes()
        self.public = run("sq", "key", "extract-cert", "--binary", key)
        (self.fingerprint,) = _fingerprints(self.public)

    def import_cert(self, cert: bytes) -> None:
        self.extra["cert"] = str(self.file("imported.pgp", cert))

    def encrypt_sign(self, data: bytes, recipient: bytes) -> bytes:
        return run(
            "sq", "encrypt", "--recipient-cert", self.file("to.pgp", recipient),
            "--signer-key", self.home / "key.pgp", stdin=data,
        )  # fmt: skip

    def decrypt_verify(self, message: bytes, signer: bytes) -> tuple[bytes, bool]:
        result = call(
            "sq", "decrypt", "--recipient-key", self.home / "key.pgp",
            "--signer-cert", self.file("from.pgp", signer), "--signatures", "1",
            stdin=message,
        )  # fmt: skip
        return result.stdout, result.returncode == 0 and b"1 good signature" in result.stderr

    def sign_detached(self, data: bytes) -> bytes:
        return run("sq", "sign", "--detached", "--signer-key", self.home / "key.pgp", stdin=data)

    def verify_detached(self, data: bytes, signature: bytes, signer: bytes) -> bool:
        result = call(
            "sq", "verify", "--detached", self.file("v.sig", signature),
            "--signer-cert", self.file("v.pgp", signer), self.file("v.dat", data),
        )  # fmt: skip
        return result.returncode == 0

    def knows(self, fingerprint: str) -> bool:
        out = run("sq", "inspect", self.extra["cert"]).decode()
        return fingerprint in out.replace(" ", "") and "transport encryption" in out


class Rnp(Tool):
    def rnp(self, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return call("rnp", "--homedir", self.home, "--password", "", *args)

    def rnpkeys(self, *args: str | Path) -> bytes:
        return run("rnpkeys", "--homedir", self.home, *args)

    def generate(self, user_id: str) -> None:
        self.rnpkeys("--generate-key", "--userid", user_id, "--password", "")
        self.extra["uid"] = user_id
        self.public = self.rnpkeys("--export-key", user_id)
        self.secret = self.rnpkeys("--export-key", "--secret", user_id)
        (self.fingerprint,) = _fingerprints(self.public)

    def import_cert(self, cert: bytes) -> None:
        self.rnpkeys("--import", self.file("import.pgp", cert))

    def encrypt_sign(self, data: bytes, recipient: bytes) -> bytes:
        self.import_cert(recipient)
        (their,) = _fingerprints(recipient)
        out = self.home / "out.pgp"
        source = self.file("plain.txt", data)
        result = self.rnp("--encrypt", "--sign", "-r", their, "-u", self.fingerprint,
                          "--overwrite", "--output", out, source)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return out.read_bytes()

    def decrypt_verify(self, message: bytes, signer: bytes) -> tuple[bytes, bool]:
        self.import_cert(signer)
        result = self.rnp("--decrypt", "--output", "-", self.file("in.pgp", message))
        verified = b"Signature(s) verified successfully" in result.stderr
        return result.stdout, result.returncode == 0 and verified

    def sign_detached(self, data: bytes) -> bytes:
        source, sig = self.file("d.txt", data), self.home / "d.txt.sig"
        result = self.rnp("--sign", "--detach", "-u", self.fingerprint, "--overwrite",
                          "--output", sig, source)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return sig.read_bytes()

    def verify_detached(self, data: bytes, signature: bytes, signer: bytes) -> bool:
        self.import_cert(signer)
        sig, source = self.file("v.sig", signature), self.file("v.dat", data)
        result = self.rnp("--verify", sig, "--source", source)
        return result.returncode == 0 and b"Signature(s) verified successfully" in result.stderr

    def knows(self, fingerprint: str) -> bool:
        listing = call("rnpkeys", "--homedir", self.home, "--list-keys", fingerprint)
        return fingerprint.lower() in (listing.stdout + listing.stderr).decode().lower()


TOOLS: dict[str, tuple[type[Tool], str]] = {
    "gpg": (GnuPG, "gpg"),
    "sq": (Sq, "sq"),
    "rnp": (Rnp, "rnp"),
}


def _fingerprints(cert: bytes) -> list[str]:
    """Primary fingerprints of a binary or armored keyring, via the default engine."""
    return [info.fingerprint for info in ENGINES["sequoia"]().parse_certs(cert)]


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> OpenPGPEngine:
    return ENGINES[request.param]()


class Ours(NamedTuple):
    """A key made by the engine under test."""

    secret: bytes
    public: bytes
    fingerprint: str


@pytest.fixture(scope="module")
def ours(engine: OpenPGPEngine) -> Ours:
    info = engine.generate_key(["Local Proxy <proxy@example.org>"])
    return Ours(info.data, engine.public_only(info.data), info.fingerprint)


@pytest.fixture(scope="module", params=sorted(TOOLS))
def tool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tool]:
    kind, binary = TOOLS[request.param]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")
    # Short paths: gpg-agent's socket path must stay under the 108-byte limit.
    home = Path(tmp_path_factory.mktemp(request.param, numbered=True))
    home.chmod(0o700)
    instance = kind(request.param, home)
    instance.generate(f"{request.param} user <{request.param}@example.net>")
    yield instance
    instance.stop()


# --------------------------------------------------------------------------- both ways


def test_tool_reads_our_signed_message(engine: OpenPGPEngine, ours: Ours, tool: Tool) -> None:
    secret, public, _ = ours
    message = engine.encrypt(MESSAGE, [tool.public, public], signer=secret)
    plaintext, verified = tool.decrypt_verify(message, public)
    assert plaintext == MESSAGE
    assert verified, f"{tool.name} did not report a good signature by our key"


def test_we_read_the_tools_signed_message(engine: OpenPGPEngine, ours: Ours, tool: Tool) -> None:
    secret, public, _ = ours
    message = tool.encrypt_sign(MESSAGE, public)
    result = engine.decrypt(message, [secret], [tool.public])
    assert result.plaintext == MESSAGE
    (signature,) = result.signatures
    assert signature.status is VALID and signature.fingerprint == tool.fingerprint
    (unknown,) = engine.decrypt(message, [secret]).signatures
    assert unknown.status is SignatureStatus.UNKNOWN_KEY


def test_tool_keys_import_cleanly(engine: OpenPGPEngine, tool: Tool) -> None:
    (public,) = engine.parse_certs(tool.public)
    assert public.fingerprint == tool.fingerprint and not public.has_secret
    assert public.emails == (f"{tool.name}@example.net",)
    assert public.can_encrypt and public.can_sign and not public.revoked
    (secret,) = engine.parse_certs(tool.secret)
    assert secret.has_secret and not secret.secret_locked
    # The tool's secret key works in our engine too (RSA for RNP, Cv25519 otherwise).
    message = engine.encrypt(MESSAGE, [tool.public], signer=tool.secret)
    result = engine.decrypt(message, [tool.secret], [tool.public])
    assert result.plaintext == MESSAGE and [s.status for s in result.signatures] == [VALID]


def test_tool_imports_our_key(engine: OpenPGPEngine, ours: Ours, tool: Tool) -> None:
    _, public, fingerprint = ours
    tool.import_cert(engine.armor(public, kind="public-key"))
    assert tool.knows(fingerprint)


def test_detached_signatures_both_ways(engine: OpenPGPEngine, ours: Ours, tool: Tool) -> None:
    secret, public, fingerprint = ours
    ours_sig = engine.sign_detached(MESSAGE, secret)
    assert tool.verify_detached(MESSAGE, ours_sig, public)
    assert not tool.verify_detached(MESSAGE + b"x", ours_sig, public)
    theirs = tool.sign_detached(MESSAGE)
    (good,) = engine.verify_detached(MESSAGE, theirs, [tool.public])
    assert good.status is VALID and good.fingerprint == tool.fingerprint
    (bad,) = engine.verify_detached(MESSAGE + b"x", theirs, [tool.public])
    assert bad.status is SignatureStatus.INVALID
    (unknown,) = engine.verify_detached(MESSAGE, theirs, [public])
    assert unknown.status is SignatureStatus.UNKNOWN_KEY and unknown.fingerprint != fingerprint


# --------------------------------------------------------------------------- GnuPG specifics


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GnuPG]:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = Path(tmp_path_factory.mktemp("gpgx", numbered=True))
    home.chmod(0o700)
    instance = GnuPG("gpg", home)
    instance.generate("GnuPG Extra <extra@example.net>")
    yield instance
    instance.stop()


def test_gpg_sends_us_uncompressed_seipd_v1(engine: OpenPGPEngine, ours: Ours, gpg: GnuPG) -> None:
    secret, public, _ = ours
    message = gpg.encrypt_sign(MESSAGE, public)
    assert [tag for tag, _ in packets(message)] == [1, 18]
    gpg.import_cert(secret)  # so that --list-packets can look inside
    listing = gpg.try_gpg("--list-packets", "--passphrase", "", stdin=message).stdout
    assert b":literal data packet:" in listing, "gpg decrypted it for the listing"
    assert b"compressed packet" not in listing, "our keys ask for no compression"
    assert engine.decrypt(message, [secret], [gpg.public]).signatures[0].status is VALID


def test_gpg_message_without_mdc_is_refused(engine: OpenPGPEngine, ours: Ours, gpg: GnuPG) -> None:
    secret, public, _ = ours
    gpg.import_cert(public)
    (fingerprint,) = _fingerprints(public)
    message = gpg.gpg("--rfc2440", "-r", fingerprint, "--encrypt", stdin=b"no integrity")
    assert 9 in [tag for tag, _ in packets(message)], "gpg wrote a SED packet"
    with pytest.raises(IntegrityError):
        engine.decrypt(message, [secret])


def test_gpg_compressed_and_cleartext_signatures(engine: OpenPGPEngine, gpg: GnuPG) -> None:
    sign = ("--passphrase", "", "-u", gpg.fingerprint)
    inline = gpg.gpg(*sign, "--compress-algo", "zlib", "--sign", stdin=MESSAGE)
    content, results = engine.verify_inline(inline, [gpg.public])
    assert content == MESSAGE and [r.status for r in results] == [VALID]
    clear = gpg.gpg(*sign, "--clearsign", stdin=b"line one\n- dash line\nlast\n")
    content, results = engine.verify_inline(clear, [gpg.public])
    assert [r.status for r in results] == [VALID]
    assert content.replace(b"\r\n", b"\n").rstrip(b"\n") == b"line one\n- dash line\nlast"
    forged = clear.replace(b"line one", b"line 0ne")
    assert [r.status for r in engine.verify_inline(forged, [gpg.public])[1]] == [
        SignatureStatus.INVALID
    ]


def test_gpg_compressed_signed_encrypted_message(
    engine: OpenPGPEngine, ours: Ours, gpg: GnuPG
) -> None:
    # What GnuPG sends to keys that allow compression: pysequoia alone cannot verify it.
    secret, public, fingerprint = ours
    gpg.import_cert(public)
    message = gpg.gpg(
        "--passphrase", "", "-u", gpg.fingerprint, "-r", fingerprint, "--compress-algo", "zlib",
        "--sign", "--encrypt", stdin=MESSAGE,
    )  # fmt: skip
    result = engine.decrypt(message, [secret], [gpg.public])
    assert result.plaintext == MESSAGE and [s.status for s in result.signatures] == [VALID]


def test_passphrase_protected_keys_move_both_ways(engine: OpenPGPEngine, tmp_path: Path) -> None:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    gpg = GnuPG("gpg", home)
    try:
        # Our protected key in GnuPG: it must accept our S2K and decrypt with it.
        info = engine.generate_key(["Protected <protected@example.org>"], passphrase="s3cret")
        gpg.gpg("--passphrase", "s3cret", "--import", stdin=info.data)
        message = engine.encrypt(MESSAGE, [engine.public_only(info.data)])
        assert gpg.gpg("--passphrase", "s3cret", "--decrypt", stdin=message) == MESSAGE
        # A GnuPG-protected key in our engine.
        gpg.gpg("--passphrase", "g-pass", "--quick-gen-key", "G <g@example.org>", "future-default")
        exported = gpg.gpg("--passphrase", "g-pass", "--export-secret-keys", "g@example.org")
        (locked,) = engine.parse_certs(exported)
        assert locked.secret_locked
        unlocked = engine.unlock(exported, "g-pass")
        message = engine.encrypt(MESSAGE, [engine.public_only(unlocked)])
        assert engine.decrypt(message, [unlocked]).plaintext == MESSAGE
    finally:
        gpg.stop()


def test_gpg_expired_key(engine: OpenPGPEngine, tmp_path: Path) -> None:
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    gpg = GnuPG("gpg", home)
    try:
        past = ("--faked-system-time", "20200101T000000")
        gpg.gpg(*past, "--passphrase", "", "--quick-gen-key", "Old <old@example.org>",
                "future-default", "default", "2d")  # fmt: skip
        (info,) = engine.parse_certs(gpg.gpg("--export"))
        assert info.expires is not None and not info.can_encrypt and not info.can_sign
    finally:
        gpg.stop()


def test_gpg_key_with_sha1_self_signatures_is_reported_unusable(
    engine: OpenPGPEngine, tmp_path: Path
) -> None:
    # GnuPG 1.x made SHA-1 self-signatures; Sequoia's policy rejects them today, so such
    # a key must come out as unusable with a reason, not as a key without user IDs.
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    gpg = GnuPG("gpg", home)
    try:
        gpg.gpg("--passphrase", "", "--cert-digest-algo", "SHA1", "--quick-gen-key",
                "Sha1 <sha1@example.org>", "rsa2048", "default", "never")  # fmt: skip
        (info,) = engine.parse_certs(gpg.gpg("--export"))
        assert not info.can_encrypt and info.problem is not None
        assert "self-signature" in info.problem
    finally:
        gpg.stop()


# --------------------------------------------------------------------------- sq, RNP specifics


def test_sq_cleartext_signature(engine: OpenPGPEngine, tmp_path: Path) -> None:
    if shutil.which("sq") is None:
        pytest.skip("sq is not installed")
    sq = Sq("sq", tmp_path)
    sq.generate("Clear <clear@example.org>")
    signed = run("sq", "sign", "--cleartext-signature", "--signer-key", tmp_path / "key.pgp",
                 stdin=b"cleartext from sq\n")  # fmt: skip
    content, results = engine.verify_inline(signed, [sq.public])
    assert b"cleartext from sq" in content and [r.status for r in results] == [VALID]


def test_rnp_compressed_message(engine: OpenPGPEngine, ours: Ours, tmp_path: Path) -> None:
    if shutil.which("rnp") is None:
        pytest.skip("rnp is not installed")
    rnp = Rnp("rnp", tmp_path)
    rnp.generate("Zip <zip@example.org>")
    secret, public, fingerprint = ours
    rnp.import_cert(public)
    for algo in ("--zip", "--zlib", "--bzip"):
        out = tmp_path / "z.pgp"
        done = rnp.rnp("--encrypt", "--sign", algo, "-z", "9", "-r", fingerprint,
                       "-u", rnp.fingerprint, "--overwrite", "--output", out,
                       rnp.file("z.txt", MESSAGE))  # fmt: skip
        assert done.returncode == 0, done.stderr
        result = engine.decrypt(out.read_bytes(), [secret], [rnp.public])
        assert result.plaintext == MESSAGE and [s.status for s in result.signatures] == [VALID]


def test_rnp_uses_our_protected_secret_key(engine: OpenPGPEngine, tmp_path: Path) -> None:
    # What a user moving a localproxy key into Thunderbird (RNP) does.
    if shutil.which("rnp") is None:
        pytest.skip("rnp is not installed")
    info = engine.generate_key(["Moving <moving@example.org>"], passphrase="s3cret")
    rnp = Rnp("rnp", tmp_path)
    rnp.import_cert(info.data)
    message = rnp.file("m.pgp", engine.encrypt(MESSAGE, [engine.public_only(info.data)]))
    wrong = call(
        "rnp", "--homedir", tmp_path, "--password", "wrong", "-d", "--output", "-", message
    )
    assert wrong.returncode != 0
    right = call(
        "rnp", "--homedir", tmp_path, "--password", "s3cret", "-d", "--output", "-", message
    )
    assert right.returncode == 0 and right.stdout == MESSAGE
