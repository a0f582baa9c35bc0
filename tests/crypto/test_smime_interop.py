"""S/MIME interoperability with ``openssl cms`` and GnuPG's ``gpgsm``.

The PKI comes from test_smime.py (generated per test session). Every tool call runs
under a timeout; a missing tool skips its tests. gpgsm gets a private GNUPGHOME (the
``gnupg_home`` fixture stops its agent afterwards), the PKCS#12 exported with
``openssl pkcs12 -export -legacy`` (gpgsm 2.2 cannot read the AES-based default), the
CA marked trusted in trustlist.txt, and CRL checks off (the test CA publishes none).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from localproxy.crypto import smime
from localproxy.crypto.openpgp import SignatureStatus
from localproxy.mime import parse_entity
from tests.crypto.test_smime import ENTITY, SEVEN_BIT, alice, bob, ca, roots

pytestmark = pytest.mark.interop

TIMEOUT = 60
PASSPHRASE = "interop-pw"
ADDRESS = "alice@example.org"


def run(*args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None) -> bytes:
    """stdout of a tool that must succeed; a failure shows its stderr."""
    result = subprocess.run(
        [str(a) for a in args],
        input=stdin,
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "LC_ALL": "C.UTF-8", **(env or {})},
    )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}: {result.stderr!r}")
    return result.stdout


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca().cert.public_bytes(pem))
    for name, user in (("alice", alice()), ("bob", bob())):
        (tmp_path / f"{name}.pem").write_bytes(user.cert.public_bytes(pem))
        (tmp_path / f"{name}.key").write_bytes(
            user.key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return tmp_path


# --------------------------------------------------------------------------- openssl cms


def test_we_encrypt_openssl_decrypts(pki: Path) -> None:
    (pki / "msg.eml").write_bytes(smime.encrypt(ENTITY, [alice().cert, bob().cert]))
    for user in ("alice", "bob"):
        out = run(
            "openssl", "cms", "-decrypt", "-binary", "-in", pki / "msg.eml",
            "-recip", pki / f"{user}.pem", "-inkey", pki / f"{user}.key",
        )  # fmt: skip
        assert out == ENTITY


@pytest.mark.parametrize("cipher", ["-aes256", "-aes128"])
def test_openssl_encrypts_we_decrypt(pki: Path, cipher: str) -> None:
    (pki / "entity").write_bytes(ENTITY)
    out = run(
        "openssl", "cms", "-encrypt", cipher, "-binary", "-in", pki / "entity",
        pki / "bob.pem", pki / "alice.pem",
    )  # fmt: skip
    assert parse_entity(out).content_type in smime.SMIME_MIME_TYPES
    result = smime.decrypt(out, [alice().identity])
    assert result.plaintext == ENTITY and result.recipient == alice().cert


def test_openssl_des3_is_refused_clearly(pki: Path) -> None:
    (pki / "entity").write_bytes(ENTITY)
    out = run(
        "openssl", "cms", "-encrypt", "-des3", "-binary", "-in", pki / "entity", pki / "alice.pem"
    )  # fmt: skip
    with pytest.raises(smime.DecryptionFailed, match="unsupported content encryption"):
        smime.decrypt(out, [alice().identity])


@pytest.mark.parametrize("detached", [True, False])
def test_we_sign_openssl_verifies(pki: Path, detached: bool) -> None:
    (pki / "signed.eml").write_bytes(
        smime.sign(SEVEN_BIT, alice().cert, alice().key, [ca().cert], detached=detached)
    )
    # No -binary: OpenSSL 3.0 then leaves the CR of the CRLF before the boundary in the
    # content of a multipart/signed and fails; our content is canonical CRLF already.
    out = run(
        "openssl", "cms", "-verify", "-purpose", "smimesign",
        "-CAfile", pki / "ca.pem", "-in", pki / "signed.eml",
    )  # fmt: skip
    assert out == SEVEN_BIT


def _openssl_sign(pki: Path, *extra: str) -> bytes:
    (pki / "entity").write_bytes(SEVEN_BIT)
    return run(
        "openssl", "cms", "-sign", "-binary", "-md", "sha256", "-in", pki / "entity",
        "-signer", pki / "alice.pem", "-inkey", pki / "alice.key", *extra,
    )  # fmt: skip


def test_openssl_signs_detached_we_verify(pki: Path) -> None:
    signed = _openssl_sign(pki)
    assert parse_entity(signed).content_type == "multipart/signed"
    content, result = smime.verify_entity(signed, roots(), address=ADDRESS)
    assert content == SEVEN_BIT
    assert result.status is SignatureStatus.VALID, result.signature.detail
    assert result.signer == alice().cert and result.signing_time is not None
    assert "aes256_cbc" in result.capabilities
    altered = signed.replace(b"Hello, S/MIME.", b"Hello, S/MIME!")
    assert altered != signed
    _, bad = smime.verify_entity(altered, roots(), address=ADDRESS)
    assert bad.status is SignatureStatus.INVALID


@pytest.mark.parametrize("keyid", [False, True])
def test_openssl_signs_opaque_we_verify(pki: Path, keyid: bool) -> None:
    signed = _openssl_sign(pki, "-nodetach", *(["-keyid"] if keyid else []))
    entity = parse_entity(signed)
    assert smime.classify(entity) is smime.SmimeKind.SIGNED_OPAQUE
    content, result = smime.verify_entity(signed, roots(), address=ADDRESS)
    assert content == SEVEN_BIT
    assert result.status is SignatureStatus.VALID, result.signature.detail
    # Alter the content inside the CMS object: the digest no longer matches.
    der = smime.decode_body(entity).replace(b"Hello, S/MIME.", b"Hello, S/MIME!")
    _, bad = smime.verify_opaque(der, roots(), address=ADDRESS)
    assert bad.status is SignatureStatus.INVALID


def test_openssl_pss_signature(pki: Path) -> None:
    signed = _openssl_sign(pki, "-keyopt", "rsa_padding_mode:pss")
    _, result = smime.verify_entity(signed, roots(), address=ADDRESS)
    assert result.status is SignatureStatus.VALID, result.signature.detail


# --------------------------------------------------------------------------- gpgsm


@pytest.fixture
def gpgsm(pki: Path, gnupg_home: Path) -> Path:
    """A gpgsm home holding alice's key (from a legacy PKCS#12) and trusting the test CA."""
    if not shutil.which("gpgsm"):
        pytest.skip("gpgsm is not installed")
    (gnupg_home / "gpgsm.conf").write_text("disable-crl-checks\ndisable-trusted-cert-crl-check\n")
    (gnupg_home / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    sha1 = ca().cert.fingerprint(hashes.SHA1()).hex().upper()
    trusted = ":".join(sha1[i : i + 2] for i in range(0, len(sha1), 2))
    (gnupg_home / "trustlist.txt").write_text(f"{trusted} S relax\n")
    run(
        "openssl", "pkcs12", "-export", "-legacy", "-in", pki / "alice.pem",
        "-inkey", pki / "alice.key", "-certfile", pki / "ca.pem",
        "-passout", f"pass:{PASSPHRASE}", "-out", pki / "alice.p12",
    )  # fmt: skip
    gpgsm_run(gnupg_home, "--import", pki / "ca.pem")
    gpgsm_run(gnupg_home, "--import", pki / "alice.p12")
    return gnupg_home


def gpgsm_run(home: Path, *args: str | Path) -> bytes:
    return run(
        "gpgsm", "--batch", "--homedir", home, "--pinentry-mode", "loopback",
        "--passphrase-fd", "0", *args,
        stdin=f"{PASSPHRASE}\n".encode(),
    )  # fmt: skip


def test_we_encrypt_gpgsm_decrypts(pki: Path, gpgsm: Path) -> None:
    entity = parse_entity(smime.encrypt(ENTITY, [alice().cert]))
    (pki / "msg.p7m").write_bytes(base64.b64decode(entity.body))
    assert gpgsm_run(gpgsm, "--decrypt", pki / "msg.p7m") == ENTITY


def test_gpgsm_signs_we_verify(pki: Path, gpgsm: Path) -> None:
    (pki / "entity").write_bytes(SEVEN_BIT)
    signature = gpgsm_run(gpgsm, "-u", ADDRESS, "--detach-sign", pki / "entity")
    result = smime.verify_detached(SEVEN_BIT, signature, roots(), address=ADDRESS)
    assert result.status is SignatureStatus.VALID, result.signature.detail
    assert result.signer == alice().cert
    bad = smime.verify_detached(SEVEN_BIT + b"x", signature, roots(), address=ADDRESS)
    assert bad.status is SignatureStatus.INVALID


def test_gpgsm_encrypts_we_decrypt(pki: Path, gpgsm: Path) -> None:
    (pki / "entity").write_bytes(ENTITY)
    der = gpgsm_run(gpgsm, "-r", ADDRESS, "--encrypt", pki / "entity")
    assert smime.decrypt(der, [alice().identity]).plaintext == ENTITY
