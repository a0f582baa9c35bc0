"""`localproxy keys ...`: list, generate, import, export, remove, backup, restore."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from localproxy.config import (
    Account,
    Config,
    load_config,
    normalize_address,
    resolve_config_path,
)
from localproxy.crypto import smime
from localproxy.crypto.errors import CryptoError, MalformedData
from localproxy.crypto.openpgp import CertInfo
from localproxy.keys.store import ImportOutcome, KeyStore, StoredCert, StoredX509
from localproxy.secretbox import SecretBoxError

ENV_KEY_PASSPHRASE = "LOCALPROXY_KEY_PASSPHRASE"
ENV_BACKUP_PASSPHRASE = "LOCALPROXY_BACKUP_PASSPHRASE"
ENV_P12_PASSPHRASE = "LOCALPROXY_P12_PASSPHRASE"
EXPIRY_WARNING_DAYS = 30


class KeysError(Exception):
    """A keys command that cannot be done; printed as one line, exit 1."""


def add_keys_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser(
        "keys",
        help="manage own keys and recipients' certificates",
        description="Manage the key store: your own secret keys and the certificates of "
        "the people you write to.",
    )
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="list own keys and recipients' certificates")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("generate", help="generate a new own key for an account's addresses")
    p.add_argument("account", help="account name from the config")
    p.add_argument(
        "--force", action="store_true", help="generate even if the account already has a key"
    )
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser(
        "import",
        help="import certificates or secret keys from files",
        description="Import OpenPGP certificates (armored or binary, keyrings "
        "with many certificates) and secret keys, or S/MIME (X.509) certificates "
        "(PEM, DER or PKCS#7 bundles). Passphrase-"
        f"protected secret keys ask for the passphrase (or "
        f"${ENV_KEY_PASSPHRASE}).",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument(
        "--account",
        help="account that owns imported secret keys "
        "(default: the account whose address the key carries)",
    )
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser(
        "import-p12",
        help="import an own S/MIME identity (PKCS#12: key and certificate)",
        description="Import a PKCS#12 file (.p12/.pfx) as an account's S/MIME identity. "
        f"The passphrase is asked for (or ${ENV_P12_PASSPHRASE}); the key is stored "
        "sealed with the store key.",
    )
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--account", required=True, help="account the identity belongs to")
    p.set_defaults(handler=cmd_import_p12)

    p = sub.add_parser(
        "export",
        help="export a certificate (or, with --secret, a secret key)",
        description="Export certificates: OpenPGP ones armored, S/MIME ones as PEM (with "
        "their chain); for an address with both, the OpenPGP block comes first. With "
        "--secret, an own OpenPGP secret key (armored) or an own S/MIME identity as "
        f"PKCS#12, protected with a passphrase from a prompt or ${ENV_P12_PASSPHRASE}.",
    )
    p.add_argument("selector", metavar="ADDRESS|FINGERPRINT")
    p.add_argument(
        "--secret", action="store_true", help="export the secret key (S/MIME: as PKCS#12)"
    )
    p.add_argument("--yes", action="store_true", help="do not ask before exporting a secret key")
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("remove", help="remove a certificate (and its secret key) by fingerprint")
    p.add_argument("fingerprint")
    p.add_argument("--yes", action="store_true", help="do not ask before removing an own key")
    p.set_defaults(handler=cmd_remove)

    p = sub.add_parser(
        "backup",
        help="write the whole key store to a passphrase-encrypted file",
        description="Write every certificate and own secret key to one file "
        "encrypted with a passphrase (scrypt + AES-256-GCM). Keep it "
        "safe: it is how you recover your keys if the OS keyring "
        f"entry is lost. Passphrase from a prompt or "
        f"${ENV_BACKUP_PASSPHRASE}.",
    )
    p.add_argument("file", type=Path)
    p.set_defaults(handler=cmd_backup)

    p = sub.add_parser("restore", help="merge a backup file into the key store")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=cmd_restore)


# --------------------------------------------------------------------------- handlers


def cmd_list(args: argparse.Namespace) -> int:
    config = _config(args)
    with open_store(config) as store:
        certs = store.certs()
        x509s = store.x509_certs()
        own = any(c.is_own for c in certs) or any(c.is_own for c in x509s)
        warning = store.store_key.warning if own else None
    if args.json:
        listed = [cert_as_dict(c) for c in certs] + [x509_as_dict(c) for c in x509s]
        print(json.dumps(listed, indent=2))
        return 0
    console = Console()
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(_cert_table("Own keys", [c for c in certs if c.is_own]))
    console.print(_cert_table("Recipients", [c for c in certs if not c.is_own]))
    if x509s:
        console.print(_x509_table(x509s))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config(args)
    account = _account(config, args.account)
    with open_store(config) as store:
        if store.own_keys(account.name) and not args.force:
            raise KeysError(
                f"account {account.name!r} already has a key; use --force to "
                "generate another (the newest is used)"
            )
        info = store.generate(account.name, account.addresses)
        location = store.store_key
    console = Console()
    console.print(
        f"Generated [bold]{info.fingerprint}[/] for {', '.join(account.addresses)} "
        f"({info.algorithm})."
    )
    console.print(f"Secret key sealed with the store key ({_where(location.location)}).")
    if location.warning:
        console.print(f"[yellow]warning:[/] {escape(location.warning)}")
    console.print("Make a backup now: [bold]localproxy keys backup FILE[/]")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    config = _config(args)
    failed = False
    console = Console()
    with open_store(config) as store:
        for path in args.files:
            try:
                data = path.read_bytes()
                outcomes = _import_file(store, config, data, path, args.account)
            except (OSError, CryptoError) as exc:
                console.print(f"[red]{escape(str(path))}: {escape(_reason(exc))}[/]")
                failed = True
                continue
            failed |= _report_import(console, path, outcomes)
    return 1 if failed else 0


def _import_file(
    store: KeyStore, config: Config, data: bytes, path: Path, account: str | None
) -> list[ImportOutcome]:
    """OpenPGP first; data that holds no OpenPGP at all is tried as X.509 certificates."""
    try:
        return store.import_keys(
            data,
            f"import:{path.name}",
            _key_passphrase,
            lambda info: _owner(config, info, account),
        )
    except CryptoError as pgp_error:
        try:
            return store.import_x509(data, f"import:{path.name}")
        except MalformedData:
            raise pgp_error from None


def cmd_import_p12(args: argparse.Namespace) -> int:
    config = _config(args)
    account = _account(config, args.account)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise KeysError(f"{args.file}: {exc.strerror}") from None
    passphrase = _p12_passphrase(args.file)
    try:
        identity = smime.load_pkcs12(data, passphrase)
    except CryptoError as exc:
        raise KeysError(f"{args.file}: {exc}") from None
    with open_store(config) as store:
        outcome = store.import_identity(identity, account.name, f"p12:{args.file.name}")
        warning = store.store_key.warning
    console = Console()
    failed = _report_import(console, args.file, [outcome])
    unlisted = set(outcome.addresses) - set(account.addresses)
    if unlisted:
        console.print(
            f"[yellow]warning:[/] the certificate is for {escape(', '.join(sorted(unlisted)))}, "
            f"not an address of account {account.name!r}: mail from those is not signed with it"
        )
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    config = _config(args)
    with open_store(config) as store:
        fingerprints, x509_fingerprints = _select(store, args.selector)
        if args.secret:
            if len(fingerprints) + len(x509_fingerprints) != 1:
                raise KeysError("--secret exports exactly one key: give its fingerprint")
            (fingerprint,) = fingerprints or x509_fingerprints
            if fingerprints:
                _confirm_secret(args, f"Export the SECRET key {fingerprint}?")
                data = store.export_secret(fingerprint)
            else:
                if store.smime_identity(fingerprint) is None:
                    raise KeysError(f"no own S/MIME identity with fingerprint {fingerprint}")
                _confirm_secret(args, f"Export the SECRET S/MIME key {fingerprint} (PKCS#12)?")
                data = store.export_pkcs12(
                    fingerprint, _new_passphrase(ENV_P12_PASSPHRASE, "the key")
                )
        else:
            data = store.export_public(fingerprints) if fingerprints else b""
            if x509_fingerprints:
                data += store.export_x509(x509_fingerprints)
    if args.output:
        _write_private(args.output, data) if args.secret else args.output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
    return 0


def _confirm_secret(args: argparse.Namespace, question: str) -> None:
    if not args.yes:
        _confirm(f"{question} Anyone with the file can read your mail.")


def cmd_remove(args: argparse.Namespace) -> int:
    config = _config(args)
    with open_store(config) as store:
        stored: StoredCert | StoredX509 | None = store.cert(args.fingerprint)
        stored = stored or store.x509_cert(args.fingerprint)
        if stored is None:
            raise KeysError(f"no certificate with fingerprint {args.fingerprint}")
        if stored.is_own and not args.yes:
            _confirm(
                f"Remove the OWN key {stored.fingerprint} of account {stored.account!r}? "
                "Mail encrypted to it can no longer be read (unless you have a backup)."
            )
        store.remove(stored.fingerprint)
    Console().print(
        f"Removed {stored.fingerprint} ({', '.join(stored.info.emails) or 'no address'})"
    )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    config = _config(args)
    passphrase = _new_passphrase()
    with open_store(config) as store:
        archive = store.backup(passphrase)
        count = len(store.certs()) + len(store.x509_certs())
    _write_private(args.file, archive)
    Console().print(f"Wrote {count} keys to {args.file} (passphrase-encrypted, mode 0600).")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        archive = args.file.read_bytes()
    except OSError as exc:
        raise KeysError(f"{args.file}: {exc.strerror}") from None
    passphrase = _passphrase(ENV_BACKUP_PASSPHRASE, "Backup passphrase: ")
    with open_store(config) as store:
        try:
            outcomes = store.restore(archive, passphrase)
        except SecretBoxError as exc:
            raise KeysError(f"{args.file}: {exc}") from None
    failed = _report_import(Console(), args.file, outcomes)
    return 1 if failed else 0


# --------------------------------------------------------------------------- helpers


def _config(args: argparse.Namespace) -> Config:
    return load_config(resolve_config_path(args.config))


def open_store(config: Config) -> KeyStore:
    return KeyStore(config.proxy.data_dir)


def cert_as_dict(stored: StoredCert) -> dict[str, Any]:
    info = stored.info
    return {
        "fingerprint": info.fingerprint,
        "addresses": list(info.emails),
        "user_ids": list(info.user_ids),
        "algorithm": info.algorithm,
        "created": info.created.isoformat(),
        "expires": info.expires.isoformat() if info.expires else None,
        "revoked": info.revoked,
        "can_encrypt": info.can_encrypt,
        "status": cert_status(info),
        "own": stored.is_own,
        "account": stored.account,
        "source": stored.source,
        "added": stored.added.isoformat(),
        "updated": stored.updated.isoformat(),
    }


def x509_as_dict(stored: StoredX509) -> dict[str, Any]:
    info = stored.info
    return {
        "kind": "x509",
        "fingerprint": info.fingerprint,
        "addresses": list(info.emails),
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "algorithm": info.algorithm,
        "not_before": info.not_before.isoformat(),
        "expires": info.not_after.isoformat(),
        "can_encrypt": info.can_encrypt,
        "can_sign": info.can_sign,
        "status": x509_status(info),
        "own": stored.is_own,
        "account": stored.account,
        "source": stored.source,
        "signing_time": stored.signing_time.isoformat() if stored.signing_time else None,
        "capabilities": list(info.capabilities),
        "added": stored.added.isoformat(),
        "updated": stored.updated.isoformat(),
    }


def x509_status(info: smime.SmimeCertInfo) -> str:
    """Usage and dates only: trust (the chain to a root) is judged when it is used."""
    now = datetime.now(UTC)
    if info.not_after <= now:
        return "expired"
    if info.not_before > now:
        return "not yet valid"
    if not info.can_encrypt:
        return "signing only"
    return "usable"


def _x509_table(certs: Sequence[StoredX509]) -> Table:
    table = Table(title=f"S/MIME certificates ({len(certs)})", title_justify="left")
    for column in ("Subject / Issuer", "Addresses", "Valid", "Status", "Source"):
        table.add_column(column, overflow="fold")
    for stored in certs:
        info = stored.info
        status = x509_status(info)
        colour = "green" if status == "usable" else "red"
        source = stored.source + (f"\naccount {stored.account}" if stored.account else "")
        table.add_row(
            escape(f"{info.subject}\nissuer: {info.issuer}\n{_spaced(info.fingerprint)}"),
            escape("\n".join(info.emails) or "-"),
            f"{info.not_before:%Y-%m-%d} to\n{_expiry(info.not_after)}",
            f"[{colour}]{status}[/]",
            escape(source),
        )
    return table


def cert_status(info: CertInfo) -> str:
    if info.revoked:
        return "revoked"
    if info.expires is not None and info.expires <= datetime.now(UTC):
        return "expired"
    if not info.can_encrypt:
        return "no encryption key"
    return "usable"


def _cert_table(title: str, certs: Sequence[StoredCert]) -> Table:
    table = Table(title=f"{title} ({len(certs)})", title_justify="left")
    for column in ("Fingerprint", "Addresses", "Algorithm", "Expires", "Status", "Source"):
        table.add_column(column, overflow="fold")
    for stored in certs:
        info = stored.info
        status = cert_status(info)
        colour = "green" if status == "usable" else "red"
        source = stored.source + (f"\naccount {stored.account}" if stored.account else "")
        table.add_row(
            _spaced(info.fingerprint),
            escape("\n".join(info.emails) or "-"),
            info.algorithm,
            _expiry(info.expires),
            f"[{colour}]{status}[/]",
            escape(source),
        )
    return table


def _spaced(fingerprint: str) -> str:
    return " ".join(fingerprint[i : i + 4] for i in range(0, len(fingerprint), 4))


def _expiry(expires: datetime | None) -> str:
    if expires is None:
        return "never"
    days = (expires - datetime.now(UTC)).days
    colour = "red" if days < 0 else "yellow" if days < EXPIRY_WARNING_DAYS else "default"
    return f"[{colour}]{expires:%Y-%m-%d}[/] ({days} d)"


def _report_import(console: Console, path: Path, outcomes: list[ImportOutcome]) -> bool:
    """Print one line per item; True when something was skipped."""
    if not outcomes:
        console.print(f"[red]{escape(str(path))}: no certificate in this file[/]")
        return True
    colours = {"added": "green", "updated": "green", "unchanged": "default", "skipped": "red"}
    for o in outcomes:
        who = ", ".join(o.addresses) or "no address"
        reason = f": {o.reason}" if o.reason else ""
        console.print(
            f"[{colours[o.action]}]{o.action:9}[/] {o.fingerprint} ({escape(who)}){escape(reason)}"
        )
    return any(o.action == "skipped" for o in outcomes)


def _owner(config: Config, info: CertInfo, requested: str | None) -> str | None:
    if requested:
        return _account(config, requested).name
    emails = {normalize_address(e) for e in info.emails}
    return next((a.name for a in config.accounts if emails & set(a.addresses)), None)


def _account(config: Config, name: str) -> Account:
    try:
        return config.account(name)
    except KeyError as exc:
        raise KeysError(exc.args[0]) from None


def _select(store: KeyStore, selector: str) -> tuple[list[str], list[str]]:
    """(OpenPGP fingerprints, S/MIME certificate fingerprints) for an address or a
    fingerprint of either kind."""
    if "@" in selector:
        found = [c.fingerprint for c in store.find(selector)]
        x509s = [c.fingerprint for c in store.x509_certs(selector)]
    else:
        stored = store.cert(selector)
        found = [stored.fingerprint] if stored else []
        x509 = None if stored else store.x509_cert(selector)
        x509s = [x509.fingerprint] if x509 else []
    if not found and not x509s:
        raise KeysError(f"no certificate for {selector}")
    return found, x509s


def _key_passphrase(info: CertInfo) -> str | None:
    if (value := os.environ.get(ENV_KEY_PASSPHRASE)) is not None:
        return value
    if not sys.stdin.isatty():
        return None
    return getpass.getpass(f"Passphrase for secret key {info.fingerprint}: ")


def _p12_passphrase(path: Path) -> str | None:
    """The PKCS#12 passphrase; None (no passphrase) without a terminal or variable."""
    if (value := os.environ.get(ENV_P12_PASSPHRASE)) is not None:
        return value
    if not sys.stdin.isatty():
        return None
    return getpass.getpass(f"Passphrase for {path}: ")


def _passphrase(env: str, prompt: str) -> str:
    if (value := os.environ.get(env)) is not None:
        return value
    if not sys.stdin.isatty():
        raise KeysError(f"a passphrase is needed: set {env} or run in a terminal")
    return getpass.getpass(prompt)


def _new_passphrase(env: str = ENV_BACKUP_PASSPHRASE, protects: str = "the backup") -> str:
    """A passphrase to protect a new file with: from env, or asked twice; never empty."""
    if (value := os.environ.get(env)) is not None:
        if not value:
            raise KeysError(f"{env} is empty")
        return value
    first = _passphrase(env, "New passphrase: ")
    if first != getpass.getpass("Repeat passphrase: "):
        raise KeysError("the passphrases differ; nothing written")
    if not first:
        raise KeysError(f"an empty passphrase would not protect {protects}; nothing written")
    return first


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise KeysError(f"{question} Refusing without a terminal; add --yes")
    if input(f"{question} Type 'yes' to continue: ").strip().lower() != "yes":
        raise KeysError("cancelled")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)


def _where(location: str) -> str:
    return "OS keyring" if location == "keyring" else location


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
