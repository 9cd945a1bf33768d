"""What `bulksend demo` plays: its three accounts, their servers, and the workspace for them.

The accounts are chosen so one campaign shows the engine's main behaviours within the
first minute, without waiting: "mailbox" reaches its 40/minute limit, "isp" fails for a
while (421) and rests in cooldown, and "vps-relay" (weight 2, two connections) takes over
from both. `write_workspace` writes the bulksend.toml a user would write for such
accounts and loads it through `config.load_config`, the same validation as every command.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from bulksend import config, dkim
from bulksend.demo_servers import HOST, DemoServers, Mode, Outage, Provider

SECRET_ENV = "BULKSEND_DEMO_SECRET"


@dataclass(frozen=True)
class DemoAccount:
    """One provider of the demo and the [[accounts]] block that uses it."""

    name: str
    mode: Mode
    limits: tuple[str, ...]
    weight: int
    connections: int
    latency: float  # the server's pause before accepting a message, like a real provider
    outage: Outage | None = None
    note: str = ""


# 201 messages fit in the first minute of these limits, so nothing waits for a window.
ACCOUNTS = (
    DemoAccount("mailbox", "tls", ("40/minute",), 1, 1, 0.03),
    DemoAccount("isp", "starttls", ("25/minute", "500/day"), 1, 1, 0.03,
                Outage(after=10, replies=3),
                'answers "421 4.3.2 try again later" after 10 messages, for a while'),
    DemoAccount("vps-relay", "plain", ("200/minute",), 2, 2, 0.025,
                note="takes 2 connections at once"),
)


def environment() -> dict[str, str]:
    """The demo's own "environment": fresh secrets that never leave this process."""
    env = {SECRET_ENV: secrets.token_urlsafe(32)}
    env.update({password_env(a): secrets.token_urlsafe(12) for a in ACCOUNTS if a.mode != "plain"})
    return env


def providers(env: dict[str, str]) -> list[Provider]:
    """The servers, each knowing its account's password (the relay takes mail without AUTH)."""
    return [Provider(a.name, a.mode,
                     {} if a.mode == "plain" else {username(a): env[password_env(a)]},
                     a.outage, a.latency) for a in ACCOUNTS]


def username(account: DemoAccount) -> str:
    """The AUTH user of an account."""
    return f"news@{account.name}.example.net"


def password_env(account: DemoAccount) -> str:
    """The environment variable its bulksend.toml names for the password."""
    return f"DEMO_{account.name.upper().replace('-', '_')}_PASSWORD"


def write_workspace(root: Path, servers: DemoServers) -> config.Config:
    """Write bulksend.toml and a DKIM key into `root`, and load it as every command does."""
    key_path, _record = dkim.keygen("example.com", "demo", root / "dkim")
    blocks = []
    for a in ACCOUNTS:
        box = servers.servers[a.name]
        if a.mode == "plain":
            security = 'security = "none"\nallow_insecure = true  # a relay: no TLS, no AUTH'
        else:
            security = (f'security = "{a.mode}"\nca_file = "tls/ca.pem"\n'
                        f'username = "{username(a)}"\npassword_env = "{password_env(a)}"')
        limits = ", ".join(f'"{limit}"' for limit in a.limits)
        blocks.append(f'[[accounts]]\nname = "{a.name}"\nhost = "{HOST}"\n'
                      f"port = {box.port}\n{security}\nlimits = [{limits}]\nweight = {a.weight}\n"
                      f'connections = {a.connections}\nhelo = "demo.example.com"\n')
    text = (
        "# Written by `bulksend demo`: three local servers playing SMTP providers.\n"
        'database = "sqlite:///bulksend.db"\ntimezone = "UTC"\n\n'
        '[sender]\nfrom = "Example News <news@example.com>"\nlist_id = "news.example.com"\n'
        'return_path = "bounces@example.com"\nunsubscribe_url = "https://example.com/u"\n'
        f'secret_env = "{SECRET_ENV}"\n\n'
        f'[[dkim]]\ndomain = "example.com"\nselector = "demo"\n'
        f'private_key_file = "{key_path.relative_to(root)}"\n\n' + "\n".join(blocks)
    )
    path = root / "bulksend.toml"
    path.write_text(text, encoding="utf-8")
    return config.load_config(path)  # the same validation as every bulksend command
