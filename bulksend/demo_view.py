"""What `bulksend demo` shows: step headings, the live send progress and the final tables.

On a terminal the progress is a rich `Progress` (all messages, then one bar per account
filling up to its per-minute limit, with its state); anywhere else (a pipe, a CI log) it is
one plain line per second, because a redrawn bar would be escape-code noise there.
The consoles come from the caller with markup off, so styles are passed as arguments and
data (names, addresses, server replies) is always printed as it is.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from bulksend.demo_servers import DemoServer
from bulksend.demo_setup import DemoAccount
from bulksend.sender import Report

TABLE: dict[str, Any] = {"box": None, "padding": (0, 2, 0, 0), "header_style": "bold"}
PLAIN_EVERY = 1.0  # seconds between progress lines when stdout is not a terminal
SECURITY = {"tls": "TLS + AUTH (465)", "starttls": "STARTTLS + AUTH (587)",
            "plain": "none, no AUTH (2525)"}  # what each server plays, as bulksend.toml names it


def step(out: Console, number: int, title: str) -> None:
    """A numbered heading: the demo is a story in a few steps."""
    out.print()
    out.print(f"{number}. {title}", style="bold cyan")


@dataclass(frozen=True)
class AccountLine:
    """One account as the progress shows it: its per-minute cap and what it is doing."""

    name: str
    cap: int | None  # the tightest limit's count (the bar's end); None: no limit
    cap_text: str  # e.g. "40/minute"


def describe_state(state: str, until: float | None, now: float) -> str:
    """'cooldown 58 s' (time left), or the state itself; a rest that has run out is 'active'."""
    if state in ("cooldown", "exhausted"):
        return f"{state} {until - now:.0f} s" if until is not None and until > now else "active"
    return state


class SendProgress:
    """The live view of one send; `update` is called a few times a second from the main thread."""

    def __init__(self, out: Console, total: int, accounts: list[AccountLine]) -> None:
        self.out = out
        self.total = total
        self.accounts = accounts
        self.started = time.monotonic()
        self._last_line = self.started
        self._printed = -1  # how many were sent at the last plain line
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._width = max(len(a.name) for a in accounts)

    def __enter__(self) -> SendProgress:
        if self.out.is_terminal:
            self._progress = Progress(
                TextColumn("  {task.description}"), BarColumn(bar_width=32),
                TextColumn("{task.fields[count]}"), TextColumn("{task.fields[note]}", style="dim"),
                console=self.out, refresh_per_second=12,
            )
            self._progress.start()
            self._tasks["*"] = self._progress.add_task(
                "all".ljust(self._width), total=self.total, count="", note="")
            for account in self.accounts:
                self._tasks[account.name] = self._progress.add_task(
                    account.name.ljust(self._width), total=account.cap, count="", note="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()  # leaves the last frame on screen: the per-account outcome

    def update(self, report: Report, states: Mapping[str, str], final: bool = False) -> None:
        """Show the sender's live report (sent, per account) and the accounts' states."""
        sent, by_account = report.sent, dict(report.by_account)  # one snapshot of a live Counter
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = f"{sent / elapsed:.0f} msg/s, {elapsed:.1f} s"
        if self._progress is not None:
            self._progress.update(self._tasks["*"], completed=sent, count=f"{sent} of {self.total}",
                                  note=rate)
            for account in self.accounts:
                count = by_account.get(account.name, 0)
                cap = f" of {account.cap_text}" if account.cap is not None else ", no limit"
                note = self._note(account, count, states.get(account.name, ""))
                self._progress.update(self._tasks[account.name], completed=count,
                                      count=f"{count}{cap}",
                                      note=f"{note}: the others take over" if note else "")
            return
        now = time.monotonic()
        if (final and sent != self._printed) or now - self._last_line >= PLAIN_EVERY:
            self._last_line, self._printed = now, sent
            parts = []
            for account in self.accounts:
                count = by_account.get(account.name, 0)
                note = self._note(account, count, states.get(account.name, ""))
                parts.append(f"{account.name} {count}" + (f" ({note})" if note else ""))
            self.out.print(f"  {elapsed:5.1f} s  sent {sent}/{self.total}  " + ", ".join(parts))

    @staticmethod
    def _note(account: AccountLine, count: int, state: str) -> str:
        if state and state != "active":
            return state
        if account.cap is not None and count >= account.cap:
            return "at its limit"
        return ""


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
