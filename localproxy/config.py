"""TOML configuration -> typed, validated settings.

Validation collects every problem in one pass so a person can fix the whole
file at once; each problem names the file, the key path, what was found and
what was expected.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "localproxy"
ENV_CONFIG = "LOCALPROXY_CONFIG"

LOG_LEVELS = ("debug", "info", "warning", "error")
SECURITY_MODES = ("tls", "starttls")
TLS_VERSIONS = ("1.2", "1.3")
ENCRYPT_POLICIES = ("always", "opportunistic", "never")
SIGN_POLICIES = ("encrypted", "always", "never")
METHODS = ("openpgp", "smime")

# Deliberately simple: a person's typo is what we catch, not RFC 5321 corner cases.
_ADDRESS_RE = re.compile(r"^[^@\s\"(),:;<>\[\]\\]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong in a config file."""

    path: str
    found: str
    expected: str

    def render(self, source: Path | str) -> str:
        where = f"{source}: {self.path}" if self.path else str(source)
        return f"{where}: found {self.found}; expected {self.expected}"


class ConfigError(Exception):
    """The config cannot be used; carries every problem found."""

    def __init__(self, source: Path | str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class UpstreamServer:
    """How to reach one upstream service (IMAP or SMTP) over verified TLS."""

    host: str
    port: int
    security: str  # "tls" (implicit) or "starttls"; there is no plaintext mode
    ca_file: Path | None = None
    pin_sha256: bytes | None = None  # SHA-256 of the server's SubjectPublicKeyInfo
    client_cert: Path | None = None
    client_key: Path | None = None
    min_tls: str = "1.2"
    timeout: float = 30.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LocalListen:
    """Where the proxy listens for the user's mail client."""

    host: str = "127.0.0.1"
    imap_port: int = 1143
    smtp_port: int = 1025
    imaps_port: int | None = None
    smtps_port: int | None = None
    allow_remote: bool = False


@dataclass(frozen=True)
class Rule:
    """A policy override for one domain or address; None means "inherit"."""

    encrypt: str | None = None
    sign: str | None = None
    method: str | None = None  # "openpgp" or "smime" only; None: OpenPGP, else S/MIME


@dataclass(frozen=True)
class Policy:
    """Who gets what: defaults plus per-domain and per-address rules."""

    encrypt: str | None = "opportunistic"
    sign: str | None = "encrypted"
    autocrypt: bool | None = True  # add an Autocrypt header with the sender's key
    prefer_encrypt: bool | None = False  # Autocrypt prefer-encrypt=mutual
    domains: dict[str, Rule] = field(default_factory=dict)
    addresses: dict[str, Rule] = field(default_factory=dict)
    smime_ca_file: Path | None = None  # roots for S/MIME chains; None: the system's

    def decide(self, recipient: str, account: Policy | None = None) -> tuple[str, str]:
        """(encrypt, sign) for a recipient: address rules beat domain rules beat defaults;
        at each level an account's own rule beats the global one."""
        address = normalize_address(recipient)
        domain = address.rpartition("@")[2]
        layers = [account, self] if account else [self]
        rules = [layer.addresses.get(address) for layer in layers]
        rules += [layer.domains.get(domain) for layer in layers]
        rules += [Rule(layer.encrypt, layer.sign) for layer in layers]
        encrypt = next(r.encrypt for r in rules if r is not None and r.encrypt is not None)
        sign = next(r.sign for r in rules if r is not None and r.sign is not None)
        return encrypt, sign

    def method(self, recipient: str, account: Policy | None = None) -> str | None:
        """The one method a recipient's rules demand ("openpgp", "smime"), or None
        (OpenPGP when a key is known, else S/MIME). Same precedence as decide()."""
        address = normalize_address(recipient)
        domain = address.rpartition("@")[2]
        layers = [account, self] if account else [self]
        rules = [layer.addresses.get(address) for layer in layers]
        rules += [layer.domains.get(domain) for layer in layers]
        return next((r.method for r in rules if r is not None and r.method is not None), None)

    def setting(self, name: str, account: Policy | None = None) -> bool:
        """A yes/no setting (autocrypt, prefer_encrypt), the account's value winning."""
        own = getattr(account, name) if account else None
        return bool(getattr(self, name) if own is None else own)


@dataclass(frozen=True)
class Account:
    name: str
    addresses: tuple[str, ...]
    local: LocalListen
    imap: UpstreamServer
    smtp: UpstreamServer
    username: str | None = None  # upstream login name; defaults to the first address
    policy: Policy | None = None  # this account's overrides of the global [policy]

    @property
    def login(self) -> str:
        return self.username or self.addresses[0]


@dataclass(frozen=True)
class ProxySettings:
    data_dir: Path
    log_level: str = "info"
    max_message_size: int = 50 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    source: Path | None
    proxy: ProxySettings
    policy: Policy
    accounts: tuple[Account, ...] = field(default_factory=tuple)

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts) or "none"
        raise KeyError(f"no account named {name!r} (configured: {known})")


# --------------------------------------------------------------------------- locations


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME))


def resolve_config_path(cli_path: str | os.PathLike[str] | None) -> Path:
    """--config wins over LOCALPROXY_CONFIG, which wins over the platform default."""
    if cli_path:
        return Path(cli_path).expanduser()
    if env := os.environ.get(ENV_CONFIG):
        return Path(env).expanduser()
    return default_config_path()


# --------------------------------------------------------------------------- loading


def load_config(path: Path) -> Config:
    """Read, parse and validate a config file; raise ConfigError with every problem."""
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [_toml_problem(exc)]) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables
        problem = ConfigProblem("", "arrays or inline tables nested too deeply", "valid TOML")
        raise ConfigError(path, [problem]) from None
    return parse_config(raw, source=path)


def _toml_problem(exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    """tomllib says '<what> (at line L, column C)': lead with the location."""
    text = str(exc)
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
    if match is None:
        return ConfigProblem("", f"invalid TOML ({text})", "valid TOML")
    what = text[: match.start()]
    return ConfigProblem(
        f"line {match[1]}, column {match[2]}", f"invalid TOML ({what})", "valid TOML syntax"
    )


def _read_text(path: Path) -> str:
    def fail(found: str, expected: str = "a readable UTF-8 TOML file") -> ConfigError:
        return ConfigError(path, [ConfigProblem("", found, expected)])

    if path.is_dir():
        raise fail("a directory")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("no such file", "a config file (create one with `localproxy init`)") from None
    except PermissionError:
        raise fail("a file this user may not read") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise fail(f"bytes that are not UTF-8 on line {line} (byte offset {exc.start})") from None
    except OSError as exc:
        raise fail(f"an unreadable file ({exc.strerror})") from None


def parse_config(raw: Mapping[str, Any], source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    v = _Validator(base_dir=source.parent if source else Path.cwd())
    v.keys(raw, "", {"proxy", "policy", "account"})
    proxy = _proxy(v, v.table(raw, "proxy"), "proxy")
    policy = _policy(v, v.table(raw, "policy"), "policy")
    accounts = _accounts(v, raw.get("account", []))
    if v.problems:
        raise ConfigError(source or "<config>", v.problems)
    return Config(source=source, proxy=proxy, policy=policy, accounts=accounts)


def _proxy(v: _Validator, t: Mapping[str, Any], p: str) -> ProxySettings:
    v.keys(t, p, {"data_dir", "log_level", "max_message_size"})
    data_dir = v.path(t, p, "data_dir", must_exist=False) or default_data_dir()
    return ProxySettings(
        data_dir=data_dir,
        log_level=v.choice(t, p, "log_level", LOG_LEVELS, "info"),
        max_message_size=v.integer(t, p, "max_message_size", 50 * 1024 * 1024, low=1024),
    )


def _policy(v: _Validator, t: Mapping[str, Any], p: str, inherit: bool = False) -> Policy:
    """The global [policy] table, or an account's (whose unset keys inherit)."""
    allowed = {"encrypt", "sign", "autocrypt", "prefer_encrypt", "domain", "address"}
    # The trust roots are the user's, not an account's: only in the global [policy].
    v.keys(t, p, allowed if inherit else allowed | {"smime_ca_file"})
    encrypt_default, sign_default = (None, None) if inherit else ("opportunistic", "encrypted")
    ca_file = None if inherit else v.path(t, p, "smime_ca_file")
    if ca_file is not None:
        _check_ca_file(v, ca_file, f"{p}.smime_ca_file")
    domains = _rules(v, v.table(t, "domain", p), f"{p}.domain")
    addresses = _rules(v, v.table(t, "address", p), f"{p}.address")
    return Policy(
        encrypt=v.choice(t, p, "encrypt", ENCRYPT_POLICIES, encrypt_default),
        sign=v.choice(t, p, "sign", SIGN_POLICIES, sign_default),
        autocrypt=v.boolean(t, p, "autocrypt", None if inherit else True),
        prefer_encrypt=v.boolean(t, p, "prefer_encrypt", None if inherit else False),
        domains={key.lower(): rule for key, rule in domains.items()},
        addresses={normalize_address(key): rule for key, rule in addresses.items()},
        smime_ca_file=ca_file,
    )


def _rules(v: _Validator, t: Mapping[str, Any], p: str) -> dict[str, Rule]:
    rules = {}
    for key, value in t.items():
        here = f'{p}."{key}"'
        if not isinstance(value, Mapping):
            v.problem(here, _describe(value), 'a table like { encrypt = "always" }')
            continue
        v.keys(value, here, {"encrypt", "sign", "method"})
        rules[key] = Rule(
            encrypt=v.choice(value, here, "encrypt", ENCRYPT_POLICIES, None),
            sign=v.choice(value, here, "sign", SIGN_POLICIES, None),
            method=v.choice(value, here, "method", METHODS, None),
        )
    return rules


def _accounts(v: _Validator, raw: Any) -> tuple[Account, ...]:
    if not isinstance(raw, list):
        v.problem("account", _describe(raw), "an array of tables ([[account]])")
        return ()
    accounts: list[Account] = []
    listeners: list[LocalListen] = []  # every account's, valid or not, for clash checks
    for i, item in enumerate(raw):
        p = f"account[{i}]"
        if not isinstance(item, Mapping):
            v.problem(p, _describe(item), "a table")
            continue
        local = _local(v, v.table(item, "local", p), f"{p}.local")
        listeners.append(local)
        if (account := _account(v, item, p, local)) is not None:
            accounts.append(account)
    _check_unique_names(v, raw)
    _check_port_clashes(v, listeners)
    return tuple(accounts)


def _account(v: _Validator, t: Mapping[str, Any], p: str, local: LocalListen) -> Account | None:
    v.keys(t, p, {"name", "addresses", "username", "local", "upstream", "policy"})
    name = v.string(
        t,
        p,
        "name",
        required=True,
        pattern=r"^[A-Za-z0-9_.-]+$",
        pattern_text="a name of letters, digits, '.', '_' or '-'",
    )
    addresses = _addresses(v, t, p)
    username = v.string(t, p, "username")
    policy = (
        _policy(v, v.table(t, "policy", p), f"{p}.policy", inherit=True) if "policy" in t else None
    )
    upstream = v.table(t, "upstream", p, required=True)
    v.keys(upstream, f"{p}.upstream", {"imap", "smtp"})
    imap = _upstream(
        v,
        v.table(upstream, "imap", f"{p}.upstream", required=True),
        f"{p}.upstream.imap",
        default_port={"tls": 993, "starttls": 143},
    )
    smtp = _upstream(
        v,
        v.table(upstream, "smtp", f"{p}.upstream", required=True),
        f"{p}.upstream.smtp",
        default_port={"tls": 465, "starttls": 587},
    )
    if None in (name, imap, smtp) or not addresses:
        return None
    assert name is not None and imap is not None and smtp is not None
    return Account(
        name=name,
        addresses=addresses,
        local=local,
        imap=imap,
        smtp=smtp,
        username=username,
        policy=policy,
    )


def _addresses(v: _Validator, t: Mapping[str, Any], p: str) -> tuple[str, ...]:
    raw = t.get("addresses")
    if raw is None:
        v.problem(f"{p}.addresses", "nothing", "a list of e-mail addresses")
        return ()
    if not isinstance(raw, list) or not raw:
        v.problem(f"{p}.addresses", _describe(raw), "a non-empty list of e-mail addresses")
        return ()
    good = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and _ADDRESS_RE.match(item):
            good.append(normalize_address(item))
        else:
            v.problem(
                f"{p}.addresses[{i}]", _describe(item), "an e-mail address like name@example.org"
            )
    return tuple(good)


def normalize_address(address: str) -> str:
    """Domain is case-insensitive, the local part is not (RFC 5321 2.4)."""
    local, _, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


def _local(v: _Validator, t: Mapping[str, Any], p: str) -> LocalListen:
    v.keys(t, p, {"host", "imap_port", "smtp_port", "imaps_port", "smtps_port", "allow_remote"})
    host = v.string(t, p, "host") or "127.0.0.1"
    allow_remote = v.boolean(t, p, "allow_remote", False)
    if not allow_remote and not is_loopback(host):
        v.problem(
            f"{p}.host",
            repr(host),
            "a loopback address (127.0.0.1, ::1, localhost); set allow_remote = true "
            "to listen elsewhere",
        )
    return LocalListen(
        host=host,
        imap_port=v.port(t, p, "imap_port", 1143),
        smtp_port=v.port(t, p, "smtp_port", 1025),
        imaps_port=v.port(t, p, "imaps_port", None),
        smtps_port=v.port(t, p, "smtps_port", None),
        allow_remote=allow_remote,
    )


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream(
    v: _Validator, t: Mapping[str, Any], p: str, default_port: dict[str, int]
) -> UpstreamServer | None:
    v.keys(
        t,
        p,
        {
            "host",
            "port",
            "security",
            "ca_file",
            "pin_sha256",
            "client_cert",
            "client_key",
            "min_tls",
            "timeout",
        },
    )
    host = v.string(t, p, "host", required=True)
    security = _security(v, t, p)
    port = v.port(t, p, "port", default_port.get(security or "tls"))
    ca_file = v.path(t, p, "ca_file")
    if ca_file is not None:
        _check_ca_file(v, ca_file, f"{p}.ca_file")
    pin = _pin(v, t, p)
    client_cert, client_key = v.path(t, p, "client_cert"), v.path(t, p, "client_key")
    _check_client_pair(v, t, p, client_cert, client_key)
    min_tls = _min_tls(v, t, p)
    timeout = v.number(t, p, "timeout", 30.0, low=1.0, high=600.0)
    if host is None or security is None or port is None:
        return None
    return UpstreamServer(
        host=host,
        port=port,
        security=security,
        ca_file=ca_file,
        pin_sha256=pin,
        client_cert=client_cert,
        client_key=client_key,
        min_tls=min_tls,
        timeout=timeout,
    )


def _security(v: _Validator, t: Mapping[str, Any], p: str) -> str | None:
    value = t.get("security")
    if value is None:
        v.problem(f"{p}.security", "nothing", '"tls" (implicit TLS) or "starttls"')
        return None
    if value in SECURITY_MODES:
        return str(value)
    if isinstance(value, str) and value.lower() in ("none", "plain", "plaintext", "off", "false"):
        expected = '"tls" or "starttls": localproxy never talks to a provider without TLS'
    else:
        expected = '"tls" (implicit TLS) or "starttls"'
    v.problem(f"{p}.security", _describe(value), expected)
    return None


def _min_tls(v: _Validator, t: Mapping[str, Any], p: str) -> str:
    value = t.get("min_tls", "1.2")
    if isinstance(value, float):  # min_tls = 1.2 written without quotes
        value = f"{value:.1f}"
    if value in TLS_VERSIONS:
        return str(value)
    v.problem(
        f"{p}.min_tls",
        _describe(t.get("min_tls")),
        '"1.2" or "1.3" (older TLS versions are never allowed)',
    )
    return "1.2"


def parse_pin(text: str) -> bytes:
    """A SHA-256 SPKI pin as base64 (optionally 'sha256/' prefixed) or hex (colons allowed)."""
    s = text.strip().removeprefix("sha256/").removeprefix("sha256:")
    hex_form = s.replace(":", "")
    if re.fullmatch(r"[0-9A-Fa-f]{64}", hex_form):
        return bytes.fromhex(hex_form)
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(text)
    return raw


def _pin(v: _Validator, t: Mapping[str, Any], p: str) -> bytes | None:
    value = t.get("pin_sha256")
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return parse_pin(value)
    except ValueError:
        v.problem(
            f"{p}.pin_sha256",
            _describe(value),
            "the SHA-256 of the server's public key (SPKI) as base64 (44 characters) "
            "or hex (64 digits)",
        )
        return None


def _check_ca_file(v: _Validator, path: Path, p: str) -> None:
    from cryptography import x509

    data = _read_bytes(v, path, p)
    if data is None:
        return
    try:
        if not x509.load_pem_x509_certificates(data):
            raise ValueError("empty")
    except ValueError:
        v.problem(
            p,
            f"{path}, which holds no PEM certificate",
            "a PEM file with one or more CA certificates (-----BEGIN CERTIFICATE-----)",
        )


def _check_client_pair(
    v: _Validator, t: Mapping[str, Any], p: str, cert_path: Path | None, key_path: Path | None
) -> None:
    if (cert_path is None) != (key_path is None):
        missing = "client_key" if key_path is None else "client_cert"
        v.problem(f"{p}.{missing}", "nothing", "client_cert and client_key set together")
        return
    if cert_path is None or key_path is None:
        return
    from localproxy.tls import ClientCertError, load_client_pair

    cert_data = _read_bytes(v, cert_path, f"{p}.client_cert")
    key_data = _read_bytes(v, key_path, f"{p}.client_key")
    if cert_data is None or key_data is None:
        return
    try:
        load_client_pair(cert_data, key_data)
    except ClientCertError as exc:
        v.problem(
            f"{p}.{exc.which}",
            f"{cert_path if exc.which == 'client_cert' else key_path} ({exc.found})",
            exc.expected,
        )


def _read_bytes(v: _Validator, path: Path, p: str) -> bytes | None:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        v.problem(p, f"{path}, a directory", "a file")
    except PermissionError:
        v.problem(p, f"{path}, which this user may not read", "a readable file")
    except OSError as exc:
        v.problem(p, f"{path} ({exc.strerror})", "a readable file")
    return None


def _check_unique_names(v: _Validator, raw: list[Any]) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            v.problem(
                f"account[{i}].name",
                repr(name),
                f"a name not already used by account[{seen[name]}]",
            )
        seen.setdefault(name, i)


def _check_port_clashes(v: _Validator, listeners: list[LocalListen]) -> None:
    used: dict[tuple[str, int], str] = {}
    for i, local in enumerate(listeners):
        for key in ("imap_port", "smtp_port", "imaps_port", "smtps_port"):
            port = getattr(local, key)
            if port is None:
                continue
            here = f"account[{i}].local.{key}"
            slot = (local.host, port)
            if slot in used:
                v.problem(here, str(port), f"a port not already used by {used[slot]}")
            else:
                used[slot] = here


def _describe(value: Any) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a table"
    return f"{value!r} ({kind})"


# --------------------------------------------------------------------------- validator


class _Validator:
    """Typed getters that record a problem instead of raising."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[ConfigProblem] = []

    def problem(self, path: str, found: str, expected: str) -> None:
        self.problems.append(ConfigProblem(path, found, expected))

    @staticmethod
    def _join(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def keys(self, t: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
        for key in t:
            if key not in allowed:
                hint = _closest(key, allowed)
                expected = f"one of: {', '.join(sorted(allowed))}"
                if hint:
                    expected = (
                        f"{hint!r} (did you mean it?); allowed keys: {', '.join(sorted(allowed))}"
                    )
                self.problem(self._join(prefix, key), "an unknown key", expected)

    def table(
        self, t: Mapping[str, Any], key: str, prefix: str = "", required: bool = False
    ) -> Mapping[str, Any]:
        value = t.get(key)
        if value is None:
            if required:
                self.problem(
                    self._join(prefix, key), "nothing", f"a [{self._join(prefix, key)}] table"
                )
            return {}
        if not isinstance(value, Mapping):
            self.problem(self._join(prefix, key), _describe(value), "a table")
            return {}
        return value

    def _get(
        self,
        t: Mapping[str, Any],
        prefix: str,
        key: str,
        kinds: tuple[type, ...],
        expected: str,
        default: Any,
        required: bool = False,
    ) -> Any:
        value = t.get(key)
        if value is None:
            if required:
                self.problem(self._join(prefix, key), "nothing", expected)
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.problem(self._join(prefix, key), _describe(value), expected)
            return default
        return value

    def string(
        self,
        t: Mapping[str, Any],
        prefix: str,
        key: str,
        required: bool = False,
        pattern: str | None = None,
        pattern_text: str = "",
    ) -> str | None:
        value = self._get(t, prefix, key, (str,), pattern_text or "a string", None, required)
        if value is not None and not value.strip():
            self.problem(
                self._join(prefix, key), "an empty string", pattern_text or "a non-empty string"
            )
            return None
        if value is not None and pattern and not re.match(pattern, value):
            self.problem(self._join(prefix, key), repr(value), pattern_text)
            return None
        return value

    def boolean(self, t: Mapping[str, Any], prefix: str, key: str, default: Any) -> Any:
        return self._get(t, prefix, key, (bool,), "true or false", default)

    def integer(
        self, t: Mapping[str, Any], prefix: str, key: str, default: int, low: int | None = None
    ) -> int:
        value = self._get(t, prefix, key, (int,), "an integer", default)
        if low is not None and value < low:
            self.problem(self._join(prefix, key), str(value), f"an integer >= {low}")
            return default
        return int(value)

    def number(
        self, t: Mapping[str, Any], prefix: str, key: str, default: float, low: float, high: float
    ) -> float:
        expected = f"a number of seconds between {low:g} and {high:g}"
        value = self._get(t, prefix, key, (int, float), expected, default)
        if not low <= value <= high:
            self.problem(self._join(prefix, key), str(value), expected)
            return default
        return float(value)

    def port(self, t: Mapping[str, Any], prefix: str, key: str, default: int | None) -> Any:
        expected = "a port number from 1 to 65535"
        value = self._get(t, prefix, key, (int,), expected, default)
        if value is not None and not 1 <= value <= 65535:
            self.problem(self._join(prefix, key), f"{value} (integer)", expected)
            return default
        return value

    def choice(
        self, t: Mapping[str, Any], prefix: str, key: str, choices: tuple[str, ...], default: Any
    ) -> Any:
        value = t.get(key, default)
        if value is not None and value not in choices:
            self.problem(
                self._join(prefix, key),
                _describe(value),
                "one of " + ", ".join(f'"{c}"' for c in choices),
            )
            return default
        return value

    def path(
        self, t: Mapping[str, Any], prefix: str, key: str, must_exist: bool = True
    ) -> Path | None:
        value = self._get(t, prefix, key, (str,), "a file path (string)", None)
        if value is None:
            return None
        try:
            path = Path(value).expanduser()
        except RuntimeError:  # ~name/... for a user this system does not know
            self.problem(self._join(prefix, key), repr(value), "a path (~ only for known users)")
            return None
        if not path.is_absolute():
            path = self.base_dir / path  # relative paths are relative to the config file
        if must_exist and (missing := _missing(path)):
            self.problem(self._join(prefix, key), f"{path}, {missing}", "an existing file")
            return None
        return path


def _missing(path: Path) -> str | None:
    """Why path is not an existing file's, or None. Path.exists() raises, instead of
    answering False, for a name too long or a directory on the way this user may not read."""
    try:
        return None if path.exists() else "which does not exist"
    except OSError as exc:
        return f"which cannot be looked up ({exc.strerror})"


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return match[0] if match else None


# --------------------------------------------------------------------------- output


def config_as_dict(config: Config) -> dict[str, Any]:
    """The effective configuration (defaults filled in) as plain TOML/JSON data."""

    def server(s: UpstreamServer) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": s.host,
            "port": s.port,
            "security": s.security,
            "min_tls": s.min_tls,
            "timeout": s.timeout,
        }
        if s.ca_file:
            out["ca_file"] = str(s.ca_file)
        if s.pin_sha256:
            out["pin_sha256"] = base64.b64encode(s.pin_sha256).decode()
        if s.client_cert:
            out["client_cert"], out["client_key"] = str(s.client_cert), str(s.client_key)
        return out

    def local(loc: LocalListen) -> dict[str, Any]:
        out: dict[str, Any] = {
            "host": loc.host,
            "imap_port": loc.imap_port,
            "smtp_port": loc.smtp_port,
        }
        for key in ("imaps_port", "smtps_port"):
            if getattr(loc, key) is not None:
                out[key] = getattr(loc, key)
        out["allow_remote"] = loc.allow_remote
        return out

    return {
        "proxy": {
            "data_dir": str(config.proxy.data_dir),
            "log_level": config.proxy.log_level,
            "max_message_size": config.proxy.max_message_size,
        },
        "policy": _policy_dict(config.policy),
        "account": [
            {
                "name": a.name,
                "addresses": list(a.addresses),
                "username": a.login,
                **({"policy": _policy_dict(a.policy)} if a.policy else {}),
                "local": local(a.local),
                "upstream": {"imap": server(a.imap), "smtp": server(a.smtp)},
            }
            for a in config.accounts
        ],
    }


def dump_toml(data: Mapping[str, Any]) -> str:
    """Minimal TOML writer for config_as_dict() output (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    _dump_table(data, [], lines, array_item=False)
    return "\n".join(lines).strip() + "\n"


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(x) for x in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _policy_dict(policy: Policy) -> dict[str, Any]:
    def rules(table: dict[str, Rule]) -> dict[str, Any]:
        return {
            k: {f: getattr(r, f) for f in ("encrypt", "sign", "method") if getattr(r, f)}
            for k, r in table.items()
        }

    out: dict[str, Any] = {
        k: v for k, v in (("encrypt", policy.encrypt), ("sign", policy.sign)) if v is not None
    }
    for name in ("autocrypt", "prefer_encrypt"):
        if getattr(policy, name) is not None:
            out[name] = getattr(policy, name)
    if policy.smime_ca_file is not None:
        out["smime_ca_file"] = str(policy.smime_ca_file)
    if policy.domains:
        out["domain"] = rules(policy.domains)
    if policy.addresses:
        out["address"] = rules(policy.addresses)
    return out


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_scalar(key)


def _is_nested(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)
    )


def _dump_table(t: Mapping[str, Any], path: list[str], lines: list[str], array_item: bool) -> None:
    has_scalars = any(not _is_nested(v) for v in t.values())
    if path and (array_item or has_scalars):  # a table of only tables needs no header
        name = ".".join(_toml_key(k) for k in path)
        lines.append("")
        lines.append(f"[[{name}]]" if array_item else f"[{name}]")
    nested = []
    for key, value in t.items():
        if _is_nested(value):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_scalar(value)}")
    for key, value in nested:
        if isinstance(value, Mapping):
            _dump_table(value, [*path, key], lines, array_item=False)
        else:
            for item in value:
                _dump_table(item, [*path, key], lines, array_item=True)
