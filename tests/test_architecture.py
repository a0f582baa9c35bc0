"""Structural promises checked on the source itself.

- Upstream connections are opened only in localproxy/upstream.py, which
  always uses verified TLS, so no other code path can talk to a provider in
  clear.
- Only the OpenPGP engine module imports pysequoia, so a second engine can
  replace it behind the same interface.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "localproxy"

# Methods that open an outgoing connection whatever object they are called on.
CONNECTING_METHODS = {
    "open_connection",
    "create_connection",
    "sock_connect",
    "connect_ex",
    "urlopen",
    "open_unix_connection",
}
# Client classes that connect, by the module they come from.
CLIENT_CLASSES = {
    "aiosmtplib": {"SMTP", "send"},
    "smtplib": {"SMTP", "SMTP_SSL"},
    "imaplib": {"IMAP4", "IMAP4_SSL"},
    "aioimaplib": {"IMAP4", "IMAP4_SSL"},
}
UPSTREAM_MODULE = "upstream.py"
# The demo's sandbox provider, and the demo acting as the user's mail client.
NOT_UPSTREAM = ("sandbox/", "demo.py")
ENGINE_MODULE = "crypto/openpgp.py"


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(PACKAGE)), ast.parse(p.read_text(), str(p)))
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def _connecting_calls(tree: ast.Module) -> set[str]:
    """Calls in a module that can open an outgoing connection."""
    imported = {
        alias.asname or alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            if func.attr in CONNECTING_METHODS or func.attr in CLIENT_CLASSES.get(owner, ()):
                found.add(f"{owner}.{func.attr}")
        elif isinstance(func, ast.Name):
            module = imported.get(func.id, "")
            if func.id in CONNECTING_METHODS or func.id in CLIENT_CLASSES.get(module, ()):
                found.add(f"{module}.{func.id}")
    return found


def _imported_modules(tree: ast.Module) -> set[str]:
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_only_the_upstream_module_opens_outgoing_connections():
    offenders = {
        name: sorted(_connecting_calls(tree))
        for name, tree in _sources()
        if name != UPSTREAM_MODULE and not name.startswith(NOT_UPSTREAM)
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _connecting_calls(dict(_sources())[UPSTREAM_MODULE]), "the scan finds real calls"


def test_upstream_module_never_builds_an_unverified_context():
    text = (PACKAGE / UPSTREAM_MODULE).read_text() + (PACKAGE / "tls.py").read_text()
    for forbidden in (
        "CERT_NONE",
        "check_hostname = False",
        "_create_unverified_context",
        "validate_certs=False",
        "TLSv1_1",
        "TLSVersion.TLSv1 ",
    ):
        assert forbidden not in text


def test_only_the_engine_imports_pysequoia():
    importers = sorted(name for name, tree in _sources() if "pysequoia" in _imported_modules(tree))
    assert importers in ([], [ENGINE_MODULE])
