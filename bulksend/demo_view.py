"""What `bulksend demo` shows: step headings, the live send progress and the final tables.

The live progress is `bulksend.progress`, the same view `bulksend send` shows.
The consoles come from the caller with markup off, so styles are passed as arguments and
data (names, addresses, server replies) is always printed as it is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from bulksend.demo_servers import DemoServer
from bulksend.demo_setup import DemoAccount
from bulksend.progress import describe_state

TABLE: dict[str, Any] = {"box": None, "padding": (0, 2, 0, 0), "header_style": "bold"}
SECURITY = {"tls": "TLS + AUTH (465)", "starttls": "STARTTLS + AUTH (587)",
            "plain": "none, no AUTH (2525)"}  # what each server plays, as bulksend.toml names it


def step(out: Console, number: int, title: str) -> None:
    """A numbered heading: the demo is a story in a few steps."""
    out.print()
    out.print(f"{number}. {title}", style="bold cyan")


def providers_table(accounts: Sequence[DemoAccount], servers: Mapping[str, DemoServer]) -> Table:
    """The accounts the demo plays, where their servers listen, and their limits."""
    table = Table("account", "server", "security (like port)", "limits", "weight", **TABLE)
    for a in accounts:
        table.add_row(a.name, servers[a.name].address, SECURITY[a.mode],
                      ", ".join(a.limits), str(a.weight))
    return table


def accounts_table(rows: list[dict[str, Any]], now: float) -> Table:
    """`bulksend accounts` for the demo: state, each limit's usage, totals (errors: below it)."""
    table = Table("account", "state", "limits: used of", "sent", "failed", **TABLE)
    for row in rows:
        used = ", ".join(f"{u['used']} of {u['limit']}" for u in row["limits"]) or "no limits"
        table.add_row(row["name"], describe_state(row["state"], row["until"], now), used,
                      str(row["sent"]), str(row["failed"]))
    return table


def account_errors(rows: list[dict[str, Any]]) -> list[str]:
    """The last error of each account that has one (too long for a table cell)."""
    return [f"last error of {row['name']}: {row['last_error']}"
            for row in rows if row["last_error"]]


def campaign_lines(data: Mapping[str, Any], state_fields: tuple[str, ...]) -> list[str]:
    """`bulksend campaign show` for the demo, as lines."""
    counts = [f"{name} {data[name]}" for name in ("total", *state_fields) if data[name]]
    lines = [
        f"campaign {data['name']}: {data['status']}, list {', '.join(data['lists'])}",
        "deliveries: " + (", ".join(counts) or "none queued"),
        f"bounced {data['bounced']}, complaints {data['complaints']}, "
        f"unsubscribed {data['unsubscribed']}",
    ]
    lines += [f"  {account}: {sent} sent" for account, sent in data["by_account"].items()]
    return lines


def servers_table(servers: Mapping[str, DemoServer]) -> Table:
    """What each server saw: the ground truth the store's counts are checked against."""
    table = Table("server", "connections", "accepted", "DKIM-signed", "421 replies", **TABLE)
    for name, box in servers.items():
        table.add_row(name, str(box.connections), str(box.accepted), str(box.signed),
                      str(box.refused))
    return table


def verdict(out: Console, servers: Mapping[str, DemoServer], summary: Mapping[str, Any]) -> int:
    """Check the store against the servers: everyone once, counts equal per account."""
    received: Counter[str] = Counter()
    for box in servers.values():
        received.update(box.recipients)
    accepted = {name: box.accepted for name, box in servers.items()}
    by_account = {name: summary["by_account"].get(name, 0) for name in accepted}
    signed = sum(box.signed for box in servers.values())
    ok = (summary["sent"] == summary["total"] == sum(accepted.values()) == len(received)
          and accepted == by_account and max(received.values(), default=1) == 1)
    if ok:
        out.print(f"{len(received)} messages for {len(received)} different recipients, "
                  f"{signed} DKIM-signed: everyone got exactly one.", style="green")
        out.print("Per account, what the servers accepted is what bulksend recorded.",
                  style="green")
        return 0
    out.print(f"mismatch: campaign sent {summary['sent']} of {summary['total']}, servers accepted "
              f"{accepted}, the store says {by_account}, {len(received)} distinct recipients",
              style="bold red")
    return 1
