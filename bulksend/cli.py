"""The `bulksend` command line: parse, call one library function, print.

Exit codes (DESIGN §9): 0 success, 1 an operational error with a one-line message naming
the resource, 2 a usage error. `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.engine import Engine

from bulksend import (
    __version__, accounts, campaigns, config, db, dkim, domains, importer, progress, sender, smtp,
    store_campaigns, subscribers, suppression, tokens,
)
from bulksend.config_example import EXAMPLE_CONFIG
from bulksend.errors import BulksendError, ConfigError

PROGRESS_MIN_BYTES = 1 << 20  # smaller files import faster than a bar can draw
SEND_LOG_EVERY = 10.0  # seconds between `send` progress lines when stdout is not a terminal

app = typer.Typer(
    name="bulksend", add_completion=False, no_args_is_help=True,
    pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Send campaigns round-robin over many SMTP accounts, never past their limits.",
)
db_app = typer.Typer(no_args_is_help=True, help="Database migrations.")
subscribers_app = typer.Typer(no_args_is_help=True, help="Look at and export subscribers.")
suppress_app = typer.Typer(no_args_is_help=True, help="The global suppression list.")
app.add_typer(db_app, name="db")
app.add_typer(subscribers_app, name="subscribers")
app.add_typer(suppress_app, name="suppress")
campaign_app = typer.Typer(no_args_is_help=True, help="Create, preview, start and follow campaigns.")
dkim_app = typer.Typer(no_args_is_help=True, help="DKIM signing keys.")
accounts_app = typer.Typer(invoke_without_command=True, help="The SMTP accounts: state and limits.")
app.add_typer(accounts_app, name="accounts")
app.add_typer(campaign_app, name="campaign")
app.add_typer(dkim_app, name="dkim")
bounces_app = typer.Typer(no_args_is_help=True, help="Bounces, complaints and mailto unsubscribes.")
app.add_typer(bounces_app, name="bounces")

# markup and emoji off: list names, file names and addresses are data, printed as they are.
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

class OnExisting(str, enum.Enum):
    """`import --on-existing`: update an existing subscriber's data, or leave it as it was."""

    update = "update"
    skip = "skip"


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
CheckDomainsOption = Annotated[bool, typer.Option(
    "--check-domains", help="Look up every domain's MX (else A/AAAA) first; suppress dead ones.")]


def _version(value: bool) -> None:
    if value:
        print(f"bulksend {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    config_path: Annotated[Path, typer.Option(
        "--config", envvar="BULKSEND_CONFIG", help="The config file.", show_default=True,
    )] = Path("bulksend.toml"),
    _show_version: Annotated[Optional[bool], typer.Option(  # noqa: UP007 - typer needs Optional
        "--version", callback=_version, is_eager=True, help="Print the version and exit.",
    )] = None,
) -> None:
    ctx.obj = config_path


def _config(ctx: typer.Context) -> config.Config:
    return config.load_config(ctx.find_root().obj)


@contextmanager
def _store(ctx: typer.Context) -> Iterator[Engine]:
    engine = db.open_store(_config(ctx).database)
    try:
        yield engine
    finally:
        engine.dispose()


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n")


# --- init and db --------------------------------------------------------------------------


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Where to set up.")] = Path(".")) -> None:
    """Write a commented bulksend.toml (never overwritten) and create the database."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bulksend.toml"
    try:
        with open(path, "x", encoding="utf-8") as file:  # "x": never overwrite
            file.write(EXAMPLE_CONFIG)
        out.print(f"wrote {path}")
    except FileExistsError:
        out.print(f"{path} exists; left as it is")
    settings = config.load_config(path)
    engine = db.create_engine(settings.database)
    try:
        revision = db.upgrade(engine)
    finally:
        engine.dispose()
    out.print(f"database {db.display_url(settings.database)} is at revision {revision}")
    out.print(f"next: bulksend --config {path} import FILE.csv --list NAME")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Migrate the database to the newest schema."""
    settings = _config(ctx)
    engine = db.create_engine(settings.database)
    try:
        before, after = db.current_revision(engine), db.upgrade(engine)
    finally:
        engine.dispose()
    where = db.display_url(settings.database)
    if before == after:
        out.print(f"database {where} is already at revision {after}")
    else:
        out.print(f"database {where} upgraded from {before or 'empty'} to revision {after}")


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show the database's schema revision."""
    settings = _config(ctx)
    engine = db.create_engine(settings.database)
    try:
        current = db.current_revision(engine)
    finally:
        engine.dispose()
    head = db.head_revision()
    if as_json:
        _print_json({"current": current, "head": head, "up_to_date": current == head})
        return
    state = "up to date" if current == head else "run `bulksend db upgrade`"
    out.print(f"{current or 'none (empty database)'} (this bulksend: {head}; {state})")


# --- import and lists ---------------------------------------------------------------------


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV file (Excel CSV, any delimiter and encoding).")],
    list_name: Annotated[str, typer.Option("--list", help="List to import into (created if new).")],
    delimiter: Annotated[Optional[str], typer.Option(help="Field delimiter; sniffed by default.")] = None,  # noqa: UP007
    encoding: Annotated[Optional[str], typer.Option(help="File encoding; detected by default.")] = None,  # noqa: UP007
    email_column: Annotated[Optional[str], typer.Option(help="Header or 1-based number of the address column.")] = None,  # noqa: UP007,E501
    on_existing: Annotated[OnExisting, typer.Option(
        help="What to do with addresses already on the list.")] = OnExisting.update,
    rejects: Annotated[Optional[Path], typer.Option(help="Write rejected rows (line, reason, row) here.")] = None,  # noqa: UP007,E501
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would happen; write nothing.")] = False,
    check_domains: CheckDomainsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Import subscribers from a CSV file into a list, all or nothing."""
    if delimiter == "\\t" or (delimiter or "").lower() == "tab":
        delimiter = "\t"
    options = importer.Options(encoding=encoding, delimiter=delimiter, email_column=email_column)
    check = domains.checker(_config(ctx).dns) if check_domains else None
    with _store(ctx) as engine, _progress(file, quiet=as_json) as progress:
        report = subscribers.import_file(
            engine, file, list_name, now=time.time(), options=options, on_existing=on_existing.value,
            rejects=rejects, dry_run=dry_run, progress=progress, check_domains=check,
        )
    if as_json:
        _print_json(report.as_json())
        return
    if report.domain_check is not None:
        out.print(domains.summary(report.domain_check))
    verb = "would import" if dry_run else "imported"
    out.print(
        f"{file}: {report.rows} rows ({report.encoding}, delimiter {report.delimiter!r}) → list "
        f"{list_name!r}: {verb} {report.imported}, updated {report.updated}, skipped "
        f"{report.skipped}, duplicates {report.duplicates}, invalid {report.invalid}, "
        f"suppressed {report.suppressed}"
    )
    if report.still_unsubscribed:
        out.print(f"{report.still_unsubscribed} of them had unsubscribed from {list_name!r} "
                  "and stay unsubscribed")
    if report.rejects_file:
        out.print(f"rejected rows written to {report.rejects_file}")
    elif report.invalid or report.duplicates:
        out.print("pass --rejects FILE to see every rejected row with its line and reason")


@contextmanager
def _progress(file: Path, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal and the file is large."""
    try:
        size = file.stat().st_size
    except OSError:
        size = 0
    if quiet or not err.is_terminal or size < PROGRESS_MIN_BYTES:
        yield None
        return
    columns = ("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(f"importing {file.name}", total=size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command("lists")
def lists_(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every list with its subscribed, unsubscribed and suppressed counts."""
    with _store(ctx) as engine:
        summaries = subscribers.list_summaries(engine)
    if as_json:
        _print_json({"lists": [
            {"name": s.name, "subscribed": s.subscribed, "unsubscribed": s.unsubscribed,
             "suppressed": s.suppressed} for s in summaries]})
        return
    if not summaries:
        out.print("no lists yet: bulksend import FILE.csv --list NAME")
        return
    table = Table("list", "subscribed", "unsubscribed", "suppressed", box=None)
    for s in summaries:
        table.add_row(s.name, str(s.subscribed), str(s.unsubscribed), str(s.suppressed))
    out.print(table)


# --- subscribers ----------------------------------------------------------------------------


@subscribers_app.command("show")
def subscribers_show(ctx: typer.Context, email: str, as_json: JsonOption = False) -> None:
    """One subscriber: name, attributes, lists and suppression."""
    with _store(ctx) as engine:
        view = subscribers.show(engine, email)
    data = {
        "email": view.email, "email_key": view.email_key, "name": view.name,
        "attributes": view.attributes, "lists": view.lists, "suppressed": view.suppression,
        "created_at": _iso(view.created_at), "updated_at": _iso(view.updated_at),
    }
    if as_json:
        _print_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        out.print(f"{key + ':':<12} {value if value not in (None, '') else '-'}")


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@subscribers_app.command("export")
def subscribers_export(
    ctx: typer.Context,
    list_name: Annotated[str, typer.Option("--list", help="The list to export.")],
    output: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout.")] = None,  # noqa: UP007
) -> None:
    """Export the mailable members of a list as CSV (formula cells neutralised)."""
    with _store(ctx) as engine:
        if output is None:
            count = subscribers.export_list(engine, list_name, sys.stdout)
        else:
            with subscribers.atomic_text(output, encoding="utf-8") as file:
                count = subscribers.export_list(engine, list_name, file)
    err.print(f"exported {count} subscribers of {list_name!r}" + (f" to {output}" if output else ""))


# --- suppression ----------------------------------------------------------------------------


@suppress_app.command("add")
def suppress_add(
    ctx: typer.Context,
    emails: Annotated[list[str], typer.Argument(help="Addresses, or @domain for a whole domain.")],
    reason: Annotated[str, typer.Option(help="Why: manual, unsubscribe, hard_bounce, complaint, ...")] = "manual",
) -> None:
    """Never mail these addresses (or domains) again."""
    with _store(ctx) as engine:
        added = suppression.add(engine, emails, reason=reason, source="cli", now=time.time())
    out.print(f"suppressed {added} new, {len(emails) - added} already suppressed")


@suppress_app.command("remove")
def suppress_remove(ctx: typer.Context, email: str) -> None:
    """Lift the suppression of an address (or @domain)."""
    with _store(ctx) as engine:
        suppression.remove(engine, email)
    out.print(f"{email} may be mailed again")


@suppress_app.command("list")
def suppress_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """The suppression list, newest first."""
    with _store(ctx) as engine:
        entries = suppression.entries(engine)
    rows = [{"email": e.email_key, "domain": e.domain, "reason": e.reason, "source": e.source,
             "created_at": _iso(e.created_at)} for e in entries]
    if as_json:
        _print_json({"suppressions": rows})
        return
    table = Table("address or domain", "reason", "source", "since", box=None)
    for row in rows:
        table.add_row(row["email"] or f"@{row['domain']}", row["reason"], row["source"],
                      row["created_at"])
    out.print(table if rows else "the suppression list is empty")


# --- bounces --------------------------------------------------------------------------------


def _bounce_secret(settings: config.Config) -> bytes | None:
    """The token secret that ties bounces to deliveries (None without [sender])."""
    if settings.sender is None:
        return None
    secret = config.resolve_secret(settings.sender.secret_env, os.environ,
                                   "[sender] secret_env").encode("utf-8")
    if len(secret) < tokens.MIN_SECRET_BYTES:  # else every token would fail to read
        raise ConfigError(f"[sender] secret_env {settings.sender.secret_env}: the secret must be "
                          f"at least {tokens.MIN_SECRET_BYTES} bytes")
    return secret


def _print_bounces(result: Any, where: str, as_json: bool) -> None:
    counts = result.counts.to_json()
    if as_json:
        _print_json(counts)
        return
    for key, reason in result.quarantined:
        err.print(f"quarantined {key}: {reason}")
    out.print(f"{where}: {counts['messages']} messages: hard {counts['hard']}, soft "
              f"{counts['soft']}, complaints {counts['complaints']}, unsubscribes "
              f"{counts['unsubscribes']}, ignored {counts['ignored']}, quarantined "
              f"{counts['quarantined']}; {counts['suppressed']} addresses suppressed"
              + ("; time limit reached, the rest next run" if result.stopped_early else ""))


@bounces_app.command("fetch")
def bounces_fetch(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Process the [bounces] mailbox: record, suppress, then delete what was done (for cron)."""
    from bulksend import bounce_fetch, mailbox  # the parser and mail clients load only here

    settings = _config(ctx)
    if settings.bounces is None:
        raise ConfigError(f"{settings.source}: [bounces] is missing: it names the mailbox to read")
    password = config.resolve_secret(settings.bounces.password_env, os.environ,
                                     "[bounces] password_env")
    secret = _bounce_secret(settings)
    with _store(ctx) as engine:
        result = bounce_fetch.fetch(engine, settings.bounces, password, secret=secret)
    _print_bounces(result, mailbox.label(settings.bounces), as_json)


@bounces_app.command("import")
def bounces_import(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="mbox files, maildirs, directories of .eml/.txt, or messages.")],  # noqa: E501
    as_json: JsonOption = False,
) -> None:
    """Process bounce mail saved as files (nothing is deleted; re-importing counts nothing twice)."""
    from bulksend import bounce_fetch

    settings = _config(ctx)
    secret = _bounce_secret(settings)
    with _store(ctx) as engine:
        result = bounce_fetch.import_files(engine, paths, secret=secret,
                                           policy=suppression.BouncePolicy.from_config(settings.bounces))
    _print_bounces(result, ", ".join(map(str, paths)), as_json)


# --- campaigns ----------------------------------------------------------------------------------


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise BulksendError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise BulksendError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise BulksendError(f"{path}: cannot read: {exc.strerror}") from None


def _launch(settings: config.Config) -> campaigns.Launch:
    """What campaigns need from the config and the environment (read here, at the edge)."""
    secret = None
    if settings.sender is not None:
        value = os.environ.get(settings.sender.secret_env)
        secret = value.encode("utf-8") if value else None
    return campaigns.Launch(settings.sender, settings.dkim, secret)


@campaign_app.command("create")
def campaign_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A unique name for the campaign.")],
    list_names: Annotated[list[str], typer.Option("--list", help="A list to send to (repeatable).")],
    subject: Annotated[str, typer.Option(help="The subject (a template too).")],
    html: Annotated[Path, typer.Option(help="The HTML template file.")],
    text: Annotated[Optional[Path], typer.Option(help="The plain-text template; generated from the HTML if omitted.")] = None,  # noqa: UP007,E501
    from_address: Annotated[Optional[str], typer.Option("--from", help="From header; default [sender] from.")] = None,  # noqa: UP007,E501
    send_at: Annotated[Optional[str], typer.Option(help="Start sending at this ISO time (config timezone if no offset).")] = None,  # noqa: UP007,E501
    as_json: JsonOption = False,
) -> None:
    """Create a draft campaign; its templates are checked now."""
    settings = _config(ctx)
    spec = campaigns.NewCampaign(
        name=name, lists=tuple(list_names), subject=subject,
        html=_read_template(html), html_name=str(html),
        text=_read_template(text) if text else None, text_name=str(text) if text else None,
        from_address=from_address,
        send_at=campaigns.parse_when(send_at, settings.timezone) if send_at else None,
    )
    with _store(ctx) as engine:
        campaign = campaigns.create(engine, spec, time.time())
    if as_json:
        _print_json({"name": campaign.name, "status": campaign.status, "lists": list(campaign.lists)})
        return
    out.print(f"created campaign {campaign.name!r} for {', '.join(campaign.lists)}; next: "
              f"bulksend campaign preview {campaign.name} · bulksend campaign start {campaign.name}")


@campaign_app.command("preview")
def campaign_preview(
    ctx: typer.Context, name: str,
    email: Annotated[Optional[str], typer.Option(help="The subscriber to render for; default the first.")] = None,  # noqa: UP007,E501
    output: Annotated[Optional[Path], typer.Option(help="Write the .eml here instead of stdout.")] = None,  # noqa: UP007
) -> None:
    """Print (or write) exactly the bytes a subscriber gets."""
    settings = _config(ctx)
    with _store(ctx) as engine:
        message, queued = campaigns.preview(engine, name, _launch(settings), email=email,
                                            now=time.time())
    if output is None:
        sys.stdout.buffer.write(message.data)
        sys.stdout.flush()
    else:
        output.write_bytes(message.data)
        err.print(f"wrote {output}")
    err.print(f"envelope: MAIL FROM:<{message.envelope_from}> RCPT TO:<{message.recipient}>"
              + ("" if queued else " (not queued yet: its tokens change when the campaign starts)"))


@campaign_app.command("start")
def campaign_start(
    ctx: typer.Context, name: str,
    at: Annotated[Optional[str], typer.Option(help="Start sending at this ISO time.")] = None,  # noqa: UP007
    no_dkim: Annotated[bool, typer.Option("--no-dkim", help="Send without a DKIM signature (recorded).")] = False,
    check_domains: CheckDomainsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Check the launch gates and queue one delivery per recipient."""
    settings = _config(ctx)
    when = campaigns.parse_when(at, settings.timezone) if at else None
    check = domains.checker(settings.dns) if check_domains else None
    with _store(ctx) as engine:
        started = campaigns.start(engine, name, _launch(settings), now=time.time(), at=when,
                                  no_dkim=no_dkim, check_domains=check)
    if as_json:
        checked = started.domain_check
        extra = ({"domains_checked": checked.checked, "dead_domains": len(checked.dead)}
                 if checked else {})
        _print_json({"name": name, "status": started.status, "queued": started.queued,
                     "suppressed": started.suppressed, "send_at": started.send_at,
                     "dkim_domain": started.dkim_domain, **extra})
        return
    if started.domain_check is not None:
        out.print(domains.summary(started.domain_check))
    when_text = f" from {_iso(started.send_at)}" if started.status == "scheduled" and started.send_at else ""
    signing = f"signed d={started.dkim_domain}" if started.dkim_domain else "NOT DKIM-signed (--no-dkim)"
    out.print(f"campaign {name!r} {started.status}{when_text}: {started.queued} queued, "
              f"{started.suppressed} suppressed, {signing}")


def _set_status(ctx: typer.Context, name: str, action: Callable[..., Any], verb: str) -> None:
    with _store(ctx) as engine:
        campaign = action(engine, name, time.time())
    out.print(f"campaign {name!r} {verb}: now {campaign.status}")


@campaign_app.command("pause")
def campaign_pause(ctx: typer.Context, name: str) -> None:
    """Stop handing out the campaign's messages until `resume`."""
    _set_status(ctx, name, campaigns.pause, "paused")


@campaign_app.command("resume")
def campaign_resume(ctx: typer.Context, name: str) -> None:
    """Continue a paused campaign."""
    _set_status(ctx, name, campaigns.resume, "resumed")


@campaign_app.command("cancel")
def campaign_cancel(ctx: typer.Context, name: str) -> None:
    """Cancel a campaign: nothing more of it is sent."""
    _set_status(ctx, name, campaigns.cancel, "cancelled")


@campaign_app.command("retry")
def campaign_retry(
    ctx: typer.Context, name: str,
    unknown: Annotated[bool, typer.Option("--unknown", help="Resend messages whose fate is unknown (same Message-ID).")] = False,  # noqa: E501
    failed: Annotated[bool, typer.Option("--failed", help="Retry failed deliveries (suppressed addresses stay out).")] = False,  # noqa: E501
) -> None:
    """Queue unknown and/or failed deliveries of a campaign again."""
    with _store(ctx) as engine:
        count = campaigns.retry(engine, name, unknown=unknown, failed=failed, now=time.time())
    out.print(f"campaign {name!r}: {count} deliveries queued again; run `bulksend send`")


@campaign_app.command("test")
def campaign_test(
    ctx: typer.Context, name: str,
    to: Annotated[str, typer.Option(help="Where to send the test copy.")],
    account: Annotated[Optional[str], typer.Option(help="The account to send through; default the first.")] = None,  # noqa: UP007,E501
) -> None:
    """Send one copy of the campaign to an address (not recorded, not counted)."""
    settings = _config(ctx)
    _, open_session = _send_settings(settings)
    chosen = settings.account(account) if account else settings.accounts[0]
    with _store(ctx) as engine:
        result = campaigns.send_test(engine, name, _launch(settings), to, chosen, open_session,
                                     time.time())
    reply = f"{result.code or ''} {result.text or ''}".strip()
    if result.outcome != smtp.Outcome.SENT:
        raise BulksendError(f"test copy to {to} via {chosen.name} was not accepted: {reply}")
    out.print(f"test copy of {name!r} sent to {to} via {chosen.name}: {reply}")


@campaign_app.command("list")
def campaign_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every campaign with its status and progress."""
    with _store(ctx) as engine:
        rows = campaigns.all_campaigns(engine)
    if as_json:
        _print_json({"campaigns": [{**row, "created_at": _iso(row["created_at"])} for row in rows]})
        return
    if not rows:
        out.print("no campaigns yet: bulksend campaign create NAME --list L --subject S --html FILE")
        return
    table = Table("campaign", "status", "lists", "sent", "total", box=None)
    for row in rows:
        table.add_row(row["name"], row["status"], ", ".join(row["lists"]), str(row["sent"]),
                      str(row["total"]))
    out.print(table)


@campaign_app.command("show")
def campaign_show(ctx: typer.Context, name: str, as_json: JsonOption = False) -> None:
    """Status, counts per delivery state, bounces and complaints, messages per account."""
    with _store(ctx) as engine:
        data = campaigns.show(engine, name)
    if as_json:
        _print_json(data)
        return
    reason = f" ({data['pause_reason']})" if data["pause_reason"] else ""
    out.print(f"campaign {data['name']}: {data['status']}{reason}, lists {', '.join(data['lists'])}")
    counts = [f"{field} {data[field]}" for field in ("total", *campaigns.STATE_FIELDS) if data[field]]
    out.print("deliveries: " + (", ".join(counts) or "none queued"))
    out.print(f"bounced {data['bounced']}, complaints {data['complaints']}, "
              f"unsubscribed {data['unsubscribed']}")
    for account, sent in data["by_account"].items():
        out.print(f"  {account}: {sent} sent")


# --- sending --------------------------------------------------------------------------------------


def _send_settings(settings: config.Config, *, need_secret: bool = True
                   ) -> tuple[sender.Settings, sender.SessionFactory]:
    """The loop's settings and an SMTP session factory, secrets read from the environment."""
    if settings.sender is None and need_secret:
        raise ConfigError(f"{settings.source}: [sender] is missing: it is needed to send")
    if not settings.accounts:
        raise ConfigError(f"{settings.source}: no [[accounts]]: add at least one SMTP account")
    secret = (config.resolve_secret(settings.sender.secret_env, os.environ, "[sender] secret_env")
              if need_secret and settings.sender is not None else "")
    passwords = {
        a.name: config.resolve_secret(a.password_env, os.environ, f"account {a.name}")
        for a in settings.accounts if a.password_env
    }

    def open_session(account: config.AccountConfig) -> smtp.Session:
        return smtp.open_session(account, passwords.get(account.name))

    loop_settings = sender.Settings(settings.accounts, settings.delivery, settings.sender,  # type: ignore[arg-type]
                                    secret.encode("utf-8"), settings.dkim, settings.timezone)
    return loop_settings, open_session


@app.command("send")
def send(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Send what can go now, then exit (for cron).")] = False,
    max_time: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,  # noqa: UP007
    campaign: Annotated[Optional[str], typer.Option(help="Only this campaign.")] = None,  # noqa: UP007
    as_json: JsonOption = False,
) -> None:
    """Send queued messages round-robin over the accounts, never past their limits."""
    settings = _config(ctx)
    loop_settings, open_session = _send_settings(settings)
    with _store(ctx) as engine:
        worker = sender.Sender(engine, loop_settings, open_session, clock=time.time,
                               sleep=time.sleep, campaign=campaign,
                               crash=sender.CrashPoints(os.environ.get("BULKSEND_CRASH_AT")))
        previous = signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
        try:
            if as_json:  # stdout carries the one JSON object and nothing else
                report = worker.run(once=once, max_time=max_time)
            else:
                report = _send_with_progress(engine, worker, settings, campaign, once, max_time)
        finally:
            signal.signal(signal.SIGTERM, previous)
    if as_json:
        _print_json(report.as_json())
        return
    per_account = ", ".join(f"{name} {count}" for name, count in sorted(report.by_account.items()))
    out.print(f"sent {report.sent}, failed {report.failed}, deferred {report.deferred}, "
              f"unknown {report.unknown}, suppressed {report.suppressed}"
              + (f" ({per_account})" if per_account else ""))
    out.print(f"stopped: {report.stopped_because}")


def _send_with_progress(engine: Engine, worker: sender.Sender, settings: config.Config,
                        campaign: str | None, once: bool, max_time: float | None) -> sender.Report:
    """The send with its live view: bars on a terminal, a line per interval in a log."""
    with db.reading(engine) as connection:
        waiting = store_campaigns.waiting_count(connection, campaign)
    names = [a.name for a in settings.accounts]
    view = progress.SendProgress(out, waiting if once else None,
                                 [progress.AccountLine.of(a) for a in settings.accounts],
                                 plain_every=SEND_LOG_EVERY, plain_final=False)
    return progress.run_with_progress(worker, view, lambda: worker.run(once=once, max_time=max_time),
                                      lambda: progress.account_states(engine, names))


@app.command("plan")
def plan(ctx: typer.Context, name: str, as_json: JsonOption = False) -> None:
    """When the campaign will finish under the accounts' limits."""
    settings = _config(ctx)
    with _store(ctx) as engine:
        data = accounts.plan(engine, name, settings.accounts, settings.timezone, time.time())
    if as_json:
        _print_json({"remaining": data["remaining"], "finishes_at": data["finishes_at"],
                     "by_account": data["by_account"]})
        return
    if data["finishes_at"] is None:
        out.print(f"campaign {name!r}: {data['remaining']} to send, but no account can send")
        return
    out.print(f"campaign {name!r}: {data['remaining']} to send; at the accounts' limits it "
              f"finishes by {_iso(data['finishes_at'])}")
    for account, left in data["by_account"].items():
        out.print(f"  {account}: {'no limit' if left is None else left} more today")
    for account in data["disabled"]:
        out.print(f"  {account}: disabled (bulksend accounts enable {account})")


def _raise_exit(*_: object) -> NoReturn:
    raise SystemExit(0)


@app.command("serve")
def serve(
    ctx: typer.Context,
    listen: Annotated[Optional[str], typer.Option(help="HOST:PORT to listen on; default [server] listen.")] = None,  # noqa: UP007,E501
) -> None:
    """Serve the unsubscribe pages (GET/POST /u/TOKEN, one-click) and /healthz."""
    from bulksend import web  # the web server is only needed here

    settings = _config(ctx)
    try:
        host, port = config.parse_listen(listen) if listen else (settings.server.host,
                                                                  settings.server.port)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--listen") from None
    secret = web.read_secret(settings, os.environ)
    with _store(ctx) as engine:
        app = web.UnsubscribeApp(engine, secret, prefixes=web.prefixes(settings))
        previous = signal.signal(signal.SIGTERM, _raise_exit)  # waitress stops on SystemExit
        try:
            web.serve(app, host, port,
                      ready=lambda url: err.print(f"bulksend serve: listening on {url}"))
        finally:
            signal.signal(signal.SIGTERM, previous)


@app.command("demo")
def demo_command() -> None:
    """The whole pipeline on local SMTP servers it starts itself (no config needed)."""
    from bulksend import demo  # starts servers: imported only when asked for

    code = demo.run(out, err)
    if code:
        raise typer.Exit(code)


@accounts_app.callback()
def accounts_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every account: state, usage of each limit and when it frees, totals."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _config(ctx)
    with _store(ctx) as engine:
        rows = accounts.status(engine, settings.accounts, settings.timezone, time.time())
    if as_json:
        _print_json({"accounts": rows})
        return
    if not rows:
        out.print("no [[accounts]] in the config")
        return
    table = Table("account", "state", "limits (used/limit)", "sent", "failed", "last error", box=None)
    for row in rows:
        state = row["state"] + (f" until {_iso(row['until'])}" if row["until"] else "")
        used = ", ".join(f"{u['used']}/{u['limit']}" + (f" (free {_iso(u['free_at'])})" if u["free_at"] else "")
                         for u in row["limits"]) or "no limits"
        table.add_row(row["name"], state, used, str(row["sent"]), str(row["failed"]),
                      row["last_error"] or "")
    out.print(table)


@accounts_app.command("check")
def accounts_check(ctx: typer.Context, name: Annotated[Optional[str], typer.Argument()] = None,  # noqa: UP007
                   as_json: JsonOption = False) -> None:
    """Connect, TLS, AUTH and capabilities of every account (or one); sends no mail."""
    settings = _config(ctx)
    _, open_session = _send_settings(settings, need_secret=False)
    results = accounts.check(settings.accounts, open_session, name)
    if as_json:
        _print_json({"accounts": results})
    else:
        for row in results:
            if row["ok"]:
                caps = row["capabilities"]
                features = [f for f in ("eightbitmime", "smtputf8") if caps[f]]
                out.print(f"{row['name']}: ok ({'TLS' if row['tls'] else 'no TLS'}; "
                          f"AUTH {' '.join(caps['auth']) or 'not offered'}; "
                          f"{' '.join(features) or 'no 8BITMIME'}"
                          + (f"; SIZE {caps['size']}" if caps["size"] else "") + ")")
            else:
                out.print(f"{row['name']}: FAILED: {row['error']}")
    if not all(row["ok"] for row in results):
        raise typer.Exit(1)


@accounts_app.command("enable")
def accounts_enable(ctx: typer.Context, name: str) -> None:
    """Put a disabled account back into rotation."""
    settings = _config(ctx)
    with _store(ctx) as engine:
        previous = accounts.enable(engine, settings.accounts, name, time.time())
    out.print(f"account {name!r} enabled (was {previous})")


# --- dkim -----------------------------------------------------------------------------------------


@dkim_app.command("keygen")
def dkim_keygen(
    domain: str, selector: str,
    ed25519: Annotated[bool, typer.Option("--ed25519", help="An Ed25519 key instead of RSA-2048.")] = False,
    directory: Annotated[Path, typer.Option("--dir", help="Where to write the key.")] = Path("dkim"),
) -> None:
    """Write a new DKIM key and print its DNS TXT record and the [[dkim]] block."""
    directory.mkdir(parents=True, exist_ok=True)
    path, record = dkim.keygen(domain, selector, directory, ed25519=ed25519)
    out.print(f"wrote {path} (keep it secret)\n\npublish this DNS record:\n{record}\n")
    out.print(f"and add to bulksend.toml:\n[[dkim]]\ndomain = \"{domain}\"\n"
              f"selector = \"{selector}\"\nprivate_key_file = \"{path}\"")


# --- entry point ------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code (tests call this directly)."""
    try:
        # Without standalone mode, click returns typer.Exit's code instead of raising it.
        code = app(args=argv, prog_name="bulksend", standalone_mode=False)
    except BulksendError as exc:
        err.print(f"bulksend: {exc}")
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("bulksend: interrupted; nothing was changed by the interrupted step")
        return 130
    except typer.TyperException as exc:  # usage errors: the parser already explained them
        if hasattr(exc, "show"):
            exc.show()
        else:
            err.print(f"bulksend: {exc}")
        return int(getattr(exc, "exit_code", 2))
    return code if isinstance(code, int) else 0


def main() -> NoReturn:
    """Console-script entry point."""
    sys.exit(run())
