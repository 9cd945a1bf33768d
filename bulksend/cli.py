"""The `bulksend` command line: parse, call one library function, print.

Exit codes (DESIGN §9): 0 success, 1 an operational error with a one-line message naming
the resource, 2 a usage error. `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import enum
import json
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

from bulksend import __version__, config, db, importer, subscribers, suppression
from bulksend.config_example import EXAMPLE_CONFIG
from bulksend.errors import BulksendError

PROGRESS_MIN_BYTES = 1 << 20  # smaller files import faster than a bar can draw

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

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

class OnExisting(str, enum.Enum):
    """`import --on-existing`: update an existing subscriber's data, or leave it as it was."""

    update = "update"
    skip = "skip"


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


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
    as_json: JsonOption = False,
) -> None:
    """Import subscribers from a CSV file into a list, all or nothing."""
    if delimiter == "\\t" or (delimiter or "").lower() == "tab":
        delimiter = "\t"
    options = importer.Options(encoding=encoding, delimiter=delimiter, email_column=email_column)
    with _store(ctx) as engine, _progress(file, quiet=as_json) as progress:
        report = subscribers.import_file(
            engine, file, list_name, now=time.time(), options=options, on_existing=on_existing.value,
            rejects=rejects, dry_run=dry_run, progress=progress,
        )
    if as_json:
        _print_json(report.as_json())
        return
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


# --- entry point ------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code (tests call this directly)."""
    try:
        app(args=argv, prog_name="bulksend", standalone_mode=False)
    except BulksendError as exc:
        err.print(f"bulksend: {exc}", markup=False)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("bulksend: interrupted; nothing was changed by the interrupted step")
        return 130
    except typer.TyperException as exc:  # usage errors: the parser already explained them
        getattr(exc, "show", lambda: err.print(f"bulksend: {exc}"))()
        return int(getattr(exc, "exit_code", 2))
    return 0


def main() -> NoReturn:
    """Console-script entry point."""
    sys.exit(run())
