"""Every SQL statement bulksend runs. Callers own the transaction (see `db.transaction`).

Functions take an open `Connection` and plain values and return plain values or small
dataclasses; nothing here knows about files, the CLI or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from bulksend.errors import NotFound
from bulksend.models import list_members, lists, subscribers, suppressions

# --- lists ------------------------------------------------------------------------------


def _insert(connection: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING on both backends."""
    if connection.dialect.name == "postgresql":
        return sa.dialects.postgresql.insert(table)
    return sa.dialects.sqlite.insert(table)


def ensure_list(connection: Connection, name: str, now: float) -> int:
    """The id of list `name`, created if it does not exist."""
    # Writing first takes SQLite's write lock before any read, so a concurrent writer
    # makes this wait (busy_timeout) instead of failing on a stale snapshot.
    connection.execute(_insert(connection, lists).values(name=name, created_at=now)
                       .on_conflict_do_nothing(index_elements=["name"]))
    return list_id(connection, name)


def list_id(connection: Connection, name: str) -> int:
    """The id of list `name`; NotFound if there is none."""
    found = connection.execute(sa.select(lists.c.id).where(lists.c.name == name)).scalar()
    if found is None:
        raise NotFound(f"list {name!r} does not exist")
    return int(found)


class domain_of(FunctionElement[str]):  # noqa: N801 - reads as a SQL function
    """The domain of an email key (keys hold exactly one '@': the importer guarantees it)."""

    type = sa.Text()
    inherit_cache = True


@compiles(domain_of, "sqlite")
def _domain_of_sqlite(element: domain_of, compiler: Any, **kw: Any) -> str:
    key = compiler.process(element.clauses, **kw)
    return f"substr({key}, instr({key}, '@') + 1)"


@compiles(domain_of, "postgresql")
def _domain_of_postgresql(element: domain_of, compiler: Any, **kw: Any) -> str:
    return f"split_part({compiler.process(element.clauses, **kw)}, '@', 2)"


def suppressed_condition(email_key: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    """True where the address, or its domain, is on the suppression list."""
    domain = domain_of(email_key)
    return sa.or_(
        sa.exists().where(suppressions.c.email_key == email_key),
        sa.exists().where(suppressions.c.domain == domain),
    )


@dataclass(frozen=True)
class ListSummary:
    """Member counts of one list; the three counts partition its members."""

    name: str
    subscribed: int
    unsubscribed: int
    suppressed: int


def list_summaries(connection: Connection) -> list[ListSummary]:
    """Every list with its subscribed, unsubscribed and suppressed member counts."""
    suppressed = suppressed_condition(subscribers.c.email_key)
    count_if = lambda condition: sa.func.count(sa.case((condition, 1)))  # noqa: E731
    query = (
        sa.select(
            lists.c.name,
            count_if(sa.and_(list_members.c.status == "subscribed", sa.not_(suppressed))),
            count_if(sa.and_(list_members.c.status == "unsubscribed", sa.not_(suppressed))),
            count_if(suppressed),
        )
        .select_from(
            lists.outerjoin(list_members, list_members.c.list_id == lists.c.id)
            .outerjoin(subscribers, subscribers.c.id == list_members.c.subscriber_id)
        )
        .group_by(lists.c.id, lists.c.name)
        .order_by(lists.c.name)
    )
    return [ListSummary(*row) for row in connection.execute(query)]


# --- subscribers --------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriberView:
    """A subscriber with its list memberships and suppression, as `subscribers show` prints."""

    email: str
    email_key: str
    name: str
    attributes: dict[str, Any]
    created_at: float
    updated_at: float
    lists: dict[str, str]  # list name -> membership status
    suppression: str | None  # reason, if the address or its domain is suppressed


def subscriber(connection: Connection, email_key: str) -> SubscriberView:
    """The subscriber whose dedupe key is `email_key`; NotFound otherwise."""
    row = connection.execute(
        sa.select(subscribers).where(subscribers.c.email_key == email_key)
    ).first()
    if row is None:
        raise NotFound(f"subscriber {email_key!r} does not exist")
    memberships = connection.execute(
        sa.select(lists.c.name, list_members.c.status)
        .join(list_members, list_members.c.list_id == lists.c.id)
        .where(list_members.c.subscriber_id == row.id)
        .order_by(lists.c.name)
    )
    domain = email_key.rpartition("@")[2]
    reason = connection.execute(
        sa.select(suppressions.c.reason)
        .where(sa.or_(suppressions.c.email_key == email_key, suppressions.c.domain == domain))
        .order_by(suppressions.c.email_key.is_(None))  # the address's own entry first
    ).scalar()
    return SubscriberView(row.email, row.email_key, row.name, dict(row.attributes),
                          row.created_at, row.updated_at, dict(memberships.all()), reason)


def export_members(connection: Connection, list_db_id: int) -> Iterable[sa.Row[Any]]:
    """Members of a list who may be mailed (subscribed, not suppressed), in import order."""
    return connection.execute(
        sa.select(subscribers.c.email, subscribers.c.name, subscribers.c.attributes)
        .join(list_members, list_members.c.subscriber_id == subscribers.c.id)
        .where(list_members.c.list_id == list_db_id, list_members.c.status == "subscribed",
               sa.not_(suppressed_condition(subscribers.c.email_key)))
        .order_by(subscribers.c.id)
        .execution_options(yield_per=2000)
    )


# --- suppressions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Suppression:
    """One entry of the suppression list: an address or a whole domain."""

    email_key: str | None
    domain: str | None
    reason: str
    source: str
    created_at: float


def add_suppressions(connection: Connection, entries: Sequence[dict[str, Any]]) -> int:
    """Insert suppressions (keys email_key or domain, reason, source, created_at); returns new ones.

    An address already suppressed keeps its first reason: the earliest cause is the one
    that explains it.
    """
    added = 0
    for entry in entries:
        target = suppressions.c.email_key if entry.get("email_key") else suppressions.c.domain
        value = entry.get("email_key") or entry.get("domain")
        exists = connection.execute(sa.select(suppressions.c.id).where(target == value)).first()
        if exists is None:
            connection.execute(sa.insert(suppressions).values(**entry))
            added += 1
    return added


def remove_suppression(connection: Connection, email_key: str | None, domain: str | None) -> bool:
    """Delete the suppression of an address or a domain; True if there was one."""
    target = suppressions.c.email_key if email_key else suppressions.c.domain
    result = connection.execute(sa.delete(suppressions).where(target == (email_key or domain)))
    return result.rowcount > 0


def list_suppressions(connection: Connection) -> list[Suppression]:
    """The whole suppression list, newest first."""
    rows = connection.execute(
        sa.select(suppressions.c.email_key, suppressions.c.domain, suppressions.c.reason,
                  suppressions.c.source, suppressions.c.created_at)
        .order_by(suppressions.c.created_at.desc(), suppressions.c.id.desc())
    )
    return [Suppression(*row) for row in rows]


# --- import ------------------------------------------------------------------------------
# A file is loaded into a temporary staging table first, then merged with set-based
# statements: duplicates, existing subscribers and suppressions are decided by the database
# in one pass each instead of one query per row, and memory stays flat for any file size.

_temp = sa.MetaData()
staging = sa.Table(
    "import_staging", _temp,
    sa.Column("line", sa.BigInteger, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    sa.Column("email_key", sa.Text, nullable=False),
    sa.Column("domain", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),  # JSON
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)
merge = sa.Table(
    "import_merge", _temp,
    sa.Column("line", sa.BigInteger, nullable=False),
    sa.Column("email_key", sa.Text, primary_key=True),
    sa.Column("subscriber_id", sa.BigInteger),
    sa.Column("existed", sa.Boolean, nullable=False),
    sa.Column("suppressed", sa.Boolean, nullable=False),
    sa.Column("member_status", sa.Text),  # status on the target list before the import
    prefixes=["TEMPORARY"], postgresql_on_commit="DROP",
)


def begin_import(connection: Connection) -> None:
    """Create the empty staging tables for one import inside the caller's transaction."""
    end_import(connection)  # a pooled SQLite connection may still hold an aborted import's
    for table in (staging, merge):
        table.create(connection)


def end_import(connection: Connection) -> None:
    """Drop the staging tables (PostgreSQL drops them at commit anyway)."""
    for name in ("import_staging", "import_merge"):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")  # constant names


# line, email as given, email_key, ascii domain, name, attributes JSON, created/updated time
StagedRow = tuple[int, str, str, str, str, str, float]


def stage_rows(connection: Connection, rows: Sequence[StagedRow]) -> None:
    """Append valid rows to the staging table, by the fastest path each driver offers."""
    if connection.dialect.name == "postgresql":
        cursor = connection.connection.driver_connection.cursor()
        with cursor.copy("COPY import_staging (line, email, email_key, domain, name, attributes)"
                         " FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row[:6])
        return
    connection.exec_driver_sql(
        "INSERT INTO import_staging (line, email, email_key, domain, name, attributes) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [row[:6] for row in rows],
    )


@dataclass(frozen=True)
class MergeCounts:
    """What a merge did; each staged row lands in exactly one of the first five counts."""

    imported: int  # new to the list (the subscriber may have existed on other lists)
    updated: int  # already on the list, data updated
    skipped: int  # already on the list, left as it was (--on-existing skip)
    duplicates: int  # the address appeared on an earlier line of the same file
    suppressed: int  # on the suppression list: stored, not (re-)subscribed
    still_unsubscribed: int  # of updated/skipped: unsubscribed from the list, and stays so


def finish_import(connection: Connection, target_list: int, on_existing: str, now: float
                  ) -> MergeCounts:
    """Merge the staged rows into subscribers and the list's members."""
    # Indexed only now: building the index once is cheaper than maintaining it per row.
    connection.exec_driver_sql("CREATE INDEX ix_import_staging_key ON import_staging (email_key, line)")
    _analyze(connection, "import_staging")  # PostgreSQL never auto-analyzes temporary tables
    first = (sa.select(staging.c.email_key, sa.func.min(staging.c.line).label("line"))
             .group_by(staging.c.email_key).subquery())
    existing_id = (sa.select(subscribers.c.id)
                   .where(subscribers.c.email_key == first.c.email_key).scalar_subquery())
    connection.execute(merge.insert().from_select(
        ["line", "email_key", "subscriber_id", "existed", "suppressed"],
        sa.select(first.c.line, first.c.email_key, existing_id, existing_id.is_not(None),
                  suppressed_condition(first.c.email_key)),
    ))
    connection.execute(merge.update().where(merge.c.existed).values(
        member_status=sa.select(list_members.c.status)
        .where(list_members.c.list_id == target_list,
               list_members.c.subscriber_id == merge.c.subscriber_id)
        .scalar_subquery()
    ))
    _analyze(connection, "import_merge")
    _insert_new_subscribers(connection, now)
    if on_existing == "update":
        _update_existing_subscribers(connection, now)
    _add_members(connection, target_list, now)
    return _merge_counts(connection, on_existing)


def _analyze(connection: Connection, table: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"ANALYZE {table}")  # constant names only


def _winner_rows() -> sa.Select[Any]:
    return sa.select(staging, merge.c.subscriber_id).join(
        merge, sa.and_(merge.c.email_key == staging.c.email_key, merge.c.line == staging.c.line))


def _insert_new_subscribers(connection: Connection, now: float) -> None:
    winners = _winner_rows().where(sa.not_(merge.c.existed)).subquery()
    connection.execute(subscribers.insert().from_select(
        ["email", "email_key", "name", "attributes", "created_at", "updated_at"],
        sa.select(winners.c.email, winners.c.email_key, winners.c.name,
                  _as_json(connection, winners.c.attributes), sa.literal(now), sa.literal(now))
        .order_by(winners.c.line),
    ))
    connection.execute(
        merge.update().where(merge.c.subscriber_id.is_(None)).values(
            subscriber_id=sa.select(subscribers.c.id)
            .where(subscribers.c.email_key == merge.c.email_key).scalar_subquery())
    )


def _as_json(connection: Connection, column: sa.ColumnElement[str]) -> sa.ColumnElement[Any]:
    if connection.dialect.name == "postgresql":
        return sa.cast(column, sa.JSON)
    return column


def _update_existing_subscribers(connection: Connection, now: float) -> None:
    winners = _winner_rows().where(merge.c.existed).subquery()
    if connection.dialect.name == "postgresql":
        merged = sa.cast(
            sa.cast(subscribers.c.attributes, sa.dialects.postgresql.JSONB).op("||")(
                sa.cast(winners.c.attributes, sa.dialects.postgresql.JSONB)),
            sa.JSON)
    else:
        merged = sa.func.json_patch(subscribers.c.attributes, winners.c.attributes)
    connection.execute(
        subscribers.update()
        .where(subscribers.c.id == winners.c.subscriber_id)
        .values(
            # An empty name cell does not erase a name we already know.
            name=sa.case((winners.c.name != "", winners.c.name), else_=subscribers.c.name),
            attributes=merged,
            updated_at=now,
        )
    )


def _add_members(connection: Connection, target_list: int, now: float) -> None:
    status = sa.case((merge.c.suppressed, "unsubscribed"), else_="subscribed")
    connection.execute(list_members.insert().from_select(
        ["list_id", "subscriber_id", "status", "created_at", "updated_at"],
        sa.select(sa.literal(target_list), merge.c.subscriber_id, status,
                  sa.literal(now), sa.literal(now))
        .where(merge.c.member_status.is_(None)),
    ))


def _merge_counts(connection: Connection, on_existing: str) -> MergeCounts:
    count_if = lambda condition: sa.func.count(sa.case((condition, 1)))  # noqa: E731
    on_list = sa.and_(sa.not_(merge.c.suppressed), merge.c.member_status.is_not(None))
    row = connection.execute(sa.select(
        count_if(sa.and_(sa.not_(merge.c.suppressed), merge.c.member_status.is_(None))),
        count_if(on_list),
        count_if(merge.c.suppressed),
        count_if(sa.and_(on_list, merge.c.member_status == "unsubscribed")),
        sa.func.count(),
    )).one()
    imported, on_list_count, suppressed, unsubscribed, unique = row
    staged = connection.execute(sa.select(sa.func.count()).select_from(staging)).scalar_one()
    update = on_existing == "update"
    return MergeCounts(
        imported=imported,
        updated=on_list_count if update else 0,
        skipped=0 if update else on_list_count,
        duplicates=staged - unique,
        suppressed=suppressed,
        still_unsubscribed=unsubscribed,
    )


def duplicate_lines(connection: Connection) -> dict[int, int]:
    """Staged lines that repeat an earlier line's address: {line: first line}."""
    first = (sa.select(staging.c.email_key, sa.func.min(staging.c.line).label("first"))
             .group_by(staging.c.email_key).having(sa.func.count() > 1).subquery())
    rows = connection.execute(
        sa.select(staging.c.line, first.c.first)
        .join(first, first.c.email_key == staging.c.email_key)
        .where(staging.c.line != first.c.first)
    )
    return dict(rows.all())
