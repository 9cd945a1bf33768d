"""The store opens, migrates and matches the model on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from bulksend import db, models
from bulksend.errors import StoreError


def test_migrated_schema_matches_the_models(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, models.metadata) == []


def test_current_revision_is_head(engine: sa.Engine) -> None:
    assert db.current_revision(engine) == db.head_revision()


def test_every_table_of_the_design_exists(engine: sa.Engine) -> None:
    names = set(sa.inspect(engine).get_table_names())
    assert {
        "lists", "subscribers", "list_members", "suppressions", "campaigns", "campaign_lists",
        "deliveries", "delivery_attempts", "account_state", "bounce_events", "mailbox_seen",
    } <= names


def test_delivery_state_outside_the_contract_is_refused(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError), db.transaction(engine) as connection:
        connection.execute(sa.insert(models.campaigns).values(
            name="c", subject="s", html_template="h", settings={}, created_at=0, updated_at=0,
            status="exploded",
        ))


def test_sqlite_is_opened_for_durability(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        pragma = lambda name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") >= 5000


def test_unmigrated_database_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not initialised: run `bulksend db upgrade`"):
        db.open_store(f"sqlite:///{tmp_path / 'empty.db'}")


def test_upgrade_twice_is_harmless(tmp_path: Path) -> None:
    engine = db.create_engine(f"sqlite:///{tmp_path / 'y.db'}")
    assert db.upgrade(engine) == db.upgrade(engine) == db.head_revision()


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(StoreError, match="only sqlite and postgresql"):
        db.create_engine("mysql://u:secret@h/db")
