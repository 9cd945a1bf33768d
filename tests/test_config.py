"""bulksend.toml parsing: every DESIGN §4 rule, and the messages a user sees when one is broken."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bulksend.config import (
    EXAMPLE_CONFIG, AccountConfig, Config, load_config, parse_config, parse_listen,
    resolve_secret,
)
from bulksend.durations import Limit, parse_duration, parse_limit
from bulksend.errors import ConfigError, NotFound

DELETE = object()


# ---- building configs ---------------------------------------------------------------------

def baseline() -> dict[str, Any]:
    """A config using every section, valid in the `config_dir` fixture's directory."""
    return {
        "database": "sqlite:///bulksend.db",
        "timezone": "Europe/Moscow",
        "sender": {
            "from": "Example News <news@example.com>", "reply_to": "support@example.com",
            "list_id": "news.example.com", "return_path": "bounces@example.com",
            "unsubscribe_url": "https://example.com/u",
            "unsubscribe_mailto": "unsubscribe@example.com", "secret_env": "BULKSEND_SECRET",
        },
        "dkim": [{"domain": "example.com", "selector": "s2026", "private_key_file": "dkim/ed25519.pem"}],
        "delivery": {"max_attempts": 8, "retry_after": "5m", "give_up_after": "72h", "lease": "5m"},
        "accounts": [
            {"name": "yandex-1", "host": "smtp.yandex.ru", "port": 465, "security": "tls",
             "username": "news@yandex.ru", "password_env": "YANDEX1_PASSWORD",
             "limits": ["20/minute", "100/hour", "500/day"]},
            {"name": "relay-1", "host": "relay.example.net", "security": "starttls", "ca_file": "ca.pem"},
        ],
        "bounces": {"protocol": "imap", "host": "imap.example.com", "security": "tls",
                    "username": "bounces@example.com", "password_env": "BOUNCES_PASSWORD"},
        "dns": {"nameservers": ["127.0.0.1:5353"]},
        "server": {"listen": "127.0.0.1:8025"},
    }


def dump(data: dict[str, Any]) -> str:
    """TOML text for `data` (JSON scalars and arrays are valid TOML values)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables += [f"[{key}]", *(f"{k} = {json.dumps(v)}" for k, v in value.items())]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                tables += [f"[[{key}]]", *(f"{k} = {json.dumps(v)}" for k, v in item.items())]
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + tables) + "\n"


def edited(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """The baseline with the value at `path` replaced (or removed, for DELETE)."""
    data = copy.deepcopy(baseline())
    *parents, last = path
    target: Any = data
    for step in parents:
        target = target[step]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """PEM private keys of every kind the DKIM check must tell apart (RSA generated once)."""
    def pem(key: Any, fmt: serialization.PrivateFormat, password: bytes | None = None) -> bytes:
        encryption = (serialization.BestAvailableEncryption(password) if password
                      else serialization.NoEncryption())
        return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)

    pkcs1, pkcs8 = serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "ed25519": pem(ed25519.Ed25519PrivateKey.generate(), pkcs8),
        "rsa2048-pkcs1": pem(rsa2048, pkcs1),
        "rsa2048-pkcs8": pem(rsa2048, pkcs8),
        "rsa2048-encrypted": pem(rsa2048, pkcs8, b"hunter2"),
        "rsa1024": pem(rsa.generate_private_key(public_exponent=65537, key_size=1024), pkcs1),
        "ec-p256": pem(ec.generate_private_key(ec.SECP256R1()), pkcs8),
        "garbage": b"not a key\n",
    }


@pytest.fixture
def config_dir(tmp_path: Path, keys: dict[str, bytes]) -> Path:
    """A directory holding the files the baseline config points at."""
    (tmp_path / "dkim").mkdir()
    for name, pem in keys.items():
        (tmp_path / "dkim" / f"{name}.pem").write_bytes(pem)
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return tmp_path


def parse(data: dict[str, Any], directory: Path) -> Config:
    return parse_config(dump(data), directory / "bulksend.toml")


def error_of(data: dict[str, Any], directory: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data, directory)
    return str(caught.value)


# ---- the whole file -----------------------------------------------------------------------

def test_baseline_reads_every_section_into_frozen_values(config_dir: Path) -> None:
    config = parse(baseline(), config_dir)
    assert config.database == f"sqlite:///{config_dir}/bulksend.db"
    assert str(config.timezone) == "Europe/Moscow"
    assert config.sender is not None and config.sender.from_address == "Example News <news@example.com>"
    assert config.dkim[0].private_key_file == config_dir / "dkim" / "ed25519.pem"
    assert config.dkim[0].algorithm == "ed25519"
    yandex, relay = config.accounts
    assert (yandex.port, yandex.username, yandex.password_env) == (465, "news@yandex.ru", "YANDEX1_PASSWORD")
    assert [limit.text for limit in yandex.limits] == ["20/minute", "100/hour", "500/day"]
    assert (relay.port, relay.ca_file, relay.username, relay.connections) == (587, config_dir / "ca.pem", None, 1)
    assert config.bounces is not None and (config.bounces.port, config.bounces.folder) == (993, "INBOX")
    assert config.dns.nameservers == (("127.0.0.1", 5353),)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8025)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.accounts[0].port = 25  # type: ignore[misc]


def test_only_database_is_required_and_the_rest_defaults(tmp_path: Path) -> None:
    config = parse({"database": "sqlite:///:memory:"}, tmp_path)
    assert (config.sender, config.bounces, config.dkim, config.accounts) == (None, None, (), ())
    assert str(config.timezone) == "UTC"
    delivery = config.delivery
    assert (delivery.max_attempts, delivery.retry_after, delivery.give_up_after, delivery.lease) == (8, 300, 259200, 300)
    assert delivery.one_cpu is True
    assert parse({"database": "sqlite:///:memory:", "delivery": {"one_cpu": False}},
                 tmp_path).delivery.one_cpu is False
    assert config.dns.nameservers == ()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8025)


def test_account_defaults(config_dir: Path) -> None:
    account = parse(baseline(), config_dir).account("relay-1")
    assert (account.limits, account.window, account.connections, account.messages_per_connection,
            account.weight, account.helo, account.from_address, account.allow_insecure) == \
        ((), "rolling", 1, 100, 1, None, None, False)


def test_account_lookup_by_name_and_unknown_name(config_dir: Path) -> None:
    config = parse(baseline(), config_dir)
    assert isinstance(config.account("yandex-1"), AccountConfig)
    with pytest.raises(NotFound, match="account nope: not in .*bulksend.toml \\(accounts: yandex-1, relay-1\\)"):
        config.account("nope")


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///bulksend.db", "sqlite:///{dir}/bulksend.db"),
    ("sqlite:///data/../state/b.db", "sqlite:///{dir}/state/b.db"),
    ("sqlite:///bulksend.db?timeout=10", "sqlite:///{dir}/bulksend.db?timeout=10"),
    ("sqlite:////var/lib/bulksend.db", "sqlite:////var/lib/bulksend.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("postgresql+psycopg://bulk@db.example.com/bulksend", "postgresql+psycopg://bulk@db.example.com/bulksend"),
])
def test_database_url_sqlite_path_is_made_absolute_against_the_config_dir(
        tmp_path: Path, url: str, expected: str) -> None:
    assert parse({"database": url}, tmp_path).database == expected.format(dir=tmp_path)


def test_relative_config_path_resolves_database_against_its_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    monkeypatch.chdir(tmp_path)
    config = parse_config('database = "sqlite:///bulksend.db"\n', Path("etc/bulksend.toml"))
    assert config.database == f"sqlite:///{tmp_path}/etc/bulksend.db"
    assert config.source == Path("etc/bulksend.toml")


@pytest.mark.parametrize(("security", "port"), [("tls", 465), ("starttls", 587), ("none", 25)])
def test_account_port_defaults_by_security(config_dir: Path, security: str, port: int) -> None:
    data = edited(("accounts", 1, "security"), security)
    del data["accounts"][1]["ca_file"]
    data["accounts"][1]["allow_insecure"] = True
    assert parse(data, config_dir).accounts[1].port == port


@pytest.mark.parametrize(("protocol", "security", "port"), [
    ("imap", "tls", 993), ("imap", "starttls", 143), ("pop3", "tls", 995), ("pop3", "starttls", 110),
    ("imap", "none", 143), ("pop3", "none", 110),
])
def test_bounce_mailbox_port_defaults_by_protocol_and_security(
        config_dir: Path, protocol: str, security: str, port: int) -> None:
    data = edited(("bounces", "protocol"), protocol)
    data["bounces"].update(security=security, allow_insecure=True)
    bounces = parse(data, config_dir).bounces
    assert bounces is not None and bounces.port == port


def test_bounce_mailbox_defaults(config_dir: Path) -> None:
    bounces = parse(baseline(), config_dir).bounces
    assert bounces is not None
    assert (bounces.folder, bounces.quarantine_folder, bounces.soft_bounce_limit, bounces.soft_bounce_window) == \
        ("INBOX", "bulksend-quarantine", 3, 30 * 86400)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("from", "news@example.com", "news@example.com"),
    ("from", '"Doe, John" <j@example.com>', '"Doe, John" <j@example.com>'),
    ("from", "Новости <news@пример.рф>", "Новости <news@пример.рф>"),
    ("from", "Demo <news@bulksend.test>", "Demo <news@bulksend.test>"),
    ("unsubscribe_url", "https://example.com/u/", "https://example.com/u"),
    ("unsubscribe_url", "http://127.0.0.1:8025/u", "http://127.0.0.1:8025/u"),
])
def test_sender_values_are_normalized(config_dir: Path, key: str, value: str, expected: str) -> None:
    sender = parse(edited(("sender", key), value), config_dir).sender
    assert sender is not None
    assert {"from": sender.from_address, "unsubscribe_url": sender.unsubscribe_url}[key] == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("::1", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
])
def test_nameservers_default_to_port_53(config_dir: Path, text: str, expected: tuple[str, int]) -> None:
    assert parse(edited(("dns", "nameservers"), [text]), config_dir).dns.nameservers == (expected,)


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)),
    ("localhost:8025", ("localhost", 8025)),
    ("[::1]:8025", ("::1", 8025)),
])
def test_server_listen(config_dir: Path, text: str, expected: tuple[str, int]) -> None:
    server = parse(edited(("server", "listen"), text), config_dir).server
    assert (server.host, server.port) == expected
    assert parse_listen(text) == expected


# ---- every rule, and the message naming the key -------------------------------------------

ACCOUNT0, ACCOUNT1 = ("accounts", 0), ("accounts", 1)
YANDEX, RELAY = 'accounts "yandex-1"', 'accounts "relay-1"'
SECRET = "secrets are refused in the config file"

REFUSED = [
    # top level
    (("database",), DELETE, 'database: missing; expected "sqlite:///PATH" or "postgresql+psycopg://USER@HOST/DB"'),
    (("database",), "mysql://u@h/db", 'database: expected "sqlite:///PATH" or "postgresql+psycopg://USER@HOST/DB", got "mysql://u@h/db"'),
    (("database",), "postgresql://u@h/db", 'database: expected "sqlite:///PATH" or "postgresql+psycopg://'),
    (("database",), "sqlite:///", "database: expected"),
    (("database",), 5, "database: expected"),
    (("timezone",), "Mars/Olympus", 'timezone: expected an IANA time zone name like "UTC" or "Europe/Moscow", got "Mars/Olympus"'),
    (("timezone",), "../../etc/passwd", "timezone: expected an IANA time zone name"),
    (("databse",), "x", "databse: unknown key (did you mean 'database'?)"),
    (("senders",), {"from": "a@example.com"}, "senders: unknown key (did you mean 'sender'?)"),
    (("sender",), "news@example.com", 'sender: expected a table, got "news@example.com"'),
    # [sender]
    (("sender", "from"), DELETE, "sender.from: missing; expected one address"),
    (("sender", "from"), "a@example.com, b@example.com", 'sender.from: expected one address, optionally with a name, like "News <news@example.com>", got "a@example.com, b@example.com"'),
    (("sender", "from"), "bad@@example.com", "sender.from: expected one address"),
    (("sender", "from"), "News <news@example.com>\r\nBcc: all@example.com", "sender.from: expected one address"),
    (("sender", "from"), "News <news@host.local>", "sender.from: expected one address"),
    (("sender", "from"), "News news@example.com", "sender.from: expected one address"),
    (("sender", "from"), "Doe, John <j@example.com>", "sender.from: expected one address"),  # unquoted comma
    (("sender", "reply_to"), "support", "sender.reply_to: expected one address"),
    (("sender", "return_path"), "Bounces <bounces@example.com>", 'sender.return_path: expected an email address like "bounces@example.com", got "Bounces <bounces@example.com>"'),
    (("sender", "return_path"), DELETE, "sender.return_path: missing; expected an email address"),
    (("sender", "unsubscribe_mailto"), "mailto:unsubscribe@example.com", "sender.unsubscribe_mailto: expected an email address"),
    (("sender", "unsubscribe_url"), "ftp://example.com/u", 'sender.unsubscribe_url: expected an http(s) URL with a host and no query like "https://example.com/u", got "ftp://example.com/u"'),
    (("sender", "unsubscribe_url"), "https:///u", "sender.unsubscribe_url: expected an http(s) URL"),
    (("sender", "unsubscribe_url"), "example.com/u", "sender.unsubscribe_url: expected an http(s) URL"),
    (("sender", "unsubscribe_url"), "https://example.com/u?list=1", "sender.unsubscribe_url: expected an http(s) URL"),
    (("sender", "unsubscribe_url"), "https://example.com:99999/u", "sender.unsubscribe_url: expected an http(s) URL"),
    (("sender", "list_id"), "news", 'sender.list_id: expected a domain-like name like "news.example.com", got "news"'),
    (("sender", "list_id"), "news list.example.com", "sender.list_id: expected a domain-like name"),
    (("sender", "secret_env"), "s3cr3t value!", 'sender.secret_env: expected the NAME of an environment variable ([A-Za-z_][A-Za-z0-9_]*), not the secret itself, got "s3cr3t value!"'),
    (("sender", "replyto"), "a@example.com", "sender.replyto: unknown key (did you mean 'reply_to'?)"),
    (("sender", "secret"), "hunter2", f'sender.secret: {SECRET}; put it in an environment variable and write its name as secret_env = "VARIABLE"'),
    # [[dkim]]
    (("dkim", 0, "domain"), "example", 'dkim[0].domain: expected a domain-like name like "news.example.com", got "example"'),
    (("dkim", 0, "selector"), "s 2026", 'dkim "example.com".selector: expected DNS labels like "s2026", got "s 2026"'),
    (("dkim", 0, "selector"), DELETE, 'dkim "example.com".selector: missing'),
    (("dkim", 0, "private_key_file"), "dkim/missing.pem", 'dkim "example.com".private_key_file: expected the path of an existing file (relative to '),
    (("dkim", 0, "private_key_file"), "dkim/rsa1024.pem", 'dkim "example.com".private_key_file: {dir}/dkim/rsa1024.pem is a 1024-bit RSA key; expected an RSA key of at least 2048 bits or an Ed25519 key'),
    (("dkim", 0, "private_key_file"), "dkim/ec-p256.pem", 'dkim "example.com".private_key_file: {dir}/dkim/ec-p256.pem is a key of an unsupported type ('),
    (("dkim", 0, "private_key_file"), "dkim/garbage.pem", 'dkim "example.com".private_key_file: {dir}/dkim/garbage.pem is not an RSA key of at least 2048 bits'),
    (("dkim", 0, "private_key_file"), "dkim/rsa2048-encrypted.pem", 'dkim "example.com".private_key_file: {dir}/dkim/rsa2048-encrypted.pem is encrypted'),
    (("dkim", 0, "private_key"), "-----BEGIN PRIVATE KEY-----", f'dkim "example.com".private_key: {SECRET}; put it in a file and name that file with private_key_file'),
    (("dkim",), [{"domain": "example.com", "selector": "a", "private_key_file": "dkim/ed25519.pem"},
                 {"domain": "EXAMPLE.com", "selector": "b", "private_key_file": "dkim/ed25519.pem"}],
     'dkim[1]: duplicate "example.com" (already used by dkim[0])'),
    # [delivery]
    (("delivery", "max_attempts"), 0, "delivery.max_attempts: expected an integer >= 1, got 0"),
    (("delivery", "max_attempts"), True, "delivery.max_attempts: expected an integer >= 1, got true"),
    (("delivery", "retry_after"), "5 minutes", 'delivery.retry_after: expected a positive duration like "30s", "5m", "72h", "30d", "1h30m" or seconds as an integer, got "5 minutes"'),
    (("delivery", "give_up_after"), "0h", "delivery.give_up_after: expected a positive duration"),
    (("delivery", "lease"), -5, "delivery.lease: expected a positive duration"),
    (("delivery", "one_cpu"), "no", 'delivery.one_cpu: expected true or false, got "no"'),
    (("delivery", "leases"), "5m", "delivery.leases: unknown key (did you mean 'lease'?)"),
    (("delivery", "token"), "abc", f"delivery.token: {SECRET}; bulksend reads them only from environment variables named by *_env keys"),
    # [[accounts]]
    (("accounts",), {"name": "x"}, "accounts: expected an array of tables, each written [[accounts]]"),
    ((*ACCOUNT0, "name"), DELETE, 'accounts[0].name: missing; expected a name of letters, digits, ".", "_" and "-"'),
    ((*ACCOUNT0, "name"), "yandex 1", 'accounts[0].name: expected a name of letters, digits, ".", "_" and "-", got "yandex 1"'),
    ((*ACCOUNT0, "name"), "", "accounts[0].name: expected a name"),
    ((*ACCOUNT1, "name"), "yandex-1", 'accounts[1]: duplicate "yandex-1" (already used by accounts[0])'),
    ((*ACCOUNT0, "host"), "smtp yandex.ru", f'{YANDEX}.host: expected a host name or IP address, got "smtp yandex.ru"'),
    ((*ACCOUNT0, "host"), DELETE, f"{YANDEX}.host: missing; expected a host name or IP address"),
    ((*ACCOUNT0, "port"), "465a", f'{YANDEX}.port: expected an integer 1-65535, got "465a"'),
    ((*ACCOUNT0, "port"), 0, f"{YANDEX}.port: expected an integer 1-65535, got 0"),
    ((*ACCOUNT0, "port"), 65536, f"{YANDEX}.port: expected an integer 1-65535, got 65536"),
    ((*ACCOUNT0, "security"), "ssl", f'{YANDEX}.security: expected one of "tls", "starttls", "none", got "ssl"'),
    ((*ACCOUNT0, "security"), DELETE, f'{YANDEX}.security: missing; expected one of "tls", "starttls", "none"'),
    ((*ACCOUNT1, "security"), "none", f'{RELAY}.security: "none" sends everything unencrypted; set allow_insecure = true'),
    ((*ACCOUNT0, "allow_insecure"), "yes", f'{YANDEX}.allow_insecure: expected true or false, got "yes"'),
    ((*ACCOUNT1, "ca_file"), "missing.pem", f'{RELAY}.ca_file: expected the path of an existing file (relative to {{dir}}), got "missing.pem"'),
    ((*ACCOUNT0, "username"), DELETE, f"{YANDEX}.username: missing: username and password_env go together"),
    ((*ACCOUNT0, "password_env"), DELETE, f"{YANDEX}.password_env: missing: username and password_env go together"),
    ((*ACCOUNT0, "password_env"), "hunter2!", f'{YANDEX}.password_env: expected the NAME of an environment variable'),
    ((*ACCOUNT0, "password_env"), "1PASSWORD", f"{YANDEX}.password_env: expected the NAME of an environment variable"),
    ((*ACCOUNT0, "from"), "not an address", f"{YANDEX}.from: expected one address"),
    ((*ACCOUNT0, "limits"), "100/hour", f'{YANDEX}.limits: expected an array [...], got "100/hour"'),
    ((*ACCOUNT0, "limits"), ["20/minute", "100/fortnight"], f'{YANDEX}.limits[1]: expected a limit like "100/hour", "500/day" or "50/5m" (count >= 1 per period), got "100/fortnight"'),
    ((*ACCOUNT0, "limits"), ["0/hour"], f"{YANDEX}.limits[0]: expected a limit like"),
    ((*ACCOUNT0, "window"), "daily", f'{YANDEX}.window: expected one of "rolling", "calendar", got "daily"'),
    ((*ACCOUNT0, "connections"), 0, f"{YANDEX}.connections: expected an integer >= 1, got 0"),
    ((*ACCOUNT0, "messages_per_connection"), -1, f"{YANDEX}.messages_per_connection: expected an integer >= 1, got -1"),
    ((*ACCOUNT0, "weight"), "2", f'{YANDEX}.weight: expected an integer >= 1, got "2"'),
    ((*ACCOUNT0, "weight"), 1.5, f"{YANDEX}.weight: expected an integer >= 1, got 1.5"),
    ((*ACCOUNT0, "helo"), "mail example", f'{YANDEX}.helo: expected a host name or IP address, got "mail example"'),
    ((*ACCOUNT0, "conections"), 2, f"{YANDEX}.conections: unknown key (did you mean 'connections'?)"),
    ((*ACCOUNT0, "password"), "hunter2", f'{YANDEX}.password: {SECRET}; put it in an environment variable and write its name as password_env = "VARIABLE"'),
    ((*ACCOUNT0, "smtp_password"), "hunter2", f"{YANDEX}.smtp_password: {SECRET}; put it in an environment variable and write its name as password_env"),
    ((*ACCOUNT1, "api_key"), "k-123", f'{RELAY}.api_key: {SECRET}; put it in an environment variable and write its name as password_env = "VARIABLE"'),
    ((*ACCOUNT1, "pass"), "hunter2", f"{RELAY}.pass: {SECRET}"),
    # [bounces]
    (("bounces", "protocol"), "smtp", 'bounces.protocol: expected one of "imap", "pop3", got "smtp"'),
    (("bounces", "host"), DELETE, "bounces.host: missing; expected a host name or IP address"),
    (("bounces", "port"), 99999, "bounces.port: expected an integer 1-65535, got 99999"),
    (("bounces", "security"), "none", 'bounces.security: "none" sends everything unencrypted; set allow_insecure = true'),
    (("bounces", "username"), DELETE, "bounces.username: missing; expected a non-empty one-line string"),
    (("bounces", "password_env"), DELETE, "bounces.password_env: missing; expected the NAME of an environment variable"),
    (("bounces", "folder"), "", 'bounces.folder: expected a non-empty one-line string, got ""'),
    (("bounces", "soft_bounce_limit"), 0, "bounces.soft_bounce_limit: expected an integer >= 1, got 0"),
    (("bounces", "soft_bounce_window"), "a month", 'bounces.soft_bounce_window: expected a positive duration like "30s"'),
    (("bounces", "password"), "hunter2", f'bounces.password: {SECRET}; put it in an environment variable and write its name as password_env = "VARIABLE"'),
    (("bounces", "mailbox"), "INBOX", "bounces.mailbox: unknown key (known here: protocol, "),
    # [dns] and [server]
    (("dns", "nameservers"), "127.0.0.1", 'dns.nameservers: expected an array [...], got "127.0.0.1"'),
    (("dns", "nameservers"), ["127.0.0.1", "dns.google"], 'dns.nameservers[1]: expected an IP address with an optional port, like "127.0.0.1:5353" or "[::1]:53", got "dns.google"'),
    (("dns", "nameservers"), ["127.0.0.1:0"], "dns.nameservers[0]: expected an IP address"),
    (("dns", "nameservers"), ["[::1]:99999"], "dns.nameservers[0]: expected an IP address"),
    (("server", "listen"), "8025", 'server.listen: expected host:port like "127.0.0.1:8025" or "[::1]:8025", got "8025"'),
    (("server", "listen"), "localhost", "server.listen: expected host:port"),
    (("server", "listen"), "[::1", "server.listen: expected host:port"),
    (("server", "port"), 8025, "server.port: unknown key (known here: listen)"),
    # secrets anywhere, even at the top
    (("api_key",), "k-123", f"api_key: {SECRET}"),
]


@pytest.mark.parametrize(("path", "value", "expected"), REFUSED,
                         ids=[".".join(map(str, case[0])) + f"={case[1]!r}"[:40] for case in REFUSED])
def test_invalid_value_is_refused_naming_file_key_and_expectation(
        config_dir: Path, path: tuple[Any, ...], value: Any, expected: str) -> None:
    message = error_of(edited(path, value), config_dir)
    assert message.startswith(f"{config_dir / 'bulksend.toml'}: ")
    assert expected.format(dir=config_dir) in message


@pytest.mark.parametrize("changes", [
    {"security": "none", "allow_insecure": True},
    {"security": "none", "allow_insecure": True, "port": 25},
])
def test_insecure_account_refuses_auth_in_clear(config_dir: Path, changes: dict[str, Any]) -> None:
    data = baseline()
    data["accounts"][0].update(changes)
    assert f"{YANDEX}.username: AUTH would send the password unencrypted" in error_of(data, config_dir)


def test_insecure_account_without_auth_is_allowed(config_dir: Path) -> None:
    data = baseline()
    data["accounts"][1].update(security="none", allow_insecure=True)
    del data["accounts"][1]["ca_file"]
    account = parse(data, config_dir).accounts[1]
    assert (account.security, account.port, account.username) == ("none", 25, None)


def test_ca_file_without_tls_is_refused(config_dir: Path) -> None:
    data = baseline()
    data["accounts"][1].update(security="none", allow_insecure=True)
    assert f'{RELAY}.ca_file: a CA bundle needs security = "tls" or "starttls"' in error_of(data, config_dir)


def test_secret_in_file_outranks_other_mistakes_in_its_table(config_dir: Path) -> None:
    data = baseline()
    data["accounts"][0]["password"] = data["accounts"][0].pop("password_env")
    assert f"{YANDEX}.password: {SECRET}" in error_of(data, config_dir)


# ---- limits, windows, durations -----------------------------------------------------------

@pytest.mark.parametrize(("text", "count", "seconds", "unit"), [
    ("100/hour", 100, 3600, "hour"),
    ("20/minute", 20, 60, "minute"),
    ("500/day", 500, 86400, "day"),
    ("10/second", 10, 1, None),
    ("5/min", 5, 60, "minute"),
    ("5/h", 5, 3600, "hour"),
    ("5/hours", 5, 3600, "hour"),
    ("5/days", 5, 86400, "day"),
    ("5/sec", 5, 1, None),
    ("5 / Hour", 5, 3600, "hour"),
    ("50/5m", 50, 300, None),
    ("1000/24h", 1000, 86400, "day"),
    ("10/10s", 10, 10, None),
    ("60/60s", 60, 60, "minute"),
    ("7/1h30m", 7, 5400, None),
    ("3/300", 3, 300, None),
])
def test_limit_parsing(text: str, count: int, seconds: int, unit: str | None) -> None:
    limit = parse_limit(text)
    assert (limit.count, limit.seconds, limit.unit, limit.text) == (count, seconds, unit, text.strip())


@pytest.mark.parametrize("text", [
    "hour", "100", "100/", "/hour", "0/hour", "-1/hour", "1.5/hour", "100/fortnight", "100/0s",
    "100/1.5h", "100/hour/day", 100, None,
])
def test_malformed_limit_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="expected a limit like"):
        parse_limit(text)


def test_limit_unit_follows_its_period() -> None:
    assert Limit(count=1, seconds=3600, text="1/60m").unit == "hour"
    assert Limit(count=1, seconds=7200, text="1/2h").unit is None


@pytest.mark.parametrize(("value", "seconds"), [
    (300, 300), ("300", 300), ("30s", 30), ("5m", 300), ("72h", 259200), ("30d", 2592000),
    ("1h30m", 5400), ("1h 30m", 5400), ("1d12h", 129600),
])
def test_duration_parsing(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [0, -5, "0s", "", "5 minutes", "1.5h", "m5", "5x", True, 1.5, None])
def test_malformed_or_non_positive_duration_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="expected a positive duration"):
        parse_duration(value)


def test_calendar_window_accepts_minute_hour_and_day_limits(config_dir: Path) -> None:
    limits = ["20/minute", "100/hour", "500/day", "1000/24h", "60/60s", "5/3600s"]
    data = edited((*ACCOUNT0, "limits"), limits)
    data["accounts"][0]["window"] = "calendar"
    account = parse(data, config_dir).accounts[0]
    assert [limit.unit for limit in account.limits] == ["minute", "hour", "day", "day", "minute", "hour"]


@pytest.mark.parametrize("limit", ["50/5m", "10/second", "100/2h", "1000/7d"])
def test_calendar_window_refuses_other_periods_and_says_why(config_dir: Path, limit: str) -> None:
    data = edited((*ACCOUNT0, "limits"), ["100/hour", limit])
    data["accounts"][0]["window"] = "calendar"
    message = error_of(data, config_dir)
    assert f'{YANDEX}.limits[1]: window = "calendar" resets at the start of each minute, hour or day' in message
    assert f'got "{limit}"' in message and 'use window = "rolling"' in message


# ---- DKIM keys ----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "algorithm"), [
    ("ed25519", "ed25519"), ("rsa2048-pkcs1", "rsa"), ("rsa2048-pkcs8", "rsa"),
])
def test_dkim_accepts_rsa_2048_and_ed25519(config_dir: Path, key: str, algorithm: str) -> None:
    data = edited(("dkim", 0, "private_key_file"), f"dkim/{key}.pem")
    dkim = parse(data, config_dir).dkim[0]
    assert (dkim.domain, dkim.selector, dkim.algorithm) == ("example.com", "s2026", algorithm)
    assert dkim.private_key_file == config_dir / "dkim" / f"{key}.pem"


def test_dkim_domain_is_lower_cased_and_absolute_key_path_kept(config_dir: Path) -> None:
    data = edited(("dkim", 0, "domain"), "Example.COM")
    data["dkim"][0]["private_key_file"] = str(config_dir / "dkim" / "ed25519.pem")
    dkim = parse(data, config_dir).dkim[0]
    assert (dkim.domain, dkim.private_key_file) == ("example.com", config_dir / "dkim" / "ed25519.pem")


# ---- the example config -------------------------------------------------------------------

# Every key of DESIGN §4, by section; the example must document each one.
DESIGN_KEYS = {
    "": ["database", "timezone"],
    "sender": ["from", "reply_to", "list_id", "return_path", "unsubscribe_url", "unsubscribe_mailto", "secret_env"],
    "dkim": ["domain", "selector", "private_key_file"],
    "delivery": ["max_attempts", "retry_after", "give_up_after", "lease"],
    "accounts": ["name", "host", "port", "security", "allow_insecure", "ca_file", "username", "password_env",
                 "from", "limits", "window", "connections", "messages_per_connection", "weight", "helo"],
    "bounces": ["protocol", "host", "port", "security", "username", "password_env", "folder",
                "quarantine_folder", "soft_bounce_limit", "soft_bounce_window"],
    "dns": ["nameservers"],
    "server": ["listen"],
}


def uncommented(text: str) -> str:
    """The example with every optional `#key = …` / `#[section]` line switched on."""
    return re.sub(r"(?m)^#(?=[\[a-z])", "", text)


def section_keys(text: str) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    section = ""
    for line in uncommented(text).splitlines():
        if header := re.fullmatch(r"\[+([a-z]+)\]+", line.strip()):
            section = header[1]
        elif key := re.match(r"([a-z_]+) = ", line):
            keys.setdefault(section, set()).add(key[1])
    return keys


def test_example_config_parses_as_written_without_env_or_key_files(tmp_path: Path) -> None:
    config = parse_config(EXAMPLE_CONFIG, tmp_path / "bulksend.toml")
    assert 'database = "sqlite:///bulksend.db"' in EXAMPLE_CONFIG
    assert config.database == f"sqlite:///{tmp_path}/bulksend.db"
    assert config.sender is not None and (config.accounts, config.dkim, config.bounces) == ((), (), None)


def test_example_config_documents_every_design_key() -> None:
    keys = section_keys(EXAMPLE_CONFIG)
    for section, names in DESIGN_KEYS.items():
        assert set(names) <= keys.get(section, set()), section


def test_example_optional_blocks_parse_once_uncommented(tmp_path: Path, keys: dict[str, bytes]) -> None:
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "example.com.pem").write_bytes(keys["rsa2048-pkcs8"])
    config = parse_config(uncommented(EXAMPLE_CONFIG), tmp_path / "bulksend.toml")
    mailbox, relay = config.accounts
    assert (mailbox.name, mailbox.port, mailbox.security, len(mailbox.limits)) == ("yandex-1", 465, "tls", 3)
    assert (relay.name, relay.port, relay.security, relay.window) == ("relay-1", 587, "starttls", "calendar")
    assert config.dkim[0].algorithm == "rsa"
    assert config.bounces is not None and config.bounces.protocol == "imap"
    assert config.dns.nameservers == (("127.0.0.1", 5353),)


# ---- the file and the environment ---------------------------------------------------------

def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "bulksend.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not found (run `bulksend init` or pass --config)")):
        load_config(path)


@pytest.mark.parametrize(("text", "where"), [
    ('database = "sqlite:///x.db"\ntimezone = \n', ":2:12: invalid TOML: "),
    ('database = "sqlite:///x.db"\n[sender\n', ":2:8: invalid TOML: "),
    ('database = "sqlite:///x.db', ":1:27: invalid TOML: Unterminated string"),
])
def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bulksend.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}{where}")):
        load_config(path)


def test_load_config_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bulksend.toml"
    path.write_bytes(b'\xef\xbb\xbfdatabase = "sqlite:///x.db"\n')
    assert load_config(path).database == f"sqlite:///{tmp_path}/x.db"


def test_load_config_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bulksend.toml"
    path.write_bytes('database = "sqlite:///база.db"\n'.encode("cp1251"))
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not UTF-8 text"):
        load_config(path)


def test_resolve_secret_reads_the_named_variable_only_from_the_mapping_given() -> None:
    assert resolve_secret("YANDEX1_PASSWORD", {"YANDEX1_PASSWORD": "pw"}, 'account "yandex-1"') == "pw"


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, 'account "yandex-1": environment variable YANDEX1_PASSWORD is not set'),
    ({"YANDEX1_PASSWORD": ""}, 'account "yandex-1": environment variable YANDEX1_PASSWORD is empty'),
])
def test_resolve_secret_names_owner_and_variable_when_missing(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        resolve_secret("YANDEX1_PASSWORD", environ, 'account "yandex-1"')


class _NoEnviron(dict):  # type: ignore[type-arg]
    def __getitem__(self, key: object) -> str:
        raise AssertionError(f"config read os.environ[{key!r}]")

    get = __contains__ = __getitem__  # type: ignore[assignment]


def test_parsing_never_reads_the_environment(
        config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.environ", _NoEnviron())
    config = parse(baseline(), config_dir)
    assert config.accounts[0].password_env == "YANDEX1_PASSWORD"
