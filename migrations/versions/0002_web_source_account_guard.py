"""Web unsubscribes, delay warnings, a fresh start for the account guard after enabling.

- `bounce_events.source` also takes 'web': unsubscribes made on the `bulksend serve` page
  or by an RFC 8058 one-click POST.
- `bounce_events.kind` also takes 'delayed': a DSN's delay warning, recorded so an operator
  sees whose mail is delayed (it never suppresses and is not a soft bounce). Downgrading
  deletes these rows: the older schema has no kind that means the same.
- `bounce_events.delivery_id` is indexed: the guards look events up by delivery, and
  deleting deliveries (ON DELETE SET NULL) would otherwise scan the table per row.
- `account_state.guard_since`: the block-rate guard counts only mail the account handed
  over since this moment. The guard sets it when it disables the account, so enabling the
  account again starts a new sample instead of being judged on the mail that tripped it.

SQLite cannot change a CHECK constraint in place: `bounce_events` is copied to a new table
(batch mode, once for both checks). No table references `bounce_events`, so the copy
touches nothing else.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 03:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_SOURCES = ("dsn", "arf", "smtp", "mailto", "manual")
NEW_SOURCES = ("dsn", "arf", "smtp", "mailto", "web", "manual")
OLD_KINDS = ("hard", "soft", "complaint", "unsubscribe", "block", "autoreply", "unknown")
NEW_KINDS = OLD_KINDS + ("delayed",)


def _check(batch_op: object, column: str, values: tuple[str, ...]) -> None:
    quoted = ", ".join(f"'{value}'" for value in values)
    batch_op.drop_constraint(op.f(f"ck_bounce_events_{column}"), type_="check")
    batch_op.create_check_constraint(op.f(f"ck_bounce_events_{column}"),
                                     f"{column} IN ({quoted})")


def upgrade() -> None:
    with op.batch_alter_table('bounce_events', schema=None) as batch_op:
        _check(batch_op, "source", NEW_SOURCES)
        _check(batch_op, "kind", NEW_KINDS)
        batch_op.create_index(batch_op.f('ix_bounce_events_delivery_id'), ['delivery_id'], unique=False)
    with op.batch_alter_table('account_state', schema=None) as batch_op:
        batch_op.add_column(sa.Column('guard_since', sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('account_state', schema=None) as batch_op:
        batch_op.drop_column('guard_since')
    # Web unsubscribes were made by hand, as far as the older schema can tell; a delay
    # warning has no older kind (not a soft bounce: that could suppress), so it goes.
    op.execute("UPDATE bounce_events SET source = 'manual' WHERE source = 'web'")
    op.execute("DELETE FROM bounce_events WHERE kind = 'delayed'")
    with op.batch_alter_table('bounce_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_bounce_events_delivery_id'))
        _check(batch_op, "source", OLD_SOURCES)
        _check(batch_op, "kind", OLD_KINDS)
