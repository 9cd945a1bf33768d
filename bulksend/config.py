"""bulksend.toml → frozen dataclasses, validated in one pass when the program starts (DESIGN §4).

Every section is checked here, including the files the config points at (CA bundles, DKIM
keys), so a mistake stops `bulksend` at startup with `FILE: KEY: expected …, got …` instead of
halfway through a send. Nothing here reads os.environ: `*_env` keys name variables that the
CLI fetches through `resolve_secret`. Tables are read by `config_reader.Section`, single values
parsed by `config_values`.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from bulksend import config_values as values
from bulksend.config_example import EXAMPLE_CONFIG
from bulksend.config_reader import Section, syntax_error
from bulksend.durations import Limit, parse_duration, parse_limit
from bulksend.errors import ConfigError, NotFound

__all__ = [
    "EXAMPLE_CONFIG", "AccountConfig", "BouncesConfig", "Config", "DeliveryConfig", "DkimKey",
    "DnsConfig", "Limit", "SenderConfig", "ServerConfig", "load_config", "parse_config",
    "parse_listen", "resolve_secret",
]

Security = Literal["tls", "starttls", "none"]
Window = Literal["rolling", "calendar"]
Protocol = Literal["imap", "pop3"]


@dataclass(frozen=True)
class SenderConfig:
    """[sender]: the From identity, List-Id, VERP return path and unsubscribe endpoints."""

    from_address: str  # the key `from`: "Name <addr>" or "addr", as a header value
    list_id: str
    return_path: str  # a bare address; VERP makes it local+TOKEN@domain
    unsubscribe_url: str  # http(s), no trailing slash: links are f"{unsubscribe_url}/{token}"
    reply_to: str | None = None
    unsubscribe_mailto: str | None = None  # a bare address
    secret_env: str = "BULKSEND_SECRET"


@dataclass(frozen=True)
class DkimKey:
    """[[dkim]]: one signing domain; its key file loaded once here, the signer reads it again."""

    domain: str  # lower-cased
    selector: str
    private_key_file: Path  # absolute
    algorithm: values.KeyAlgorithm


@dataclass(frozen=True)
class DeliveryConfig:
    """[delivery]: the retry policy and the claim lease; durations in seconds."""

    max_attempts: int = 8
    retry_after: int = 300
    give_up_after: int = 72 * 3600
    lease: int = 300
    one_cpu: bool = True  # a `send` worker keeps its threads on one CPU (see sender._one_cpu)


@dataclass(frozen=True)
class AccountConfig:
    """[[accounts]]: one SMTP account, its TLS mode, the env name of its password, its limits."""

    name: str
    host: str
    port: int
    security: Security
    allow_insecure: bool = False
    ca_file: Path | None = None  # absolute; None = the system CA store
    username: str | None = None
    password_env: str | None = None  # set exactly when username is
    from_address: str | None = None  # the key `from`: for providers that rewrite From
    limits: tuple[Limit, ...] = ()
    window: Window = "rolling"
    connections: int = 1
    messages_per_connection: int = 100
    weight: int = 1
    helo: str | None = None


@dataclass(frozen=True)
class BouncesConfig:
    """[bounces]: the mailbox that bounces, complaints and mailto unsubscribes arrive in."""

    protocol: Protocol
    host: str
    port: int
    security: Security
    username: str
    password_env: str
    allow_insecure: bool = False
    ca_file: Path | None = None
    folder: str = "INBOX"
    quarantine_folder: str = "bulksend-quarantine"
    soft_bounce_limit: int = 3
    soft_bounce_window: int = 30 * 86400


@dataclass(frozen=True)
class DnsConfig:
    """[dns]: resolvers for dead-domain checks as (ip, port); empty = the system resolver."""

    nameservers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    """[server]: where `bulksend serve` listens."""

    host: str = "127.0.0.1"
    port: int = 8025


@dataclass(frozen=True)
class Config:
    """The whole of bulksend.toml, validated."""

    source: Path  # the config file as given; messages name it
    database: str  # SQLAlchemy URL; a SQLite path is absolute
    timezone: ZoneInfo = ZoneInfo("UTC")
    sender: SenderConfig | None = None
    dkim: tuple[DkimKey, ...] = ()
    delivery: DeliveryConfig = DeliveryConfig()
    accounts: tuple[AccountConfig, ...] = ()
    bounces: BouncesConfig | None = None
    dns: DnsConfig = DnsConfig()
    server: ServerConfig = ServerConfig()

    def account(self, name: str) -> AccountConfig:
        """The account called `name`, or NotFound."""
        for account in self.accounts:
            if account.name == name:
                return account
        known = ", ".join(a.name for a in self.accounts) or "none"
        raise NotFound(f"account {name}: not in {self.source} (accounts: {known})")


def load_config(path: Path) -> Config:
    """Read and validate the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: Windows editors add a BOM
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run `bulksend init` or pass --config)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


def parse_config(text: str, source: Path) -> Config:
    """Validate TOML `text`; `source` names the file in messages and anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise syntax_error(exc, text, source) from None
    top = Section(data, "", source, Path(os.path.abspath(source)).parent)
    config = Config(
        source=source,
        database=top.take("database", values.database(top.base)),
        timezone=top.take("timezone", values.timezone, ZoneInfo("UTC")),
        sender=top.table("sender", _sender, None),
        dkim=top.tables("dkim", _dkim, unique=lambda key: key.domain),
        delivery=top.table("delivery", _delivery, DeliveryConfig()),
        accounts=top.tables("accounts", _account, unique=lambda account: account.name),
        bounces=top.table("bounces", _bounces, None),
        dns=top.table("dns", _dns, DnsConfig()),
        server=top.table("server", _server, ServerConfig()),
    )
    top.done()
    return config


def resolve_secret(env_name: str, environ: Mapping[str, str], what: str) -> str:
    """The secret in environment variable `env_name`; `what` names its owner in the error."""
    value = environ.get(env_name)
    if value is None:
        raise ConfigError(f"{what}: environment variable {env_name} is not set")
    if not value:
        raise ConfigError(f"{what}: environment variable {env_name} is empty")
    return value


def parse_listen(value: object) -> tuple[str, int]:
    """"host:port" or "[ipv6]:port" → (host, port) for `serve --listen`; ValueError if malformed."""
    return values.listen(value)


# ---- sections -----------------------------------------------------------------------------

def _sender(sec: Section) -> SenderConfig:
    return SenderConfig(
        from_address=sec.take("from", values.mailbox),
        list_id=sec.take("list_id", values.domain),
        return_path=sec.take("return_path", values.address),
        unsubscribe_url=sec.take("unsubscribe_url", values.url),
        reply_to=sec.take("reply_to", values.mailbox, None),
        unsubscribe_mailto=sec.take("unsubscribe_mailto", values.address, None),
        secret_env=sec.take("secret_env", values.env_name, "BULKSEND_SECRET"),
    )


def _dkim(sec: Section) -> DkimKey:
    domain = sec.take("domain", values.domain).lower()  # DNS names compare case-insensitively
    sec.label(domain)
    selector = sec.take("selector", values.dns_labels)
    path, algorithm = sec.take("private_key_file", values.dkim_key(sec.base))
    return DkimKey(domain, selector, path, algorithm)


def _delivery(sec: Section) -> DeliveryConfig:
    return DeliveryConfig(
        max_attempts=sec.take("max_attempts", values.integer(1), 8),
        retry_after=sec.take("retry_after", parse_duration, 300),
        give_up_after=sec.take("give_up_after", parse_duration, 72 * 3600),
        lease=sec.take("lease", parse_duration, 300),
        one_cpu=sec.take("one_cpu", values.boolean, True),
    )


def _account(sec: Section) -> AccountConfig:
    name = sec.take("name", values.account_name)
    sec.label(name)
    security, allow_insecure, ca_file = _transport(sec)
    username, password_env = _credentials(sec)
    if security == "none" and username is not None:
        raise sec.error("username", 'AUTH would send the password unencrypted (security = "none"); '
                        'remove username and password_env, or use "tls" or "starttls"')
    window = sec.take("window", values.choice("rolling", "calendar"), "rolling")
    return AccountConfig(
        name=name, host=sec.take("host", values.hostname),
        port=sec.take("port", values.port, {"tls": 465, "starttls": 587, "none": 25}[security]),
        security=security, allow_insecure=allow_insecure, ca_file=ca_file,
        username=username, password_env=password_env,
        from_address=sec.take("from", values.mailbox, None),
        limits=_limits(sec, window), window=window,
        connections=sec.take("connections", values.integer(1), 1),
        messages_per_connection=sec.take("messages_per_connection", values.integer(1), 100),
        weight=sec.take("weight", values.integer(1), 1),
        helo=sec.take("helo", values.hostname, None),
    )


def _limits(sec: Section, window: str) -> tuple[Limit, ...]:
    limits = sec.take_list("limits", parse_limit)
    for index, limit in enumerate(limits):
        if window == "calendar" and limit.unit is None:
            raise sec.error(f"limits[{index}]", 'window = "calendar" resets at the start of each '
                            "minute, hour or day, so every limit must be per minute, hour or day; "
                            f'got "{limit.text}" (use window = "rolling" for other periods)')
    return limits


def _bounces(sec: Section) -> BouncesConfig:
    protocol = sec.take("protocol", values.choice("imap", "pop3"))
    security, allow_insecure, ca_file = _transport(sec)
    implicit_tls, plain = (993, 143) if protocol == "imap" else (995, 110)
    # A mailbox always needs a login; with security = "none", allow_insecure covers it in clear.
    username = sec.take("username", values.text)
    return BouncesConfig(
        protocol=protocol, host=sec.take("host", values.hostname),
        port=sec.take("port", values.port, implicit_tls if security == "tls" else plain),
        security=security, allow_insecure=allow_insecure, ca_file=ca_file,
        username=username, password_env=sec.take("password_env", values.env_name),
        folder=sec.take("folder", values.text, "INBOX"),
        quarantine_folder=sec.take("quarantine_folder", values.text, "bulksend-quarantine"),
        soft_bounce_limit=sec.take("soft_bounce_limit", values.integer(1), 3),
        soft_bounce_window=sec.take("soft_bounce_window", parse_duration, 30 * 86400),
    )


def _dns(sec: Section) -> DnsConfig:
    return DnsConfig(sec.take_list("nameservers", values.nameserver))


def _server(sec: Section) -> ServerConfig:
    return ServerConfig(*sec.take("listen", values.listen, ("127.0.0.1", 8025)))


def _transport(sec: Section) -> tuple[Security, bool, Path | None]:
    """security, allow_insecure and ca_file: one set of rules for SMTP and the bounce mailbox."""
    security = sec.take("security", values.choice("tls", "starttls", "none"))
    allow_insecure = sec.take("allow_insecure", values.boolean, False)
    if security == "none" and not allow_insecure:
        raise sec.error("security", '"none" sends everything unencrypted; '
                        'set allow_insecure = true to allow it, or use "tls" or "starttls"')
    ca_file = sec.take("ca_file", values.optional(values.existing_file(sec.base)), None)
    if security == "none" and ca_file is not None:
        raise sec.error("ca_file", 'a CA bundle needs security = "tls" or "starttls"')
    return security, allow_insecure, ca_file


def _credentials(sec: Section) -> tuple[str | None, str | None]:
    username = sec.take("username", values.text, None)
    password_env = sec.take("password_env", values.env_name, None)
    if (username is None) != (password_env is None):
        missing = "password_env" if password_env is None else "username"
        raise sec.error(missing, "missing: username and password_env go together "
                        "(both for AUTH, neither for a relay without AUTH)")
    return username, password_env
