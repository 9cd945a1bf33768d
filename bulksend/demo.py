"""`bulksend demo`: the whole job on local SMTP servers it starts itself, in a few seconds.

    three servers on 127.0.0.1 play providers (bulksend.demo_servers)
    → a workspace: bulksend.toml, SQLite, a DKIM key for example.com, the servers' CA
    → import the sample list → campaign from templates/newsletter.* → start
    → send with the live progress → accounts table, campaign summary, what each server got
    → stop the servers, remove the workspace

It runs the same library calls as the CLI commands (config.load_config, import_file,
campaigns.create/start, sender.Sender, accounts.status, campaigns.show), so what it shows
is what the user gets with their own accounts (what it plays: bulksend.demo_setup; how it
shows it: bulksend.demo_view). Secrets stay in this process: passwords and the token
secret are resolved from a private mapping, never from os.environ, which the demo leaves
alone. Everything it starts is stopped and everything it writes is removed, also on an
error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import csv
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from importlib.resources import as_file, files
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine

from bulksend import (
    accounts,
    campaigns,
    config,
    db,
    sender,
    smtp,
    subscribers,
)
from bulksend.demo_servers import DemoServers, make_tls_files
from bulksend.demo_setup import ACCOUNTS, SECRET_ENV, environment, providers, write_workspace
from bulksend.demo_view import (
    TABLE,
    account_errors,
    accounts_table,
    campaign_lines,
    providers_table,
    servers_table,
    step,
    verdict,
)
from bulksend.errors import BulksendError
from bulksend.progress import AccountLine, SendProgress, account_states, run_with_progress

LIST, CAMPAIGN = "news", "newsletter"
SUBJECT = "What's new at Example News this month"
SEND_MAX_TIME = 45.0  # a safety net: the send takes a few seconds
TIMEOUTS = smtp.Timeouts(command=10.0, transaction=30.0)  # loopback servers answer at once


def run(out: Console, err: Console, *, workdir: Path | None = None) -> int:
    """Run the demo; 0 when every subscriber got exactly one message.

    `workdir` (for tests) must be new or empty, and is kept; by default the workspace is a
    temporary directory, removed at the end whatever happens (error, Ctrl-C, SIGTERM).
    """
    begun = time.monotonic()
    try:
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(_sigterm_as_interrupt())
            if workdir is not None and workdir.exists() and any(workdir.iterdir()):
                raise BulksendError(f"{workdir}: not empty; the demo needs a new directory")
            if workdir is None:
                root = Path(cleanup.enter_context(tempfile.TemporaryDirectory(
                    prefix="bulksend-demo-", ignore_cleanup_errors=True)))
            else:
                root = workdir.resolve()
                root.mkdir(parents=True, exist_ok=True)
            code = _demo(out, root, cleanup)
    except KeyboardInterrupt:
        err.print("bulksend demo: interrupted; its servers are stopped and its workspace removed")
        return 130
    except BulksendError as exc:
        err.print(f"bulksend demo: {exc}")
        return 1
    where = "workspace removed" if workdir is None else f"workspace kept in {root}"
    out.print()
    out.print(f"Done in {time.monotonic() - begun:.1f} s: servers stopped, {where}.",
              style="bold green" if code == 0 else "bold red")
    if code == 0:
        out.print("Next, with your own accounts:")
        out.print("  bulksend init my-mail     # then put them in my-mail/bulksend.toml")
        out.print("  bulksend --config my-mail/bulksend.toml import FILE.csv --list news")
    return code


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let `kill` clean up like Ctrl-C does (signal handlers live in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _demo(out: Console, root: Path, cleanup: contextlib.ExitStack) -> int:
    out.print("bulksend demo: a whole campaign through three local SMTP servers; "
              "nothing leaves this machine.", style="bold")
    env = environment()
    servers = cleanup.enter_context(DemoServers(providers(env), make_tls_files(root / "tls")))
    step(out, 1, "Three SMTP servers on 127.0.0.1 play your providers")
    out.print(providers_table(ACCOUNTS, servers.servers))
    fastest, slowest = (f(a.latency for a in ACCOUNTS) * 1000 for f in (min, max))
    out.print(f"Each takes {fastest:.0f}-{slowest:.0f} ms per message, like a real provider.",
              style="dim")
    for a in ACCOUNTS:
        if a.note:
            out.print(f"{a.name} {a.note}.", style="dim")

    step(out, 2, f"A workspace in {root}")
    settings = write_workspace(root, servers)
    engine = db.create_engine(settings.database)
    cleanup.callback(engine.dispose)  # before the directory goes: SQLite's files are closed
    db.upgrade(engine)
    files = Table(show_header=False, **TABLE)
    files.add_row("bulksend.toml", "the 3 [[accounts]]: limits, TLS modes, the servers' CA")
    files.add_row("bulksend.db", "the SQLite store")
    files.add_row("dkim/", "a DKIM key for example.com: every message is signed")
    out.print(files)

    step(out, 3, "Import the sample subscriber list")
    _import(out, engine, root)

    step(out, 4, "Create and start a campaign from templates/newsletter.html and .txt")
    assert settings.sender is not None
    secret = config.resolve_secret(SECRET_ENV, env, "[sender] secret_env").encode()
    started = _campaign(engine, campaigns.Launch(settings.sender, settings.dkim, secret))
    out.print(f"campaign {CAMPAIGN!r} {started.status}: {started.queued} queued, "
              f"{started.suppressed} suppressed, signed d={started.dkim_domain}")

    step(out, 5, "Send: round-robin over the accounts, never past their limits")
    report = _send(out, engine, settings, env, secret, started.queued)
    out.print(f"sent {report.sent} of {started.queued}, failed {report.failed}, deferred "
              f"{report.deferred}, unknown {report.unknown}; stopped: {report.stopped_because}")

    step(out, 6, "Accounts (bulksend accounts)")
    now = time.time()
    rows = accounts.status(engine, settings.accounts, settings.timezone, now)
    out.print(accounts_table(rows, now))
    for line in account_errors(rows):
        out.print(line, style="dim")

    step(out, 7, "Campaign (bulksend campaign show)")
    summary = campaigns.show(engine, CAMPAIGN)
    for line in campaign_lines(summary, campaigns.STATE_FIELDS):
        out.print(line)

    step(out, 8, "What the servers received")
    out.print(servers_table(servers.servers))
    return verdict(out, servers.servers, summary)


def _import(out: Console, engine: Engine, root: Path) -> None:
    rejects = root / "rejects.csv"
    with as_file(files("bulksend.data").joinpath("sample_subscribers.csv")) as sample:
        r = subscribers.import_file(engine, sample, LIST, now=time.time(), rejects=rejects)
    out.print(f"sample_subscribers.csv: {r.rows} rows ({r.encoding}, delimiter {r.delimiter!r}) "
              f"→ list {LIST!r}: imported {r.imported}, updated {r.updated}, skipped "
              f"{r.skipped}, duplicates {r.duplicates}, invalid {r.invalid}, suppressed "
              f"{r.suppressed}")
    with rejects.open(encoding="utf-8-sig", newline="") as file:
        for row in list(csv.reader(file, delimiter=r.delimiter))[1:]:
            out.print(f"  rejected line {row[0]}: {row[1]}", style="dim")


def _campaign(engine: Engine, launch: campaigns.Launch) -> campaigns.Started:
    templates = files("bulksend.templates")
    spec = campaigns.NewCampaign(
        name=CAMPAIGN, lists=(LIST,), subject=SUBJECT,
        html=templates.joinpath("newsletter.html").read_text(encoding="utf-8"),
        html_name="newsletter.html",
        text=templates.joinpath("newsletter.txt").read_text(encoding="utf-8"),
        text_name="newsletter.txt",
    )
    campaigns.create(engine, spec, time.time())
    return campaigns.start(engine, CAMPAIGN, launch, now=time.time())


def _send(out: Console, engine: Engine, settings: config.Config, env: dict[str, str],
          secret: bytes, total: int) -> sender.Report:
    """Run the sender in a thread while this one draws the progress; Ctrl-C drains it."""
    assert settings.sender is not None
    passwords = {a.name: config.resolve_secret(a.password_env, env, f"account {a.name}")
                 for a in settings.accounts if a.password_env}

    def open_session(account: config.AccountConfig) -> smtp.Session:
        return smtp.open_session(account, passwords.get(account.name), TIMEOUTS)

    loop_settings = sender.Settings(settings.accounts, settings.delivery, settings.sender, secret,
                                    settings.dkim, settings.timezone)
    worker = sender.Sender(engine, loop_settings, open_session, clock=time.time, sleep=time.sleep,
                           campaign=CAMPAIGN)
    names = [a.name for a in settings.accounts]
    view = SendProgress(out, total, [AccountLine.of(a) for a in settings.accounts])
    return run_with_progress(worker, view, lambda: worker.run(once=True, max_time=SEND_MAX_TIME),
                             lambda: account_states(engine, names))
