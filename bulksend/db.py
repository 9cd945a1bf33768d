"""Opening the store (SQLite or PostgreSQL) and migrating it with Alembic.

SQLite is opened for durability first (DESIGN §3): WAL, `synchronous=FULL`, a busy timeout
and foreign keys. Write transactions start with `BEGIN IMMEDIATE` so that two processes
never both read and then both try to upgrade to a write lock (SQLite would fail one of them
at once instead of waiting).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bulksend.errors import StoreError

BUSY_TIMEOUT_MS = 10_000
# Connections held at once: the sender's lanes (one per SMTP session) read the suppression
# list, its writer keeps one, the main thread claims. Opened only when needed.
SQLITE_POOL = {"pool_size": 25, "max_overflow": 15}
POSTGRES_POOL = {"pool_size": 10, "max_overflow": 25}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The driver must not open transactions on its own; the "begin" hook below does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def display_url(url: str | sa.URL) -> str:
    """The URL with any password masked, for messages."""
    return sa.make_url(url).render_as_string(hide_password=True)


def create_engine(url: str) -> Engine:
    """An engine for `url`, SQLite tuned for durability; nothing is connected yet."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"database URL {url!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        in_memory = parsed.database in (None, "", ":memory:")  # a single-connection pool there
        engine = sa.create_engine(parsed, **({} if in_memory else SQLITE_POOL))
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(parsed, pool_pre_ping=True, **POSTGRES_POOL)
    raise StoreError(f"database URL {display_url(parsed)}: only sqlite and postgresql are supported")


@contextmanager
def transaction(engine: Engine, *, rollback: bool = False, immediate: bool = True
                ) -> Iterator[Connection]:
    """A write transaction: committed when the block ends, rolled back if it raises.

    `rollback=True` undoes everything even on success (dry runs). `immediate=False` lets a
    long SQLite transaction that first fills temporary tables take the write lock only at
    its first write to the database itself, so other writers are held up for less time.
    """
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite" and immediate:
                connection.execution_options(sqlite_begin="IMMEDIATE")
            with connection.begin() as tx:
                yield connection
                if rollback:
                    tx.rollback()
    except sa.exc.OperationalError as exc:
        raise StoreError(f"database {display_url(engine.url)}: {_reason(exc)}") from exc


def connect_writer(engine: Engine) -> Connection:
    """A connection for a long-lived writer (see `transaction_on`); the caller closes it."""
    try:
        connection = engine.connect()
    except sa.exc.OperationalError as exc:
        raise StoreError(f"database {display_url(engine.url)}: {_reason(exc)}") from exc
    if engine.dialect.name == "sqlite":
        connection.execution_options(sqlite_begin="IMMEDIATE")
    return connection


@contextmanager
def transaction_on(connection: Connection) -> Iterator[Connection]:
    """A write transaction on a connection the caller keeps open: no pool round trip."""
    try:
        with connection.begin():
            yield connection
    except sa.exc.OperationalError as exc:
        raise StoreError(f"database {display_url(connection.engine.url)}: {_reason(exc)}") from exc


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction (a consistent snapshot on both backends)."""
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":  # READ COMMITTED would see later commits
                connection.execution_options(isolation_level="REPEATABLE READ")
            with connection.begin():
                yield connection
    except sa.exc.OperationalError as exc:
        raise StoreError(f"database {display_url(engine.url)}: {_reason(exc)}") from exc


def _reason(exc: sa.exc.DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)


# Alembic is imported inside the functions below: it costs ~0.2 s at start-up, and most
# commands (every cron run of `send`) only need to compare one revision string.


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(files("bulksend.migrations")))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code ships."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(files("bulksend.migrations")))
    head = script.get_current_head()
    assert head is not None, "bulksend.migrations has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with reading(engine) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Migrate the database to the newest revision; returns it."""
    from alembic import command

    with transaction(engine) as connection:
        command.upgrade(_alembic_config(connection), "head")
    return head_revision()


def open_store(url: str) -> Engine:
    """An engine on a database that is migrated to the revision this code expects."""
    engine = create_engine(url)
    current = current_revision(engine)
    head = head_revision()
    if current != head:
        engine.dispose()
        where = display_url(url)
        if current is None:
            raise StoreError(f"database {where} is not initialised: run `bulksend db upgrade`")
        raise StoreError(
            f"database {where} is at revision {current}, this bulksend needs {head}: "
            "run `bulksend db upgrade`"
        )
    return engine
