"""The live view of a send, shared by `bulksend send` and `bulksend demo`.

On a terminal it is a rich `Progress`: all messages, then one bar per account filling up to
its tightest limit, with its state. Anywhere else (cron mail, a journal, a CI log) a redrawn
bar would be escape-code noise, so it is one plain line per interval, and only when something
moved. The sender runs in a worker thread; this thread reads its live `Report` and the
accounts' states (a read-only query, so the sender never waits for the view).
The consoles come from the caller with markup off: names, addresses and server replies are
printed as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from sqlalchemy.engine import Engine

from bulksend import db, store_deliveries
from bulksend.config import AccountConfig
from bulksend.sender import Report, Sender

REFRESH = 0.1  # seconds between updates of the view
STATES_EVERY = 0.5  # seconds between reads of the accounts' states


@dataclass(frozen=True)
class AccountLine:
    """One account as the progress shows it: its tightest limit and what it is doing."""

    name: str
    cap: int | None  # the tightest limit's count (the bar's end); None: no limit
    cap_text: str  # e.g. "40/minute"

    @classmethod
    def of(cls, account: AccountConfig) -> AccountLine:
        """The line for a configured account: its bar ends at its smallest limit."""
        if not account.limits:
            return cls(account.name, None, "")
        tightest = min(account.limits, key=lambda limit: limit.count)
        return cls(account.name, tightest.count, tightest.text)


def describe_state(state: str, until: float | None, now: float) -> str:
    """'cooldown 58 s' (time left), or the state itself; a rest that has run out is 'active'."""
    if state in ("cooldown", "exhausted"):
        return f"{state} {until - now:.0f} s" if until is not None and until > now else "active"
    return state


def account_states(engine: Engine, names: Sequence[str]) -> dict[str, str]:
    """Each account's state as the view shows it."""
    with db.reading(engine) as connection:
        rows = store_deliveries.accounts(connection, list(names))
    now = time.time()
    return {name: describe_state(row.state, row.until, now) for name, row in rows.items()}


class SendProgress:
    """The view itself; `update` is called a few times a second from the main thread."""

    def __init__(self, out: Console, total: int | None, accounts: Sequence[AccountLine], *,
                 plain_every: float = 1.0, plain_final: bool = True) -> None:
        self.out = out
        self.total = total  # None: unknown (the bar of all messages then only counts)
        self.accounts = list(accounts)
        self.plain_every = plain_every
        self.plain_final = plain_final  # a last plain line at the end (off when a summary follows)
        self.started = time.monotonic()
        self._last_line = self.started
        self._printed = 0  # how many were sent at the last plain line
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._width = max((len(a.name) for a in self.accounts), default=3)

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
        if self.total is not None and sent > self.total:  # campaigns started meanwhile
            self.total = sent
        of_total = f" of {self.total}" if self.total is not None else ""
        if self._progress is not None:
            self._progress.update(self._tasks["*"], total=self.total)
            self._progress.update(self._tasks["*"], completed=sent, count=f"{sent}{of_total}",
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
        due = now - self._last_line >= self.plain_every
        if sent != self._printed and ((final and self.plain_final) or due):
            self._last_line, self._printed = now, sent
            parts = []
            for account in self.accounts:
                count = by_account.get(account.name, 0)
                note = self._note(account, count, states.get(account.name, ""))
                parts.append(f"{account.name} {count}" + (f" ({note})" if note else ""))
            self.out.print(f"  {elapsed:5.1f} s  sent {sent}{of_total}, "
                           f"{sent / elapsed:.0f} msg/s  " + ", ".join(parts))

    @staticmethod
    def _note(account: AccountLine, count: int, state: str) -> str:
        if state and state != "active":
            return state
        if account.cap is not None and count >= account.cap:
            return "at its limit"
        return ""


def run_with_progress(worker: Sender, view: SendProgress, run: Callable[[], Report],
                      states: Callable[[], Mapping[str, str]],
                      clock: Callable[[], float] = time.monotonic) -> Report:
    """`run` the sender in a thread while this one draws `view`; Ctrl-C drains the sender.

    `states` (a store read) is called at most every STATES_EVERY seconds of `clock`, and
    once more at the end. The signal handlers stay in this (the main) thread: SIGTERM only
    sets `worker.stop`, and the sender finishes its in-flight transactions and hands its
    claims back.
    """
    reports: list[Report] = []
    failures: list[BaseException] = []

    def work() -> None:
        try:
            reports.append(run())
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            failures.append(error)

    thread = threading.Thread(target=work, name="bulksend-sender", daemon=True)
    seen: Mapping[str, str] = {}
    read_at: float | None = None
    with view:
        thread.start()
        try:
            while thread.is_alive():
                thread.join(REFRESH)
                if read_at is None or clock() - read_at >= STATES_EVERY:
                    seen, read_at = states(), clock()
                view.update(worker.report, seen)
            view.update(worker.report, states(), final=True)
        finally:
            worker.stop.set()  # after Ctrl-C: in-flight messages finish, claims go back
            thread.join(timeout=60)
    if failures:
        raise failures[0]
    return reports[0]
