"""Parsers for single values of bulksend.toml: raw TOML value in, typed value out.

Each parser raises ValueError("expected …") and the config reader adds the file, the key and
", got VALUE"; a `Problem` carries a complete message instead (a DKIM key that loads but is too
weak). Durations and limits live in `bulksend.durations`.
"""

from __future__ import annotations

import email.errors
import ipaddress
import os
import re
from collections.abc import Callable
from email.headerregistry import HeaderRegistry
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

T = TypeVar("T")
Parser = Callable[[Any], T]
KeyAlgorithm = Literal["rsa", "ed25519"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LABELS = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_HEADERS = HeaderRegistry()


class Problem(ValueError):
    """A ValueError whose message is complete: the reader does not append ", got VALUE"."""


def table(value: object) -> dict[str, Any]:
    """A TOML table."""
    if isinstance(value, dict):
        return value
    raise ValueError("expected a table")


def array(value: object) -> list[Any]:
    """A TOML array."""
    if isinstance(value, list):
        return value
    raise ValueError("expected an array [...]")


def text(value: object) -> str:
    """A non-empty one-line string, stripped."""
    if isinstance(value, str) and value.strip() and not re.search(r"[\x00-\x1f\x7f]", value):
        return value.strip()
    raise ValueError("expected a non-empty one-line string")


def integer(low: int, high: int | None = None) -> Parser[int]:
    """A parser for integers in [low, high] (unbounded above when high is None); not booleans."""
    expected = f"expected an integer {low}-{high}" if high else f"expected an integer >= {low}"

    def parse(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or value):
            return value
        raise ValueError(expected)
    return parse


port = integer(1, 65535)


def boolean(value: object) -> bool:
    """true or false."""
    if isinstance(value, bool):
        return value
    raise ValueError("expected true or false")


def choice(*options: str) -> Parser[Any]:
    """A parser accepting exactly one of `options`."""
    def parse(value: object) -> str:
        if value in options:
            return str(value)
        raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
    return parse


def optional(parse: Parser[T]) -> Parser[T | None]:
    """`parse`, except that "" means "not set" (the documented example writes `ca_file = ""`)."""
    return lambda value: None if value == "" else parse(value)


def env_name(value: object) -> str:
    """The name of an environment variable (never its value: secrets stay out of the file)."""
    if isinstance(value, str) and _ENV_NAME.fullmatch(value):
        return value
    raise ValueError("expected the NAME of an environment variable ([A-Za-z_][A-Za-z0-9_]*), "
                     "not the secret itself")


def account_name(value: object) -> str:
    """An account name: letters, digits, ".", "_", "-"."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._-]+", value):
        return value
    raise ValueError('expected a name of letters, digits, ".", "_" and "-"')


def _ascii_name(value: object) -> str:
    """A host or domain name in its ASCII (IDNA) form; "" when it cannot be one."""
    try:
        return value.encode("idna").decode("ascii") if isinstance(value, str) else ""
    except UnicodeError:
        return ""


def hostname(value: object) -> str:
    """A host name (IDN allowed) or an IP address."""
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if _LABELS.fullmatch(_ascii_name(value).removesuffix(".")):
            return value
    raise ValueError("expected a host name or IP address")


def dns_labels(value: object) -> str:
    """Dot-separated DNS labels, as a DKIM selector."""
    if _LABELS.fullmatch(_ascii_name(value)):
        return str(value)
    raise ValueError('expected DNS labels like "s2026"')


def domain(value: object) -> str:
    """A domain-like name with at least two labels ("news.example.com")."""
    ascii_name = _ascii_name(value)
    if _DOMAIN.fullmatch(ascii_name) and len(ascii_name) <= 253:
        return str(value)
    raise ValueError('expected a domain-like name like "news.example.com"')


def _check_addr_spec(addr_spec: str, expected: str) -> None:
    # Syntax only (no DNS). test_environment=True admits the special-use .test domain used by
    # loopback demos and tests; .local/.invalid and friends stay refused.
    try:
        validate_email(addr_spec, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise ValueError(f"{expected} ({exc})") from None


def address(value: object) -> str:
    """A bare email address (envelope sender, mailto target), stripped."""
    expected = 'expected an email address like "bounces@example.com"'
    if not isinstance(value, str) or not value.strip() or re.search(r"[\s<>]", value.strip()):
        raise ValueError(expected)
    _check_addr_spec(value.strip(), expected)
    return value.strip()


def mailbox(value: object) -> str:
    """One address with an optional display name, normalized as a header value."""
    expected = 'expected one address, optionally with a name, like "News <news@example.com>"'
    if not isinstance(value, str) or re.search(r"[\x00-\x1f]", value):  # CR/LF: header injection
        raise ValueError(expected)
    try:
        header = _HEADERS("from", value)
    except (IndexError, ValueError, email.errors.MessageError):  # stdlib's parser crashes on junk
        raise ValueError(expected) from None
    if header.defects or len(header.addresses) != 1 or header.groups[0].display_name is not None:
        raise ValueError(expected)
    _check_addr_spec(header.addresses[0].addr_spec, expected)
    return str(header.addresses[0])


def url(value: object) -> str:
    """An http(s) URL with a host, no query or fragment (tokens are appended as a path segment)."""
    if isinstance(value, str) and not re.search(r"\s", value):
        try:
            parts = urlsplit(value)
            if parts.scheme in ("http", "https") and parts.hostname and parts.port != 0 \
                    and not parts.query and not parts.fragment:
                return value.rstrip("/")
        except ValueError:  # a malformed [IPv6] host or port
            pass
    raise ValueError('expected an http(s) URL with a host and no query like "https://example.com/u"')


def timezone(value: object) -> ZoneInfo:
    """An IANA time zone."""
    try:
        if isinstance(value, str) and value:
            return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        pass
    raise ValueError('expected an IANA time zone name like "UTC" or "Europe/Moscow"')


def database(base: Path) -> Parser[str]:
    """A parser for the SQLAlchemy URL; relative SQLite paths become absolute under `base`."""
    def parse(value: object) -> str:
        if isinstance(value, str) and re.fullmatch(r"postgresql\+psycopg://\S+", value):
            return value
        if not isinstance(value, str) or not re.fullmatch(r"sqlite:///\S+", value):
            raise ValueError('expected "sqlite:///PATH" or "postgresql+psycopg://USER@HOST/DB"')
        path, _, query = value.removeprefix("sqlite:///").partition("?")
        if path == ":memory:" or path.startswith("/"):
            return value
        # Relative to the config file, not the cwd, so cron finds the same database.
        return f"sqlite:///{os.path.normpath(base / path)}" + (f"?{query}" if query else "")
    return parse


def existing_file(base: Path) -> Parser[Path]:
    """A parser for the path of an existing file, relative to `base`; returns it absolute."""
    def parse(value: object) -> Path:
        if isinstance(value, str) and value.strip():
            path = Path(os.path.normpath(base / value.strip()))
            if path.is_file():
                return path
        raise ValueError(f"expected the path of an existing file (relative to {base})")
    return parse


_KEY_WANTED = "an RSA key of at least 2048 bits or an Ed25519 key, PEM (PKCS#1 or PKCS#8)"


def dkim_key(base: Path) -> Parser[tuple[Path, KeyAlgorithm]]:
    """A parser for a DKIM private key file: loads it to check it, returns (path, algorithm)."""
    def parse(value: object) -> tuple[Path, KeyAlgorithm]:
        # Imported here: only a config with [[dkim]] needs cryptography, and it is slow to import.
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        path = existing_file(base)(value)
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except TypeError:
            raise Problem(f"{path} is encrypted; expected an unencrypted key "
                          "(protect it with file permissions)") from None
        except (ValueError, UnsupportedAlgorithm, OSError):
            raise Problem(f"{path} is not {_KEY_WANTED}") from None
        if isinstance(key, Ed25519PrivateKey):
            return path, "ed25519"
        if isinstance(key, RSAPrivateKey) and key.key_size >= 2048:
            return path, "rsa"
        found = (f"a {key.key_size}-bit RSA key" if isinstance(key, RSAPrivateKey)
                 else f"a key of an unsupported type ({type(key).__name__})")
        raise Problem(f"{path} is {found}; expected {_KEY_WANTED}")
    return parse


_HOST_PORT = re.compile(r"\[(?P<v6>[^\]]+)\](?::(?P<v6port>\d+))?"  # [::1]:53
                        r"|(?P<host>[^:\[\]]+)(?::(?P<port>\d+))?"  # host:53
                        r"|(?P<bare>[0-9A-Fa-f:.]+)")  # ::1 (no port possible)


def host_port(value: object, default_port: int | None, ip_only: bool) -> tuple[str, int]:
    """"host", "host:port", "[ipv6]:port" or a bare IPv6 address → (host, port)."""
    expected = ('expected an IP address with an optional port, like "127.0.0.1:5353" or "[::1]:53"'
                if ip_only else 'expected host:port like "127.0.0.1:8025" or "[::1]:8025"')
    match = _HOST_PORT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(expected)
    host = match["v6"] or match["host"] or match["bare"]
    number = int(match["v6port"] or match["port"] or default_port or 0)
    try:
        if ip_only or not match["host"]:
            ipaddress.ip_address(host)
        host = hostname(host)
    except ValueError:
        raise ValueError(expected) from None
    if not 1 <= number <= 65535:
        raise ValueError(expected)
    return host, number


def nameserver(value: object) -> tuple[str, int]:
    """A DNS server "ip" or "ip:port" (port 53 by default)."""
    return host_port(value, 53, ip_only=True)


def listen(value: object) -> tuple[str, int]:
    """A listening address "host:port" or "[ipv6]:port"."""
    return host_port(value, None, ip_only=False)
