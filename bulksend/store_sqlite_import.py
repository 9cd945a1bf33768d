"""The SQLite fast path of an import: valid rows go straight into `subscribers`, in file order.

`store.finish_import` stages every row and then merges them in several set-based passes;
on SQLite that costs more than the rows themselves. Here each batch is one
`INSERT ... ON CONFLICT (email_key) DO NOTHING`: the unique index decides, and because the
batches arrive in file order, the first line of an address wins. The import's transaction
holds SQLite's write lock, so new subscribers get the ids max(id)+1, +2, ... in file order,
and a batch's new members are the subscribers with ids past the batch's first one.

A batch that inserted fewer rows than it sent is sorted out row by row: a row whose
address now has the next new id was inserted; any other row met an address already stored
(before the import, or on an earlier line) and goes to a temporary table. `finish` merges
those few rows set-based, as `store.finish_import` merges all of them.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bulksend.errors import StoreError
from bulksend.models import list_members, subscribers, suppressions
from bulksend.store import MergeCounts, StagedRow, suppressed_condition

_temp = sa.MetaData()
conflicts = sa.Table(  # staged rows whose address was already stored when they came
    "import_conflicts", _temp,
    sa.Column("line", sa.BigInteger, nullable=False),
    sa.Column("email_key", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),  # JSON
    sa.Column("subscriber_id", sa.BigInteger, nullable=False),
    prefixes=["TEMPORARY"],
)
existing = sa.Table(  # subscribers stored before the import: the first line naming each
    "import_existing", _temp,
    sa.Column("subscriber_id", sa.BigInteger, primary_key=True),
    sa.Column("line", sa.BigInteger, nullable=False),
    sa.Column("suppressed", sa.Boolean, nullable=False),
    sa.Column("member_status", sa.Text),  # status on the target list before the import
    prefixes=["TEMPORARY"],
)

# Staged rows are (line, email, email_key, domain, name, attributes, now): the numbered
# parameters pick the columns, so rows are bound as they come, without copying.
_INSERT = ("INSERT INTO subscribers (email, email_key, name, attributes, created_at, updated_at) "
           "VALUES (?2, ?3, ?5, ?6, ?7, ?7) ON CONFLICT (email_key) DO NOTHING")
_CONFLICT = ("INSERT INTO import_conflicts (line, email_key, name, attributes, subscriber_id) "
             "VALUES (?, ?, ?, ?, ?)")


class DirectImport:
    """One import into list `target_list`, inside the caller's transaction."""

    def __init__(self, connection: Connection, target_list: int, now: float,
                 keep_first_lines: bool) -> None:
        """Prepare; the caller has written already, so the write lock is held."""
        self.connection = connection
        self.cursor = connection.connection.driver_connection.cursor()
        self.target_list = target_list
        self.now = now
        self.first_id = self.next_id = 1 + connection.execute(
            sa.select(sa.func.coalesce(sa.func.max(subscribers.c.id), 0))).scalar_one()
        # The line of each new subscriber, by id - first_id; only rejects files need it.
        self.first_lines: array[int] | None = array("q") if keep_first_lines else None
        self.conflicts = 0
        # The email_key index takes rows in random order: with SQLite's default 2 MB page
        # cache its pages go out to the WAL and back again and again (measured: 1.7x the
        # time for a million rows). Durability is unchanged: this is memory only.
        self.cache_size = int(self.cursor.execute("PRAGMA cache_size").fetchone()[0])
        self.cursor.execute("PRAGMA cache_size = -32000")  # KiB; the default is -2000
        # Checking every new member against an empty suppression list costs a third of its insert.
        status: Any = sa.literal("subscribed")
        if connection.execute(sa.select(sa.exists().select_from(suppressions))).scalar():
            status = sa.case((suppressed_condition(subscribers.c.email_key), "unsubscribed"),
                             else_="subscribed")
        self.new_members = list_members.insert().from_select(  # built once: it runs per batch
            ["list_id", "subscriber_id", "status", "created_at", "updated_at"],
            sa.select(sa.literal(target_list), subscribers.c.id, status, sa.literal(now),
                      sa.literal(now))
            .where(subscribers.c.id >= sa.bindparam("start")),
        )
        end(connection)
        for table in (conflicts, existing):
            table.create(connection)

    def close(self) -> None:
        """Give the pooled connection its page cache size back (also after a failure)."""
        self.cursor.execute(f"PRAGMA cache_size = {self.cache_size}")  # an int (PRAGMA takes no parameters)

    def add(self, rows: Sequence[StagedRow]) -> None:
        """Insert a batch of rows (in file order, after every earlier batch)."""
        start = self.next_id
        self.cursor.executemany(_INSERT, rows)
        inserted = self.cursor.rowcount
        if inserted == len(rows):
            self.next_id += inserted
            if self.first_lines is not None:
                self.first_lines.extend(row[0] for row in rows)
        else:
            self._sort_out(rows, start)
        if self.next_id != start + inserted:
            raise StoreError("import: SQLite did not number new subscribers in sequence")
        if inserted:
            self.connection.execute(self.new_members, {"start": start})

    def _sort_out(self, rows: Sequence[StagedRow], start: int) -> None:
        keys = list({row[2] for row in rows})
        ids = dict(self.connection.execute(
            sa.select(subscribers.c.email_key, subscribers.c.id)
            .where(subscribers.c.email_key.in_(sa.bindparam("keys", expanding=True))),
            {"keys": keys}).all())
        found = []
        for line, _, key, _, name, attributes, _ in rows:
            subscriber_id = ids[key]
            if subscriber_id == self.next_id:  # this row inserted it
                self.next_id += 1
                if self.first_lines is not None:
                    self.first_lines.append(line)
            else:
                found.append((line, key, name, attributes, subscriber_id))
        self.cursor.executemany(_CONFLICT, found)
        self.conflicts += len(found)

    def finish(self, on_existing: str) -> MergeCounts:
        """Merge the rows that met stored addresses; return what the whole import did."""
        last = self.connection.execute(sa.select(sa.func.max(subscribers.c.id))).scalar()
        if self.next_id > self.first_id and last != self.next_id - 1:
            raise StoreError("import: SQLite did not number new subscribers in sequence")
        new = self.next_id - self.first_id
        new_suppressed = self.connection.execute(
            sa.select(sa.func.count()).select_from(list_members)
            .where(list_members.c.list_id == self.target_list,
                   list_members.c.subscriber_id >= self.first_id,
                   list_members.c.status == "unsubscribed")).scalar_one()
        counts = _Existing(0, 0, 0, 0, 0)
        if self.conflicts:
            counts = self._merge_existing(on_existing)
        update = on_existing == "update"
        return MergeCounts(
            imported=new - new_suppressed + counts.imported,
            updated=counts.on_list if update else 0,
            skipped=0 if update else counts.on_list,
            duplicates=self.conflicts - counts.unique,
            suppressed=new_suppressed + counts.suppressed,
            still_unsubscribed=counts.unsubscribed,
        )

    def _merge_existing(self, on_existing: str) -> _Existing:
        connection = self.connection
        before = conflicts.c.subscriber_id < self.first_id
        first = (sa.select(conflicts.c.subscriber_id, sa.func.min(conflicts.c.line).label("line"),
                           sa.func.min(conflicts.c.email_key).label("email_key"))
                 .where(before).group_by(conflicts.c.subscriber_id).subquery())
        member_status = (sa.select(list_members.c.status)
                         .where(list_members.c.list_id == self.target_list,
                                list_members.c.subscriber_id == first.c.subscriber_id)
                         .scalar_subquery())
        connection.execute(existing.insert().from_select(
            ["subscriber_id", "line", "suppressed", "member_status"],
            sa.select(first.c.subscriber_id, first.c.line, suppressed_condition(first.c.email_key),
                      member_status)))
        if on_existing == "update":
            self._update_existing()
        status = sa.case((existing.c.suppressed, "unsubscribed"), else_="subscribed")
        connection.execute(list_members.insert().from_select(
            ["list_id", "subscriber_id", "status", "created_at", "updated_at"],
            sa.select(sa.literal(self.target_list), existing.c.subscriber_id, status,
                      sa.literal(self.now), sa.literal(self.now))
            .where(existing.c.member_status.is_(None))))
        count_if = lambda condition: sa.func.count(sa.case((condition, 1)))  # noqa: E731
        on_list = sa.and_(sa.not_(existing.c.suppressed), existing.c.member_status.is_not(None))
        return _Existing(*connection.execute(sa.select(
            count_if(sa.and_(sa.not_(existing.c.suppressed), existing.c.member_status.is_(None))),
            count_if(on_list),
            count_if(existing.c.suppressed),
            count_if(sa.and_(on_list, existing.c.member_status == "unsubscribed")),
            sa.func.count(),
        )).one())

    def _update_existing(self) -> None:
        winners = (sa.select(conflicts).join(existing, sa.and_(
            existing.c.subscriber_id == conflicts.c.subscriber_id,
            existing.c.line == conflicts.c.line)).subquery())
        self.connection.execute(
            subscribers.update()
            .where(subscribers.c.id == winners.c.subscriber_id)
            .values(
                # An empty name cell does not erase a name we already know.
                name=sa.case((winners.c.name != "", winners.c.name), else_=subscribers.c.name),
                attributes=sa.func.json_patch(subscribers.c.attributes, winners.c.attributes),
                updated_at=self.now,
            )
        )

    def duplicate_lines(self) -> dict[int, int]:
        """Lines that repeat an earlier line's address: {line: first line}."""
        assert self.first_lines is not None, "DirectImport(keep_first_lines=True) keeps them"
        rows = self.connection.execute(
            sa.select(conflicts.c.line, conflicts.c.subscriber_id, existing.c.line)
            .outerjoin(existing, existing.c.subscriber_id == conflicts.c.subscriber_id)
            .where(sa.or_(existing.c.line.is_(None), existing.c.line != conflicts.c.line)))
        return {line: first if first is not None else self.first_lines[subscriber_id - self.first_id]
                for line, subscriber_id, first in rows}


class _Existing(NamedTuple):
    imported: int  # not suppressed, not on the list before
    on_list: int  # not suppressed, on the list before (updated or skipped)
    suppressed: int
    unsubscribed: int  # of on_list: unsubscribed from the list, and stays so
    unique: int  # distinct stored subscribers the file named


def end(connection: Connection) -> None:
    """Drop the temporary tables of an import on this connection."""
    for name in ("import_conflicts", "import_existing"):
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")  # constant names

