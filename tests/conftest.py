"""Shared pytest fixtures.

Harness: ``provider`` is one real Dovecot + Postfix pair for the whole session (see
tests/harness/provider.py); ``clean_provider`` is the same provider with every mailbox of
every user emptied first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from localproxy.sandbox.provider import (
    Provider,
    ProviderUnavailable,
    become_subreaper,
    check_available,
    start_provider,
)


def pytest_configure(config: pytest.Config) -> None:
    # PID 1 on our CI machines does not reap orphans: adopt the mail servers' orphaned
    # workers so Provider.stop() can reap them instead of leaving zombies behind.
    become_subreaper()


@pytest.fixture(scope="session")
def provider() -> Iterator[Provider]:
    """The real mail provider, started once per session. Set LOCALPROXY_KEEP_PROVIDER=1
    to keep its directory (configs, logs, maildirs) after the session."""
    try:
        check_available()
    except ProviderUnavailable as exc:
        if os.environ.get("LOCALPROXY_REQUIRE_SERVERS"):
            # scripts/test installed the servers: not starting them is a failure.
            pytest.fail(f"real mail provider unavailable: {exc}")
        pytest.skip(f"real mail provider unavailable: {exc}")
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, and the servers' unprivileged
    # users (mail, postfix) must reach their directories below the root.
    root = Path(tempfile.mkdtemp(prefix="localproxy-provider-"))
    try:
        with start_provider(root) as running:
            yield running
    finally:
        if not os.environ.get("LOCALPROXY_KEEP_PROVIDER"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clean_provider(provider: Provider) -> Provider:
    """The session provider with every user's mailboxes emptied before the test."""
    provider.clear_all()
    return provider


@pytest.fixture(autouse=True)
def no_os_keyring() -> Iterator[None]:
    """No test reads or writes the developer's real keyring; tests that want one
    install an in-memory backend themselves."""
    import keyring
    from keyring.backends.fail import Keyring as FailKeyring

    previous = keyring.get_keyring()
    keyring.set_keyring(FailKeyring())
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def gnupg_home(tmp_path: Path) -> Iterator[Path]:
    """A private GNUPGHOME whose gpg-agent is stopped afterwards, so none lingers."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    yield home
    if shutil.which("gpgconf"):
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "all"],
            capture_output=True,
            timeout=30,
            check=False,
        )
