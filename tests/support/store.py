"""The store fixtures: a fresh, migrated database per test, on SQLite and on PostgreSQL.

`store_url` and `engine` are parametrized over both backends, so every test that touches
the store runs twice. PostgreSQL comes from pytest-postgresql: one throwaway cluster per
session whose template database is migrated once; each test gets a copy of it. `pg_ctl`
refuses to run as root, so it is started through a small wrapper that runs it as the
`postgres` user (see `_write_pg_ctl_wrapper`).
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pytest_postgresql import factories
from pytest_postgresql.janitor import DatabaseJanitor

from bulksend import db
from tests.support.real import unavailable

BACKENDS = ("sqlite", "postgresql")


def _pg_ctl() -> Path | None:
    """The newest installed PostgreSQL's pg_ctl."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


WRAPPER = """#!/bin/sh
# pg_ctl refuses root: hand the data and log directories to postgres and run it as postgres.
set -e
prev=""
for arg in "$@"; do
  case "$prev" in
    -D|-l|--pgdata|--log)
      dir=$(dirname "$arg")
      mkdir -p "$dir"
      chown postgres "$dir"
      # pytest's temporary directories are 0700; postgres must be able to traverse them.
      d="$dir"
      while [ "$d" != "/" ]; do chmod a+x "$d"; d=$(dirname "$d"); done
      ;;
  esac
  prev="$arg"
done
cd /
exec runuser -u postgres -- "{pg_ctl}" "$@"
"""


def _write_pg_ctl_wrapper() -> str | None:
    pg_ctl = _pg_ctl()
    if pg_ctl is None:
        return None
    if os.geteuid() != 0:
        return str(pg_ctl)  # an ordinary user may run pg_ctl directly
    directory = Path(tempfile.mkdtemp(prefix="bulksend-pgctl-"))
    directory.chmod(0o755)
    wrapper = directory / "pg_ctl"
    wrapper.write_text(WRAPPER.replace("{pg_ctl}", str(pg_ctl)))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(wrapper)


def _postgres_url(host: str, port: int | str, user: str, dbname: str, password: str | None) -> str:
    url = sa.URL.create(
        "postgresql+psycopg", username=user, password=password or None,
        host=host, port=int(port), database=dbname,
    )
    return url.render_as_string(hide_password=False)


def _migrate_template(host: str, port: int, user: str, dbname: str, password: str | None,
                      **_: Any) -> None:
    engine = db.create_engine(_postgres_url(host, port, user, dbname, password))
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


_PG_CTL = _write_pg_ctl_wrapper()
postgresql_proc = factories.postgresql_proc(
    executable=_PG_CTL or "/usr/lib/postgresql/15/bin/pg_ctl",
    load=[_migrate_template],
)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file that tests copy instead of migrating again."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    engine = db.create_engine(f"sqlite:///{path}")
    db.upgrade(engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Any:
    """The session's PostgreSQL server (pytest-postgresql executor), template migrated."""
    if _PG_CTL is None or shutil.which("runuser") is None:
        unavailable("PostgreSQL", "no pg_ctl under /usr/lib/postgresql/*/bin")
    return request.getfixturevalue("postgresql_proc")


_counter = itertools.count()


def fresh_database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a new migrated database on `backend`, dropped afterwards."""
    if backend == "sqlite":
        path = tmp_path / "bulksend.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    proc = request.getfixturevalue("pg_server")
    dbname = f"bulksend_test_{os.getpid()}_{next(_counter)}"
    janitor = DatabaseJanitor(
        user=proc.user, host=proc.host, port=proc.port, dbname=dbname,
        template_dbname=proc.template_dbname, password=proc.password,
    )
    with janitor:
        yield _postgres_url(proc.host, proc.port, proc.user, dbname, proc.password)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, migrated database; every test using it runs on both backends."""
    yield from fresh_database_url(request, request.param, tmp_path)


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    """An engine on a fresh, migrated database (SQLite and PostgreSQL)."""
    engine = db.open_store(store_url)
    yield engine
    engine.dispose()
